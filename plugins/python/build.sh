#!/usr/bin/env bash
# Builds Python plugins into target/polyglot/py-<name>.wasm:
#   plugins/python/build.sh clean-readings json-actions
# Each plugin is plugins/python/<name>/app.py; the modules in
# plugins/python/shared/ go in beside it. The world comes from the export
# class app.py defines. Installs the pinned componentize-py into
# target/py-venv on first use (the same venv as plugins/fixtures/py-tagger).
# Works from any directory; writes nothing outside the repository.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 <plugin-dir-name>..." >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
outdir="$root/target/polyglot"
source "$root/plugins/python/toolchain.sh"
source "$root/plugins/wit.sh"

# componentize-py adds a site-packages folder to the app's path: $VIRTUAL_ENV's,
# else pipenv's, else the host Python's (whose listing then ends up in the
# component). Point it at an empty one so only our sources go in.
no_site="$root/target/py-polyglot-env"
mkdir -p "$no_site/lib/python/site-packages" "$outdir"

for name in "$@"; do
    src="$here/$name"
    if [[ ! -f "$src/app.py" ]]; then
        echo "no plugin at $src/app.py" >&2
        exit 1
    fi
    export_class="$(sed -n -E 's/^class (Preprocess|Template|Postprocess|Handler)\(exports\..*/\1/p' "$src/app.py" | head -n 1)"
    case "$export_class" in
        Preprocess) world=preprocessor ;;
        Template) world=prompt-template ;;
        Postprocess) world=postprocessor ;;
        Handler) world=rule ;;
        *)
            echo "$src/app.py defines no export class (Preprocess, Template, Postprocess or Handler)" >&2
            exit 1
            ;;
    esac
    # Build from a copy under target/: the Python that componentize-py runs
    # at build time writes __pycache__ next to its sources.
    stage="$root/target/py-$name-src"
    rm -rf "$stage"
    mkdir -p "$stage"
    cp "$src/app.py" "$here"/shared/*.py "$stage/"
    out="$outdir/py-$name.wasm"
    VIRTUAL_ENV="$no_site" "$venv/bin/componentize-py" -d "$wit_dir" -w "$world" componentize app -p "$stage" -o "$out"
    echo "built $out ($world, $(stat -c %s "$out") bytes)"
done
