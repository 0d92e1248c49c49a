"""Process-wide settings."""

from __future__ import annotations

import os
import threading

_ENV_TIMEOUT = "TORCHPMAP_COLLECTIVE_TIMEOUT"
_DEFAULT_TIMEOUT = 300.0
_timeout: float | None = None


def set_collective_timeout(seconds: float) -> None:
    """How long a collective waits for the other replicas before it fails
    (default 300 s, or the TORCHPMAP_COLLECTIVE_TIMEOUT environment variable).
    ``float("inf")`` means no timeout.
    """
    global _timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"set_collective_timeout: seconds must be a positive number, got {seconds!r}")
    _timeout = float(seconds)


def wait_seconds(seconds: float) -> float:
    """``seconds`` as a ``Lock.acquire`` timeout: -1 (wait for ever) for an
    infinite timeout or one past what the platform can wait."""
    return -1.0 if seconds >= threading.TIMEOUT_MAX else seconds


def collective_timeout() -> float:
    if _timeout is not None:
        return _timeout
    raw = os.environ.get(_ENV_TIMEOUT)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"{_ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
        return value
    return _DEFAULT_TIMEOUT


_ENV_EXECUTOR = "TORCHPMAP_EXECUTOR"
EXECUTORS = ("threads", "stacked", "lockstep", "auto")
_executor: str | None = None


def set_executor(name: str) -> None:
    """Which executor runs pmap calls:

    * ``"auto"`` (the default): the stacked executor where it applies (replicas
      that share one virtual CPU device group in one process), from a
      function's second call on: its first call runs on the threads, so a
      function called once never pays for a capture (a ``compile=`` function is
      captured at once). A function it cannot capture runs on the threads with
      a RuntimeWarning once per function and reason; calls outside its scope
      (several physical devices or processes, GPUs, module or PerReplica
      arguments it cannot stack, autocast...) run on the threads silently.
    * ``"threads"``: one worker thread per replica, each running the function's
      Python (pdb inside a replica, per-replica side effects): the debugging
      mode, and what the others fall back to.
    * ``"stacked"``: the stacked executor for every call, from the first;
      a fallback to the threads warns once per function and reason.
    * ``"lockstep"`` (experimental): one host thread runs the captured
      function's pieces between collectives for every replica in turn, then
      each collective on all of them; falls back like stacked.

    The TORCHPMAP_EXECUTOR environment variable sets it too."""
    global _executor
    if name not in EXECUTORS:
        raise ValueError(f"set_executor: name must be one of {EXECUTORS}, got {name!r}")
    _executor = name


# os.environ.get of a name the environment lacks raises and catches a KeyError inside
# os.environ (~8k instructions, ~3% of a dispatch), and every call asks for the executor.
# On POSIX, os.environ keeps its values in ``_data``, bytes by encoded name, which its
# assignments and deletions (monkeypatch.setenv too) update as they update the process's.
_ENV_EXECUTOR_KEY = os.fsencode(_ENV_EXECUTOR)


def _executor_variable() -> str | None:
    """``os.environ.get("TORCHPMAP_EXECUTOR")``."""
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and type(data) is dict:
        raw = data.get(_ENV_EXECUTOR_KEY)
        return None if raw is None else os.fsdecode(raw)  # (as os.environ decodes it)
    return os.environ.get(_ENV_EXECUTOR)


def executor_name() -> str:
    if _executor is not None:
        return _executor
    raw = _executor_variable()
    if not raw:
        return "auto"
    name = raw.strip().lower()  # as TORCHPMAP_PLATFORM reads its value
    if name not in EXECUTORS:
        raise ValueError(f"{_ENV_EXECUTOR} must be one of {EXECUTORS}, got {raw!r}")
    return name
