"""How a node reads a loaded model's ORIGINAL and EFFECTIVE weights, checked on the ComfyUI in use.

Recipe (both 0.8.0 and 0.33.0, classic ModelPatcher; also right under ModelPatcherDynamic, whose big
layers are patched at cast time and stay original in the module):
    bk = mp.backup.get(key)
    original = bk.weight if bk is not None else comfy.model_patcher.get_key_weight(mp.model, key)[0]
    effective = comfy.lora.calculate_weight(mp.patches.get(key, []), original.float().clone(), key)
"""
import pytest
import torch

Q = "diffusion_model.blocks.0.self_attn.q.weight"
NORM = "diffusion_model.blocks.0.norm3.weight"
MOD = "diffusion_model.blocks.0.modulation"


def original_weight(mp, key):
    import comfy.model_patcher

    bk = mp.backup.get(key)
    w = bk.weight if bk is not None else comfy.model_patcher.get_key_weight(mp.model, key)[0]
    import comfy.quant_ops

    if isinstance(w, comfy.quant_ops.QuantizedTensor):
        w = w.dequantize()
    return w.detach().to(torch.float32)


def effective_weight(mp, key):
    import comfy.lora

    with torch.no_grad():
        return comfy.lora.calculate_weight(mp.patches.get(key, []), original_weight(mp, key).clone(), key)


@pytest.fixture()
def patched(comfy_inprocess, tiny_wan):
    from comfy.weight_adapter import LoRAAdapter

    base = comfy_inprocess.load_unet(tiny_wan)
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(128, 4, generator=g), torch.randn(4, 128, generator=g)
    m = base.clone()
    added = m.add_patches({Q: LoRAAdapter(set(), (up, down, None, None, None, None)),
                           NORM: ("diff", (torch.ones(128),)),
                           MOD: ("diff", (torch.ones(1, 6, 128),))}, strength_patch=0.5)
    assert sorted(added) == sorted([Q, NORM, MOD])
    yield comfy_inprocess, base, m, 0.5 * up @ down
    comfy_inprocess.unload_all()


def test_original_and_effective_weights_while_a_patched_clone_is_loaded(patched):
    import comfy.model_patcher

    c, base, m, delta = patched
    before = {k: original_weight(base, k).clone() for k in (Q, NORM)}
    c.mm.load_models_gpu([m])
    live = comfy.model_patcher.get_key_weight(m.model, Q)[0].detach().float()
    # the shared module now holds PATCHED weights, even when read through the unpatched `base`
    assert not torch.equal(base.model_state_dict()[Q].float(), before[Q])
    assert torch.allclose(live, before[Q] + delta, atol=1e-5)
    for mp in (base, m):  # clones share the backup dict, so both see the originals
        assert torch.equal(original_weight(mp, Q), before[Q])
        assert torch.equal(original_weight(mp, NORM), before[NORM])
    assert torch.allclose(effective_weight(m, Q), before[Q] + delta, atol=1e-5)
    assert torch.allclose(effective_weight(m, NORM), before[NORM] + 0.5, atol=1e-6)
    assert torch.equal(effective_weight(base, Q), before[Q])
    c.unload_all()
    assert not m.backup and torch.equal(comfy.model_patcher.get_key_weight(m.model, Q)[0].float(), before[Q])


def test_modulation_patches_are_accepted_but_not_applied(patched):
    """ComfyUI (0.8.0 and 0.33.0) never applies patches to parameters owned by non-leaf modules such
    as Wan's ``blocks.N.modulation`` and ``head.modulation``: ``ModelPatcher._load_list`` skips those
    modules. ``add_patches`` accepts the key, the weight stays original, the samples do not change.
    If this test starts failing, ComfyUI now applies them and effective weights must include them."""
    import comfy.model_patcher

    c, base, m, _ = patched
    ref = c.sample(base, seed=0)
    only_mod = base.clone()
    only_mod.add_patches({MOD: ("diff", (torch.ones(1, 6, 128),))})
    out = c.sample(only_mod, seed=0)
    assert torch.equal(out, ref)
    assert torch.equal(comfy.model_patcher.get_key_weight(only_mod.model, MOD)[0].detach(),
                       original_weight(base, MOD))
