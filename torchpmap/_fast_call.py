"""The fast path of a pmap call: run the stacked executor's capture again,
straight from the caller's stacked buffers.

A call on the stacked executor spends most of its time in the general path:
the axis length, the devices, each leaf's placement, the call record, the
executor's checks, the capture lookup. When a call ran stacked and needed
none of what that path guards against (no autograd leaves, donation, shared
tensors or modules, no copy to stack an input), ``FastCall`` remembers its
capture under the call's signature (the pmap's input plan). The next call of
that signature re-checks, per leaf, exactly what the general path would have
decided from it, and runs the capture on the buffers; anything else, or any
Unsupported from the run, goes back to the general path, which then decides
as it always does (and may fall back to the threads executor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import TreeSpec

from . import _config, _devices, _stacked
from ._call import CallRecord, Placement, ReplicaGroup, constant_signature, unflatten_arguments
from ._fast_tree import Structure
from ._layout import slices_overlap
from ._sharded import ShardedTensor
from ._shared_state import ReachedVersions

# Per leaf, how the fast path finds its stacked buffer.
SHARDED, MAPPED, CONSTANT = range(3)
_STACKED_EXECUTORS = ("stacked", "auto")


class FastCall:
    """One signature's capture and what its calls must still have for it to
    run them: the devices, and per leaf a ShardedTensor already in place, a
    plain tensor on the physical device mapped along its axis, or a
    non-tensor value (which Dynamo's guards check); and the tensors, modules and
    optimizers the function reaches without being passed them, whose writes the
    caller checks."""

    __slots__ = (
        "capture",
        "group",
        "devices",
        "local",
        "kinds",
        "axes",
        "device",
        "has_constants",
        "constants",
        "reached",
    )

    def __init__(
        self,
        capture: Any,
        record: CallRecord,
        local: tuple[torch.device, ...],
        kinds: Sequence[int],
        reached: ReachedVersions | None,
    ) -> None:
        self.capture = capture
        self.reached = reached  # what the function reached when this was made: the caller checks its writes
        self.group: ReplicaGroup = record.group
        self.devices = record.group.devices
        self.device = self.devices[0]
        self.local = local  # the local device list it was made for (distributed.initialize changes it)
        self.kinds = tuple(kinds)
        self.axes = tuple(record.axes)
        # Not the record itself: it holds this call's inputs, which the plan would keep alive.
        # Nor its tree structure: each call is rebuilt with its own dict keys and contexts
        # (the plan's key finds them equal, but a function may tell equal keys apart).
        # Dynamo's guards take -0.0 for 0.0: the capture is keyed by the zeros' signs too.
        self.has_constants = CONSTANT in self.kinds
        self.constants = constant_signature(record.caller_leaves) if self.has_constants else ()

    @staticmethod
    def kinds_of(record: CallRecord, tensor_kinds: Sequence[bool]) -> list[int] | None:
        """Per leaf its fast-path kind, or None when the call needs the general
        path every time (an input placed with a copy, broadcast tensors, ...).
        ``tensor_kinds[j]``: whether leaf j was given as a tensor (or array)."""
        kinds = []
        for placement, leaf, is_tensor in zip(record.placements, record.caller_leaves, tensor_kinds):
            if placement is Placement.SHARDED and type(leaf) is ShardedTensor:
                kinds.append(SHARDED)
            elif placement is Placement.MAPPED and type(leaf) is torch.Tensor:
                kinds.append(MAPPED)
            elif placement is Placement.BROADCAST and not is_tensor:
                kinds.append(CONSTANT)
            else:
                return None
        return kinds

    def call(
        self, leaves: list[Any], structure: Structure | TreeSpec | None, static_items: tuple[tuple[int, Any], ...]
    ) -> _stacked.StackedOutput | None:
        """The call's stacked output, or None: take the general path. ``structure``:
        this call's tree of arguments (a _fast_tree key or a TreeSpec; None: positional
        tensors only). ``static_items``: its static arguments. Both are equal to the
        first call's by the plan's key, but the function gets this call's own, and
        Dynamo's guards check them."""
        # executor_name() and local_device_tuple() read without their calls where they are
        # set (every call asks): an unset executor reads the environment; an unset device
        # list (None) is not self.local, and the general path makes it.
        if (_config._executor or _config.executor_name()) not in _STACKED_EXECUTORS:
            return None
        if _devices._frozen_local is not self.local or _stacked.blocked_reason() is not None:
            return None
        if self.has_constants and constant_signature(leaves) != self.constants:
            # (-0.0 for 0.0, or (True,) for (1,): equal to Dynamo's guards, another capture to the general path)
            return None
        state = _stacked._CallState(len(self.devices), {})
        row0 = self._rows(leaves, state)
        if row0 is None:
            return None
        args: list[Any] | tuple[Any, ...]
        kwargs: dict[str, Any]
        if structure is None and not static_items:  # positional tensors only: unflatten_arguments' first case
            args, kwargs = row0, {}
        else:
            args, kwargs = unflatten_arguments(structure, static_items, row0)
        try:
            return _stacked.run_capture(self.capture, self.group, args, kwargs, state)
        except _stacked.Unsupported:
            return None  # the general path decides again (and says why it falls back)

    def _rows(self, leaves: list[Any], state: _stacked._CallState) -> list[Any] | None:
        """Replica 0's leaves, each row view mapped to its buffer in ``state``;
        None where a leaf is not what the general path would stack without a copy."""
        grad_on = torch.is_grad_enabled()
        n, devices = len(self.devices), self.devices
        row0: list[Any] = []
        for leaf, kind, axis in zip(leaves, self.kinds, self.axes):
            if kind == CONSTANT:
                if isinstance(leaf, torch.Tensor):
                    return None
                row0.append(leaf)
                continue
            assert axis is not None  # SHARDED and MAPPED leaves are mapped
            buffer: torch.Tensor | None
            if kind == SHARDED:
                if type(leaf) is not ShardedTensor:
                    return None
                # None where it requires grad (autograd must see it: the general path), is
                # mapped otherwise, or has no one stacked buffer (_stacked.sharded_buffer).
                buffer = leaf._fast_call_buffer(axis, devices, grad_on)
            else:
                if type(leaf) is not torch.Tensor or leaf.layout is not torch.strided or leaf.is_nested:
                    return None  # (the general path refuses sparse and nested tensors)
                if grad_on and leaf.requires_grad:
                    return None  # autograd must see this leaf: the general path
                if leaf.ndim <= axis or leaf.shape[axis] != n:
                    return None
                buffer = None if slices_overlap(leaf, axis) else _stacked.mapped_buffer(leaf, axis, self.device)
                if buffer is leaf:
                    state.caller_tensors.add(id(buffer))
            if buffer is None:
                return None
            row0.append(state.row_of(buffer))
        return row0
