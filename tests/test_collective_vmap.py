"""Collectives over stacked replicas.

The stacked semantics (``_stacked_collectives``,
the replica axis as a leading dimension or as a vmap level) must equal what
the threads executor computes, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from helpers import devices, pmap_k

import torchpmap as tp
from torchpmap import _ops
from torchpmap import _stacked_collectives as stacked

K = 4
B = 3
GROUPS = [None, [[0, 1], [2, 3]], [[3, 1], [0, 2]]]
UNEQUAL = [[2], [0, 3, 1]]


def _data(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _plain(t):
    return t.unshard() if isinstance(t, tp.ShardedTensor) else t.as_subclass(torch.Tensor)


def _assert_same(a, b):
    """Equal bit for bit (NaN equal to NaN), ShardedTensors compared as their full tensors."""
    torch.utils._pytree.tree_map(
        lambda u, v: torch.testing.assert_close(_plain(u), _plain(v), rtol=0, atol=0, equal_nan=True), a, b
    )


# -- stacked semantics: equal to the threads executor, bit for bit ---------------------------
def _through_threads(name, xs, *args):
    return pmap_k(lambda v: _ops.call(name, v, *args), xs.shape[0])(xs).unshard()


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_stacked_all_reduce_equals_threads(k, op):
    devices(k)
    xs = _data(k, 3, 5)
    for groups in [None, [list(range(k))[::-1]], [[i] for i in range(k)], UNEQUAL if k == 4 else None]:
        encoded, g = _ops.encode_groups(groups) if groups else ([], k)
        _assert_same(
            stacked.all_reduce(xs, op, _ops.decode_groups(encoded, g)),
            _through_threads("all_reduce", xs, op, "i", encoded, g),
        )


@pytest.mark.parametrize("groups", GROUPS, ids=str)
def test_stacked_gathers_and_scatters_equal_threads(groups):
    encoded, g = _ops.encode_groups(groups) if groups else ([], K)
    decoded = _ops.decode_groups(encoded, g)
    xs = _data(K, 5, 2)
    _assert_same(stacked.all_gather(xs, decoded), _through_threads("all_gather", xs, "i", encoded, g))
    blocks = _data(K, g, 5, 2)
    for op in ("sum", "max"):
        _assert_same(
            stacked.reduce_scatter(blocks, op, decoded),
            _through_threads("reduce_scatter", blocks, op, "i", encoded, g),
        )
    _assert_same(stacked.all_to_all(blocks, decoded), _through_threads("all_to_all", blocks, "i", encoded, g))


@pytest.mark.parametrize("pairs", [[], [(0, 1)], [(0, 1), (1, 2), (2, 3), (3, 0)], [(3, 0), (1, 2)]], ids=str)
def test_stacked_permute_equals_threads(pairs):
    xs = _data(K, 2, 3)
    flat = [v for p in pairs for v in p]
    _assert_same(stacked.permute(xs, pairs), _through_threads("permute", xs, "i", flat))


def test_stacked_results_do_not_alias_the_input():
    xs = _data(K, K, 3)
    for out in (
        stacked.all_reduce(xs, "sum"),
        stacked.all_reduce(xs[:1], "sum"),
        stacked.all_gather(xs),
        stacked.reduce_scatter(xs, "sum"),
        stacked.all_to_all(xs),
        stacked.permute(xs, [(0, 0), (1, 1), (2, 2), (3, 3)]),
    ):
        assert out.untyped_storage().data_ptr() != xs.untyped_storage().data_ptr()


def test_stacked_refuses_unequal_groups_where_shapes_depend_on_them():
    with pytest.raises(ValueError, match="same size"):
        stacked.all_gather(_data(K, 3), tuple(map(tuple, UNEQUAL)))
