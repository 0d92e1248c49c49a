"""Autograd through a call on the stacked executor: the same gradients as the
threads executor (bit for bit, except where batched matmuls may round
differently), and a warned fallback for what it does not do."""

import threading
import warnings

import pytest
import torch
from helpers import as_plain as plain
from helpers import devices, executor, rows

import torchpmap as tp
from torchpmap import _stacked_autograd

N = 4


def pm(f, **kwargs):
    return tp.pmap(f, "i", devices=devices(N), **kwargs)


def weighted_loss(out):
    """A loss whose cotangents differ per element, so every row's gradient is checked."""
    leaves = [plain(o) for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
    return sum(
        (o * torch.linspace(-1.0, 2.0, o.numel()).reshape(o.shape)).sum() for o in leaves if o.is_floating_point()
    )


def grads_of(pf, *args, loss=weighted_loss):
    """The call's outputs and the gradients of ``loss`` w.r.t. the args that require grad."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = pf(*leaves)
    loss(out).backward()
    return out, [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]


def assert_equal(a, b, close=False):
    for x, y in zip(a, b, strict=True):
        x, y = plain(x), plain(y)
        if close:  # a batched matmul may round differently in the last bit
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(x, y), (x - y).abs().max()


def both_grads(pf, *args, close=False, loss=weighted_loss):
    """The stacked gradients equal the threads', on a first backward (which
    recomputes the forward) and on a later one (which reads the residuals the
    forward kept)."""
    with executor("threads"):
        expected_out, expected = grads_of(pf, *args, loss=loss)
    for _ in ("first", "later"):
        with executor("stacked"):
            got_out, got = grads_of(pf, *args, loss=loss)
        assert expected and len(got) == len(expected)
        assert_equal(expected, got, close)
        assert_equal(torch.utils._pytree.tree_leaves(expected_out), torch.utils._pytree.tree_leaves(got_out), close)
    return got


def fallback(match):
    return pytest.warns(RuntimeWarning, match=match)


# -- gradients through every collective ------------------------------------------------
COLLECTIVES = {
    "elementwise": lambda x: x.sin() * 2,
    "psum": lambda x: tp.psum(x.sin(), "i"),
    "psum_groups": lambda x: tp.psum(x * x, "i", axis_index_groups=[[0, 2], [1, 3]]),
    "pmean": lambda x: tp.pmean(x.exp(), "i"),
    "pmean_unequal_groups": lambda x: tp.pmean(x * x, "i", axis_index_groups=[[0], [1, 2, 3]]),
    "all_gather": lambda x: tp.all_gather(x.cos(), "i"),
    "all_gather_tiled_axis1": lambda x: tp.all_gather(x * x, "i", axis=1, tiled=True),
    "psum_scatter": lambda x: tp.psum_scatter(x.sin(), "i"),
    "psum_scatter_tiled": lambda x: tp.psum_scatter(x * x, "i", tiled=True),
    "all_to_all": lambda x: tp.all_to_all(x.sin(), "i", 0, 0),
    "ppermute": lambda x: tp.ppermute(x.sin(), "i", [(0, 1), (1, 2), (2, 0)]),
    "pshuffle": lambda x: tp.pshuffle(x * x, "i", [3, 2, 0, 1]),
    "axis_index": lambda x: x * tp.axis_index("i"),
    "pytree": lambda x: tp.psum({"a": x.sin(), "b": (x * 2, x.sum())}, "i"),
    "pmax_of_detached": lambda x: x * tp.pmax(x.detach(), "i"),
    "two_outputs": lambda x: (tp.psum(x, "i"), x.cos()),
}


@pytest.mark.parametrize("name", sorted(COLLECTIVES))
def test_gradients_through_collectives_equal_threads(name):
    both_grads(pm(COLLECTIVES[name]), rows(N, 4, 3).requires_grad_())


@pytest.mark.parametrize("pairs", [[], [(0, 1)]], ids=["to_nobody", "to_one"])
def test_ppermute_zeros_require_grad_and_get_zero_gradients_as_on_threads(pairs):
    # Replicas that receive nothing get exact zeros, even from inf and NaN (not in the rows
    # sent: NaN != NaN); an output of zeros only still backpropagates (zeros).
    x = rows(N, 3)
    x[2, 0], x[3, 1] = float("nan"), float("inf")
    (grad,) = both_grads(pm(lambda x: tp.ppermute(x, "i", pairs)), x.requires_grad_())
    assert not grad[2:].any()


@pytest.mark.parametrize("reduce", [tp.pmax, tp.pmin])
def test_pmax_refuses_its_gradient_as_on_threads(reduce):
    pf = pm(lambda x: reduce(x * 2, "i"))
    for name in ("threads", "stacked"):
        with executor(name):
            y = pf(rows(N, 3).requires_grad_())
            with pytest.raises(RuntimeError, match="not differentiable"):
                y.unshard().sum().backward()


def test_mapped_axis_not_first():
    pf = pm(lambda x: tp.psum(x.sin(), "i"), in_axes=1)
    both_grads(pf, rows(3, N, 2).requires_grad_())


def test_broadcast_input_gradient_sums_the_replicas():
    pf = pm(lambda x, w: tp.psum(x * w, "i") + w.sin(), in_axes=(0, None))
    gx, gw = both_grads(pf, rows(N, 3).requires_grad_(), rows(3, offset=0.5).requires_grad_())
    assert gw.shape == (3,)


def test_broadcast_matmul_weight():
    pf = pm(lambda x, w: torch.tanh(x @ w), in_axes=(0, None))
    both_grads(pf, rows(N, 5, 6).requires_grad_(), rows(6, 3, scale=0.01).requires_grad_(), close=True)


def test_only_the_broadcast_input_requires_grad():
    pf = pm(lambda x, w: tp.pmean(x * w, "i"), in_axes=(0, None))
    both_grads(pf, rows(N, 3), rows(3).requires_grad_())


def _batch_norm_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6)).eval()
    model[1].running_var.fill_(2.0)
    return model


CLOSED_OVER = {
    "mlp": lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)),
    # batch_norm was taken for a random draw by the stacked capture (its uncounted writes share
    # the random module's table): the backward then raised "drew random numbers its forward did
    # not draw"
    "batch_norm_in_eval_mode": _batch_norm_in_eval_mode,
}


@pytest.mark.parametrize("kind", sorted(CLOSED_OVER))
def test_closed_over_parameters_accumulate_once_per_replica(kind):
    torch.manual_seed(0)
    model = CLOSED_OVER[kind]()
    pf = pm(lambda x: tp.psum(model(x), "i"))
    x = rows(N, 3, 6, scale=0.05)
    grads = {}
    for name in ("threads", "stacked"):
        model.zero_grad(set_to_none=True)
        with executor(name):
            for _ in range(2):  # the first backward, then the split forward's
                weighted_loss(pf(x)).backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    assert_equal(grads["threads"], grads["stacked"], close=True)


def test_closed_over_tensor_elementwise_is_exact():
    w = rows(3, offset=0.25).requires_grad_()
    pf = pm(lambda x: tp.psum(x * w, "i"))
    got = {}
    for name in ("threads", "stacked"):
        w.grad = None
        with executor(name):
            weighted_loss(pf(rows(N, 3))).backward()
        got[name] = w.grad.clone()
    assert torch.equal(got["threads"], got["stacked"])


def test_sgd_loop_with_parameters_outside_the_call():
    def train(name):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        pf = pm(lambda x, y: torch.nn.functional.mse_loss(model(x), y))
        x, y = rows(N, 5, 8, scale=0.01), rows(N, 5, 1, scale=0.1)
        losses = []
        with executor(name):
            for _ in range(3):
                loss = pf(x, y).unshard().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        return [*losses, *[p.detach().clone() for p in model.parameters()]]

    assert_equal(train("threads"), train("stacked"), close=True)


# -- what the function does inside ------------------------------------------------------
def test_torch_func_grad_inside_with_outer_backward():
    def f(x):
        return torch.func.grad(lambda y: (y.sin() * tp.psum(y, "i") * tp.axis_index("i")).sum())(x)

    both_grads(pm(f), rows(N, 3).requires_grad_())


def test_no_grad_and_detach_inside():
    def f(x):
        with torch.no_grad():
            s = x * 3
        return x * s + x * x.detach()

    both_grads(pm(f), rows(N, 3).requires_grad_())


def test_double_backward():
    pf = pm(lambda x: tp.psum(x.sin(), "i") * x)

    def loss(out):
        return out.unshard().sum()

    results = {}
    for name in ("threads", "stacked"):
        x = rows(N, 3).requires_grad_()
        with executor(name):
            (g,) = torch.autograd.grad(loss(pf(x)), x, create_graph=True)
            (g * g).sum().backward()
        results[name] = (g.detach(), x.grad)
    assert_equal(results["threads"], results["stacked"])


def test_output_requires_grad_as_on_threads():
    pf = pm(lambda x, k: (x.sin(), x.argmax(), k * 2), in_axes=(0, None))
    flags = {}
    for name in ("threads", "stacked"):
        with executor(name):
            out = pf(rows(N, 3).requires_grad_(), torch.ones(2))
        flags[name] = [plain(o).requires_grad for o in out]
    assert flags["threads"] == flags["stacked"] == [True, False, False]


def test_unused_output_and_retain_graph():
    pf = pm(lambda x: (tp.psum(x.sin(), "i"), x.log()))

    def loss(out):
        return out[0].unshard().sum()

    both_grads(pf, rows(N, 3, offset=0.5).requires_grad_(), loss=loss)
    with executor("stacked"):
        x = rows(N, 3, offset=0.5).requires_grad_()
        total = loss(pf(x))
        total.backward(retain_graph=True)
        first = x.grad.clone()
        total.backward()
        assert torch.equal(x.grad, 2 * first)


def test_backward_inside_the_replica_falls_back():
    def f(x):
        y = x.detach().requires_grad_()
        (y * y).sum().backward()
        return y.grad

    pf = pm(f)
    with executor("threads"):
        expected = pf(rows(N, 3))
    with executor("stacked", allow_fallback=True), fallback("backward"):
        got = pf(rows(N, 3))
    assert torch.equal(plain(expected), plain(got))


def writes_its_buffer(w, buf):
    buf.add_(w.detach() * 2)  # written in place, then read: the backward needs the written values
    return (w.sin() * buf.sum()).sum() + tp.psum(buf, "i").sum(), buf * 1


def test_in_place_writes_to_inputs_under_autograd_run_stacked():
    # The first backward recomputes the forward from copies of what it wrote, as it
    # was before; later calls keep the residuals. Gradients and the written values
    # equal the threads'.
    pf = pm(writes_its_buffer)
    results = {}
    for name in ("threads", "stacked"):
        w, buf = rows(N, 5).requires_grad_(), torch.zeros(N, 5)
        with executor(name):
            per_call = []
            for _ in range(3):  # a first backward, then later ones
                loss, seen = pf(w, buf)
                (grad,) = torch.autograd.grad(loss.unshard().sum(), w)
                per_call.append((grad, plain(seen)))
        results[name] = per_call, buf.clone()
    (expected, expected_buf), (got, got_buf) = results["threads"], results["stacked"]
    assert torch.equal(expected_buf, got_buf) and torch.equal(got_buf, 6 * rows(N, 5))
    for (eg, es), (gg, gs) in zip(expected, got, strict=True):
        assert torch.equal(eg, gg) and torch.equal(es, gs)


def test_a_retained_backward_of_a_call_that_writes_an_input_runs_twice():
    grads = {}
    for name in ("threads", "stacked"):
        w, buf = rows(N, 5).requires_grad_(), torch.zeros(N, 5)
        with executor(name):
            loss = pm(writes_its_buffer)(w, buf)[0].unshard().sum()
            first = torch.autograd.grad(loss, w, retain_graph=True)[0]  # recomputes the forward
            second = torch.autograd.grad(loss, w)[0]  # again, from the same saved copies
        grads[name] = first, second, buf
    for e, g in zip(grads["threads"], grads["stacked"]):
        assert torch.equal(e, g)


def test_create_graph_through_a_call_that_writes_an_input():
    def f(w, buf):
        buf.mul_(2)
        return (w.pow(3) * buf.sum(0)).sum()  # not buf itself: the threads' slices share one version counter

    grads = {}
    for name in ("threads", "stacked"):
        w, buf = rows(N, 3).requires_grad_(), torch.ones(N, 3)
        with executor(name):
            (g,) = torch.autograd.grad(pm(f)(w, buf).unshard().sum(), w, create_graph=True)
            (gg,) = torch.autograd.grad(g.sum(), w)
        grads[name] = g.detach(), gg, buf
    for e, g in zip(grads["threads"], grads["stacked"]):
        assert torch.equal(e, g)


def test_an_output_viewing_a_written_input_stays_its_view_on_every_call():
    # After the first backward, the forward ran the split graph, which writes a copy of the
    # input and copies it back: the output viewed the copy, and the caller's write through it
    # was lost (found by a hunt).
    w = torch.ones(3, requires_grad=True)

    def step(x, buf):
        buf.add_(1)
        return x * w, buf[0:2]

    seen = {}
    for name in ("threads", "stacked"):
        pf = pm(step)
        with executor(name):
            for _ in range(3):
                buf = torch.zeros(N, 3)
                out, view = pf(torch.ones(N, 3), buf)
                view.add_(100)  # through the returned view, into buf
                out.unshard().sum().backward()
                seen.setdefault(name, []).append(buf.clone())
    want = torch.tensor([101.0, 101.0, 1.0]).expand(N, 3)
    for got in seen["threads"] + seen["stacked"]:
        assert torch.equal(got, want)


def test_later_calls_that_write_an_input_keep_no_copy_of_it():
    import gc

    pf = pm(lambda w, buf: (w.sin() * buf.add_(1).sum()).sum())
    w, buf = rows(N, 3).requires_grad_(), torch.zeros(N, 1000)

    def like_buf():  # live tensors of buf's shape (other tests may leave some alive)
        gc.collect()
        fake = torch._subclasses.fake_tensor.FakeTensor
        return {
            id(t)
            for t in gc.get_objects()
            if type(t) is torch.Tensor and not isinstance(t, fake) and t.shape == buf.shape
        }

    before = like_buf()
    with executor("stacked"):
        pf(w, buf).unshard().sum().backward()  # the first call keeps a copy: its backward recomputes
        losses = [pf(w, buf).unshard().sum() for _ in range(3)]  # later ones keep residuals only
        assert not like_buf() - before
        with pytest.raises(RuntimeError, match="create_graph=True through a stacked pmap call that writes"):
            torch.autograd.grad(losses[0], w, create_graph=True)
        for loss in losses[1:]:
            loss.backward()
    assert torch.equal(buf, torch.full((N, 1000), 4.0))  # four calls, each adding 1 once


def test_a_written_input_another_input_aliases_falls_back_under_autograd():
    def f(x, s, t):
        y = x * t.clone()  # read before the write: the backward needs the old values
        s.add_(10)
        return y.sum()

    grads = {}
    for name in ("threads", "stacked"):
        buf, x = torch.ones(N, 3), rows(N, 3).requires_grad_()
        with executor(name, allow_fallback=True), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            pm(f)(x, buf, buf).unshard().sum().backward()
        grads[name] = x.grad
        if name == "stacked":
            assert any("shares memory with another input" in str(c.message) for c in caught)
    assert torch.equal(grads["threads"], grads["stacked"])


@pytest.mark.parametrize(
    "f, reason",
    [
        (lambda w, b: w.mul_(2).sum(), "an input that requires grad"),
        (lambda w, b: (w * SHARED.add_(1)).sum(), "a tensor the replicas share"),
    ],
    ids=["requires_grad", "shared"],
)
def test_in_place_writes_autograd_cannot_follow_fall_back_for_that_call_only(f, reason):
    with executor("stacked", allow_fallback=True), fallback(reason):
        try:
            pm(f)(rows(N, 3).requires_grad_() * 1, torch.zeros(N, 3))
        except RuntimeError:
            pass  # the threads executor's own verdict on it


SHARED = torch.zeros(3)


# -- inputs and outputs ----------------------------------------------------------------------
def test_sharded_leaves_requiring_grad():
    pf = pm(lambda x: tp.psum(x.sin(), "i"))
    shards = {}
    for name in ("threads", "stacked"):
        xs = tp.device_put_sharded([r.clone().requires_grad_() for r in rows(N, 3)], devices(N))
        with executor(name):
            weighted_loss(pf(xs)).backward()
        shards[name] = [s.grad for s in xs.shards]
    assert_equal(shards["threads"], shards["stacked"])


def test_outputs_fed_back():
    pf = pm(lambda x: tp.psum(x.sin(), "i") * x)
    both_grads(lambda x: pf(pf(x)), rows(N, 3).requires_grad_())


def test_no_grad_call_records_nothing():
    pf = pm(lambda x: tp.psum(x * 2, "i"))
    with executor("stacked"), torch.no_grad():
        y = pf(rows(N, 3).requires_grad_())
    assert not y.requires_grad


def test_backward_twice_raises():
    pf = pm(lambda x: tp.psum(x.sin(), "i"))
    with executor("stacked"):
        total = pf(rows(N, 3).requires_grad_()).unshard().sum()
    total.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        total.backward()


def test_replicated_outputs():
    both_grads(pm(lambda x: (tp.pmean(x * x, "i"), x.cos()), out_axes=(None, 0)), rows(N, 3).requires_grad_())


def test_cotangents_of_another_layout():
    pf = pm(lambda x: tp.psum(x.sin(), "i"))
    both_grads(pf, rows(N, 3).requires_grad_(), loss=lambda out: out.unshard().sum())  # expanded cotangents
    both_grads(pf, rows(N, 3).requires_grad_())


def test_which_inputs_get_a_gradient_as_on_threads():
    # Reached only through an output the loss does not use: zeros, as on threads.
    # Not reached at all: None.
    head, other_head, detached = (torch.nn.Linear(3, 2) for _ in range(3))

    def f(x, w, v):
        return tp.psum(head(x), "i"), other_head(x) * w, detached(x).detach() * v.detach()

    pf = pm(f, in_axes=(0, None, None))
    grads = {}
    for name in ("threads", "stacked"):
        for m in (head, other_head, detached):
            m.zero_grad(set_to_none=True)
        x, w, v = rows(N, 3).requires_grad_(), torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
        with executor(name):
            out = pf(x, w, v)
        out[0].unshard().sum().backward()
        grads[name] = [x.grad, w.grad, v.grad, *(p.grad for m in (head, other_head, detached) for p in m.parameters())]
    assert [g is None for g in grads["stacked"]] == [g is None for g in grads["threads"]]
    assert grads["threads"][2] is None and grads["threads"][1] is not None
    assert_equal([g for g in grads["threads"] if g is not None], [g for g in grads["stacked"] if g is not None])


@pytest.mark.parametrize("create_graph", [False, True])
def test_a_derivative_that_is_zero_by_formula_is_a_zero_gradient_not_none(create_graph):
    """``angle`` of a real tensor has a derivative that autograd computes as zeros
    from the input alone; torch.func.vjp inside the stacked backward gives such
    zeros for an input it never reaches too, and telling the two apart by whether
    the gradient reads the cotangent gave None (a fuzzer found it: threads and
    eager give zeros). ``y``, reached only through a detach, gets None."""

    def f(x, y):
        return x.angle() + y.detach(), y.detach().sum()

    pf = pm(f)
    grads = {}
    for name in ("threads", "stacked"):
        x, y = rows(N, 3).requires_grad_(), rows(N, 3).requires_grad_()
        with executor(name):
            a, b = pf(x, y)
        loss = a.unshard().sum() + b.unshard().sum() * 0
        grads[name] = torch.autograd.grad(loss, (x, y), create_graph=create_graph, allow_unused=True)
    assert [g is None for g in grads["stacked"]] == [g is None for g in grads["threads"]] == [False, True]
    assert_equal(grads["threads"][0], grads["stacked"][0])
    assert not grads["stacked"][0].any()


def test_an_inference_tensor_input_under_autograd_raises_as_on_threads():
    """Eagerly, autograd refuses to save an inference tensor for a backward; the batched
    backward saved its stacked copy and differentiated (a hunt found it). An inference
    tensor that nothing saves (an addend) is fine everywhere."""
    lin = torch.nn.Linear(2, 2)
    with torch.inference_mode(), executor("threads"):
        plain = torch.ones(N, 2)
        shards = pm(lambda v: v * 2)(plain)  # one tensor per replica: stacked by a copy
        stacked = tp.device_put_sharded(list(plain), devices(N))
    for name in ("threads", "stacked"):
        with executor(name, allow_fallback=True):
            f = pm(lambda v: lin(v))
            for x in (shards, plain, stacked, shards):
                with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
                    f(x)
            out = pm(lambda v: v + lin.weight.sum())(shards)
            assert out.requires_grad


def test_gradcheck_and_gradgradcheck():
    def f(x, w):
        y = tp.psum(torch.tanh(x * w), "i") + tp.all_gather(x, "i").sum(0)
        return tp.ppermute(y * x, "i", [(0, 1), (1, 2), (2, 3), (3, 0)])

    pf = pm(f, in_axes=(0, None))

    def call(x, w):
        return pf(x, w).unshard()

    x = rows(N, 3, dtype=torch.float64, scale=0.1).requires_grad_()
    w = rows(3, dtype=torch.float64, scale=0.2, offset=0.3).requires_grad_()
    with executor("stacked"):
        assert torch.autograd.gradcheck(call, (x, w))
        assert torch.autograd.gradgradcheck(call, (x, w))


def test_inputs_returned_and_replica_invariant_outputs():
    pf = pm(lambda x, w: (x, w * 2, x * w), in_axes=(0, None))
    both_grads(pf, rows(N, 3).requires_grad_(), rows(3, offset=0.5).requires_grad_())
    # A broadcast input returned as is bypasses the graph (Dynamo returns it): its
    # gradient adds to the graph's in another order than on threads, so may round differently.
    pf = pm(lambda x, w: (w * 2, x * w, w), in_axes=(0, None))
    both_grads(pf, rows(N, 3).requires_grad_(), rows(3, offset=0.5).requires_grad_(), close=True)


def test_requires_grad_changing_between_calls():
    pf = pm(lambda x, w: tp.psum(x * w, "i"), in_axes=(0, None))
    for x_grad, w_grad in [(False, False), (True, False), (False, True), (True, True), (False, False)]:
        x, w = rows(N, 3).requires_grad_(x_grad), rows(3, offset=0.5).requires_grad_(w_grad)
        if x_grad or w_grad:
            both_grads(pf, x, w)
        else:
            with executor("stacked"):
                assert not pf(x, w).requires_grad


def test_a_later_backward_reads_the_forwards_residuals(monkeypatch):
    runs = [0]  # graphs run (the batched forward, the joint graph's forward and backward parts)
    call = torch.fx.GraphModule.__call__

    def counting(self, *args, **kwargs):
        runs[0] += 1
        return call(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.GraphModule, "__call__", counting)
    direct = _stacked_autograd.direct_forward  # how the split graphs run

    def counting_direct(gm):
        run = direct(gm)

        def counted(*args):
            runs[0] += 1
            return run(*args)

        return counted

    monkeypatch.setattr(_stacked_autograd, "direct_forward", counting_direct)
    pf = pm(lambda x: tp.psum(x.sin(), "i") * x)
    counts = []
    with executor("stacked"):
        for _ in range(3):
            x = rows(N, 3).requires_grad_()
            runs[0] = 0
            out = pf(x)
            forward, runs[0] = runs[0], 0
            out.unshard().sum().backward()
            counts.append((forward, runs[0]))
    # The first call captures, and its backward traces the joint graph, cuts it in
    # two and recomputes the forward; later forwards keep the residuals, so their
    # backward runs one graph.
    assert counts[0][1] > 1
    assert counts[1:] == [(1, 1), (1, 1)]


def test_later_backwards_with_retain_graph_and_create_graph():
    pf = pm(lambda x: tp.psum(x.sin(), "i") * x)
    results = {}
    for name in ("threads", "stacked"):
        got = []
        with executor(name):
            for _ in range(2):  # the second call's forward keeps residuals
                x = rows(N, 3).requires_grad_()
                total = (pf(x).unshard() ** 2).sum()
                total.backward(retain_graph=True)
                total.backward()
                (g,) = torch.autograd.grad((pf(x).unshard() ** 2).sum(), x, create_graph=True)
                (g * g).sum().backward()
                got.append((x.grad, g.detach()))
        results[name] = got
    for expected, got in zip(results["threads"], results["stacked"]):
        assert_equal(expected, got)


@pytest.mark.parametrize("name", ["threads", "stacked"])
def test_an_output_written_before_the_backward_raises(name):
    pf = pm(lambda x: tp.psum(x, "i").exp())  # exp's backward reads its output
    with executor(name):
        for _ in range(2):
            pf(rows(N, 3).requires_grad_()).unshard().sum().backward()
        out = pf(rows(N, 3).requires_grad_())
        with torch.no_grad():
            out.add_(1)  # the saved value the backward would read
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.unshard().sum().backward()


@pytest.mark.parametrize("name", ["threads", "stacked"])
def test_an_output_written_before_the_first_backward_raises_only_where_the_backward_reads_it(name):
    # The first backward of a stacked call recomputes the forward, so nothing of the
    # forward's was saved: it checks the outputs it reads (exp's), as autograd checks saved ones.
    reads, ignores = pm(lambda x: x.exp()), pm(lambda x: x * 3)
    with executor(name):
        out = reads(rows(N, 3).requires_grad_())
        with torch.no_grad():
            out.shards[1].add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.unshard().sum().backward()
        x = rows(N, 3).requires_grad_()
        out = ignores(x)
        with torch.no_grad():
            out.shards[1].add_(1)
        out.unshard().sum().backward()  # the backward reads no output: nothing to refuse, as eagerly
        assert torch.equal(x.grad, torch.full((N, 3), 3.0))


def test_saved_tensor_hooks_around_a_stacked_call_and_its_backward():
    # torch.func refuses to run under saved-tensor hooks: they are set aside while
    # the backward is traced, and what the call saves still goes through them.
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t.detach().clone()

    pf = pm(lambda x: tp.psum(x.sin(), "i") * x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        both_grads(pf, rows(N, 3).requires_grad_())
        with executor("stacked"):
            packed.clear()
            pf(rows(N, 3).requires_grad_())
            assert packed


@pytest.mark.parametrize("name", ["stacked", "auto"])
def test_requires_grad_set_on_a_stacked_sharded_tensor_reaches_its_shards(name):
    # device_put_sharded's shards are rows of one buffer; requires_grad_() makes the shards
    # leaves that require grad, not the buffer: the stacked call ran on the buffer, and the
    # gradients never reached the shards (found by a differential hunt).
    devs = tp.devices()[:4]
    f = tp.pmap(lambda x, w: (x * x * w).sum(), in_axes=(0, None), devices=devs)
    w = torch.ones(3, requires_grad=True)
    with executor(name, allow_fallback=True):
        for _ in range(3):
            x = tp.device_put_sharded([torch.arange(3.0) + i for i in range(4)], devs)
            x.requires_grad_(True)
            out = f(x, w)
            assert out.requires_grad
            out.sum().backward()
            for i, s in enumerate(x.shards):
                torch.testing.assert_close(s.grad, 2 * (torch.arange(3.0) + i))


def test_hooks_on_a_closed_over_tensor_raise_on_the_threads_and_run_once_stacked():
    # On the threads each replica differentiates at the closed-over w, and the caller's backward
    # reaches it again: its hook ran once per replica and once more (w.grad scaled too often).
    w = torch.ones(3, requires_grad=True)
    calls = []
    w.register_hook(lambda g: calls.append(1) or g * 0.5)
    f = tp.pmap(lambda x: x * w)
    with executor("threads"), pytest.raises(RuntimeError, match="closes over a tensor .* autograd hooks"):
        f(torch.ones(4, 3)).sum().backward()
    for name in ("stacked", "threads"):
        with executor(name):
            w.grad, calls[:] = None, []
            # as an argument every replica shares, the hook runs once on the summed gradient
            g = tp.pmap(lambda x, v: x * v, in_axes=(0, None))
            g(torch.ones(4, 3), w).sum().backward()
            torch.testing.assert_close(w.grad, torch.full((3,), 2.0))
            assert len(calls) == 1
    with executor("stacked"):
        w.grad, calls[:] = None, []
        f(torch.ones(4, 3)).sum().backward()
        torch.testing.assert_close(w.grad, torch.full((3,), 2.0))
        assert len(calls) == 1


@pytest.mark.parametrize("how", ["threads", "stacked"])
def test_writing_an_input_stacked_by_a_copy_before_the_backward_raises(how):
    # Shards of their own (device_put_replicated) are stacked by a copy, which autograd saved:
    # an optimizer-like write into them before the backward went unseen, and the gradient was
    # the old weights' (found by a hunt). Eager, and the threads executor, raise.
    w0 = torch.tensor([0.5, -1.0, 2.0])
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    with executor(how):
        pf = tp.pmap(lambda w, x: (w * w * x).sum(), devices=devices(4))
        for _ in range(3):
            w = tp.device_put_replicated(w0, devices(4)).requires_grad_()
            loss = pf(w, x).sum()
            with torch.no_grad():
                w.sub_(0.5)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
            w = tp.device_put_replicated(w0, devices(4)).requires_grad_()
            pf(w, x).sum().backward()  # unwritten: the gradient
            torch.testing.assert_close(torch.stack([s.grad for s in w.shards]), 2 * w0 * x)


def test_writing_a_value_that_requires_grad_into_an_input_runs_as_on_the_threads():
    # buf.add_(x): eagerly buf takes x's history (the threads refuse the write into a view
    # made in no_grad); the batched node wrote the values and dropped the history, so a loss
    # through buf lost its gradient with no error (found by a hunt). A detached value is fine.
    def f(x, buf):
        buf.add_(x)
        return x.sin()

    def g(x, buf):
        buf.add_(x.detach() * 2)
        return x.sin() * buf

    x0 = torch.linspace(-1, 1, 12).reshape(4, 3)
    errors = {}
    for how in ("threads", "stacked"):
        with executor(how, allow_fallback=True):
            pf = pm(f)
            for _ in range(3):
                x, buf = x0.clone().requires_grad_(), torch.zeros(4, 3)
                with pytest.raises(RuntimeError, match="modified inplace") as caught:
                    pf(x, buf)
                errors[how] = str(caught.value)
    assert errors["stacked"] == errors["threads"]
    with executor("stacked"):  # no fallback: a detached value carries no history
        pg = pm(g)
        for _ in range(3):
            x, buf = x0.clone().requires_grad_(), torch.zeros(4, 3)
            pg(x, buf).sum().backward()
            torch.testing.assert_close(x.grad, x0.cos() * 2 * x0)


@pytest.mark.parametrize("name", ["stacked", "auto"])
def test_non_reentrant_checkpoint_around_a_call_recomputes_it_stacked(name):
    # The checkpoint's pack hook ends its recomputation early by raising; the stacked executor took
    # that for a failure of the batched graph, ran the call again on the threads, whose saves the
    # checkpoint refused ("target_frame.early_stop is set") (found by a hunt).
    w = torch.randn(3, 3, dtype=torch.float64)
    pf = pm(lambda v: (tp.psum(v, "i") @ w).tanh() * v)
    x = torch.randn(N, 3, dtype=torch.float64, requires_grad=True)
    with executor("threads"):
        expected = torch.autograd.grad((pf(x) * x).sum(), x)[0]
    with executor(name), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        for _ in range(3):
            out = torch.utils.checkpoint.checkpoint(pf, x, use_reentrant=False)
            got = torch.autograd.grad((out * x).sum(), x)[0]
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["threads", "stacked", "lockstep"])
@pytest.mark.parametrize("collective", ["none", "psum", "ppermute"])
def test_batched_cotangents_through_a_call(name, collective):
    # autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) run the backward under
    # PyTorch's legacy vmap: the stacked backward traced its batched cotangents ("meta converter
    # nyi"), and psum's backward exchanged them whole ("Batching rule not implemented for
    # aten::add.out") (found by a hunt). Each equals one backward per cotangent.
    body = {
        "none": lambda v: v.sin() * 2,
        "psum": lambda v: tp.psum(v.sin(), "i") * v,
        "ppermute": lambda v: tp.ppermute(v.sin(), "i", [(r, (r + 1) % N) for r in range(N)]),
    }[collective]
    pf = pm(body)
    cotangents = torch.randn(3, N, 2, dtype=torch.float64)
    with executor(name), warnings.catch_warnings():
        # (no fallback from stacked; lockstep runs autograd through a call on the threads)
        warnings.simplefilter("error" if name == "stacked" else "ignore", RuntimeWarning)
        for _ in range(2):
            x = torch.randn(N, 2, dtype=torch.float64, requires_grad=True)
            got = torch.autograd.grad(plain(pf(x)), x, cotangents, is_grads_batched=True)[0]
            each = [torch.autograd.grad(plain(pf(x)), x, c)[0] for c in cotangents]
            torch.testing.assert_close(got, torch.stack(each), rtol=1e-12, atol=1e-12)
        jacobian = torch.autograd.functional.jacobian(lambda v: plain(pf(v)), x, vectorize=True)
        looped = torch.autograd.functional.jacobian(lambda v: plain(pf(v)), x)
        torch.testing.assert_close(jacobian, looped, rtol=1e-12, atol=1e-12)


def test_a_backward_trace_and_another_threads_capture_take_turns():
    # The stacked backward's make_fx ran outside the compile gate: FX's tracing flag and patcher
    # are process-wide, so another thread's capture failed ("using FX to symbolically trace a
    # dynamo-optimized function") and its function ran on the threads for good, and the backward
    # sometimes raised "CURRENT_PATCHER is None" (found by a hunt).
    f = tp.pmap(lambda x, w: tp.pmean(torch.tanh(x @ w).sum(), "i"), "i", in_axes=(0, None), out_axes=None)
    g = tp.pmap(lambda x: tp.psum(x.cos(), "i"), "i", devices=devices(N))
    errors = []

    def backwards():
        try:
            for k in range(1, 16):
                f(torch.randn(N, 3, k), torch.randn(k, k, requires_grad=True)).backward()
        except Exception as e:
            errors.append(e)

    def captures():
        try:
            for k in range(1, 30):
                g(torch.randn(N, k))
        except Exception as e:
            errors.append(e)

    with executor("stacked"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        threads = [threading.Thread(target=backwards), threading.Thread(target=captures)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert not [str(w.message) for w in caught if "capture failed" in str(w.message)]


@pytest.mark.parametrize("name", ["threads", "stacked", "lockstep"])
def test_batched_cotangents_of_an_output_every_replica_shares(name):
    # out_axes=None: replica 0 got the batched cotangent and the others plain zeros, so replica 0's
    # psum ran once per cotangent and the others' once: "replica 1 returned while replicas [0] wait
    # in all_reduce" (found by a review). Every node now runs one backward per cotangent.
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    pf = pm(lambda x, w: tp.psum((x @ w).tanh(), "i"), in_axes=(0, None), out_axes=None)
    x = torch.randn(N, 3, dtype=torch.float64, requires_grad=True)
    cotangents = torch.randn(5, 3, dtype=torch.float64)
    with executor(name), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(2):
            got = torch.autograd.grad(pf(x, w), (x, w), cotangents, is_grads_batched=True)
            each = [torch.autograd.grad(pf(x, w), (x, w), c) for c in cotangents]
            for g, parts in zip(got, zip(*each)):
                torch.testing.assert_close(g, torch.stack(parts), rtol=1e-12, atol=1e-12)


def test_the_level_of_batched_cotangents_is_read_from_the_tensor():
    # The vmap's own count is thread-local, and a GPU backward runs on the engine's device thread,
    # where it reads 0 (found by a review): the level comes from the tensor, on any thread.
    from torchpmap import _batched_cotangents

    levels = []

    def hook(g):
        reader = threading.Thread(target=lambda: levels.append(_batched_cotangents._level_of(g)))
        reader.start()
        reader.join()
        return g

    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(hook)
    torch.autograd.grad(y, x, torch.randn(4, 3), is_grads_batched=True)
    assert levels == [1]


@pytest.mark.parametrize("name", ["threads", "stacked"])
def test_an_out_axes_none_output_that_requires_grad_can_be_written_in_place(name):
    # Its rows were unbind's views, which autograd refuses to write ("Output 0 of Unbind is a
    # view and is being modified inplace"), on the stacked executor only (found by a hunt).
    x0 = torch.randn(4, 6, dtype=torch.float64)
    f = tp.pmap(lambda x: tp.psum(x * 2, "i"), "i", out_axes=None, devices=devices(4))
    with executor(name):
        for _ in range(2):
            x = x0.clone().requires_grad_()
            y = f(x)
            y.add_(1)
            (g,) = torch.autograd.grad((y * y).sum(), x)
            torch.testing.assert_close(g, (4 * (2 * x0.sum(0) + 1)).expand(4, 6))


@pytest.mark.parametrize("name", ["threads", "stacked"])
@pytest.mark.parametrize("through", ["dict", "list", "default"])
def test_a_computed_tensor_reached_through_a_container_gets_its_gradient_once(name, through):
    # Reached through a dict, a list or a default argument (not a closure cell), a computed tensor
    # that requires grad got no stand-in on the threads: every replica's backward ran its history,
    # and the second failed ("Trying to backward through the graph a second time"; found by a hunt).
    x0, w0 = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    box = {}
    if through == "dict":
        f = lambda x: x * box["c"]  # noqa: E731
    elif through == "list":
        box = []
        f = lambda x: x * box[0]  # noqa: E731
    pf = None
    with executor(name, allow_fallback=True):
        for _ in range(2):
            c = w * 2
            if through == "dict":
                box["c"] = c
            elif through == "list":
                box[:] = [c]
            else:
                f = lambda x, c=c: x * c  # noqa: E731
            pf = tp.pmap(f, devices=devices(4)) if pf is None or through == "default" else pf
            x = x0.clone().requires_grad_()
            gx, gw = torch.autograd.grad(pf(x).unshard().pow(2).sum(), [x, w])
            xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            ex, ew = torch.autograd.grad((xr * (wr * 2)).pow(2).sum(), [xr, wr])
            torch.testing.assert_close(gx, ex)
            torch.testing.assert_close(gw, ew)
