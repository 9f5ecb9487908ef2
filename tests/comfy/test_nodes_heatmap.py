"""CASARoutingHeatmap: an IMAGE [1, H, W, 3] in 0..1 and an image preview in /history; ``auto`` shows the layer
with the largest arbitrated share, which casa_core's own report of the same transfer names; a layer that is
not in the report is a clear node error."""
import io as _io
import uuid

import numpy as np

from _fixtures_models import casa_expected, tiny_set, truth_cache  # noqa: F401  (fixtures)
from graphs import add_heatmap, casa_transfer_graph

ALL_IMAGE = "CasaTestImageStats"


def preview_pixels(client, entry, node_id) -> np.ndarray:
    from PIL import Image

    images = entry["outputs"][node_id].get("images")
    assert images, f"{node_id}: no image preview in /history: {entry['outputs'][node_id]}"
    ref = images[0]
    raw = client.view(ref["filename"], type=ref.get("type", "temp"), subfolder=ref.get("subfolder", ""))
    return np.asarray(Image.open(_io.BytesIO(raw)).convert("RGB"))


def most_arbitrated(report) -> str:
    shares = {n: r.routing.arbitrated_entries / r.routing.entries for n, r in report.layers.items() if r.routing}
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    assert ranked[0][1] > ranked[1][1], f"tie for the most arbitrated layer: {ranked[:2]}"
    return ranked[0][0]


def test_heatmap_auto_shows_the_most_arbitrated_layer(comfy_server, tiny_set, truth_cache):
    ts = tiny_set
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache,
                        target_path=ts.unet_path(ts.distilled))
    best = most_arbitrated(exp.report)
    other = next(n for n in sorted(exp.report.layers) if n != best)

    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora)
    add_heatmap(g, "hm_auto", "auto")
    add_heatmap(g, "hm_best", best)
    add_heatmap(g, "hm_other", other)
    g["img_stats"] = {"class_type": ALL_IMAGE, "inputs": {"image": ["hm_auto", 0]}}
    entry = comfy_server.run(g, timeout=300)

    stats = entry["outputs"]["img_stats"]["casa_image_stats"][0]
    assert stats["finite"] and stats["dtype"] == "float32"
    assert len(stats["shape"]) == 4 and stats["shape"][0] == 1 and stats["shape"][3] == 3, stats
    assert 0.0 <= stats["min"] and stats["max"] <= 1.0 and stats["max"] > stats["min"], stats

    auto, named, different = (preview_pixels(comfy_server, entry, n) for n in ("hm_auto", "hm_best", "hm_other"))
    assert list(auto.shape) == [stats["shape"][1], stats["shape"][2], 3]  # the preview is the IMAGE output
    assert abs(auto.mean() / 255.0 - stats["mean"]) < 1.0 / 255.0
    assert auto.shape == named.shape and np.array_equal(auto, named), \
        f"'auto' does not show {best}, the layer with the largest arbitrated share"
    assert auto.shape != different.shape or not np.array_equal(auto, different), "every layer gives the same picture"


def test_heatmap_unknown_layer_is_a_clear_error(comfy_server, tiny_set):
    ts = tiny_set
    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora)
    bad = f"blocks.9.self_attn.nope_{uuid.uuid4().hex[:4]}"
    add_heatmap(g, "hm", bad)
    pid = comfy_server.post_prompt(g)
    entry = comfy_server.wait(pid, timeout=300)
    err = next((d for name, d in entry["status"]["messages"] if name == "execution_error"), None)
    assert err is not None and err["node_type"] == "CASARoutingHeatmap", entry["status"]
    assert bad in err["exception_message"], err["exception_message"]
    print(f"CASARoutingHeatmap: {err['exception_type']}: {err['exception_message']}")

