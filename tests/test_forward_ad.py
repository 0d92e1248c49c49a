"""Forward-mode AD (torch.func.jvp, jacfwd, hessian, forward_ad.dual_level) inside replicas.

PyTorch's forward-AD levels are process-wide: replicas on worker threads that
entered them at once took each other's level (zero tangents, "no level exists",
"Nested forward mode AD is not supported"). They now enter one at a time."""

import contextlib

import pytest
import torch
from helpers import expect_error, pmap_k
from torch.autograd import forward_ad as fwAD

import torchpmap as tp
from torchpmap import _config

N, CALLS = 8, 25  # one call in three went wrong before: 25 calls of 8 replicas always showed it


def _x():
    return torch.linspace(-2, 2, N * 16, dtype=torch.float64).reshape(N, 16)


def _every_call_equals(f, want):
    x = _x()
    pf = pmap_k(f, N)
    for call in range(CALLS):
        torch.testing.assert_close(pf(x).unshard(), want(x), msg=f"call {call}")


def test_jvp_in_every_replica_gives_each_its_tangent():
    _every_call_equals(lambda r: torch.func.jvp(torch.sin, (r,), (torch.ones_like(r),))[1], torch.cos)


def test_dual_level_in_every_replica():
    def f(r):
        with fwAD.dual_level():
            dual = fwAD.make_dual(r, torch.full_like(r, 2.0))
            return fwAD.unpack_dual(dual.exp()).tangent

    _every_call_equals(f, lambda x: 2 * x.exp())


def test_jacfwd_and_hessian_in_every_replica():
    def f(r):
        cube = lambda v: (v**3).sum()  # noqa: E731
        return torch.func.jacfwd(torch.sin)(r[:4]).diagonal() + torch.func.hessian(cube)(r[:4]).diagonal()

    _every_call_equals(f, lambda x: x[:, :4].cos() + 6 * x[:, :4])


def test_a_collective_of_the_tangents_after_jvp():
    def f(r):
        return tp.psum(torch.func.jvp(torch.sin, (r,), (torch.ones_like(r),))[1], "i")

    _every_call_equals(f, lambda x: x.cos().sum(0).expand(N, -1))


@pytest.mark.timing
# Compiled, Dynamo traces a dual_level region into the graph (no runtime levels): the
# collective works there; a jvp breaks the graph and runs eager, as on the threads.
@pytest.mark.parametrize(("where", "compiled"), [("jvp", False), ("dual_level", False), ("jvp", True)])
def test_a_collective_inside_a_forward_ad_region_raises_at_once(where, compiled, monkeypatch):
    def in_jvp(r):
        return torch.func.jvp(lambda v: tp.psum(v, "i"), (r,), (r,))[1]

    def in_dual_level(r):
        with fwAD.dual_level():
            dual = fwAD.make_dual(r, torch.ones_like(r))
            return fwAD.unpack_dual(dual * tp.psum(r, "i")).tangent

    f = {"jvp": in_jvp, "dual_level": in_dual_level}[where]
    tp.set_executor("threads")  # the stacked executor falls back to it for jvp
    # Compiled, a replica in eager code between graphs holds the compile gate; it must not wait
    # for the forward-AD gate while holding it (both waited until the collective timeout).
    monkeypatch.setattr(_config, "_timeout", _config._timeout)  # restored after the test
    tp.set_collective_timeout(30)
    options = dict(compile=dict(backend="aot_eager")) if compiled else {}
    pf = pmap_k(f, 4, **options)
    for _ in range(2):  # the first call compiles
        err, seconds = expect_error(pf, _x()[:4], kind=RuntimeError, deadline=60)
        assert "all_reduce" in str(err) and "inside torch.func.jvp" in str(err) and "lockstep" in str(err)
    assert seconds < 5.0
    # The gate was let go: forward AD works in replicas again.
    torch.testing.assert_close(
        pmap_k(lambda r: torch.func.jvp(torch.sin, (r,), (r,))[1], 4)(_x()[:4]).unshard(), _x()[:4] * _x()[:4].cos()
    )


def test_a_collective_of_tangents_inside_jvp_under_lockstep_does_not_suggest_lockstep():
    # Lockstep falls back to the threads for a collective of a tangent-carrying tensor; the
    # threads' error told the user to set the lockstep executor they had set (found by a hunt).
    _config._executor = "lockstep"
    f = pmap_k(lambda r: torch.func.jvp(lambda v: tp.psum(v.sin(), "i"), (r,), (torch.ones_like(r),))[1], 4)
    with (
        pytest.warns(RuntimeWarning, match="lockstep"),
        pytest.raises(RuntimeError, match="inside torch.func.jvp") as e,
    ):
        f(_x()[:4])
    assert "set_executor('lockstep')" not in str(e.value)


def test_forward_ad_outside_replicas_is_untouched():
    x = _x()[0]
    with fwAD.dual_level():
        assert fwAD.unpack_dual(fwAD.make_dual(x, torch.ones_like(x)).sin()).tangent is not None
    torch.testing.assert_close(torch.func.jvp(torch.sin, (x,), (torch.ones_like(x),))[1], x.cos())


@pytest.mark.parametrize("executor", ["threads", "lockstep"])
@pytest.mark.parametrize("collective", ["psum", "pmax", "psum_scatter"])
def test_a_reduction_of_the_callers_dual_tensors_is_a_clear_error(executor, collective):
    # The caller's dual level reaches the replicas through their inputs: the reductions
    # used to fail inside the exchange ("add_out that does not support it").
    ops = {
        "psum": lambda v: tp.psum(v, "i"),
        "pmax": lambda v: tp.pmax(v, "i"),
        "psum_scatter": lambda v: tp.psum_scatter(v, "i", tiled=True),
    }
    _config._executor = executor
    f = pmap_k(lambda v: ops[collective](v.sin()), 4)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="of a dual tensor"):
        f(fwAD.make_dual(torch.randn(4, 4), torch.ones(4, 4)))


@pytest.mark.parametrize("fn", [tp.pmax, tp.pmin], ids=["pmax", "pmin"])
def test_stacked_pmax_of_the_callers_dual_tensors_raises_as_the_threads_do(fn):
    # The batched pmax is torch.maximum folded over the replicas, whose tie rule passed a
    # tangent through (0.25 or 0.5 at a three-way tie, by the tied replica's position):
    # pmax/pmin have no derivative (as in JAX). Found by a hunt.
    _config._executor = "stacked"
    x = torch.tensor([[5.0], [5.0], [5.0], [1.0]], dtype=torch.float64)
    f = pmap_k(lambda v: fn(v, "i") + v, 4)
    total = x.max(0).values if fn is tp.pmax else x.min(0).values
    for _ in range(2):  # captured (the default runs the first call on the threads), then the fast path
        assert torch.equal(f(x).unshard(), total + x)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=f"{fn.__name__} has no derivative"):
        with pytest.warns(RuntimeWarning, match="forward-mode AD .* through pmax/pmin"):
            f(fwAD.make_dual(x, torch.eye(4, 1, dtype=torch.float64)))
    # Tangents that do not reach the reduction are fine.
    g = pmap_k(lambda v, w: fn(w, "i") + v.sin(), 4)
    with fwAD.dual_level():
        out = g(fwAD.make_dual(x, torch.ones_like(x)), x)
        tangent = fwAD.unpack_dual(out).tangent
    tangent = tangent.unshard() if isinstance(tangent, tp.ShardedTensor) else tangent
    torch.testing.assert_close(tangent, x.cos())


@pytest.mark.parametrize("collective", ["psum", "pmean", "psum_scatter"])
def test_stacked_reductions_of_the_callers_dual_tensors_carry_their_tangents(collective):
    # The stacked executor's batched reductions are sums over the replica dimension: the
    # tangent of a psum is the psum of the tangents (JAX's rule), where threads and lockstep raise.
    ops = {
        "psum": (lambda v: tp.psum(v, "i"), lambda t: t.sum(0).expand(4, 4)),
        "pmean": (lambda v: tp.pmean(v, "i"), lambda t: t.mean(0).expand(4, 4)),
        "psum_scatter": (lambda v: tp.psum_scatter(v, "i", tiled=True), lambda t: t.sum(0).reshape(4, 1)),
    }
    op, want = ops[collective]
    _config._executor = "stacked"
    x = torch.randn(4, 4, dtype=torch.float64)
    t = torch.randn(4, 4, dtype=torch.float64)
    f = pmap_k(lambda v: op(v.sin()), 4)
    for _ in range(2):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
        tangent = tangent.unshard() if isinstance(tangent, tp.ShardedTensor) else tangent
        torch.testing.assert_close(tangent, want(x.cos() * t))


@pytest.mark.parametrize("executor", ["threads", "lockstep"])
def test_a_gather_of_the_callers_dual_tensors_carries_their_tangents(executor):
    _config._executor = executor
    x, t = torch.randn(4, 3), torch.randn(4, 3)
    with fwAD.dual_level():
        out = pmap_k(lambda v: tp.all_gather(v.sin(), "i"), 4)(fwAD.make_dual(x, t))
        tangent = fwAD.unpack_dual(out).tangent
    tangent = tangent.unshard() if isinstance(tangent, tp.ShardedTensor) else tangent
    torch.testing.assert_close(tangent[0], x.cos() * t)


@pytest.mark.parametrize("collective", ["all_gather", "ppermute"])
def test_compiled_replicas_run_the_callers_dual_tensors_eagerly(collective):
    # A compile= replica's graph sees primals: the gathers' and permutations' tangents, which
    # their kernels move eagerly, came out zero without an error (threads, and the default's
    # fallbacks to them; found by a hunt). Such calls run eagerly, with a warning.
    _config._executor = "threads"
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    if collective == "all_gather":
        fn = lambda v: tp.all_gather(v.sin(), "i").sum(0) * v  # noqa: E731
        want = (x.cos() * t).sum(0) * x + x.sin().sum(0) * t
    else:
        fn = lambda v: tp.ppermute(v.sin(), "i", [(i, (i + 1) % 4) for i in range(4)]) * v  # noqa: E731
        want = x.sin().roll(1, 0) * t + (x.cos() * t).roll(1, 0) * x
    f = pmap_k(fn, 4, compile=dict(backend="aot_eager"))
    with pytest.warns(RuntimeWarning, match="inputs carry forward-mode tangents"):
        for _ in range(2):
            with fwAD.dual_level():
                tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
            torch.testing.assert_close(torch.as_tensor(tangent), want)


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
def test_an_input_that_requires_grad_and_carries_a_tangent_is_a_clear_error(executor):
    # Autograd through the call is a Function without a forward-mode rule: PyTorch's "You must
    # implement the jvp function for custom autograd.Function", about torchpmap's (found by a hunt).
    _config._executor = executor
    f = pmap_k(lambda v: v.sin(), 4)
    x = torch.randn(4, 3, requires_grad=True)
    with fwAD.dual_level(), pytest.warns() if executor == "stacked" else contextlib.nullcontext():
        with pytest.raises(
            RuntimeError, match="pmap: an input carries a forward-mode tangent .* while autograd records the call"
        ):
            f(fwAD.make_dual(x, torch.ones(4, 3)))
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(x.detach(), torch.ones(4, 3)))).tangent  # forward mode alone
    torch.testing.assert_close(torch.as_tensor(tangent), x.detach().cos())


@pytest.mark.parametrize("executor", ["threads", "stacked"])
def test_a_tangent_beside_an_input_that_requires_grad_is_refused_not_dropped(executor):
    # f(make_dual(x, t), w) with w requiring grad returned an output without a tangent, silently:
    # autograd through the call detaches the replicas' outputs (found by a review).
    _config._executor = executor
    f = pmap_k(lambda v, w: v.sin() * w, 4, in_axes=(0, None))
    w = torch.randn(3, requires_grad=True)
    with fwAD.dual_level(), pytest.warns() if executor == "stacked" else contextlib.nullcontext():
        with pytest.raises(RuntimeError, match="pmap: an input carries a forward-mode tangent"):
            f(fwAD.make_dual(torch.randn(4, 3), torch.ones(4, 3)), w)
