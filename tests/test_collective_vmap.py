"""Collectives under torch.func.vmap.

Inside a replica, a user's vmap carries its dimension as data: the collective
still communicates across the replicas, and the result equals running it on
every batch member in a loop. The stacked semantics (``_stacked_collectives``,
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


# Each public collective as a function of one replica's value (leading dim K
# where the collective needs one), with its groups.
def _public(groups):
    kw = dict(axis_index_groups=groups)
    return {
        "psum": lambda v: tp.psum(v, "i", **kw),
        "pmean": lambda v: tp.pmean(v, "i", **kw),
        "pmax": lambda v: tp.pmax(v, "i", **kw),
        "pmin": lambda v: tp.pmin(v, "i", **kw),
        "psum_tree": lambda v: tp.psum({"a": v, "b": (v * 2, v[0])}, "i", **kw),
        "all_gather": lambda v: tp.all_gather(v, "i", **kw),
        "all_gather_axis1_tiled": lambda v: tp.all_gather(v, "i", axis=1, tiled=True, **kw),
        "psum_scatter": lambda v: tp.psum_scatter(v[:2] if groups else v, "i", **kw),
        "psum_scatter_tiled": lambda v: tp.psum_scatter(v, "i", scatter_dimension=1, tiled=True, **kw),
        "all_to_all": lambda v: tp.all_to_all(v[:2] if groups else v, "i", 0, 1, **kw),
        "all_to_all_tiled": lambda v: tp.all_to_all(v, "i", 1, 0, tiled=True, **kw),
        "ppermute": lambda v: tp.ppermute(v, "i", [(0, 2), (2, 1), (3, 0)]),
        "pshuffle": lambda v: tp.pshuffle(v, "i", [1, 2, 3, 0]),
        "pswapaxes": lambda v: tp.pswapaxes(v[:2] if groups else v, "i", 0, **kw),
    }


PUBLIC = [(name, g) for g in GROUPS for name in _public(g)]


def _loop(fn):
    """fn on every batch member (dim 0) in turn, stacked: what vmap must equal."""

    def looped(x):
        outs = [fn(x[b]) for b in range(x.shape[0])]
        return torch.utils._pytree.tree_map(lambda *o: torch.stack(o), *outs)

    return looped


def _plain(t):
    return t.unshard() if isinstance(t, tp.ShardedTensor) else t.as_subclass(torch.Tensor)


def _assert_same(a, b):
    """Equal bit for bit (NaN equal to NaN), ShardedTensors compared as their full tensors."""
    torch.utils._pytree.tree_map(
        lambda u, v: torch.testing.assert_close(_plain(u), _plain(v), rtol=0, atol=0, equal_nan=True), a, b
    )


def _gid(case):
    name, g = case
    return f"{name}-{'all' if g is None else 'g' + ''.join(map(str, sum(g, [])))}"


@pytest.mark.parametrize("case", PUBLIC, ids=_gid)
def test_public_collective_under_vmap_in_a_replica_equals_the_loop(case):
    name, groups = case
    fn = _public(groups)[name]
    x = _data(K, B, K, 4)
    expected = pmap_k(_loop(fn), K)(x)
    _assert_same(pmap_k(torch.func.vmap(fn), K)(x), expected)


@pytest.mark.parametrize("case", PUBLIC, ids=_gid)
def test_vmap_over_a_later_dimension_equals_the_loop(case):
    name, groups = case
    fn = _public(groups)[name]
    x = _data(K, K, 4, B)  # batch dim last in each replica
    expected = pmap_k(lambda v: _loop(fn)(v.movedim(-1, 0)), K)(x)
    _assert_same(pmap_k(torch.func.vmap(fn, in_dims=-1), K)(x), expected)


def _primitives(groups):
    encoded, g = _ops.encode_groups(groups) if groups else ([], K)
    return {
        "all_reduce": lambda v: _ops.call("all_reduce", v, "sum", "i", encoded, g),
        "all_gather": lambda v: _ops.call("all_gather", v, "i", encoded, g),
        "reduce_scatter": lambda v: _ops.call("reduce_scatter", v[:g], "sum", "i", encoded, g),
        "all_to_all": lambda v: _ops.call("all_to_all", v[:g], "i", encoded, g),
        "permute": lambda v: _ops.call("permute", v, "i", [1, 0, 0, 3]),
    }


PRIMITIVES = [(name, g) for g in GROUPS for name in _primitives(g)]


@pytest.mark.parametrize("case", PRIMITIVES, ids=_gid)
def test_primitive_under_nested_vmap_equals_the_loop(case):
    name, groups = case
    fn = _primitives(groups)[name]
    x = _data(K, 2, B, K, 3)
    expected = pmap_k(_loop(_loop(fn)), K)(x)
    got = pmap_k(torch.func.vmap(torch.func.vmap(fn, in_dims=1, out_dims=1)), K)(x.transpose(2, 3).contiguous())
    _assert_same(_plain(got).transpose(2, 3), expected)


@pytest.mark.parametrize("name", ["psum", "pmean", "all_gather", "psum_scatter", "all_to_all", "ppermute"])
def test_per_sample_gradients_through_a_collective(name):
    """vmap(grad(f)) inside a replica: every batch member's gradient, with the
    collective's transpose communicating in the backward."""
    fn = _public(None)[name]
    w = _data(K, K, 4, seed=1)

    def loss(v, wr):
        return (fn(v) * torch.sin(fn(v * wr))).sum()

    def per_sample(x, wr):
        return torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(x, wr)

    def looped(x, wr):
        return torch.stack([torch.func.grad(loss)(x[b], wr) for b in range(B)])

    x = _data(K, B, K, 4)
    _assert_same(pmap_k(per_sample, K)(x, w), pmap_k(looped, K)(x, w))


@pytest.mark.parametrize("name", ["psum", "all_gather", "psum_scatter", "all_to_all", "ppermute"])
def test_gradient_of_a_vmapped_collective(name):
    """grad(vmap(f)) and the caller's autograd through pmap(vmap(f)) equal the loop's."""
    fn = _public(None)[name]

    def loss(v):
        return (torch.func.vmap(fn)(v) ** 2).sum()

    def looped_loss(v):
        return (_loop(fn)(v) ** 2).sum()

    x = _data(K, B, K, 4)
    _assert_same(pmap_k(torch.func.grad(loss), K)(x), pmap_k(torch.func.grad(looped_loss), K)(x))

    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    pmap_k(loss, K)(xa).sum().backward()
    pmap_k(looped_loss, K)(xb).sum().backward()
    _assert_same(xa.grad, xb.grad)


def test_vmapped_collectives_compile_with_fullgraph():
    def f(v):
        return torch.func.vmap(lambda r: tp.all_gather(tp.psum(r, "i") * r, "i"))(v)

    x = _data(K, B, 5)
    eager = pmap_k(f, K)(x)
    compiled = pmap_k(f, K, compile=dict(backend="aot_eager", fullgraph=True))(x)
    _assert_same(compiled, eager)


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


# -- the replica axis as a vmap level ---------------------------------------------------------
def _replica_program(groups):
    def program(v):
        out = {name: fn(v) for name, fn in _public(groups).items()}
        out["index"] = tp.axis_index("i") * tp.axis_size("i")
        out["pmean_unequal"] = tp.pmean(v, "i", axis_index_groups=UNEQUAL)
        return out

    return program


@pytest.mark.parametrize("groups", GROUPS, ids=str)
def test_vmap_replicas_equals_pmap_bit_for_bit(groups):
    program = _replica_program(groups)
    xs = _data(K, K, 4)
    expected = pmap_k(program, K)(xs)
    got = stacked.vmap_replicas(program, "i", K)(xs)
    _assert_same(got, expected)


def test_vmap_replicas_with_a_users_vmap_inside():
    """The replica level exchanges; the user's level inside carries its dim as data."""
    fn = _public(None)["all_gather"]
    xs = _data(K, B, K, 4)
    expected = pmap_k(_loop(fn), K)(xs).unshard()
    _assert_same(stacked.vmap_replicas(torch.func.vmap(fn), "i", K)(xs), expected)


def test_vmap_replicas_gradients_equal_pmap():
    def loss(v, w):
        return (tp.psum(v * w, "i") * tp.all_gather(v, "i").sum(0)).sum()

    xs, w = _data(K, 3), _data(3, seed=2)
    expected = pmap_k(torch.func.grad(loss), K, in_axes=(0, None))(xs, w).unshard()
    got = stacked.vmap_replicas(torch.func.grad(loss), "i", K, in_dims=(0, None))(xs, w)
    _assert_same(got, expected)

    xa = xs.clone().requires_grad_()
    stacked.vmap_replicas(loss, "i", K, in_dims=(0, None))(xa, w).sum().backward()
    xb = xs.clone().requires_grad_()
    pmap_k(loss, K, in_axes=(0, None))(xb, w).sum().backward()
    _assert_same(xa.grad, xb.grad)


def test_vmap_replicas_other_axis_name_is_unbound():
    with pytest.raises(NameError, match="unbound axis name: 'j'"):
        stacked.vmap_replicas(lambda v: tp.psum(v, "j"), "i", K)(_data(K, 3))


def test_vmap_replicas_constants_in_a_tree_count_like_pmap():
    def program(v):
        summed = tp.psum({"c": 2, "v": v}, "i")  # "c": a plain int, which vmap cannot return
        return tp.pmean({"v": v, "c": 3.0}, "i", axis_index_groups=UNEQUAL), summed["v"] * summed["c"]

    xs = _data(K, 3)
    _assert_same(stacked.vmap_replicas(program, "i", K)(xs), pmap_k(program, K)(xs))


def test_vmap_replicas_refuses_a_collective_of_a_value_the_same_in_every_replica():
    with pytest.raises(NotImplementedError, match="same in every replica"):
        stacked.vmap_replicas(lambda v: v + tp.psum(torch.ones(3, dtype=v.dtype), "i"), "i", K)(_data(K, 3))


def test_vmap_replicas_refuses_a_batch_that_is_not_the_replicas():
    with pytest.raises(ValueError, match="has 4 replicas but vmap batches 3"):
        stacked.vmap_replicas(lambda v: tp.psum(v, "i"), "i", K)(_data(3, 2))


def test_vmap_replicas_without_tensor_arguments_puts_the_index_on_the_given_device():
    """No argument to take the device from: the replicas' device, not the CPU
    (several replicas of one GPU). The meta device stands in for the GPU."""
    meta = torch.device("meta")
    got = stacked.vmap_replicas(lambda: tp.psum(tp.axis_index("i").float(), "i"), "i", K, meta)()
    assert got.device == meta and got.shape == (K,)
    on_cpu = stacked.vmap_replicas(lambda: tp.axis_index("i") * 2, "i", K)()
    assert torch.equal(on_cpu, torch.arange(K) * 2)
