"""A guard against ``torch.func.functional_call`` on a module the replicas share.

torch.func.functional_call (and torch.nn.utils.stateless.functional_call, and
anything else built on ``torch.nn.utils.stateless._reparametrize_module``)
swaps the given tensors into the module object for the duration of the call.
On the threads executor the replicas run at once: with one module object
between them, each would see the others' tensors, a wrong answer without an
error. Redirecting to ``torchpmap.functional_call``'s per-replica twin of the
module is not exactly torch's behaviour (attributes the forward sets land on
the twin; a reference to the module kept elsewhere sees the original), so the
guard raises instead.

The check is deterministic, not only when the timings overlap: per run (one
communicator), the first replica to reparametrize a module claims it; another
replica of the same run reparametrizing it raises. The wrapper is installed
once at import; outside a replica it is a pass-through (a thread-local read).
Under Dynamo it is a pass-through too, so the stacked and lockstep captures
trace torch's own function (their graphs swap nothing at run time).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
import torch.nn.utils.stateless as _stateless

from . import _axis
from ._fork import reinit_after_fork

_original = _stateless._reparametrize_module

# Per run (its communicator, fresh per run): module -> the replica index that
# reparametrized it first. Weak on both sides: a module made inside a replica
# and freed cannot be confused with a later one at the same address.
_claims: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[torch.nn.Module, int]] = weakref.WeakKeyDictionary()
_claims_lock = reinit_after_fork(threading.Lock())


class SharedModuleError(RuntimeError):
    """Replicas of one threads-executor call reparametrized the same module."""


@functools.wraps(_original)
def _guarded_reparametrize_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    if not torch.compiler.is_compiling():
        frame = _axis.current_frame()
        # Only a threads-executor replica's own frame: the stacked and lockstep
        # captures bind a subclass (no index) while one thread traces.
        if frame is not None and type(frame) is _axis.ReplicaFrame:
            _claim(module, frame)
    return _original(module, *args, **kwargs)


def _claim(module: torch.nn.Module, frame: _axis.ReplicaFrame) -> None:
    with _claims_lock:
        claimed = _claims.get(frame.comm)
        if claimed is None:
            claimed = _claims[frame.comm] = weakref.WeakKeyDictionary()
        owner = claimed.setdefault(module, frame.index)
    if owner != frame.index:
        raise SharedModuleError(
            f"torch.func.functional_call (or another torch.nn.utils.stateless reparametrization) ran on "
            f"the {type(module).__name__} module that replicas {owner} and {frame.index} share: it swaps "
            f"the tensors into the one module object, so the replicas would see each other's. "
            f"Use torchpmap.functional_call(module, params, args) instead (each replica gets its own "
            f"copy of the module's structure), or give each replica its own module (torchpmap.replicate)."
        )


def install() -> None:
    """Put the guard in place of torch's function (idempotent)."""
    _stateless._reparametrize_module = _guarded_reparametrize_module
