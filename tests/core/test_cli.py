"""The command line: demo and transfer, end to end on tiny files."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

import torch
from safetensors.torch import load_file

from casa_core import synth
from casa_core.cli import main
from casa_core.formats.safetensors_io import write_file

DEMO_ARGS = ("--dim", "128", "--ffn-dim", "256", "--blocks", "1", "--rank", "8")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """One ``demo`` run at test size, shared by the tests below: (its folder, what it printed)."""
    out = tmp_path_factory.mktemp("demo") / "first"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), *DEMO_ARGS]) == 0
    return out, printed.getvalue()


def test_demo_writes_every_method_a_report_and_a_picture(demo_out):
    out, text = demo_out
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"casa", "restoration_only", "arbitration_only", "prolora", "direct"}
    for method, rep in report["methods"].items():
        sd = load_file(str(out / "loras" / f"transferred_{method}.safetensors"))
        ups = [k for k in sd if k.endswith(".lora_up.weight")]
        assert len(ups) == rep["totals"]["layers"] == 10
        for k in ups:  # alpha = rank, so ComfyUI's scale is exactly 1
            alpha = float(sd[k.replace(".lora_up.weight", ".alpha")])
            assert alpha == sd[k].shape[1]
            # every method honours --rank 8 (the demo's LoRA has rank 16: direct reuse is truncated too)
            assert sd[k].shape[1] == 8, (method, k, sd[k].shape)
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
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


@pytest.mark.parametrize("out_is", ["--source", "--target", "--report"])
def test_an_output_that_would_overwrite_an_input_model_is_refused_before_any_work(tmp_path, capsys, out_is):
    base, _ = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "target.safetensors"), base)
    write_file(str(tmp_path / "l.safetensors"), base)  # read only after the check
    before = {n: (tmp_path / n).read_bytes() for n in ("base.safetensors", "target.safetensors")}
    paths = {"--source": tmp_path / "base.safetensors", "--target": tmp_path / "target.safetensors",
             "--report": tmp_path / "r.json"}
    out = paths[out_is]
    code = main(["transfer", "--source", str(paths["--source"]), "--target", str(paths["--target"]),
                 "--lora", str(tmp_path / "l.safetensors"), "--out", str(out), "--report", str(paths["--report"]),
                 "--cache-dir", str(tmp_path / "c"), "--method", "direct"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"would overwrite the {out_is} file" in err, err
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not (tmp_path / "c").exists()  # refused before any basis or drift


def test_an_output_without_the_safetensors_extension_is_refused_before_any_work(tmp_path, capsys):
    """ComfyUI lists LoRAs by extension: a file written as ``--out result`` would never show up in it."""
    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "style.safetensors"), synth.style_lora(svd, rank=4, seed=1))
    code = main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target", str(tmp_path / "base.safetensors"),
                 "--lora", str(tmp_path / "style.safetensors"), "--out", str(tmp_path / "result"),
                 "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    err = capsys.readouterr().err
    assert "a LoRA file needs the .safetensors extension" in err and f"{tmp_path / 'result.safetensors'}" in err, err
    assert not (tmp_path / "result").exists() and not (tmp_path / "c").exists()


def test_an_output_folder_that_cannot_be_written_fails_at_once(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "style.safetensors"), synth.style_lora(svd, rank=4, seed=1))
    for flag, value in (("--out", tmp_path / "blocker" / "o.safetensors"),
                        ("--report", tmp_path / "blocker" / "r.json")):
        args = {"--out": str(tmp_path / "o.safetensors"), "--report": str(tmp_path / "r.json")}
        args[flag] = str(value)
        code = main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
                     str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "style.safetensors"),
                     "--out", args["--out"], "--report", args["--report"], "--cache-dir", str(tmp_path / "c")])
        assert code == 2
        err = capsys.readouterr().err
        assert f"{value} cannot be written" in err and "Traceback" not in err, err
        assert not (tmp_path / "c").exists()


def test_an_output_in_a_new_folder_is_written_there(tmp_path):
    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "style.safetensors"), synth.style_lora(svd, rank=4, seed=1))
    out = tmp_path / "new" / "sub" / "o.safetensors"
    assert main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
                 str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "style.safetensors"),
                 "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--method", "direct"]) == 0
    assert load_file(str(out))


def test_a_folder_of_loras_drops_the_keys_comfyui_cannot_load_as_one_lora_does(tmp_path):
    """``blocks.0.norm1`` has no weight in Wan (an affine-free LayerNorm): a ``.diff`` for it is a key ComfyUI
    logs as not loaded. A single LoRA's output leaves it out; so must every output of a folder run."""
    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    (tmp_path / "loras").mkdir()
    for i in (1, 2):
        lora = synth.style_lora(svd, rank=4, seed=i)
        lora["diffusion_model.blocks.0.norm1.diff"] = torch.ones(64) * 1e-3  # nothing to patch
        lora["diffusion_model.blocks.0.norm3.diff"] = torch.ones(64) * 1e-3  # a real weight: kept
        write_file(str(tmp_path / "loras" / f"s{i}.safetensors"), lora)
    common = ["transfer", "--source", str(tmp_path / "base.safetensors"), "--target", str(tmp_path / "base.safetensors"),
              "--cache-dir", str(tmp_path / "c"), "--method", "direct"]
    assert main([*common, "--lora", str(tmp_path / "loras" / "s1.safetensors"),
                 "--out", str(tmp_path / "one.safetensors")]) == 0
    assert main([*common, "--lora", str(tmp_path / "loras"), "--out", str(tmp_path / "many") + "/"]) == 0
    for out in (tmp_path / "one.safetensors", tmp_path / "many" / "s1.safetensors", tmp_path / "many" / "s2.safetensors"):
        keys = set(load_file(str(out)))
        assert "diffusion_model.blocks.0.norm3.diff" in keys, out
        assert "diffusion_model.blocks.0.norm1.diff" not in keys, out


def test_layers_whose_drift_is_lost_in_fp8_noise_are_not_called_identical(tmp_path, capsys):
    """The target is the base stored in fp8: every block linear differs from the base, by rounding only, so
    the separated drift is zero there. The summary must not say those layers have identical weights."""
    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    target = {k: (v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v) for k, v in base.items()}
    write_file(str(tmp_path / "fp8.safetensors"), target)
    write_file(str(tmp_path / "style.safetensors"), synth.style_lora(svd, rank=4, seed=1))
    assert main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target", str(tmp_path / "fp8.safetensors"),
                 "--lora", str(tmp_path / "style.safetensors"), "--out", str(tmp_path / "o.safetensors"),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "identical weights" not in out, out
    assert "does not stand out from the target's storage noise and was estimated as zero" in out, out


def test_a_target_far_from_the_base_is_warned_about(tmp_path, capsys):
    """Another model of the same shapes (or the other Wan2.2 expert) is no distillation of the base: the
    summary says so; a real distillation (1 % drift) gets no such warning."""
    shape = synth.WanShape(dim=64, ffn_dim=128, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=0, dtype=torch.float32)
    other, _ = synth.wan_state_dict(shape, seed=5, dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "other.safetensors"), other)
    write_file(str(tmp_path / "distilled.safetensors"), synth.distill(base, svd, rel_drift=0.01, seed=1))
    write_file(str(tmp_path / "style.safetensors"), synth.style_lora(svd, rank=4, seed=1))
    for target, warned in (("other", True), ("distilled", False)):
        assert main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
                     str(tmp_path / f"{target}.safetensors"), "--lora", str(tmp_path / "style.safetensors"),
                     "--out", str(tmp_path / f"o_{target}.safetensors"), "--cache-dir", str(tmp_path / "c")]) == 0
        out = capsys.readouterr().out
        assert ("far more than a distillation moves them" in out) == warned, (target, out)


def test_outputs_are_reproducible_and_carry_no_local_path(tmp_path, demo_out):
    """The same inputs in two different folders give byte-identical LoRA files, and nothing the pack
    writes (LoRAs, report, cache manifests, the digest memo) contains the folder it ran in."""
    outs = [demo_out[0], tmp_path / "some" / "other" / "place"]
    assert main(["demo", "--out", str(outs[1]), *DEMO_ARGS]) == 0
    loras = sorted(p.name for p in (outs[0] / "loras").glob("transferred_*.safetensors"))
    assert len(loras) == 5
    for name in loras:
        assert (outs[0] / "loras" / name).read_bytes() == (outs[1] / "loras" / name).read_bytes(), name
    for out in outs:
        written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")]
        assert any(p.name == "manifest.json" for p in written) and any(p.name == "report.json" for p in written)
        for p in written:
            data = p.read_bytes()
            if p.suffix == ".safetensors":  # the header (metadata, key names) is where text lives
                data = data[8:8 + int.from_bytes(data[:8], "little")]
            for needle in {str(out.parent), str(out), str(out.resolve().parent)}:
                assert needle.encode() not in data, f"{p.relative_to(out)} contains the local path {needle}"


def test_a_distilled_model_in_shards_transfers_as_its_single_file_does(tmp_path, capsys):
    """The original Wan releases and diffusers repositories ship big models as shards plus an index: given
    the index (or its folder) as --target, the transfer is the one the same model in one file gives; an --out
    onto one of the shards is refused before any work."""
    shape = synth.WanShape(dim=64, ffn_dim=128, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=0, dtype=torch.float32)
    distilled = synth.distill(base, svd, rel_drift=0.01, seed=1)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "distilled.safetensors"), distilled)
    write_file(str(tmp_path / "style.safetensors"), synth.style_lora(svd, rank=4, seed=1))
    shards = tmp_path / "distilled_shards"
    shards.mkdir()
    keys = sorted(distilled)
    weight_map = {}
    for i in range(2):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        write_file(str(shards / name), {k: distilled[k] for k in keys[i::2]})
        weight_map.update({k: name for k in keys[i::2]})
    (shards / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    common = ["--source", str(tmp_path / "base.safetensors"), "--lora", str(tmp_path / "style.safetensors"),
              "--cache-dir", str(tmp_path / "c")]
    outs = {}
    for name, target in (("file", tmp_path / "distilled.safetensors"),
                         ("index", shards / "diffusion_pytorch_model.safetensors.index.json"), ("folder", shards)):
        outs[name] = tmp_path / f"o_{name}.safetensors"
        assert main(["transfer", *common, "--target", str(target), "--out", str(outs[name])]) == 0
    ref = load_file(str(outs["file"]))
    for name in ("index", "folder"):
        got = load_file(str(outs[name]))
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
    capsys.readouterr()
    shard = shards / "diffusion_pytorch_model-00001-of-00002.safetensors"
    before = shard.read_bytes()
    assert main(["transfer", *common, "--target", str(shards), "--out", str(shard)]) == 2
    assert "would overwrite the --target file" in capsys.readouterr().err
    assert shard.read_bytes() == before


def test_an_all_zero_lora_is_warned_about_and_keeps_no_energy(tmp_path, capsys):
    """A LoRA saved before training (its up factors start at zero) has nothing to transfer: the summary says so,
    and every method's row shows no energy kept instead of 100 %: CASA too leaves the model as it is (its
    restoration alone would move the target back towards the base); a trained LoRA gets no such warning."""
    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "distilled.safetensors"), synth.distill(base, svd, rel_drift=0.01, seed=1))
    trained = synth.style_lora(svd, rank=4, seed=1)
    untrained = {k: (torch.zeros_like(v) if "lora_up" in k else v) for k, v in trained.items()}
    assert any("lora_up" in k for k in untrained)
    for name, sd, warned in (("untrained", untrained, True), ("trained", trained, False)):
        write_file(str(tmp_path / f"{name}.safetensors"), sd)
        assert main(["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
                     str(tmp_path / "distilled.safetensors"), "--lora", str(tmp_path / f"{name}.safetensors"),
                     "--out", str(tmp_path / f"o_{name}.safetensors"), "--cache-dir", str(tmp_path / "c"),
                     "--method", "casa", "direct"]) == 0
        out = capsys.readouterr().out
        assert ("its update is zero in every one of its 10 layers" in out) == warned, (name, out)
        row = next(line for line in out.splitlines() if line.startswith("Direct"))
        assert ("100.0%" in row) != warned and ("—" in row) == warned, (name, row)
        row = next(line for line in out.splitlines() if line.startswith("CASA"))
        assert ("—" in row) == warned, (name, row)


def test_a_layer_the_lora_leaves_unchanged_stays_unchanged_under_every_method(tmp_path, capsys):
    """One layer's up factor zero in a trained LoRA: that layer's written update is exactly zero for CASA and
    ProLoRA too (their restoration alone would undo the distillation there), the others are not; a LoRA whose
    alpha is 0 everywhere is named as such, not as an untrained one."""
    from safetensors.torch import load_file

    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "distilled.safetensors"), synth.distill(base, svd, rel_drift=0.01, seed=1))
    lora = synth.style_lora(svd, rank=4, seed=1)
    lora["lora_unet_blocks_0_self_attn_q.lora_up.weight"] = torch.zeros_like(
        lora["lora_unet_blocks_0_self_attn_q.lora_up.weight"])
    write_file(str(tmp_path / "part.safetensors"), lora)
    args = ["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
            str(tmp_path / "distilled.safetensors"), "--cache-dir", str(tmp_path / "c")]
    for method in ("casa", "prolora"):
        out = tmp_path / f"o_{method}.safetensors"
        assert main([*args, "--lora", str(tmp_path / "part.safetensors"), "--out", str(out), "--method", method,
                     "--injection", "exact"]) == 0
        written = load_file(str(out))
        diffs = {k: v for k, v in written.items() if k.endswith(".diff")}
        zero = [k for k, v in diffs.items() if not bool(v.any())]
        assert len(diffs) == 10 and [k for k in zero if "self_attn.q" in k] == zero and len(zero) == 1, (method, zero)
    capsys.readouterr()
    no_alpha = {k: (torch.zeros_like(v) if k.endswith(".alpha") else v) for k, v in synth.style_lora(svd, rank=4,
                                                                                                      seed=1).items()}
    write_file(str(tmp_path / "alpha0.safetensors"), no_alpha)
    assert main([*args, "--lora", str(tmp_path / "alpha0.safetensors"), "--out", str(tmp_path / "o_a.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "its alpha is 0 in every layer" in text and "untrained" not in text, text


def test_a_lora_casa_lora_wrote_is_named_as_a_transfer_when_given_again(tmp_path, capsys):
    """The output of a transfer carries its provenance; given as --lora again it is warned about (it is fitted
    to the distilled model already), an original LoRA is not."""
    base, svd = synth.wan_state_dict(synth.WanShape(dim=64, ffn_dim=128, blocks=1), dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "distilled.safetensors"), synth.distill(base, svd, rel_drift=0.01, seed=1))
    write_file(str(tmp_path / "style.safetensors"), synth.style_lora(svd, rank=4, seed=1))
    args = ["transfer", "--source", str(tmp_path / "base.safetensors"), "--target",
            str(tmp_path / "distilled.safetensors"), "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--lora", str(tmp_path / "style.safetensors"), "--out", str(tmp_path / "once.safetensors")]) == 0
    assert "is itself a transfer" not in capsys.readouterr().out
    assert main([*args, "--lora", str(tmp_path / "once.safetensors"), "--out", str(tmp_path / "twice.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "once.safetensors is itself a transfer casa-lora made (casa of style.safetensors" in out, out
