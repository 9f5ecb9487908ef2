"""The drift node keys its cache by the loaded model's file, not by hashing every weight (issue 11).

ComfyUI >= 0.9 records on the patcher which file a core loader read (``cached_patcher_init``); there a
drift run whose drift is cached reads no weight of the model beyond a spot check of a few layers. ComfyUI
0.8.0 records nothing: the node then hashes the weights, as it always did. Either way the identity
follows the content: a file rewritten under the same name is another model, a model still holding the
old content is not taken for the new file, and the loading dtype and the patches count."""
import importlib
import os
import shutil

import pytest
from _fixtures_models import tiny_set_in

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _version(c) -> tuple[int, ...]:
    return tuple(int(p) for p in (c.version or "0").split(".")[:3] if p.isdigit())


@pytest.fixture(scope="module")
def env(comfy_inprocess):
    c = comfy_inprocess
    c.import_pack(REPO_ROOT)
    names = ("basis_node", "drift_node", "model_weights", "model_identity")
    mods = {n: importlib.import_module(f"casa_lora_pack.nodes.{n}") for n in names}
    ts = tiny_set_in(c.base_dir, "casa_mid", seed=11, fp8=False, style_formats=("kohya",), other_size=False)
    return c, ts, mods


def _file_path_recorded(c) -> bool:
    """Whether this ComfyUI keeps the loader's file on the patcher (0.33.0 does, 0.8.0 does not)."""
    return _version(c) >= (0, 9)


class _Reads:
    """Counts reads of the loaded model's weights through the node's weight provider."""

    def __init__(self, monkeypatch, cls):
        self.original = 0
        self.effective = 0
        orig_original, orig_get = cls.original, cls.get

        def original(inner, layer):
            self.original += 1
            return orig_original(inner, layer)

        def get(inner, layer):
            self.effective += 1
            return orig_get(inner, layer)

        monkeypatch.setattr(cls, "original", original)
        monkeypatch.setattr(cls, "get", get)

    def take(self) -> tuple[int, int]:
        out = (self.original, self.effective)
        self.original = self.effective = 0
        return out


def test_second_drift_run_on_a_cached_model_reads_no_weights(env, monkeypatch):
    c, ts, m = env
    weights_cls = m["model_weights"].ComfyModelWeights
    basis = m["basis_node"].CASALoadSourceBasis.execute(ts.base, "float32").result[0]
    reads = _Reads(monkeypatch, weights_cls)
    n_layers = len(basis.basis.layers)

    first = m["drift_node"].CASAComputeDrift.execute(basis, c.load_unet(ts.distilled)).result[0]
    assert not first.reused
    o1, e1 = reads.take()
    assert e1 == n_layers  # the drift itself needs every effective weight once

    model = c.load_unet(ts.distilled)  # loaded afresh, as after a restart of ComfyUI
    identity = weights_cls(model).identity()
    reads.take()
    second = m["drift_node"].CASAComputeDrift.execute(basis, model).result[0]
    assert second.reused and second.drift.cache.final == first.drift.cache.final
    o2, e2 = reads.take()
    assert e2 == 0
    if _file_path_recorded(c):
        assert model.cached_patcher_init is not None  # what the fast path relies on
        assert identity.startswith("comfy-file:")
        spot = m["model_identity"].SPOT_LAYERS
        assert spot < n_layers / 4
        assert o2 <= spot, f"{o2} original weights read for a cached drift (only the spot check may read some)"
        assert o1 - e1 <= spot  # beyond the drift's own reads (get() reads the original): the spot check
    else:  # ComfyUI 0.8.0: no file on record, the weights are hashed
        assert identity.startswith("comfy-model:")
        assert o2 == n_layers


def _identity(c, m, name, weight_dtype="default", lora=None, strength=1.0) -> str:
    model = c.load_unet(name, weight_dtype)
    if lora is not None:
        (model,) = c.nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora, strength)
    return m["model_weights"].ComfyModelWeights(model).identity()


def test_a_file_rewritten_under_the_same_name_is_another_model(env):
    c, ts, m = env
    folder = ts.unet_path(ts.base).parent
    swap = "casa_mid_swap.safetensors"
    shutil.copyfile(folder / ts.distilled, folder / swap)
    before = _identity(c, m, swap)
    assert before == _identity(c, m, ts.distilled)  # same content, another name: the same model
    stale = c.load_unet(swap)  # still holds the distilled weights after the rewrite below

    st = os.stat(folder / swap)
    shutil.copyfile(folder / ts.base, folder / swap)
    # a real rewrite happens later than the first write; the file system's clock may not tick in between
    os.utime(folder / swap, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = _identity(c, m, swap)
    assert after != before
    assert after == _identity(c, m, ts.base)

    # the model loaded before the rewrite is not taken for the new file: it keeps its own identity
    stale_identity = m["model_weights"].ComfyModelWeights(stale).identity()
    assert stale_identity != after
    if _file_path_recorded(c):
        assert before.startswith("comfy-file:") and after.startswith("comfy-file:")
        assert stale_identity.startswith("comfy-model:")  # the spot check saw other weights: hashed


def test_loading_dtype_and_patches_are_part_of_the_identity(env):
    c, ts, m = env
    plain = _identity(c, m, ts.base)
    ids = {
        "plain": plain,
        "fp8": _identity(c, m, ts.base, weight_dtype="fp8_e4m3fn"),
        "lora": _identity(c, m, ts.base, lora=ts.distill_lora),
        "lora_0.6": _identity(c, m, ts.base, lora=ts.distill_lora, strength=0.6),
    }
    assert len(set(ids.values())) == len(ids), ids
    assert _identity(c, m, ts.base, lora=ts.distill_lora) == ids["lora"]  # deterministic
    if _file_path_recorded(c):
        assert all(v.startswith("comfy-file:") for v in ids.values()), ids  # fp8: the spot check casts
