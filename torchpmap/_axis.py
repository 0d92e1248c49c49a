"""The named-axis environment of the running replica.

Each worker thread binds a ``ReplicaFrame`` while it runs its replica; the
collectives look up the axis names they are given in it. The lookup happens
inside the op kernels at run time (never at trace time), so one compiled graph
serves every replica. A replica's backward passes run on its own worker thread
too: on CUDA the workers turn off the autograd engine's device threads
(``_runtime``), so a collective's backward always finds its frame here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeAlias

import torch

if TYPE_CHECKING:
    from ._communicator import Communicator

# What the collectives accept as axis_name: one name, or a tuple or list of
# names (the product of those axes).
AxisName: TypeAlias = "str | tuple[str, ...] | list[str]"


@dataclass
class ReplicaFrame:
    axis_name: str
    axis_size: int  # global size of the axis (all processes)
    index: int  # global index of this replica along the axis
    device: torch.device
    comm: Communicator
    # A captured executor's tracing frame: no replica runs, and a collective's kernel
    # may only meet operands batched over the replicas (see _ops._exchange).
    capturing: ClassVar[bool] = False


_tls = threading.local()


def current_frame() -> ReplicaFrame | None:
    return getattr(_tls, "frame", None)


def bind(frame: ReplicaFrame | None) -> None:
    _tls.frame = frame


def unbind() -> None:
    _tls.frame = None


def in_replica() -> bool:
    return getattr(_tls, "frame", None) is not None


def normalize_axis_names(axis_name: AxisName) -> tuple[str, ...]:
    """An axis name or a tuple/list of them, as a tuple."""
    if isinstance(axis_name, (tuple, list)):
        names = tuple(axis_name)
        if not names:
            raise ValueError("axis_name: an empty tuple of axis names names no axis")
        if len(set(names)) != len(names):
            raise ValueError(f"axis_name: axis names must be distinct, got {axis_name!r}")
        return names
    return (axis_name,)


def _unbound(name: str, frame: ReplicaFrame | None) -> NameError:
    if frame is None:
        from . import _runtime  # only on this error path: _runtime imports this module

        if _runtime.pool().busy():
            return NameError(
                f"unbound axis name: {name!r}. This thread is not running a pmap replica, but a pmap "
                f"call is running: was this collective called from another thread that a replica "
                f"started (e.g. a ThreadPoolExecutor inside the pmapped function)? Collectives work "
                f"only on the replica's own thread; call them there."
            )
        return NameError(
            f"unbound axis name: {name!r}. Collectives can only be called inside a "
            f"function mapped by torchpmap.pmap(..., axis_name={name!r})."
        )
    return unbound_in(name, frame.axis_name)


# How a pmap given no axis_name names its axis (no user code can spell it). One name for every
# such pmap: a capture is keyed by the axis name, and a pmap made anew each step would otherwise
# add a capture each time (nested pmap, the one case two of them would meet, is refused).
ANONYMOUS_AXIS = "<unnamed axis of pmap>"


def unbound_in(name: str, bound: str) -> NameError:
    """The error for axis ``name`` used inside a pmap whose axis is ``bound``."""
    if bound == ANONYMOUS_AXIS:
        return NameError(
            f"unbound axis name: {name!r}; the enclosing pmap was given no axis_name: "
            f"pass axis_name={name!r} to pmap to name its axis."
        )
    return NameError(f"unbound axis name: {name!r}; the enclosing pmap binds axis_name={bound!r}.")


def resolve(axis_name: AxisName) -> ReplicaFrame:
    """The frame that binds ``axis_name`` (a name or tuple of names), or NameError."""
    frame: ReplicaFrame | None = getattr(_tls, "frame", None)
    names = normalize_axis_names(axis_name)  # never empty
    if frame is None:
        if bound_level(names) is not None:
            raise NotImplementedError(
                f"a collective over {names[0]!r} of a value that is the same in every replica (not batched "
                f"over the replicas) cannot run on stacked replicas yet; derive it from the replica's inputs"
            )
        raise _unbound(names[0], None)
    for name in names:
        if name != frame.axis_name:
            raise _unbound(name, frame)
    return frame


# The two lookups below run at trace time under torch.compile and are taken as
# constants (no guard on the thread-local frame): a compiled program is made
# per pmap, axis size and physical device (see _compile.py), so they are fixed.
# The constant parts never raise: Dynamo reports an exception raised inside an
# assume_constant_result function as an internal compiler error, which would
# hide the NameError of an unbound axis. They answer None instead, and the
# NameError is raised by ``resolve`` in traced code, like any user error.
@torch._dynamo.assume_constant_result
def _bound_axis_size(axis_name: AxisName) -> int | None:
    level = bound_level(normalize_axis_names(axis_name))
    if level is not None:
        return level.size
    try:
        return resolve(axis_name).axis_size
    except NameError:
        return None


@torch._dynamo.assume_constant_result
def _bound_device(axis_name: AxisName) -> str | None:
    try:
        d = resolve(axis_name).device
    except NameError:
        return None
    return "cpu" if d.type == "cpu" else str(d)


def static_axis_size(axis_name: AxisName) -> int:
    """Size of the named axes, for shape logic."""
    size = _bound_axis_size(axis_name)
    if size is None:
        resolve(axis_name)  # raises the NameError
    return size


def physical_device(axis_name: AxisName) -> str:
    """Where the replica's tensors really live ("cpu" for a virtual device)."""
    device = _bound_device(axis_name)
    if device is None:
        resolve(axis_name)  # raises the NameError
    return device


# -- the replica axis as a vmap level ----------------------------------------------------
# A stacked executor runs every replica at once, the replicas being one torch.func.vmap
# level (_stacked_collectives.vmap_replicas). The collectives' batching rules (_ops) look
# the level they batch up here: that level exchanges along its dimension.
@dataclass(frozen=True)
class ReplicaLevel:
    """A vmap level whose dimension is the replicas of ``axis_name``: ``level`` is
    its functorch level, ``below`` the level that was current when it started
    (None: none), which is what an autograd.Function's vmap rule sees."""

    axis_name: str
    size: int
    level: int
    below: int | None
    device: torch.device  # where axis_index puts its arange


_levels_tls = threading.local()


def _levels() -> list[ReplicaLevel]:
    levels = getattr(_levels_tls, "levels", None)
    if levels is None:
        levels = _levels_tls.levels = []
    return levels


@contextmanager
def entered(level: ReplicaLevel) -> Iterator[None]:
    _levels().append(level)
    try:
        yield
    finally:
        _levels().pop()


def replica_level(level: int | None) -> ReplicaLevel | None:
    """The replica level being batched, given the current functorch level as a
    torch.library vmap rule sees it (the level it batches)."""
    for r in _levels():
        if r.level == level:
            return r
    return None


def replica_level_below(current: int | None) -> ReplicaLevel | None:
    """The same, for an autograd.Function's vmap rule: it runs with its level
    popped, so ``current`` is the level below the one it batches."""
    for r in _levels():
        if r.below == current:
            return r
    return None


def bound_level(names: Sequence[str]) -> ReplicaLevel | None:
    """The replica level this thread runs under whose axis is ``names`` (a tuple
    of one name, or of that name's repeats), if any."""
    for r in reversed(_levels()):
        if all(n == r.axis_name for n in names):
            return r
    return None
