"""The seam between the transform and its executors: the call record."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
from helpers import devices as local_devices

import torchpmap
from torchpmap import _call, _pmap
from torchpmap._call import CallRecord, Executor, Placement, ReplicaGroup, ThreadsExecutor

T = TypeVar("T")


class SequentialExecutor(Executor):
    """Runs the replicas one after the other on the caller's thread, with no
    axis bound: enough for functions without collectives."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.groups: list[ReplicaGroup] = []

    def run(self, record: CallRecord, inputs: list[list[Any]]) -> list[Any]:
        self.records.append(record)
        return super().run(record, inputs)

    def run_replicas(self, group: ReplicaGroup, replica_fn: Callable[[int], T], caller_streams=None) -> list[T]:
        self.groups.append(group)
        return [replica_fn(r) for r in range(len(group.devices))]


@pytest.fixture
def sequential(monkeypatch: pytest.MonkeyPatch) -> SequentialExecutor:
    executor = SequentialExecutor()
    monkeypatch.setattr(_pmap, "choose_executor", lambda record: executor)
    return executor


def test_auto_is_the_default_executor_and_a_first_call_runs_on_the_threads(monkeypatch):
    from torchpmap import _config, _stacked

    monkeypatch.delenv("TORCHPMAP_EXECUTOR", raising=False)
    monkeypatch.setattr(_config, "_executor", None)
    seen: list[Executor] = []
    real = _pmap.choose_executor

    def spy(record: CallRecord) -> Executor:
        seen.append(real(record))
        return seen[-1]

    monkeypatch.setattr(_pmap, "choose_executor", spy)
    f = torchpmap.pmap(lambda x: x + 1)
    first = f(torch.zeros(2, 3))
    assert seen == [_stacked.AUTO]
    assert first.shard_layout.storage.value != "stacked"  # the threads ran it
    later = f(torch.zeros(2, 3))
    assert later.shard_layout.storage.value == "stacked"
    assert torch.equal(first.unshard(), later.unshard())


def test_threads_executor_is_a_choice(monkeypatch):
    seen: list[Executor] = []
    real = _pmap.choose_executor

    def spy(record: CallRecord) -> Executor:
        seen.append(real(record))
        return seen[-1]

    monkeypatch.setattr(_pmap, "choose_executor", spy)
    torchpmap.set_executor("threads")
    torchpmap.pmap(lambda x: x + 1)(torch.zeros(2, 3))
    assert len(seen) == 1 and isinstance(seen[0], ThreadsExecutor)


def test_a_custom_executor_gets_a_complete_record_and_its_results_are_assembled(sequential):
    devices = local_devices(2)
    sharded = torchpmap.device_put_sharded([torch.full((3,), 10.0), torch.full((3,), 20.0)], devices)
    per_replica = torchpmap.PerReplica([100.0, 200.0], devices)

    def f(scale, x, y, s, p, *, z):
        return {"out": scale * x + y + s + p + z, "nothing": None}

    pf = torchpmap.pmap(f, "i", in_axes=(None, 0, None, 0, 0), static_broadcasted_argnums=0)
    x = torch.arange(6.0).reshape(2, 3)
    y = torch.ones(3)
    z = torch.full((2, 1), 1000.0)
    out = pf(2.0, x, y, sharded, per_replica, z=z)

    assert isinstance(out["out"], torchpmap.ShardedTensor) and out["nothing"] is None
    expected = 2.0 * x + y + torch.tensor([[10.0], [20.0]]) + torch.tensor([[100.0], [200.0]]) + 1000.0
    torch.testing.assert_close(out["out"].unshard(), expected)

    (record,) = sequential.records
    group = record.group
    assert (group.axis_name, group.axis_size, group.first_index) == ("i", 2, 0)
    assert group.devices == tuple(devices) and group.label == f"pmap of {f.__qualname__}"
    assert group.interception is pf._random
    assert record.fun is f and list(record.programs) == [f, f] and record.n == 2
    assert record.static_items == ((0, 2.0),)
    assert record.treedef is not None  # a keyword argument: not positional only
    assert list(record.placements) == [
        Placement.MAPPED,  # x
        Placement.BROADCAST,  # y
        Placement.SHARDED,  # sharded, already laid out for this call
        Placement.PER_REPLICA,  # per_replica
        Placement.MAPPED,  # z, a keyword argument
    ]
    assert list(record.axes) == [0, None, 0, 0, 0]
    assert record.caller_leaves[0] is x and record.caller_leaves[2] is sharded
    assert record.per_leaf[1] == [y, y] and record.per_leaf[3] == [100.0, 200.0]
    assert record.per_leaf[2][1] is sharded.shards[1]
    assert list(record.grad_leaves) == [] and list(record.donated) == []


def test_slices_and_shards_are_made_on_first_use_in_the_calls_grad_mode():
    devices = tuple(local_devices(2))
    x = torch.arange(6.0).reshape(3, 2).requires_grad_()
    sharded = torchpmap.device_put_sharded([torch.zeros(3), torch.ones(3)], devices)
    per_leaf = _pmap._PerLeafValues(devices, grad_on=True)
    per_leaf.append_slices(x, 1)
    per_leaf.append_shards(sharded)
    per_leaf.append([5, 5])
    assert len(per_leaf) == 3 and per_leaf[2] == [5, 5]
    with torch.no_grad():
        slices = per_leaf[0]
    assert all(s.grad_fn is not None for s in slices)  # unbind recorded, as when the call placed them
    assert torch.equal(torch.stack(list(slices), 1), x) and per_leaf[0] is slices
    assert list(per_leaf[1]) == list(sharded.shards) and per_leaf[-2] is per_leaf[1]
    assert per_leaf[1:] == [per_leaf[1], [5, 5]]


def test_positional_tensors_need_no_tree(sequential):
    torchpmap.pmap(lambda a, b: a * b)(torch.ones(2, 2), torch.ones(2, 2))
    assert sequential.records[0].treedef is None
    assert sequential.records[0].unflatten([1, 2]) == ([1, 2], {})


def test_autograd_through_a_custom_executor_runs_the_backward_on_it(sequential):
    x = torch.arange(4.0).reshape(2, 2).requires_grad_()
    w = torch.tensor([3.0, 5.0], requires_grad=True)
    out = torchpmap.pmap(lambda x, w: (x * w).sum(), in_axes=(0, None))(x, w)
    (record,) = sequential.records
    assert list(record.grad_leaves) == [0, 1]
    assert len(sequential.groups) == 1  # the forward
    out.unshard().sum().backward()
    assert len(sequential.groups) == 2  # and one backward run, on the same group
    assert sequential.groups[1] is record.group
    torch.testing.assert_close(x.grad, w.detach().expand(2, 2))
    torch.testing.assert_close(w.grad, x.detach().sum(0))


@pytest.mark.threads_only  # the stacked backward recomputes the forward, so it keeps the inputs
def test_the_backward_does_not_keep_the_call_inputs_alive():
    w = torch.ones(2, 3, requires_grad=True)
    b = torch.ones(2, 3)  # needs no gradient, and w + b saves nothing for the backward
    freed = weakref.ref(b)
    out = torchpmap.pmap(lambda w, b: w + b)(w, b)
    del b
    gc.collect()
    assert freed() is None
    out.unshard().sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(2, 3))


def test_the_executor_deletes_a_donated_input_once_a_replica_started(sequential):
    x = torchpmap.device_put_sharded([torch.ones(3), torch.ones(3)], local_devices(2))
    out = torchpmap.pmap(lambda x: x + 1, donate_argnums=0)(x)
    (record,) = sequential.records
    assert list(record.donated) == [x]
    torch.testing.assert_close(out.unshard(), torch.full((2, 3), 2.0))
    with pytest.raises(torchpmap.errors.DeletedShardedTensorError):
        x.unshard()


def test_the_executor_keeps_a_donated_input_when_no_replica_started(monkeypatch):
    class Refusing(SequentialExecutor):
        def run_replicas(self, group: ReplicaGroup, replica_fn: Callable[[int], T], caller_streams=None) -> list[T]:
            raise RuntimeError("no device today")

    monkeypatch.setattr(_pmap, "choose_executor", lambda record: Refusing())
    x = torchpmap.device_put_sharded([torch.ones(3), torch.ones(3)], local_devices(2))
    with pytest.raises(RuntimeError, match="no device today"):
        torchpmap.pmap(lambda x: x + 1, donate_argnums=0)(x)
    torch.testing.assert_close(x.unshard(), torch.ones(2, 3))


def test_choose_executor_is_the_one_place_that_picks():
    assert _pmap.choose_executor is _call.choose_executor
