"""(f) Bad inputs end the prompt with a clear node error in /history (the message names the file and, where
there is one, the layer), and the server serves the next prompt. (g) POST /interrupt during the source
basis computation leaves no complete cache folder that a later run could reuse; the next run completes
and its result equals casa_core's."""
import re
import time
import uuid

import pytest

from _fixtures_models import (casa_expected, copy_model, lora_file_deltas, load_safetensors_bytes, rel_err,
                              tiny_set, tiny_set_in, truth_cache)  # noqa: F401  (fixtures)
from graphs import add_save, casa_transfer_graph, ksampler_graph, latent_stats, ui_text

TOL = 2e-4


def serves_next_prompt(client, ts, seed=0):
    """A normal transfer + KSampler prompt still succeeds."""
    from graphs import add_ksampler

    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora)
    stats = add_ksampler(g, ["transfer", 0], seed=seed)
    assert latent_stats(client.run(g, timeout=300), stats)["finite"]


def expect_node_error(client, prompt_id, node_type, timeout=300):
    entry = client.wait(prompt_id, timeout=timeout)
    status = entry["status"]
    assert status["status_str"] == "error", status
    err = next((d for name, d in status["messages"] if name == "execution_error"), None)
    assert err is not None, status["messages"]
    assert err["node_type"] == node_type, err
    print(f"{node_type}: {err['exception_type']}: {err['exception_message']}")
    return err


def occupy_queue(client, seconds=3.0) -> str:
    """Queue a prompt that sleeps, so the next prompt is validated now and executed later."""
    g = ksampler_graph("unused")
    g = {"latent": g["latent"],
         "sleep": {"class_type": "CasaTestSleep", "inputs": {"samples": ["latent", 0], "seconds": seconds}},
         "stats": {"class_type": "CasaTestLatentStats", "inputs": {"samples": ["sleep", 0]}}}
    g["latent"]["inputs"]["width"] = 32 + 16 * (uuid.uuid4().int % 50)  # never served from the cache
    return client.post_prompt(g)


def test_lora_for_another_model_size(comfy_server, tiny_set):
    ts = tiny_set
    g = casa_transfer_graph(ts.base, ts.distilled, ts.other_size, injection="exact")
    add_save(g, "save", "casa_tests/never")
    pid = comfy_server.post_prompt(g)
    err = expect_node_error(comfy_server, pid, "CASATransferLoRA")
    msg = err["exception_message"]
    assert ts.other_size in msg, msg
    assert re.search(r"blocks\.\d+\.[a-z_]+\.[a-z0-9_]+", msg), f"no layer named in {msg!r}"
    assert err["exception_type"].split(".")[-1] not in ("KeyError", "AttributeError", "TypeError", "IndexError")
    # the type the page shows carries no folder of this machine (ComfyUI names a pack's module by its path)
    assert err["exception_type"] == "casa_lora.CasaError", err["exception_type"]
    serves_next_prompt(comfy_server, ts, seed=21)


def test_lora_deleted_after_validation(comfy_server, tiny_set):
    ts = tiny_set
    name = f"casa_t_vanishing_{uuid.uuid4().hex[:6]}.safetensors"
    path = copy_model(ts, ts.style_lora, name, folder="loras")
    busy = occupy_queue(comfy_server)
    g = casa_transfer_graph(ts.base, ts.distilled, name)
    add_save(g, "save", "casa_tests/never")
    pid = comfy_server.post_prompt(g)  # validated: the file is in the list
    path.unlink()
    comfy_server.wait(busy, timeout=60)
    err = expect_node_error(comfy_server, pid, "CASATransferLoRA")
    assert name in err["exception_message"], err["exception_message"]
    serves_next_prompt(comfy_server, ts, seed=22)


def test_base_model_removed_from_disk(comfy_server, tiny_set):
    ts = tiny_set
    # a base with its own content, so no cache of it can exist anywhere
    other = tiny_set_in(comfy_server.base_dir, f"casa_gone_{uuid.uuid4().hex[:6]}", seed=5, fp8=False,
                        distill_lora=False, style_formats=(), other_size=False)
    busy = occupy_queue(comfy_server)
    g = casa_transfer_graph(other.base, other.distilled, ts.style_lora)
    add_save(g, "save", "casa_tests/never")
    pid = comfy_server.post_prompt(g)
    other.unet_path(other.base).unlink()
    comfy_server.wait(busy, timeout=60)
    err = expect_node_error(comfy_server, pid, "CASALoadSourceBasis")
    assert other.base in err["exception_message"], err["exception_message"]
    serves_next_prompt(comfy_server, ts, seed=23)


# ---------------------------------------------------------------------------------------------------
# (g) interrupt during the basis computation
# ---------------------------------------------------------------------------------------------------

def cache_folders(client):
    root = client.base_dir / "models" / "casa_cache"
    if not root.is_dir():
        return set(), set()
    complete = {p.name for p in root.iterdir() if p.is_dir() and (p / "manifest.json").is_file()
                and not p.name.endswith(".partial")}
    partial = {p.name for p in root.iterdir() if p.is_dir() and p.name.endswith(".partial")}
    return complete, partial


@pytest.fixture(scope="module")
def big_set(comfy_server):
    # dim 512 / ffn 2048 / 4 blocks: the basis takes several seconds on a CPU; the LoRA touches two layers
    # only, so that the rerun's transfer stays short
    return tiny_set_in(comfy_server.base_dir, "casa_big", seed=11, dim=512, ffn_dim=2048, blocks=4, fp8=False,
                       distill_lora=False, style_formats=("kohya",), other_size=False,
                       style_layers=("blocks.0.self_attn.q", "blocks.3.ffn.2"))


def test_interrupt_during_basis_leaves_no_reusable_cache(comfy_server, big_set, truth_cache):
    ts = big_set
    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora, injection="exact")
    add_save(g, "save", f"casa_tests/big_{uuid.uuid4().hex[:6]}", dtype="float32")
    complete_before, partial_before = cache_folders(comfy_server)

    t_start = time.monotonic()
    pid = comfy_server.post_prompt(g)
    deadline = time.monotonic() + 120
    started = None
    while started is None:
        complete, partial = cache_folders(comfy_server)
        new_partial = {p for p in partial - partial_before if p.startswith("basis-")}
        if new_partial:
            started = new_partial
            break
        assert not {p for p in complete - complete_before if p.startswith("basis-")}, \
            "the basis was complete before it could be interrupted (model too small?)"
        assert time.monotonic() < deadline, "no basis-*.partial folder appeared under models/casa_cache"
        time.sleep(0.02)
    time.sleep(0.1)  # let it write a layer or two (the basis can take as little as ~1 s on an idle CPU)
    t_int = time.monotonic()
    comfy_server.interrupt()
    entry = comfy_server.wait(pid, timeout=120)
    t_stopped = time.monotonic()
    messages = entry["status"]["messages"]
    assert entry["status"]["status_str"] == "error", messages
    interrupted = next((d for name, d in messages if name == "execution_interrupted"), None)
    assert interrupted is not None, f"not interrupted: {messages}"
    assert interrupted.get("node_type") == "CASALoadSourceBasis", interrupted

    complete_after, _ = cache_folders(comfy_server)
    new_complete = {p for p in complete_after - complete_before if p.startswith("basis-")}
    assert not new_complete, f"an interrupted basis looks complete: {new_complete}"

    # the next run completes, computes (no reuse of a broken cache) and gives casa_core's result
    t0 = time.monotonic()
    entry = comfy_server.run(g, timeout=600)
    seconds = time.monotonic() - t0
    text = ui_text(entry, "basis")
    assert "computed" in text and "reused" not in text, text
    complete_final, _ = cache_folders(comfy_server)
    assert {p for p in complete_final - complete_before if p.startswith("basis-")}, "no complete basis folder"
    t_truth = time.monotonic()
    m = re.search(r"[\w./-]+\.safetensors", ui_text(entry, "save"))
    tensors, _ = load_safetensors_bytes((comfy_server.base_dir / "models" / "loras" / m.group(0)).read_bytes())
    got = lora_file_deltas(tensors)
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                        target_path=ts.unet_path(ts.distilled))
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < TOL, f"{layer}: resumed basis gives another transfer"
    print(f"basis started after {t_int - t_start:.1f} s, stopped {t_stopped - t_int:.1f} s after /interrupt; "
          f"rerun {seconds:.1f} s ({text}); casa_core ground truth {time.monotonic() - t_truth:.1f} s")


def test_interrupt_during_drift_leaves_no_reusable_cache(comfy_server, big_set, truth_cache):
    """Same for the drift: a target of its own (the big distilled model, moved a little more) whose drift is
    interrupted while being computed; the basis comes from the cache."""
    import torch

    from _fixtures_models import _save

    ts = big_set
    name = f"casa_big_distilled_{uuid.uuid4().hex[:6]}.safetensors"
    g_ = torch.Generator().manual_seed(5)
    target = {k: (v + 0.002 * v.abs().mean() * torch.randn(v.shape, generator=g_)
                  if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2 else v)
              for k, v in ts.distilled_sd.items()}
    _save(target, ts.unet_path(name))
    g = casa_transfer_graph(ts.base, name, ts.style_lora, injection="exact")
    add_save(g, "save", f"casa_tests/bigdrift_{uuid.uuid4().hex[:6]}", dtype="float32")
    complete_before, partial_before = cache_folders(comfy_server)

    pid = comfy_server.post_prompt(g)
    deadline = time.monotonic() + 300
    while True:
        complete, partial = cache_folders(comfy_server)
        if {p for p in partial - partial_before if p.startswith("drift-")}:
            break
        assert not {p for p in complete - complete_before if p.startswith("drift-")}, \
            "the drift was complete before it could be interrupted"
        assert time.monotonic() < deadline, "no drift-*.partial folder appeared under models/casa_cache"
        time.sleep(0.02)
    comfy_server.interrupt()
    entry = comfy_server.wait(pid, timeout=120)
    messages = entry["status"]["messages"]
    interrupted = next((d for n, d in messages if n == "execution_interrupted"), None)
    assert interrupted is not None and interrupted.get("node_type") == "CASAComputeDrift", messages
    complete_after, _ = cache_folders(comfy_server)
    assert not {p for p in complete_after - complete_before if p.startswith("drift-")}, \
        "an interrupted drift looks complete"

    entry = comfy_server.run(g, timeout=600)
    text = ui_text(entry, "drift")
    assert "computed" in text and "reused" not in text, text
    m = re.search(r"[\w./-]+\.safetensors", ui_text(entry, "save"))
    tensors, _ = load_safetensors_bytes((comfy_server.base_dir / "models" / "loras" / m.group(0)).read_bytes())
    got = lora_file_deltas(tensors)
    exp = casa_expected(ts.unet_path(ts.base), ts.lora_path(ts.style_lora), truth_cache, injection="exact",
                        target_path=ts.unet_path(name))
    for layer, d in exp.deltas.items():
        assert rel_err(got[layer], d) < TOL, f"{layer}: resumed drift gives another transfer"


def test_file_lists_offer_safetensors_only_and_save_names_are_checked(comfy_server, tiny_set):
    """A pickle LoRA (.pt) beside the safetensors ones is not offered (casa-lora never unpickles); a save name
    that is too long for a file system, or holds characters Windows cannot name a file with, ends the prompt
    with one sentence naming filename_prefix (not a raw OSError); a prefix ending in "/" saves inside that
    folder under the default name; a heatmap layer of blanks means auto."""
    from graphs import add_heatmap
    from test_nodes_registration import spec_type_and_options

    ts = tiny_set
    pt = f"casa_t_pickle_{uuid.uuid4().hex[:6]}.pt"
    ts.lora_path(pt).write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    try:
        info = comfy_server.object_info()["CASATransferLoRA"]["input"]["required"]["lora_name"]
    finally:
        ts.lora_path(pt).unlink()
    _, options, _ = spec_type_and_options(info)
    assert ts.style_lora in options and pt not in options and all(o.endswith((".safetensors", ".sft")) for o in options)
    for prefix, said in (("a" * 300, "filename_prefix is too long"), ("casa_tests/x:y", "Windows cannot")):
        g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora)
        add_save(g, "save", prefix)
        err = expect_node_error(comfy_server, comfy_server.post_prompt(g), "CASASaveLoRA")
        assert said in err["exception_message"] and "OSError" not in err["exception_type"], err
    folder = f"casa_tests/folder_{uuid.uuid4().hex[:6]}/"
    g = casa_transfer_graph(ts.base, ts.distilled, ts.style_lora)
    add_save(g, "save", folder)
    add_heatmap(g, "heat", layer="   ")
    entry = comfy_server.run(g, timeout=300)
    assert (comfy_server.base_dir / "models" / "loras" / folder / "transferred_00001.safetensors").is_file()
    assert entry["outputs"]["heat"], entry["outputs"]
