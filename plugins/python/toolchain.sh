# Sourced by the Python build scripts (plugins/python/build.sh,
# plugins/fixtures/py-tagger/build.sh) with $root set to the repository:
# installs the pinned componentize-py into target/py-venv on first use and
# sets $venv. Nothing goes outside the repository.
COMPONENTIZE_PY_VERSION=0.25.1
venv="$root/target/py-venv"

export PIP_CACHE_DIR="$root/target/pip-cache"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ "$("$venv/bin/componentize-py" --version 2>/dev/null || true)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --no-cache-dir --quiet "componentize-py==$COMPONENTIZE_PY_VERSION"
fi
