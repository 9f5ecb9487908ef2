"""The command line: demo and transfer, end to end on tiny files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from casa_core import synth
from casa_core.cli import main
from casa_core.formats.safetensors_io import write_file


def test_demo_writes_every_method_a_report_and_a_picture(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--dim", "128", "--ffn-dim", "256", "--blocks", "1", "--rank", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"casa", "restoration_only", "arbitration_only", "prolora", "direct"}
    for method, rep in report["methods"].items():
        sd = load_file(str(out / "loras" / f"transferred_{method}.safetensors"))
        ups = [k for k in sd if k.endswith(".lora_up.weight")]
        assert len(ups) == rep["totals"]["layers"] == 10
        for k in ups:  # alpha = rank, so ComfyUI's scale is exactly 1
            alpha = float(sd[k.replace(".lora_up.weight", ".alpha")])
            assert alpha == sd[k].shape[1] <= 8 or method == "direct"
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    text = capsys.readouterr().out
    assert "CASA (restoration + arbitration)" in text and "Direct reuse" in text


def test_transfer_with_a_distillation_lora_and_two_methods(tmp_path):
    shape = synth.WanShape(dim=128, ffn_dim=256, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=0, dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "distill.safetensors"), synth.style_lora(svd, rank=4, seed=5))
    write_file(str(tmp_path / "style.safetensors"), synth.style_lora(svd, rank=4, seed=6))
    args = ["transfer", "--source", str(tmp_path / "base.safetensors"), "--distill-lora",
            str(tmp_path / "distill.safetensors"), "--lora", str(tmp_path / "style.safetensors"),
            "--method", "casa", "direct", "--out", str(tmp_path / "out.safetensors"),
            "--report", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "cache"), "--injection", "exact"]
    assert main(args) == 0
    casa = load_file(str(tmp_path / "out_casa.safetensors"))
    direct = load_file(str(tmp_path / "out_direct.safetensors"))
    key = "diffusion_model.blocks.0.self_attn.q.diff"
    assert key in casa and key in direct
    assert not torch.allclose(casa[key].float(), direct[key].float())
    meta = json.loads((tmp_path / "r.json").read_text())
    assert meta["methods"]["casa"]["config"]["injection"] == "exact"


def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "not.safetensors").write_bytes(b"hello, I am not a tensor file at all")
    base, svd = synth.wan_state_dict(synth.WanShape(dim=128, ffn_dim=256, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    code = main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
                 str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "not.safetensors"),
                 "--out", str(tmp_path / "o.safetensors"), "--cache-dir", str(tmp_path / "c"), "--method", "direct"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not.safetensors" in err and "not a safetensors file" in err
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# several LoRAs in one call (casa_core/batch.py)
# ------------------------------------------------------------------------------------------------

def _trio(tmp_path, n_loras=3, dim=128, ffn=256, blocks=1):
    """A base, a distilled model (``synth.distill``) and ``n_loras`` style LoRAs in ``tmp_path/loras``."""
    shape = synth.WanShape(dim=dim, ffn_dim=ffn, blocks=blocks)
    base, svd = synth.wan_state_dict(shape, seed=0, dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "distilled.safetensors"), synth.distill(base, svd, rel_drift=3e-3))
    (tmp_path / "loras").mkdir()
    names = []
    for i in range(n_loras):
        name = f"style_{chr(ord('a') + i)}.safetensors"
        write_file(str(tmp_path / "loras" / name), synth.style_lora(svd, rank=4, seed=10 + i))
        names.append(name)
    return names


def _batch_args(tmp_path, *extra, loras=None):
    return ["transfer", "--source", str(tmp_path / "base.safetensors"), "--target", str(tmp_path / "distilled.safetensors"),
            "--lora", *(loras or [str(tmp_path / "loras")]), "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--rank", "8", *extra]


def test_a_batch_of_three_loras_runs_in_one_call_with_one_line_each_and_a_table(tmp_path, capsys):
    names = _trio(tmp_path)
    # a folder and a file given twice (once inside the folder): each LoRA is transferred once
    assert main(_batch_args(tmp_path, "--report", str(tmp_path / "batch.json"),
                            loras=[str(tmp_path / "loras"), str(tmp_path / "loras" / names[0])])) == 0
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] + "]" for ln in lines] == ["[1/3]", "[2/3]", "[3/3]"], cap.err
    for ln, name in zip(lines, names):
        assert name in ln and "layers" in ln and str(tmp_path / "out" / name) in ln
    table = cap.out.splitlines()
    rows = [ln for ln in table if ln.startswith("style_")]
    assert [r.split()[0] for r in rows] == names and all(r.rstrip().endswith("written") for r in rows)
    assert "3 written, 0 skipped (finished earlier), 0 failed" in cap.out
    report = json.loads((tmp_path / "batch.json").read_text())
    for name in names:
        sd = load_file(str(tmp_path / "out" / name))
        assert any(k.endswith(".lora_up.weight") for k in sd)
        entry = report["loras"][str(tmp_path / "loras" / name)]
        assert entry["outputs"]["casa"]["status"] == "written"
        assert entry["methods"]["casa"]["totals"]["layers"] == sum(1 for k in sd if k.endswith(".lora_up.weight"))
    # three different LoRAs, three different results
    ups = [load_file(str(tmp_path / "out" / n))["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] for n in names]
    assert not torch.equal(ups[0], ups[1]) and not torch.equal(ups[1], ups[2])
    # a rerun does nothing: every output is finished and kept as it is
    mtimes = {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in names}
    assert main(_batch_args(tmp_path)) == 0
    cap = capsys.readouterr()
    assert "0 written, 3 skipped (finished earlier), 0 failed" in cap.out
    assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in names} == mtimes
    # other settings are not "finished": the outputs are remade
    assert main(_batch_args(tmp_path, "--strength", "0.5")) == 0
    cap = capsys.readouterr()
    assert "3 written, 0 skipped" in cap.out and "made from other inputs or settings" in cap.err


@pytest.mark.parametrize("case", ["missing", "not_safetensors", "other_size"])
def test_a_bad_lora_in_a_batch_stops_it_before_the_basis_is_computed(tmp_path, capsys, case):
    names = _trio(tmp_path)
    loras = [str(tmp_path / "loras" / n) for n in names]
    if case == "missing":
        bad = str(tmp_path / "loras" / "stlye_b.safetensors")  # a typo
        loras[1] = bad
    elif case == "not_safetensors":
        bad = str(tmp_path / "loras" / names[2])
        (tmp_path / "loras" / names[2]).write_bytes(b"not a tensor file")
    else:
        _, svd_big = synth.wan_state_dict(synth.WanShape(dim=128, ffn_dim=384, blocks=1), seed=1, dtype=torch.float32)
        bad = str(tmp_path / "loras" / names[2])
        write_file(bad, synth.style_lora(svd_big, rank=4, seed=3))
    assert main(_batch_args(tmp_path, loras=loras)) == 2
    err = capsys.readouterr().err
    assert bad in err, err
    assert {"missing": "does not exist", "not_safetensors": "not a safetensors file",
            "other_size": "another model size"}[case] in err
    # nothing long started: no basis, no drift, no output
    cache = tmp_path / "cache"
    assert not any(p.name.startswith(("basis", "drift")) for p in cache.rglob("*") if p.is_dir()), \
        sorted(str(p) for p in cache.rglob("*"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_several_loras_need_a_folder_and_distinct_names(tmp_path, capsys):
    names = _trio(tmp_path, n_loras=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / names[0]).write_bytes((tmp_path / "loras" / names[0]).read_bytes())
    args = _batch_args(tmp_path, loras=[str(tmp_path / "loras"), str(tmp_path / "other" / names[0])])
    assert main(args) == 2
    assert "same name" in capsys.readouterr().err
    args = _batch_args(tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "one.safetensors")
    assert main(args) == 2
    assert "need a folder" in capsys.readouterr().err


def test_a_batch_killed_midway_redoes_only_what_was_unfinished(tmp_path):
    """SIGKILL while the second LoRA's output is being written (exact injection: the partial file exists
    for the whole job); the rerun keeps the first output untouched, removes the partial file, and writes
    the second and the third."""
    import os
    import signal
    import subprocess
    import sys
    import time

    names = _trio(tmp_path, dim=256, ffn=512, blocks=2)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "casa_core", *_batch_args(tmp_path, "--injection", "exact")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    partial = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(out.glob(names[1] + ".partial-*")) if out.exists() else []
        if found:
            partial = found[0]
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert partial is not None, "the second job's partial file never appeared"
    assert (out / names[0]).exists() and not (out / names[1]).exists() and not (out / names[2]).exists()
    assert partial.exists(), "the killed job left its partial file (what the rerun must clean up)"
    first = (out / names[0]).stat()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert f"removed {partial}" in done.stderr
    rows = {ln.split()[0]: ln for ln in done.stdout.splitlines() if ln.startswith("style_")}
    assert rows[names[0]].rstrip().endswith("finished earlier, skipped")
    assert rows[names[1]].rstrip().endswith("written") and rows[names[2]].rstrip().endswith("written")
    assert (out / names[0]).stat().st_mtime_ns == first.st_mtime_ns and (out / names[0]).stat().st_ino == first.st_ino
    assert not list(out.glob("*.partial-*"))
    for name in names:
        assert any(k.endswith(".diff") for k in load_file(str(out / name)))
