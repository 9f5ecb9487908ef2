#!/usr/bin/env bash
# The GPU check (issue 11): one command on a CUDA machine, from the repository.
#
#   benchmarks/gpu_check.sh [--dry-run]
#
# 1. A Python with a CUDA torch: $CASA_PYTHON if set; else the system python3 when its torch sees a GPU
#    and it has numpy, safetensors and pytest; else a virtual environment made once from
#    requirements-dev.txt in $CASA_VENVS/gpu-<hash> (default ~/.cache/casa-lora/venvs; PyPI's Linux
#    torch wheels are CUDA builds; $CASA_TORCH_INDEX adds another index, e.g.
#    https://download.pytorch.org/whl/cu128). Setting up is not counted in the time budget below.
# 2. The core tests (tests/core) with CASA_TEST_DEVICE=cuda: basis, drift and transfer on the GPU.
# 3. The benchmark on the GPU (benchmarks/bench_wan13b.py --device cuda): Wan2.1-1.3B shapes
#    ($CASA_GPU_BLOCKS, default 3 blocks) and Wan2.1-14B shapes ($CASA_GPU_BLOCKS_14B, default 2 blocks),
#    printing its figures (among them `14B per-LoRA (measured on 14B shapes, whole model): N s`);
#    with $CASA_REFERENCE (a folder holding the reference's transfer.py and utils.py, and scipy in that
#    Python) the reference side by side too.
# Steps 2 and 3 share 8 minutes ($CASA_GPU_CHECK_SECONDS, default 480): each gets what is left and a
# step that runs out of time is stopped and reported. The exit status is non-zero when a step failed.
#
# --dry-run: the same steps on the CPU at tiny sizes (widths 128/384 and 256/640, one block each, in one
# process), with the Python running it ($CASA_PYTHON or python3) and the device-aware core tests only;
# well under a minute on an idle machine. tests/core/test_gpu_check.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
BUDGET=${CASA_GPU_CHECK_SECONDS:-480}
OUT_DIR=${CASA_GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/casa-gpu-check-XXXXXX")}

has_stack() {  # has_stack <python> <need cuda: 0|1>
    "$1" - "$2" <<'EOF' >/dev/null 2>&1
import sys
import numpy, pytest, safetensors, torch  # noqa: F401
sys.exit(0 if sys.argv[1] == "0" or torch.cuda.is_available() else 1)
EOF
}

# ---------------------------------------------------------------------------------------------- 1. Python
if [ -n "${CASA_PYTHON:-}" ]; then
    PY=$CASA_PYTHON
elif [ "$DRY" = 1 ]; then
    PY=python3
elif has_stack python3 1; then
    PY=python3
else
    VENVS=${CASA_VENVS:-$HOME/.cache/casa-lora/venvs}
    VENV="$VENVS/gpu-$(cat requirements-dev.txt | sha256sum | cut -c1-12)"
    if [ ! -f "$VENV/.complete" ]; then
        echo "== setting up $VENV from requirements-dev.txt (a CUDA torch)"
        rm -rf "$VENV" && mkdir -p "$VENVS" && python3 -m venv --system-site-packages "$VENV" || exit 1
        "$VENV/bin/pip" install -q ${CASA_TORCH_INDEX:+--extra-index-url "$CASA_TORCH_INDEX"} -r requirements-dev.txt \
            || { echo "gpu_check: could not install requirements-dev.txt into $VENV" >&2; exit 1; }
        touch "$VENV/.complete"
    fi
    PY="$VENV/bin/python"
fi
if ! has_stack "$PY" $((1 - DRY)); then
    if [ "$DRY" = 1 ]; then
        echo "gpu_check: $PY lacks torch, numpy, safetensors or pytest" >&2
    else
        echo "gpu_check: $PY has no torch that sees a CUDA GPU (and numpy, safetensors, pytest)" >&2
    fi
    exit 1
fi
if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    TESTS=(tests/core/test_transfer_output.py tests/core/test_drift_ulp.py)
    BENCH=(--dims 128,384 --dims-14b 256,640 --blocks 1 --blocks-14b 1 --in-process)
else
    DEVICE=cuda
    TESTS=(tests/core)
    BENCH=(--blocks "${CASA_GPU_BLOCKS:-3}" --blocks-14b "${CASA_GPU_BLOCKS_14B:-2}")
fi
if [ -n "${CASA_REFERENCE:-}" ]; then
    BENCH+=(--reference "$CASA_REFERENCE")
fi
"$PY" -c 'import torch; print("gpu_check: torch", torch.__version__, "|",
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
echo "gpu_check: device $DEVICE, $(uptime | sed 's/.*load average/load average/'), budget ${BUDGET} s, output in $OUT_DIR"

START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
FAILED=()
run_step() {  # run_step <name> <command...>: within the time left
    local name=$1; shift
    local t
    t=$(left)
    if [ "$t" -le 0 ]; then
        echo "== $name: no time left"; FAILED+=("$name (no time left)"); return
    fi
    echo "== $name ($t s left)"
    local t0=$SECONDS
    timeout --kill-after=10 "$t" "$@"
    local rc=$?
    echo "== $name: exit $rc after $(( SECONDS - t0 )) s"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        FAILED+=("$name (stopped: out of time)")
    elif [ "$rc" != 0 ]; then
        FAILED+=("$name (exit $rc)")
    fi
}

# ---------------------------------------------------------------------------------------------- 2. core tests
run_step "core tests on $DEVICE" env CASA_TEST_DEVICE="$DEVICE" "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider \
    -k "not gpu_check"
# ---------------------------------------------------------------------------------------------- 3. benchmark
run_step "benchmark on $DEVICE" env PYTHONUNBUFFERED=1 "$PY" benchmarks/bench_wan13b.py --device "$DEVICE" \
    --out "$OUT_DIR/bench" "${BENCH[@]}"

echo "gpu_check: $(( $(date +%s) - START )) s for tests and benchmark (budget ${BUDGET} s), $(uptime | sed 's/.*load average/load average/')"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'gpu_check: FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu_check: passed"
