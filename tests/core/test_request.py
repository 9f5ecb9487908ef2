"""The front door: the request built from the user's choices, the same for the node and the command line,
and the small public API (Transfer, the ComfyUI key helpers)."""
from __future__ import annotations

import pytest
import torch

import casa_core
from casa_core import synth
from casa_core.cli import build_parser
from casa_core.cli import request as cli_request
from casa_core.factorize import OutputSpec
from casa_core.formats.checkpoint import Checkpoint
from casa_core.formats.keys import layer_of_model_key, natural_key, patch_key, strip_patch_prefix
from casa_core.formats.lora import read_lora
from casa_core.formats.safetensors_io import write_file
from casa_core.routing import CasaParams
from casa_core.transfer import TransferConfig

CLI = ["transfer", "--source", "b.safetensors", "--target", "t.safetensors", "--lora", "l.safetensors",
       "--out", "o.safetensors"]


def node_request(**widgets):
    """What CASATransferLoRA.execute passes to from_inputs: its widget values as they arrive."""
    return casa_core.from_inputs(widgets["method"], tau=widgets["tau"], q_dom=widgets["q_dom"],
                                 q_act=widgets["q_act"], energy=widgets["energy"], injection=widgets["injection"],
                                 rank=widgets["rank"], kept_energy=widgets["kept_energy"], device="cpu")


NODE_DEFAULTS = dict(method="CASA", tau=0.5, q_dom=0.5, q_act=0.85, energy=0.9, injection="low-rank", rank=128,
                     kept_energy=0.0)


@pytest.mark.parametrize("node, cli, expected", [
    # the defaults: the CASA authors' parameters, low-rank at rank 128
    ({}, [], TransferConfig("casa", CasaParams(0.5, 0.5, 0.85, 0.9), OutputSpec("lowrank", 128, None, 512))),
    # a kept share of the energy instead of a rank (0 on the node means "use the rank")
    ({"method": "ProLoRA", "kept_energy": 0.95, "rank": 64}, ["--method", "prolora", "--kept-energy", "0.95",
                                                              "--rank", "64"],
     TransferConfig("prolora", CasaParams(), OutputSpec("lowrank", None, 0.95, 512))),
    # exact injection ignores rank and kept_energy
    ({"method": "direct reuse", "injection": "exact", "rank": 7, "kept_energy": 0.5},
     ["--method", "direct", "--injection", "exact", "--rank", "7", "--kept-energy", "0.5"],
     TransferConfig("direct", CasaParams(), OutputSpec("exact", None, None, 512))),
    # CASA's parameters and an ablation
    ({"method": "CASA arbitration only", "tau": 0.25, "q_dom": 0.45, "q_act": 0.9, "energy": 0.8, "rank": 32},
     ["--method", "arbitration_only", "--tau", "0.25", "--q-dom", "0.45", "--q-act", "0.9", "--energy", "0.8",
      "--rank", "32"],
     TransferConfig("arbitration_only", CasaParams(0.25, 0.45, 0.9, 0.8), OutputSpec("lowrank", 32, None, 512))),
])
def test_node_and_command_line_build_the_same_request(node, cli, expected):
    from_node = node_request(**{**NODE_DEFAULTS, **node})
    a = build_parser().parse_args(CLI + cli)
    from_cli = cli_request(a, a.method[0])
    assert from_node == from_cli == expected
    from_node.validate()


def test_menus_name_every_method_and_the_defaults_are_the_references():
    from casa_core.methods import METHODS

    assert sorted(casa_core.METHOD_MENU.values()) == sorted(METHODS)
    assert set(casa_core.INJECTION_MENU.values()) == {"lowrank", "exact"}
    assert casa_core.DTYPES == {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    d = casa_core.CASA_DEFAULTS
    assert (d.tau, d.q_dom, d.q_act, d.energy) == (0.5, 0.5, 0.85, 0.9)
    a = build_parser().parse_args(CLI)
    assert (a.tau, a.q_dom, a.q_act, a.energy, a.rank, a.max_rank, a.dtype) == (0.5, 0.5, 0.85, 0.9, 128, 512,
                                                                                  "float16")


def test_a_bad_choice_is_refused_when_the_transfer_starts():
    with pytest.raises(ValueError, match="unknown transfer method"):
        casa_core.from_inputs("CASA++").validate()
    with pytest.raises(ValueError, match="energy must lie"):
        casa_core.from_inputs("casa", kept_energy=1.5).validate()


def test_transfer_owns_its_report_and_provenance(tmp_path):
    shape = synth.WanShape(dim=32, ffn_dim=64, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=0, dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    write_file(str(tmp_path / "lora.safetensors"), synth.style_lora(svd, rank=4, alpha=4.0))
    lora = read_lora(tmp_path / "lora.safetensors", Checkpoint(tmp_path / "base.safetensors").layers)
    t = casa_core.Transfer(lora, None, None, casa_core.from_inputs("direct reuse", injection="exact"), 1.0)
    assert t.report.layers == {}
    results = list(t)
    assert [r.layer for r in results] == sorted(lora.updates, key=natural_key)
    assert set(t.report.layers) == set(lora.updates)
    for r in results:  # direct reuse, exact: the LoRA's own update
        upd = lora.updates[r.layer]
        torch.testing.assert_close(r.output.tensors[0], upd.up.float() * float(upd.scale) @ upd.down.float())
    assert t.provenance()["casa_lora.method"] == "direct"
    assert t.report.totals()["layers"] == len(lora.updates)


def test_comfy_key_helpers():
    assert patch_key("blocks.0.self_attn.q") == "diffusion_model.blocks.0.self_attn.q.weight"
    assert strip_patch_prefix("diffusion_model.blocks.0.ffn.0.weight") == "blocks.0.ffn.0.weight"
    assert strip_patch_prefix("first_stage_model.x.weight") is None
    for name in ("diffusion_model.head.head.weight", "model.diffusion_model.head.head.weight", "head.head.weight",
                 "head.head"):
        assert layer_of_model_key(name) == "head.head"
    assert sorted(["blocks.10.x", "blocks.2.x", "blocks.1.y"], key=natural_key) == ["blocks.1.y", "blocks.2.x",
                                                                                   "blocks.10.x"]
