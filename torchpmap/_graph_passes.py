"""Cheap, exact rewrites of a traced aten graph that runs op by op in Python.

A graph the stacked executor runs uncompiled costs one Python dispatch per
node on every call, and ``make_fx(vmap(...))`` leaves many nodes that do
nothing: views and expands to the shape the tensor already has, permutes that
keep every dimension in place, the same comparison or scalar computed again,
a constant copied before it is only read, views nobody uses. ``simplify``
removes them. Every rewrite keeps the values and the aliasing the graph's
outputs and in-place ops can see: a node whose value a graph output or an
in-place op could reach is left alone.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

aten = torch.ops.aten

# Ops that return their first input's data (a view, or ``_unsafe_view``'s
# fresh-tensor view): when the result has the input's shape, strides and
# offset, it is the input.
_SAME_DATA_OPS = {
    aten.expand.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.slice.Tensor,
}


def simplify(gm: torch.fx.GraphModule) -> None:
    """Rewrite ``gm`` in place (and recompile it): see the module docstring."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if _is_identity_view(node) or _is_needless_constant_copy(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    _eliminate_common_subexpressions(graph)
    _eliminate_dead_nodes(graph)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    _reuse_dead_temporaries(graph)  # last: the passes above leave graphs that write alone
    gm.recompile()


def _is_identity_view(node: torch.fx.Node) -> bool:
    if node.target not in _SAME_DATA_OPS or not isinstance(node.args[0], torch.fx.Node):
        return False
    if any(user.op == "output" for user in node.users):
        return False  # an output keeps being an object of its own
    out, inp = node.meta.get("val"), node.args[0].meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    return (
        out.shape == inp.shape
        and out.stride() == inp.stride()
        and out.storage_offset() == inp.storage_offset()
        and out.dtype == inp.dtype
    )


def _is_needless_constant_copy(node: torch.fx.Node) -> bool:
    """``lift_fresh_copy`` of a constant (a traced ``torch.tensor``) that only ops
    reading it use: the constant itself serves."""
    return (
        node.target is aten.lift_fresh_copy.default
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0].op == "get_attr"
        and all(_only_reads(user, node) for user in node.users)
    )


def _pure(node: torch.fx.Node) -> bool:
    """An aten op whose result depends only on its arguments, that writes
    nothing, returns a fresh tensor and draws no random numbers."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or "empty" in target.__name__:
        return False
    if target is aten._unsafe_view.default:  # unannotated, but a view of its input
        return False
    schema = target._schema
    return not schema.is_mutable and all(a.alias_info is None for a in (*schema.arguments, *schema.returns))


def _eliminate_common_subexpressions(graph: torch.fx.Graph) -> None:
    """One node per pure computation whose result is only read, never written,
    viewed or returned (two outputs must stay two tensors)."""
    if any(_writes(node) for node in graph.nodes):
        return  # the same op on the same tensor may read other values before and after a write
    seen: dict[Any, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if not _pure(node) or not node.users or not all(_only_reads(u, node) for u in node.users):
            continue
        try:
            key = (node.target, _key(node.args), _key(node.kwargs))
            hash(key)
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
        else:
            node.replace_all_uses_with(first)
            graph.erase_node(node)


def _writes(node: torch.fx.Node) -> bool:
    target = node.target
    if node.op != "call_function":
        return False
    if not isinstance(target, torch._ops.OpOverload):
        return target is not operator.getitem  # an unknown callable may write
    return bool(target._schema.is_mutable)


def _key(value: Any) -> Any:
    """A hashable key equal for equal arguments: a float by its repr, so that
    0.0 and -0.0 (equal, with one hash) and nan (unequal to itself) key right."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _key(v)) for k, v in value.items()))
    if isinstance(value, float):
        return ("float", repr(value))
    return value


def _eliminate_dead_nodes(graph: torch.fx.Graph) -> None:
    """Drop pure ops, views and getitems whose results nobody uses."""
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        target = node.target
        droppable = target is operator.getitem or _pure(node) or _is_view_op(node)
        if droppable:
            graph.erase_node(node)


def _reuse_dead_temporaries(graph: torch.fx.Graph) -> None:
    """A pointwise op whose first argument is a fresh temporary that nothing
    else uses writes its result into that temporary (``add`` becomes ``add_``)
    when the two have one shape, dtype and layout: one allocation fewer, and
    the same kernel. Large stacked buffers make allocations costly on CPU (the
    system allocator hands blocks of tens of MB back to the OS at every free)."""
    owned: set[torch.fx.Node] = set()  # results written in place into a temporary: fresh too
    for node in graph.nodes:
        inplace = _inplace_variant(node)
        if inplace is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        temp = node.args[0]
        if (
            not (_pure(temp) or temp in owned)
            or len(temp.users) != 1
            or _mentions(node.args[1:], temp)
            or _mentions(node.kwargs, temp)
        ):
            continue
        out, val = node.meta.get("val"), temp.meta.get("val")
        if not isinstance(out, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        same_layout = out.shape == val.shape and out.dtype == val.dtype and out.stride() == val.stride()
        if same_layout and _dense(val):
            node.target = inplace
            owned.add(node)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory once each (a permutation of a contiguous layout)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _inplace_variant(node: torch.fx.Node) -> torch._ops.OpOverload | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    if torch.Tag.pointwise not in target.tags or torch.Tag.nondeterministic_seeded in target.tags or not _pure(node):
        return None
    packet = getattr(aten, target._schema.name.split("::")[1] + "_", None)
    inplace = getattr(packet, target._overloadname, None) if packet is not None else None
    if not isinstance(inplace, torch._ops.OpOverload):
        return None
    # The same arguments, the first written and returned.
    args, inplace_args = target._schema.arguments, inplace._schema.arguments
    if [a.name for a in args] != [a.name for a in inplace_args]:
        return None
    first = inplace_args[0].alias_info
    return inplace if first is not None and first.is_write else None


def _is_view_op(node: torch.fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    schema = target._schema
    if schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return bool(schema.returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _only_reads(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """Whether ``user`` is an op that takes ``value`` without writing it or
    returning a view of it."""
    target = user.target
    if user.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    if any(r.alias_info is not None for r in schema.returns):
        return False
    for k, arg in enumerate(schema.arguments):
        given = user.args[k] if k < len(user.args) else user.kwargs.get(arg.name)
        if arg.alias_info is not None and _mentions(given, value):
            return False
    return True


def _mentions(given: Any, value: torch.fx.Node) -> bool:
    return given is value or (isinstance(given, (list, tuple)) and any(_mentions(g, value) for g in given))
