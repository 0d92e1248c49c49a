"""Communicators: how the replicas of one pmap call exchange tensors.

A collective in torchpmap is two layers. The public functions (psum, all_gather,
...) reduce every variant (tiled or not, any axis) to five canonical primitives
on a leading "group" dimension, each described by a ``Collective``. Ranks are
global axis indices; ``groups`` is None (one group of everybody) or a tuple of
tuples of ranks (``axis_index_groups``).

* all_reduce(x, op)      -> the reduction of x over the group
* all_gather(x)          -> stack([x of each member])            shape (g, *x)
* reduce_scatter(x, op)  -> reduction of x over the group, row k  x: (g, ...)
* all_to_all(x)          -> out[j] = x of member j, row k         x: (g, ...)
* permute(x, pairs)      -> x of the source that sends to me, or zeros

Two pieces carry them out:

* a ``GroupBackend`` computes one collective for all of this process's
  replicas at once: their n inputs in, their n outputs out (``LocalBackend``
  in one process, ``distributed.ProcessGroupBackend`` across processes);
* a ``Communicator`` is what a replica running on its own thread calls: the
  ``ThreadRendezvous`` collects every replica's input, has the backend compute
  once, and hands each replica its output. Only it knows about threads,
  timeouts, aborts and the Dynamo gate.
"""

from __future__ import annotations

import abc
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias, cast

import torch

from . import _config
from ._layout import distinct_gpus
from ._tree import render_tree
from .errors import CollectiveMismatchError, CollectiveTimeoutError, ReplicaAbortedError

if TYPE_CHECKING:
    from ._compile import DynamoGate

# axis_index_groups as tuples of global ranks; None is one group of everybody.
Groups: TypeAlias = "tuple[tuple[int, ...], ...] | None"
# ppermute's (source, destination) pairs of global ranks.
Pairs: TypeAlias = "tuple[tuple[int, int], ...]"
# Where an exchange sits in a collective over a pytree: (the tree's description,
# the exchange's leaf, every leaf's dimensions or () after the first exchange).
# None for a bare tensor.
TreePlace: TypeAlias = "tuple[str, int, tuple[int, ...]] | None"


class Reducer(Protocol):
    """An elementwise reduction of two tensors (torch.add, ...), into ``out`` if given."""

    def __call__(
        self, input: torch.Tensor, other: torch.Tensor, *, out: torch.Tensor | None = None
    ) -> torch.Tensor: ...


REDUCERS: dict[str, Reducer] = {
    "sum": torch.add,
    "max": torch.maximum,
    "min": torch.minimum,
}


# What every backend and the stacked reductions can reduce; other dtypes are asked.
_REDUCIBLE = frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16}
    | {torch.float32, torch.float64, torch.complex64, torch.complex128}
)


@torch._dynamo.assume_constant_result  # (traced, the probe would add fake tensors, which never fail)
def reduction_problem(op: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why torch cannot reduce ``dtype`` tensors on ``device`` by ``op`` (uint16 to uint64
    and float8 on the CPU: "add_stub" not implemented), or None."""
    if dtype in _REDUCIBLE:
        return None
    return _asked_reduction_problem(op, dtype, device)


@functools.cache
def _asked_reduction_problem(op: str, dtype: torch.dtype, device: torch.device) -> str | None:
    # On real tensors, whatever traces now (a capture's fake tensors never fail, and the
    # answer is cached for the process).
    with torch.utils._python_dispatch._disable_current_modes():
        try:
            one = torch.zeros(1, dtype=dtype, device=device)
            REDUCERS[op](one, one)
        except (RuntimeError, TypeError) as e:  # NotImplementedError is a RuntimeError
            return str(e).splitlines()[0]
    return None


# The kinds of Collective (the names of the ops in _ops), and how errors name them.
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute")
_ERROR_NAMES = {"permute": "ppermute"}


@dataclass(frozen=True, slots=True)
class Collective:
    """One collective and its parameters, the same for every replica that takes part.

    ``op`` is set for the reductions (all_reduce, reduce_scatter), ``pairs`` for
    permute, ``groups`` for the others (None: one group of everybody). ``tree``
    is where the exchange sits in a collective over a pytree. Equal collectives
    on inputs of equal shapes and dtypes pair up (``signature``).
    """

    kind: str
    op: str | None = None
    groups: Groups = None
    pairs: Pairs | None = None
    tree: TreePlace = None

    @property
    def name(self) -> str:
        """How errors name the collective (JAX's names)."""
        return _ERROR_NAMES.get(self.kind, self.kind)

    def signature(self, x: torch.Tensor) -> Signature:
        """What a replica brings to the exchange, compared across replicas."""
        return self, tuple(x.shape), x.dtype


# A collective with the shape and dtype of one replica's input.
Signature: TypeAlias = "tuple[Collective, tuple[int, ...], torch.dtype]"


def describe(signature: Signature) -> str:
    """A signature as errors show it: ``all_reduce('sum',) on a torch.float32 tensor of shape [3]``."""
    collective, shape, dtype = signature
    params = tuple(p for p in (collective.op, collective.groups, collective.pairs) if p is not None)
    text = f"{collective.name}{params} on a {dtype} tensor of shape {list(shape)}"
    if collective.tree is not None:
        description, leaf, dims = collective.tree
        text += f" (leaf {leaf} of {render_tree(description, dims)})"
    return text


def mismatch_error(signatures: Sequence[Signature]) -> CollectiveMismatchError:
    """The error of replicas that bring different signatures to one exchange."""
    lines = "\n".join(f"  replica {r}: {describe(s)}" for r, s in enumerate(signatures))
    return CollectiveMismatchError(
        "replicas called different collectives (or the same one with different "
        "shapes, dtypes, parameters or pytrees) at the same point:\n" + lines
    )


class GroupBackend(abc.ABC):
    """One collective over all of this process's replicas of a call, on one thread.

    ``run(collective, xs)`` takes the input of each of this process's ``size``
    replicas (``xs[i]`` on ``devices[i]``, global axis index ``first + i`` of
    ``axis_size``) and returns each one's result on its device. Results never
    alias each other or the inputs, so a replica may update its result in place.
    The inputs must be ready to read (the caller synchronises its streams).

    It needs no threads: the thread rendezvous calls it once per exchange, and a
    runner that holds every replica's tensor itself calls it directly: replicas
    in lockstep on one thread pass their per-device tensors; replicas stacked on
    one device can pass the rows of the stacked buffer (``unbind(0)``) and stack
    the results, where no batched kernel over the replica dimension covers the
    collective. Ranks in ``collective`` (groups, pairs) are global axis indices.
    A backend may hold per-run state (ProcessGroupBackend numbers its exchanges):
    make one per run.

    A ``stream_ordered`` backend (replicas on distinct GPUs of this process)
    takes the inputs as they are on their streams: ``run`` with ``streams[i]``,
    the stream ``xs[i]`` was made on and its result will be used on (None: the
    calling thread's current streams), queues its work on those streams and
    needs no host synchronisation before or after, as long as every ``xs[i]``
    is on ``devices[i]``.
    """

    devices: list[torch.device]
    size: int  # this process's replicas
    first: int  # the global axis index of devices[0]
    axis_size: int  # replicas of every process
    stream_ordered: bool = False

    def __init__(self, devices: Sequence[torch.device], first: int, axis_size: int) -> None:
        self.devices = list(devices)
        self.size = len(self.devices)
        self.first = first
        self.axis_size = axis_size
        self._cuda = any(d.type == "cuda" for d in self.devices)

    @abc.abstractmethod
    def run(
        self, collective: Collective, xs: Sequence[torch.Tensor], streams: Sequence[torch.cuda.Stream] | None = None
    ) -> list[torch.Tensor]:
        """Every local replica's result from every local replica's input."""

    def on_own_devices(self, xs: Sequence[torch.Tensor]) -> bool:
        """Whether ``run`` may take ``xs`` in stream order (see the class)."""
        return self.stream_ordered and all(x.device == d for x, d in zip(xs, self.devices))

    def to(self, t: torch.Tensor, local_rank: int) -> torch.Tensor:
        """``t`` on the device of local replica ``local_rank`` (virtual CPU devices share memory)."""
        if not self._cuda:
            return t
        return t.to(self.devices[local_rank])


class LocalBackend(GroupBackend):
    """Every replica of the axis is in this process: compute_results over them."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        super().__init__(devices, 0, len(devices))
        self.stream_ordered = distinct_gpus(self.devices)

    def run(
        self, collective: Collective, xs: Sequence[torch.Tensor], streams: Sequence[torch.cuda.Stream] | None = None
    ) -> list[torch.Tensor]:
        if self.on_own_devices(xs):  # NCCL, or copies ordered by the streams: no host synchronisation
            from . import _gpu_collectives  # it builds on compute_results below

            if streams is None:
                streams = [torch.cuda.current_stream(d) for d in self.devices]
            return _gpu_collectives.run(collective, xs, self.devices, streams)
        return compute_results(collective, xs, self.size, self.to)


class Communicator(abc.ABC):
    """The collectives as the replica running on the calling thread sees them."""

    size: int

    @abc.abstractmethod
    def exchange(self, rank: int, collective: Collective, x: torch.Tensor) -> torch.Tensor:
        """Replica ``rank`` (its global axis index) takes part in ``collective`` with ``x``."""

    @abc.abstractmethod
    def abort(self, error: BaseException, rank: int) -> None:
        """Release every replica waiting in a collective: replica ``rank`` failed."""

    @abc.abstractmethod
    def retire(self, rank: int) -> None:
        """Replica ``rank`` returned; nobody should wait for it any more."""


class ThreadRendezvous(Communicator):
    """A rendezvous of worker threads: each collective is one exchange.

    Every replica deposits its tensor; the last one to arrive has the backend
    compute every replica's result while the others still wait, then releases
    them. Computing before release means no replica reads another's input after
    that replica has moved on (and perhaps modified it in place), with a single
    barrier. Replicas are numbered by global axis index; the backend's ``first``
    is this process's first.
    """

    def __init__(self, backend: GroupBackend, gate: DynamoGate | None = None) -> None:
        self._backend = backend
        self.size = backend.size
        self._first = backend.first
        self._gate = gate  # the compile warm-up gate (see _compile.py), if any
        self._cuda = any(d.type == "cuda" for d in backend.devices)
        self._timeout: float | None = None  # the configured one, read at the first exchange
        self._lock_timeout = -1.0  # _timeout as Lock.acquire takes it (-1: for ever)
        # A short lock guards the arrival bookkeeping; nobody waits while
        # holding it. Each replica sleeps on its own lock, which the last
        # arrival releases: one wake-up per waiter and no convoy on a shared
        # condition variable. Those locks are made at the first exchange, as
        # most pmap calls never communicate.
        self._lock = threading.Lock()
        self._wake: list[threading.Lock] = []
        self._waiting: set[int] = set()
        self._generation = 0
        self._arrived = 0
        self._deposits: list[_Deposit | None] = [None] * self.size
        # By generation parity; () until that generation's exchange completes.
        self._results: list[Sequence[torch.Tensor] | Exception] = [(), ()]
        self._failure: BaseException | None = None
        self._failed_rank: int | None = None
        self._retired: set[int] = set()

    # -- failure handling ----------------------------------------------------
    def abort(self, error: BaseException, rank: int) -> None:
        with self._lock:
            self._fail(error, rank)

    def retire(self, rank: int) -> None:
        with self._lock:
            self._retired.add(rank)
            if self._arrived and self._failure is None:
                waiting = [r for r, d in enumerate(self._deposits) if d is not None]
                first = self._deposits[waiting[0]]
                assert first is not None  # waiting lists the replicas that deposited
                self._fail(
                    CollectiveMismatchError(
                        f"replica {rank} returned while replicas {waiting} wait in "
                        f"{describe(first[0])}: every replica "
                        f"must call the same collectives in the same order"
                    ),
                    rank,
                )

    def _fail(self, error: BaseException, rank: int) -> None:
        # Called with self._lock held. The first failure wins; wake everybody.
        if self._failure is None:
            self._failure = error
            self._failed_rank = rank
        for r in self._waiting:
            self._wake[r].release()
        self._waiting.clear()

    # -- the rendezvous ------------------------------------------------------
    def exchange(self, rank: int, collective: Collective, x: torch.Tensor) -> torch.Tensor:
        rank -= self._first
        if self.size == 1:
            # Nobody to wait for; still return a fresh tensor like every path.
            return self._backend.run(collective, [x])[0]
        signature = collective.signature(x)
        if self._gate is not None and self._gate.held() and torch._guards.CompileContext.try_get() is not None:
            # A compile runs no collective for real, save by folding constants (which the ops'
            # tags forbid): the other replicas wait for the gate until this compile ends, and
            # waiting for them would hang the call. (This thread's compile context, not the
            # gate's compiling flag: another thread's torch.compile sets that one too.)
            raise RuntimeError(
                f"torchpmap: {describe(signature)} ran for real while Dynamo compiled replica {rank} "
                f"(constant folding?): the other replicas cannot reach it until the compile ends"
            )
        stream = None  # the replica's stream on its own device, where it will use its result
        if self._cuda:
            home = self._backend.devices[rank]
            if home.type == "cuda":
                stream = torch.cuda.current_stream(home)
            if x.is_cuda and (not self._backend.stream_ordered or x.device != home):
                # Host-side synchronisation keeps cross-device reads safe
                # without ordering the streams (a CPU replica, replicas
                # sharing a GPU, an input on another device, other processes).
                torch.cuda.current_stream(x.device).synchronize()
        with self._lock:
            self._raise_failure(rank)
            if self._retired:
                self._fail(
                    CollectiveMismatchError(
                        f"replica {rank} called {describe(signature)} but replicas "
                        f"{sorted(self._retired)} had already returned: every replica "
                        f"must call the same collectives in the same order"
                    ),
                    rank,
                )
                self._raise_failure(rank)
            if not self._wake:
                self._wake = [threading.Lock() for _ in range(self.size)]
                for w in self._wake:
                    w.acquire()
                if self._timeout is None:
                    self._timeout = _config.collective_timeout()
                    self._lock_timeout = _config.wait_seconds(self._timeout)
            generation = self._generation
            self._deposits[rank] = (signature, x, stream)
            self._arrived += 1
            last = self._arrived == self.size
            if last:
                deposits = self._deposits
                self._deposits = [None] * self.size
                self._arrived = 0
                self._generation = generation + 1
            else:
                self._waiting.add(rank)
        if last:
            self._complete(generation, deposits, collective)
        else:
            gate = self._gate
            if gate is not None and gate.pause():
                try:
                    self._wait(rank, generation, signature)
                finally:
                    gate.enter()
            else:
                self._wait(rank, generation, signature)
        result = self._results[generation & 1]
        if isinstance(result, BaseException):
            raise type(result)(*result.args)
        return result[rank]

    def _complete(self, generation: int, deposits: list[_Deposit | None], collective: Collective) -> None:
        signatures: list[Signature] = []
        inputs: list[torch.Tensor] = []
        streams: list[torch.cuda.Stream | None] = []
        for deposit in deposits:
            assert deposit is not None  # the last replica to arrive completes: all have deposited
            signatures.append(deposit[0])
            inputs.append(deposit[1])
            streams.append(deposit[2])
        result: list[torch.Tensor] | Exception
        try:
            if any(s != signatures[0] for s in signatures):
                raise mismatch_error(signatures)
            if self._backend.on_own_devices(inputs):
                # Queued on the replicas' streams, each result allocated on the
                # stream that uses it: nothing for the host to wait for.
                assert all(s is not None for s in streams)  # every input is on a GPU
                result = self._backend.run(collective, inputs, cast("list[torch.cuda.Stream]", streams))
            else:
                result = self._run_synchronised(collective, inputs, streams)
        except Exception as e:  # reported in every replica, not just this one
            result = e
        self._results[generation & 1] = result
        with self._lock:
            waiting = self._waiting
            self._waiting = set()
        for r in waiting:
            self._wake[r].release()

    def _run_synchronised(
        self, collective: Collective, inputs: list[torch.Tensor], streams: list[torch.cuda.Stream | None]
    ) -> list[torch.Tensor]:
        """The backend's results, computed with the host in between: inputs
        ready before, results ready after."""
        if self._backend.stream_ordered:  # replicas whose input was on their own GPU did not synchronise
            for x, stream, d in zip(inputs, streams, self._backend.devices):
                if stream is not None and x.device == d:
                    stream.synchronize()
        result = self._backend.run(collective, inputs)
        if self._cuda:
            for d in {t.device for t in result if t.is_cuda}:
                torch.cuda.synchronize(d)
            # This thread made every replica's result on its own current streams;
            # the caching allocator must not reuse a result's memory while the
            # replica that receives it may still use it on its stream.
            for t, stream in zip(result, streams):
                if stream is not None and t.is_cuda and t.device == stream.device:
                    t.record_stream(stream)
        return result

    def _wait(self, rank: int, generation: int, signature: Signature) -> None:
        assert self._timeout is not None  # set at the first exchange, before anybody waits
        if self._wake[rank].acquire(timeout=self._lock_timeout):
            self._raise_failure(rank)  # woken by a failure rather than completion?
            return
        with self._lock:
            completing = self._generation > generation
        if completing:
            # Every replica arrived just as we timed out: the last one is computing
            # the results and will wake us. Wait for it without holding the lock,
            # which it needs to wake us (holding it here deadlocked).
            self._wake[rank].acquire()
            self._raise_failure(rank)
            return
        with self._lock:
            missing = [r for r, d in enumerate(self._deposits) if d is None]
            self._waiting.discard(rank)
            self._fail(
                CollectiveTimeoutError(
                    f"{describe(signature)} timed out after {self._timeout:g} s "
                    f"waiting for replicas {missing} (set TORCHPMAP_COLLECTIVE_TIMEOUT "
                    f"or torchpmap.set_collective_timeout to change the limit)"
                ),
                rank,
            )
        self._raise_failure(rank)

    def _raise_failure(self, rank: int) -> None:
        failure = self._failure
        if failure is None:
            return
        if rank == self._failed_rank or isinstance(failure, (CollectiveMismatchError, CollectiveTimeoutError)):
            if rank == self._failed_rank:
                raise failure
            raise type(failure)(*failure.args)
        who = "the caller gave up on the call" if self._failed_rank == -1 else f"replica {self._failed_rank} failed"
        raise ReplicaAbortedError(f"collective cancelled: {who} with {type(failure).__name__}: {_text(failure)}")


def _text(e: BaseException) -> str:
    """``str(e)``, or a stand-in when the exception cannot say it: this message
    must not replace the failure it reports."""
    try:
        return str(e)
    except Exception:
        return "(its message could not be formatted)"


# What a replica brings: its signature, its input, and its current CUDA stream
# on the input's device (None on the CPU), the stream its result is used on.
_Deposit: TypeAlias = "tuple[Signature, torch.Tensor, torch.cuda.Stream | None]"


def compute_results(
    collective: Collective,
    xs: Sequence[torch.Tensor],
    size: int,
    to: Callable[[torch.Tensor, int], torch.Tensor],
    ranks: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """The result of ``collective`` for each rank of ``ranks`` (default all
    ``size``), in that order, given every rank's input ``xs[r]``. ``to(t, r)``
    moves a tensor to rank r's device. Only the requested ranks' results are
    built: a process holding every rank's input computes just its own replicas'
    (an all_gather would otherwise build size² inputs' worth). Results never
    alias each other or the inputs."""
    wanted = list(range(size)) if ranks is None else list(ranks)
    kind = collective.kind
    if kind == "permute":
        return [_permuted(collective.pairs or (), xs, r, to) for r in wanted]
    out: dict[int, torch.Tensor] = {}
    wanted_set = set(wanted)
    for g in collective.groups or (tuple(range(size)),):
        mine = [(k, r) for k, r in enumerate(g) if r in wanted_set]
        if not mine:
            continue
        if kind == "all_reduce":
            _all_reduce_into(out, collective, xs, g, mine, to)
        elif kind == "reduce_scatter":
            _reduce_scatter_into(out, collective, xs, g, mine, to)
        elif kind == "all_gather":
            stacked = torch.stack([to(xs[r], mine[0][1]) for r in g])
            for i, (_, r) in enumerate(mine):
                out[r] = to(stacked if i == 0 else stacked.clone(), r)
        elif kind == "all_to_all":
            for k, r in mine:
                out[r] = torch.stack([to(xs[j][k], r) for j in g])
        else:
            raise AssertionError(f"unknown collective {kind!r}")
    return [out[r] for r in wanted]


def _permuted(
    pairs: Pairs, xs: Sequence[torch.Tensor], r: int, to: Callable[[torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """Rank r's result of a permute: its source's input, or zeros without one."""
    for src, dst in pairs:
        if dst == r:
            return to(xs[src], r).clone()
    return torch.zeros_like(xs[r])


def _reduced(
    collective: Collective,
    parts: Sequence[torch.Tensor],
    at: int,
    to: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """The reduction of ``parts`` (in group order) on rank ``at``'s device, as a fresh tensor."""
    assert collective.op is not None  # reductions carry their op
    reduce = REDUCERS[collective.op]
    if len(parts) == 1:
        return to(parts[0], at).clone()
    total = reduce(to(parts[0], at), to(parts[1], at))
    for t in parts[2:]:  # in place: one buffer, not one per member
        reduce(total, to(t, at), out=total)
    return total


def _all_reduce_into(
    out: dict[int, torch.Tensor],
    collective: Collective,
    xs: Sequence[torch.Tensor],
    group: tuple[int, ...],
    mine: list[tuple[int, int]],
    to: Callable[[torch.Tensor, int], torch.Tensor],
) -> None:
    total = _reduced(collective, [xs[r] for r in group], mine[0][1], to)
    for i, (_, r) in enumerate(mine):
        out[r] = to(total, r) if i == 0 else to(total, r).clone()


def _reduce_scatter_into(
    out: dict[int, torch.Tensor],
    collective: Collective,
    xs: Sequence[torch.Tensor],
    group: tuple[int, ...],
    mine: list[tuple[int, int]],
    to: Callable[[torch.Tensor, int], torch.Tensor],
) -> None:
    if len(mine) == len(group):  # every row is wanted: one reduction, rows of one fresh buffer
        total = _reduced(collective, [xs[r] for r in group], mine[0][1], to)
        for k, r in mine:
            out[r] = to(total[k], r)
        return
    for k, r in mine:  # only the wanted rows, each its own fresh buffer
        out[r] = _reduced(collective, [xs[j][k] for j in group], r, to)
