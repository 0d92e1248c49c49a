"""Communicators: how the replicas of one pmap call exchange tensors.

A collective in torchpmap is two layers. The public functions (psum, all_gather,
...) reduce every variant (tiled or not, any axis) to five canonical primitives
on a leading "group" dimension; a Communicator implements those primitives for
one pmap call. Ranks are global axis indices; ``groups`` is None (one group of
everybody) or a tuple of tuples of ranks (``axis_index_groups``).

* all_reduce(x, op)      -> the reduction of x over the group
* all_gather(x)          -> stack([x of each member])            shape (g, *x)
* reduce_scatter(x, op)  -> reduction of x over the group, row k  x: (g, ...)
* all_to_all(x)          -> out[j] = x of member j, row k         x: (g, ...)
* permute(x, pairs)      -> x of the source that sends to me, or zeros

Each primitive also takes ``tree``: where the exchange sits in a collective over
a pytree (see ``_ops``), compared across replicas like shapes and dtypes.

``InProcessCommunicator`` serves replicas that are threads of this process;
another implementation (torch.distributed) plugs in with the same interface.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from . import _config
from ._tree import render_tree
from .errors import CollectiveMismatchError, CollectiveTimeoutError, ReplicaAbortedError

if TYPE_CHECKING:
    from ._compile import DynamoGate

# axis_index_groups as tuples of global ranks; None is one group of everybody.
Groups: TypeAlias = "tuple[tuple[int, ...], ...] | None"
# One collective and its parameters, the same on every replica: ("all_reduce", op,
# groups), ("all_gather", groups), ("reduce_scatter", op, groups), ("all_to_all",
# groups) or ("ppermute", ((src, dst), ...)).
What: TypeAlias = "tuple[Any, ...]"
# Where an exchange sits in a collective over a pytree: (the tree's description,
# the exchange's leaf, every leaf's dimensions or () after the first exchange).
# None for a bare tensor.
TreePlace: TypeAlias = "tuple[str, int, tuple[int, ...]] | None"
# What a replica brings to an exchange, compared across replicas: (what, shape, dtype, tree).
Signature: TypeAlias = "tuple[What, tuple[int, ...], torch.dtype, TreePlace]"
_Deposit: TypeAlias = "tuple[Signature, torch.Tensor]"

REDUCERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": torch.add,
    "max": torch.maximum,
    "min": torch.minimum,
}


class Communicator(abc.ABC):
    """The collective primitives for the replicas of one pmap call."""

    size: int

    @abc.abstractmethod
    def all_reduce(
        self, rank: int, x: torch.Tensor, op: str, groups: Groups, tree: TreePlace = None
    ) -> torch.Tensor: ...

    @abc.abstractmethod
    def all_gather(self, rank: int, x: torch.Tensor, groups: Groups, tree: TreePlace = None) -> torch.Tensor: ...

    @abc.abstractmethod
    def reduce_scatter(
        self, rank: int, x: torch.Tensor, op: str, groups: Groups, tree: TreePlace = None
    ) -> torch.Tensor: ...

    @abc.abstractmethod
    def all_to_all(self, rank: int, x: torch.Tensor, groups: Groups, tree: TreePlace = None) -> torch.Tensor: ...

    @abc.abstractmethod
    def permute(
        self, rank: int, x: torch.Tensor, pairs: Sequence[tuple[int, int]], tree: TreePlace = None
    ) -> torch.Tensor: ...

    @abc.abstractmethod
    def abort(self, error: BaseException, rank: int) -> None:
        """Release every replica waiting in a collective: replica ``rank`` failed."""

    @abc.abstractmethod
    def retire(self, rank: int) -> None:
        """Replica ``rank`` returned; nobody should wait for it any more."""


class InProcessCommunicator(Communicator):
    """A rendezvous of worker threads: each collective is one exchange.

    Every replica deposits its tensor; the last one to arrive computes every
    replica's result while the others still wait, then releases them. Computing
    before release means no replica reads another's input after that replica
    has moved on (and perhaps modified it in place), with a single barrier.
    Results never alias each other, so a replica may modify its result in place.
    """

    def __init__(self, devices: Sequence[torch.device], gate: DynamoGate | None = None) -> None:
        self.size = len(devices)
        self._gate = gate  # the compile warm-up gate (see _compile.py), if any
        self._devices = list(devices)
        self._cuda = any(d.type == "cuda" for d in devices)
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

    # -- the five primitives -------------------------------------------------
    # Each is one exchange; the last replica to arrive computes everybody's
    # result with compute_results (below).
    def all_reduce(self, rank: int, x: torch.Tensor, op: str, groups: Groups, tree: TreePlace = None) -> torch.Tensor:
        return self._exchange(rank, ("all_reduce", op, groups), x, tree)

    def all_gather(self, rank: int, x: torch.Tensor, groups: Groups, tree: TreePlace = None) -> torch.Tensor:
        return self._exchange(rank, ("all_gather", groups), x, tree)

    def reduce_scatter(
        self, rank: int, x: torch.Tensor, op: str, groups: Groups, tree: TreePlace = None
    ) -> torch.Tensor:
        return self._exchange(rank, ("reduce_scatter", op, groups), x, tree)

    def all_to_all(self, rank: int, x: torch.Tensor, groups: Groups, tree: TreePlace = None) -> torch.Tensor:
        return self._exchange(rank, ("all_to_all", groups), x, tree)

    def permute(
        self, rank: int, x: torch.Tensor, pairs: Sequence[tuple[int, int]], tree: TreePlace = None
    ) -> torch.Tensor:
        return self._exchange(rank, ("ppermute", tuple(pairs)), x, tree)

    def _compute(self, what: What, xs: list[torch.Tensor], tree: TreePlace = None) -> list[torch.Tensor]:
        """Every local replica's result from every local replica's input. A
        communicator spanning processes overrides this to talk to the others."""
        return compute_results(what, xs, self.size, self._to)

    def _local_rank(self, rank: int) -> int:
        return rank

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
                        f"{self._describe(first[0])}: every replica "
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
    def _exchange(self, rank: int, what: What, x: torch.Tensor, tree: TreePlace = None) -> torch.Tensor:
        rank = self._local_rank(rank)
        if self.size == 1:
            # Nobody to wait for; still return a fresh tensor like every path.
            return self._compute(what, [x], tree)[0]
        signature = (what, tuple(x.shape), x.dtype, tree)
        if self._cuda and x.is_cuda:
            # Host-side synchronisation keeps cross-device reads safe without
            # knowing every thread's stream. NCCL would be the fast path here.
            torch.cuda.current_stream(x.device).synchronize()
        with self._lock:
            self._raise_failure(rank)
            if self._retired:
                self._fail(
                    CollectiveMismatchError(
                        f"replica {rank} called {self._describe(signature)} but replicas "
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
            self._deposits[rank] = (signature, x)
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
            self._complete(generation, deposits, what, tree)
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

    def _complete(self, generation: int, deposits: list[_Deposit | None], what: What, tree: TreePlace) -> None:
        signatures: list[Signature] = []
        inputs: list[torch.Tensor] = []
        for deposit in deposits:
            assert deposit is not None  # the last replica to arrive completes: all have deposited
            signatures.append(deposit[0])
            inputs.append(deposit[1])
        result: list[torch.Tensor] | Exception
        try:
            if any(s != signatures[0] for s in signatures):
                lines = "\n".join(f"  replica {r}: {self._describe(s)}" for r, s in enumerate(signatures))
                raise CollectiveMismatchError(
                    "replicas called different collectives (or the same one with different "
                    "shapes, dtypes, parameters or pytrees) at the same point:\n" + lines
                )
            result = self._compute(what, inputs, tree)
            if self._cuda:
                for d in {t.device for t in result if t.is_cuda}:
                    torch.cuda.synchronize(d)
        except Exception as e:  # reported in every replica, not just this one
            result = e
        self._results[generation & 1] = result
        with self._lock:
            waiting = self._waiting
            self._waiting = set()
        for r in waiting:
            self._wake[r].release()

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
                    f"{self._describe(signature)} timed out after {self._timeout:g} s "
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
        raise ReplicaAbortedError(f"collective cancelled: {who} with {type(failure).__name__}: {failure}")

    def _to(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        if not self._cuda:
            return t
        return t.to(self._devices[rank])

    @staticmethod
    def _describe(signature: Signature) -> str:
        what, shape, dtype, tree = signature
        name, *params = what
        text = f"{name}{tuple(p for p in params if p is not None)} on a {dtype} tensor of shape {list(shape)}"
        if tree is not None:
            description, leaf, dims = tree
            text += f" (leaf {leaf} of {render_tree(description, dims)})"
        return text


def compute_results(
    what: What, xs: Sequence[torch.Tensor], size: int, to: Callable[[torch.Tensor, int], torch.Tensor]
) -> list[torch.Tensor]:
    """The result of collective ``what`` for each of ``size`` ranks, given every
    rank's input ``xs[r]``. ``to(t, r)`` moves a tensor to rank r's device.
    Results never alias each other or the inputs."""
    name = what[0]
    out: list = [None] * size
    if name == "ppermute":
        for src, dst in what[1]:
            out[dst] = to(xs[src], dst).clone()
        for r in range(size):
            if out[r] is None:
                out[r] = torch.zeros_like(xs[r])
        return out
    groups = what[-1] or (tuple(range(size)),)
    for g in groups:
        if name == "all_reduce" or name == "reduce_scatter":
            reduce = REDUCERS[what[1]]
            total = to(xs[g[0]], g[0])
            for r in g[1:]:
                total = reduce(total, to(xs[r], g[0]))
            if len(g) == 1:  # otherwise total is already a fresh tensor
                total = total.clone()
            for k, r in enumerate(g):
                if name == "reduce_scatter":
                    out[r] = to(total[k], r)  # rows of one fresh buffer: disjoint
                else:
                    out[r] = to(total, r) if k == 0 else to(total, r).clone()
        elif name == "all_gather":
            stacked = torch.stack([to(xs[r], g[0]) for r in g])
            for k, r in enumerate(g):
                out[r] = to(stacked if k == 0 else stacked.clone(), r)
        elif name == "all_to_all":
            for k, r in enumerate(g):
                out[r] = torch.stack([to(xs[j][k], r) for j in g])
        else:
            raise AssertionError(f"unknown collective {name!r}")
    return out
