"""The executor: one persistent worker thread per device.

Workers are created the first time a device is used and live for the whole
process; a pmap call hands each worker one task and waits for all of them.
On CUDA each worker owns a stream: it waits for the caller's stream before it
starts and the caller's stream waits for it afterwards, so inputs and outputs
are ordered exactly as if the caller had run the work itself.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _axis
from ._communicator import Communicator
from ._devices import device_str
from .errors import ReplicaAbortedError


@dataclass(frozen=True)
class CallerState:
    """Thread-local PyTorch state of the caller, re-created in every replica."""

    grad_enabled: bool
    inference_mode: bool
    autocast: tuple[tuple[str, torch.dtype], ...]  # ((device_type, dtype), ...) for each enabled autocast

    @staticmethod
    def capture() -> CallerState:
        autocast = tuple((dt, torch.get_autocast_dtype(dt)) for dt in ("cpu", "cuda") if torch.is_autocast_enabled(dt))
        return CallerState(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast)


_DEFAULT_STATE = CallerState(True, False, ())


def _run_with_state(state: CallerState, fn: Callable[[], Any]) -> Any:
    if state == _DEFAULT_STATE:
        return fn()
    with torch.inference_mode(state.inference_mode), torch.set_grad_enabled(state.grad_enabled):
        if not state.autocast:
            return fn()
        with contextlib.ExitStack() as stack:
            for device_type, dtype in state.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            return fn()


class _Worker:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.tasks: queue.SimpleQueue[Callable[[_Worker], None]] = queue.SimpleQueue()
        self.intra_op_threads = 0  # what this thread last asked torch for
        self.thread = threading.Thread(target=self._loop, name=f"torchpmap-worker-{device_str(device)}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            task = self.tasks.get()
            task(self)
            # Drop the finished task at once: its closure holds the call's inputs,
            # results and communicator, which an idle worker would otherwise keep
            # alive until its next task.
            del task


class _Call:
    """The bookkeeping of one pmap call (or one backward pass through it)."""

    __slots__ = ("results", "errors", "remaining", "lock", "done")

    def __init__(self, n: int) -> None:
        self.results: list[Any] = [None] * n  # each replica's return value
        self.errors: list[BaseException | None] = [None] * n
        self.remaining = n
        self.lock = threading.Lock()
        # A bare lock as a one-shot latch: the caller blocks on it, the last
        # replica releases it (cheaper than an Event's condition variable).
        self.done = threading.Lock()
        self.done.acquire()

    def finish_one(self) -> None:
        with self.lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.done.release()


class WorkerPool:
    def __init__(self) -> None:
        self._workers: dict[torch.device, _Worker] = {}
        self._lock = threading.Lock()

    def worker(self, device: torch.device) -> _Worker:
        w = self._workers.get(device)
        if w is None:
            with self._lock:
                w = self._workers.get(device)
                if w is None:
                    w = self._workers[device] = _Worker(device)
        return w

    def thread_count(self) -> int:
        return len(self._workers)

    def run(
        self,
        devices: Sequence[torch.device],
        replica_fn: Callable[[int], Any],
        comm: Communicator,
        axis_name: str,
        axis_size: int,
        first_index: int = 0,
    ) -> list[Any]:
        """Run ``replica_fn(rank)`` for every local rank on its device's worker
        with the named axis bound; return the results in rank order or raise the
        first replica's original exception."""
        if _axis.in_replica() or threading.current_thread().name.startswith("torchpmap-worker"):
            raise NotImplementedError(
                "nested pmap is not supported: a pmapped function called pmap. "
                "Map the inner function with torch.vmap, or flatten both axes into one pmap."
            )
        n = len(devices)
        state = CallerState.capture()
        call = _Call(n)
        workers = [self.worker(d) for d in devices]
        # Per rank: on a CUDA device, its worker's stream and the caller's current
        # stream there; None on a virtual CPU device.
        streams = [
            (w.stream, torch.cuda.current_stream(d)) if w.stream is not None else None for d, w in zip(devices, workers)
        ]
        # Virtual CPU devices share the CPU: split the caller's intra-op threads
        # among the replicas (a per-thread setting), rather than let every
        # replica start a full OpenMP team that spins while the others compute.
        cpu_threads = max(1, torch.get_num_threads() // n)

        def make_task(rank: int) -> Callable[[_Worker], None]:
            def task(worker: _Worker) -> None:
                frame = _axis.ReplicaFrame(axis_name, axis_size, first_index + rank, worker.device, comm)
                _axis.bind(frame)
                try:
                    cuda = streams[rank]
                    if cuda is not None:
                        worker_stream, caller_stream = cuda
                        worker_stream.wait_stream(caller_stream)
                        with torch.cuda.stream(worker_stream):
                            call.results[rank] = _run_with_state(state, lambda: replica_fn(rank))
                    else:
                        if worker.intra_op_threads != cpu_threads:
                            torch.set_num_threads(cpu_threads)
                            worker.intra_op_threads = cpu_threads
                        call.results[rank] = _run_with_state(state, lambda: replica_fn(rank))
                    comm.retire(first_index + rank)
                except BaseException as e:
                    call.errors[rank] = e
                    comm.abort(e, first_index + rank)
                finally:
                    _axis.unbind()
                    call.finish_one()

            return task

        # One lock around the whole submission: every worker sees the calls in
        # the same order, so two threads calling pmap at once cannot deadlock.
        with self._lock:
            for rank, w in enumerate(workers):
                w.tasks.put(make_task(rank))
        try:
            call.done.acquire()
        except BaseException as e:  # e.g. KeyboardInterrupt: free the replicas
            comm.abort(e, -1)
            raise

        for rank, cuda in enumerate(streams):
            if cuda is not None:
                worker_stream, caller_stream = cuda
                caller_stream.wait_stream(worker_stream)
                _record_outputs(call.results[rank], caller_stream)
        if any(e is not None for e in call.errors):
            raise _root_cause(call.errors, devices, first_index)
        return call.results


def _record_outputs(result: Any, stream: torch.cuda.Stream) -> None:
    # Outputs were allocated on the worker's stream; tell the caching allocator
    # they are now also in use on the caller's.
    from torch.utils._pytree import tree_leaves

    for leaf in tree_leaves(result):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            leaf.record_stream(stream)


def _root_cause(
    errors: Sequence[BaseException | None], devices: Sequence[torch.device], first_index: int
) -> BaseException:
    """The exception the caller should see: the first replica's own failure,
    not the cancellations it caused in the others."""
    ranked = [(r, e) for r, e in enumerate(errors) if e is not None]
    own = [(r, e) for r, e in ranked if not isinstance(e, ReplicaAbortedError)]
    rank, err = (own or ranked)[0]
    note = f"(raised in pmap replica {first_index + rank} on device {devices[rank]})"
    if note not in getattr(err, "__notes__", ()):
        if sys.version_info >= (3, 11):
            err.add_note(note)
        else:  # add_note is PEP 678 (3.11); the attribute is what it sets
            vars(err)["__notes__"] = [*getattr(err, "__notes__", []), note]
    return err


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def pool() -> WorkerPool:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = WorkerPool()
    return _pool
