"""Small helpers shared by the test files."""

import numpy as np
import pytest
import torch

import torchpmap as tp


def devices(k):
    """The first k local devices, or skip the test when there are fewer."""
    local = tp.local_devices()
    if len(local) < k:
        pytest.skip(f"needs {k} devices, this process has {len(local)}")
    return local[:k]


def pmap_k(f, k, **kwargs):
    """pmap f over the first k local devices on axis 'i' (skips the test with fewer)."""
    return tp.pmap(f, "i", devices=devices(k), **kwargs)


def rows(n, *rest, dtype=torch.float32, scale=0.5, offset=-3.0):
    """A deterministic (n, *rest) tensor whose rows all differ."""
    numel = n * int(np.prod(rest, dtype=np.int64))
    return (torch.arange(numel, dtype=torch.float64).reshape(n, *rest) * scale + offset).to(dtype)
