"""How initialize() lays out a multi-process job without starting one: the GPU each
process picks, the global device list, and the CUDA path with torch.distributed and
torch.cuda mocked (no GPU here; the real runs are in test_distributed.py, on CPU)."""

import types

import pytest
import torch
from helpers import NewBytes, rows

import torchpmap as tp
import torchpmap.distributed as tpd
from torchpmap import _devices
from torchpmap._communicator import Collective, compute_results


@pytest.mark.parametrize(
    "visible, local_rank, local_world, gpu",
    [
        (8, 3, 8, 3),  # every GPU of the node visible to every process
        (8, 1, 2, 1),  # more GPUs than processes
        (1, 3, 8, 0),  # a per-process CUDA_VISIBLE_DEVICES: the only GPU is this process's own
        (1, 0, 1, 0),
        (4, 0, 1, 0),
    ],
)
def test_choose_gpu(visible, local_rank, local_world, gpu):
    assert tpd.choose_gpu(visible, local_rank, local_world) == gpu


@pytest.mark.parametrize(
    "visible, local_rank, local_world, message",
    [
        (2, 1, 4, "sees 2 GPUs but its node runs 4 processes"),  # which of the two? never guess
        (2, 0, 4, "sees 2 GPUs but its node runs 4 processes"),  # the same answer on every process
        (0, 0, 2, "sees no CUDA GPU"),
        (8, 8, 8, "LOCAL_RANK is 8, but LOCAL_WORLD_SIZE is 8"),
        (8, -1, 8, "LOCAL_RANK is -1"),
    ],
)
def test_choose_gpu_refuses_what_it_cannot_tell(visible, local_rank, local_world, message):
    with pytest.raises(ValueError, match=message):
        tpd.choose_gpu(visible, local_rank, local_world)


def cuda(*indices):
    return [torch.device("cuda", i) for i in indices]


def test_global_layout_lists_each_process_gpus_in_process_order():
    per_process = [cuda(0), cuda(1), cuda(0), cuda(1)]  # two nodes, two processes each
    local, everything = tpd.global_layout(per_process, 1)
    assert local == tuple(cuda(1))
    assert everything == tuple(cuda(0, 1, 0, 1))  # not this process's cuda:1 four times


def test_global_layout_numbers_virtual_cpu_devices_globally():
    cpus = [torch.device("cpu", i) for i in range(2)]
    local, everything = tpd.global_layout([cpus, cpus, cpus], 2)
    assert everything == tuple(torch.device("cpu", i) for i in range(6))
    assert local == everything[4:]


@pytest.mark.parametrize("per_process", [[cuda(0), cuda(0, 1)], [cuda(0), [torch.device("cpu", 0)]]])
def test_global_layout_needs_the_same_devices_everywhere(per_process):
    with pytest.raises(RuntimeError, match="same number and kind"):
        tpd.global_layout(per_process, 0)


class FakeJob:
    """torch.distributed and torch.cuda as process ``rank`` of a job of one-GPU processes
    sees them, with each process's device list as given."""

    def __init__(self, monkeypatch, rank, per_process, visible, made_by_user=False, bound=None):
        self.calls = []
        self.per_process = per_process
        self.initialized = made_by_user
        self.world = type("World", (), {"bound_device_id": bound})()
        monkeypatch.setattr(_devices, "platform", lambda: "cuda")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.calls.append(("set_device", d)))
        dist = tpd.dist
        monkeypatch.setattr(dist, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(dist, "init_process_group", self.init_process_group)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(per_process))
        monkeypatch.setattr(dist, "all_gather_object", self.all_gather_object)
        monkeypatch.setattr(dist, "new_group", self.new_group)
        monkeypatch.setattr(dist, "group", types.SimpleNamespace(WORLD=self.world))
        monkeypatch.setattr(tpd, "_shutdown_at_exit", lambda: None)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(len(per_process)))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")

    def init_process_group(self, backend, **kwargs):
        self.calls.append(("init_process_group", backend, kwargs.get("device_id")))
        self.timeout = kwargs.get("timeout")
        self.initialized = True

    def new_group(self, backend=None, **kwargs):
        self.calls.append(("new_group", backend))
        return "check group"

    def all_gather_object(self, out, mine):
        self.calls.append(("all_gather_object", mine))
        out[:] = [[str(d) for d in p] for p in self.per_process]


@pytest.fixture
def fresh_layout():
    yield
    tpd._state.clear()
    _devices._set_process_layout(None, None)
    _devices._reset_for_tests()


@pytest.mark.parametrize("made_by_user", [False, True])
def test_cuda_initialize_binds_local_rank_and_lists_every_process_gpu(monkeypatch, fresh_layout, made_by_user):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    job = FakeJob(monkeypatch, 3, [cuda(0), cuda(1), cuda(0), cuda(1)], visible=2, made_by_user=made_by_user)
    tpd.initialize()
    made = [] if made_by_user else [("init_process_group", "nccl", torch.device("cuda", 1))]
    assert job.calls == [("set_device", 1), *made, ("all_gather_object", ["cuda:1"]), ("new_group", "gloo")]
    assert tp.devices() == cuda(0, 1, 0, 1)
    assert tp.local_devices() == cuda(1)
    assert (tp.process_index(), tp.process_count()) == (3, 4)


def test_cuda_initialize_with_one_visible_gpu_per_process(monkeypatch, fresh_layout):
    # SLURM / Kubernetes: CUDA_VISIBLE_DEVICES gives each process its own GPU, always cuda:0.
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    job = FakeJob(monkeypatch, 3, [cuda(0)] * 4, visible=1)
    tpd.initialize()
    assert job.calls[:2] == [("set_device", 0), ("init_process_group", "nccl", torch.device("cuda", 0))]
    assert tp.local_devices() == cuda(0) and tp.devices() == cuda(0, 0, 0, 0)


def test_cuda_initialize_keeps_the_gpu_the_users_group_is_bound_to(monkeypatch, fresh_layout):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    job = FakeJob(monkeypatch, 0, [cuda(1), cuda(0)], visible=2, made_by_user=True, bound=torch.device("cuda", 1))
    tpd.initialize()
    assert job.calls[0] == ("set_device", 1)
    assert tp.local_devices() == cuda(1)


class FakeGather:
    """dist.all_gather as process ``rank`` of ``processes`` processes of ``local`` replicas
    sees it, where global replica g's input is ``inputs[g]`` and every process is in step."""

    def __init__(self, monkeypatch, rank, processes, local, inputs):
        # Each process's stacked inputs, built now: only the backend's own tensors are counted.
        self.sent = [torch.stack(inputs[p * local : (p + 1) * local]) for p in range(processes)]
        self.total = sum(sent.sum(0) for sent in self.sent)  # every process's sum of its replicas'
        monkeypatch.setattr(tpd.dist, "all_gather", self.all_gather)
        monkeypatch.setattr(tpd.dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(tpd.dist, "get_world_size", lambda group=None: processes)
        monkeypatch.setattr(tpd.dist, "get_rank", lambda group=None: rank)

    def all_gather(self, parts, mine, group=None, async_op=False):
        for p, part in enumerate(parts):
            if mine.dtype == torch.int64 and mine.shape == (4,):  # the lockstep check: all agree
                part.copy_(mine)
            else:
                part.copy_(self.sent[p])
        return DoneWork() if async_op else None

    def all_reduce(self, t, op=None, group=None, async_op=False):
        assert op == tpd.dist.ReduceOp.SUM
        t.copy_(self.total)
        return DoneWork() if async_op else None


class DoneWork:
    """A torch.distributed Work that already completed."""

    def wait(self, timeout=None):
        return True


@pytest.mark.parametrize(
    "collective",
    [
        Collective("all_gather"),
        Collective("all_to_all"),
        Collective("reduce_scatter", "sum"),
        Collective("all_reduce", "max", ((0, 1, 2), tuple(range(3, 16)))),
        Collective("permute", pairs=tuple((r, (r + 1) % 16) for r in range(16))),
    ],
    ids=lambda c: c.kind,
)
def test_a_process_builds_only_its_own_replicas_results(monkeypatch, collective):
    # Process 5 of 8, two replicas each (global 10 and 11), 16 replicas in all.
    processes, local, rank = 8, 2, 5
    size = processes * local
    inputs = [rows(size, 4, offset=float(g)) for g in range(size)]
    FakeGather(monkeypatch, rank, processes, local, inputs)
    cpus = [torch.device("cpu", rank * local + i) for i in range(local)]
    backend = tpd.ProcessGroupBackend(cpus, rank * local, size, None, tpd._Lockstep())
    with NewBytes() as allocated:
        got = backend.run(collective, inputs[rank * local : (rank + 1) * local])
    want = compute_results(collective, inputs, size, lambda t, r: t)[rank * local : (rank + 1) * local]
    for g, (t, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(t, w, rtol=0, atol=0, msg=f"replica {g}")
    one_input = inputs[0].untyped_storage().nbytes()
    # The gathered inputs (the local stack sent, size inputs received) and the local results:
    # building every replica's results would add up to size² inputs.
    results = sum(t.untyped_storage().nbytes() for t in got)
    if collective.kind == "reduce_scatter":
        # Its rows of one all-reduced sum: nothing gathered (the sum is the results' buffer).
        assert allocated.bytes <= 2 * one_input + 1024, allocated.bytes
    assert allocated.bytes <= (local + size) * one_input + results + one_input + 1024, allocated.bytes
