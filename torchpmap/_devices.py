"""Which devices pmap can use.

CUDA devices when present; otherwise a number of *virtual* CPU devices. A
virtual device is bookkeeping only (``torch.device("cpu", i)``): every shard
lives in ordinary CPU memory, and each virtual device gets its own worker
thread, so programs written for N accelerators run unchanged on a laptop.
"""

from __future__ import annotations

import numbers
import os
import threading
from collections.abc import Iterable, Sequence

import torch

from ._fork import reinit_after_fork

# Eight virtual devices by default: enough to exercise real multi-device code
# paths (rings, groups, all_to_all) on any laptop, and the count most JAX users
# know from --xla_force_host_platform_device_count=8. Idle workers cost nothing
# but a parked thread, and they are only started for devices a pmap uses.
DEFAULT_CPU_DEVICES = 8
_ENV_VAR = "TORCHPMAP_CPU_DEVICES"
# Which kind of device to use, like JAX_PLATFORMS: "cpu" runs on virtual CPU
# devices even where GPUs exist (e.g. the virtual-device tests on a GPU machine).
_PLATFORM_VAR = "TORCHPMAP_PLATFORM"
PLATFORMS = ("cpu", "cuda")

_lock = reinit_after_fork(threading.Lock())
_cpu_count_override: int | None = None
_frozen_local: tuple[torch.device, ...] | None = None
# Set by torchpmap.distributed.initialize: (process_index, process_count,
# global device list). None means a single-process job.
_process_layout: tuple[int, int, tuple[torch.device, ...]] | None = None


def set_cpu_device_count(n: int) -> None:
    """Set how many virtual CPU devices to expose when no GPU is present.

    Must be called before the first use of the devices (the first pmap call or
    ``devices()``), exactly like the environment variable TORCHPMAP_CPU_DEVICES.
    """
    global _cpu_count_override
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_cpu_device_count: n must be a positive int, got {n!r}")
    with _lock:
        if _frozen_local is not None and _frozen_local[0].type == "cpu" and len(_frozen_local) != n:
            raise RuntimeError(
                f"set_cpu_device_count({n}) called after the devices were already "
                f"initialised with {len(_frozen_local)} virtual CPU devices; call it "
                f"before the first pmap, or set {_ENV_VAR}={n} in the environment."
            )
        _cpu_count_override = n


def _cpu_device_count() -> int:
    if _cpu_count_override is not None:
        return _cpu_count_override
    raw = os.environ.get(_ENV_VAR)
    if raw is None or raw == "":
        return DEFAULT_CPU_DEVICES
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{_ENV_VAR} must be a positive integer, got {raw!r}")
    return n


def platform() -> str:
    """``"cuda"`` or ``"cpu"``: TORCHPMAP_PLATFORM, else CUDA when PyTorch sees a GPU."""
    raw = os.environ.get(_PLATFORM_VAR, "").strip().lower()
    if not raw:
        return "cuda" if _cuda_count() > 0 else "cpu"
    if raw not in PLATFORMS:
        raise ValueError(f"{_PLATFORM_VAR} must be one of {', '.join(PLATFORMS)} (or unset), got {raw!r}")
    if raw == "cuda" and _cuda_count() == 0:
        raise ValueError(f"{_PLATFORM_VAR}=cuda, but PyTorch sees no CUDA GPU; unset it or set it to cpu")
    return raw


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_devices() -> list[torch.device]:
    """This process's devices: every CUDA GPU, or the virtual CPU devices
    (TORCHPMAP_PLATFORM chooses; see ``platform``)."""
    return list(local_device_tuple())


def local_device_tuple() -> tuple[torch.device, ...]:
    """local_devices() without the copy: the same tuple until the device list
    changes (torchpmap.distributed.initialize), so callers may cache on it."""
    global _frozen_local
    if _frozen_local is None:
        with _lock:
            if _frozen_local is None:
                if platform() == "cuda":
                    devs = tuple(torch.device("cuda", i) for i in range(_cuda_count()))
                else:
                    devs = tuple(torch.device("cpu", i) for i in range(_cpu_device_count()))
                _frozen_local = devs
    return _frozen_local


def local_device_count() -> int:
    return len(local_devices())


def devices() -> list[torch.device]:
    """Every device of the job, process by process (this process's alone when
    torch.distributed was not initialised through torchpmap.distributed)."""
    if _process_layout is not None:
        return list(_process_layout[2])
    return local_devices()


def device_count() -> int:
    return len(devices())


def process_index() -> int:
    return 0 if _process_layout is None else _process_layout[0]


def process_count() -> int:
    return 1 if _process_layout is None else _process_layout[1]


def _set_process_layout(
    layout: tuple[int, int, tuple[torch.device, ...]] | None,
    local: tuple[torch.device, ...] | None,
) -> None:
    """Called by torchpmap.distributed: (process index, process count, every
    device of the job) and this process's devices; None, None to go back to a
    single-process job."""
    global _process_layout, _frozen_local
    with _lock:
        _process_layout = layout
        _frozen_local = local


def _reset_for_tests() -> None:
    """Forget the device list so a test can choose another count."""
    global _frozen_local, _cpu_count_override
    with _lock:
        _frozen_local = None
        _cpu_count_override = None


def device_str(d: torch.device) -> str:
    """``cpu:3``, ``cuda:0``: how torchpmap names a device in messages and thread names."""
    return f"{d.type}:{d.index}" if d.index is not None else d.type


def physical_device(d: torch.device) -> torch.device:
    """Where a device's tensors really live: every virtual CPU device is the CPU."""
    return torch.device("cpu") if d.type == "cpu" else d


def default_devices(n: int | None, fn: str, need: str = "", batch: str | None = None) -> tuple[torch.device, ...]:
    """The devices a call uses when the caller names none: the first ``n``
    local devices (all of them without ``n``). ``fn`` and ``need`` (what
    asked for ``n`` devices) spell the error when there are fewer; ``batch``
    names the argument that may be a whole batch not yet split per device."""
    local = local_devices()
    if n is None:
        return tuple(local)
    if n > len(local):
        hint = ""
        if batch is not None and n % len(local) == 0:
            hint += (
                f" If {batch} is a whole batch, split it into one slice per device first: "
                f"torchpmap.shard_batch gives it shape ({len(local)}, {n // len(local)}, ...)."
            )
        if local[0].type == "cpu":
            hint += (
                f" Set {_ENV_VAR}={n} (or call torchpmap.set_cpu_device_count({n}) before the first "
                f"pmap) for more virtual CPU devices."
            )
        hint += (
            f" To run {n} replicas on fewer devices, name them, each device as often as the replicas it "
            f"runs: devices=torchpmap.replica_devices({n})."
        )
        need = need or f"{n} devices are needed"
        raise ValueError(f"{fn}: {need}, but only {len(local)} local devices are available.{hint}")
    return tuple(local[:n])


def replica_devices(n: int) -> tuple[torch.device, ...]:
    """``n`` devices for ``n`` replicas on this process's devices, each device
    listed as often as the replicas it runs (more replicas than devices: they
    share them). In contiguous blocks, the first ``n % count`` one longer:
    ``replica_devices(8)`` on two devices is ``[cpu:0] * 4 + [cpu:1] * 4``, so
    that neighbouring replicas share a device, as a process holds a contiguous
    block of the axis. With ``n`` at most the device count, the first ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"replica_devices: n must be a positive int, got {n!r}")
    local = local_device_tuple()
    per, extra = divmod(n, len(local))
    return tuple(d for i, d in enumerate(local) for _ in range(per + (i < extra)))


def as_devices(devices: Sequence[torch.device | str | int], fn: str) -> tuple[torch.device, ...]:
    """Devices the caller named, as ``torch.device``s: at least one, each of a
    kind torchpmap runs on (``cpu`` is ``cpu:0``). A device may be listed more
    than once: its replicas share it (more replicas than devices). Whether each
    is one of this process's devices is ``check_local``'s job: until the first
    use, set_cpu_device_count and distributed.initialize may still change the list."""
    if isinstance(devices, (str, int, torch.device)) or not isinstance(devices, Iterable):
        raise TypeError(
            f"{fn}: devices must be a list of devices, got {type(devices).__name__} {devices!r}; "
            f"for one device pass [{devices!r}]"
        )
    out = tuple(_as_device(d, f"{fn}: devices[{i}]") for i, d in enumerate(devices))
    if not out:
        raise ValueError(f"{fn}: devices must not be empty")
    return out


def check_not_repeated_across_processes(devices: Sequence[torch.device], fn: str) -> None:
    """Replicas share devices in a single-process job only: across processes
    every process maps exactly its own devices, each once, so that the axis
    is laid out process by process (distributed.call_layout)."""
    if _process_layout is not None and len(set(devices)) != len(devices):
        raise ValueError(
            f"{fn}: devices lists a device more than once ({[device_str(d) for d in devices]}), so that "
            f"replicas would share it; a multi-process job (torchpmap.distributed.initialize) does not "
            f"support that: pass each of this process's devices once (or devices=None)"
        )


def _as_device(d: torch.device | str | int, where: str) -> torch.device:
    if isinstance(d, numbers.Integral) and not isinstance(d, bool):
        d = int(d)  # (np.int64 from np.arange: torch reads those as an accelerator's index too)
    if isinstance(d, bool) or not isinstance(d, (torch.device, str, int)):
        raise ValueError(
            f"{where} is {d!r}, which is not a device (a torch.device, a name such as 'cpu:0' or 'cuda:1', "
            f"or a GPU's index)"
        )
    try:
        dev = torch.device(d)
    except (RuntimeError, TypeError) as e:
        if isinstance(d, int):  # torch reads an int as an accelerator's index
            raise ValueError(f"{where} is {d}, a GPU's index, but PyTorch sees no GPU here; {_USE_LOCAL}") from None
        raise ValueError(f"{where} is {d!r}, which is not a device: {e}") from None
    if dev.type == "cpu":
        return dev if dev.index is not None else torch.device("cpu", 0)
    if dev.type == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not gpus:
            raise ValueError(f"{where} is {device_str(dev)}, but PyTorch sees no CUDA GPU here; {_USE_LOCAL}")
        if dev.index is None:
            raise ValueError(f"{where} is cuda without an index; name the GPU (cuda:0 ... cuda:{gpus - 1})")
        if dev.index >= gpus:
            raise ValueError(f"{where} is {device_str(dev)}, but this machine has {gpus} GPU(s); {_USE_LOCAL}")
        return dev
    raise ValueError(f"{where} is {device_str(dev)}; torchpmap runs on CUDA GPUs and virtual CPU devices; {_USE_LOCAL}")


_USE_LOCAL = "use this process's devices (torchpmap.local_devices())"


def check_local(devices: Sequence[torch.device], fn: str) -> None:
    """Every device is one of this process's devices. Beside GPUs, the virtual
    CPU devices (cpu:0 ... TORCHPMAP_CPU_DEVICES - 1) are allowed too: they run
    on the host, e.g. to test cross-device calls on one GPU."""
    local = local_device_tuple()
    host = _cpu_device_count() if local[0].type == "cuda" else 0
    for i, d in enumerate(devices):
        if d not in local and not (d.type == "cpu" and d.index is not None and d.index < host):
            beside = f"; beside them, cpu:0 ... cpu:{host - 1}" if host else ""
            raise ValueError(
                f"{fn}: devices[{i}] is {device_str(d)}, which is not one of this process's devices "
                f"({_describe_devices(local)}{beside}); {_USE_LOCAL}"
            )


def as_device(device: torch.device | str | int, where: str) -> torch.device:
    """One device the caller named (``where`` names the argument), as ``as_devices`` reads each."""
    return _as_device(device, where)


def usable_devices(devices: Sequence[torch.device | str | int], fn: str) -> tuple[torch.device, ...]:
    """as_devices and check_local at once, for a function that places data now."""
    out = as_devices(devices, fn)
    check_local(out, fn)
    return out


def _describe_devices(devs: Sequence[torch.device]) -> str:
    names = [device_str(d) for d in devs]
    return ", ".join(names) if len(names) <= 8 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
