"""The named-axis collectives against numpy references.

Every collective runs inside ``torchpmap.pmap`` over 1, 2, 4 and 8 virtual
devices; each replica's result is compared with what a numpy reference
computes from all replicas' inputs (``ref_*`` below, written from the
``jax.lax`` documentation). Rows of the numpy arrays are replicas.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from helpers import devices, expect_error, pmap_k, rows
from torch._subclasses.fake_tensor import FakeTensorMode

import torchpmap as tp

DEVICE_COUNTS = [1, 2, 4, 8]

# axis_index_groups to try for each axis size (None: one group of everybody).
# Unordered groups matter: the position in a group orders gathers and scatters.
GROUPS = {
    1: [None, [[0]]],
    2: [None, [[0], [1]], [[1, 0]]],
    4: [None, [[0, 1], [2, 3]], [[3, 1], [0, 2]], [[2], [0], [3], [1]]],
    8: [None, [[0, 1, 2, 3], [4, 5, 6, 7]], [[6, 0], [1, 7], [5, 2], [3, 4]], [[7, 5, 3, 1], [6, 4, 2, 0]]],
}
K_AND_GROUPS = [(k, g) for k in DEVICE_COUNTS for g in GROUPS[k]]


def _ids(case):
    k, g = case
    return f"k{k}-{'all' if g is None else 'g' + ''.join(map(str, sum(g, [])))}"


def np_of(x) -> np.ndarray:
    if isinstance(x, tp.ShardedTensor):
        x = x.unshard()
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


_rng = np.random.default_rng(0)


def sample(k: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """k replicas' worth of data: a tensor of shape (k, *shape)."""
    full = (k, *shape)
    if dtype == torch.bool:
        a = _rng.random(full) < 0.5
    elif dtype.is_complex:
        a = _rng.standard_normal(full) + 1j * _rng.standard_normal(full)
    elif dtype in (torch.float16, torch.bfloat16):
        a = _rng.integers(-8, 9, size=full) / 4  # sums and means stay exact in half precision
    elif dtype.is_floating_point:
        a = _rng.standard_normal(full)
    elif dtype == torch.uint8:
        a = _rng.integers(0, 30, size=full)  # sums of 8 stay below 256
    else:
        a = _rng.integers(-50, 50, size=full)
    return torch.from_numpy(np.asarray(a)).to(dtype)


def members(k, groups):
    return groups if groups is not None else [list(range(k))]


def assert_matches(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype):
    assert actual.dtype == dtype, (actual.dtype, dtype)
    got = np_of(actual)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if dtype.is_floating_point or dtype.is_complex:
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    else:
        np.testing.assert_array_equal(got, expected)


# -- numpy references (rows are replicas) ------------------------------------------------
def ref_reduce(X, op, groups):
    k = X.shape[0]
    out = [None] * k
    for g in members(k, groups):
        r = op(X[g], axis=0)
        for m in g:
            out[m] = r
    return np.stack(out)


def ref_all_gather(X, groups, axis, tiled):
    k = X.shape[0]
    out = [None] * k
    for g in members(k, groups):
        parts = [X[j] for j in g]
        r = np.concatenate(parts, axis=axis) if tiled else np.stack(parts, axis=axis)
        for m in g:
            out[m] = r
    return np.stack(out)


def ref_psum_scatter(X, groups, dim, tiled):
    k = X.shape[0]
    out = [None] * k
    for g in members(k, groups):
        total = X[g].sum(axis=0)
        for pos, m in enumerate(g):
            out[m] = np.split(total, len(g), axis=dim)[pos] if tiled else np.take(total, pos, axis=dim)
    return np.stack(out)


def ref_all_to_all(X, groups, split_axis, concat_axis, tiled):
    k = X.shape[0]
    out = [None] * k
    for g in members(k, groups):
        for pos, m in enumerate(g):
            if tiled:
                out[m] = np.concatenate([np.split(X[j], len(g), axis=split_axis)[pos] for j in g], axis=concat_axis)
            else:
                out[m] = np.stack([np.take(X[j], pos, axis=split_axis) for j in g], axis=concat_axis)
    return np.stack(out)


def ref_ppermute(X, perm):
    out = np.zeros_like(X)
    for src, dst in perm:
        out[dst] = X[src]
    return out


# -- reductions -----------------------------------------------------------------------------
REDUCTION_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]


@pytest.mark.parametrize("case", K_AND_GROUPS, ids=_ids)
def test_reductions_match_numpy(case):
    """psum/pmean/pmax/pmin of a pytree of mixed dtypes, with and without groups."""
    k, groups = case
    inputs = {str(dt).split(".")[1]: sample(k, (2, 3), dt) for dt in REDUCTION_DTYPES}
    orderable = {n: v for n, v in inputs.items() if not v.dtype.is_complex}

    def f(tree, ordered):
        kw = dict(axis_index_groups=groups)
        return dict(
            sum=tp.psum(tree, "i", **kw),
            mean=tp.pmean(tree, "i", **kw),
            max=tp.pmax(ordered, "i", **kw),
            min=tp.pmin(ordered, "i", **kw),
        )

    out = pmap_k(f, k)(inputs, orderable)
    assert set(out) == {"sum", "mean", "max", "min"}
    assert set(out["sum"]) == set(inputs) and set(out["max"]) == set(orderable)
    for name, x in inputs.items():
        X = np_of(x)
        dt = x.dtype
        sum_dtype = torch.int64 if dt == torch.bool else dt  # booleans count as int64
        mean_dtype = dt if (dt.is_floating_point or dt.is_complex) else torch.get_default_dtype()
        Xs = X.astype(np.int64) if dt == torch.bool else X
        Xm = X.astype(np.float64) if dt in (torch.float16, torch.bfloat16) else Xs  # full precision
        assert_matches(out["sum"][name], ref_reduce(Xs, np.sum, groups).astype(Xs.dtype), sum_dtype)
        assert_matches(out["mean"][name], ref_reduce(Xm, np.mean, groups), mean_dtype)
        if name in orderable:
            assert_matches(out["max"][name], ref_reduce(X, np.max, groups), dt)
            assert_matches(out["min"][name], ref_reduce(X, np.min, groups), dt)


@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_psum_examples_from_jax_docs(k):
    x = torch.arange(k) + 1
    total = k * (k + 1) // 2
    torch.testing.assert_close(pmap_k(lambda v: tp.psum(v, "i"), k)(x).unshard(), torch.full((k,), total))
    y = pmap_k(lambda v: v / tp.psum(v, "i"), k)(x.double()).unshard()
    torch.testing.assert_close(y, x.double() / total)


def test_psum_with_groups_jax_doc_example():
    x = torch.arange(16).reshape(4, 4)
    y = pmap_k(lambda v: tp.psum(v, "i", axis_index_groups=[[0, 1], [2, 3]]), 4)(x)
    expected = torch.tensor([[4, 6, 8, 10], [4, 6, 8, 10], [20, 22, 24, 26], [20, 22, 24, 26]])
    torch.testing.assert_close(y.unshard(), expected)


@pytest.mark.parametrize("k", [2, 8])
def test_psum_of_python_constants_counts_the_replicas(k):
    """As in JAX: psum(1, axis) is the axis (or group) size; pmean of a constant is itself."""

    def f(x):
        n = tp.psum(1, "i")
        g = tp.psum(1, "i", axis_index_groups=[[0, 1]] if k == 2 else [[0, 1, 2, 3], [4, 5, 6, 7]])
        m = tp.pmean(3.0, "i")
        return x * 0 + n, x * 0 + g, x * 0 + m

    n, g, m = pmap_k(f, k)(torch.zeros(k))
    assert n.unshard().tolist() == [k] * k
    assert g.unshard().tolist() == [2 if k == 2 else 4] * k
    assert m.unshard().tolist() == [3.0] * k


@pytest.mark.parametrize("groups", [None, [[0, 2, 3], [1]]], ids=["all", "unequal_groups"])
def test_reductions_of_each_replicas_own_python_numbers_exchange_them(groups):
    # A replica's own Python number (loss.item(), int(axis_index)) was taken for a constant:
    # psum gave n * v and pmean, pmax, pmin each replica's own v, silently (found by a hunt).
    kw = dict(axis_index_groups=groups)

    def f(x):
        loss = float((x * x).sum().item())  # 0, 1, 4, 9
        i = int(tp.axis_index("i"))
        numbers = [tp.psum(loss, "i", **kw), tp.pmean(loss, "i", **kw), tp.pmax(loss, "i", **kw)]
        numbers += [tp.pmin(i, "i", **kw), tp.psum(i, "i", **kw), tp.pmean({"i": i, "t": x}, "i", **kw)["i"]]
        return torch.tensor(numbers, dtype=torch.float64)

    x = torch.arange(4.0).reshape(4, 1)
    losses, sizes = [0.0, 1.0, 4.0, 9.0], {}
    groups_of = groups or [[0, 1, 2, 3]]
    expected = []
    for r in range(4):
        g = next(g for g in groups_of if r in g)
        ls = [losses[m] for m in g]
        expected.append([sum(ls), sum(ls) / len(g), max(ls), min(g), sum(g), sum(g) / len(g)])
        sizes[r] = len(g)
    pf = pmap_k(f, 4)
    for _ in range(3):  # the first call on the threads, then whatever the executor makes of .item()
        assert pf(x).unshard().tolist() == expected


@pytest.mark.parametrize("how", ["lockstep", "compile"])
def test_per_replica_numbers_in_a_trace_are_reduced_as_values_not_constants(how):
    # The lockstep executor's integer .item() is each replica's own symbol, and a replica's
    # own torch.compile (compile= on the threads) specialises on each replica's values:
    # both took them for constants (psum gave 4 * i, pmax i).
    from torchpmap import _config

    def f(x):
        i = x.sum().item()  # 0, 1, 2, 3
        return x + tp.psum(i, "i"), x + tp.pmax(i, "i"), x + tp.pmin(i - 1, "i")

    def g(x):  # (a float symbol: lockstep falls back to the threads)
        return x * 0 + tp.pmean(x.sum().item(), "i")

    kwargs = dict(compile=dict(backend="eager")) if how == "compile" else {}
    pf, pg = (tp.pmap(fn, "i", devices=devices(4), **kwargs) for fn in (f, g))
    _config._executor = "lockstep" if how == "lockstep" else "threads"  # (the autouse fixture restores it)
    x = torch.arange(4).reshape(4, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if how == "lockstep" else "ignore")  # f runs lockstep, no fallback
        for _ in range(3):
            total, top, least = (o.unshard().flatten().tolist() for o in pf(x))
            assert total == [6, 7, 8, 9] and top == [3, 4, 5, 6] and least == [-1, 0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            assert pg(x).unshard().flatten().tolist() == [1.5] * 4


def test_a_constant_number_stays_a_constant_in_a_lockstep_trace():
    # psum(1, "i"), JAX's idiom for the axis size, used as a shape: reduced as a tensor it was a
    # data-dependent value, and the lockstep capture fell back to the threads (found by a review).
    from torchpmap import _config

    def f(v):
        n = tp.psum(1, "i")
        return v.reshape(n, -1).sum(0) * tp.pmean(0.5, "i")

    pf = tp.pmap(f, "i", devices=devices(4))
    _config._executor = "lockstep"  # (the autouse fixture restores it)
    x = torch.arange(32.0).reshape(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        for _ in range(2):
            got = pf(x).unshard()
    assert got.tolist() == [(x[r].reshape(4, 2).sum(0) * 0.5).tolist() for r in range(4)]


def test_a_number_exchange_under_another_default_device_and_on_some_replicas_only():
    def under_meta(x):
        with torch.device("meta"):  # (deferred initialisation): the exchange stays on the replica's device
            n = tp.psum(1, "i")
        return x * 0 + n

    assert pmap_k(under_meta, 4)(torch.zeros(4)).unshard().tolist() == [4.0] * 4

    def on_replica_0(x):
        if int(tp.axis_index("i")) == 0:
            tp.psum(1.5, "i")  # a log line on one replica: the others never exchange
        return x

    err, seconds = expect_error(pmap_k(on_replica_0, 4), torch.zeros(4), kind=tp.CollectiveMismatchError)
    assert "psum of Python numbers exchanges them between the replicas" in str(err)
    assert seconds < 2.0


def test_python_numbers_reduce_with_python_types_and_rules():
    def f(x):
        r = int(tp.axis_index("i"))
        mixed = r if r else 0.5  # an int on three replicas, a float on one
        out = dict(
            mixed_sum=tp.psum(mixed, "i"),
            bools=tp.psum(r % 2 == 1, "i"),  # booleans count
            any_bool=tp.pmax(r == 3, "i"),
            nan=tp.pmax(float("nan") if r == 2 else float(r), "i"),
            np32=tp.psum(np.float32(r) / 4, "i"),
            same=tp.psum(0.1, "i"),  # equal everywhere: n * v, as a capture's constant
            cplx=tp.psum(complex(r, 1), "i"),
        )
        types = {k: type(v).__name__ for k, v in out.items()}
        as_tensor = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in out.items() if k != "cplx"}
        as_tensor["cplx"] = torch.tensor(complex(out["cplx"]), dtype=torch.complex128)
        return x * 0, as_tensor, types

    k = 4
    types_seen = []
    pf = tp.pmap(lambda x: f(x)[:2], "i", devices=devices(k))
    _, values = pf(torch.zeros(k))
    pmap_k(lambda x: types_seen.append(f(x)[2]) or x, k)(torch.zeros(k))
    assert values["mixed_sum"].unshard().tolist() == [6.5] * k
    assert values["bools"].unshard().tolist() == [2.0] * k
    assert values["any_bool"].unshard().tolist() == [1.0] * k
    assert torch.isnan(values["nan"].unshard()).all()
    assert values["np32"].unshard().tolist() == [1.5] * k
    assert values["same"].unshard().tolist() == [0.1 * 4] * k
    assert values["cplx"].unshard().tolist() == [complex(6, 4)] * k
    for types in types_seen:
        assert types == dict(
            mixed_sum="float", bools="int", any_bool="bool", nan="float", np32="float32", same="float", cplx="complex"
        )


@pytest.mark.parametrize("name", ["threads", "stacked"])
def test_pmax_of_a_complex_constant_raises_on_every_executor(name):
    from torchpmap import _config

    _config._executor = name  # (the autouse fixture restores it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="pmax: complex numbers have no order"):
            pmap_k(lambda x: x + tp.pmax(1 + 2j, "i").real, 4)(torch.zeros(4))


def test_pmax_of_per_replica_complex_numbers_raises_on_every_replica():
    err, seconds = expect_error(
        pmap_k(lambda x: x + tp.pmax(complex(int(tp.axis_index("i")), 1), "i").real, 4), torch.zeros(4), kind=TypeError
    )
    assert "pmax: complex numbers have no order" in str(err)
    assert seconds < 2.0


@pytest.mark.threads_only  # (in a lockstep trace the number is a symbol, reduced as an int64 tensor: OverflowError)
def test_a_python_int_past_64_bits_is_refused_by_name():
    err, _ = expect_error(pmap_k(lambda x: x + tp.psum(2**70 + int(tp.axis_index("i")), "i"), 2), torch.zeros(2))
    assert "psum: the Python int" in str(err) and "64 bits" in str(err)


def test_pmean_of_ints_and_bools_is_floating():
    x = torch.tensor([1, 2, 3, 5])
    out = pmap_k(lambda v: (tp.pmean(v, "i"), tp.pmean(v > 2, "i")), 4)(x)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[0].unshard().tolist() == [2.75] * 4
    assert out[1].unshard().tolist() == [0.5] * 4


def test_pmax_pmin_reject_complex():
    x = torch.ones(2, 3, dtype=torch.complex64)
    for fn in (tp.pmax, tp.pmin):
        with pytest.raises(TypeError, match="complex"):
            pmap_k(lambda v, fn=fn: fn(v, "i"), 2)(x)


@pytest.mark.parametrize("fn", ["psum", "pmean", "pmax", "pmin", "psum_scatter"])
def test_reductions_of_a_dtype_torch_cannot_reduce_name_the_collective(fn):
    # torch has no CPU add or maximum for uint32: its own NotImplementedError came from inside
    # the exchange ("add_stub" not implemented for 'UInt32'), naming no collective (JAX reduces them).
    x = torch.arange(8).reshape(2, 4).to(torch.uint32)
    err, seconds = expect_error(pmap_k(lambda v: getattr(tp, fn)(v, "i"), 2), x, kind=TypeError)
    assert str(err).startswith(f"{fn}: torch cannot") and "torch.uint32" in str(err) and "cast" in str(err)
    assert seconds < 1.0


def test_psum_of_complex_is_exact():
    x = torch.tensor([1 + 2j, 3 - 1j, -2 + 0.5j], dtype=torch.complex128)
    out = pmap_k(lambda v: tp.psum(v, "i"), 3)(x).unshard()
    torch.testing.assert_close(out, x.sum().expand(3))


def test_reduction_results_do_not_alias():
    """Each replica may modify its result in place without touching the others'."""

    def f(x):
        s = tp.psum(x, "i")
        s.add_(tp.axis_index("i"))
        return s

    out = pmap_k(f, 4)(torch.ones(4, 3)).unshard()
    torch.testing.assert_close(out, torch.arange(4.0)[:, None] + 4 + torch.zeros(4, 3))


UNEQUAL_GROUPS = {3: [[0, 2], [1]], 4: [[0, 1, 2], [3]], 8: [[5], [0, 3, 6], [1, 2, 4, 7]]}


@pytest.mark.parametrize("groups", [None, [[0, 1, 2], [3]]], ids=["all", "unequal"])
def test_pmean_of_a_tree_is_its_psum_divided_leaf_by_leaf(groups):
    """pmean divides each dtype's flat buffer once; the result is exactly
    psum / group size leaf by leaf (values, dtypes, None and constants), and
    so is its gradient."""
    k, kw = 4, dict(axis_index_groups=groups)

    def f(v):
        v = v.detach().requires_grad_()
        tree = {"w": v * 2, "b": v[:1] - 1, "n": None, "c": 3, "i": (v * 10).long(), "j": v.long(), "m": v > 0}
        mean, total = tp.pmean(tree, "i", **kw), tp.psum(tree, "i", **kw)
        n = tp.psum(1, "i", **kw)
        for key in ("w", "b", "i", "j", "m"):
            expected = torch.true_divide(total[key], n)
            assert mean[key].dtype == expected.dtype and torch.equal(mean[key], expected), key
        assert mean["n"] is None and mean["c"] == total["c"] / n
        (grad,) = torch.autograd.grad(mean["w"].sum() + mean["b"].sum(), v, retain_graph=True)
        (expected_grad,) = torch.autograd.grad(
            torch.true_divide(total["w"], n).sum() + torch.true_divide(total["b"], n).sum(), v
        )
        assert torch.equal(grad, expected_grad)
        return grad

    pmap_k(f, k)(rows(k, 5, scale=0.37))


@pytest.mark.parametrize("op", ["pmax", "pmin"])
def test_pmax_and_pmin_propagate_nan(op):
    """As torch.maximum/minimum and jnp.max: a NaN in any replica is the result
    of every replica (XLA's CPU all-reduce drops it instead)."""
    x = torch.tensor([[float("nan"), 1.0], [2.0, 3.0], [0.0, float("nan")], [5.0, -1.0]])
    out = pmap_k(lambda v: getattr(tp, op)(v, "i"), 4)(x).unshard()
    assert torch.isnan(out).all(), out


@pytest.mark.parametrize("k", sorted(UNEQUAL_GROUPS))
def test_reductions_with_unequal_groups_match_numpy(k):
    """As JAX: psum/pmean/pmax/pmin accept axis_index_groups of different sizes.
    pmean and psum of a constant use each replica's own group size (JAX 0.10
    uses the first group's for every replica)."""
    groups = UNEQUAL_GROUPS[k]
    x = sample(k, (2, 3), torch.float64)
    ints = sample(k, (3,), torch.int64)

    def f(v, i):
        kw = dict(axis_index_groups=groups)
        return dict(
            sum=tp.psum(v, "i", **kw),
            mean=tp.pmean(v, "i", **kw),
            max=tp.pmax(v, "i", **kw),
            min=tp.pmin(v, "i", **kw),
            imean=tp.pmean(i, "i", **kw),
            count=tp.psum(1, "i", **kw),
            tree=tp.psum({"a": v, "b": i}, "i", **kw),
        )

    out = pmap_k(f, k)(x, ints)
    X, Xi = np_of(x), np_of(ints)
    assert_matches(out["sum"], ref_reduce(X, np.sum, groups), torch.float64)
    assert_matches(out["mean"], ref_reduce(X, np.mean, groups), torch.float64)
    assert_matches(out["max"], ref_reduce(X, np.max, groups), torch.float64)
    assert_matches(out["min"], ref_reduce(X, np.min, groups), torch.float64)
    assert_matches(out["imean"], ref_reduce(Xi.astype(np.float32), np.mean, groups), torch.float32)
    sizes = {m: len(g) for g in groups for m in g}
    assert np_of(out["count"]).tolist() == [sizes[m] for m in range(k)]
    assert_matches(out["tree"]["a"], ref_reduce(X, np.sum, groups), torch.float64)
    assert_matches(out["tree"]["b"], ref_reduce(Xi, np.sum, groups), torch.int64)


def test_reductions_with_unequal_groups_compile_and_differentiate():
    groups = [[0, 1, 2], [3]]
    x = sample(4, (3,), torch.float64).requires_grad_()

    def f(v):
        return tp.pmean(v * v, "i", axis_index_groups=groups)

    eager = pmap_k(f, 4)(x)
    compiled = pmap_k(f, 4, compile=dict(backend="aot_eager", fullgraph=True))(x)
    torch.testing.assert_close(compiled.unshard(), eager.unshard())
    (grad,) = torch.autograd.grad(eager.sum(), x)
    # d/dx_m of sum over replicas of the group mean: every member's output depends on x_m
    sizes = torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(grad, 2 * x.detach() * sizes / sizes)


# -- pytrees: every leaf checked, dict keys sorted as in JAX ---------------------------------
def test_dict_insertion_order_does_not_pair_leaves_crosswise():
    """JAX flattens dicts in sorted key order, so replicas agree whatever order
    they built their dicts in; results keep each replica's own order."""

    def f(v):
        if int(tp.axis_index("i")) % 2 == 0:
            tree = {"a": v, "b": v * 100}
        else:
            tree = {"b": v * 100, "a": v}
        s, g, p = tp.psum(tree, "i"), tp.all_gather(tree, "i"), tp.ppermute(tree, "i", [(0, 1), (1, 0), (2, 3), (3, 2)])
        assert list(s) == list(tree) == list(g) == list(p)  # the replica's own order
        return s, g, p

    x = torch.ones(4, 2)
    s, g, p = pmap_k(f, 4)(x)
    assert s["a"].unshard().eq(4).all() and s["b"].unshard().eq(400).all()
    assert g["a"].unshard().eq(1).all() and g["b"].unshard().eq(100).all()
    assert p["a"].unshard().eq(1).all() and p["b"].unshard().eq(100).all()


def test_outputs_that_differ_only_in_dict_order_are_one_structure():
    def f(v):
        if int(tp.axis_index("i")) % 2:
            return {"b": v, "n": {"y": [v * 3], "x": v * 2}}
        return {"n": {"x": v * 2, "y": [v * 3]}, "b": v}

    out = pmap_k(f, 2)(torch.ones(2, 1))
    assert list(out) == ["n", "b"] and list(out["n"]) == ["x", "y"]  # replica 0's order
    assert out["n"]["x"].unshard().eq(2).all() and out["n"]["y"][0].unshard().eq(3).all()
    with pytest.raises(ValueError, match="different output structures"):
        pmap_k(lambda v: {"a": v} if int(tp.axis_index("i")) else {"b": v}, 2)(torch.ones(2, 1))


@pytest.mark.parametrize(
    "trees",
    [
        ({"w": (2, 3)}, {"w": (3, 2)}),  # same size, different shapes
        ({"w": (2, 3), "b": (4,)}, {"w": (3, 2), "b": (4,)}),  # the same, in one flat buffer
        ({"w": (6,)}, {"w": (2, 3)}),
        ({"a": (2,), "b": (2,)}, {"a": (2,), "c": (2,)}),  # different keys
        ({"a": (2,), "b": (2,)}, {"a": (4,)}),  # different leaf counts, same total size
        ({"a": (2,)}, ((2,),)),  # different containers
    ],
    ids=["shapes", "shapes in a bucket", "rank", "keys", "leaf count", "container"],
)
@pytest.mark.parametrize("op", ["psum", "pmax", "all_gather", "ppermute"])
@pytest.mark.timing
def test_pytree_collectives_check_the_whole_tree(trees, op):
    import torch.utils._pytree as pytree

    def f(v):
        spec = trees[int(tp.axis_index("i")) % 2]
        tree = pytree.tree_map(
            lambda shape: v.new_ones(shape),
            spec,
            is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s),
        )
        if op == "ppermute":
            return tp.ppermute(tree, "i", [(0, 1), (1, 0)])
        return getattr(tp, op)(tree, "i")

    err, seconds = expect_error(pmap_k(f, 2), torch.ones(2, 1), kind=tp.CollectiveMismatchError)
    assert seconds < 3.0  # not the collective timeout; a captured executor first tries (and fails) a capture
    assert "replica 0" in str(err) and "replica 1" in str(err)


@pytest.mark.parametrize(
    "dtypes",
    [
        ({"w": torch.float32}, {"w": torch.float64}),
        ({"a": torch.float32, "b": torch.float64}, {"a": torch.float64, "b": torch.float32}),  # swapped buckets
    ],
    ids=["leaf", "swapped"],
)
@pytest.mark.parametrize("op", ["psum", "all_gather"])
def test_pytree_collectives_check_leaf_dtypes(dtypes, op):
    def f(v):
        tree = {k: v.new_ones(2, dtype=dt) for k, dt in dtypes[int(tp.axis_index("i")) % 2].items()}
        return getattr(tp, op)(tree, "i")

    err, _ = expect_error(pmap_k(f, 2), torch.ones(2, 1), kind=tp.CollectiveMismatchError)
    assert "replica 0" in str(err) and "replica 1" in str(err)


def test_pytree_checks_hold_after_the_tree_was_seen():
    """The per-structure cache (hashed by size only) never stands in for a
    check: a structure of the same size as a cached one gets its own leaf
    order, and leaf shapes that change between collectives fail."""

    def same_size(v):
        r = int(tp.axis_index("i"))
        tp.psum({"a": {"x": v, "y": v}, "b": v}, "i")  # cached; type, node and leaf counts as below
        return tp.psum({"a": v, "b": {"y": v * 3, "x": v * 2}} if r else {"a": v, "b": {"x": v * 2, "y": v * 3}}, "i")

    s = pmap_k(same_size, 2)(torch.ones(2, 1))
    assert s["b"]["x"].unshard().eq(4).all() and s["b"]["y"].unshard().eq(6).all()

    def new_shape(v):
        tp.psum({"w": v.new_ones(2, 3)}, "i")
        return tp.psum({"w": v.new_ones((2, 3) if int(tp.axis_index("i")) else (3, 2))}, "i")

    err, _ = expect_error(pmap_k(new_shape, 2), torch.ones(2, 1), kind=tp.CollectiveMismatchError)
    assert "[2, 3]" in str(err) and "[3, 2]" in str(err)


# -- all_gather -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", K_AND_GROUPS, ids=_ids)
@pytest.mark.parametrize("tiled", [False, True], ids=["stacked", "tiled"])
def test_all_gather_matches_numpy(case, tiled):
    k, groups = case
    axes = [0, 1, -1, -2] if tiled else [0, 1, 2, -1, -3]
    tree = [sample(k, (2, 3), torch.float32), (sample(k, (2, 3), torch.int64), sample(k, (2, 3), torch.bool))]

    def f(t):
        return [tp.all_gather(t, "i", axis_index_groups=groups, axis=a, tiled=tiled) for a in axes]

    outs = pmap_k(f, k)(tree)
    assert len(outs) == len(axes)
    for a, out in zip(axes, outs):
        leaves_in = [tree[0], tree[1][0], tree[1][1]]
        leaves_out = [out[0], out[1][0], out[1][1]]
        for x, y in zip(leaves_in, leaves_out):
            expected = ref_all_gather(np_of(x), groups, a, tiled)
            assert_matches(y, expected, x.dtype)


@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_all_gather_complex_and_scalar(k):
    z = sample(k, (3,), torch.complex128)
    s = sample(k, (), torch.float64)
    gz, gs = pmap_k(lambda a, b: (tp.all_gather(a, "i"), tp.all_gather(b, ("i",))), k)(z, s)
    assert_matches(gz, ref_all_gather(np_of(z), None, 0, False), torch.complex128)
    assert_matches(gs, ref_all_gather(np_of(s), None, 0, False), torch.float64)


# -- psum_scatter ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", K_AND_GROUPS, ids=_ids)
@pytest.mark.parametrize("tiled", [False, True], ids=["untiled", "tiled"])
def test_psum_scatter_matches_numpy(case, tiled):
    k, groups = case
    g = len(members(k, groups)[0])
    # the scattered dimension: the group size (untiled) or twice it (tiled)
    n = 2 * g if tiled else g
    cases = [((n, 3), 0), ((3, n), 1), ((3, n), -1), ((2, n, 3), -2)]
    dtypes = [torch.float64, torch.int32, torch.complex64]
    xs = [[sample(k, shape, dt) for dt in dtypes] for shape, _ in cases]

    def f(xs):
        return [
            tp.psum_scatter(x, "i", scatter_dimension=d, axis_index_groups=groups, tiled=tiled)
            for x, (_, d) in zip(xs, cases)
        ]

    outs = pmap_k(f, k)(xs)
    for (_, d), leaves, out in zip(cases, xs, outs):
        assert isinstance(out, list) and len(out) == len(dtypes)
        for x, y in zip(leaves, out):
            expected = ref_psum_scatter(np_of(x), groups, d, tiled).astype(np_of(x).dtype)
            assert_matches(y, expected, x.dtype)


@pytest.mark.parametrize("dim, layout", [(1, "contiguous"), (1, "transposed"), (0, "transposed"), (1, "gappy")])
def test_psum_scatter_results_are_contiguous_as_its_fake_kernel_says(dim, layout):
    """A tiled scatter along another dimension than 0 returned a strided block, while the
    fake kernel (what compiled code is built for) says contiguous: Inductor asserted."""
    make = {
        "contiguous": lambda x: x,
        "transposed": lambda x: x.transpose(0, 1),
        "gappy": lambda x: x[:, ::2],
    }[layout]

    def f(x):
        out = tp.psum_scatter(make(x * 1), "i", scatter_dimension=dim, tiled=True)
        return torch.tensor(out.is_contiguous())

    shape = (4, 8, 4) if layout == "transposed" else (4, 4, 8)
    assert pmap_k(f, 4)(torch.randn(shape)).unshard().all()


def test_psum_scatter_of_bools_counts():
    x = torch.tensor([[True, False], [True, True]])
    out = pmap_k(lambda v: tp.psum_scatter(v, "i"), 2)(x)
    assert out.dtype == torch.int64
    assert out.unshard().tolist() == [2, 1]


# -- all_to_all and pswapaxes ---------------------------------------------------------------
@pytest.mark.parametrize("case", K_AND_GROUPS, ids=_ids)
@pytest.mark.parametrize("tiled", [False, True], ids=["untiled", "tiled"])
def test_all_to_all_matches_numpy(case, tiled):
    k, groups = case
    g = len(members(k, groups)[0])
    n = 2 * g if tiled else g
    # (per-replica shape, split_axis, concat_axis)
    cases = [((n, 3), 0, 0), ((n, 3), 0, 1), ((3, n), 1, 0), ((3, n), -1, -2), ((2, n, 4), 1, -1), ((n, 2, 5), 0, 2)]
    xs = [(sample(k, shape, torch.float32), sample(k, shape, torch.int16)) for shape, _, _ in cases]

    def f(xs):
        return [tp.all_to_all(x, "i", s, c, axis_index_groups=groups, tiled=tiled) for x, (_, s, c) in zip(xs, cases)]

    outs = pmap_k(f, k)(xs)
    for (_, s, c), pair, out in zip(cases, xs, outs):
        assert isinstance(out, tuple)
        for x, y in zip(pair, out):
            expected = ref_all_to_all(np_of(x), groups, s, c, tiled)
            assert_matches(y, expected, x.dtype)


@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_all_to_all_untiled_shape_rule(k):
    """jax: the output shape is np.insert(np.delete(x.shape, split_axis), concat_axis, axis_size)."""
    x = sample(k, (3, k, 5), torch.float32)
    y = pmap_k(lambda v: tp.all_to_all(v, "i", 1, 0), k)(x)
    assert tuple(y.shards[0].shape) == tuple(np.insert(np.delete([3, k, 5], 1), 0, k))


@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_pswapaxes_swaps_the_mapped_axis(k):
    """pswapaxes(x, 'i', axis) swaps the device axis with a positional one."""
    x = sample(k, (3, k), torch.float64)
    X = np_of(x)
    for axis in (1, -1):
        y = pmap_k(lambda v, axis=axis: tp.pswapaxes(v, "i", axis), k)(x)
        np.testing.assert_array_equal(np_of(y), np.swapaxes(X, 0, 2))
    x0 = sample(k, (k, 2), torch.float32)
    y0 = pmap_k(lambda v: tp.pswapaxes(v, ("i",), 0), k)(x0)
    np.testing.assert_array_equal(np_of(y0), np.swapaxes(np_of(x0), 0, 1))


def test_argument_errors_name_the_collective_called():
    """pswapaxes forwards to all_to_all, whose message named split_axis; the axis-name
    check named no function."""
    x = sample(2, (3,), torch.float32)
    with pytest.raises(ValueError, match=r"pswapaxes: axis=5 is out of range"):
        pmap_k(lambda v: tp.pswapaxes(v, "i", 5), 2)(x)
    for fn in (tp.psum, tp.all_gather, tp.axis_index):
        name = fn.__name__
        with pytest.raises(TypeError, match=f"{name}: axis_name must be a non-empty string or a tuple of them, got 3"):
            pmap_k(lambda v, fn=fn: fn(v, 3) if fn is not tp.axis_index else v * fn(3), 2)(x)


def test_pswapaxes_with_groups():
    x = sample(4, (2, 5), torch.float32)
    groups = [[0, 2], [3, 1]]
    y = pmap_k(lambda v: tp.pswapaxes(v, "i", 0, axis_index_groups=groups), 4)(x)
    assert_matches(y, ref_all_to_all(np_of(x), groups, 0, 0, False), torch.float32)


# -- ppermute and pshuffle ------------------------------------------------------------------
def _perms(k):
    ring = [(i, (i + 1) % k) for i in range(k)]
    perms = [ring, [(d, s) for s, d in ring], [(i, i) for i in range(k)]]
    if k > 1:
        perms += [[(0, k - 1)], [(i, i + 1) for i in range(k - 1)], []]  # partial: zeros elsewhere
    if k >= 4:
        perms += [[(i, i ^ 1) for i in range(k)], [(3, 0), (0, 2)]]
    return perms


@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_ppermute_matches_numpy(k):
    perms = _perms(k)
    tree = {
        "f": sample(k, (2, 3), torch.float32),
        "b": sample(k, (4,), torch.bool),
        "z": sample(k, (), torch.complex64),
        "i": sample(k, (1, 2), torch.int8),
    }

    def f(t):
        return [tp.ppermute(t, "i", perm) for perm in perms]

    outs = pmap_k(f, k)(tree)
    for perm, out in zip(perms, outs):
        assert set(out) == set(tree)
        for name, x in tree.items():
            assert_matches(out[name], ref_ppermute(np_of(x), perm), x.dtype)


def test_ppermute_accepts_tuple_axis_name_and_numpy_pairs():
    x = torch.arange(4.0)
    perm = np.array([[0, 1], [1, 2], [2, 3], [3, 0]])
    out = pmap_k(lambda v: tp.ppermute(v, ("i",), perm), 4)(x)
    assert out.unshard().tolist() == [3.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("perm", [[(0.5, 1)], [(0, 1.0)], "ab"])
def test_ppermute_refuses_pairs_that_are_not_integers(perm):
    with pytest.raises(ValueError, match="pairs of integers"):  # 0.5 was taken as 0
        pmap_k(lambda v: tp.ppermute(v, "i", perm), 4)(torch.arange(4.0))


@pytest.mark.parametrize("perm", [3, [0, 1, 2, 3.0], [1, 0, 3, 2, 4]])
def test_pshuffle_refuses_what_is_not_a_permutation(perm):
    with pytest.raises(ValueError, match=r"perm must be a permutation of range\(4\)"):
        pmap_k(lambda v: tp.pshuffle(v, "i", perm), 4)(torch.arange(4.0))


def test_pshuffle_names_itself_in_its_errors():
    err, _ = expect_error(pmap_k(lambda x: tp.pshuffle(3, "i", [1, 0]), 2), torch.zeros(2), kind=TypeError)
    assert str(err).startswith("pshuffle: expected tensors")


@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_pshuffle_takes_from_perm_i(k):
    perm = list(np.random.default_rng(k).permutation(k))
    x = sample(k, (3,), torch.float64)
    y = pmap_k(lambda v: tp.pshuffle(v, "i", perm), k)(x)
    np.testing.assert_array_equal(np_of(y), np_of(x)[perm])


def test_ppermute_results_are_fresh_tensors():
    """The identity pair still hands back a copy: in-place updates stay local."""

    def f(x):
        y = tp.ppermute(x, "i", [(0, 0), (1, 1)])
        y.mul_(10)
        return x, y

    x, y = pmap_k(f, 2)(torch.ones(2, 2))
    assert x.unshard().tolist() == [[1, 1], [1, 1]]
    assert y.unshard().tolist() == [[10, 10], [10, 10]]


def test_none_in_a_pytree_is_an_empty_subtree():
    """As in JAX, None holds no data: every collective passes it through."""
    fns = [
        lambda t: tp.psum(t, "i"),
        lambda t: tp.pmean(t, "i"),
        lambda t: tp.pmax(t, "i"),
        lambda t: tp.pmin(t, "i"),
        lambda t: tp.all_gather(t, "i", tiled=True),
        lambda t: tp.psum_scatter(t, "i", tiled=True),
        lambda t: tp.ppermute(t, "i", [(0, 1)]),
        lambda t: tp.pshuffle(t, "i", [1, 0]),
        lambda t: tp.all_to_all(t, "i", 0, 0, tiled=True),
        lambda t: tp.pswapaxes(t, "i", 0),
    ]

    def f(x):
        outs = [fn({"x": x, "none": None, "nested": (None, x)}) for fn in fns]
        assert all(o["none"] is None and o["nested"][0] is None for o in outs)
        return [o["x"] for o in outs]

    x = sample(2, (2, 2), torch.float32)
    outs = pmap_k(f, 2)(x)
    assert_matches(outs[0], ref_reduce(np_of(x), np.sum, None), torch.float32)
    assert_matches(outs[6], ref_ppermute(np_of(x), [(0, 1)]), torch.float32)


# -- axis_index / axis_size -----------------------------------------------------------------
@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_axis_index_and_size(k):
    def f(x):
        i, j = tp.axis_index("i"), tp.axis_index(("i",))
        return i, j, x * 0 + tp.axis_size("i"), x * 0 + tp.axis_size(("i",))

    i, j, n, m = pmap_k(f, k)(torch.zeros(k))
    assert i.dtype == torch.int64 and i.shards[0].ndim == 0
    assert i.unshard().tolist() == list(range(k)) and j.unshard().tolist() == list(range(k))
    assert n.unshard().tolist() == [k] * k and m.unshard().tolist() == [k] * k


def test_axis_index_follows_device_order():
    """The index is the position along the mapped axis, not the device number."""
    devs = [devices(8)[d] for d in (5, 2, 7)]
    out = tp.pmap(lambda x: tp.axis_index("i") * 10 + tp.psum(x, "i"), "i", devices=devs)(
        torch.ones(3, dtype=torch.int64)
    )
    assert out.unshard().tolist() == [3, 13, 23]


def test_collectives_over_reordered_devices():
    """Collectives follow axis positions whatever the devices are."""
    devs = [devices(7)[d] for d in (6, 1, 4, 3)]
    x = sample(4, (4,), torch.float32)
    y = tp.pmap(lambda v: (tp.all_gather(v, "i"), tp.ppermute(v, "i", [(0, 3), (3, 0)])), "i", devices=devs)(x)
    assert_matches(y[0], ref_all_gather(np_of(x), None, 0, False), torch.float32)
    assert_matches(y[1], ref_ppermute(np_of(x), [(0, 3), (3, 0)]), torch.float32)


def test_many_collectives_in_sequence_stay_in_step():
    """A few hundred rendezvous in a row, interleaving kinds, all right."""

    def f(x):
        acc = x
        for step in range(50):
            acc = tp.pmean(acc, "i") + tp.ppermute(x, "i", [(r, (r + step) % 4) for r in range(4)])
            acc = tp.all_gather(acc, "i")[step % 4]
        return acc

    x = sample(4, (3,), torch.float64)
    X = np_of(x)
    acc = X.copy()
    for step in range(50):
        acc = acc.mean(axis=0, keepdims=True) + ref_ppermute(X, [(r, (r + step) % 4) for r in range(4)])
        acc = np.broadcast_to(acc[step % 4], X.shape)
    np.testing.assert_allclose(np_of(pmap_k(f, 4)(x)), acc, rtol=1e-12)


# -- custom ops, fake implementations, torch.compile -----------------------------------------
def test_collectives_are_registered_custom_ops_with_fake_impls():
    ops = torch.ops.torchpmap
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.empty(4, 3, dtype=torch.float64))
        assert ops.all_reduce.default(x, "sum", "i", [], 4).shape == (4, 3)
        assert ops.all_gather.default(x, "i", [], 4).shape == (4, 4, 3)
        assert ops.all_gather.default(x, "i", [0, 1, 2, 3], 2).shape == (2, 4, 3)
        assert ops.reduce_scatter.default(x, "sum", "i", [], 4).shape == (3,)
        assert ops.all_to_all.default(x, "i", [], 4).shape == (4, 3)
        assert ops.permute.default(x, "i", [0, 1, 1, 0]).dtype == torch.float64
        assert ops.axis_index.default("i", torch.device("cpu")).dtype == torch.int64


def test_opcheck_each_op_inside_a_replica():
    """torch.library.opcheck: schema, autograd registration, fake tensor and
    AOT dispatch of every op (one replica, so the rendezvous is trivial)."""
    ops = torch.ops.torchpmap

    def f(x):
        x = x.detach().requires_grad_()
        cases = [
            (ops.all_reduce.default, (x, "sum", "i", [], 1)),
            (ops.all_gather.default, (x, "i", [], 1)),
            (ops.reduce_scatter.default, (x[None], "sum", "i", [], 1)),
            (ops.all_to_all.default, (x[None], "i", [], 1)),
            (ops.permute.default, (x, "i", [0, 0])),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args)
        return x.detach()

    pmap_k(f, 1)(torch.randn(1, 3, dtype=torch.float64))


class _GraphRecorder:
    """A torch.compile backend that records the graphs it gets and runs them."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def torchpmap_ops(self):
        return {
            str(n.target).split(".")[1]
            for gm in self.graphs
            for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("torchpmap.")
        }


def _uses_every_collective(x, y):
    n = tp.axis_size("i")
    idx = tp.axis_index("i")
    a = tp.psum(x, "i") + tp.pmean(x, ("i",)) - tp.pmax(x, "i") * tp.pmin(x, "i")
    b = tp.all_gather(x, "i", axis=-1, tiled=True)
    c = tp.psum_scatter(y, "i", scatter_dimension=0)
    d = tp.all_to_all(y, "i", 0, 1)
    e = tp.ppermute(x, "i", [(r, (r + 1) % n) for r in range(n)]) + tp.pshuffle(x, "i", list(reversed(range(n))))
    groups = tp.psum(x, "i", axis_index_groups=[[0, 1], [2, 3]])
    return {"a": a + idx, "b": b, "c": c, "d": d, "e": e, "g": groups, "t": tp.pswapaxes(y, "i", -2)}


@pytest.mark.threads_only  # the stacked executor's backend gets the batched graph, collectives lowered
def test_fullgraph_compile_traces_every_collective_without_graph_breaks():
    x = sample(4, (3,), torch.float32)
    y = sample(4, (4, 2), torch.float32)
    eager = pmap_k(_uses_every_collective, 4)(x, y)
    backend = _GraphRecorder()
    compiled_fn = pmap_k(_uses_every_collective, 4, compile=dict(backend=backend, fullgraph=True))
    for _ in range(2):  # the second call reuses the program
        compiled = compiled_fn(x, y)
    assert len(backend.graphs) == 1  # fullgraph: one graph, no break, no recompile
    assert backend.torchpmap_ops() == {
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "all_to_all",
        "permute",
        "axis_index",
    }
    for key in eager:
        torch.testing.assert_close(compiled[key].unshard(), eager[key].unshard())


def test_fullgraph_compile_with_axis_index_groups():
    groups = [[3, 1], [0, 2]]

    def f(x):
        kw = dict(axis_index_groups=groups)
        return (
            tp.pmean(x, "i", **kw),
            tp.all_gather(x, "i", axis=1, **kw),
            tp.psum_scatter(x, "i", scatter_dimension=1, tiled=True, **kw),
            tp.all_to_all(x, "i", 1, 0, tiled=True, **kw),
        )

    x = sample(4, (3, 4), torch.float64)
    out = pmap_k(f, 4, compile=dict(backend="eager", fullgraph=True))(x)
    X = np_of(x)
    assert_matches(out[0], ref_reduce(X, np.mean, groups), torch.float64)
    assert_matches(out[1], ref_all_gather(X, groups, 1, False), torch.float64)
    assert_matches(out[2], ref_psum_scatter(X, groups, 1, True), torch.float64)
    assert_matches(out[3], ref_all_to_all(X, groups, 1, 0, True), torch.float64)


def test_compiled_collectives_on_other_axis_sizes_are_right():
    """A compiled program per axis size: indices and sizes are not baked in wrongly."""

    def f(x):
        return tp.all_gather(x, "i") * tp.axis_size("i") + tp.axis_index("i")

    pf = tp.pmap(f, "i", compile=dict(backend="eager", fullgraph=True))
    for k in (2, 4):
        x = sample(k, (2,), torch.float32)
        expected = ref_all_gather(np_of(x), None, 0, False) * k + np.arange(k)[:, None, None]
        np.testing.assert_allclose(np_of(pf(x)), expected, rtol=1e-6)


def test_compiled_backward_through_collectives():
    """aot_eager traces the custom ops' autograd rules into the compiled backward."""

    def f(x):
        return tp.all_gather(x * x, "i").sum(0) * tp.ppermute(x, "i", [(0, 1), (1, 0)])

    x = sample(2, (3,), torch.float64)
    grads = []
    for compile in (False, dict(backend="aot_eager", fullgraph=True)):
        xg = x.clone().requires_grad_()
        pmap_k(f, 2, compile=compile)(xg).unshard().sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0])
    # L = sum_r sum(G * x_{1-r}) with G = sum_j x_j^2: dL/dx_r = G + 2 x_r (x_0 + x_1)
    X = np_of(x)
    expected = (X**2).sum(0) + 2 * X * X.sum(0)
    np.testing.assert_allclose(grads[0].numpy(), expected, rtol=1e-12)


# -- performance sanity -----------------------------------------------------------------------
@pytest.mark.timing
def test_psum_latency_is_sane():
    """Not a benchmark: a psum of a (16,) tensor over 4 replicas takes well
    under a millisecond (typically ~0.2 ms on a 2-core CPU); fail only if it
    is pathologically slow (e.g. sleeping or polling in the rendezvous)."""
    reps = 200

    def f(x):
        for _ in range(reps):
            x = tp.psum(x, "i") * 0.25
        return x

    pf = pmap_k(f, 4)
    x = torch.randn(4, 16)
    pf(x)
    pf(x)  # the default executor captures the function on its second call
    t = time.perf_counter()
    out = pf(x)
    per_psum = (time.perf_counter() - t) / reps
    torch.testing.assert_close(out.unshard(), x.mean(0).expand(4, 16))
    assert per_psum < 0.01, f"{per_psum * 1e3:.2f} ms per psum"


# Each collective of a transposed (dense, non-contiguous) input: the fake kernel must
# give the strides the kernel gives (a new contiguous tensor). all_reduce's and
# permute's kept the input's strides, and compile=True on the threads failed Inductor's
# stride assert (found by a hunt).
FAKE_STRIDES = {
    "psum": lambda v: tp.psum(v, "i"),
    "pmean": lambda v: tp.pmean(v, "i"),
    "pmax": lambda v: tp.pmax(v, "i"),
    "pmin": lambda v: tp.pmin(v, "i"),
    "ppermute": lambda v: tp.ppermute(v, "i", [(0, 1), (1, 0)]),
    "pshuffle": lambda v: tp.pshuffle(v, "i", [1, 0, 3, 2]),
    "all_gather": lambda v: tp.all_gather(v, "i"),
    "all_gather_tiled": lambda v: tp.all_gather(v, "i", tiled=True, axis=1),
    "psum_scatter": lambda v: tp.psum_scatter(v, "i", scatter_dimension=1, tiled=True),
    "all_to_all": lambda v: tp.all_to_all(v, "i", 1, 0, tiled=True),
}


@pytest.mark.threads_only  # the kernels themselves, as each replica runs them
@pytest.mark.parametrize("name", sorted(FAKE_STRIDES))
def test_fake_kernels_give_the_kernels_strides(name):
    op = FAKE_STRIDES[name]

    def f(v):
        t = v.T
        real = op(t)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(mode.from_tensor(t))
        assert (fake.shape, fake.stride()) == (real.shape, real.stride())
        return real

    tp.pmap(f, "i", devices=devices(4))(rows(4, 8, 4))
