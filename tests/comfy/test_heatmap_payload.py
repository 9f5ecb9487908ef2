"""CASARoutingHeatmap's ui output for the web widget (``casa_heatmap``), its ``view`` input, and the
served extension file, on a real ComfyUI server with tiny synthetic models.

What the widget relies on: the list of layers (block, projection, whether it has routing data), the
layer shown, and the picture's geometry (panel cells in picture pixels) with the value of every cell;
the preview image is exactly the node's IMAGE output and matches that geometry.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

PREFIX = "casa_hm"
BASE, DISTILLED, LORA = f"{PREFIX}_base.safetensors", f"{PREFIX}_distilled.safetensors", f"{PREFIX}_style.safetensors"
BLOCKS = 2
PROJECTIONS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def write_tiny_models(base_dir, prefix: str = PREFIX) -> tuple[str, str, str]:
    """A Wan2.1-shaped base/distilled pair and a style LoRA (casa_core.synth, dim 128, 2 blocks, float32)."""
    from casa_core import synth
    from casa_core.formats.safetensors_io import write_file

    names = (f"{prefix}_base.safetensors", f"{prefix}_distilled.safetensors", f"{prefix}_style.safetensors")
    paths = (base_dir / "models" / "diffusion_models" / names[0], base_dir / "models" / "diffusion_models" / names[1],
             base_dir / "models" / "loras" / names[2])
    if all(p.exists() for p in paths):
        return names
    sd, svd = synth.wan_state_dict(synth.WanShape(dim=128, ffn_dim=256, blocks=BLOCKS), seed=0, dtype=torch.float32)
    write_file(str(paths[0]), sd)
    write_file(str(paths[1]), synth.distill(sd, svd, rel_drift=5e-3, dtype=torch.float32))
    write_file(str(paths[2]), synth.style_lora(svd, rank=8, alpha=4.0))
    return names


def graph(method: str = "CASA", heatmaps: dict | None = None, names=(BASE, DISTILLED, LORA)) -> dict:
    base, distilled, lora = names
    g = {
        "basis": {"class_type": "CASALoadSourceBasis", "inputs": {"base_model": base, "storage": "float32"}},
        "target": {"class_type": "UNETLoader", "inputs": {"unet_name": distilled, "weight_dtype": "default"}},
        "drift": {"class_type": "CASAComputeDrift", "inputs": {"basis": ["basis", 0], "model": ["target", 0]}},
        "transfer": {"class_type": "CASATransferLoRA", "inputs": {
            "model": ["target", 0], "drift": ["drift", 0], "lora_name": lora, "strength": 1.0, "method": method,
            "tau": 0.5, "q_dom": 0.5, "q_act": 0.85, "energy": 0.9, "injection": "low-rank", "rank": 16,
            "kept_energy": 0.0}},
    }
    for nid, inputs in (heatmaps or {}).items():
        g[nid] = {"class_type": "CASARoutingHeatmap", "inputs": {"report": ["transfer", 1], **inputs}}
    return g


@pytest.fixture(scope="module")
def models(comfy_server):
    return write_tiny_models(comfy_server.base_dir)


def preview(client, out) -> np.ndarray:
    from PIL import Image

    ref = out["images"][0]
    raw = client.view(ref["filename"], type=ref.get("type", "temp"), subfolder=ref.get("subfolder", ""))
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_extension_file_is_served(comfy_server):
    status, body = comfy_server.request("GET", "/extensions/casa-lora/casa_heatmap.js")
    assert status == 200, status
    text = body.decode("utf-8")
    assert "casa-lora.RoutingHeatmap" in text and "CASARoutingHeatmap" in text


def test_view_input_is_an_optional_combo(comfy_server):
    info = comfy_server.object_info("CASARoutingHeatmap")
    assert list(info["input"]["required"]) == ["report", "layer"]
    view = info["input"]["optional"]["view"]
    options = view[1].get("options") if view[0] == "COMBO" else view[0]
    assert options == ["layer", "overview"], view
    assert info["output"] == ["IMAGE"] and info["output_node"] is True


def test_layer_payload_describes_the_picture_cell_by_cell(comfy_server, models):
    entry = comfy_server.run(graph(heatmaps={"hm": {"layer": "auto"}, "hm_ffn": {"layer": "blocks.1.ffn.2"}}),
                             timeout=300)
    for nid in ("hm", "hm_ffn"):
        out = entry["outputs"][nid]
        payload = out["casa_heatmap"][0]
        json.dumps(payload, allow_nan=False)
        fig = payload["figure"]
        assert payload["view"] == "layer" and fig["kind"] == "layer"
        # the layer list feeds the picker: every layer of the transfer, by block and projection
        layers = payload["layers"]
        assert [(r["block"], r["projection"]) for r in layers] == [(b, p) for b in range(BLOCKS) for p in PROJECTIONS]
        assert all(r["routing"] and r["name"] == f"blocks.{r['block']}.{r['projection']}" for r in layers)
        px = preview(comfy_server, out)
        assert px.shape == (fig["height"], fig["width"], 3)
        rows, cols = fig["rows"], fig["cols"]
        for p in fig["panels"]:
            assert len(p["y"]) == len(rows) and len(p["x"]) == len(cols)
            assert p["x"][0][0] == p["x0"] and p["y"][-1][1] == p["y0"] + p["h"]
        for key in ("drift_rms", "lora_rms", "cos", "restored", "preserved", "arbitrated", "entries"):
            grid = fig["values"][key]
            assert len(grid) == len(rows) and all(len(r) == len(cols) for r in grid)
        # a cell of the region map is one flat colour from its values: blue when mostly restored, else grey
        # towards orange by its arbitrated share (full from the figure's "arbitrated_full")
        reg = next(p for p in fig["panels"] if p["id"] == "regions")
        col = {k: np.array(fig["region_colours"][k], float) for k in ("restored", "preserved", "arbitrated")}
        top = fig["arbitrated_full"]
        for r in range(len(rows)):
            for c in range(len(cols)):
                (x0, x1), (y0, y1) = reg["x"][c], reg["y"][r]
                cell = px[y0:y1, x0:x1].reshape(-1, 3).astype(float)
                assert np.ptp(cell, axis=0).max() <= 1, (r, c)
                if fig["values"]["restored"][r][c] >= 0.5:
                    want = col["restored"]
                else:
                    t = min(fig["values"]["arbitrated"][r][c] / top, 1.0) if top else 0.0
                    want = col["preserved"] + t * (col["arbitrated"] - col["preserved"])
                assert np.abs(cell[0] - want).max() <= 1.5, (r, c, cell[0], want)
    assert entry["outputs"]["hm_ffn"]["casa_heatmap"][0]["layer"] == "blocks.1.ffn.2"
    # ffn.2 is out 128 x in 256: the beyond-k group is on the sending side
    fig = entry["outputs"]["hm_ffn"]["casa_heatmap"][0]["figure"]
    assert fig["cols"][-1]["label"] == ">k" and fig["rows"][-1]["label"] != ">k" and fig["shape"] == [128, 256]
    auto = entry["outputs"]["hm"]["casa_heatmap"][0]
    assert auto["requested"] == "auto" and auto["layer"] in {r["name"] for r in auto["layers"]}


def test_overview_view_and_layer_name_forms(comfy_server, models):
    entry = comfy_server.run(graph(heatmaps={
        "ov": {"layer": "blocks.0.self_attn.k", "view": "overview"},
        "prefixed": {"layer": "diffusion_model.blocks.0.self_attn.k.weight"},
        "plain": {"layer": "blocks.0.self_attn.k"},
    }), timeout=300)
    ov = entry["outputs"]["ov"]["casa_heatmap"][0]
    fig = ov["figure"]
    assert ov["view"] == "overview" and fig["kind"] == "overview" and ov["layer"] == "blocks.0.self_attn.k"
    assert [c["label"] for c in fig["cols"]] == PROJECTIONS and [r["label"] for r in fig["rows"]] == ["0", "1"]
    assert fig["names"][0][1] == "blocks.0.self_attn.k"
    for key in ("dominant", "arbitrated", "kept"):
        vals = np.array(fig["values"][key], dtype=float)
        assert vals.shape == (BLOCKS, len(PROJECTIONS)) and np.all((vals >= 0) & (vals <= 1))
    assert preview(comfy_server, entry["outputs"]["ov"]).shape == (fig["height"], fig["width"], 3)
    # "diffusion_model.<layer>.weight" (a key as ComfyUI names it) shows the same layer
    a = preview(comfy_server, entry["outputs"]["prefixed"])
    b = preview(comfy_server, entry["outputs"]["plain"])
    assert np.array_equal(a, b)


def test_a_report_without_routing_data_still_has_an_overview(comfy_server, models):
    entry = comfy_server.run(graph("ProLoRA", heatmaps={"ov": {"layer": "auto", "view": "overview"}}), timeout=300)
    payload = entry["outputs"]["ov"]["casa_heatmap"][0]
    assert payload["method"] == "prolora" and payload["layer"] is None
    assert not any(r["routing"] for r in payload["layers"])
    vals = np.array(payload["figure"]["values"]["kept"], dtype=float)
    assert np.all(np.isfinite(vals))
    assert all(v is None for row in payload["figure"]["values"]["dominant"] for v in row)

    pid = comfy_server.post_prompt(graph("ProLoRA", heatmaps={"hm": {"layer": "auto"}}))
    entry = comfy_server.wait(pid, timeout=300)
    err = next((d for name, d in entry["status"]["messages"] if name == "execution_error"), None)
    assert err is not None and err["node_type"] == "CASARoutingHeatmap"
    assert "no routing data" in err["exception_message"] and "overview" in err["exception_message"]
