#!/usr/bin/env bash
# The project's test command (README, CI).
#
# 1. The core library's unit tests, in a virtual environment made from requirements-dev.txt.
# 2. The tests inside a real ComfyUI (tests/comfy), in a second environment made from
#    tests/comfy/requirements.txt + that ComfyUI's own requirements.txt, when a ComfyUI tree is
#    found ($COMFYUI_PATH, <ComfyUI>/custom_nodes/<this repo>, or ~/.cache/casa-lora/ComfyUI).
#    Without one they are collected and skipped, and the summary says how many.
#
# The frontend tests also need Chromium: Debian's `chromium` is installed when missing.
#
# Environments live in $CASA_VENVS (default ~/.cache/casa-lora/venvs), keyed by a hash of the
# requirement files, so they are built once per machine and rebuilt when a requirement changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENVS=${CASA_VENVS:-$HOME/.cache/casa-lora/venvs}
mkdir -p "$VENVS"

venv_for() {  # venv_for <name> <requirement files...>: a fresh or finished venv's path
    local name=$1; shift
    local dir
    dir="$VENVS/$name-$(cat "$@" | sha256sum | cut -c1-12)"
    if [ ! -f "$dir/.complete" ]; then
        echo "== building the $name environment in $dir" >&2
        rm -rf "$dir"
        "$PYTHON" -m venv "$dir" >&2
    fi
    printf '%s\n' "$dir"
}

CORE=$(venv_for core requirements-dev.txt)
if [ ! -f "$CORE/.complete" ]; then
    "$CORE/bin/pip" install -q -r requirements-dev.txt >&2
    touch "$CORE/.complete"
fi
echo "== core tests ($CORE)"
"$CORE/bin/python" -m pytest tests/core -q -p no:cacheprovider

COMFY_ROOT=$("$CORE/bin/python" -c 'import sys; sys.path.insert(0, "tests/comfy"); import comfy_locate as c; r = c.find_comfyui(); print(r or "")')
if [ -n "$COMFY_ROOT" ]; then
    echo "== ComfyUI tree: $COMFY_ROOT"
    CVENV=$(venv_for comfy tests/comfy/requirements.txt tests/comfy/constraints.txt "$COMFY_ROOT/requirements.txt")
    if [ ! -f "$CVENV/.complete" ]; then
        "$CVENV/bin/pip" install -q -c tests/comfy/constraints.txt \
            -r tests/comfy/requirements.txt -r "$COMFY_ROOT/requirements.txt" >&2
        touch "$CVENV/.complete"
    fi
    # the frontend tests drive the real ComfyUI page in headless Chromium (Debian's package)
    if ! command -v chromium >/dev/null 2>&1 && [ -z "${CASA_CHROMIUM:-}" ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing Debian's chromium for the frontend tests" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
            || echo "== could not install chromium: the frontend tests will be skipped (see the summary)" >&2
    fi
    echo "== ComfyUI tests ($CVENV)"
    COMFYUI_PATH="$COMFY_ROOT" "$CVENV/bin/python" -m pytest tests/comfy -q -p no:cacheprovider
else
    echo "== no ComfyUI tree found: the ComfyUI tests are collected and skipped (see the count below)"
    "$CORE/bin/python" -m pytest tests/comfy -q -p no:cacheprovider
fi
