"""Gradients through the collectives.

Two views, as in the README:

* from outside a pmap call, the gradient of what the caller sees is the true
  gradient: ``torch.autograd.gradcheck`` compares it with finite differences;
* inside a replica (``loss.backward()`` / ``torch.autograd.grad`` in the mapped
  function) the collectives' backward rules are JAX's pmap transposes: psum of
  the cotangent for psum, psum_scatter and all_gather for each other, the
  inverse permutation for ppermute, the same exchange for all_to_all. Those
  tests compare with the values the rules give, worked out by hand in numpy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import pmap_k
from torch.autograd import gradcheck, gradgradcheck

import torchpmap as tp

DEVICE_COUNTS = [1, 2, 4, 8]


def rank_weight(x):
    """1, 2, 3, ... on replicas 0, 1, 2, ...: makes the replicas' functions differ."""
    return (tp.axis_index("i") + 1).to(x.dtype)


def pair_groups(k):
    """Pairs in a scrambled order ([[1, 0], [3, 2], ...]); None for one device."""
    return [[r + 1, r] for r in range(0, k, 2)] if k > 1 else None


def group_size(k, groups):
    return k if groups is None else len(groups[0])


def double(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# -- gradcheck through pmap ---------------------------------------------------------------
def _cases(k):
    """name -> (per-replica function, shape of the mapped input)."""
    groups = pair_groups(k)
    g = group_size(k, groups)
    ring = [(r, (r + 1) % k) for r in range(k)]
    partial = [(r, r + 1) for r in range(k - 1)]  # replica 0 receives zeros
    cases = {
        "psum": (lambda x: tp.psum(torch.sin(x) * rank_weight(x), "i"), (k, 3)),
        "psum_groups": (lambda x: tp.psum(x * x * rank_weight(x), "i", axis_index_groups=groups), (k, 3)),
        "pmean": (lambda x: tp.pmean(x**3, ("i",)) * rank_weight(x), (k, 2)),
        "all_gather": (lambda x: tp.all_gather(x * rank_weight(x), "i", axis=-1) ** 2, (k, 2)),
        "all_gather_tiled_groups": (
            lambda x: tp.all_gather(torch.exp(x), "i", axis=0, tiled=True, axis_index_groups=groups) * rank_weight(x),
            (k, 2, 2),
        ),
        "psum_scatter": (lambda x: tp.psum_scatter(x * rank_weight(x), "i") ** 2, (k, k, 2)),
        "psum_scatter_tiled": (
            lambda x: torch.tanh(tp.psum_scatter(x * x, "i", scatter_dimension=-1, tiled=True)) * rank_weight(x),
            (k, 2, 2 * k),
        ),
        "psum_scatter_groups": (
            lambda x: tp.psum_scatter(x * rank_weight(x), "i", axis_index_groups=groups) ** 2,
            (k, g, 2),
        ),
        "ppermute_ring": (lambda x: tp.ppermute(x * x, "i", ring) * rank_weight(x), (k, 3)),
        "ppermute_partial": (lambda x: tp.ppermute(torch.sin(x), "i", partial) * x, (k, 3)),
        "pshuffle": (lambda x: tp.pshuffle(x * rank_weight(x), "i", list(reversed(range(k)))) ** 2, (k, 2)),
        "all_to_all": (lambda x: tp.all_to_all(x * rank_weight(x), "i", 0, 1) ** 2, (k, k, 2)),
        "all_to_all_tiled": (
            lambda x: tp.all_to_all(x**2, "i", -1, 0, tiled=True) * rank_weight(x),
            (k, 2, 2 * k),
        ),
        "all_to_all_groups": (
            lambda x: tp.all_to_all(x * rank_weight(x), "i", 1, 0, axis_index_groups=groups) ** 2,
            (k, 2, g),
        ),
        "pswapaxes": (lambda x: tp.pswapaxes(torch.sin(x) * rank_weight(x), "i", -1), (k, 2, k)),
        "chain": (
            lambda x: tp.psum_scatter(tp.all_gather(tp.ppermute(x, "i", ring), "i") * x, "i", tiled=True),
            (k, 2),
        ),
    }
    if k > 2:
        unequal = [list(range(1, k)), [0]]  # groups of k - 1 and 1
        cases["psum_unequal_groups"] = (
            lambda x: tp.psum(x * x * rank_weight(x), "i", axis_index_groups=unequal),
            (k, 3),
        )
        cases["pmean_unequal_groups"] = (
            lambda x: tp.pmean(torch.sin(x), "i", axis_index_groups=unequal) * rank_weight(x),
            (k, 2),
        )
    return cases


GRADCHECK_CASES = [(k, name) for k in DEVICE_COUNTS for name in _cases(k)]


@pytest.mark.parametrize("k,name", GRADCHECK_CASES, ids=[f"{n}-k{k}" for k, n in GRADCHECK_CASES])
def test_gradcheck_through_pmap(k, name):
    f, shape = _cases(k)[name]
    x = double(*shape, seed=k).requires_grad_()
    # fast mode (random projections) keeps the 8-device cases quick
    assert gradcheck(lambda x: pmap_k(f, k)(x).unshard(), (x,), eps=1e-6, atol=1e-5, fast_mode=k == 8)


@pytest.mark.parametrize("k,name", GRADCHECK_CASES, ids=[f"{n}-k{k}" for k, n in GRADCHECK_CASES])
def test_gradgradcheck_through_pmap(k, name):
    """Second order from outside: the backward's collectives are differentiated
    in the replicas too (the transpose of the transpose)."""
    f, shape = _cases(k)[name]
    x = double(*shape, seed=k).requires_grad_()
    assert gradgradcheck(lambda x: pmap_k(f, k)(x).unshard(), (x,), eps=1e-6, atol=1e-5, fast_mode=k >= 4)


def test_gradcheck_pytree_of_inputs_and_outputs():
    def f(tree, scale):
        a, b = tree["a"], tree["b"]
        s = tp.psum(a * b.sum(), "i")
        return {"s": s * scale, "g": tp.all_gather(b, "i", tiled=True) * a.mean()}

    a, b, scale = double(4, 3, seed=1), double(4, 2, seed=2), double(3, seed=3)
    inputs = (a.requires_grad_(), b.requires_grad_(), scale.requires_grad_())

    def call(a, b, scale):
        out = pmap_k(f, 4, in_axes=(0, None))({"a": a, "b": b}, scale)
        return out["s"].unshard(), out["g"].unshard()

    assert gradcheck(call, inputs, eps=1e-6, atol=1e-5)


def test_gradients_do_not_depend_on_dict_insertion_order():
    """Replicas that build their dicts in different orders still pair leaves by
    key, forward and backward (JAX flattens dicts in sorted key order)."""

    def f(x, scrambled):
        a, b = torch.sin(x), x * x * rank_weight(x)
        tree = {"b": b, "a": a} if scrambled and int(tp.axis_index("i")) % 2 else {"a": a, "b": b}
        s, g = tp.psum(tree, "i"), tp.all_gather(tree, "i")
        p = tp.ppermute(tree, "i", [(r, (r + 1) % 4) for r in range(4)])
        return s["a"] * 2 + s["b"] + g["a"].sum(0) * g["b"].sum(0) + p["a"] * p["b"]

    x = double(4, 3, seed=6).requires_grad_()
    pf = pmap_k(f, 4, static_broadcasted_argnums=1)
    out = pf(x, True).unshard()
    (grad,) = torch.autograd.grad(out.sum(), x)
    ref = pf(x, False).unshard()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.sum(), x)[0])
    assert gradcheck(lambda x: pf(x, True).unshard(), (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_out_axes_none_counts_once():
    """The README's data-parallel loss: an out_axes=None output counts once."""

    def f(x, w):
        return tp.pmean(((x @ w) ** 2).sum(), "i")

    x, w = double(4, 3, 2, seed=4), double(2, 5, seed=5).requires_grad_()
    pf = pmap_k(f, 4, in_axes=(0, None), out_axes=None)
    assert gradcheck(lambda w: pf(x, w), (w,), eps=1e-6, atol=1e-5)
    assert gradgradcheck(lambda w: pf(x, w), (w,), eps=1e-6, atol=1e-5)
    loss = pf(x, w)
    loss.backward()
    w_ref = w.detach().clone().requires_grad_()
    ((x @ w_ref) ** 2).sum(dim=(1, 2)).mean().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_gradient_for_a_tensor_captured_by_the_pmapped_function():
    w = double(3, seed=1).requires_grad_()
    x = double(4, 3, seed=2)
    y = pmap_k(lambda v: tp.psum(v * w, "i"), 4)(x)
    y.unshard().sum().backward()
    torch.testing.assert_close(w.grad, 4 * x.sum(0))


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("executor", ["threads", "stacked"])
def test_gradient_for_a_computed_tensor_captured_by_the_pmapped_function(k, executor):
    # c has a history (c = w * 3): the call's backward stops at c, and the caller's runs
    # c's history once. It used to run it once per replica (a second time is an error),
    # and autograd.grad(out, c) found no path to c (None with allow_unused).
    # Closed over, c must be on the replicas' device (a GPU on the cuda platform).
    w = double(3, seed=1).to(tp.local_devices()[0].type).requires_grad_()
    c = w * 3
    x = double(k, 3, seed=2).to(w.device)
    tp.set_executor(executor)
    try:
        y = pmap_k(lambda v: tp.psum(v * c, "i") + c.sin(), k)(x).unshard().sum()
        (grad_c,) = torch.autograd.grad(y, c, retain_graph=True)
        y.backward()
    finally:
        tp.set_executor("threads")
    expected_c = k * x.sum(0) + k * c.detach().cos()
    torch.testing.assert_close(grad_c, expected_c)
    torch.testing.assert_close(w.grad, 3 * expected_c)


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_a_closed_over_tensor_and_one_computed_from_it_count_each_path_once(executor, create_graph):
    # w reaches the loss directly and through c = w + 1, both closed over. A replica's graph
    # used to run c's history too (the replicas are differentiated at w), and the caller's
    # backward ran it again from c's gradient: w's gradient counted the path through c twice
    # on the threads (silently, for histories that save no tensors; an error for others).
    w = double(3, seed=1).requires_grad_()
    c, d = w + 1, w * 3
    x = double(4, 3, seed=2)
    tp.set_executor(executor)
    try:
        f = pmap_k(lambda v: tp.psum((v * c).sum() + (v * d).sum() + (v * w).sum(), "i"), 4, out_axes=None)
        for _ in range(2):  # the default executor's first call runs on the threads, its second captures
            (gw,) = torch.autograd.grad(f(x), w, retain_graph=True, create_graph=create_graph)
    finally:
        tp.set_executor("threads")
    W = w.detach().clone().requires_grad_()
    (GW,) = torch.autograd.grad(((x * (W + 1)).sum() + (x * W * 3).sum() + (x * W).sum()), W)
    torch.testing.assert_close(gw.detach(), GW)


def test_compiled_replicas_with_a_closed_over_computed_tensor_run_eagerly_for_autograd():
    # Compiled, the replicas' graphs would run c's history too: they run eagerly, saying so.
    w = double(3, seed=1).requires_grad_()
    c = w + 1
    x = double(4, 3, seed=2)
    f = pmap_k(lambda v: tp.psum((v * c).sum() + (v * w).sum(), "i"), 4, out_axes=None, compile=dict(backend="eager"))
    with pytest.warns(RuntimeWarning, match="run eagerly"):
        (gw,) = torch.autograd.grad(f(x), w)
    torch.testing.assert_close(gw, 2 * x.sum(0))


def test_gradgradcheck_through_a_computed_tensor_captured_by_the_pmapped_function():
    w = double(3, seed=1).requires_grad_()

    def through_the_call(w):
        c = w.exp()
        return pmap_k(lambda v: tp.psum(v * c * c, "i"), 2)(double(2, 3, seed=2)).unshard()

    assert gradcheck(through_the_call, (w,))
    assert gradgradcheck(through_the_call, (w,))


def test_gradient_through_two_chained_pmap_calls():
    """The first call's ShardedTensor output feeds the second call shard by
    shard (no copy); the gradient flows back through both."""
    ring = [(r, (r + 1) % 4) for r in range(4)]

    def chain(x):
        y = pmap_k(lambda v: tp.psum(v * v * rank_weight(v), "i"), 4)(x)
        z = pmap_k(lambda v: tp.ppermute(torch.sin(v), "i", ring) * rank_weight(v), 4)(y)
        return z.unshard()

    assert gradcheck(chain, (double(4, 3).requires_grad_(),), eps=1e-6, atol=1e-5)
    assert gradgradcheck(chain, (double(4, 3).requires_grad_(),), eps=1e-6, atol=1e-5)


def test_backward_twice_with_retain_graph():
    x = double(4, 3).requires_grad_()
    y = pmap_k(lambda v: tp.psum(v * v, "i"), 4)(x).unshard().sum()
    (g1,) = torch.autograd.grad(y, x, retain_graph=True)
    (g2,) = torch.autograd.grad(y, x)
    torch.testing.assert_close(g1, 4 * 2 * x.detach())
    torch.testing.assert_close(g2, g1)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(y, x)


# -- pmax / pmin are not differentiable -----------------------------------------------------
@pytest.mark.parametrize("fn", [tp.pmax, tp.pmin], ids=["pmax", "pmin"])
def test_pmax_pmin_backward_raises_from_outside(fn):
    x = double(4, 3).requires_grad_()
    y = pmap_k(lambda v: fn(v * 2, "i"), 4)(x)  # the forward is fine
    torch.testing.assert_close(y.unshard()[0], 2 * (x.max(0).values if fn is tp.pmax else x.min(0).values))
    with pytest.raises(RuntimeError, match=rf"{fn.__name__} is not differentiable"):
        y.unshard().sum().backward()


@pytest.mark.parametrize("fn", [tp.pmax, tp.pmin], ids=["pmax", "pmin"])
def test_pmax_pmin_backward_raises_inside_replicas(fn):
    def f(x):
        x = x.detach().requires_grad_()
        return torch.autograd.grad(fn(x, "i").sum(), x)[0]

    with pytest.raises(RuntimeError, match=rf"{fn.__name__} is not differentiable") as info:
        pmap_k(f, 4)(double(4, 3))
    assert any("replica" in n for n in getattr(info.value, "__notes__", []))


def test_pmax_of_detached_value_is_fine_in_a_differentiated_function():
    def f(x):
        x = x.detach().requires_grad_()
        loss = (x / tp.pmax(x.detach().abs(), "i")).sum()
        return torch.autograd.grad(loss, x)[0]

    x = double(4, 3)
    g = pmap_k(f, 4)(x).unshard()
    torch.testing.assert_close(g, (1 / x.abs().max(0).values).expand(4, 3))


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
@pytest.mark.parametrize("fn", [tp.psum, tp.pmean], ids=["psum", "pmean"])
def test_tree_reduction_leaves_untracked_leaves_untracked(fn, executor):
    """A tree reduction sends leaves of one dtype as one flat buffer: a leaf that
    does not require grad must not come back requiring it because another did
    (each executor as a leaf alone would)."""
    tp.set_executor(executor)
    a, b = double(4, 3, seed=1).requires_grad_(), double(4, 3, seed=2)
    out = pmap_k(lambda t: fn(t, "i"), 4)({"a": a, "b": b})
    assert out["a"].requires_grad and not out["b"].requires_grad
    scale = 1.0 if fn is tp.psum else 0.25
    torch.testing.assert_close(out["b"].unshard(), scale * b.sum(0).expand(4, 3))
    out["a"].unshard().sum().backward()
    torch.testing.assert_close(a.grad, torch.full_like(a, 4 * scale))


def test_replicas_may_differ_in_which_leaves_of_a_tree_autograd_tracks():
    # Each replica sends one flat buffer per dtype, whatever autograd tracks: bucketing tracked
    # and untracked leaves apart made replicas send buffers of other sizes (review). A leaf is
    # detached only where no replica tracks it.
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)

    def f(x):
        a = x * w
        b = x * w if x.sum() > 0 else x * 2  # tracked in replica 0 only
        return tp.psum((a, b), "i")

    x = torch.tensor([[1.0, 1, 1], [-1, -1, -1]], dtype=torch.float64)
    a, b = pmap_k(f, 2)(x)
    torch.testing.assert_close(a.unshard(), torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(b.unshard(), torch.full((2, 3), -1.0, dtype=torch.float64))
    assert a.requires_grad and b.requires_grad  # b: replica 1's sum depends on replica 0's w
    # Every replica's b is the sum with replica 0's x * w, so the loss holds it twice: JAX's rule
    # gives 2 * x0 (replica 1's untracked piece was detached: 1 * x0, silently; review).
    (a.unshard().sum() + b.unshard().sum()).backward()
    torch.testing.assert_close(w.grad, torch.full((3,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
def test_tree_reduction_with_a_tracked_leaf_in_a_function_closing_over_a_computed_tensor(executor):
    # Closing over a computed tensor runs the replicas with stand-ins for it, whose collectives
    # go through an autograd Function: the tree's exchange of the tracked mask, which carries
    # no tree tags, raised "not enough values to unpack" there (fuzzing).
    tp.set_executor(executor)
    c = torch.ones(4, dtype=torch.float64, requires_grad=True)
    C = c * 1.5

    def f(x):
        return tp.psum({"a": x * C, "b": x.sum()}, "i")["a"]

    x = torch.arange(8.0, dtype=torch.float64).reshape(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # lockstep falls back for autograd
        out = pmap_k(f, 2)(x)
    torch.testing.assert_close(out.unshard(), (x.sum(0) * 1.5).expand(2, 4))
    (g,) = torch.autograd.grad(out.unshard().sum(), c)
    torch.testing.assert_close(g, 2 * 1.5 * x.sum(0))


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
@pytest.mark.parametrize("fn", [tp.psum, tp.pmean], ids=["psum", "pmean"])
def test_tree_reduction_inside_nested_grads_keeps_the_outer_levels_path(fn, executor):
    """Under torch.func.grad of a torch.func.grad, a leaf the inner level does not
    track (requires_grad False there) still depends on the outer level's input:
    the tree's flat buffer detached it, so the mixed derivative came back zero on
    the threads executor (found by a hunt)."""
    tp.set_executor(executor)
    x, y = double(4, 3, seed=1), double(4, 3, seed=2)

    def loss(a, b):
        s = fn({"a": a**2, "b": b**2}, "i")
        return (s["a"] * s["b"]).sum()

    def mixed(a, b):  # d/da of sum(d/db loss)
        return torch.func.grad(lambda a_: torch.func.grad(loss, argnums=1)(a_, b).sum())(a)

    scale = 1.0 if fn is tp.psum else 1 / 16  # each replica's loss holds two means
    # Each replica's cotangent comes back summed over the 4 replicas (JAX's psum transpose).
    expected = scale * 4 * 2 * (2 * y.sum(0)) * x
    torch.testing.assert_close(pmap_k(mixed, 4)(x, y).unshard(), expected)


# -- gradients inside replicas: JAX's rules -------------------------------------------------
def _inside(loss_fn, k, x, how, **kwargs):
    """Per replica: the gradient of loss_fn(x) with respect to its own x."""

    def f(x):
        x = x.detach().requires_grad_()
        loss = loss_fn(x)
        if how == "backward":
            loss.backward()
            return x.grad
        return torch.autograd.grad(loss, x)[0]

    return pmap_k(f, k, **kwargs)(x).unshard().cpu().numpy()


HOW = ["backward", "autograd.grad"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_psum_inside_gradient_is_axis_size_times_local(k, how):
    """jax issue #3970: d psum(f(x)) / dx on a replica is axis_size * f'(x)."""
    x = double(k, 3)
    got = _inside(lambda v: tp.psum((v**3).sum(), "i"), k, x, how)
    np.testing.assert_allclose(got, k * 3 * x.numpy() ** 2, rtol=1e-12)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("k", [2, 4, 8])
def test_psum_with_groups_inside_gradient_is_group_size_times_local(k, how):
    groups = [[r for r in range(k) if r % 2 == p] for p in (1, 0)]  # odds, evens
    x = double(k, 3)
    got = _inside(lambda v: tp.psum(torch.sin(v).sum(), "i", axis_index_groups=groups), k, x, how)
    np.testing.assert_allclose(got, (k // 2) * np.cos(x.numpy()), rtol=1e-12)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_pmean_inside_gradient_is_local(k, how):
    x = double(k, 3)
    got = _inside(lambda v: tp.pmean((v**2 * rank_weight(v)).sum(), "i"), k, x, how)
    np.testing.assert_allclose(got, 2 * x.numpy() * np.arange(1, k + 1)[:, None], rtol=1e-12)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_data_parallel_training_step(k):
    """The usual recipe: local grads of pmean(loss), then pmean(grads): the
    full-batch gradient, the same on every replica."""
    xs, w = double(k, 5, 3, seed=1), double(3, seed=2)

    def step(x, w):
        w = w.detach().requires_grad_()
        loss = tp.pmean(((x @ w - 1) ** 2).mean(), "i")
        (g,) = torch.autograd.grad(loss, w)
        return tp.pmean(g, "i"), loss.detach()

    g, loss = pmap_k(step, k, in_axes=(0, None))(xs, w)
    w_ref = w.clone().requires_grad_()
    ref_loss = ((xs @ w_ref - 1) ** 2).mean(dim=(1,)).mean()
    ref_loss.backward()
    for r in range(k):
        torch.testing.assert_close(g.shards[r], w_ref.grad)
        torch.testing.assert_close(loss.shards[r], ref_loss.detach())


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_all_gather_inside_gradient_is_psum_scatter_of_cotangent(k, how, tiled):
    base = double(k, 2, seed=7).numpy()  # cotangent rows, scaled by (q + 1) on replica q
    x = double(k, 2)
    b = torch.from_numpy(base)

    def loss(v):
        gathered = tp.all_gather(v, "i", tiled=tiled)  # (k, 2) or (2k,)
        c = (b if not tiled else b.reshape(-1)).to(v.device)
        return (gathered * c * rank_weight(v)).sum()

    got = _inside(loss, k, x, how)
    # replica q's cotangent for row r is (q + 1) * base[r]; psum_scatter sums
    # them over q and hands row r to replica r.
    np.testing.assert_allclose(got, base * sum(range(1, k + 1)), rtol=1e-12)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("k", [2, 4, 8])
def test_all_gather_groups_inside_gradient(k, how):
    groups = [[k - 1 - r for r in range(k) if r % 2 == p] for p in (0, 1)]
    g = k // 2
    x = double(k, 2)
    weights = double(g, 2, seed=9)

    def loss(v):
        return (tp.all_gather(v, "i", axis_index_groups=groups) * weights * rank_weight(v)).sum()

    got = _inside(loss, k, x, how)
    expected = np.zeros((k, 2))
    for grp in groups:
        for pos, r in enumerate(grp):
            expected[r] = weights[pos].numpy() * sum(q + 1 for q in grp)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_psum_scatter_inside_gradient_is_all_gather_of_cotangent(k, how):
    x = double(k, k, 3)
    c = double(k, 3, seed=11).numpy()  # replica r's cotangent for its block
    ct = torch.from_numpy(c)

    def loss(v):
        r = tp.axis_index("i")
        return (tp.psum_scatter(v, "i") * ct.to(v.device)[r]).sum()

    got = _inside(loss, k, x, how)
    # every replica's x[r] contributes to replica r's block: its gradient is c[r]
    np.testing.assert_allclose(got, np.broadcast_to(c, (k, k, 3)), rtol=1e-12)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("k", [2, 4, 8])
def test_ppermute_inside_gradient_goes_back_along_the_inverse(k, how):
    perm = [(r, (3 * r + 1) % k) for r in range(k) if r != 1]  # replica 1 sends nothing
    c = double(k, 3, seed=3).numpy()
    ct = torch.from_numpy(c)

    def loss(v):
        return (tp.ppermute(v * v, "i", perm) * ct[tp.axis_index("i")]).sum()

    x = double(k, 3)
    got = _inside(loss, k, x, how)
    expected = np.zeros((k, 3))
    for s, d in perm:
        expected[s] = 2 * x.numpy()[s] * c[d]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_all_to_all_inside_gradient_swaps_back(k, how):
    x = double(k, k, 2)
    c = double(k, 2, k, seed=5).numpy()  # replica m's cotangent, shape of its output
    ct = torch.from_numpy(c)

    def loss(v):
        # out_m[:, j] = x_j[m] (split axis 0, stacked at axis 1)
        return (tp.all_to_all(v, "i", 0, -1) * ct.to(v.device)[tp.axis_index("i")]).sum()

    got = _inside(loss, k, x, how)
    expected = np.empty((k, k, 2))
    for j in range(k):
        for m in range(k):
            expected[j, m] = c[m, :, j]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("k", [2, 4])
def test_all_to_all_tiled_with_groups_inside_gradient(k, how):
    groups = [[1, 0], [3, 2]] if k == 4 else [[1, 0]]
    x = double(k, 4, 3)
    c = double(k, 4, 3, seed=6).numpy()
    ct = torch.from_numpy(c)

    def loss(v):
        return (tp.all_to_all(v, "i", 0, 0, tiled=True, axis_index_groups=groups) * ct[tp.axis_index("i")]).sum()

    got = _inside(loss, k, x, how)
    # within a group of 2: out_m = concat(x_{g[0]}[block pos(m)], x_{g[1]}[block pos(m)])
    expected = np.empty((k, 4, 3))
    for grp in groups:
        for pj, j in enumerate(grp):
            for pm, m in enumerate(grp):
                expected[j, 2 * pm : 2 * pm + 2] = c[m, 2 * pj : 2 * pj + 2]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_second_order_inside_replica():
    """create_graph=True inside a replica: the backward rules are themselves
    differentiable collectives, so gradients of gradients follow the same rules."""

    def f(x):
        x = x.detach().requires_grad_()
        loss = (tp.psum(x, "i") ** 2).sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)  # psum(2 psum(x)) = 2k psum(x)
        (h,) = torch.autograd.grad(g.sum(), x)  # 2k * psum(ones) = 2k^2
        return g.detach(), h

    x = double(4, 3)
    g, h = pmap_k(f, 4)(x)
    torch.testing.assert_close(g.unshard(), (8 * x.sum(0)).expand(4, 3))
    torch.testing.assert_close(h.unshard(), torch.full((4, 3), 32.0, dtype=torch.float64))


def test_torch_func_grad_through_collectives_inside_replicas():
    # The functional (JAX) idiom: torch.func.grad of a loss that communicates.
    x = double(4, 3, seed=5)

    def f(v):
        def loss(v):
            return (
                tp.psum((v**2).sum(), "i")
                + tp.all_gather(v, "i").sum()
                + tp.ppermute(v, "i", [(0, 1), (1, 2), (2, 3), (3, 0)]).sum()
            )

        return torch.func.grad(loss)(v)

    got = tp.pmap(f, "i")(x).unshard()
    # psum: 4 * 2v; all_gather: psum_scatter of ones = 4; ppermute: ones come back.
    torch.testing.assert_close(got, 8 * x + 4 + 1)
