"""The collectives among replicas on distinct GPUs (``_gpu_collectives``): which
go to NCCL and what is handed to it, checked here against a CPU model of NCCL's
documented semantics (rank i is the i-th tensor; all_gather concatenates in rank
order; reduce_scatter gives rank i the i-th of equal blocks). On GPUs,
tests/test_cuda.py runs the real thing."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import devices
from test_communicator import every_collective, reference

from torchpmap import _gpu_collectives
from torchpmap._communicator import Collective, LocalBackend, compute_results
from torchpmap._layout import distinct_gpus

REDUCE = {0: torch.sum, 2: torch.amax, 3: torch.amin}


class CpuNccl:
    """torch.cuda.nccl's calls on CPU tensors, checking what NCCL would refuse."""

    def __init__(self):
        self.calls = []

    def _check(self, inputs, outputs, in_per_out, out_per_in):
        assert len(inputs) == len(outputs) > 0
        count = inputs[0].numel()
        for t in [*inputs, *outputs]:
            assert t.is_contiguous(), "NCCL needs contiguous tensors"
            assert t.dtype == inputs[0].dtype
        for i, o in zip(inputs, outputs):
            assert i.numel() == count, "every rank must bring as many elements"
            assert i.numel() * out_per_in == o.numel() * in_per_out, "wrong output size"
            assert i.untyped_storage().data_ptr() != o.untyped_storage().data_ptr()

    def all_reduce(self, inputs, outputs, op=0, streams=None):
        self.calls.append("all_reduce")
        self._check(inputs, outputs, 1, 1)
        total = REDUCE[op](torch.stack([i.reshape(-1) for i in inputs]), 0)
        for o in outputs:
            o.view(-1).copy_(total)

    def all_gather(self, inputs, outputs, streams=None):
        self.calls.append("all_gather")
        self._check(inputs, outputs, 1, len(inputs))
        flat = torch.cat([i.reshape(-1) for i in inputs])
        for o in outputs:
            o.view(-1).copy_(flat)

    def reduce_scatter(self, inputs, outputs, op=0, streams=None):
        self.calls.append("reduce_scatter")
        self._check(inputs, outputs, len(inputs), 1)
        total = REDUCE[op](torch.stack([i.reshape(-1) for i in inputs]), 0)
        count = outputs[0].numel()
        for k, o in enumerate(outputs):
            o.view(-1).copy_(total[k * count : (k + 1) * count])


@pytest.fixture
def cpu_nccl(monkeypatch):
    model = CpuNccl()
    monkeypatch.setattr(_gpu_collectives, "nccl", model)
    monkeypatch.setattr(_gpu_collectives, "nccl_built", lambda: True)
    return model


def _inputs(shape, dtype, k=4, transpose=False):
    g = torch.Generator().manual_seed(len(shape))
    xs = [(torch.randn(*shape, generator=g) * 50).to(dtype) for _ in range(k)]
    if transpose and len(shape) == 2:  # not contiguous: NCCL gets a contiguous copy
        xs = [torch.randn(shape[::-1], generator=g).mul(50).to(dtype).T for _ in range(k)]
    return xs


@pytest.mark.parametrize("case", range(9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.int16, torch.complex64])
def test_every_collective_matches_the_reference_and_nccl_gets_what_it_handles(cpu_nccl, case, dtype):
    collective, shape = every_collective(4)[case]
    if dtype == torch.complex64 and collective.op in ("max", "min"):
        pytest.skip("no order on complex numbers")
    xs = _inputs(shape, dtype, transpose=True)
    before = [x.clone() for x in xs]
    got = _gpu_collectives.run(collective, xs, devices(4), None)
    host_way = compute_results(collective, xs, 4, lambda t, r: t)
    # Reductions in another order (NCCL's, or here the model's) round half precision differently.
    tol = dict(rtol=1e-2, atol=0.5) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-4)
    for r, (a, b, c) in enumerate(zip(got, host_way, reference(collective, xs))):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype, f"rank {r}"
        torch.testing.assert_close(a, b, msg=f"rank {r}", **tol)
        torch.testing.assert_close(a, c.to(dtype), msg=f"rank {r}", **tol)
    nccl_kind = collective.kind in ("all_reduce", "all_gather", "reduce_scatter")
    nccl_dtype = dtype not in (torch.int16, torch.complex64)
    if collective.op in ("max", "min"):  # NCCL's float max/min drop NaNs: integers only
        nccl_dtype = dtype == torch.int64
    groups = len(collective.groups or ((0,),))
    assert cpu_nccl.calls == ([collective.kind] * groups if nccl_kind and nccl_dtype else [])
    # Fresh results that alias nothing, and inputs left as they were.
    assert all(torch.equal(x, b) for x, b in zip(xs, before))
    ptrs = [t.untyped_storage().data_ptr() for t in [*xs, *got]]
    assert len(set(ptrs)) == len(ptrs)


def test_groups_of_one_and_of_unequal_sizes(cpu_nccl):
    xs = _inputs((3,), torch.float32)
    collective = Collective("all_reduce", "sum", ((0,), (1, 2, 3)))
    got = _gpu_collectives.run(collective, xs, devices(4), None)
    torch.testing.assert_close(got[0], xs[0])
    assert got[0].data_ptr() != xs[0].data_ptr()
    for r in (1, 2, 3):
        torch.testing.assert_close(got[r], xs[1] + xs[2] + xs[3])
    assert cpu_nccl.calls == ["all_reduce"]  # the group of one needs no NCCL
    gathered = _gpu_collectives.run(Collective("all_gather", groups=((0,), (1, 2, 3))), xs, devices(4), None)
    assert gathered[0].shape == (1, 3) and gathered[1].shape == (3, 3)


def test_what_nccl_does_not_take_stays_off_it(cpu_nccl):
    # bool (NCCL sums it as uint8), empty tensors, and a reduce_scatter whose rows are not one per member.
    for collective, xs in [
        (Collective("all_reduce", "max"), [torch.tensor([True, False])] * 4),
        (Collective("all_reduce", "sum"), [torch.ones(0)] * 4),
        (Collective("all_gather"), [torch.ones(2, 0)] * 4),
    ]:
        got = _gpu_collectives.run(collective, xs, devices(4), None)
        for a, b in zip(got, reference(collective, xs)):
            assert torch.equal(a, b)
    assert cpu_nccl.calls == []


def test_a_local_backend_uses_it_only_for_distinct_gpus():
    assert distinct_gpus([torch.device("cuda", 0), torch.device("cuda", 1)])
    assert not distinct_gpus([torch.device("cuda", 0)])
    assert not distinct_gpus([torch.device("cuda", 0), torch.device("cuda", 0)])
    assert not distinct_gpus([torch.device("cuda", 0), torch.device("cpu")])
    assert not LocalBackend(devices(4)).stream_ordered
    backend = LocalBackend(devices(2))
    backend.stream_ordered = True  # as on two GPUs: inputs elsewhere still take the host's way
    backend.devices = [torch.device("cpu")] * 2
    assert backend.on_own_devices([torch.ones(1), torch.ones(1)])
    backend.devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert not backend.on_own_devices([torch.ones(1), torch.ones(1)])


def test_a_nan_survives_pmax_and_pmin(cpu_nccl):
    xs = [torch.tensor([1.0, float("nan")]), torch.tensor([float("nan"), 2.0]), torch.tensor([3.0, 4.0])]
    for op in ("max", "min"):
        got = _gpu_collectives.run(Collective("all_reduce", op), xs, devices(3), None)
        assert all(torch.isnan(g).all() for g in got), op  # as torch.maximum/minimum: NaN wins
    assert cpu_nccl.calls == []


def test_when_nccl_fails_it_says_so_once_and_the_gpus_copy_instead(cpu_nccl, monkeypatch):
    monkeypatch.setattr(_gpu_collectives, "_failed", set())

    def broken(*args, **kwargs):
        cpu_nccl.calls.append("broken")
        raise RuntimeError("NCCL error: unhandled system error (no peer access)")

    monkeypatch.setattr(cpu_nccl, "all_reduce", broken)
    xs = _inputs((3,), torch.float32)
    collective = Collective("all_reduce", "sum")
    with pytest.warns(RuntimeWarning, match="NCCL failed .*unhandled system error.*TORCHPMAP_NCCL=0"):
        got = _gpu_collectives.run(collective, xs, devices(4), None)
    want = xs[0] + xs[1] + xs[2] + xs[3]
    assert all(torch.allclose(g, want) for g in got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _gpu_collectives.run(collective, xs, devices(4), None)  # no second warning, no NCCL
    assert all(torch.allclose(g, want) for g in again) and cpu_nccl.calls == ["broken"]


def test_nccl_failing_for_one_dtype_leaves_the_others_on_nccl(cpu_nccl, monkeypatch):
    monkeypatch.setattr(_gpu_collectives, "_failed", set())
    working = cpu_nccl.all_reduce

    def no_bfloat16(inputs, outputs, **kwargs):
        if inputs[0].dtype == torch.bfloat16:
            raise RuntimeError("NCCL error: invalid usage (bfloat16 needs NCCL 2.10)")
        return working(inputs, outputs, **kwargs)

    monkeypatch.setattr(cpu_nccl, "all_reduce", no_bfloat16)
    collective = Collective("all_reduce", "sum")
    with pytest.warns(RuntimeWarning, match="NCCL failed for the torch.bfloat16 collectives"):
        _gpu_collectives.run(collective, _inputs((3,), torch.bfloat16), devices(4), None)
    cpu_nccl.calls.clear()
    _gpu_collectives.run(collective, _inputs((3,), torch.float32), devices(4), None)
    assert cpu_nccl.calls  # float32 still went through NCCL


@pytest.mark.parametrize("where", ["making the results", "inside the NCCL call"])
def test_running_out_of_memory_is_the_callers_error_not_nccl_failing(cpu_nccl, monkeypatch, where):
    # Inside the call: NCCL's communicator buffers, say; taken for NCCL being unusable, it
    # turned NCCL off for good.
    monkeypatch.setattr(_gpu_collectives, "_failed", set())

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    if where == "making the results":
        monkeypatch.setattr(torch, "empty_like", no_memory)
    else:
        monkeypatch.setattr(cpu_nccl, "all_reduce", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        _gpu_collectives.run(Collective("all_reduce", "sum"), _inputs((3,), torch.float32), devices(4), None)
    assert not _gpu_collectives._failed  # a later call tries NCCL again


def test_the_switch_keeps_collectives_off_nccl(cpu_nccl, monkeypatch):
    monkeypatch.setenv("TORCHPMAP_NCCL", "0")
    xs = _inputs((3,), torch.float32)
    got = _gpu_collectives.run(Collective("all_reduce", "sum"), xs, devices(4), None)
    assert torch.allclose(got[2], xs[0] + xs[1] + xs[2] + xs[3]) and cpu_nccl.calls == []


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("False", False), ("1", True), ("", True)])
def test_the_nccl_switch_reads_the_usual_spellings(cpu_nccl, monkeypatch, value, on):
    # Only "0" turned NCCL off: TORCHPMAP_NCCL=false left it on (found by a hunt).
    monkeypatch.setenv("TORCHPMAP_NCCL", value)
    xs = _inputs((3,), torch.float32)
    _gpu_collectives.run(Collective("all_reduce", "sum"), xs, devices(4), None)
    assert bool(cpu_nccl.calls) == on


def test_an_unknown_nccl_switch_value_is_an_error(monkeypatch):
    monkeypatch.setenv("TORCHPMAP_NCCL", "maybe")
    with pytest.raises(ValueError, match=r"TORCHPMAP_NCCL must be 0 or 1 .*got 'maybe'"):
        _gpu_collectives._nccl_switched_on()
