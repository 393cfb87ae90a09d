# Sourced by the plugin build scripts, after they set $root: sets $wit_dir to
# the newest wit/ganglion-plugin@<major>.<minor>.<patch>/ folder, the contract
# the example plugins build against (the one ganglion-tools scaffolds for;
# pre-releases are skipped by both).
wit_dir="$(find "$root/wit" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
    -regex '.*/ganglion-plugin@[0-9]+\.[0-9]+\.[0-9]+' | sort -V | tail -n 1)"
if [[ -z "$wit_dir" ]]; then
    echo "no $root/wit/ganglion-plugin@<version> folder" >&2
    exit 1
fi
