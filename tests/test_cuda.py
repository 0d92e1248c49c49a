"""The GPU path on one GPU: every test here needs CUDA and skips without it.

One GPU still gives real cross-device calls (``devices=["cuda:0", "cpu:0"]``) and
several replicas on one GPU (``["cuda:0"] * 8``, stacked or on threads). Each
result is compared with the same call on virtual CPU devices (differential), and
the stream tests make the GPU slow on purpose (``torch.cuda._sleep``) where a
missing stream dependency would let the caller read too early."""

import math
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import call_with_deadline, executor, rows, torchrun_command
from torch.func import grad_and_value

import torchpmap as tp
from torchpmap import _gpu_collectives, _runtime
from torchpmap._communicator import Collective, compute_results

pytestmark = pytest.mark.cuda

HERE = Path(__file__).resolve().parent
SLEEP = 20_000_000  # cycles of torch.cuda._sleep: some milliseconds of GPU time


def gpu():
    return tp.local_devices()[0]


def cpu_devices(n):
    return [torch.device("cpu", i) for i in range(n)]


def on_host(tree):
    def one(v):
        if isinstance(v, tp.ShardedTensor):
            v = v.unshard(device="cpu")
        return v.cpu() if isinstance(v, torch.Tensor) else v

    return torch.utils._pytree.tree_map(one, tree, is_leaf=lambda v: isinstance(v, tp.ShardedTensor))


def assert_close_on_host(got, want):
    torch.testing.assert_close(on_host(got), on_host(want), rtol=1e-5, atol=1e-5)


MIXED_FUNCTIONS = {
    "psum": lambda x: tp.psum(x, "i"),
    "pmax": lambda x: tp.pmax(x, "i"),
    "all_gather": lambda x: tp.all_gather(x, "i"),
    "psum_scatter": lambda x: tp.psum_scatter(x, "i", tiled=True),
    "all_to_all": lambda x: tp.all_to_all(x[:2], "i", 0, 1),
    "ppermute": lambda x: tp.ppermute(x, "i", [(0, 1), (1, 0)]),
    "axis_index": lambda x: x * 2 + tp.axis_index("i"),
    "pytree": lambda x: tp.psum({"a": x, "b": (x * 2, x.sum())}, "i"),
}


# -- a GPU and the CPU in one call --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MIXED_FUNCTIONS))
@pytest.mark.parametrize("how", ["threads", "lockstep"])
def test_every_collective_across_a_gpu_and_a_cpu_device_equals_two_cpu_devices(name, how):
    fun, x = MIXED_FUNCTIONS[name], rows(2, 4, 3)
    want = tp.pmap(fun, "i", devices=cpu_devices(2))(x)
    mixed = [gpu(), torch.device("cpu", 0)]
    with executor(how):
        for _ in range(2):  # the lockstep executor captures from the second call of auto; forced: both
            got = tp.pmap(fun, "i", devices=mixed)(x.to(gpu()))
    leaves = [v for v in torch.utils._pytree.tree_leaves(got) if isinstance(v, tp.ShardedTensor)]
    assert all([s.device.type for s in v.shards] == ["cuda", "cpu"] for v in leaves)
    assert_close_on_host(got, want)


def test_backward_from_outside_through_a_gpu_and_a_cpu_replica():
    mixed = [gpu(), torch.device("cpu", 0)]

    def loss(x, devices):
        y = tp.pmap(lambda r: tp.psum(r.sin(), "i") * r, "i", devices=devices)(x)
        return y.unshard(device="cpu").sum()

    x = rows(2, 5).requires_grad_()
    (want,) = torch.autograd.grad(loss(x, cpu_devices(2)), x)
    xg = x.detach().to(gpu()).requires_grad_()
    (got,), error, seconds = call_with_deadline(lambda: torch.autograd.grad(loss(xg, mixed), xg), deadline=60.0)
    assert error is None, error
    assert_close_on_host(got, want)


# -- streams: the caller may use results at once, on the stream it is on -------------------------
# -- NCCL among distinct GPUs (issue 13 item 13) -------------------------------------------
NCCL_CASES = [
    (Collective("all_reduce", "sum"), (5, 3)),
    (Collective("all_reduce", "max"), (5, 3)),
    (Collective("all_reduce", "min"), (5, 3)),
    (Collective("all_gather"), (5, 3)),
    (Collective("reduce_scatter", "sum"), (1, 7)),
]


@pytest.mark.parametrize("case", range(len(NCCL_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_nccl_on_a_side_stream_gives_what_the_host_way_gives(case, dtype):
    # One GPU is one NCCL rank: the call, its shapes and dtypes, and its stream are real.
    # The input is computed late on a side stream; NCCL queued anywhere else would read it early.
    collective, shape = NCCL_CASES[case]
    side = torch.cuda.Stream(gpu())
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP)
        x = (torch.arange(math.prod(shape), device=gpu()).reshape(shape) - 4).to(dtype) * 3
        with _gpu_collectives.streams_current([side]):
            (got,) = _gpu_collectives.nccl_group(collective, [x], [side])
        want = compute_results(collective, [x], 1, lambda t, r: t)[0]
        got_host, want_host = got.cpu(), want.cpu()  # ordered after both on the side stream
    assert got_host.dtype == dtype and torch.equal(got_host, want_host)
    assert got.data_ptr() != x.data_ptr()


def gpus():
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", sorted(MIXED_FUNCTIONS))
@pytest.mark.parametrize("how", ["threads", "lockstep"])
def test_every_collective_across_gpus_equals_cpu_devices_and_reductions_use_nccl(name, how, monkeypatch):
    calls = []
    real = _gpu_collectives.nccl

    class Spy:
        def __getattr__(self, op):
            calls.append(op)
            return getattr(real, op)

    monkeypatch.setattr(_gpu_collectives, "nccl", Spy())
    devs = gpus()[:2]  # MIXED_FUNCTIONS are written for two replicas

    def slow(x):  # replica 1 is late: a missing stream dependency would read its input early
        if tp.axis_index("i") == 1:
            torch.cuda._sleep(SLEEP)
        return MIXED_FUNCTIONS[name](x)

    x = rows(2, 4, 3)
    want = tp.pmap(MIXED_FUNCTIONS[name], "i", devices=cpu_devices(2))(x)
    with executor(how):
        for _ in range(2):
            got = tp.pmap(slow if how == "threads" else MIXED_FUNCTIONS[name], "i", devices=devs)(
                tp.device_put_sharded(list(x), devs)
            )
    assert_close_on_host(got, want)
    if name in ("psum", "all_gather", "psum_scatter", "pytree"):  # not float pmax: NCCL's drops NaNs
        assert calls, "sums and gathers among distinct GPUs go through NCCL"
    elif name == "pmax":
        assert not calls


# -- host transfers through pinned memory (issue 13 item 14) ----------------------------------
@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("how", ["device_put_sharded", "device_put_replicated", "mapped", "broadcast", "one_gpu"])
def test_host_values_are_the_callers_at_the_call_even_when_the_gpu_is_busy(how, pinned):
    # The copies to the GPU queue behind a long kernel, and the caller overwrites its tensor at
    # once: the GPU must get the values as they were at the call, pinned source or not.
    mixed = [gpu(), torch.device("cpu", 0)]
    x = rows(2, 1 << 16)
    want = x.clone()
    if pinned:
        x = x.pin_memory()
    torch.cuda._sleep(SLEEP * 5)
    if how == "device_put_sharded":
        out = tp.device_put_sharded(list(x), mixed)
        want_host = want
    elif how == "device_put_replicated":
        out = tp.device_put_replicated(x, mixed)
        want_host = torch.stack([want, want])
    elif how == "mapped":
        out = tp.pmap(lambda v: v + 0, devices=mixed)(x)
        want_host = want
    elif how == "broadcast":
        out = tp.pmap(lambda v, w: v + w, in_axes=(0, None), devices=mixed)(torch.zeros(2, 1), x[0])
        want_host = torch.stack([want[0], want[0]])
    else:
        out = tp.pmap(lambda v: v * 1, devices=[gpu()])(x[:1])
        want_host = want[:1]
    x.zero_()
    # The GPU's shard (the CPU device's may be a view of x itself, as on virtual CPU devices).
    assert torch.equal(out.shards[0].cpu(), want_host[0])


def test_a_dual_host_input_keeps_its_tangent_on_its_way_to_the_gpu():
    import torch.autograd.forward_ad as fwAD

    x, tangent = rows(1, 3), torch.ones(1, 3)
    with fwAD.dual_level():
        out = tp.pmap(lambda v: v * 2, devices=[gpu()])(fwAD.make_dual(x, tangent))
        got = fwAD.unpack_dual(out.shards[0]).tangent
    assert got is not None and torch.equal(got.cpu(), torch.full((3,), 2.0))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_unshard_of_conjugate_views_on_several_gpus_has_the_conjugate_values():
    devs = gpus()[:2]
    z = torch.tensor([[1 + 2j, 3 - 1j], [-2 + 0.5j, 4j]])
    st = tp.device_put_sharded(list(z), devs)
    conj = tp.pmap(lambda v: v.conj(), devices=devs)(st)
    assert torch.equal(conj.unshard(device="cpu"), z.conj().resolve_conj())
    assert (np.asarray(conj) == z.numpy().conj()).all()
    # Between GPUs the conjugation is resolved on the source GPU first (no peer writes).
    assert torch.equal(conj.unshard(device=devs[0]).cpu(), z.conj().resolve_conj())
    on_both = tp.device_put_replicated(z.to(devs[1]).conj(), devs)
    assert all(torch.equal(s.cpu(), z.conj().resolve_conj()) for s in on_both.shards)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_unshard_from_busy_gpus_waits_for_every_shard():
    devs = gpus()
    shards = []
    for i, d in enumerate(devs):
        with torch.cuda.device(d):
            torch.cuda._sleep(SLEEP)  # each shard is written late, on its GPU's stream
            shards.append(torch.full((4, 1 << 14), float(i + 1), device=d))
    st = tp.device_put_sharded(shards, devs)
    host = st.unshard(device="cpu")
    assert host.device.type == "cpu" and host.shape == (len(devs), 4, 1 << 14)
    for i in range(len(devs)):
        assert torch.all(host[i] == i + 1)
    assert torch.equal(torch.from_numpy(st.__array__()), host)


def test_collective_results_are_ready_on_the_replica_stream_that_uses_them():
    # A GPU replica sleeps before its contribution and uses the collective's result at once;
    # the CPU replica arrives first, so the result is made while the GPU is still busy.
    mixed = [gpu(), torch.device("cpu", 0)]

    def f(r):
        if r.is_cuda:
            torch.cuda._sleep(SLEEP)
        s = tp.psum(r * 2, "i")
        return s * s + 1

    pf = tp.pmap(f, "i", devices=mixed)
    for step in range(20):
        x = torch.full((2, 1 << 16), float(step), device=gpu())
        out = pf(x)
        want = (4.0 * step) ** 2 + 1
        assert torch.all(out.shards[0] == want) and torch.all(out.shards[1] == want), step


def test_a_caller_on_a_side_stream_and_a_slow_replica_get_ordered_results():
    side = torch.cuda.Stream(gpu())

    def f(r):
        torch.cuda._sleep(SLEEP)  # the replica's kernels finish late
        return r * 3

    with torch.cuda.stream(side):
        base = torch.ones(1, 1 << 20, device=gpu())
        torch.cuda._sleep(SLEEP)  # the input below is computed late, on the side stream
        x = base * 2
        out = tp.pmap(f, devices=[gpu()])(x)
        first = out.shards[0].sum()  # used at once, on the side stream
        x.zero_()  # and the caller may overwrite its input: the replica has read it
    side.synchronize()
    assert first.item() == 6.0 * (1 << 20)
    assert torch.all(out.shards[0] == 6.0)


def test_an_interrupted_call_leaves_the_callers_stream_behind_the_replicas_kernels(monkeypatch):
    # Ctrl-C while the caller waits: the GPU replica has queued a long kernel, the CPU replica
    # still runs. As after a call that returned, the caller's stream must go on only after that
    # kernel (the caller may reuse the inputs' memory at once).
    launched, release = threading.Event(), threading.Event()

    def f(r):
        if r.is_cuda:
            torch.cuda._sleep(1_000_000_000)  # about half a second
            launched.set()
        else:
            release.wait(10)
        return r * 2

    def interrupted(self, *args):
        launched.wait(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(_runtime._Call, "wait", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            tp.pmap(f, "i", devices=[gpu(), torch.device("cpu", 0)])(torch.ones(2, 4, device=gpu()))
    finally:
        release.set()
    after = torch.cuda.Event()
    after.record()  # on the caller's stream
    time.sleep(0.1)
    assert not after.query(), "the caller's stream ran ahead of the replica's kernel"
    torch.cuda.synchronize()
    assert _runtime.pool().wait_idle(10)


def test_several_replicas_on_one_gpu_on_the_threads_are_ordered_with_the_caller():
    devs = [gpu()] * 4
    x = rows(4, 1 << 14).to(gpu())

    def f(r):
        torch.cuda._sleep(SLEEP)
        return tp.psum(r, "i") - r

    with executor("threads"):
        out = tp.pmap(f, "i", devices=devs)(x)
        total = out.unshard().sum(0)  # at once, on the default stream
    want = 3 * x.sum(0)
    torch.testing.assert_close(total, want)


# -- donation: a donated input's memory is free once its replica has returned --------------------
def test_a_donated_input_is_freed_when_its_replica_returns_not_when_the_call_does():
    # Replica 0 (the GPU) returns at once; replica 1 (the CPU) waits until the GPU memory of
    # replica 0's donated shard is free. Python keeps a function's arguments alive until it
    # returns, so that is the earliest: nothing of torchpmap's may hold them longer.
    n = 64 * (1 << 20) // 4
    mixed = [gpu(), torch.device("cpu", 0)]

    def f(a):
        if a.is_cuda:
            return a.sum()
        deadline = time.monotonic() + 10.0
        while torch.cuda.memory_allocated(gpu()) > before + 4 * n // 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        freed.append(torch.cuda.memory_allocated(gpu()) - before)
        return a.sum()

    x = tp.device_put_sharded([torch.ones(n, device=gpu()), torch.ones(n)], mixed)
    torch.cuda.synchronize()
    before, freed = torch.cuda.memory_allocated(gpu()) - 4 * n, []
    tp.pmap(f, devices=mixed, donate_argnums=0)(x)
    assert freed[0] <= 4 * n // 2, f"{freed[0]} bytes of the donated input still held"


def test_a_donated_input_freed_before_its_replicas_kernels_ran_is_not_handed_out_again():
    # Replica 0 (the GPU) queues a long kernel and then a read of its donated shard, and returns:
    # the shard is freed while that read still waits on the worker's stream. The shard was
    # allocated on the default stream, where replica 1 (the CPU) then allocates and fills a
    # tensor of its size: the caching allocator must not hand it the shard's memory before the
    # read ran (the replica's inputs are recorded on its stream).
    n = 1 << 20
    mixed = [gpu(), torch.device("cpu", 0)]
    queued = threading.Event()

    def f(a):
        if a.is_cuda:
            torch.cuda._sleep(SLEEP * 25)
            out = a * 1  # queued behind the sleep
            queued.set()
            return out
        queued.wait(10)
        deadline = time.monotonic() + 10.0
        while torch.cuda.memory_allocated(gpu()) > before + 4 * n and time.monotonic() < deadline:
            time.sleep(0.005)  # until replica 0 has returned and dropped its shard (its result stays)
        taken.append(torch.full((n,), 7.0, device=gpu()))  # on the default stream, at once
        return a * 1

    x = tp.device_put_sharded([torch.ones(n, device=gpu()), torch.ones(n)], mixed)
    torch.cuda.synchronize()
    before, taken = torch.cuda.memory_allocated(gpu()) - 4 * n, []
    with executor("threads"):
        out = tp.pmap(f, devices=mixed, donate_argnums=0)(x)
    assert torch.all(out.shards[0] == 1.0), "the donated shard was overwritten before the replica read it"
    assert torch.all(taken[0] == 7.0)


def test_a_collective_result_on_the_replicas_gpu_from_a_host_input_outlives_its_kernels():
    # Replica 0 (the GPU) hands the collective a host tensor: its result, on cuda:0, is made by
    # replica 1's thread (the last to arrive) on that thread's stream for cuda:0, the default
    # stream. Replica 0 reads it late on its own stream and drops it; replica 1 then allocates
    # and fills a tensor of its size on the default stream, which must not get that memory first.
    n = 1 << 20
    mixed = [gpu(), torch.device("cpu", 0)]
    dropped = threading.Event()

    def f(a):
        if a.is_cuda:
            s = tp.psum(torch.ones(n), "i")  # on the host; the result comes back on cuda:0
            torch.cuda._sleep(SLEEP * 25)
            out = s * 1  # queued behind the sleep
            del s
            dropped.set()
            return out
        time.sleep(0.1)  # arrive last: this thread makes the results
        tp.psum(torch.ones(n), "i")
        dropped.wait(10)
        taken.append(torch.full((n,), 7.0, device=gpu()))  # on the default stream, at once
        return torch.full((n,), 2.0)

    taken = []
    with executor("threads"):
        out = tp.pmap(f, "i", devices=mixed)(torch.zeros(2, 1, device=gpu()))
    assert torch.all(out.shards[0] == 2.0), "the collective's result was overwritten before the replica read it"
    assert torch.all(taken[0] == 7.0)


# -- several replicas on one GPU: the stacked executor --------------------------------------------
def _mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    w0, w1 = torch.randn(16, 32, generator=g) / 4, torch.randn(32, 4, generator=g) / 6
    return {"w0": w0, "b0": torch.zeros(32), "w1": w1}


def _train_step(p, x, y):
    def loss(p):
        h = torch.tanh(x @ p["w0"] + p["b0"])
        return torch.nn.functional.cross_entropy(h @ p["w1"], y)

    g, value = grad_and_value(loss)(p)
    g = tp.pmean(g, "i")
    return {k: p[k] - 0.1 * g[k] for k in p}, tp.pmean(value, "i")


def _train(devs, steps=3, **kwargs):
    n = len(devs)
    dev = devs[0] if devs[0].type == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, 16, generator=g).to(dev)
    y = torch.randint(0, 4, (n, 8), generator=g).to(dev)
    params = tp.device_put_replicated({k: v.to(dev) for k, v in _mlp().items()}, devs)
    step = tp.pmap(_train_step, "i", devices=devs, **kwargs)
    losses = []
    for _ in range(steps):
        params, loss = step(params, x, y)
        losses.append(loss)
    return params, losses


@pytest.mark.parametrize("how", ["threads", "stacked"])
def test_eight_replicas_on_one_gpu_train_like_eight_cpu_devices(how):
    want = _train(cpu_devices(8))
    with executor(how):
        got = _train([gpu()] * 8)
    assert all(v.devices == (gpu(),) * 8 for v in got[0].values())
    assert_close_on_host(got, want)


@pytest.mark.slow
def test_a_compiled_stacked_step_on_one_gpu_trains_like_eight_cpu_devices():
    want = _train(cpu_devices(8))
    with executor("stacked"):
        got = _train([gpu()] * 8, compile=True)  # inductor's GPU code over the stacked graph
    assert_close_on_host(got, want)


# -- one process under NCCL -----------------------------------------------------------------------
@pytest.mark.subprocess
def test_the_multiprocess_example_under_nccl_with_one_process():
    env = {k: v for k, v in os.environ.items() if k != "TORCHPMAP_PLATFORM"}
    cmd = torchrun_command(HERE.parent / "examples" / "multiprocess.py", 1)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "['cuda:0']" in out.stdout and "global indices [0]" in out.stdout, out.stdout
    assert "learned w = [1.99" in out.stdout, out.stdout


def test_unshard_to_the_current_gpu_and_to_a_gpu_the_call_did_not_use():
    # unshard's device check refused "cuda" (no index) and GPUs outside the call's devices
    # (found by a review, by reading).
    y = tp.pmap(lambda v: v * 2, devices=["cuda:0", "cpu:0"])(torch.ones(2, 3))
    full = torch.full((2, 3), 2.0)
    assert y.unshard("cuda").device == torch.device("cuda", torch.cuda.current_device())
    torch.testing.assert_close(y.unshard("cuda").cpu(), full)
    torch.testing.assert_close(y.unshard("cpu"), full)
    z = tp.pmap(lambda v: v * 2, devices=["cpu:0", "cpu:1"])(torch.ones(2, 3))
    torch.testing.assert_close(z.unshard("cuda:0").cpu(), full)  # virtual CPU devices to a GPU
