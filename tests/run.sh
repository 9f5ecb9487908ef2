#!/usr/bin/env bash
# The project's test command (README, CI).
#
# 1. `ruff check` and the core library's unit tests (tests/core), in a virtual environment made from
#    requirements-dev.txt (torch 2.13.0 CPU build, numpy, safetensors, gguf, pytest, ruff).
# 2. The tests inside a real ComfyUI (tests/comfy), in a second environment made from
#    tests/comfy/requirements.txt + the newest tested ComfyUI's own requirements.txt.
#
# Which ComfyUI trees:
#   * CI=true: the unmodified source snapshots in ../shared/comfyui/ (ComfyUI 0.33.0 and 0.8.0, and
#     city96's ComfyUI-GGUF), unpacked once (SHA-256 checked) into $CASA_TREES; the node tests run
#     against BOTH versions. A missing tree, a missing Chromium or ANY skipped test is a failure.
#   * otherwise: a tree found the usual ways ($COMFYUI_PATH, this repository checked out as
#     <ComfyUI>/custom_nodes/<pack>, ~/.cache/casa-lora/ComfyUI); when none is found, the snapshots
#     as under CI (both versions; CASA_COMFY_VERSIONS="0.33.0" to run one). Skips stay allowed and are
#     counted loudly in the summary.
#
# The frontend tests also need Chromium: Debian's `chromium` is installed when missing (apt-get).
#
# Environments live in $CASA_VENVS (default ~/.cache/casa-lora/venvs), keyed by a hash of the
# requirement files, so they are built once per machine and rebuilt when a requirement changes.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
PYTHON=${PYTHON:-python3}
CACHE=${CASA_TEST_CACHE:-$HOME/.cache/casa-lora}
VENVS=${CASA_VENVS:-$CACHE/venvs}
TREES=${CASA_TREES:-$CACHE/trees}
SHARED_COMFY=${CASA_SHARED_COMFYUI:-$REPO/../shared/comfyui}
VERSIONS=${CASA_COMFY_VERSIONS:-0.33.0 0.8.0}
CI_MODE=0
case "${CI:-}" in true|1|yes) CI_MODE=1 ;; esac
mkdir -p "$VENVS"

elapsed() { echo "$(( $(date +%s) - START )) s"; }

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

unpack() {  # unpack <archive file name> <folder it unpacks to>: path of the unpacked, digest-checked tree
    local archive=$1 folder=$2
    if [ -f "$TREES/$folder/.casa-unpacked" ]; then
        printf '%s\n' "$TREES/$folder"; return 0
    fi
    if [ ! -f "$SHARED_COMFY/$archive" ]; then
        echo "== missing $SHARED_COMFY/$archive (set CASA_SHARED_COMFYUI to the folder of the snapshots)" >&2
        return 1
    fi
    local want got
    want=$(awk -v f="$archive" '$2 == f {print $1}' "$SHARED_COMFY/SHA256SUMS")
    got=$(sha256sum "$SHARED_COMFY/$archive" | cut -d' ' -f1)
    if [ -z "$want" ] || [ "$want" != "$got" ]; then
        echo "== $archive: SHA-256 $got does not match SHA256SUMS (${want:-no entry}); not unpacking it" >&2
        return 1
    fi
    echo "== unpacking $archive into $TREES/$folder" >&2
    mkdir -p "$TREES"
    local tmp
    tmp=$(mktemp -d "$TREES/.unpack-XXXXXX")
    tar -xJf "$SHARED_COMFY/$archive" -C "$tmp"
    rm -rf "${TREES:?}/$folder"
    mv "$tmp/$folder" "$TREES/$folder"
    rm -rf "$tmp"
    touch "$TREES/$folder/.casa-unpacked"
    printf '%s\n' "$TREES/$folder"
}

# ---------------------------------------------------------------------------------------------------
# 1. lint + core tests
# ---------------------------------------------------------------------------------------------------
CORE=$(venv_for core requirements-dev.txt)
if [ ! -f "$CORE/.complete" ]; then
    "$CORE/bin/pip" install -q -r requirements-dev.txt >&2
    touch "$CORE/.complete"
fi
echo "== ruff check"
"$CORE/bin/ruff" check .
if [ "$CI_MODE" = 1 ]; then export CASA_NO_SKIP=1 CASA_REQUIRE_COMFYUI=1; fi
echo "== core tests ($CORE) [$(elapsed)]"
"$CORE/bin/python" -m pytest tests/core -q -p no:cacheprovider

# ---------------------------------------------------------------------------------------------------
# 2. ComfyUI trees
# ---------------------------------------------------------------------------------------------------
ROOTS=()
FOUND=""
if [ "$CI_MODE" = 0 ]; then
    FOUND=$("$CORE/bin/python" -c 'import sys; sys.path.insert(0, "tests/comfy"); import comfy_locate as c; r = c.find_comfyui(); print(r or "")')
fi
if [ -n "$FOUND" ]; then
    ROOTS=("$FOUND")
else
    for v in $VERSIONS; do
        if t=$(unpack "comfyui-$v.tar.xz" "ComfyUI-$v"); then ROOTS+=("$t"); else
            [ "$CI_MODE" = 1 ] && { echo "== CI: ComfyUI $v is required and could not be unpacked" >&2; exit 1; }
        fi
    done
fi
GGUF_PACK=""
if g=$(unpack comfyui-gguf-795e451.tar.xz ComfyUI-GGUF); then GGUF_PACK=$g; else
    [ "$CI_MODE" = 1 ] && { echo "== CI: ComfyUI-GGUF is required and could not be unpacked" >&2; exit 1; }
fi

if [ ${#ROOTS[@]} -eq 0 ]; then
    echo "== no ComfyUI tree found or unpacked: the ComfyUI tests are collected and skipped (see the count below)"
    "$CORE/bin/python" -m pytest tests/comfy -q -p no:cacheprovider
    echo "== done in $(elapsed)"
    exit 0
fi

# one environment for every tree: the first (newest) tree's requirements; older trees run in it
# (0.8.0 pins an older frontend and only logs that a newer one is installed)
REQ_ROOT=${ROOTS[0]}
CVENV=$(venv_for comfy tests/comfy/requirements.txt tests/comfy/constraints.txt "$REQ_ROOT/requirements.txt")
if [ ! -f "$CVENV/.complete" ]; then
    "$CVENV/bin/pip" install -q -c tests/comfy/constraints.txt \
        -r tests/comfy/requirements.txt -r "$REQ_ROOT/requirements.txt" >&2
    touch "$CVENV/.complete"
fi
# the frontend tests drive the real ComfyUI page in headless Chromium (Debian's package)
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CASA_CHROMIUM:-}" ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian's chromium for the frontend tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
        || echo "== could not install chromium: the frontend tests will be skipped (a failure under CI)" >&2
fi

STATUS=0
for root in "${ROOTS[@]}"; do
    echo "== ComfyUI tests against $root ($CVENV) [$(elapsed)]"
    COMFYUI_PATH="$root" CASA_COMFYUI_GGUF="${CASA_COMFYUI_GGUF:-$GGUF_PACK}" \
        "$CVENV/bin/python" -m pytest tests/comfy -q -p no:cacheprovider || STATUS=1
done
echo "== done in $(elapsed)"
exit $STATUS
