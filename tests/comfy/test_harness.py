"""The harness itself: a real ComfyUI server on the CPU runs a tiny Wan model; in-process import works."""
import time

import pytest

from comfy_client import ComfyExecutionError, ComfyPromptError
from graphs import ksampler_graph, latent_stats

LATENT_SHAPE = [1, 16, 2, 4, 4]  # EmptyHunyuanLatentVideo 32x32, length 5


def test_server_lists_core_and_test_nodes(comfy_server, tiny_wan):
    info = comfy_server.object_info()
    for node in ("UNETLoader", "KSampler", "EmptyHunyuanLatentVideo", "CasaTestZeroConditioning",
                 "CasaTestLatentStats", "CasaTestSleep"):
        assert node in info, f"{node} missing from /object_info"
    assert tiny_wan in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert info["CasaTestZeroConditioning"]["output"] == ["CONDITIONING"]
    assert comfy_server.object_info("CasaTestLatentStats")["output_node"] is True
    assert not any(p.endswith("casa_test_nodes") for p in comfy_server.custom_node_import_failures())


def test_ksampler_on_tiny_wan_succeeds(comfy_server, tiny_wan):
    entry = comfy_server.run(ksampler_graph(tiny_wan, steps=2, seed=0))
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"] is True
    assert "execution_success" in [name for name, _ in status["messages"]]
    stats = latent_stats(entry)
    assert stats["shape"] == LATENT_SHAPE and stats["finite"] and stats["std"] > 0
    # the same graph again is served from the cache; another seed gives another latent
    again = latent_stats(comfy_server.run(ksampler_graph(tiny_wan, steps=2, seed=0)))
    other = latent_stats(comfy_server.run(ksampler_graph(tiny_wan, steps=2, seed=1)))
    assert again == stats and other["mean"] != stats["mean"]


def test_invalid_prompt_gives_node_error_and_server_goes_on(comfy_server, tiny_wan):
    with pytest.raises(ComfyPromptError) as e:
        comfy_server.post_prompt(ksampler_graph("no_such_model.safetensors"))
    assert e.value.status == 400 and "unet" in e.value.node_errors
    graph = ksampler_graph(tiny_wan)
    graph["sampler"]["inputs"]["steps"] = "many"
    with pytest.raises(ComfyPromptError) as e:
        comfy_server.post_prompt(graph)
    assert "sampler" in e.value.node_errors
    entry = comfy_server.run(ksampler_graph(tiny_wan, seed=2))
    assert latent_stats(entry)["shape"] == LATENT_SHAPE


def test_execution_error_is_raised_with_the_node_error(comfy_server, tiny_wan):
    bad = comfy_server.base_dir / "models" / "diffusion_models" / "casa_broken.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ComfyExecutionError) as e:
        comfy_server.run(ksampler_graph("casa_broken.safetensors"))
    assert e.value.error is not None and e.value.error["node_type"] == "UNETLoader"
    assert e.value.entry["status"]["status_str"] == "error"
    assert latent_stats(comfy_server.run(ksampler_graph(tiny_wan, seed=3)))["finite"]


def test_interrupt_stops_a_running_prompt(comfy_server, tiny_wan):
    graph = ksampler_graph(tiny_wan, seed=4)
    graph["sleep"] = {"class_type": "CasaTestSleep", "inputs": {"samples": ["sampler", 0], "seconds": 60.0}}
    graph["stats"]["inputs"]["samples"] = ["sleep", 0]
    t0 = time.monotonic()
    prompt_id = comfy_server.post_prompt(graph)
    deadline = time.monotonic() + 30
    while not comfy_server.queue()["queue_running"]:
        assert time.monotonic() < deadline, "prompt never started running"
        time.sleep(0.05)
    time.sleep(0.5)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=30)
    assert time.monotonic() - t0 < 30
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [name for name, _ in entry["status"]["messages"]]
    assert latent_stats(comfy_server.run(ksampler_graph(tiny_wan, seed=5)))["finite"]


def test_inprocess_samples_like_the_server(comfy_inprocess, comfy_server, tiny_wan):
    import torch

    comfy = comfy_inprocess
    model = comfy.load_unet(tiny_wan)
    assert type(model.model).__name__ == "WAN21"
    assert type(model).__name__ == "ModelPatcher"  # --cpu: never ModelPatcherDynamic
    assert model.load_device == torch.device("cpu")
    out = comfy.sample(model, steps=2, seed=0)
    assert list(out.shape) == LATENT_SHAPE and torch.isfinite(out).all()
    server = latent_stats(comfy_server.run(ksampler_graph(tiny_wan, steps=2, seed=0)))
    assert out.mean().item() == pytest.approx(server["mean"], rel=1e-4, abs=1e-6)
    assert out.std().item() == pytest.approx(server["std"], rel=1e-4)


def test_inprocess_loads_the_test_node_pack(comfy_inprocess):
    from conftest import TEST_NODES_DIR

    assert comfy_inprocess.load_custom_node(TEST_NODES_DIR)
    zero = comfy_inprocess.node_class("CasaTestZeroConditioning")
    cond = zero.execute(tokens=8, batch=1).result[0]
    assert cond[0][0].shape == (1, 8, 4096) and cond[0][1] == {}
    assert comfy_inprocess.node_class("EmptyHunyuanLatentVideo") is not None
