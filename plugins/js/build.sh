#!/usr/bin/env bash
# Builds JavaScript plugins into target/polyglot/js-<name>.wasm:
#   plugins/js/build.sh clean-readings json-actions
# Each plugin is <name>/app.js; its world follows from what it exports.
# Installs the pinned toolchain (package-lock.json) into node_modules on first
# use. componentize-js embeds the StarlingMonkey engine and snapshots the
# parsed module, so the JavaScript runs interpreted: weval AOT is not used.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out_dir="$root/target/polyglot"
source "$root/plugins/wit.sh"

if [[ $# -eq 0 ]]; then
    echo "usage: $0 <plugin-dir-name>..." >&2
    exit 2
fi

# npm's cache would otherwise land in ~/.npm, outside the repository.
export npm_config_cache="$root/target/npm-cache"
if [[ ! -x "$here/node_modules/.bin/jco" ]]; then
    (cd "$here" && npm ci --no-audit --no-fund)
fi

mkdir -p "$out_dir"
for name in "$@"; do
    app="$here/$name/app.js"
    if [[ ! -f "$app" ]]; then
        echo "no $app" >&2
        exit 1
    fi
    case "$(grep -oE '^export const (preprocess|template|postprocess|handler) ' "$app" | head -n1)" in
        "export const preprocess ") world=preprocessor ;;
        "export const template ") world=prompt-template ;;
        "export const postprocess ") world=postprocessor ;;
        "export const handler ") world=rule ;;
        *)
            echo "$app exports none of preprocess, template, postprocess, handler" >&2
            exit 1
            ;;
    esac
    out="$out_dir/js-$name.wasm"
    "$here/node_modules/.bin/jco" componentize "$app" \
        --wit "$wit_dir" --world-name "$world" \
        --disable http fetch-event \
        --bundle --bundle-config "$here/bundle.config.mjs" -o "$out"
    echo "built $out ($(stat -c %s "$out") bytes)"
done
