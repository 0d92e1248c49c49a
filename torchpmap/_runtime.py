"""The executor: one persistent worker thread per device.

Workers are created the first time a device is used and live for the whole
process; a pmap call hands each worker one task and waits for all of them.
A call whose devices list one device k times (more replicas than devices)
uses k workers of that device, its slots 0 ... k-1: replicas meet in
collectives, so each needs a thread of its own.
On CUDA each worker owns a stream: it waits for the caller's stream before it
starts and the caller's stream waits for it afterwards, so inputs and outputs
are ordered exactly as if the caller had run the work itself.

The caller never waits for ever (see ``_Call.wait``): every wait is bounded by
the collective timeout, and a replica that does not return is abandoned (its
thread keeps running it, since Python cannot stop a thread; a later task on
that worker starts when it returns).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _axis, _config, _forward_ad
from ._communicator import Communicator
from ._devices import device_str
from ._fork import reinit_after_fork
from ._random import CallRandomness, Interception
from .errors import CollectiveTimeoutError, ReplicaAbortedError, exception_chain

# After the first replica fails, how long the caller still waits for the others
# to stop (those blocked in a collective are released at once; one computing
# elsewhere may take longer) before it raises and abandons them. At most a
# quarter of the collective timeout.
FAILURE_GRACE_SECONDS = 0.5


@dataclass(frozen=True)
class CallerState:
    """Thread-local PyTorch state of the caller, re-created in every replica."""

    grad_enabled: bool
    inference_mode: bool
    autocast: tuple[tuple[str, torch.dtype], ...]  # ((device_type, dtype), ...) for each enabled autocast
    # The caller's open TorchFunctionModes and TorchDispatchModes (``with torch.device(d):``,
    # FlopCounterMode, modes of the user's own), bottom first: each replica runs under them,
    # as the function would in a loop over the replicas, and as the captured executors
    # trace it (Dynamo keeps function modes; a dispatch mode sends a call to the threads).
    function_modes: tuple[Any, ...] = ()
    dispatch_modes: tuple[Any, ...] = ()

    @staticmethod
    def capture() -> CallerState:
        autocast = tuple((dt, torch.get_autocast_dtype(dt)) for dt in _AUTOCAST_TYPES if torch.is_autocast_enabled(dt))
        function_modes: tuple[Any, ...] = ()
        dispatch_modes: tuple[Any, ...] = ()
        if torch._C._len_torch_function_stack():
            function_modes = tuple(torch.overrides._get_current_function_mode_stack())
        if torch._C._len_torch_dispatch_stack():
            dispatch_modes = tuple(torch.utils._python_dispatch._get_current_dispatch_mode_stack())
        return CallerState(
            torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, function_modes, dispatch_modes
        )


_AUTOCAST_TYPES = ("cpu", "cuda")
_DEFAULT_STATE = CallerState(True, False, ())


def _run_with_state(state: CallerState | None, fn: Callable[[], Any]) -> Any:
    """fn() under the caller's ``state`` (None: the defaults, which a worker
    thread has unless a replica left inference mode entered)."""
    if state is None and not torch.is_inference_mode_enabled():
        return fn()
    state = state or _DEFAULT_STATE
    with torch.inference_mode(state.inference_mode), torch.set_grad_enabled(state.grad_enabled):
        if not (state.autocast or state.function_modes or state.dispatch_modes):
            return fn()
        with contextlib.ExitStack() as stack:
            for device_type, dtype in state.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            for mode in state.function_modes:
                stack.enter_context(_function_mode_pushed(mode))
            for mode in state.dispatch_modes:
                stack.enter_context(_dispatch_mode_pushed(mode))
            return fn()


# Pushed as they are, not entered: a mode's __enter__ may reset what it holds
# (FlopCounterMode's counts), and the caller's thread has it entered already.
@contextlib.contextmanager
def _function_mode_pushed(mode: Any) -> Any:
    torch._C._push_on_torch_function_stack(mode)
    try:
        yield
    finally:
        torch._C._pop_torch_function_stack()


@contextlib.contextmanager
def _dispatch_mode_pushed(mode: Any) -> Any:
    torch._C._push_on_torch_dispatch_stack(mode)
    try:
        yield
    finally:
        torch._C._pop_torch_dispatch_stack(getattr(mode, "_mode_key", None))


def _reset_thread_state() -> None:
    """Undo what a replica left switched on in its worker thread (e.g. a bare
    ``torch.set_grad_enabled(False)``), so the next task starts from the
    defaults and only its caller's state applies."""
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
    for device_type in _AUTOCAST_TYPES:
        if torch.is_autocast_enabled(device_type):
            torch.set_autocast_enabled(device_type, False)


_forward_ad.install()  # replicas on these workers enter forward-AD levels one at a time


class _Worker:
    def __init__(self, device: torch.device, slot: int = 0) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.tasks: queue.SimpleQueue[Callable[[_Worker], None]] = queue.SimpleQueue()
        self.running: tuple[_Call, int] | None = None  # the call and local rank of the task it runs
        name = f"torchpmap-worker-{device_str(device)}" + (f"#{slot}" if slot else "")
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        _forward_ad.mark_worker_thread()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            task = self.tasks.get()
            task(self)
            # Drop the finished task at once: its closure holds the call's inputs,
            # results and communicator, which an idle worker would otherwise keep
            # alive until its next task.
            del task

    def describe_running(self) -> str:
        running = self.running
        if running is None:
            return "another task"
        call, rank = running
        started = call.started_at[rank]
        age = "" if started is None else f", running for {time.monotonic() - started:.1f} s"
        return f"replica {call.first_index + rank} of {call.label}{age}"


class _Call:
    """The bookkeeping of one pmap call (or one backward pass through it)."""

    __slots__ = (
        "label",
        "devices",
        "first_index",
        "results",
        "errors",
        "remaining",
        "lock",
        "done",
        "signalled",
        "started_at",
        "finished",
        "last_finish",
        "first_failure",
        "changed",
        "abandoned",
    )

    def __init__(self, label: str, devices: Sequence[torch.device], first_index: int) -> None:
        n = len(devices)
        self.label = label  # "pmap of f": for error messages
        self.devices = devices
        self.first_index = first_index
        self.results: list[Any] = [None] * n  # each replica's return value
        self.errors: list[BaseException | None] = [None] * n
        self.remaining = n
        self.lock = threading.Lock()
        # A bare lock as a one-shot latch: the caller blocks on it; the last
        # replica to finish, or the first to fail, releases it (cheaper than an
        # Event's condition variable).
        self.done = threading.Lock()
        self.done.acquire()
        self.signalled = False
        self.started_at: list[float | None] = [None] * n  # time.monotonic() when each replica started
        self.finished = [False] * n
        self.last_finish = 0.0
        self.first_failure: float | None = None
        self.changed: threading.Event | None = None  # set on every finish once the caller waits slowly
        self.abandoned = False  # the caller has raised; tasks not started yet skip

    def start_one(self, rank: int) -> bool:
        """Replica ``rank`` starts; False if the caller has given up on the call.
        Under the lock, so that a replica the caller reports as not started
        never runs."""
        with self.lock:
            if self.abandoned:
                return False
            self.started_at[rank] = time.monotonic()
            return True

    def finish_one(self, rank: int, failed: bool) -> None:
        with self.lock:
            self.remaining -= 1
            self.finished[rank] = True
            self.last_finish = time.monotonic()
            if failed and self.first_failure is None:
                self.first_failure = self.last_finish
            release = not self.signalled and (self.remaining == 0 or failed)
            if release:
                self.signalled = True
            changed = self.changed
        if release:
            self.done.release()
        if changed is not None:
            changed.set()

    def wait(self, workers: Sequence[_Worker], comm: Communicator, submitted: float) -> list[int]:
        """Block until every replica has finished, or give up on the call.

        * Every replica finished: return [] (the fast path: one lock acquire).
        * A replica failed: wait a short grace for the others to stop, then
          return the local ranks still running (abandoned).
        * A replica has not started a timeout after submission (its device is
          busy with something that does not return), or still runs a timeout
          after the others have returned: raise CollectiveTimeoutError.
        A replica computing for a long time while no other has returned is not
        waiting for anybody, so that alone never times out.
        """
        timeout = _config.collective_timeout()
        if self.done.acquire(timeout=_config.wait_seconds(timeout)) and self.remaining == 0:
            return []
        changed = threading.Event()
        with self.lock:
            self.changed = changed
        grace = min(timeout / 4, FAILURE_GRACE_SECONDS)
        while True:
            changed.clear()
            now = time.monotonic()
            with self.lock:
                if self.remaining == 0:
                    return []
                pending = [r for r, f in enumerate(self.finished) if not f]
                any_finished = len(pending) < len(self.finished)
                last_finish, first_failure = self.last_finish, self.first_failure
            if first_failure is not None:
                deadline = first_failure + grace
                if now >= deadline:
                    self._abandon(comm, ReplicaAbortedError(f"{self.label} failed in another replica"))
                    return pending
            else:
                deadline = float("inf")
                for r in pending:
                    started = self.started_at[r]
                    if started is None:  # queued behind another task on its worker
                        limit = submitted + timeout
                        error = self._could_not_start(r, workers[r], timeout)
                    elif any_finished:
                        limit = max(started, last_finish) + timeout
                        error = self._still_running(r, timeout)
                    else:
                        continue
                    if now >= limit:
                        self._abandon(comm, error)
                        raise _note_abandoned(error, self, [p for p in pending if p != r])
                    deadline = min(deadline, limit)
            seconds = _config.wait_seconds(max(0.0, deadline - now))  # -1: past what a wait can take
            changed.wait(None if seconds < 0 else seconds)

    def _abandon(self, comm: Communicator, error: BaseException) -> None:
        """The caller gives up: tasks not started yet skip, and any collective
        an abandoned replica reaches fails at once instead of waiting."""
        with self.lock:
            self.abandoned = True
        comm.abort(error, -1)

    def _could_not_start(self, rank: int, worker: _Worker, timeout: float) -> CollectiveTimeoutError:
        device = device_str(self.devices[rank])
        return CollectiveTimeoutError(
            f"{self.label} could not start replica {self.first_index + rank} within {timeout:g} s: device "
            f"{device} is busy with {worker.describe_running()}, which has not returned. If pmap was called from a "
            f"thread that a replica started (e.g. a ThreadPoolExecutor inside the pmapped function), that is "
            f"nested pmap, which is not supported: the replica's device stays busy waiting for it. {_TIMEOUT_HINT}"
        )

    def _still_running(self, rank: int, timeout: float) -> CollectiveTimeoutError:
        device = device_str(self.devices[rank])
        return CollectiveTimeoutError(
            f"{self.label}: replica {self.first_index + rank} on device {device} is still running {timeout:g} s "
            f"after the other replicas returned, so the call stops waiting for it. Its thread keeps running it "
            f"until its function returns; later calls that need {device} wait for that. {_TIMEOUT_HINT}"
        )


_TIMEOUT_HINT = "(Set TORCHPMAP_COLLECTIVE_TIMEOUT or torchpmap.set_collective_timeout to change the limit.)"


def _note_abandoned(err: BaseException, call: _Call, pending: Sequence[int]) -> BaseException:
    for r in pending:
        state = "had not started" if call.started_at[r] is None else "was still running"
        _add_note(
            err,
            f"(replica {call.first_index + r} on device {device_str(call.devices[r])} {state} when the call "
            f"raised: it was abandoned, stops at its next collective or when its function returns, and its "
            f"result is dropped)",
        )
    return err


def _add_note(err: BaseException, note: str) -> None:
    if note in getattr(err, "__notes__", ()):
        return
    if sys.version_info >= (3, 11):
        err.add_note(note)
    else:  # add_note is PEP 678 (3.11); the attribute is what it sets
        vars(err)["__notes__"] = [*getattr(err, "__notes__", []), note]


class WorkerPool:
    def __init__(self) -> None:
        # By (device, slot): slot k runs the (k+1)-th replica of a call on that device.
        self._workers: dict[tuple[torch.device, int], _Worker] = {}
        self._lock = threading.Lock()

    def worker(self, device: torch.device, slot: int = 0) -> _Worker:
        key = (device, slot)
        w = self._workers.get(key)
        if w is None:
            with self._lock:
                w = self._workers.get(key)
                if w is None:
                    w = self._workers[key] = _Worker(device, slot)
        return w

    def thread_count(self) -> int:
        return len(self._workers)

    def busy(self) -> bool:
        """Whether some worker is running a replica now."""
        for w in list(self._workers.values()):  # (a loop: asked on every stacked call)
            if w.running is not None:
                return True
        return False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no worker runs or has queued a task (e.g. until abandoned
        replicas have returned); False if that takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        idle_checks = 0
        while idle_checks < 2:  # twice in a row: a task may be between get() and its start
            workers = list(self._workers.values())
            idle = all(w.running is None and w.tasks.empty() for w in workers)
            idle_checks = idle_checks + 1 if idle else 0
            if not idle and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def run(
        self,
        devices: Sequence[torch.device],
        replica_fn: Callable[[int], Any],
        comm: Communicator,
        axis_name: str,
        axis_size: int,
        first_index: int = 0,
        label: str = "pmap",
        interception: Interception | None = None,
        caller_streams: Sequence[torch.cuda.Stream | None] | None = None,
    ) -> list[Any]:
        """Run ``replica_fn(rank)`` for every local rank on its device's worker
        with the named axis bound; return the results in rank order or raise the
        first replica's original exception. ``label`` names the call in errors;
        ``interception`` is the function's record of whether its replicas draw
        random numbers (None: give them their own streams regardless).
        ``caller_streams``: per rank, the CUDA stream the caller's work for this
        run was recorded on, when it is not this thread's current stream (a
        backward pass on the autograd engine's thread runs the forward caller's
        streams' work); the replicas are ordered after both."""
        if _axis.in_replica() or threading.current_thread().name.startswith("torchpmap-worker"):
            raise NotImplementedError(
                "nested pmap is not supported: a pmapped function called pmap. "
                "Map the inner function with torch.vmap, or flatten both axes into one pmap."
            )
        n = len(devices)
        captured = CallerState.capture()
        state = None if captured == _DEFAULT_STATE else captured  # compared once, not per replica
        call = _Call(label, devices, first_index)
        randomness = CallRandomness(devices, interception)
        workers = [self.worker(d, slot) for d, slot in zip(devices, device_slots(tuple(devices)))]
        # Per rank: on a CUDA device, its worker's stream and the caller's streams
        # there; None on a virtual CPU device.
        streams = [
            None if w.stream is None else (w.stream, _callers(d, caller_streams[r] if caller_streams else None))
            for r, (d, w) in enumerate(zip(devices, workers))
        ]
        # Virtual CPU devices share the CPU: split the caller's intra-op threads
        # among the replicas (a per-thread setting), rather than let every
        # replica start a full OpenMP team that spins while the others compute.
        cpu_threads = max(1, torch.get_num_threads() // n)

        def make_task(rank: int) -> Callable[[_Worker], None]:
            def task(worker: _Worker) -> None:
                if not call.start_one(rank):
                    return  # the caller gave up on this call before it started
                worker.running = (call, rank)
                frame = _axis.ReplicaFrame(axis_name, axis_size, first_index + rank, worker.device, comm)
                _axis.bind(frame)
                failed = False
                try:
                    with randomness.replica(first_index + rank):
                        self._run_replica(rank, replica_fn, state, streams[rank], cpu_threads, call)
                    comm.retire(first_index + rank)
                except BaseException as e:
                    failed = True
                    call.errors[rank] = e
                    comm.abort(e, first_index + rank)
                finally:
                    if worker.stream is not None and call.abandoned:
                        # Nobody will order the caller's stream after this one: finish
                        # its kernels before the task drops its tensors' memory.
                        worker.stream.synchronize()
                    _axis.unbind()
                    _reset_thread_state()
                    worker.running = None
                    call.finish_one(rank, failed)

            return task

        # One lock around the whole submission: every worker sees the calls in
        # the same order, so two threads calling pmap at once cannot deadlock.
        with self._lock:
            for rank, w in enumerate(workers):
                w.tasks.put(make_task(rank))
        submitted = time.monotonic()
        try:
            abandoned = call.wait(workers, comm, submitted)
        except BaseException as e:  # a timeout, or e.g. KeyboardInterrupt: free the replicas
            if not call.abandoned:
                call._abandon(comm, e)
            # The caller's streams go on after whatever the replicas queued so far
            # (an abandoned replica synchronises its own stream when it stops).
            for rank, cuda in enumerate(streams):
                if cuda is not None and call.started_at[rank] is not None:
                    for caller_stream in cuda[1]:
                        caller_stream.wait_stream(cuda[0])
            raise

        for rank, cuda in enumerate(streams):
            if cuda is not None and call.finished[rank]:
                worker_stream, callers = cuda
                for caller_stream in callers:
                    caller_stream.wait_stream(worker_stream)
                    _record_outputs(call.results[rank], caller_stream)
        randomness.finish(label, failed=any(e is not None for e in call.errors))
        if any(e is not None for e in call.errors):
            raise _note_abandoned(_root_cause(call.errors, devices, first_index), call, abandoned)
        return call.results

    @staticmethod
    def _run_replica(
        rank: int,
        replica_fn: Callable[[int], Any],
        state: CallerState | None,
        cuda: tuple[torch.cuda.Stream, tuple[torch.cuda.Stream, ...]] | None,
        cpu_threads: int,
        call: _Call,
    ) -> None:
        if cuda is not None:
            worker_stream, callers = cuda
            for caller_stream in callers:
                worker_stream.wait_stream(caller_stream)
            # Backward passes inside the replica (its own .backward(), or the vjp of a
            # call's backward) run on this thread, not on the autograd engine's CUDA
            # device threads: the caller's backward may be blocking the device thread
            # while it waits for the replicas, and a collective's backward needs this
            # thread's axis frame and its compile gate.
            with torch.cuda.stream(worker_stream), torch.autograd.set_multithreading_enabled(False):
                call.results[rank] = _run_with_state(state, lambda: replica_fn(rank))
        else:
            if torch.get_num_threads() != cpu_threads:  # also undoes a replica's own change
                torch.set_num_threads(cpu_threads)
            if torch.cuda.is_initialized():
                # The same for a replica on a CPU device whose graph holds a CUDA node
                # (``.cuda()`` inside it): the engine would queue that node's backward
                # on the device thread the caller's backward is blocking.
                with torch.autograd.set_multithreading_enabled(False):
                    call.results[rank] = _run_with_state(state, lambda: replica_fn(rank))
            else:
                call.results[rank] = _run_with_state(state, lambda: replica_fn(rank))


@functools.lru_cache(maxsize=256)
def device_slots(devices: tuple[torch.device, ...]) -> tuple[int, ...]:
    """Per replica, how many earlier replicas run on its device: which of
    that device's workers runs it (all 0 when no device repeats)."""
    seen: dict[torch.device, int] = {}
    slots = []
    for d in devices:
        slots.append(seen.get(d, 0))
        seen[d] = slots[-1] + 1
    return tuple(slots)


def _callers(device: torch.device, recorded: torch.cuda.Stream | None) -> tuple[torch.cuda.Stream, ...]:
    """The caller's streams on ``device`` that the replica is ordered with:
    this thread's current one, and the one recorded for the run if different."""
    current = torch.cuda.current_stream(device)
    return (current,) if recorded is None or recorded == current else (current, recorded)


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
    own = [(r, e) for r, e in ranked if not _follows_an_abort(e)]
    rank, err = (own or ranked)[0]
    add_replica_note(err, first_index + rank, devices[rank])
    return err


def add_replica_note(err: BaseException, index: int, device: torch.device) -> None:
    """Note on ``err`` which replica (its axis index) raised it, and where."""
    _add_note(err, f"(raised in pmap replica {index} on device {device})")


def _follows_an_abort(e: BaseException) -> bool:
    """Whether ``e`` is a cancellation another replica's failure caused, or was
    raised while handling one (a replica that wraps the ReplicaAbortedError)."""
    return any(isinstance(cur, ReplicaAbortedError) for cur in exception_chain(e))


def _worker_on_thread(ident: int) -> _Worker | None:
    pool_ = _pool
    if pool_ is None:
        return None
    return next((w for w in list(pool_._workers.values()) if w.thread.ident == ident), None)


def describe_thread(ident: int) -> str:
    """What thread ``ident`` runs, for an error message."""
    worker = _worker_on_thread(ident)
    if worker is None:
        return next((f"thread {t.name}" for t in threading.enumerate() if t.ident == ident), f"thread {ident}")
    running = worker.running
    abandoned = " (abandoned by its caller)" if running is not None and running[0].abandoned else ""
    return f"{worker.describe_running()}{abandoned} on device {device_str(worker.device)}"


def raise_if_abandoned(ident: int) -> None:
    """Stop a replica that is waiting (for the compile gate) although its call was given up."""
    worker = _worker_on_thread(ident)
    running = None if worker is None else worker.running
    if running is not None and running[0].abandoned:
        raise ReplicaAbortedError(f"{running[0].label} was abandoned by its caller")


_pool: WorkerPool | None = None
_pool_lock = reinit_after_fork(threading.Lock())


def pool() -> WorkerPool:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = WorkerPool()
    return _pool


def _forget_workers() -> None:
    """In a forked child: the parent's worker threads are not there (``_fork``)."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_workers)
