"""The executor (one persistent worker per device), failures, the caller's
thread-local state in the replicas, nested pmap, concurrent callers, and
autograd through a pmap call from outside."""

import gc
import threading
import time
import tracemalloc
import weakref

import pytest
import torch
from helpers import call_with_deadline, rows
from helpers import devices as _devices

import torchpmap as tp


def _rows(n, *rest, dtype=torch.float32):
    return rows(n, *rest, dtype=dtype, scale=0.3, offset=-1)


def _eventually(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- persistent workers ------------------------------------------------------------------------


def test_one_persistent_worker_per_device():
    devs = _devices(4)
    seen = []

    def f(r):
        seen.append((int(tp.axis_index("i")), threading.get_ident(), threading.current_thread().name))
        return r

    p = tp.pmap(f, "i", devices=devs)
    for _ in range(5):
        p(_rows(4, 2))
    by_replica = {}
    for i, ident, name in seen:
        by_replica.setdefault(i, set()).add((ident, name))
    assert all(len(v) == 1 for v in by_replica.values())  # the same thread every call
    threads = [next(iter(by_replica[i])) for i in range(4)]
    assert len({ident for ident, _ in threads}) == 4  # a different thread per device
    assert [name for _, name in threads] == [f"torchpmap-worker-{d.type}:{d.index}" for d in devs]
    assert threading.main_thread().ident not in {ident for ident, _ in threads}


@pytest.mark.slow
def test_thread_count_stays_flat_over_10000_calls():
    devs = _devices(2)
    p = tp.pmap(lambda r: r + 1, devices=devs)
    x = torch.ones(2, 3)
    p(x)  # workers for these devices exist from now on
    workers = {t.ident for t in threading.enumerate() if t.name.startswith("torchpmap-worker")}
    before = {t.ident for t in threading.enumerate()}
    count = threading.active_count()
    for i in range(10_000):
        y = p(x)
        if i % 250 == 0:
            # (threads of other tests may end meanwhile, but none may start)
            assert threading.active_count() <= count, f"a thread was started by call {i}"
            assert {t.ident for t in threading.enumerate()} <= before
    assert {t.ident for t in threading.enumerate() if t.name.startswith("torchpmap-worker")} == workers
    torch.testing.assert_close(y.unshard(), x + 1)


@pytest.mark.slow
def test_memory_stays_flat_over_many_calls():
    devs = _devices(2)
    p = tp.pmap(lambda r, w: (r * w).sum() + r, in_axes=(0, None), devices=devs)
    x, w = torch.ones(2, 8), torch.ones(8)
    for _ in range(200):
        p(x, w)
    # Object count first, without tracemalloc: its snapshots are objects too.
    gc.collect()
    objects_before = len(gc.get_objects())
    for _ in range(1500):
        p(x, w)
    gc.collect()
    assert len(gc.get_objects()) - objects_before < 300
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot()
        for _ in range(1500):
            p(x, w)
        gc.collect()
        end = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in end.compare_to(start, "filename"))
    assert growth < 64 * 1024, f"{growth} bytes more after 1500 calls"


def test_idle_workers_do_not_keep_the_last_call_alive():
    x = torch.ones(4, 256)
    out = tp.pmap(lambda r: r * 2)(x)
    refs = [weakref.ref(x)] + [weakref.ref(s) for s in out.shards]
    del x, out
    gc.collect()
    assert _eventually(lambda: all(r() is None for r in refs)), "a worker still holds the last call's tensors"


# -- failures ------------------------------------------------------------------------------------


class CustomError(Exception):
    pass


@pytest.mark.parametrize("n, bad", [(1, 0), (2, 1), (4, 2), (8, 5)])
def test_exception_reaches_the_caller_with_the_replica_index(n, bad):
    devs = _devices(n)

    def f(r):
        if int(tp.axis_index("i")) == bad:
            raise CustomError(f"broken replica {bad}")
        return r

    with pytest.raises(CustomError, match=rf"broken replica {bad}") as info:
        tp.pmap(f, "i", devices=devs)(_rows(n, 2))
    notes = getattr(info.value, "__notes__", [])
    assert notes == [f"(raised in pmap replica {bad} on device {devs[bad]})"]


def test_exception_while_others_wait_in_a_collective_does_not_hang():
    devs = _devices(4)

    def f(r):
        if int(tp.axis_index("i")) == 2:
            raise KeyError("replica two")
        return tp.psum(r, "i")

    t0 = time.monotonic()
    with pytest.raises(KeyError, match="replica two") as info:
        tp.pmap(f, "i", devices=devs)(_rows(4, 3))
    assert time.monotonic() - t0 < 30
    assert any("replica 2" in note for note in info.value.__notes__)


def test_pool_stays_usable_after_failures():
    devs = _devices(4)

    def f(r):
        if int(tp.axis_index("i")) in (0, 3):
            raise RuntimeError("boom")
        return tp.psum(r, "i")

    for _ in range(3):
        with pytest.raises(RuntimeError, match="boom") as info:
            tp.pmap(f, "i", devices=devs)(_rows(4, 3))
        assert info.value.__notes__ == [f"(raised in pmap replica 0 on device {devs[0]})"]
    x = _rows(4, 3)
    y = tp.pmap(lambda r: tp.psum(r, "i"), "i", devices=devs)(x)
    torch.testing.assert_close(y.unshard(), x.sum(0).expand(4, 3))
    n = tp.local_device_count()
    torch.testing.assert_close(tp.pmap(lambda r: r - 1)(_rows(n, 2)).unshard(), _rows(n, 2) - 1)


# -- the caller's state in the replicas ------------------------------------------------------------


def _flags(r):
    return torch.tensor([torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")])


def test_grad_mode_carries_into_replicas():
    p = tp.pmap(_flags)
    x = _rows(4, 2)
    assert p(x).unshard().tolist() == [[True, False, False]] * 4
    with torch.no_grad():
        assert p(x).unshard().tolist() == [[False, False, False]] * 4
        with torch.enable_grad():
            assert p(x).unshard().tolist() == [[True, False, False]] * 4
    torch.set_grad_enabled(False)
    try:
        assert p(x).unshard().tolist() == [[False, False, False]] * 4
    finally:
        torch.set_grad_enabled(True)
    assert p(x).unshard().tolist() == [[True, False, False]] * 4  # nothing sticks to the workers


@pytest.mark.threads_only
def test_replicas_run_backward_passes_on_their_own_thread_once_cuda_is_in_use(monkeypatch):
    # A replica on a CPU device may hold a CUDA node in its graph (``.cuda()`` inside it) once
    # CUDA is in use: the engine would queue that node's backward on its CUDA device thread,
    # which the caller's backward through the call blocks while it waits for the replicas.
    def multithreaded(r):
        return r * 0 + torch._C._is_multithreading_enabled()

    x = _rows(4, 2)
    assert tp.pmap(multithreaded)(x).unshard().eq(1).all()  # CUDA unused: as the engine has it
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert tp.pmap(multithreaded)(x).unshard().eq(0).all()


def test_no_grad_results_do_not_require_grad():
    x = _rows(4, 2).requires_grad_()
    with torch.no_grad():
        y = tp.pmap(lambda r: r * 2)(x)
    assert not y.requires_grad
    assert tp.pmap(lambda r: r * 2)(x).requires_grad


def test_inference_mode_carries_into_replicas():
    x = _rows(4, 2)
    with torch.inference_mode():
        flags = tp.pmap(_flags)(x).unshard().tolist()
        y = tp.pmap(lambda r: r + 1)(x)
    assert flags == [[False, True, False]] * 4
    assert all(s.is_inference() for s in y.shards)
    assert tp.pmap(_flags)(x).unshard().tolist() == [[True, False, False]] * 4


def test_autocast_carries_into_replicas():
    a, b = _rows(4, 3, 5), _rows(4, 5, 2)
    p = tp.pmap(lambda x, y: x @ y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = p(a, b)
        flags = tp.pmap(_flags)(a).unshard().tolist()
    assert y.dtype == torch.bfloat16
    assert flags == [[True, False, True]] * 4
    torch.testing.assert_close(y.unshard().float(), a @ b, rtol=2e-2, atol=2e-2)
    assert p(a, b).dtype == torch.float32


@pytest.mark.parametrize(
    "leak",
    [
        lambda: torch.set_grad_enabled(False),
        lambda: torch.set_num_threads(7),
        lambda: torch.set_autocast_enabled("cpu", True),
        lambda: torch.inference_mode().__enter__(),  # entered, never exited
    ],
    ids=["grad mode", "intra-op threads", "autocast", "inference mode"],
)
def test_state_a_replica_changes_does_not_leak_into_later_calls(leak):
    def changes_state(r):
        leak()
        return r

    tp.pmap(changes_state)(_rows(4, 2))
    flags = tp.pmap(_flags)(_rows(4, 2)).unshard().tolist()
    assert flags == [[True, False, False]] * 4
    threads = tp.pmap(lambda r: r * 0 + torch.get_num_threads())(_rows(4, 2)).unshard()
    assert threads.eq(max(1, torch.get_num_threads() // 4)).all()


def test_nested_pmap_is_not_supported():
    inner = tp.pmap(lambda r: r * 2)

    def outer(r):
        return inner(r.reshape(1, -1))

    with pytest.raises(NotImplementedError, match=r"nested pmap is not supported") as info:
        tp.pmap(outer)(_rows(2, 3))
    assert "replica 0" in info.value.__notes__[0]
    torch.testing.assert_close(inner(_rows(2, 3)).unshard(), 2 * _rows(2, 3))  # still fine outside


# -- concurrent callers ----------------------------------------------------------------------------


def test_two_threads_calling_pmaps_with_collectives_do_not_deadlock():
    devs = _devices(4)
    forward = tp.pmap(lambda r: tp.psum(r, "i"), "i", devices=devs)
    backward = tp.pmap(lambda r: tp.pmean(r, "j") * 2, "j", devices=list(reversed(devs)))
    pairs = tp.pmap(lambda r: tp.psum(r, "k"), "k", devices=devs[1:3])
    errors = []

    def loop(p, scale, n, seed):
        try:
            for i in range(150):
                x = _rows(n, 3) + seed + i
                torch.testing.assert_close(p(x).unshard(), x.sum(0).expand(n, 3) * scale)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=loop, args=(forward, 1.0, 4, 0)),
        threading.Thread(target=loop, args=(backward, 0.5, 4, 1)),
        threading.Thread(target=loop, args=(pairs, 1.0, 2, 2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlock: a caller thread never finished"
    assert errors == []


# -- autograd through a pmap call ----------------------------------------------------------------


def _double(*shape):
    g = torch.Generator().manual_seed(sum(shape) * 7 + len(shape))
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gradcheck_mapped_argument(n):
    _devices(n)
    f = tp.pmap(lambda r: (r.sin() * r).cumsum(0))
    assert torch.autograd.gradcheck(lambda x: f(x).unshard(), (_double(n, 3),))


@pytest.mark.parametrize("n", [2, 4])
def test_gradcheck_mapped_and_broadcast_arguments(n):
    _devices(n)
    f = tp.pmap(lambda r, w, b: torch.tanh(r @ w) + b["c"], in_axes=(0, None, {"c": None}))
    x, w, c = _double(n, 3), _double(3, 2), _double(2)
    assert torch.autograd.gradcheck(lambda x, w, c: f(x, w, {"c": c}).unshard(), (x, w, c))


def test_gradcheck_other_axes_and_keyword_arguments():
    f = tp.pmap(lambda r, k: r.exp() * k, in_axes=1, out_axes=1)
    x, k = _double(3, 4), _double(4, 3)
    assert torch.autograd.gradcheck(lambda x, k: f(x, k=k).unshard(), (x, k))


def test_backward_matches_the_unmapped_computation():
    x, w = _double(4, 3), _double(3)
    loss = tp.pmap(lambda r, w: ((r * w).sin() ** 2).sum(), in_axes=(0, None))(x, w).sum()
    loss.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ((x * w).sin() ** 2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_out_axes_none_output_counts_once():
    x, w = _double(4, 3), _double(3)
    f = tp.pmap(lambda r, w: (w * w).sum() * 3, in_axes=(0, None), out_axes=None)
    loss = f(x, w)
    assert type(loss) is torch.Tensor and loss.requires_grad
    loss.backward()
    torch.testing.assert_close(w.grad, 6 * w.detach())  # not 4x: one output, seen once
    assert x.grad is None or torch.count_nonzero(x.grad) == 0
    g = tp.pmap(lambda r, w: (w.exp() * 2).sum(), in_axes=(0, None), out_axes=None)
    assert torch.autograd.gradcheck(lambda x, w: g(x, w), (x.detach().requires_grad_(), w.detach().requires_grad_()))


def test_gradients_flow_through_chained_pmaps_and_sharded_tensors():
    x = _double(4, 3)
    y = tp.pmap(lambda r: r * 2)(x)
    z = tp.pmap(lambda r: r.sin())(y)  # y fed back: shards in place
    (z.sum() + (y * y).sum()).backward()
    torch.testing.assert_close(x.grad, 2 * torch.cos(2 * x.detach()) + 8 * x.detach())


def test_second_order_gradients_through_a_call():
    """A gradient penalty: the gradient taken with create_graph=True is itself
    differentiable (JAX's tests check order 2 through pmap)."""
    x, w = _double(4, 3), _double(3)
    f = tp.pmap(lambda r, w: torch.sin(r * w), in_axes=(0, None))
    (gw,) = torch.autograd.grad(f(x, w).sum(), w, create_graph=True)
    assert gw.requires_grad
    (ref_gw,) = torch.autograd.grad(torch.sin(x * w).sum(), w, create_graph=True)
    torch.testing.assert_close(gw, ref_gw)
    gx, gww = torch.autograd.grad((gw**2).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref_gw**2).sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gww, rw)


def test_second_order_gradients_through_a_call_with_collectives():
    x = _double(4, 3)
    f = tp.pmap(lambda r: tp.psum(r.sin() * r, "i") * r, "i")
    (gx,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    ref = (x.sin() * x).sum(0) * x
    (ref_gx,) = torch.autograd.grad(ref.sum(), x, create_graph=True)
    torch.testing.assert_close(gx, ref_gx)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    (ref_ggx,) = torch.autograd.grad(ref_gx.sum(), x)
    torch.testing.assert_close(ggx, ref_ggx)


def test_gradient_penalty_matches_single_device_pytorch():
    """WGAN-GP style: penalise the norm of the input gradient, through a call
    with a mapped input, a broadcast weight, a captured bias and a pmean, then
    differentiate the total with respect to all three."""
    x, w, b = _double(4, 5, 3), _double(3, 2), _double(2)

    def critic(r, w):
        h = torch.tanh(r @ w + b)
        return h.sum(-1) * tp.pmean(h.mean(), "i")

    def reference(x, w):
        h = torch.tanh(x @ w + b)
        return h.sum(-1) * h.mean(dim=(1, 2)).mean()

    def penalised_loss(f):
        out = f(x, w)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return out.mean() + 10 * ((gx.norm(dim=-1) - 1) ** 2).mean()

    got = torch.autograd.grad(penalised_loss(tp.pmap(critic, "i", in_axes=(0, None))), (x, w, b))
    want = torch.autograd.grad(penalised_loss(reference), (x, w, b))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_second_order_when_the_loss_uses_the_output_again():
    """The cotangent depends on the output ((y**2).sum()) and the penalised
    loss uses y again: one backward pass differentiates through the replicas'
    graphs from two nodes, and neither may free what the other needs."""
    x = _double(4, 3)
    f = tp.pmap(lambda r: tp.psum(r.sin() * r, "i") * r, "i")
    y = f(x)
    (gx,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad((gx**2).sum() + y.sum(), x)
    ref = (x.sin() * x).sum(0) * x
    (ref_gx,) = torch.autograd.grad((ref**2).sum(), x, create_graph=True)
    (ref_ggx,) = torch.autograd.grad((ref_gx**2).sum() + ref.sum(), x)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(ggx, ref_ggx)


def _three_orders(y, x):
    (g1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad((g1**2).sum(), x, create_graph=True)
    (g3,) = torch.autograd.grad(g2.sum(), x)
    return g1, g2, g3


def test_third_order_gradients_through_a_call():
    x = _double(4, 3)
    f = tp.pmap(lambda r: tp.psum(r.sin() * r, "i") * r.exp(), "i")
    got = _three_orders(f(x), x)
    want = _three_orders((x.sin() * x).sum(0) * x.exp(), x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_hessian_through_a_call():
    x, w = _double(4, 3).detach(), _double(3).detach()
    f = tp.pmap(lambda r, w: tp.psum(torch.sin(r * w), "i"), "i", in_axes=(0, None))
    got = torch.autograd.functional.hessian(lambda w: f(x, w).sum(), w)
    want = torch.autograd.functional.hessian(lambda w: 4 * torch.sin(x * w).sum(), w)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gradgradcheck_mapped_broadcast_and_captured(n):
    _devices(n)

    def call(x, w, c):
        f = tp.pmap(lambda r, w: torch.tanh(r @ w) * c + tp.psum(r.sin(), "i").sum(), "i", in_axes=(0, None))
        return f(x, w).unshard()

    # c is closed over: it must be on the replicas' device (a GPU on the cuda platform).
    x, w, c = _double(n, 3), _double(3, 2), _double(2).detach().to(tp.local_devices()[0].type).requires_grad_()
    assert torch.autograd.gradgradcheck(call, (x, w, c))


def test_gradgradcheck_identity_replicated_and_non_differentiable_outputs():
    x, w = _double(4, 3), _double(3)
    assert torch.autograd.gradgradcheck(lambda x: tp.pmap(lambda r: r)(x).unshard(), (x,))
    same_w = tp.pmap(lambda r, w: w, in_axes=(0, None), out_axes=None)
    assert torch.autograd.gradgradcheck(same_w, (x, w))
    with_index = tp.pmap(lambda r: (r.sin() * r, r.argmax()))  # an integer output gets no cotangent leaf
    assert torch.autograd.gradgradcheck(lambda x: with_index(x)[0].unshard(), (x,))


def test_second_order_for_per_replica_captured_parameters():
    """Each replica's own parameter (a PerReplica) reaches its graph as a leaf."""
    devs = _devices(4)
    params = [(_double(3) * (i + 1)).detach().requires_grad_() for i in range(4)]
    x = _double(4, 3)
    f = tp.pmap(lambda r, p: tp.psum((r * p).sin(), "i"), "i", devices=devs)
    y = f(x, tp.PerReplica(params, devs))
    grads = torch.autograd.grad(y.sum(), params, create_graph=True)
    got = torch.autograd.grad(sum((g**2).sum() for g in grads), (x, *params))
    ref = torch.stack([(x[i] * params[i]).sin() for i in range(4)]).sum(0).expand(4, 3)
    ref_grads = torch.autograd.grad(ref.sum(), params, create_graph=True)
    want = torch.autograd.grad(sum((g**2).sum() for g in ref_grads), (x, *params))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def _recording_graphs(saved):
    """A replica function that keeps a weak reference to a tensor its graph saves."""

    def f(r, w):
        h = r.exp()
        saved.append(weakref.ref(h))
        return (h * w).sin()

    return f


def test_first_order_gradients_stay_plain_and_free_the_replica_graphs():
    """Without create_graph the gradient does not require grad, and the
    replicas' graphs are freed by the backward that used them."""
    saved = []
    x, w = _double(4, 3), _double(3)
    y = tp.pmap(_recording_graphs(saved), in_axes=(0, None))(x, w)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert not gx.requires_grad and not gw.requires_grad
    del y
    assert all(ref() is None for ref in saved)


def test_second_order_frees_the_replica_graphs_once_dropped():
    saved = []
    x, w = _double(4, 3), _double(3)
    y = tp.pmap(_recording_graphs(saved), in_axes=(0, None))(x, w)
    (gw,) = torch.autograd.grad((y**2).sum(), w, create_graph=True)
    torch.autograd.grad((gw**2).sum() + y.sum(), (x, w))
    del y, gw
    assert all(ref() is None for ref in saved)  # no reference cycle keeps them


# -- CUDA --------------------------------------------------------------------------------------

needs_cuda = pytest.mark.cuda


@needs_cuda
def test_cuda_outputs_are_ready_for_the_caller():
    devs = tp.local_devices()
    n = len(devs)
    x = torch.randn(n, 256, 256, device=devs[0])
    y = tp.pmap(lambda r: (r @ r).relu() + 1)(x)
    assert [s.device for s in y.shards] == devs
    for i, d in enumerate(devs):
        ref = (x[i].to(d) @ x[i].to(d)).relu() + 1  # on the caller's stream, no synchronize
        torch.testing.assert_close(y.shards[i], ref)


@needs_cuda
def test_cuda_autocast_carries_into_replicas():
    devs = tp.local_devices()
    x = torch.randn(len(devs), 8, 8, device=devs[0])
    with torch.autocast("cuda", dtype=torch.float16):
        y = tp.pmap(lambda r: r @ r)(x)
    assert y.dtype == torch.float16


def test_every_custom_op_is_kept_out_of_cuda_graphs():
    # A CUDA graph would record one exchange and replay it without communicating.
    for name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute", "axis_index"):
        assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.torchpmap, name).default.tags, name


@needs_cuda
@pytest.mark.slow
def test_cuda_reduce_overhead_compile_still_communicates_on_every_call():
    devs = tp.local_devices()
    n = len(devs)
    f = tp.pmap(lambda x: tp.psum(x, "i") + tp.axis_index("i"), "i", compile=dict(mode="reduce-overhead"))
    for step in range(4):  # past cudagraph trees' warm-up: replays must still exchange
        x = torch.full((n, 8), float(step), device=devs[0])
        out = f(x)
        for r in range(n):
            want = torch.full((8,), float(step * n + r), device=devs[r])
            torch.testing.assert_close(out.shards[r], want)


@needs_cuda
def test_cuda_backward_through_a_call_from_outside_does_not_hang():
    # The engine runs the call's backward on its CUDA device thread, which then waits for
    # the replicas: their own backward passes must not need that thread.
    devs = tp.local_devices()
    x = torch.linspace(-1, 1, len(devs) * 4, device=devs[0]).reshape(len(devs), 4).requires_grad_()

    def outside_backward():
        y = tp.pmap(lambda r: tp.psum(r.sin(), "i") * r, "i")(x)
        (g,) = torch.autograd.grad(y.unshard().sum(), x)
        return g

    g, error, seconds = call_with_deadline(outside_backward, deadline=60.0)
    assert error is None and seconds < 60.0, (error, seconds)
    xd = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad((xd.sin().sum(0) * xd).sum(), xd)
    torch.testing.assert_close(g, want)


@needs_cuda
@pytest.mark.slow
def test_cuda_compiled_replica_with_a_backward_through_a_collective_does_not_wait_for_the_timeout():
    devs = tp.local_devices()

    def step(w, x):
        w = w.detach().requires_grad_()
        loss = tp.psum((w * x).sum(), "i")
        loss.backward()  # eager backward (a graph break) through psum's backward
        return w.grad

    x = torch.randn(len(devs), 8, device=devs[0])
    w = torch.ones(8, device=devs[0])
    f = tp.pmap(step, "i", in_axes=(None, 0), compile=dict(backend="aot_eager"))
    g, error, seconds = call_with_deadline(f, w, x, deadline=120.0)
    assert error is None and seconds < 120.0, (error, seconds)
    want = tp.pmap(step, "i", in_axes=(None, 0))(w, x)
    torch.testing.assert_close(g.unshard(), want.unshard())


@needs_cuda
def test_cuda_forward_and_backward_on_a_callers_side_stream():
    # The backward runs on the autograd engine's thread: it must still be ordered with the
    # stream the caller used (here a side stream, behind a slow kernel).
    devs = tp.local_devices()
    n = len(devs)
    side = torch.cuda.Stream(devs[0])
    with torch.cuda.stream(side):
        x = torch.randn(n, 4096, device=devs[0]).requires_grad_()
        torch.cuda._sleep(50_000_000)  # the input below is computed late on this stream
        y = tp.pmap(lambda r: tp.psum(r * r, "i"), "i")(x * 1.0)
        y.unshard().sum().backward()
        grad = x.grad.clone()  # used at once, on the side stream
    side.synchronize()
    torch.testing.assert_close(grad, 2 * n * x.detach())


def _call_in_forked_child(results):
    f = tp.pmap(lambda x: tp.psum(x + 1, "i"), "i", devices=_devices(4))  # a first call: on the threads
    start = time.monotonic()
    try:
        results.put(("ok", f(torch.ones(4)).unshard().tolist(), time.monotonic() - start))
    except Exception as e:
        results.put(("error", repr(e), time.monotonic() - start))


@pytest.mark.threads_only
def test_a_forked_child_runs_calls_on_threads_of_its_own():
    # fork() keeps the calling thread only: the child's calls queued their replicas for the
    # parent's worker threads, which were not there, and waited for the collective timeout
    # (a DataLoader worker calling a pmapped function, say; found by a hunt).
    import multiprocessing

    tp.pmap(lambda x: x * 2, "i", devices=_devices(4))(torch.ones(4))  # the parent's workers run
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_call_in_forked_child, args=(results,))
    child.start()
    try:
        outcome, value, seconds = results.get(timeout=60)
    finally:
        child.join(timeout=10)
    assert (outcome, value) == ("ok", [8.0] * 4) and seconds < 10


_CALL_AT_FINALIZATION = """
import sys, time, torch, torchpmap as tp
tp.set_executor(sys.argv[1])
f = tp.pmap(lambda x: tp.psum(x, "i"), "i", devices=tp.devices()[:2])
for _ in range(2):
    f(torch.ones(2))  # the default's first call, then its captured one
ones = torch.ones(2)
class CallsAtExit:
    def __del__(self, monotonic=time.monotonic, f=f, ones=ones):  # (module globals may be gone by now)
        start = monotonic()
        try:
            f(ones)
        except RuntimeError as e:
            print("raised", str(e), f"after {monotonic() - start:.1f} s", flush=True)
keeper = CallsAtExit()
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("executor", ["threads", "auto"])
def test_a_call_while_python_shuts_down_raises_at_once(executor):
    # From a __del__ at exit the threads' call waited for the collective timeout (300 s by
    # default), and a captured one raised "sys.meta_path is None" (found by a hunt).
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _CALL_AT_FINALIZATION, executor], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "raised pmap of <lambda> was called while Python shuts down" in done.stdout
    assert "after 0.0 s" in done.stdout
