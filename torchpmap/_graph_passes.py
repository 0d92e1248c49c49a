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

from ._stacked_collectives import REPLICA_COPIES

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
    _compute_copies_once(graph)
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
    nothing, returns a fresh tensor, draws no random numbers and raises for
    no value (an op that returns nothing is there to raise)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or "empty" in target.__name__:
        return False
    if target is aten._unsafe_view.default:  # unannotated, but a view of its input
        return False
    schema = target._schema
    if not schema.returns:  # called for what it checks: _linalg_check_errors, _assert_async raise
        return False
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
    """A hashable key equal for equal arguments of the same type: ``True == 1``
    and ``1 == 1.0``, but ``b + True`` is a logical or where ``b + 1`` adds. A
    float or complex by its repr, so that 0.0 and -0.0 (equal, with one hash) and
    nan (unequal to itself) key right."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _key(v)) for k, v in value.items()))
    if isinstance(value, (float, complex)):
        return (type(value), repr(value))
    return (type(value), value)


# Pointwise kernels that, given the broadcast view, round differently from the
# threads, so they get a stacked copy: gelu_backward takes another code path
# for a strided input (another erf, not vectorised) and ldexp computes an
# (n, ...) intermediate of the view and multiplies in one long loop. Found by
# comparing every pointwise aten op with two or more tensor inputs
# (tests/test_graph_passes.py repeats the comparison).
_STRIDED_INPUT_CHANGES_BITS = {aten.gelu_backward.default, aten.ldexp.Tensor}


def _pointwise(node: torch.fx.Node) -> bool:
    """A deterministic elementwise aten op (``Tag.pointwise``) that writes
    nothing and returns a fresh tensor."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags and _pure(node)


def _compute_copies_once(graph: torch.fx.Graph) -> None:
    """Pointwise ops on ``stack([t, t, ..., t])`` (an all-reduce's result on
    stacked replicas: every replica's total) run once on the (...) value, not n
    times on the (n, ...) one. A pmean of a model's gradients followed by an
    SGD update then divides and scales each gradient once, and no copy is made
    until a replica's own value meets it.

    The reference is the threads executor, which runs each op per replica on a
    fresh (...) tensor: the one row is such a tensor, so computing once gives
    the threads' bits for any deterministic op. Pointwise users that meet a
    replica's own value get a broadcast view of the row: their kernel then
    loops row by row, as the threads do, where an (n, ...) copy would be one
    long loop whose vectorised and scalar parts split the rows elsewhere (and
    round differently in complex, half precision or transcendental kernels).
    Other users (outputs, writes, views, reductions) get a stacked copy. t must
    be a fresh value that is only read, and nothing in the graph may write to
    the (n, ...) values or their views: the one copy would not see the write."""
    planned = _plan_copies_once(graph)
    if not planned or _written_through_aliases(graph, planned):
        return
    one_copy: dict[torch.fx.Node, torch.fx.Node] = {}  # a node of n equal rows -> a node of one row
    for node in planned:
        row = _copied_row(node)
        if row is not None:
            one_copy[node] = row
            continue
        target = node.target
        assert isinstance(target, torch._ops.OpOverload)  # a _pointwise op
        args = torch.fx.node.map_arg(node.args, lambda a: one_copy.get(a, a))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: one_copy.get(a, a))
        with graph.inserting_before(node):
            once = graph.call_function(target, args, kwargs)
        once.meta["val"] = target(*_vals(args), **_vals(kwargs))
        one_copy[node] = once
    for stacked, row in one_copy.items():
        _feed_users(graph, stacked, row, one_copy)


def _plan_copies_once(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The nodes whose value is n equal rows that one row can stand for, in
    graph order: the stacks of ``_copied_row`` and pointwise ops on them."""
    planned: dict[torch.fx.Node, None] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if _copied_row(node) is not None:
            planned[node] = None
            continue
        if not _pointwise(node) or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        out = node.meta["val"]
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if not tensors or any(a not in planned for a in tensors):
            continue
        if any(_val_shape(a) != out.shape for a in tensors):
            continue  # no broadcasting between the stacks to reason about
        planned[node] = None
    return list(planned)


def _written_through_aliases(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> bool:
    """Whether an op of ``graph`` may write to one of ``nodes`` or to a view of
    one (a slice zeroed in place, a view added to)."""
    aliases = set(nodes)
    for node in graph.nodes:  # graph order: a view's base comes before it
        if node.op != "call_function" or not _mentions_any((node.args, node.kwargs), aliases):
            continue
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            if target is operator.getitem:
                aliases.add(node)  # a part of a result that may alias
                continue
            return True  # an unknown callable may write
        schema = target._schema
        for k, arg in enumerate(schema.arguments):
            given = node.args[k] if k < len(node.args) else node.kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and _mentions_any(given, aliases):
                return True
        if any(r.alias_info is not None for r in schema.returns):
            aliases.add(node)  # a view (or an in-place op's result): writes to it reach the value
    return False


def _mentions_any(given: Any, nodes: set[torch.fx.Node]) -> bool:
    found = False

    def visit(a: torch.fx.Node) -> torch.fx.Node:
        nonlocal found
        found = found or a in nodes
        return a

    torch.fx.node.map_arg(given, visit)
    return found


def _feed_users(
    graph: torch.fx.Graph, stacked: torch.fx.Node, row: torch.fx.Node, one_copy: dict[torch.fx.Node, torch.fx.Node]
) -> None:
    """Point the users of ``stacked`` that are not computed once themselves at a
    broadcast view of ``row`` or at a stacked copy of it (see above)."""
    val = stacked.meta["val"]
    view_val = row.meta["val"].unsqueeze(0).expand(val.shape)
    view: torch.fx.Node | None = None
    copy: torch.fx.Node | None = stacked if stacked.target is aten.stack.default else None
    for user in list(stacked.users):
        if user in one_copy:
            continue  # computed once too: this use dies with it
        reads_the_view = _pointwise(user) and user.target not in _STRIDED_INPUT_CHANGES_BITS
        if reads_the_view and _only_reads(user, stacked) and _same_result(user, stacked, view_val):
            if view is None:
                with graph.inserting_after(stacked):
                    unsqueezed = graph.call_function(aten.unsqueeze.default, (row, 0))
                with graph.inserting_after(unsqueezed):
                    view = graph.call_function(aten.expand.default, (unsqueezed, list(val.shape)))
                unsqueezed.meta["val"] = row.meta["val"].unsqueeze(0)
                view.meta["val"] = view_val
            user.replace_input_with(stacked, view)
            continue
        if copy is None:
            with graph.inserting_after(stacked):
                copy = graph.call_function(aten.stack.default, ([row] * val.shape[0],))
            copy.meta["val"] = val
        user.replace_input_with(stacked, copy)


def _copied_row(node: torch.fx.Node) -> torch.fx.Node | None:
    """t when ``node`` is ``stack([t, ..., t])`` along dimension 0 that a collective
    made (``replica_copies``: every replica's copy of one value) and t is a fresh
    value that every user only reads, else None. Not a user's own stack of copies:
    each replica computes over all of its rows in one loop, whose vectorised and
    scalar parts split them elsewhere than a loop over one row."""
    if node.target is not aten.stack.default or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    if not node.meta.get(REPLICA_COPIES):
        return None
    rows, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 0 or not isinstance(rows, (list, tuple)) or not rows or any(r is not rows[0] for r in rows):
        return None
    row = rows[0]
    if not isinstance(row, torch.fx.Node) or not isinstance(row.meta.get("val"), torch.Tensor) or not _pure(row):
        return None
    return row if all(_only_reads(user, row) for user in row.users) else None


def _val_shape(node: torch.fx.Node) -> Any:
    val = node.meta.get("val")
    return val.shape if isinstance(val, torch.Tensor) else None


def _vals(args: Any) -> Any:
    return torch.fx.node.map_arg(args, lambda a: a.meta["val"])


def _same_result(user: torch.fx.Node, value: torch.fx.Node, view_val: torch.Tensor) -> bool:
    """Whether ``user`` given the broadcast view for ``value`` makes a result of
    the same shape, dtype and strides (its kernel picks the layout from its
    inputs')."""
    out = user.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return False
    swap = torch.fx.node.map_arg((user.args, user.kwargs), lambda a: view_val if a is value else a.meta.get("val"))
    if any(v is None for v in torch.utils._pytree.tree_leaves(swap)):
        return False  # an argument traced without its value: nothing to compare with
    try:
        new = user.target(*swap[0], **swap[1])  # type: ignore[operator]
    except Exception:
        return False
    layout = (out.shape, out.dtype, out.stride())
    return isinstance(new, torch.Tensor) and (new.shape, new.dtype, new.stride()) == layout


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


# Ops that return a view of their input without saying so in their schema
# (reshape's decomposition ends in _unsafe_view of a copy it just made).
_UNANNOTATED_VIEWS = frozenset({torch.ops.aten._unsafe_view.default})


def _only_reads(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """Whether ``user`` is an op that takes ``value`` without writing it or
    returning a view of it."""
    target = user.target
    if user.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    if target in _UNANNOTATED_VIEWS or any(r.alias_info is not None for r in schema.returns):
        return False
    for k, arg in enumerate(schema.arguments):
        given = user.args[k] if k < len(user.args) else user.kwargs.get(arg.name)
        if arg.alias_info is not None and _mentions(given, value):
            return False
    return True


def _mentions(given: Any, value: torch.fx.Node) -> bool:
    return given is value or (isinstance(given, (list, tuple)) and any(_mentions(g, value) for g in given))
