"""torch.compile for pmap: one compiled program per device, warmed up safely.

Dynamo keeps its cache on the code object and guards on tensor devices, so
compiling one function for 8 or 16 CUDA devices would recompile per device and
fall back to eager past ``recompile_limit``. Each (axis size, device) therefore
gets its own copy of a small trampoline's code object: its own cache, no
shared guard churn. Virtual CPU devices share one physical device and so share
one program.

Dynamo compiles under a process-wide lock but is not safe to race: replicas
that miss the cache together each compile again. The first call of every new
input signature is therefore a *warm-up*: replicas take turns holding a gate,
and give it up only while they wait inside a collective (so the rendezvous
still completes) and when they return.
"""
from __future__ import annotations

import threading
import types
from typing import Any, Callable

import torch

from .errors import CompileError

_COMPILE_KEYS = {"backend", "mode", "dynamic", "fullgraph", "options"}


def normalize_options(compile: Any) -> dict | None:
    """``compile=`` of pmap: False/None (eager), True (defaults) or torch.compile's options."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        unknown = set(compile) - _COMPILE_KEYS
        if unknown:
            raise ValueError(
                f"pmap: compile= got unknown option(s) {sorted(unknown)}; torch.compile options "
                f"are {sorted(_COMPILE_KEYS)}"
            )
        return dict(compile)
    raise TypeError(f"pmap: compile must be False, True or a dict of torch.compile options, got {compile!r}")


def _trampoline_factory(fun: Callable) -> Callable:
    def pmap_replica(*args, **kwargs):
        return fun(*args, **kwargs)

    return pmap_replica


class CompiledReplicas:
    """The compiled programs of one pmapped function."""

    def __init__(self, fun: Callable, options: dict, fun_name: str):
        self._fun = fun
        self._options = options
        self._fun_name = fun_name
        self._programs: dict = {}
        self._warm: set = set()
        self._lock = threading.Lock()
        self.gate = threading.Lock()

    def programs(self, devices, n: int) -> list[Callable]:
        """One callable per replica; replicas on the same physical device share."""
        out = []
        for d in devices:
            key = (n, "cpu") if d.type == "cpu" else (n, str(d))
            prog = self._programs.get(key)
            if prog is None:
                with self._lock:
                    prog = self._programs.get(key)
                    if prog is None:
                        prog = self._programs[key] = self._compile_copy(d)
            out.append(prog)
        return out

    def needs_warmup(self, signature) -> bool:
        return signature not in self._warm

    def mark_warm(self, signature) -> None:
        self._warm.add(signature)

    def _compile_copy(self, device) -> Callable:
        t = _trampoline_factory(self._fun)
        # A distinct code object: a distinct Dynamo cache (see module docstring).
        code = t.__code__.replace()
        entry = types.FunctionType(code, t.__globals__, t.__name__, t.__defaults__, t.__closure__)
        compiled = torch.compile(entry, **self._options)
        name, where = self._fun_name, device

        def run(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                raise CompileError(
                    f"torch.compile failed for {name} (pmap replica on {where}): "
                    f"{type(e).__name__}: {e}\nPass compile=False to pmap to run it eagerly."
                ) from e

        return run


class WarmupGate:
    """Held by a replica while it may be compiling; dropped while it waits in a
    collective so that the others can reach the same collective."""

    def __init__(self, lock: threading.Lock):
        self._lock = lock
        self._owner = threading.local()

    def enter(self) -> None:
        self._lock.acquire()
        self._owner.held = True

    def exit(self) -> None:
        if getattr(self._owner, "held", False):
            self._owner.held = False
            self._lock.release()

    def pause(self) -> bool:
        """Before blocking in a collective: give the gate up if we hold it."""
        if getattr(self._owner, "held", False):
            self.exit()
            return True
        return False
