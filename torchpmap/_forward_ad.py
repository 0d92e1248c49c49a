"""Forward-mode AD inside replicas on worker threads: one replica at a time.

PyTorch keeps forward-AD levels for the whole process: ``forward_ad``'s
current level, functorch's ``JVP_NESTING`` count and the C++ list of levels.
Replicas on the threads executor that enter ``torch.func.jvp`` (``jacfwd``,
``hessian``, ``linearize``) or ``forward_ad.dual_level`` at once take each
other's level: "Nested forward mode AD is not supported", "no level exists",
or tangents that are silently zero. So a worker thread holds ``_GATE`` from
entering a forward-AD level until it leaves it, and other replicas entering
one wait. Code outside torchpmap's worker threads is not affected.

A replica that holds the gate cannot meet the others in a collective (they
may be waiting for the gate): the collective raises at once instead of
waiting for the collective timeout (``check_no_collective``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch._functorch.eager_transforms as _eager_transforms
import torch.autograd.forward_ad as _forward_ad

from . import _config
from ._fork import reinit_after_fork

if TYPE_CHECKING:
    from ._communicator import Collective

_GATE = reinit_after_fork(threading.RLock())
_tls = threading.local()  # .worker: a threads-executor worker; .depth: forward-AD levels it holds


def mark_worker_thread() -> None:
    """The calling thread runs replicas of the threads executor (``_runtime._Worker``)."""
    _tls.worker = True
    _tls.depth = 0


def held() -> bool:
    """Whether this thread is inside a forward-AD level it entered as a replica."""
    return getattr(_tls, "depth", 0) > 0


def check_not_dual(collective: Collective, x: torch.Tensor) -> None:
    """Raise for a reduction of a dual tensor (the caller's forward-AD level reached
    the replicas through their inputs): the reductions have no forward-mode rule,
    and PyTorch would fail inside the exchange with an error about out= kernels.
    (The gathers and permutations move tangents with the values: stack, cat, copy.)"""
    if collective.op is not None and _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(x).tangent is not None:
        why = (
            "psum and pmean have no forward-mode rule on the threads and lockstep executors (the stacked "
            "executor carries tangents through them)"
            if collective.op == "sum"
            else f"p{collective.op} has no derivative (as in JAX)"
        )
        raise RuntimeError(
            f"torchpmap: {collective.name} of a dual tensor (forward-mode AD: torch.func.jvp or "
            f"forward_ad.dual_level around the pmap call, whose inputs carry tangents): {why}; pass the "
            f"primal values (forward_ad.unpack_dual(x).primal), or differentiate in reverse mode."
        )


def check_no_collective(kind: str) -> None:
    if held():
        # Under set_executor("lockstep") the call got here by falling back (a collective of a
        # dual tensor, which has no forward-mode rule): suggesting lockstep would send them round.
        advice = (
            "Move the collective out of the forward-AD region (a collective of a tangent-carrying "
            "tensor has no forward-mode rule, so the lockstep executor runs it on the threads too)"
            if _config.executor_name() == "lockstep"
            else "Move the collective out of the forward-AD region or, for a collective of plain tensors "
            "inside it, use torchpmap.set_executor('lockstep')"
        )
        raise RuntimeError(
            f"torchpmap: a collective ({kind}) inside torch.func.jvp (or jacfwd, hessian, linearize, "
            f"forward_ad.dual_level) on the threads executor. PyTorch's forward-AD levels are "
            f"process-wide, so replicas on threads enter such regions one at a time and cannot meet in "
            f"a collective inside one (and collectives have no forward-mode rule for dual tensors). {advice}."
        )


def _entering(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def enter(*args: Any, **kwargs: Any) -> Any:
        if not getattr(_tls, "worker", False):
            return original(*args, **kwargs)
        _acquire_gate()
        _tls.depth += 1
        try:
            return original(*args, **kwargs)
        except BaseException:
            _tls.depth -= 1
            _GATE.release()
            raise

    enter.__torchpmap_gated__ = True  # type: ignore[attr-defined]
    return enter


def _acquire_gate() -> None:
    """Take ``_GATE``, never waiting for it while holding the compile gate in
    eager code (between a compiled pmap's graphs): the replica inside its
    forward-AD region may need the compile gate for its next compiled frame,
    and both would wait until the collective timeout. Dynamo enters a jvp
    level while it traces too: then the compile gate stays held (the holder
    is compiling, and nobody may enter Dynamo meanwhile)."""
    if _GATE.acquire(blocking=False):
        return
    from ._compile import DYNAMO_GATE  # _compile imports much of the package

    paused = not DYNAMO_GATE.compiling_here() and DYNAMO_GATE.pause()
    _GATE.acquire()
    if paused:
        try:
            DYNAMO_GATE.enter()
        except BaseException:
            _GATE.release()
            raise


def _leaving(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def leave(*args: Any, **kwargs: Any) -> Any:
        if not held():
            return original(*args, **kwargs)
        try:
            return original(*args, **kwargs)
        finally:
            _tls.depth -= 1
            _GATE.release()

    leave.__torchpmap_gated__ = True  # type: ignore[attr-defined]
    return leave


def install() -> None:
    """Wrap the functions every forward-AD region enters and leaves through:
    ``dual_level`` and ``linearize`` call forward_ad's, ``jvp`` functorch's.
    Both look them up as module globals when called."""
    for module, enter, leave in (
        (_forward_ad, "enter_dual_level", "exit_dual_level"),
        (_eager_transforms, "enter_jvp_nesting", "exit_jvp_nesting"),
    ):
        if not getattr(getattr(module, enter), "__torchpmap_gated__", False):
            setattr(module, enter, _entering(getattr(module, enter)))
            setattr(module, leave, _leaving(getattr(module, leave)))
