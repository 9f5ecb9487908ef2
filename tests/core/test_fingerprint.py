"""casa_core.fingerprint: the cheap content digest of patches (what the drift node hashes on every run)."""
import hashlib

import torch

from casa_core.fingerprint import feed


def digest(v) -> str:
    h = hashlib.blake2b(digest_size=20)
    feed(h, v)
    return h.hexdigest()


class Adapter:  # shaped like comfy.weight_adapter's adapters: a class and its weights
    def __init__(self, weights):
        self.weights = weights


def test_fingerprint_follows_content_not_layout():
    t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    assert digest((1.0, t, None)) == digest((1.0, t.clone(), None))
    assert digest((1.0, t.T.contiguous().T, None)) == digest((1.0, t, None))  # strides do not matter
    changed = t.clone()
    changed[2, 3] += 1
    assert digest((1.0, changed, None)) != digest((1.0, t, None))
    assert digest((1.0, t.float(), None)) != digest((1.0, t, None))  # the dtype counts
    assert digest((0.6, t, None)) != digest((1.0, t, None))  # the strength counts
    assert digest((1.0, t.reshape(4, 3), None)) != digest((1.0, t, None))  # the shape counts
    assert digest([t]) != digest([t, t])


def test_fingerprint_of_adapters_and_functions_is_stable():
    up, down = torch.ones(4, 2), torch.full((2, 3), 0.5)
    a = [(1.0, Adapter((up, down, 2.0, None)), 1.0, None, None)]
    b = [(1.0, Adapter((up.clone(), down.clone(), 2.0, None)), 1.0, None, None)]
    assert digest(a) == digest(b)
    assert digest(a) != digest([(1.0, Adapter((up, down, 4.0, None)), 1.0, None, None)])  # alpha counts

    def convert(w):
        return w

    with_fn = [(1.0, Adapter((up, down, 2.0, None)), 1.0, None, convert)]
    assert digest(with_fn) == digest(list(with_fn)) and digest(with_fn) != digest(a)
    # the raw bytes are hashed: the digest is the blake2b of exactly what was fed, bytes included
    h = hashlib.blake2b(digest_size=20)
    h.update(b"tensor:torch.float32:(2,):")
    h.update(torch.tensor([1.0, 2.0]).numpy().tobytes())
    assert digest(torch.tensor([1.0, 2.0])) == h.hexdigest()
