"""pmap across processes, on torch.distributed (NCCL on GPUs, Gloo on CPU).

After ``initialize()``, every process runs the same pmapped program on its own
local devices; the named axis spans all of them, process by process, so
``axis_index`` is the global index and collectives reach every replica of
every process. ``ProcessGroupBackend`` computes a collective for all of this
process's replicas with one cross-process operation (hierarchical); under the
threads executor the replica that completes the in-process rendezvous calls it
for its local peers and hands them the results.

Every process must make the same pmap calls with the same collectives. Each
cross-process collective carries the call it belongs to (this process's count
of pmap runs since ``initialize``, backward passes included) and its position
in the call, and the processes compare them before any data moves: processes
that got out of step (one caught an error and went on to its next call while
the others still wait in the one it left) all raise CollectiveMismatchError,
and after that, or after a cross-process operation failed, no process makes a
cross-process collective again: the job must be restarted.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import hashlib
import itertools
import math
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict, TypeVar

import torch
import torch.distributed as dist

from . import _config, _devices
from ._communicator import REDUCERS, Collective, GroupBackend, compute_results, describe, reduction_problem
from ._devices import physical_device
from ._sharded import ShardedTensor
from .errors import CollectiveError, CollectiveMismatchError, CollectiveTimeoutError, exception_chain

T = TypeVar("T")

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor


class _State(TypedDict, total=False):
    """This process's place in the job: every key once initialize() ran, none before."""

    rank: int
    world: int
    local_count: int
    group: dist.ProcessGroup | None
    check_group: dist.ProcessGroup | None
    timeout: float
    lockstep: _Lockstep


_state: _State = {}

# This process's devices -> the backend of one pmap run across the processes.
BackendFactory: TypeAlias = "Callable[[Sequence[torch.device], str], ProcessGroupBackend]"


def initialize(
    backend: str | None = None,
    *,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout: float | None = None,
) -> None:
    """Join (or start) the torch.distributed job and lay out the global devices.

    Under ``torchrun`` no argument is needed (RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT come from the environment). Otherwise pass ``init_method``
    (e.g. ``"tcp://host:port"``), ``rank`` and ``world_size``. ``backend``
    defaults to NCCL with GPUs and Gloo without. ``timeout`` (seconds, default
    the collective timeout) bounds every cross-process wait, so a process that
    dies or fails makes the others fail instead of hanging.

    With several processes per node (LOCAL_WORLD_SIZE > 1) each process drives
    one GPU, chosen by ``choose_gpu`` (LOCAL_RANK, or the only visible one), or
    the one a process group the caller made is bound to; with one process per
    node it drives every visible GPU. The chosen GPU becomes the current device
    even when the caller made the process group. ``devices()`` then lists every
    process's devices, in process order.
    """
    if _state:
        raise RuntimeError("torchpmap.distributed.initialize() was already called in this process")
    seconds = _config.collective_timeout() if timeout is None else _positive_seconds(timeout)
    on_cuda = _devices.platform() == "cuda"
    if not dist.is_initialized():
        if rank is None:
            rank = _env_int("RANK")
        if world_size is None:
            world_size = _env_int("WORLD_SIZE")
        if init_method is None and not os.environ.get("MASTER_ADDR"):
            raise ValueError(
                "torchpmap.distributed.initialize: no init_method and no MASTER_ADDR in the "
                "environment; launch with torchrun, or pass init_method='tcp://HOST:PORT'"
            )
        _check_rank(rank, world_size)
        if backend is None:
            backend = "nccl" if on_cuda else "gloo"
        _check_backend(backend)
        gpu = _bind_gpu(None) if on_cuda else None
        dist.init_process_group(
            backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=_process_group_timeout(seconds, backend),
            # NCCL forms its communicator on this GPU now, rather than guessing one later.
            device_id=torch.device("cuda", gpu) if gpu is not None and backend == "nccl" else None,
        )
    else:
        # The user made the group: still bind this process's GPU, or NCCL (all_gather_object
        # below included) runs every process on cuda:0 ("Duplicate GPU detected").
        gpu = _bind_gpu(getattr(dist.group.WORLD, "bound_device_id", None)) if on_cuda else None
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = _local_devices_for_process(gpu)
    per_process: list[list[str] | None] = [None] * world
    dist.all_gather_object(per_process, [str(d) for d in mine])
    local, everything = global_layout([[torch.device(d) for d in p or ()] for p in per_process], rank)
    _devices._set_process_layout((rank, world, everything), local)
    # The lockstep check runs on Gloo over CPU tensors: it then has the timeout, and a dead
    # peer raises here instead of hanging in a CUDA `.tolist()` of an NCCL result.
    check_group = dist.new_group(backend="gloo", timeout=_timedelta(seconds))
    _state.update(
        {
            "rank": rank,
            "world": world,
            "local_count": len(local),
            "group": dist.group.WORLD,
            "check_group": check_group,
            "timeout": seconds,
            "lockstep": _Lockstep(),
        }
    )
    atexit.register(_shutdown_at_exit)


# An infinite timeout ("wait for ever") as a year: timedelta has no infinity.
_FOREVER = 365 * 24 * 3600.0


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=min(seconds, _FOREVER))


def _process_group_timeout(seconds: float, backend: str) -> datetime.timedelta:
    """The timeout of the process group torchpmap makes. NCCL's watchdog acts on it (with
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 or 3 it ends the process), so it gets a margin over
    torchpmap's own timed waits: their Python error comes first."""
    if backend == "nccl":
        seconds = seconds + max(10.0, 0.25 * seconds)
    return _timedelta(seconds)


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ValueError(
            f"torchpmap.distributed.initialize: {name} is not set; launch with torchrun or pass rank= and world_size="
        )
    return _env_integer(name, raw)


def _check_rank(rank: Any, world_size: Any) -> None:
    """Before the rendezvous, which would wait for processes that can never come."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"torchpmap.distributed.initialize: {name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"torchpmap.distributed.initialize: rank must be in [0, world_size) and world_size positive, got "
            f"rank={rank}, world_size={world_size}"
        )


def _check_backend(backend: Any) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"torchpmap.distributed.initialize: backend must be a string, got {backend!r}")
    # ("cpu:gloo,cuda:nccl" names one per device type; torch checks those parts)
    if ":" not in backend and backend.lower() not in dist.Backend.backend_list:
        choices = [b for b in dist.Backend.backend_list if b not in ("undefined", "fake")]
        raise ValueError(f"torchpmap.distributed.initialize: backend must be one of {choices}, got {backend!r}")


def _env_count(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    return _env_integer(name, raw)


def _env_integer(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"torchpmap.distributed.initialize: {name} must be an integer, got {raw!r}") from None


def choose_gpu(visible: int, local_rank: int, local_world_size: int) -> int:
    """The GPU (an index among the ``visible`` ones) of the process ``local_rank`` of
    the ``local_world_size`` processes on its node, one GPU per process.

    * one GPU visible: it is this process's own (a per-process CUDA_VISIBLE_DEVICES, as
      SLURM and Kubernetes set up), whatever LOCAL_RANK says;
    * at least one GPU per process visible (every process sees the node's GPUs):
      GPU ``local_rank``;
    * more than one but fewer than the processes: which one is this process's cannot be
      told (``local_rank % visible`` would put two processes on one GPU if they see the
      same ones), so it is an error.
    """
    if not 0 <= local_rank < local_world_size:
        raise ValueError(
            f"torchpmap.distributed.initialize: LOCAL_RANK is {local_rank}, but LOCAL_WORLD_SIZE is "
            f"{local_world_size}; launch with torchrun, or set both for each process"
        )
    if visible < 1:
        raise ValueError("torchpmap.distributed.initialize: this process sees no CUDA GPU")
    if visible == 1:
        return 0
    if visible >= local_world_size:
        return local_rank
    raise ValueError(
        f"torchpmap.distributed.initialize: this process sees {visible} GPUs but its node runs "
        f"{local_world_size} processes, so which GPU is its own cannot be told; make every GPU "
        f"visible to every process, or exactly one to each (CUDA_VISIBLE_DEVICES)"
    )


def _bind_gpu(bound: torch.device | None) -> int:
    """Choose this process's GPU (the one its process group is bound to, if any) and make
    it the current device; returns its index."""
    local_world = _env_count("LOCAL_WORLD_SIZE", 1)
    if bound is not None and bound.index is not None:
        gpu = bound.index
    elif local_world > 1:
        gpu = choose_gpu(torch.cuda.device_count(), _env_count("LOCAL_RANK", 0), local_world)
    else:
        gpu = 0  # one process drives every GPU of its node; it talks through the first
    torch.cuda.set_device(gpu)
    return gpu


def _local_devices_for_process(gpu: int | None) -> tuple[torch.device, ...]:
    if gpu is not None and _env_count("LOCAL_WORLD_SIZE", 1) > 1:
        # torchrun's usual layout: one process per GPU.
        return (torch.device("cuda", gpu),)
    return tuple(_devices.local_devices())


def global_layout(
    per_process: Sequence[Sequence[torch.device]], rank: int
) -> tuple[tuple[torch.device, ...], tuple[torch.device, ...]]:
    """(this process's devices, every device of the job in process order) from each
    process's own device list. Virtual CPU devices are renumbered globally (process p's
    i-th is cpu:p*n+i), so that devices() names each once; GPUs keep the names their
    process gives them (two processes' cuda:0 may be different GPUs)."""
    kinds = [(len(p), p[0].type if p else None) for p in per_process]
    if len(set(kinds)) != 1 or not per_process[rank]:
        raise RuntimeError(
            f"torchpmap.distributed: every process needs the same number and kind of local "
            f"devices, got {[[str(d) for d in p] for p in per_process]} (process by process)"
        )
    n, kind = kinds[0]
    if kind == "cpu":
        everything = tuple(torch.device("cpu", i) for i in range(len(per_process) * n))
        return everything[rank * n : (rank + 1) * n], everything
    return tuple(per_process[rank]), tuple(d for p in per_process for d in p)


def _positive_seconds(timeout: Any) -> float:
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > 0:  # NaN too
        raise ValueError(f"initialize: timeout must be a positive number of seconds, got {timeout!r}")
    return seconds


def _shutdown_at_exit() -> None:
    if _state:
        try:
            shutdown(wait_for_peers=False)
        except Exception:
            pass


def is_initialized() -> bool:
    return bool(_state)


def shutdown(*, wait_for_peers: bool = True) -> None:
    """Leave the job; every process calls it at the end of its program.

    With ``wait_for_peers`` it first waits for every process to get here, so
    that outstanding work (DTensor's functional collectives keep some in
    flight) is finished and freed while the interpreter is whole: Gloo threads
    that still hold it at interpreter teardown abort the process. A process
    that forgets is shut down at exit, without waiting (its peers may be gone).

    Without ``wait_for_peers``, or after a cross-process collective failed or
    found the processes out of step, the process group is aborted instead:
    destroying it cleanly waits for outstanding NCCL work, which a dead or
    out-of-step peer never completes.
    """
    global _state
    failed = "lockstep" in _state and _state["lockstep"].stopped
    check_group = _state.get("check_group")
    if _state:
        _state = {}
        _devices._set_process_layout(None, None)
    if not dist.is_initialized():
        return
    if failed or not wait_for_peers:
        _abort_process_groups()
        # Free the groups (and the work their Gloo threads still hold) now, while the
        # interpreter is whole: a Gloo thread that frees a tensor during interpreter
        # teardown takes the GIL, is ended there, and aborts the process.
        gc.collect()
        return
    try:
        if check_group is not None:
            # First on the Gloo group, which has the timeout: an NCCL barrier waits on the GPU
            # for a peer that never comes, until the watchdog (which may end the process).
            dist.barrier(group=check_group)
        dist.barrier()
    except RuntimeError as e:  # Gloo/NCCL: a peer that never came (its process group's timeout), or died
        _abort_process_groups()
        raise CollectiveError(
            f"shutdown: not every process reached shutdown() (another process is still in a pmap call, "
            f"failed or exited; its log shows why): {e}. This process's process groups were aborted."
        ) from e
    gc.collect()
    dist.destroy_process_group()


def _abort_process_groups() -> None:
    """Tear every process group down without waiting for peers or outstanding work (NCCL
    aborts its communicators; Gloo's pending operations end by their own timeout)."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None:  # a PyTorch without it: the clean path is all there is
        dist.destroy_process_group()
    else:
        abort()


def call_layout(n_local: int) -> tuple[int, int, BackendFactory] | None:
    """For a pmap call over ``n_local`` local replicas: (global axis size, global
    index of the first local replica, a factory of one backend per run)."""
    if not _state:
        return None
    if n_local != _state["local_count"]:
        raise ValueError(
            f"pmap: after torchpmap.distributed.initialize() (a job of {_state['world']} process(es)) each "
            f"process maps exactly its {_state['local_count']} local devices, but the mapped axis has size {n_local}"
        )
    state = _state
    first, size = state["rank"] * n_local, state["world"] * n_local
    return (
        size,
        first,
        lambda devices, function: ProcessGroupBackend(
            devices,
            first,
            size,
            state["group"],
            state["lockstep"],
            check_group=state["check_group"],
            timeout=state["timeout"],
            function=function,
        ),
    )


class _Lockstep:
    """This process's place in the sequence of pmap runs that span processes.

    Each run's communicator takes the next call number; with the position of
    an exchange in the run, it pairs a collective with the same call's on every
    peer. Once the processes were seen out of step, or a cross-process
    operation failed midway (Gloo closes its connections on a timeout; the
    peers may have moved on), this process never exchanges again: counters that
    fell back into step by chance would pair one call's data with another's.
    """

    def __init__(self) -> None:
        self._calls = itertools.count(1)
        self.last_call = 0  # the number of the run that started last
        self._stopped: tuple[str, type[CollectiveError]] | None = None
        self._notice: tuple[Any, ...] = ()  # a posted failure notice: its work and tensors, kept alive

    def next_call(self) -> int:
        self.last_call = next(self._calls)
        return self.last_call

    @property
    def stopped(self) -> bool:
        return self._stopped is not None

    def stop(self, why: str, error_type: type[CollectiveError] = CollectiveError) -> None:
        """Never exchange again; later collectives raise ``error_type`` saying ``why``."""
        if self._stopped is None:
            self._stopped = (why, error_type)

    def post_failure_notice(self, check_group: dist.ProcessGroup, wait: float) -> None:
        """This process's run failed where its peers may wait for it in an exchange:
        take that exchange's place in the check group with a notice, so that they
        raise at once rather than at the timeout. The peers meet it in the exchange
        they wait in, or in their next one (a run without collectives left). If
        within ``wait`` seconds every process turns out to have posted the same
        run's notice (the run failed alike everywhere), all stay in step; else this
        process cannot know where its peers are, and never exchanges again."""
        if self._stopped is not None:
            return  # a failed exchange or a mismatch: the peers know, or were told
        notice = torch.tensor([self.last_call, 0, FAILED, 0], dtype=torch.int64)
        rows = [torch.empty_like(notice) for _ in range(dist.get_world_size(check_group))]
        work = dist.all_gather(rows, notice, group=check_group, async_op=True)
        self._notice = (work, rows, notice)
        deadline = time.monotonic() + wait
        while not work.is_completed() and time.monotonic() < deadline:
            time.sleep(0.002)
        if work.is_completed() and all(row.tolist() == notice.tolist() for row in rows):
            self._notice = ()
            return  # every process failed in this run, and each learns it here: in step
        self.stop(f"pmap call #{self.last_call} failed on this process (its error said why)")

    def check(self, collective: str) -> None:
        if self._stopped is not None:
            why, error_type = self._stopped
            raise error_type(
                f"cross-process {collective} refused: {why}, and processes that may be out of step "
                f"never exchange data again (that could pair different calls' data). Restart the job; "
                f"every process must make the same pmap calls with the same collectives."
            )


def _reduces_alike(collective: Collective, x: torch.Tensor) -> bool:
    """Whether the process group's own all-reduce computes what compute_results
    does. Not a float max/min: Gloo's and NCCL's drop a NaN that torch.maximum
    keeps (the all-gather way then reduces with torch's ops)."""
    if collective.op != "sum" and (x.is_floating_point() or x.is_complex()):
        return False
    # Other floats (float8) would round differently in a wider type than in place.
    return x.dtype in _NATIVE or x.dtype in _WIDER or x.dtype == torch.bool or x.is_complex()


class ProcessGroupBackend(GroupBackend):
    """This process's replicas' inputs in, their outputs out, with one torch.distributed
    operation: an all-reduce for plain reductions and reduce-scatters, else an all-gather
    of every process's inputs from which compute_results builds this process's results only.

    Before any data moves, the processes compare (pmap run number, position of the
    exchange in the run, CRC of the collective's signature), so processes out of step
    or calling different collectives fail instead of pairing wrong data. One backend
    serves one pmap run (it takes the run's number from the _Lockstep), and is called
    once per collective with every local replica's input, from any one thread.
    """

    def __init__(
        self,
        devices: Sequence[torch.device],
        first: int,
        global_size: int,
        group: dist.ProcessGroup | None,
        lockstep: _Lockstep,
        *,
        check_group: dist.ProcessGroup | None = None,
        timeout: float | None = None,
        function: str = "",
    ) -> None:
        super().__init__(devices, first, global_size)
        self._group = group
        self._check_group = group if check_group is None else check_group
        self._timeout = _config.collective_timeout() if timeout is None else timeout
        self._lockstep = lockstep
        self._call = lockstep.next_call()
        self._exchanges = 0  # cross-process exchanges of this call so far
        # A backward pass or an output check is numbered like a call: its kind tells it
        # from another process's next forward.
        self._kind = getattr(_runs, "kind", FORWARD)
        self._function = function  # the pmapped function's name: part of every signature compared

    def run(
        self, collective: Collective, xs: Sequence[torch.Tensor], streams: Sequence[torch.cuda.Stream] | None = None
    ) -> list[torch.Tensor]:
        # Not stream_ordered: the inputs are ready on the host's word, and so are the results.
        name = collective.name
        self._lockstep.check(name)
        self._failing_for_good(name, self._check_same_everywhere, collective, xs[0])
        # Every process passed the check with this dtype, so all refuse here alike, still
        # in step (a process whose dtype differs got CollectiveMismatchError instead).
        try:
            _refuse_unreducible(collective, xs[0])
        except TypeError as e:
            e.torchpmap_raised_alike = True  # type: ignore[attr-defined]  # (no failure notice)
            raise
        return self._failing_for_good(name, self._exchange, collective, xs)

    def _exchange(self, collective: Collective, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if collective.kind in ("all_reduce", "reduce_scatter") and collective.groups is None:
            if _reduces_alike(collective, xs[0]):
                assert collective.op is not None  # reductions carry their op
                total = self._all_reduce(xs, collective.op)
                if collective.kind == "all_reduce":
                    return [self.to(total, r).clone() for r in range(self.size)]
                # A psum_scatter's replicas want only their own rows of the sum: one all-reduce
                # of the size of one input, not every process's inputs gathered. (Rows of one
                # fresh buffer, as compute_results gives them.)
                return [self.to(total[self.first + r], r) for r in range(self.size)]
        everyone = self._gather_everything(xs)
        mine = range(self.first, self.first + self.size)
        return compute_results(collective, everyone, self.axis_size, self._to_global, mine)

    def _failing_for_good(self, name: str, step: Callable[..., T], *args: Any) -> T:
        """``step(*args)``; a failure other than a CollectiveError ends the job's
        cross-process collectives (the peers may have gone on: never pair with them again)."""
        try:
            return step(*args)
        except CollectiveError:
            raise
        except BaseException as e:  # the peers may have gone on: never pair with them again
            self._lockstep.stop(f"a cross-process {name} failed in pmap call #{self._call}")
            if isinstance(e, RuntimeError):  # Gloo/NCCL: timeouts, peers that died or failed
                error_type = CollectiveTimeoutError if _timed_out(e) else CollectiveError
                raise error_type(
                    f"cross-process {name} failed: {e}. Another process probably failed or "
                    f"exited; its own log shows why. This process makes no cross-process "
                    f"collective any more: restart the job."
                ) from e
            raise

    def _to_global(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        local = rank - self.first
        if 0 <= local < self.size:
            return self.to(t, local)
        return t

    def _check_same_everywhere(self, collective: Collective, x: torch.Tensor) -> None:
        signature = collective.signature(x)
        self._exchanges += 1
        step = (self._call, self._exchanges, self._kind)
        crc = zlib.crc32(repr((self._function, signature)).encode())
        # On the CPU, over the check group (Gloo): bounded by its timeout whatever the data's backend.
        mine = torch.tensor([*step, crc], dtype=torch.int64)
        theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size(self._check_group))]
        self._wait(dist.all_gather(theirs, mine, group=self._check_group, async_op=True))
        rows = torch.stack(theirs).tolist()
        failed = {p: call for p, (call, _, kind, _) in enumerate(rows) if kind == FAILED}
        if failed:
            raise self._peer_failed(collective.name, failed)
        steps = [(call, exchange, kind) for call, exchange, kind, _ in rows]
        if len(set(steps)) != 1:
            raise self._out_of_step(collective.name, steps)
        values = [crc for *_, crc in rows]
        if len(set(values)) != 1:
            odd = [p for p, v in enumerate(values) if v != values[dist.get_rank(self._check_group)]]
            # The processes may be a whole call apart with counters that match (one skipped a
            # call, or an exchange another made): never pair with them again.
            self._lockstep.stop(f"the processes called different collectives in pmap call #{self._call}")
            raise CollectiveMismatchError(
                f"processes called different collectives (or shapes/dtypes, or from different pmapped "
                f"functions) at the same point: this process called {describe(signature)} in "
                f"{_KIND_NAMES[self._kind]} of {self._function or 'a function'}, processes {odd} called "
                f"something else. No process makes a cross-process collective any more (the processes "
                f"may be out of step): restart the job; every process must make the same pmap calls "
                f"with the same collectives."
            )

    def _peer_failed(self, collective: str, failed: dict[int, int]) -> CollectiveError:
        """The error for a check that met other processes' failure notices
        (``failed``: process -> the number of its run that failed)."""
        which = ", ".join(f"process {p} (its pmap call #{call})" for p, call in failed.items())
        self._lockstep.stop(f"{which} failed", CollectiveError)
        return CollectiveError(
            f"a pmap call failed on {which} while this process waited in cross-process {collective} "
            f"#{self._exchanges} of {_KIND_NAMES[self._kind]} of {self._function or 'a function'} "
            f"(pmap call #{self._call}): that process raised why, and its log shows it. No process makes a "
            f"cross-process collective any more (the processes are out of step): restart the job."
        )

    def _out_of_step(self, collective: str, steps: list[tuple[int, int, int]]) -> CollectiveMismatchError:
        where = "; ".join(
            f"process{'es' if len(ps) > 1 else ''} {', '.join(map(str, ps))}: "
            f"{_KIND_NAMES[kind]} as pmap call #{call}, "
            f"cross-process collective #{exchange} of the call"
            for (call, exchange, kind), ps in _group_by_step(steps).items()
        )
        self._lockstep.stop(f"the processes got out of step ({where})", CollectiveMismatchError)
        return CollectiveMismatchError(
            f"processes are out of step in a cross-process {collective} ({where}): a process caught "
            f"an error and went on to its next pmap call while the others still waited in the call "
            f"it left, or the calls made different numbers of collectives. No process makes a "
            f"cross-process collective any more (that could pair different calls' data): restart "
            f"the job; every process must make the same pmap calls with the same collectives."
        )

    def _comm_device(self) -> torch.device:
        return physical_device(self.devices[0])

    def _wait(self, work: dist.Work | None) -> None:
        """Wait for an ``async_op`` collective at most the collective timeout. A plain NCCL
        call returns at once and a later read of its result blocks with no timeout; a timed
        wait raises instead (a RuntimeError, which ``run`` turns into a CollectiveError)."""
        assert work is not None  # async_op=True always gives a Work
        if self._timeout >= _FOREVER:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=self._timeout))

    def _all_reduce(self, xs_local: Sequence[torch.Tensor], op: str) -> torch.Tensor:
        """The reduction of every replica's input of every process, on the communication device."""
        dev = self._comm_device()
        total = xs_local[0].to(dev, copy=True)
        for x in xs_local[1:]:
            total = REDUCERS[op](total, x.to(dev))
        # Dense rows in one order on every process: the process group reduces memory element
        # by element, and the replicas' sum keeps the input's strides (a column-major batch on
        # one process only would have summed its elements with other ones).
        wire = _to_wire(total.contiguous())
        self._wait(dist.all_reduce(wire, op=_DIST_OPS[op], group=self._group, async_op=True))
        return _from_wire(wire, total)

    def _gather_everything(self, xs_local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        dev = self._comm_device()
        stacked = _to_wire(torch.stack([x.to(dev) for x in xs_local]))
        parts = [torch.empty_like(stacked) for _ in range(dist.get_world_size(self._group))]
        self._wait(dist.all_gather(parts, stacked.contiguous(), group=self._group, async_op=True))
        template = xs_local[0]
        return [_from_wire(row, template) for part in parts for row in part]


# What a run across processes is: its exchanges say so, so that a process in a backward
# or an output check never pairs with another process's next forward call (numbered
# alike) when their collectives look alike.
# FAILED: no exchange, a process's notice that its run failed (``_Lockstep.post_failure_notice``).
FORWARD, BACKWARD, OUTPUT_CHECK, FAILED = range(4)
_KIND_NAMES = ("a forward pass", "a backward pass", "the output check (its call failed, or ended)", "a failed call")
_runs = threading.local()  # ``kind``: what the runs this thread starts are


@contextlib.contextmanager
def _runs_of_kind(kind: int) -> Iterator[None]:
    before = getattr(_runs, "kind", FORWARD)
    _runs.kind = kind
    try:
        yield
    finally:
        _runs.kind = before


def backward_runs() -> contextlib.AbstractContextManager[None]:
    """The runs started inside are a call's backward passes."""
    return _runs_of_kind(BACKWARD)


def tell_peers_a_run_failed(error: BaseException) -> None:
    """A run across processes (a call's forward or backward) failed on this process
    with ``error`` before it finished its exchanges: its peers raise at their next
    check instead of waiting for the timeout (``_Lockstep.post_failure_notice``),
    unless every process raised it at the same exchange (a reduction all refuse)."""
    if any(getattr(e, "torchpmap_raised_alike", False) for e in exception_chain(error)):
        return
    if _state and _state["check_group"] is not None:
        # Long enough for processes that fail alike to meet; short against the timeout.
        _state["lockstep"].post_failure_notice(_state["check_group"], min(1.0, _state["timeout"] / 4))


def check_outputs_across_processes(
    new_backend: Callable[[], GroupBackend], values: Sequence[tuple[str, object]], *, failed_here: bool = False
) -> None:
    """Raise ValueError on every process unless each ``(path, value)`` (the
    out_axes=None outputs of a call, equal on this process's replicas) is equal on
    every process: one small all-reduce of digests, a run of its own kind, of the
    same shape whatever the outputs. ``failed_here``: this process cannot
    return its replicas' outputs (the caller raises why, after this); the other
    processes raise at once instead of waiting, and every process stays in step."""
    paths = [path for path, _ in values]
    structure = _digest(tuple(paths))
    content = 0 if failed_here else _digest(tuple(_digest(v) for _, v in values))
    # One max gives whether any process failed, and each digest's maximum and minimum.
    mine = torch.tensor([int(failed_here), structure, -structure, content, -content], dtype=torch.int64)
    with _runs_of_kind(OUTPUT_CHECK):
        backend = new_backend()
    (extremes,) = backend.run(Collective("all_reduce", op="max"), [mine] * backend.size)[:1]
    if failed_here:
        return
    failed, top_s, bottom_s, top_c, bottom_c = extremes.tolist()
    if failed:
        raise ValueError(
            "pmap: another process's call failed (that process raises why, and its log shows it: a replica "
            "raised, replicas disagree on an out_axes=None output, outputs of different shapes or structures, "
            "an input written in place, ...); no process returns this call's outputs"
        )
    if top_s != -bottom_s:
        raise ValueError(
            f"pmap: the processes' replicas returned different output structures: out_axes=None applies to "
            f"{'outputs ' + ', '.join(paths) if paths else 'no output'} on this process, to others on another"
        )
    if top_c != -bottom_c:
        which = f"output {paths[0]}" if len(paths) == 1 else f"one of the outputs {', '.join(paths)}"
        raise ValueError(
            f"pmap: out_axes=None for {which}, but the processes' replicas returned different values "
            f"for it (each process's own replicas agree); make it equal on every replica (psum/pmean/all_gather "
            f"over the whole axis) or map it (out_axes=0)"
        )


def _digest(value: object) -> int:
    """63 bits of a hash of ``value``: equal for values the one-process check
    takes as equal (NaN in the same places, 0.0 and -0.0 alike)."""
    h = hashlib.blake2b(digest_size=8)
    if isinstance(value, torch.Tensor):
        t = value.detach().resolve_conj().resolve_neg()
        h.update(repr((tuple(t.shape), t.dtype)).encode())
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.is_floating_point() and t.element_size() == 1:
            t = t.float()  # float8 has no add: exact in float32
        if t.is_floating_point():
            t = torch.where(t.isnan(), torch.full_like(t, float("nan")), t + 0)  # + 0 turns -0.0 into 0.0
        h.update(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    else:
        if isinstance(value, float):
            value += 0.0  # -0.0 == 0.0, as the one-process check compares them
        h.update(repr((type(value).__name__, value)).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def _timed_out(error: BaseException) -> bool:
    """Whether a torch.distributed error is a timeout (Gloo: "Operation timed out!", "Timed
    out waiting ..."; NCCL: "... timed out in blocking wait", "Watchdog caught collective
    operation timeout")."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def _group_by_step(steps: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], list[int]]:
    """Process ranks by the (call, exchange, backward) they are at, in order of first appearance."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for process, step in enumerate(steps):
        groups.setdefault(step, []).append(process)
    return groups


_DIST_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


# Dtypes Gloo both moves and reduces (NCCL does too); Gloo refuses every other
# dtype, even in an all-gather, with an error that looks like a peer's failure.
_NATIVE = frozenset(
    {torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64}
)
# Integers Gloo lacks travel widened: a sum in the wider type cast back keeps the low
# bits, which is the in-place sum's wrap-around exactly (both sum modulo 2**bits);
# max and min are exact.
_WIDER = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64}


def _to_wire(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype the process group takes, losslessly (``_from_wire`` undoes it)."""
    if t.dtype in _NATIVE:
        return t
    # Gloo has no bool or complex arithmetic; ship them as uint8 / real pairs.
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_complex():
        return torch.view_as_real(t.resolve_conj()).contiguous()
    if t.dtype in _WIDER:
        return t.to(_WIDER[t.dtype])
    # Anything else (float8, uint64) only moves: its bytes, one more dim.
    return t.contiguous().unsqueeze(-1).view(torch.uint8)


def _from_wire(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dtype in _NATIVE:
        return t
    if like.dtype == torch.bool:
        return t.to(torch.bool)
    if like.is_complex():
        return torch.view_as_complex(t.contiguous())
    if like.dtype in _WIDER:
        return t.to(like.dtype)
    return t.contiguous().view(like.dtype).squeeze(-1)


def _refuse_unreducible(collective: Collective, x: torch.Tensor) -> None:
    """A TypeError, before any exchange, for a reduction torch cannot compute on ``x``'s
    dtype (uint16 to uint64 and float8 on the CPU): one process would fail after the data
    moved, and that failure would end the job's cross-process collectives."""
    if collective.op is None or (collective.groups and all(len(g) == 1 for g in collective.groups)):
        return
    problem = reduction_problem(collective.op, x.dtype, x.device)
    if problem is not None:
        raise TypeError(
            f"cross-process {collective.name} of a {x.dtype} tensor: torch cannot {collective.op} "
            f"{x.dtype} tensors on {x.device.type} ({problem}); cast to a wider dtype first"
        )


def to_dtensor(x: ShardedTensor, mesh: DeviceMesh | None = None) -> DTensor:
    """This process's shards of ``x`` as a DTensor sharded over the processes
    (``Shard(x.axis)`` on a 1-D device mesh), to hand to the rest of PyTorch's
    distributed stack."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(x, ShardedTensor):
        raise TypeError(f"to_dtensor: expected a ShardedTensor, got {type(x).__name__}")
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"to_dtensor: mesh must be a DeviceMesh (or None for one over the processes), got {mesh!r}")
    if mesh is None:
        kind = x.devices[0].type
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    local = x.unshard(physical_device(x.devices[0]))
    shape = list(local.shape)
    shape[x.axis] *= mesh.size()
    return DTensor.from_local(
        local, mesh, [Shard(x.axis)], run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
    )


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride: list[int] = []
    acc = 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))
