"""Replica tensors that a captured function's Python side effects store outside it.

A captured executor (stacked, lockstep) runs the function's Python once, on
replica 0's values, and Dynamo replays its side effects after the graph with
the values replica 0 computed. A tensor the function appends to a list,
stores in a dict, an attribute, a global or a closure variable would reach the
caller as replica 0's alone, where the threads executor stores every
replica's: a silently different result. ``stored_replica_tensor`` finds such a
store in Dynamo's record of the side effects while the backend compiles the
graph, so that the capture falls back to the threads instead.

A tensor that is the same object in every replica (a closed-over tensor put
back where it was, a list's old items) is no difference and passes; so do
new containers the function returns (its outputs), the containers of its own
arguments (pmap rebuilds them for every replica and every call, so no caller
sees what is stored in them) and side effects without tensors (a counter, a
flag), which the executors' documentation covers.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch


def stored_replica_tensor(per_replica: Sequence[torch.Tensor]) -> str | None:
    """A description of a tensor the function being captured stores outside
    itself that may differ between replicas, or None. ``per_replica``: the
    per-replica tensors the capture was given (replica 0's rows or values).

    Reads Dynamo's tracing state, so it must run inside the backend. A value
    computed by the graph counts as per replica even when it is not (it would
    be n equal tensors on the threads, one here)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables import ConstDictVariable, SetVariable  # (their modules differ between releases)
        from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew, VariableTracker
        from torch._dynamo.variables.tensor import TensorVariable

        tx = InstructionTranslator.current_tx()
        side_effects = tx.output.side_effects
        ignored = side_effects.ignore_mutation_on_these_variables

        def existing(var: Any) -> bool:  # an object from before the call: the caller sees what is stored in it
            if var in ignored or isinstance(var.mutation_type, (AttributeMutationNew, ValueMutationNew)):
                return False
            return not _rebuilt_argument(var.source, tx.f_locals)

        roots: list[Any] = [var for var in side_effects._get_modified_vars() if existing(var)]
        roots += [attrs for var, attrs in side_effects.store_attr_mutations.items() if existing(var)]
        stored: list[Any] = []

        def collect(vt: Any) -> None:
            if isinstance(vt, TensorVariable):
                stored.append(vt)
            elif isinstance(vt, (ConstDictVariable, SetVariable)):  # a dict's keys, a set's members: visit skips them
                for key in vt.items:
                    VariableTracker.visit(collect, key.vt, side_effects=side_effects)

        for root in roots:
            VariableTracker.visit(collect, root, side_effects=side_effects)
        nodes = [vt.proxy.node for vt in stored]
        replica_ids = {id(t) for t in per_replica}
        for node in nodes:
            if node.op != "placeholder":
                return f"{node.name}, made at {_made_at(node)}"
            # A graph input is known by the tensor Dynamo took it from; one the graph does
            # not use keeps no record of it, only its fake tensor, made from that tensor.
            example = getattr(node.meta.get("grapharg"), "example", None)
            fake = node.meta.get("example_value")
            fake_of = fake.fake_mode.fake_tensor_converter._get_memo
            if id(example) in replica_ids or any(fake_of(t) is fake for t in per_replica):
                return node.name
    except (ImportError, AttributeError) as e:  # another torch: say so rather than guess
        return f"<Dynamo's record of side effects is unreadable: {e}>"
    return None


# The containers pytree takes apart and ``CallRecord.unflatten`` builds anew
# for each replica of each call; the mutable ones can be stored into.
_REBUILT = (list, tuple, dict, collections.OrderedDict, collections.defaultdict, collections.deque)
_MUTABLE = (list, dict, collections.OrderedDict, collections.defaultdict, collections.deque)


def _rebuilt_argument(source: Any, frame_locals: dict[str, Any]) -> bool:
    """Whether ``source`` names a container of the captured call's own
    arguments: reached from the entry's ``args``/``kwargs`` through items of
    containers that pmap rebuilds (never a user object's ``__getitem__``)."""
    from torch._dynamo.source import AttrSource, DictGetItemSource, GetItemSource, LocalSource

    steps: list[Any] = []
    while isinstance(source, (GetItemSource, DictGetItemSource, AttrSource)):
        steps.append(source)
        source = source.base
    if not isinstance(source, LocalSource) or source.local_name not in ("args", "kwargs") or not steps:
        return False
    obj: Any = frame_locals.get(source.local_name)
    for step in reversed(steps):
        if type(obj) not in _REBUILT and not _is_namedtuple(obj):
            return False
        if isinstance(step, AttrSource):
            if not _is_namedtuple(obj) or step.member not in obj._fields:
                return False
            obj = getattr(obj, step.member)
        elif isinstance(step, GetItemSource) and step.index_is_slice:
            return False
        else:
            try:
                obj = obj[step.index]
            except (KeyError, IndexError, TypeError):
                return False
    return type(obj) in _MUTABLE


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _made_at(node: torch.fx.Node) -> str:
    """file:line of the user's code that computed ``node``, from its trace."""
    lines = [line.strip() for line in str(node.meta.get("stack_trace") or "").splitlines()]
    where = next((line for line in reversed(lines) if line.startswith("File ")), "")
    parts = where.split('"')
    if len(parts) < 3:
        return "an unknown line"
    line = parts[2].split(",")[1].strip().removeprefix("line ") if "," in parts[2] else "?"
    return f"{parts[1]}:{line}"


def refusal(name: str) -> str:
    """The fallback reason for ``stored_replica_tensor``'s find."""
    return (
        f"the function stores a tensor that differs between replicas outside itself ({name}) in a list, "
        "dict, attribute, global or closure variable; captured, only replica 0's would be stored"
    )
