"""(h) The second run of the same workflow reuses the basis and the drift from models/casa_cache: after
POST /free {"free_memory": true, "unload_models": true} (which drops ComfyUI's own output cache, so every
node really runs again), the ui text of CASALoadSourceBasis and CASAComputeDrift says "reused", the result
is the same, and it is faster. Timings of both runs are reported in the terminal summary (with or without
``-s``) and as junit properties."""
import re
import time
import uuid

import pytest

from _fixtures_models import (_save, casa_expected, lora_file_deltas, load_safetensors_bytes, rel_err, tiny_set_in,
                              truth_cache)  # noqa: F401  (fixture)
from graphs import add_save, casa_transfer_graph, ui_text

_SUMMARY_LINES: list[str] = []


class _TimingReporter:
    """Registered at run time: prints the collected lines in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter):
        if _SUMMARY_LINES:
            terminalreporter.write_sep("-", "casa-lora: basis/drift cache timings")
            for line in _SUMMARY_LINES:
                terminalreporter.write_line(line)


def report(request, line: str) -> None:
    print(line)
    pm = request.config.pluginmanager
    if not pm.has_plugin("casa-cache-timings"):
        pm.register(_TimingReporter(), "casa-cache-timings")
    _SUMMARY_LINES.append(line)


def node_seconds(text: str) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)\s*s\b", text)
    return float(m.group(1)) if m else None


def prompt_seconds(entry: dict) -> float:
    """Execution time from the status messages' timestamps (ms), as ComfyUI recorded it."""
    stamps = {name: d.get("timestamp") for name, d in entry["status"]["messages"] if isinstance(d, dict)}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


@pytest.fixture(scope="module")
def reuse_set(comfy_server):
    # content of its own (seed 7), so no earlier test can have cached it; dim 256 for measurable timings
    return tiny_set_in(comfy_server.base_dir, "casa_reuse", seed=7, dim=256, ffn_dim=1024, blocks=2, fp8=False,
                       distill_lora=False, style_formats=("kohya",), other_size=False)


def test_second_run_reuses_basis_and_drift(comfy_server, reuse_set, request, record_property):
    ts = reuse_set
    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora, injection="exact")
    add_save(g, "save", f"casa_tests/reuse_{uuid.uuid4().hex[:6]}", dtype="float32")

    runs = []
    for i in range(2):
        if i:
            comfy_server.reset_cache()
        t0 = time.monotonic()
        entry = comfy_server.run(g, timeout=600)
        wall = time.monotonic() - t0
        runs.append((entry, wall))
    (first, wall1), (second, wall2) = runs

    b1, d1 = ui_text(first, "basis"), ui_text(first, "drift")
    b2, d2 = ui_text(second, "basis"), ui_text(second, "drift")
    assert "computed" in b1 and "reused" not in b1, b1
    assert "computed" in d1 and "reused" not in d1, d1
    assert "reused" in b2, f"basis not reused after /free: {b2!r}"
    assert "reused" in d2, f"drift not reused after /free: {d2!r}"
    # every node ran again (ComfyUI's own cache was dropped): the second run reports its own texts
    assert ui_text(second, "save") and ui_text(second, "save") != ui_text(first, "save")

    def saved(entry):
        m = re.search(r"[\w./-]+\.safetensors", ui_text(entry, "save"))
        tensors, _ = load_safetensors_bytes((comfy_server.base_dir / "models" / "loras" / m.group(0)).read_bytes())
        return lora_file_deltas(tensors)

    s1, s2 = saved(first), saved(second)
    assert sorted(s1) == sorted(s2) and s1
    for layer in s1:
        assert rel_err(s2[layer], s1[layer]) < 1e-6, layer

    root = comfy_server.base_dir / "models" / "casa_cache"
    assert any(p.name.startswith("basis-") and (p / "manifest.json").is_file() for p in root.iterdir())
    assert any(p.name.startswith("drift-") and (p / "manifest.json").is_file() for p in root.iterdir())
    assert "casa_cache" in comfy_server.get("/models"), "casa_cache is not a registered model folder"

    nb1, nd1, nb2, nd2 = (node_seconds(t) for t in (b1, d1, b2, d2))
    lines = [
        f"ComfyUI {comfy_server.version}, Wan dim {ts.shape[0]} / ffn {ts.shape[1]} / {ts.shape[2]} blocks:",
        f"  run 1 (computed): prompt {prompt_seconds(first):.2f} s (wall {wall1:.2f} s); basis {nb1} s, drift {nd1} s",
        f"  run 2 (reused):   prompt {prompt_seconds(second):.2f} s (wall {wall2:.2f} s); basis {nb2} s, drift {nd2} s",
        f"  basis ui: {b1!r} -> {b2!r}",
        f"  drift ui: {d1!r} -> {d2!r}",
    ]
    for line in lines:
        report(request, line)
    record_property("run1_prompt_seconds", prompt_seconds(first))
    record_property("run2_prompt_seconds", prompt_seconds(second))
    record_property("basis_texts", f"{b1} | {b2}")
    record_property("drift_texts", f"{d1} | {d2}")
    if None not in (nb1, nd1, nb2, nd2):  # the cache is what made the difference
        assert nb2 < nb1 and nd2 < nd1, (b1, b2, d1, d2)


def _saved(client, entry):
    m = re.search(r"[\w./-]+\.safetensors", ui_text(entry, "save"))
    tensors, _ = load_safetensors_bytes((client.base_dir / "models" / "loras" / m.group(0)).read_bytes())
    return lora_file_deltas(tensors)


def test_files_changed_under_the_same_name_are_not_served_from_the_cache(comfy_server, truth_cache):
    """The disk caches are keyed by content: a distilled (then a base) model rewritten under the same file
    name gets a new drift (a new basis), and the transfer follows the new files."""
    import torch

    ts = tiny_set_in(comfy_server.base_dir, "casa_inval", seed=21, fp8=False, distill_lora=False,
                     style_formats=("kohya",), other_size=False)
    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora, injection="exact")
    add_save(g, "save", f"casa_tests/inval_{uuid.uuid4().hex[:6]}", dtype="float32")

    def run_fresh():
        comfy_server.reset_cache()  # ComfyUI's own cache would otherwise keep the old UNETLoader output
        entry = comfy_server.run(g, timeout=600)
        return entry, ui_text(entry, "basis"), ui_text(entry, "drift")

    first, b1, d1 = run_fresh()
    assert "reused" not in b1 and "reused" not in d1, (b1, d1)

    g_ = torch.Generator().manual_seed(99)
    new_distilled = {k: (v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g_)
                         if k.startswith("blocks.1.") and k.endswith(".weight") and v.ndim == 2 else v)
                     for k, v in ts.distilled_sd.items()}
    _save(new_distilled, ts.unet_path(ts.distilled))
    second, b2, d2 = run_fresh()
    assert "reused" in b2, b2
    assert "reused" not in d2 and "computed" in d2, f"drift of a rewritten target served from the cache: {d2!r}"
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                        target_path=ts.unet_path(ts.distilled))
    got = _saved(comfy_server, second)
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < 2e-4, f"{layer}: transfer does not follow the rewritten target"

    new_base = {k: (v * 1.01 if k.startswith("blocks.0.") and k.endswith(".weight") and v.ndim == 2 else v)
                for k, v in ts.base_sd.items()}
    _save(new_base, ts.unet_path(ts.base))
    third, b3, d3 = run_fresh()
    assert "reused" not in b3 and "computed" in b3, f"basis of a rewritten base served from the cache: {b3!r}"
    assert "reused" not in d3, d3
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                        target_path=ts.unet_path(ts.distilled))
    got = _saved(comfy_server, third)
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < 2e-4, f"{layer}: transfer does not follow the rewritten base"
