"""pmap(..., compile=...): torch.compile per device, warmed up once."""

import math
import time
import warnings

import pytest
import torch
from helpers import call_with_deadline, devices, executor, expect_error
from torch.func import grad_and_value

import torchpmap as tp
from torchpmap import _config, _devices


class CountingBackend:
    """A torch.compile backend that counts compiles and runs of compiled graphs."""

    def __init__(self):
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


@pytest.fixture
def sixteen_devices():
    if _devices.platform() != "cpu":
        pytest.skip("16 virtual CPU devices (TORCHPMAP_PLATFORM=cpu on a GPU machine)")
    _devices._reset_for_tests()
    tp.set_cpu_device_count(16)
    yield tp.local_devices()
    _devices._reset_for_tests()


@pytest.mark.threads_only
def test_default_is_eager_and_compile_true_compiles():
    f = lambda x: x + torch.compiler.is_compiling()  # noqa: E731
    x = torch.zeros(2, 3)
    assert tp.pmap(f)(x).unshard().sum().item() == 0
    compiled = tp.pmap(f, compile=dict(backend="eager"))(x)
    assert compiled.unshard().sum().item() == 6


@pytest.mark.threads_only  # counts per-replica runs; stacked runs one program per call
def test_sixteen_devices_compile_once_and_never_fall_back(sixteen_devices):
    backend = CountingBackend()

    def f(x):
        return torch.sin(x) * 2 + tp.axis_index("i")

    pf = tp.pmap(f, "i", compile=dict(backend=backend))
    x = torch.randn(16, 5)
    for _ in range(3):
        out = pf(x)
    torch.testing.assert_close(out.unshard(), torch.sin(x) * 2 + torch.arange(16.0)[:, None])
    # One program serves all virtual devices (one physical CPU), and every
    # replica of every call ran it: no silent fallback to eager.
    assert backend.compiles == 1
    assert backend.runs == 3 * 16


def test_recompiles_only_when_shapes_dtypes_or_static_args_change():
    backend = CountingBackend()

    def f(x, scale):
        return x * scale

    pf = tp.pmap(f, compile=dict(backend=backend, dynamic=False), static_broadcasted_argnums=1)
    pf(torch.ones(4, 3), 2)
    pf(torch.ones(4, 3), 2)
    assert backend.compiles == 1
    pf(torch.ones(4, 5), 2)  # new shape
    assert backend.compiles == 2
    pf(torch.ones(4, 5, dtype=torch.float64), 2)  # new dtype
    assert backend.compiles == 3
    out = pf(torch.ones(4, 5, dtype=torch.float64), 3)  # new static argument
    assert backend.compiles == 4
    assert out.unshard().eq(3).all()
    pf(torch.ones(4, 3), 2)  # seen before
    assert backend.compiles == 4


@pytest.mark.threads_only  # counts per-replica runs; stacked runs one program per call
def test_collectives_compile_with_fullgraph():
    backend = CountingBackend()

    def f(x):
        s = tp.psum(x, "i")
        g = tp.all_gather(x, "i", axis=-1)
        p = tp.ppermute(x, "i", [(i, (i + 1) % 4) for i in range(4)])
        sc = tp.psum_scatter(g.T.contiguous(), "i", tiled=True)
        a = tp.all_to_all(g, "i", 1, 0)
        return s, g, p, sc, a, tp.axis_index("i")

    x = torch.randn(4, 3)
    eager = tp.pmap(f, "i")(x)
    compiled = tp.pmap(f, "i", compile=dict(backend=backend, fullgraph=True))(x)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.unshard(), e.unshard())
    assert backend.compiles == 1 and backend.runs == 4


@pytest.mark.threads_only  # a replica's own torch.compile traces the threads' random-stream mode
def test_a_replicas_own_fullgraph_compile_traces_the_collectives(monkeypatch):
    # The mode classified a collective's OpOverload with str.split, which Dynamo cannot
    # trace: "Unsupported method call ... split of class str" (found by a hunt).
    from torchpmap import _random

    monkeypatch.setattr(_random, "_kinds", {})  # as in a process that never ran the collective

    @torch.compile(fullgraph=True, backend="eager")
    def step(x):
        return tp.psum(x, "i") * 2 + tp.axis_index("i")

    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="pmap of a torch.compile'd function: .* pmap\\(f, compile=True\\)"):
        pf = tp.pmap(step, "i", devices=devices(4))
    got = pf(x).unshard()
    torch.testing.assert_close(got, x.sum(0) * 2 + torch.arange(4.0)[:, None])


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_pytree_collectives_compile_and_check_the_whole_tree(dynamic):
    """Dicts pair their leaves by key whatever their insertion order, and
    replicas whose leaves differ in shape (not in total size) fail instead of
    summing crosswise, also with symbolic shapes."""
    devs = devices(2)
    backend = CountingBackend()

    def f(tree):
        return tp.psum(tree, "i"), tp.all_gather(tree, "i")

    pf = tp.pmap(f, "i", compile=dict(backend=backend, fullgraph=True, dynamic=dynamic), devices=devs)
    for n in (2, 3):
        a, b = torch.ones(n), torch.full((n, 2), 100.0)
        s, g = pf(tp.PerReplica([{"a": a, "b": b}, {"b": b, "a": a}], devs))
        assert s["a"].unshard().eq(2).all() and s["b"].unshard().eq(200).all()
        assert g["a"].unshard().eq(1).all() and g["b"].unshard().eq(100).all()
    assert backend.runs == 4  # compiled graphs ran, no fallback to eager
    bad = tp.PerReplica(
        [{"w": torch.ones(2, 3), "b": torch.ones(4)}, {"w": torch.ones(3, 2), "b": torch.ones(4)}], devs
    )
    with pytest.raises(tp.CollectiveMismatchError, match=r"replica 1: .*'w': float32\[3, 2\]"):
        pf(bad)


def test_graph_breaks_run_partly_eager():
    backend = CountingBackend()

    def f(x):
        y = x * 2
        torch._dynamo.graph_break()
        return tp.psum(y, "i") + 1

    x = torch.randn(4, 2)
    out = tp.pmap(f, "i", compile=dict(backend=backend))(x)
    torch.testing.assert_close(out.unshard(), (2 * x).sum(0).expand(4, 2) + 1)
    assert backend.compiles >= 2


def test_compile_failure_names_the_function():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    def my_step(x):
        return x + 1

    with pytest.raises(tp.CompileError, match="my_step"):
        tp.pmap(my_step, compile=dict(backend=broken_backend))(torch.ones(2, 2))

    def breaks(x):
        torch._dynamo.graph_break()
        return x

    with pytest.raises(tp.CompileError, match="breaks"):
        tp.pmap(breaks, compile=dict(backend="eager", fullgraph=True))(torch.ones(2, 2))


def test_bad_compile_option_is_named():
    with pytest.raises(ValueError, match="backnd"):
        tp.pmap(lambda x: x, compile=dict(backnd="eager"))
    with pytest.raises(TypeError, match="compile"):
        tp.pmap(lambda x: x, compile="yes")
    # Checked when pmap is made, not at the first compile (a graph-less function never compiles).
    with pytest.raises(ValueError, match="pmap: compile= mode must be one of .*'reduce-overhead'.*got 'bogus'"):
        tp.pmap(lambda x: x, compile=dict(mode="bogus"))
    seen_modes = []

    def backend(gm, example_inputs, mode=None):
        seen_modes.append(mode)
        return gm.forward

    f = tp.pmap(lambda x: x * 2, compile=dict(backend=backend, mode="fast"))
    f(torch.ones(2, 3))  # a backend of its own takes modes of its own (Inductor's are checked)
    assert "fast" in seen_modes
    for bad, message in [
        (dict(backend=3), "backend must be a backend name or a callable, got 3"),
        (dict(fullgraph="yes"), "fullgraph must be True, False or None"),
        (dict(dynamic=1), "dynamic must be True, False or None"),
        (dict(options=[("a", 1)]), "options must be a dict"),
    ]:
        with pytest.raises(TypeError, match=f"pmap: compile= {message}"):
            tp.pmap(lambda x: x, compile=bad)


def _mlp(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def test_compiled_training_step_matches_eager_and_single_device():
    torch.manual_seed(0)
    params = {"w1": torch.randn(8, 16), "b1": torch.zeros(16), "w2": torch.randn(16, 1), "b2": torch.zeros(1)}

    def loss_fn(p, x, y):
        return ((_mlp(p, x) - y) ** 2).mean()

    def step(p, x, y):
        g, loss = grad_and_value(loss_fn)(p, x, y)
        g = tp.pmean(g, "i")
        return {k: p[k] - 0.1 * g[k] for k in p}, tp.pmean(loss, "i")

    X, Y = torch.randn(4, 5, 8), torch.randn(4, 5, 1)
    rp = tp.device_put_replicated(params, devices(4))
    g, loss = grad_and_value(loss_fn)(params, X.reshape(-1, 8), Y.reshape(-1, 1))
    for compile in (False, dict(backend="aot_eager", fullgraph=True)):
        new, losses = tp.pmap(step, "i", compile=compile)(rp, X, Y)
        torch.testing.assert_close(losses.unshard(), loss.expand(4))
        for k in params:
            for shard in new[k].shards:
                torch.testing.assert_close(shard, params[k] - 0.1 * g[k], rtol=1e-5, atol=1e-6)


def test_backward_inside_compiled_replica():
    def f(x):
        w = torch.ones(3, 1, requires_grad=True)
        loss = tp.psum(((x @ w) ** 2).sum(), "i")
        loss.backward()
        return w.grad

    x = torch.randn(4, 2, 3)
    eager = tp.pmap(f, "i")(x)
    compiled = tp.pmap(f, "i", compile=dict(backend="aot_eager"))(x)
    torch.testing.assert_close(compiled.unshard(), eager.unshard())
    # psum's backward is psum of the cotangent: each replica's grad is 4x its own.
    own = torch.stack([2 * (x[r] @ torch.ones(3, 1)).T @ x[r] for r in range(4)]).transpose(1, 2)
    torch.testing.assert_close(eager.unshard(), 4 * own)


def test_torch_func_grad_through_a_collective_compiles_per_replica():
    # Per-replica compiles (the threads executor, and every fallback to it) trace the
    # collective inside torch.func.grad's level: it must take the functorch-ready path.
    def f(w, x):
        return torch.func.grad(lambda w: tp.psum((w * x).sum(), "i") ** 2)(w)

    w, x = torch.ones(2, 3), torch.arange(6.0).reshape(2, 3)
    with executor("threads"):
        compiled = tp.pmap(f, "i", compile=dict(backend="aot_eager", fullgraph=True))(w, x)
    # JAX's rule: psum's cotangent is psummed, so each replica gets 2 * total * 2 * x (total 15).
    torch.testing.assert_close(compiled.unshard(), 60 * x)


def _gradient_penalty(f, x, w):
    (gw,) = torch.autograd.grad(f(x, w).sum(), w, create_graph=True)
    return torch.autograd.grad((gw**2).sum(), (x, w))


def test_second_order_through_a_call_compiled_without_aot_autograd():
    # Dynamo alone runs the replicas' ops eagerly, so their backward is differentiable.
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = tp.pmap(lambda r, w: tp.psum(torch.sin(r * w), "i"), "i", in_axes=(0, None), compile=dict(backend="eager"))
    got = _gradient_penalty(f, x, w)
    want = _gradient_penalty(lambda x, w: torch.sin(x * w).sum(0).expand(4, 3), x, w)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_second_order_through_aot_autograd_is_an_error_not_a_zero():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = tp.pmap(lambda r, w: torch.sin(r * w), in_axes=(0, None), compile=dict(backend="aot_eager"))
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        _gradient_penalty(f, x, w)


@pytest.mark.slow
def test_inductor_default_compiles_and_matches():
    x = torch.randn(2, 8)
    out = tp.pmap(lambda v: tp.psum(torch.relu(v) * 3, "i"), "i", compile=True)(x)
    torch.testing.assert_close(out.unshard(), (torch.relu(x) * 3).sum(0).expand(2, 8))


@pytest.mark.slow
def test_module_idiom_compiles_per_replica_without_falling_back(sixteen_devices):
    # PerReplica modules and optimizers differ per replica, and Dynamo guards
    # on them: every replica gets its own program, and 16 replicas must not run
    # into the recompile limit (which would silently fall back to eager).
    def step(model, opt, x, y):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        tp.pmean_grads(model, "i")
        opt.step()
        return tp.pmean(loss.detach(), "i")

    import logging

    hits = []
    handler = logging.Handler()
    handler.emit = lambda record: hits.append(record.getMessage()) if "recompile_limit" in record.getMessage() else None
    logging.getLogger("torch._dynamo").addHandler(handler)
    devs = sixteen_devices
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 4, 3), torch.randn(16, 4, 1)
    results = {}
    for mode in ("eager", "compiled"):
        models, opts = tp.replicate(model, lambda p: torch.optim.SGD(p, lr=0.1), devs)
        backend = CountingBackend()
        pstep = tp.pmap(step, "i", compile=dict(backend=backend) if mode == "compiled" else False)
        for _ in range(3):
            pstep(models, opts, x, y)
        compiles, backend.runs = backend.compiles, 0
        pstep(models, opts, x, y)
        if mode == "compiled":
            assert backend.compiles == compiles  # warm: nothing new to compile
            assert backend.runs >= 16  # every replica ran a compiled graph
        results[mode] = models[0].weight.detach().clone()
    logging.getLogger("torch._dynamo").removeHandler(handler)
    assert hits == []  # Dynamo never gave up and fell back to eager
    torch.testing.assert_close(results["compiled"], results["eager"])


@pytest.mark.parametrize("name", ["threads", "stacked", "lockstep"])
def test_compiled_replicas_whose_arguments_share_memory_write_as_eager_does(name):
    # f(t, t) gives each replica two views of the caller's t: AOTAutograd merged them into their
    # common base (all of t, every replica's rows) and wrote it back whole after the in-place
    # add, over the other replicas' rows; lockstep's compiled segments read y before x's write.
    def g(x, y):
        x.add_(1)
        return x * 10 + y

    def run(**kwargs):
        t, a, b = torch.ones(4, 3), torch.ones(4, 3), torch.full((4, 3), 5.0)
        f = tp.pmap(g, **kwargs)
        outs = [f(t, t).unshard(), f(t, t).unshard(), f(a, b).unshard()]
        return outs + [t, a, b]

    with executor("threads"):
        want = run()
    with executor(name, allow_fallback=True):
        got = run(compile=dict(backend="aot_eager"))
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_, w, rtol=0, atol=0)
    disjoint = torch.ones(4, 6)  # views of one tensor that share no memory stay compiled
    with executor("threads"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tp.pmap(g, compile=dict(backend="aot_eager"))(disjoint[:, :3], disjoint[:, 3:])
    assert disjoint[:, :3].eq(2).all() and disjoint[:, 3:].eq(1).all()


def test_dynamo_settings_come_back_when_capture_scopes_end_in_any_order():
    """Scopes on threads overlap where the gate is paused, and may end in any order: the newest
    open one's settings apply, and the caller's come back when the last ends."""
    from torchpmap._compile import capture_config

    config = torch._dynamo.config
    before = (config.skip_nnmodule_hook_guards, config.enable_dynamo_decompositions)
    assert before == (True, True)  # Dynamo's defaults
    stacked, compiled = capture_config(eager_rounding=True), capture_config(eager_rounding=False)
    stacked.__enter__()
    assert (config.skip_nnmodule_hook_guards, config.enable_dynamo_decompositions) == (False, False)
    compiled.__enter__()
    assert (config.skip_nnmodule_hook_guards, config.enable_dynamo_decompositions) == (False, True)
    stacked.__exit__(None, None, None)  # the older scope ends first
    assert (config.skip_nnmodule_hook_guards, config.enable_dynamo_decompositions) == (False, True)
    compiled.__exit__(None, None, None)
    assert (config.skip_nnmodule_hook_guards, config.enable_dynamo_decompositions) == before


@pytest.mark.parametrize("how", ["threads", "stacked"])
def test_compile_tells_a_negative_zero_from_zero(how):
    # Dynamo guards a float with ==, and -0.0 == 0.0: the threads executor's compiled
    # copies, keyed by device only, replayed 0.0's graph for -0.0 (found by a hunt).
    import math

    f = lambda x, s, b: x + math.copysign(1.0, s) + 10 * math.copysign(1.0, b)  # noqa: E731
    x = torch.zeros(2, 3)
    with executor(how):
        p = tp.pmap(f, static_broadcasted_argnums=1, in_axes=(0, None), devices=devices(2), compile=True)
        for s, b in [(0.0, 0.0), (0.0, 0.0), (-0.0, 0.0), (0.0, -0.0), (-0.0, -0.0)]:
            want = math.copysign(1.0, s) + 10 * math.copysign(1.0, b)
            assert torch.equal(p(x, s, b).unshard(), torch.full((2, 3), want)), (s, b)


@pytest.mark.parametrize("how", ["threads", "stacked"])
def test_compile_differentiates_a_tiled_all_gather(how):
    # Its backward, a reduce_scatter, gave each replica a block of one sum at an offset:
    # Inductor's alignment assert on the op's output failed (found by a hunt).
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    x = torch.linspace(-1, 1, 12).reshape(4, 3).requires_grad_()

    def f(r):
        return tp.all_gather(r * w, "i", tiled=True).cos() * r.sum()

    grads = []
    for options in (None, True):
        with executor(how if options else "threads", allow_fallback=True):
            w.grad = x.grad = None
            (tp.pmap(f, "i", devices=devices(4), compile=options)(x).unshard() ** 2).sum().backward()
            grads.append((w.grad.clone(), x.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("how", ["threads", "stacked", "lockstep"])
def test_compile_writes_an_argument_another_argument_shares_memory_with_as_eager(how):
    # f(x, x.detach()): lockstep's compiled segment read b before a's write (a silent
    # [43, ...] for [44, ...]); threads and stacked failed to compile. The memory check went
    # by _base, which x.detach()'s slices do not share with x's (found by a hunt).
    def f(a, b):
        a.add_(1)
        return a * 10 + b

    with executor(how, allow_fallback=True):
        p = tp.pmap(f, devices=devices(4), compile=True)
        for _ in range(2):
            x = torch.arange(12.0).reshape(4, 3)
            want = (torch.arange(12.0).reshape(4, 3) + 1) * 11
            assert torch.equal(p(x, x.detach()).unshard(), want)


def test_lockstep_compile_refuses_an_out_of_range_one_hot_label():
    # Inductor's scatter does not check its index: a label of 4 for 4 classes gave a row of
    # zeros, where eager raises (found by a hunt).
    import torch.nn.functional as F

    with executor("lockstep", allow_fallback=True):
        p = tp.pmap(lambda lab: tp.psum(F.one_hot(lab, 4).float(), "i"), "i", devices=devices(4), compile=True)
        good = torch.zeros(4, 2, dtype=torch.long)
        p(good)
        bad = good.clone()
        bad[3, 0] = 4
        with pytest.raises(RuntimeError, match="Class values must be|out of bounds"):
            p(bad)
        want = torch.zeros(4, 2, 4)
        want[..., 0] = 4  # every replica's labels are 0, summed over 4 replicas
        torch.testing.assert_close(p(good).unshard(), want)  # and later calls still run


@pytest.mark.threads_only
def test_replicas_compile_a_backward_once_not_at_once():
    # AOTAutograd compiles a graph's backward lazily, at its first run, with no lock. A
    # backward from outside runs every replica's on its own worker at the same moment: the
    # same backward graph would be compiled by four threads at once (Inductor is not
    # thread-safe). It compiles with its forward, under the compile gate.
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    compiles = {"forward": 0, "backward": 0}

    def counting(kind):
        def compiler(gm, example_inputs):
            compiles[kind] += 1
            time.sleep(0.2)  # a compile takes a while: the workers all arrive during it
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"))
    x = torch.randn(4, 5, 6)
    w = torch.randn(6, 6, requires_grad=True)
    out = tp.pmap(lambda x, w: torch.tanh(x @ w), "i", in_axes=(0, None), compile=dict(backend=backend))(x, w)
    out.sum().backward()
    assert compiles == {"forward": 1, "backward": 1}
    (want,) = torch.autograd.grad(torch.tanh(x @ w).sum(), w)
    torch.testing.assert_close(w.grad, want)


def test_a_collective_of_a_constant_compiles_and_runs_on_every_replica():
    # Tracing folded ops on constants by running them: psum(torch.tensor(1.0)) exchanged for
    # real on the thread tracing one replica while the others waited to enter Dynamo, and the
    # call hung past the collective timeout (the gate's holder counted as compiling for ever).
    def count(x):
        return x + tp.psum(torch.tensor(1.0), "i") + tp.pmax(torch.tensor(-1.0), "i")

    f = tp.pmap(count, "i", devices=devices(4), compile=dict(backend="aot_eager"))
    for _ in range(2):
        out, err, _ = call_with_deadline(f, torch.zeros(4, 3), deadline=60)
        assert err is None, err
        assert out.unshard().eq(3).all()


@pytest.mark.threads_only
def test_a_collective_that_runs_during_a_compile_fails_at_once(monkeypatch):
    # The other replicas wait for the gate until the compile ends: waiting for them would hang.
    def exchanging_backend(gm, example_inputs):
        tp.psum(torch.ones(()), "i")
        return gm.forward

    monkeypatch.setattr(_config, "_timeout", _config._timeout)  # restored after the test
    tp.set_collective_timeout(30)
    f = tp.pmap(lambda x: x * 2, "i", devices=devices(2), compile=dict(backend=exchanging_backend))
    err, seconds = expect_error(f, torch.zeros(2, 3), kind=tp.CompileError, deadline=60)
    assert "ran for real while Dynamo compiled replica" in str(err.__cause__ or err)
    assert seconds < 10


@pytest.mark.threads_only
def test_a_float_argument_is_a_constant_of_the_per_replica_program():
    # Dynamo passed a float as a symbol from its second value on: it simplified (s + c) - c to s
    # where Python rounds, and Inductor could keep an earlier value of it for good
    # (pytorch/pytorch#194976; math.floor(s) stayed 2 once s became a symbol at 2.25).
    def f(x, s):
        return x * ((s + 1e8) - 1e8) + math.floor(s)

    x = torch.ones(2, 3, dtype=torch.float64)
    compiled = tp.pmap(f, "i", in_axes=(0, None), devices=devices(2), compile=dict(backend="aot_eager"))
    values = [1.25, 2.5, -0.75, 3.999, 0.1, 7.3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in values:
            got = compiled(x, s).unshard()
            assert torch.equal(got, x * ((s + 1e8) - 1e8) + math.floor(s)), s
    # Each value compiles again, as the stacked executor captures again: a float that keeps
    # changing is better passed as a 0-dim tensor, and a warning says so once.
    said = [w for w in caught if "took a new value" in str(w.message)]
    assert len(said) == 1 and "0-dim tensor" in str(said[0].message)


@pytest.mark.threads_only
def test_an_eager_collective_runs_while_another_thread_compiles():
    # The check above is of this thread's compile: the gate's compiling flag is process-wide
    # (Dynamo's callbacks set it for any thread's torch.compile), and an eager collective of
    # the gate's holder (between compiled graphs) raised while another thread compiled (review).
    from torchpmap._compile import DYNAMO_GATE

    @torch._dynamo.disable
    def eager_total(x):
        return tp.psum(x, "i")

    f = tp.pmap(lambda x: eager_total(x * 2) + 1, "i", devices=devices(2), compile=dict(backend="eager"))
    x = torch.arange(6.0).reshape(2, 3)
    f(x)
    DYNAMO_GATE.compile_started()  # as another thread's torch.compile does
    try:
        out = f(x)
    finally:
        DYNAMO_GATE.compile_ended()
    torch.testing.assert_close(out.unshard(), (2 * x).sum(0).expand(2, 3) + 1)


def test_a_reduction_of_a_dtype_torch_cannot_reduce_names_the_collective_when_compiled():
    # Traced, the dtype probe ran on fake tensors, which never fail: torch's own error came from
    # inside the exchange at run time (review).
    x = torch.arange(8).reshape(2, 4).to(torch.uint32)
    for options in (dict(backend="aot_eager"), dict(backend="aot_eager", fullgraph=True)):
        f = tp.pmap(lambda v: tp.psum(v, "i"), "i", devices=devices(2), compile=options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a captured executor may fall back
            with pytest.raises(TypeError, match=r"^psum: torch cannot sum torch\.uint32"):
                f(x)


@pytest.mark.threads_only
def test_a_backward_through_compiled_replicas_may_retain_the_graph():
    # Compiling the backward ahead (to compile it once) made AOTAutograd donate its buffers,
    # and then refuse retain_graph=True and create_graph=True with its own message (review).
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)
    f = tp.pmap(
        lambda x, w: tp.pmean(torch.tanh(x @ w), "i"), "i", in_axes=(0, None), compile=dict(backend="aot_eager")
    )
    loss = f(x, w).unshard().sum()
    (first,) = torch.autograd.grad(loss, w, retain_graph=True)
    (second,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(first, second)
    (want,) = torch.autograd.grad(torch.tanh(x @ w).sum(), w)
    torch.testing.assert_close(first, want)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        (g,) = torch.autograd.grad(f(x, w).unshard().sum(), w, create_graph=True)
        g.sum().backward()


def test_compiled_copies_that_write_outside_objects_say_their_writes_can_be_lost():
    # Dynamo replays a frame's writes to outside objects after its graph, from what it read
    # before, while the other replicas run theirs: appends to a shared list were lost (20 calls
    # of 4 replicas kept 44 entries of 80), without a word (found by a hunt).
    log = []

    def f(x):
        log.append(x * 2)
        return x + 1

    def g(x):
        return x + 1

    tp.set_executor("threads")
    with pytest.warns(RuntimeWarning, match="writes Python objects it did not create"):
        tp.pmap(f, compile=dict(backend="eager"), devices=devices(2))(torch.zeros(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tp.pmap(g, compile=dict(backend="eager"), devices=devices(2))(torch.zeros(2, 3))
