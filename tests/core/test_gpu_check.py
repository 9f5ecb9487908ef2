"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps on the CPU at tiny sizes pass and print the
benchmark's figure lines (the real run needs a CUDA machine; this keeps the script working meanwhile)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_passes_and_prints_its_figures(tmp_path):
    env = dict(os.environ, CASA_PYTHON=sys.executable, CASA_GPU_CHECK_OUT=str(tmp_path), CASA_TEST_DEVICE="")
    env.pop("CASA_REFERENCE", None)
    # a hang guard, not a speed check: the dry run takes well under a minute on an idle machine
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "gpu_check: passed" in out
    assert re.search(r"== core tests on cpu: exit 0 after", out), out[-4000:]
    assert re.search(r"\d+ passed", out)
    assert "device cpu" in out
    for pattern in (
        rf"basis \(one-time\): +{NUMBER} s",
        rf"drift \(one-time\): +{NUMBER} s",
        rf"per-LoRA CASA lowrank: +{NUMBER} s",
        rf"per-LoRA CASA exact +: +{NUMBER} s",
        rf"1\.3B whole model \(30 blocks, from 1 measured\): basis {NUMBER} s",
        rf"14B whole model \(40 blocks, from 1 measured\): basis {NUMBER} s",
        rf"^14B per-LoRA \(measured on 14B shapes, whole model\): {NUMBER} s$",
        rf"14B warm drift-cache hit \(whole model\): {NUMBER} s",
        rf"14B peak extra RSS \(largest of basis, drift, per-LoRA\): {NUMBER} GiB",
    ):
        assert re.search(pattern, out, re.M), f"no line matching {pattern!r} in:\n{out[-4000:]}"
    assert (tmp_path / "bench" / "results.json").is_file()
