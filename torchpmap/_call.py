"""What the transform hands an executor: a frozen record of one pmap call.

``Pmapped.__call__`` does everything that depends on the user's arguments
(flattening, plans, checks, placement) and then describes the call in a
``CallRecord``; an ``Executor`` runs it. Today's only executor is
``ThreadsExecutor`` (one worker thread per device, ``_runtime.WorkerPool``).

For the runners that come next:

* a stacked runner (replicas sharing one physical device) reads
  ``placements``/``axes`` to see which leaves are slices of one caller tensor
  (``MAPPED``: ``caller_leaves[j]`` is that tensor, or a numpy array or a
  ShardedTensor laid out for another call, of which ``per_leaf[j]`` holds the
  slices), which are one value for every replica (``BROADCAST``: no replica
  dimension), and which come per replica (``SHARDED``, ``PER_REPLICA``: stack
  them); it runs ``fun`` (or its own capture of it) once, and rebuilds the
  arguments with ``unflatten``;
* a lockstep runner (one host thread, replicas on distinct devices) runs
  ``programs[r]`` on ``replica_inputs()[r]`` for every r with the group's
  axis bound, and calls the collectives on the list of per-device tensors.

Either overrides ``Executor.run`` (keeping its donation rule: call
``record.release_donated()`` once a replica has started, even if the call
fails) and ``run_replicas``, which the backward of a differentiable call
uses for its per-replica vjp tasks; or ``call`` itself where its autograd
works differently. Checks of the inputs (shared tensors not written, shared
modules) stay in the transform, around ``call``.
"""

from __future__ import annotations

import abc
import enum
import inspect
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch.utils._pytree import TreeSpec

from . import _config, _fast_tree, _runtime
from ._autodiff import FlatOutput, differentiable_call
from ._constant_signature import signature, spec_signature
from ._fast_tree import Structure
from ._tree import flatten

if TYPE_CHECKING:
    from ._communicator import Communicator, GroupBackend
    from ._random import Interception
    from ._sharded import ShardedTensor
    from ._stacked import StackedOutput

T = TypeVar("T")


class Placement(enum.IntEnum):
    """How one input leaf reached the replicas."""

    MAPPED = 0  # replica r gets slice r of the caller's tensor along its mapped axis (moved to its device)
    BROADCAST = 1  # every replica gets the same value (a tensor copied to its device where it must be)
    SHARDED = 2  # a ShardedTensor already laid out for this call: replica r gets shard r, untouched
    PER_REPLICA = 3  # a PerReplica: replica r gets its r-th value


@dataclass(frozen=True, slots=True)
class ReplicaGroup:
    """The replicas of one call and their axis: all an executor needs to run
    a task per replica with the axis bound. It holds no inputs, so a
    backward pass may keep it as long as it needs."""

    axis_name: str
    axis_size: int  # global: every process's replicas
    first_index: int  # the global index of the first local replica
    devices: tuple[torch.device, ...]  # local replica r runs on devices[r]
    new_communicator: Callable[[], Communicator]  # a fresh one per run (forward, each backward)
    label: str  # "pmap of f", for errors
    interception: Interception  # whether the function's replicas draw random numbers
    # One GroupBackend per run, for a runner that calls the collectives itself (lockstep).
    new_backend: Callable[[], GroupBackend] | None = None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One pmap call, after placement: what runs, on what, and how its
    inputs were laid out. ``per_leaf[j][r]`` is replica r's value of input
    leaf j (kept per leaf: a stacked runner looks at one leaf across the
    replicas)."""

    group: ReplicaGroup
    fun: Callable[..., Any]  # the user's function
    programs: Sequence[Callable[..., Any]]  # per replica: fun, or its compiled program
    treedef: TreeSpec | None  # of (dynamic args, kwargs); None: positional arguments only
    static_items: tuple[tuple[int, Any], ...]  # (position, value) of the static arguments
    caller_leaves: Sequence[Any]  # the caller's flattened leaves, before placement
    axes: Sequence[int | None]  # per leaf: its mapped axis (None when broadcast)
    placements: Sequence[Placement]  # per leaf
    per_leaf: Sequence[Sequence[Any]]  # per leaf, per replica: the value as placed
    grad_leaves: Sequence[int]  # the leaves whose gradients the caller's autograd needs
    donated: Sequence[ShardedTensor]  # deleted once a replica has started (donate_argnums)
    compile_options: dict[str, Any] | None = None  # compile= (normalize_options); programs compile with them
    # Non-leaf tensors requiring grad, made before the call, that the function reaches
    # without being passed them (closed over): where autograd through the call stops.
    reached_grads: Sequence[torch.Tensor] = ()
    # In a call across processes: every tensor requiring grad that the function reaches
    # without being passed it (closed over, a closed-over module's parameters), named by
    # how it is reached: the processes pair their copies by these names.
    reached_named: Sequence[tuple[str, torch.Tensor]] = ()

    @property
    def n(self) -> int:
        return len(self.group.devices)

    def constants_signature(self) -> tuple[Any, ...]:
        """The types and float zero signs (``_constant_signature``) of the static
        arguments, of the leaves that are not tensors (Python values passed
        broadcast) and of the tree's dict keys and contexts. Dynamo guards a
        constant with ``==``, which takes ``-0.0`` for ``0.0`` and ``(True,)`` for
        ``(1,)``: a capture keyed by this too is never replayed for the other."""
        return constants_signature_of(tuple(v for _, v in self.static_items), self.caller_leaves, self.treedef)

    def keyword_order(self) -> tuple[str, ...]:
        """The keyword arguments' names in the order given, where the function may
        read it (``list(kwargs.values())`` of a ``**kwargs``), which Dynamo, forwarding
        ``**kwargs``, does not guard; () for a plain function without ``**kwargs``,
        which cannot tell the orders apart (a capture per order would be waste)."""
        if self.treedef is None or not _may_take_any_keyword(self.fun):
            return ()
        return tuple(self.treedef.child(1).context)

    def replica_inputs(self) -> list[list[Any]]:
        """Per replica, its flattened inputs (new lists: callers may edit them)."""
        return [[vals[r] for vals in self.per_leaf] for r in range(len(self.group.devices))]

    def unflatten(self, replica_leaves: list[Any]) -> tuple[list[Any] | tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments that ``replica_leaves`` stand for."""
        return unflatten_arguments(self.treedef, self.static_items, replica_leaves)

    def call_replica(self, rank: int, replica_leaves: list[Any]) -> FlatOutput:
        """Run replica ``rank``'s program on its inputs; its output comes back flattened."""
        if self.treedef is None and not self.static_items:  # the common call: no tree to rebuild
            return flatten(self.programs[rank](*replica_leaves))
        dyn, kw = self.unflatten(replica_leaves)
        return flatten(self.programs[rank](*dyn, **kw))

    def release_donated(self) -> None:
        for t in self.donated:
            t.delete()

    def donated_slots(self) -> list[int]:
        """The input leaves that are donated ShardedTensors."""
        donated = {id(t) for t in self.donated}
        return [j for j, leaf in enumerate(self.caller_leaves) if id(leaf) in donated]

    def forget_donated(self, rank: int, slots: Sequence[int]) -> None:
        """Drop the record's references to replica ``rank``'s donated inputs
        (``donated_slots``), once they are handed to the replica."""
        for j in slots:
            values = self.per_leaf[j]
            if isinstance(values, list):
                values[rank] = None


def _may_take_any_keyword(fun: Callable[..., Any]) -> bool:
    """Whether ``fun`` may have a ``**kwargs`` (True unless a plain function or
    method without one)."""
    code = getattr(getattr(fun, "__func__", fun), "__code__", None)
    return not isinstance(code, types.CodeType) or bool(code.co_flags & inspect.CO_VARKEYWORDS)


def unflatten_arguments(
    treedef: TreeSpec | Structure | None, static_items: tuple[tuple[int, Any], ...], leaves: list[Any]
) -> tuple[list[Any] | tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of a call whose dynamic arguments
    flatten to ``leaves`` (``CallRecord.treedef``, or its ``_fast_tree`` structure
    key, and ``CallRecord.static_items``)."""
    if treedef is None:
        dyn: list[Any] | tuple[Any, ...] = leaves
        kw: dict[str, Any] = {}
    else:
        dyn, kw = _fast_tree.unflatten(leaves, treedef)
    if static_items:
        dyn = list(dyn)
        for i, v in static_items:
            dyn.insert(i, v)
    return dyn, kw


class Executor(abc.ABC):
    """Runs a CallRecord's replicas."""

    @abc.abstractmethod
    def run_replicas(
        self,
        group: ReplicaGroup,
        replica_fn: Callable[[int], T],
        caller_streams: Sequence[torch.cuda.Stream | None] | None = None,
    ) -> list[T]:
        """``replica_fn(rank)`` for every local rank, in its replica (axis bound,
        the caller's grad mode and autocast, its random streams), under the
        failure semantics of docs/architecture.md; the results in rank order,
        or the first replica's own exception. ``caller_streams``: per rank, the
        CUDA stream the caller's work was recorded on, when the caller is not
        this thread (the backward of a call, see ``_autodiff``)."""

    def run(self, record: CallRecord, inputs: list[list[Any]]) -> list[FlatOutput]:
        """The forward: replica r runs on ``inputs[r]`` (``record.replica_inputs()``,
        or stand-ins for them that autograd tracks). Donated inputs are deleted
        once a replica has started, even if the call then fails (the function
        may have written them); a call that fails before leaves them usable."""
        on_gpus = any(d.type == "cuda" for d in record.group.devices)
        if not record.donated:

            def replica_of(rank: int) -> FlatOutput:
                if on_gpus:
                    used_on_this_stream(inputs[rank])
                return record.call_replica(rank, inputs[rank])

            return self.run_replicas(record.group, replica_of)
        donated_slots = record.donated_slots()
        release = threading.Lock()

        def replica(rank: int) -> FlatOutput:
            if on_gpus:
                used_on_this_stream(inputs[rank])
            with release:  # the first replica to start deletes them; for the others it is a no-op
                record.release_donated()
            # The replica's function holds its donated inputs from here on, and nothing
            # else of the call does: their memory is free once the function drops them
            # (Python keeps a function's arguments until it returns), not once every
            # replica has finished.
            mine, inputs[rank] = inputs[rank], []
            record.forget_donated(rank, donated_slots)
            return record.call_replica(rank, mine)

        return self.run_replicas(record.group, replica)

    def call(self, record: CallRecord) -> list[FlatOutput] | StackedOutput:
        """Run the call; with grad mode on, so that the caller's autograd sees
        through the replicas. Each replica's output comes back flattened (or,
        from the stacked executor, every replica's at once)."""
        if torch.is_grad_enabled():
            return differentiable_call(self, record)
        return self.run(record, record.replica_inputs())


def used_on_this_stream(values: list[Any]) -> None:
    """Tell the caching allocator that a replica's CUDA inputs are read on the
    stream it runs on (a threads worker's): their memory, allocated on another
    stream, is then not handed out again on that one before the replica's work
    is done, even when the caller drops them during the call (donated inputs,
    a call given up on a timeout or an interrupt)."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_cuda:
            stream = torch.cuda.current_stream(v.device)
            try:
                v.record_stream(stream)
            except RuntimeError:  # no storage of its own (a functorch wrapper, a subclass)
                pass


class ThreadsExecutor(Executor):
    """One persistent worker thread per device (``_runtime.WorkerPool``); a
    collective is a rendezvous of the workers."""

    def run_replicas(
        self,
        group: ReplicaGroup,
        replica_fn: Callable[[int], T],
        caller_streams: Sequence[torch.cuda.Stream | None] | None = None,
    ) -> list[T]:
        return _runtime.pool().run(
            group.devices,
            replica_fn,
            group.new_communicator(),
            group.axis_name,
            group.axis_size,
            first_index=group.first_index,
            label=group.label,
            interception=group.interception,
            caller_streams=caller_streams,
        )


_THREADS = ThreadsExecutor()


def choose_executor(record: CallRecord) -> Executor:
    """The executor for ``record``: the one place that picks (``set_executor``,
    TORCHPMAP_EXECUTOR; "auto" by default)."""
    name = _config.executor_name()
    if name == "threads":
        return _THREADS
    if name == "lockstep":
        from . import _lockstep  # it imports this module

        return _lockstep.LOCKSTEP
    from . import _stacked  # it imports this module

    return _stacked.STACKED if name == "stacked" else _stacked.AUTO


def constants_signature_of(
    static_values: tuple[Any, ...], leaves: Sequence[Any], treedef: TreeSpec | None
) -> tuple[Any, ...]:
    """``CallRecord.constants_signature`` of a call with these static arguments,
    leaves and tree of arguments."""
    return signature(static_values), constant_signature(leaves), spec_signature(treedef)


def constant_signature(leaves: Sequence[Any]) -> tuple[Any, ...]:
    """The ``signature`` of each of ``leaves`` that is not a tensor."""
    return tuple([signature(v) for v in leaves if not isinstance(v, torch.Tensor)])
