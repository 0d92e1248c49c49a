"""Failure handling of ProcessGroupBackend and shutdown, with torch.distributed faked: the
branches NCCL takes (timed waits, abort at exit) without GPUs or processes."""

import datetime
import time

import pytest
import torch

import torchpmap as tp
import torchpmap.distributed as tpd
from torchpmap._communicator import Collective
from torchpmap.errors import CollectiveError, CollectiveTimeoutError


class Work:
    def __init__(self, error=None):
        self.error = error
        self.timeouts = []

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        if self.error is not None:
            raise self.error
        return True


class FakeDist:
    """Two processes in step; records which group and device each collective used."""

    def __init__(self, monkeypatch, data_error=None):
        self.calls = []
        self.data_work = Work(data_error)
        monkeypatch.setattr(tpd.dist, "all_gather", self.all_gather)
        monkeypatch.setattr(tpd.dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(tpd.dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(tpd.dist, "get_rank", lambda group=None: 0)

    def all_gather(self, parts, mine, group=None, async_op=False):
        self.calls.append(("all_gather", group, mine.device.type, async_op))
        for part in parts:
            part.copy_(mine)
        return Work() if mine.dtype == torch.int64 else self.data_work

    def all_reduce(self, t, op=None, group=None, async_op=False):
        self.calls.append(("all_reduce", group, t.device.type, async_op))
        return self.data_work


def backend(timeout=5.0):
    cpus = [torch.device("cpu", 0), torch.device("cpu", 1)]
    return tpd.ProcessGroupBackend(cpus, 0, 4, "main", tpd._Lockstep(), check_group="check", timeout=timeout)


def test_the_check_runs_on_the_check_group_and_the_data_on_the_main_group_with_a_timed_wait(monkeypatch):
    fake = FakeDist(monkeypatch)
    b = backend(timeout=5.0)
    b.run(Collective("all_reduce", "sum"), [torch.ones(2), torch.ones(2)])
    assert fake.calls == [("all_gather", "check", "cpu", True), ("all_reduce", "main", "cpu", True)]
    assert fake.data_work.timeouts == [datetime.timedelta(seconds=5.0)]


def test_an_infinite_timeout_waits_without_a_limit(monkeypatch):
    fake = FakeDist(monkeypatch)
    backend(timeout=float("inf")).run(Collective("all_gather"), [torch.ones(2), torch.ones(2)])
    assert fake.data_work.timeouts == [None]


@pytest.mark.parametrize(
    "message",
    ["Operation timed out!", "[PG 0 Rank 0] Work WorkNCCL(SeqNum=3, OpType=ALLREDUCE) timed out in blocking wait."],
)
def test_a_wait_that_times_out_is_a_collective_timeout_error_and_stops_the_lockstep(monkeypatch, message):
    FakeDist(monkeypatch, data_error=RuntimeError(message))
    b = backend()
    with pytest.raises(CollectiveTimeoutError, match="restart the job"):
        b.run(Collective("all_reduce", "sum"), [torch.ones(2), torch.ones(2)])
    assert b._lockstep.stopped
    with pytest.raises(CollectiveError, match="refused"):
        b.run(Collective("all_reduce", "sum"), [torch.ones(2), torch.ones(2)])


def test_a_peer_that_died_is_a_collective_error_not_a_timeout(monkeypatch):
    FakeDist(monkeypatch, data_error=RuntimeError("NCCL error: remote process exited or there was a network error"))
    b = backend()
    with pytest.raises(CollectiveError) as info:
        b.run(Collective("all_gather"), [torch.ones(2), torch.ones(2)])
    assert not isinstance(info.value, CollectiveTimeoutError)
    assert b._lockstep.stopped


def test_a_peer_in_another_pmapped_function_is_a_mismatch_that_ends_the_jobs_collectives(monkeypatch):
    # The peer's check row is this process's, made in a function of another name: the same
    # call number, exchange and collective, so only the function tells the two apart. A
    # mismatch may mean the processes are a call apart: nothing is exchanged after it.
    FakeDist(monkeypatch)
    cpus = [torch.device("cpu", 0), torch.device("cpu", 1)]
    peer = tpd.ProcessGroupBackend(cpus, 0, 4, "main", tpd._Lockstep(), check_group="check", function="g")
    rows = []

    def record(parts, mine, group=None, async_op=False):
        rows.append(mine)
        for part in parts:
            part.copy_(mine)
        return Work()

    monkeypatch.setattr(tpd.dist, "all_gather", record)
    peer.run(Collective("all_reduce", "sum"), [torch.ones(2), torch.ones(2)])

    def all_gather(parts, mine, group=None, async_op=False):
        parts[0].copy_(mine)
        parts[1].copy_(rows[0])
        return Work()

    monkeypatch.setattr(tpd.dist, "all_gather", all_gather)
    mine = tpd.ProcessGroupBackend(cpus, 0, 4, "main", tpd._Lockstep(), check_group="check", function="f")
    with pytest.raises(tpd.CollectiveMismatchError, match="different pmapped functions"):
        mine.run(Collective("all_reduce", "sum"), [torch.ones(2), torch.ones(2)])
    assert mine._lockstep.stopped
    with pytest.raises(CollectiveError, match="refused"):
        mine.run(Collective("all_reduce", "sum"), [torch.ones(2), torch.ones(2)])


def test_the_nccl_process_group_outlasts_torchpmaps_own_waits():
    assert tpd._process_group_timeout(60.0, "gloo") == datetime.timedelta(seconds=60)
    assert tpd._process_group_timeout(60.0, "nccl") > datetime.timedelta(seconds=60)
    assert tpd._process_group_timeout(float("inf"), "nccl") == datetime.timedelta(seconds=tpd._FOREVER)


class FakeTeardown:
    def __init__(self, monkeypatch):
        self.calls = []
        d = tpd.dist
        monkeypatch.setattr(d, "is_initialized", lambda: True)
        monkeypatch.setattr(d, "barrier", lambda *a, **k: self.calls.append("barrier"))
        monkeypatch.setattr(d, "destroy_process_group", lambda *a: self.calls.append("destroy"))
        monkeypatch.setattr(d.distributed_c10d, "_abort_process_group", lambda *a: self.calls.append("abort"))
        monkeypatch.setattr(tpd, "_state", {"lockstep": tpd._Lockstep()})
        monkeypatch.setattr(tpd._devices, "_set_process_layout", lambda *a: None)


def test_shutdown_of_a_healthy_job_waits_for_peers_and_destroys(monkeypatch):
    fake = FakeTeardown(monkeypatch)
    tpd.shutdown()
    assert fake.calls == ["barrier", "destroy"]


def test_a_peer_that_never_reaches_shutdown_is_a_collective_error_and_an_abort(monkeypatch):
    fake = FakeTeardown(monkeypatch)

    def barrier(*a, **k):
        raise RuntimeError("Timed out waiting 20000ms for recv operation to complete")

    monkeypatch.setattr(tpd.dist, "barrier", barrier)
    with pytest.raises(CollectiveError, match="not every process reached shutdown"):
        tpd.shutdown()
    assert fake.calls == ["abort"]


def test_shutdown_waits_for_peers_on_the_gloo_group_first(monkeypatch):
    # Under NCCL, a barrier of the main group waits on the GPU, with no timeout of
    # torchpmap's, for a peer that never comes; the Gloo check group has the timeout.
    fake = FakeTeardown(monkeypatch)
    tpd._state["check_group"] = "check"
    monkeypatch.setattr(tpd.dist, "barrier", lambda group=None: fake.calls.append(("barrier", group)))
    tpd.shutdown()
    assert fake.calls == [("barrier", "check"), ("barrier", None), "destroy"]


def test_shutdown_after_a_failure_aborts_without_waiting(monkeypatch):
    fake = FakeTeardown(monkeypatch)
    tpd._state["lockstep"].stop("a cross-process psum failed")
    tpd.shutdown()
    assert fake.calls == ["abort"]


def test_shutdown_at_exit_aborts_without_waiting(monkeypatch):
    fake = FakeTeardown(monkeypatch)
    tpd._shutdown_at_exit()
    assert fake.calls == ["abort"]


@pytest.mark.parametrize("timeout", [0, -5, float("nan"), "soon"])
def test_initialize_refuses_a_timeout_that_is_no_positive_number(timeout):
    with pytest.raises(ValueError, match="initialize: timeout must be a positive number of seconds"):
        tpd.initialize(init_method="tcp://127.0.0.1:1", rank=0, world_size=1, timeout=timeout)
    assert not tpd.is_initialized()


@pytest.mark.timing
@pytest.mark.parametrize(
    "kwargs, env, error, match",
    [
        (dict(rank=1, world_size=1), {}, ValueError, r"rank must be in \[0, world_size\).*rank=1, world_size=1"),
        (dict(rank=0, world_size=0), {}, ValueError, r"rank must be in \[0, world_size\)"),
        (dict(rank="0", world_size=1), {}, TypeError, r"rank must be an int, got '0'"),
        (
            dict(backend="bogus", rank=0, world_size=1),
            {},
            ValueError,
            r"backend must be one of \[.*'gloo'.*got 'bogus'",
        ),
        (dict(world_size=1), {"RANK": "zero"}, ValueError, r"RANK must be an integer, got 'zero'"),
    ],
)
def test_initialize_refuses_bad_arguments_before_the_rendezvous(monkeypatch, kwargs, env, error, match):
    # rank=1 of world_size=1 waited 8.5 s for the TCP timeout, "bogus" gave torch's AssertionError,
    # RANK=zero a bare int() error (found by a hunt).
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(error, match=match):
        tpd.initialize(init_method="tcp://127.0.0.1:1", **kwargs)
    assert time.monotonic() - start < 1 and not tpd.is_initialized()


def test_to_dtensor_refuses_a_mesh_that_is_not_one():
    x = tp.device_put_replicated(torch.ones(2), tp.devices()[:2])
    with pytest.raises(TypeError, match=r"to_dtensor: mesh must be a DeviceMesh .*got 3"):
        tpd.to_dtensor(x, mesh=3)
