"""Layers side by side (casa_core.parallel): the same results in the same order, threads restored, errors
stop the rest; a transfer gives the same bytes one layer at a time and two at a time."""
from __future__ import annotations

import hashlib
import math
import threading
import time

import pytest
import torch

from casa_core import linalg, parallel, synth
from casa_core.basis import load_or_build_basis
from casa_core.drift import WeightDifference, load_or_build_drift
from casa_core.factorize import OutputSpec
from casa_core.formats.checkpoint import Checkpoint
from casa_core.formats.lora import read_lora
from casa_core.formats.safetensors_io import write_file
from casa_core.transfer import TransferConfig, run_transfer_to_file

BIG = linalg.SMALL_LAYER_ENTRIES


@pytest.fixture(autouse=True)
def _threads_back():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_results_in_order_small_ones_side_by_side_large_ones_alone():
    torch.set_num_threads(2)
    seen = {}
    running, peak = [0], [0]
    lock = threading.Lock()

    def fn(item):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        seen[item] = (torch.get_num_threads(), threading.current_thread().name)
        time.sleep(0.05 if item % 2 else 0.01)  # the odd ones finish after the next one
        with lock:
            running[0] -= 1
        return item * item

    items = list(range(8))
    sizes = {i: (BIG if i == 5 else 10) for i in items}
    out = list(parallel.map_layers(fn, items, sizes.__getitem__, "cpu", workers=2))
    assert out == [i * i for i in items]
    assert peak[0] == 2  # two at a time, never more
    assert all(seen[i][0] == 1 and seen[i][1].startswith("casa-layer") for i in items if i != 5)
    assert seen[5] == (2, threading.main_thread().name)  # the large layer: alone, torch's own pool
    assert torch.get_num_threads() == 2


def test_large_layers_go_side_by_side_only_when_asked():
    torch.set_num_threads(2)
    seen = {}

    def fn(item):
        seen[item] = (torch.get_num_threads(), threading.current_thread().name)
        return item

    assert list(parallel.map_layers(fn, range(4), lambda i: BIG, "cpu", workers=2, alone_from=math.inf)) == [0, 1, 2, 3]
    assert all(n == 1 and t.startswith("casa-layer") for n, t in seen.values())
    seen.clear()
    assert list(parallel.map_layers(fn, range(4), lambda i: BIG, "cpu", workers=2)) == [0, 1, 2, 3]
    assert all(v == (2, threading.main_thread().name) for v in seen.values())
    assert torch.get_num_threads() == 2


def test_large_layers_side_by_side_on_two_cores_only(monkeypatch):
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    assert parallel.large_side_by_side("cpu") and not parallel.large_side_by_side("meta")
    monkeypatch.setenv(parallel.WORKERS_ENV, "1")
    assert not parallel.large_side_by_side("cpu")
    monkeypatch.setenv(parallel.WORKERS_ENV, "2")
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 4)  # two workers on four cores: torch's pool for them
    assert not parallel.large_side_by_side("cpu")
    monkeypatch.delenv(parallel.WORKERS_ENV)
    assert not parallel.large_side_by_side("cpu")


def test_an_error_stops_the_rest_and_restores_the_threads():
    torch.set_num_threads(2)
    started = []

    def fn(item):
        started.append(item)
        if item == 2:
            raise ValueError("layer 2 is broken")
        time.sleep(0.01)
        return item

    gen = parallel.map_layers(fn, range(50), lambda i: 1, "cpu", workers=2)
    got = []
    with pytest.raises(ValueError, match="layer 2"):
        for r in gen:
            got.append(r)
    assert got == [0, 1] and max(started) <= 4  # nothing far beyond the failed layer was started
    assert torch.get_num_threads() == 2
    # a consumer that stops early (an interruption): the rest is not computed, threads restored
    started.clear()
    gen = parallel.map_layers(lambda i: started.append(i) or i, range(50), lambda i: 1, "cpu", workers=2)
    assert next(gen) == 0
    gen.close()
    assert max(started) <= 3 and torch.get_num_threads() == 2


def test_workers_follow_the_device_the_machine_and_the_environment(monkeypatch):
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    assert parallel.layer_workers("meta") == 1  # not a CPU
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    assert parallel.layer_workers("cpu") == 2
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 64)
    assert parallel.layer_workers("cpu") == 1  # torch's own pool within a layer
    monkeypatch.setenv(parallel.WORKERS_ENV, "3")
    assert parallel.layer_workers("cpu") == 3
    monkeypatch.setenv(parallel.WORKERS_ENV, "many")
    with pytest.raises(ValueError, match=parallel.WORKERS_ENV):
        parallel.layer_workers("cpu")


def _analysed(folder, seed):
    """A small Wan-shaped base, distilled model and LoRA written to ``folder``: its basis, drift and LoRA."""
    shape = synth.WanShape(dim=96, ffn_dim=192, blocks=2)
    base, svd = synth.wan_state_dict(shape, seed=seed, dtype=torch.float32)
    write_file(str(folder / "base.safetensors"), base)
    write_file(str(folder / "distilled.safetensors"), synth.distill(base, svd, rel_drift=5e-3, dtype=torch.float32))
    write_file(str(folder / "lora.safetensors"), synth.style_lora(svd, rank=8, alpha=4.0))
    src, tgt = Checkpoint(folder / "base.safetensors"), Checkpoint(folder / "distilled.safetensors")
    basis = load_or_build_basis(src, folder / "cache")
    drift = load_or_build_drift(basis, WeightDifference(src, tgt), folder / "cache")
    return basis, drift, read_lora(folder / "lora.safetensors", basis.layers)


@pytest.mark.parametrize("mode", ["lowrank", "exact"])
def test_a_transfer_gives_the_same_bytes_and_report_with_one_or_two_workers(tmp_path, monkeypatch, mode):
    basis, drift, lora = _analysed(tmp_path, seed=1)
    cfg = TransferConfig(output=OutputSpec(mode=mode, rank=16 if mode == "lowrank" else None))
    digests, reports, order = [], [], []
    for workers in ("1", "2"):
        monkeypatch.setenv(parallel.WORKERS_ENV, workers)
        seen: list[str] = []
        out = tmp_path / f"t{workers}.safetensors"
        rep = run_transfer_to_file(lora, basis, drift, cfg, 1.0, out,
                                   progress=lambda i, n, name, seen=seen: seen.append(name))
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
        reports.append({k: v.to_json() for k, v in rep.layers.items()})
        order.append(seen)
    assert digests[0] == digests[1]
    assert reports[0] == reports[1] and order[0] == order[1] and len(order[0]) == len(lora.updates)


@pytest.mark.parametrize("mode", ["lowrank", "exact"])
def test_a_transfer_of_large_layers_on_two_cores_pairs_them_for_lowrank_with_the_same_bytes(tmp_path, monkeypatch,
                                                                                            mode):
    """Every layer made "large": on two cores a low-rank transfer runs them two at a time (worker threads), an
    exact one alone on the caller's thread; the bytes are those of one layer at a time either way."""
    import casa_core.transfer as transfer_mod

    basis, drift, lora = _analysed(tmp_path, seed=2)
    cfg = TransferConfig(output=OutputSpec(mode=mode, rank=16 if mode == "lowrank" else None))
    monkeypatch.setattr(linalg, "SMALL_LAYER_ENTRIES", 1)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    real = transfer_mod._transfer_layer
    threads: list[str] = []

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer_mod, "_transfer_layer", spy)
    digests = []
    for side_by_side in (True, False):
        monkeypatch.setattr(transfer_mod, "large_side_by_side", lambda dev, v=side_by_side: v)
        threads.clear()
        out = tmp_path / f"t{side_by_side}.safetensors"
        run_transfer_to_file(lora, basis, drift, cfg, 1.0, out)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
        paired = side_by_side and mode == "lowrank"
        assert len(threads) == len(lora.updates)
        assert all(t.startswith("casa-layer") == paired for t in threads), (mode, side_by_side, threads)
    assert digests[0] == digests[1]


def test_an_interrupted_transfer_restores_the_threads_at_once_and_writes_nothing(tmp_path, monkeypatch):
    """An interruption raised by the progress callback (ComfyUI's), two layers at a time: the layers running
    are waited for and torch's thread count is back before the exception reaches the caller (whose
    traceback still holds the generators), and no output file is left."""
    basis, drift, lora = _analysed(tmp_path, seed=2)
    monkeypatch.setenv(parallel.WORKERS_ENV, "2")
    torch.set_num_threads(2)

    class Stop(Exception):
        pass

    def progress(i, n, name):
        assert torch.get_num_threads() == 1  # inside: the workers' setting
        if i == 3:
            raise Stop(name)

    out = tmp_path / "t.safetensors"
    with pytest.raises(Stop) as exc:
        run_transfer_to_file(lora, basis, drift, TransferConfig(), 1.0, out, progress=progress)
    assert exc.traceback is not None and torch.get_num_threads() == 2
    assert not out.exists() and not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".casa-spill-*"))


def test_basis_and_drift_caches_are_the_same_bytes_with_one_or_two_workers(tmp_path, monkeypatch):
    """Files as models: the basis and the drift are built two layers at a time; every shard and manifest is
    the same as one layer at a time (an fp8 target included, whose drift goes through the separation)."""
    shape = synth.WanShape(dim=96, ffn_dim=192, blocks=1)
    base, svd = synth.wan_state_dict(shape, seed=3, dtype=torch.float32)
    write_file(str(tmp_path / "base.safetensors"), base)
    distilled = synth.distill(base, svd, rel_drift=1.5e-2, dtype=torch.float32)
    write_file(str(tmp_path / "fp8.safetensors"), {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v
                                                    for k, v in distilled.items()})
    src, tgt = Checkpoint(tmp_path / "base.safetensors"), Checkpoint(tmp_path / "fp8.safetensors")
    assert parallel.concurrent(src, tgt, WeightDifference(src, tgt))
    contents = []
    for workers in ("1", "2"):
        monkeypatch.setenv(parallel.WORKERS_ENV, workers)
        cache = tmp_path / f"cache{workers}"
        basis = load_or_build_basis(src, cache)
        drift = load_or_build_drift(basis, WeightDifference(src, tgt), cache)
        assert drift.noisy()  # the fp8 rounding was separated
        contents.append({p.relative_to(cache).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(cache.rglob("*")) if p.is_file()})
    assert contents[0] == contents[1] and len(contents[0]) > 10
