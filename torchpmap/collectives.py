"""Named-axis collectives with the signatures and semantics of ``jax.lax``.

Every function takes a pytree of tensors and applies itself leaf by leaf, in
JAX's leaf order (a dict's keys sorted), each exchange tagged with a description
of the whole tree so that replicas holding different trees fail rather than
pair leaves wrongly. The layout work (tiled or not, which axis) happens here
with ordinary torch ops, so autograd and torch.compile see it; the
communication itself is one of the five custom ops in ``_ops``.
"""

from __future__ import annotations

import functools
import numbers
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar, cast

import torch
from torch.utils import _pytree
from torch.utils._pytree import PyTree

from . import _axis, _devices, _ops, _tree
from . import _stacked_collectives as _stacked
from ._axis import AxisName
from ._communicator import reduction_problem
from ._number_reductions import number_dtype, reduce_numbers

# axis_index_groups: None (one group of the whole axis) or groups of axis indices.
AxisIndexGroups: TypeAlias = "Sequence[Sequence[int]] | None"

__all__ = [
    "psum",
    "pmean",
    "pmax",
    "pmin",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "pshuffle",
    "pswapaxes",
    "all_to_all",
    "axis_index",
    "axis_size",
]


# -- argument checking (all before any communication) ---------------------------------
def _names(axis_name: AxisName, fn: str = "") -> tuple[str, ...]:
    names = _axis.normalize_axis_names(axis_name)
    for n in names:
        if not isinstance(n, str) or _ops.AXIS_SEP in n or not n:
            where = f"{fn}: " if fn else ""
            raise TypeError(f"{where}axis_name must be a non-empty string or a tuple of them, got {n!r}")
    return names


def _groups(axis_index_groups: AxisIndexGroups, size: int, fn: str, equal_sizes: bool) -> tuple[list[int], int]:
    """Validate axis_index_groups; return it as the ops take it: flattened, with
    the group size (0 for groups of unequal sizes, see _ops.encode_groups)."""
    if axis_index_groups is None:
        return [], size
    try:
        groups = [[operator.index(i) for i in g] for g in axis_index_groups]
    except TypeError:
        raise ValueError(
            f"{fn}: axis_index_groups must be a list of lists of ints, got {axis_index_groups!r}"
        ) from None
    flat = [i for g in groups for i in g]
    if not groups or any(not g for g in groups) or sorted(flat) != list(range(size)):
        raise ValueError(
            f"{fn}: axis_index_groups must cover every index of the axis (size {size}) "
            f"exactly once, got {axis_index_groups!r}"
        )
    if equal_sizes and len({len(g) for g in groups}) != 1:  # the result's shape depends on the group size
        raise ValueError(f"{fn}: all axis_index_groups must have the same size, got {axis_index_groups!r}")
    return _ops.encode_groups(groups)


def _own_group_size(names: tuple[str, ...], groups: list[int], size: int, device: torch.device | None) -> torch.Tensor:
    """The size of this replica's group (groups of unequal sizes), as an int64
    scalar on ``device`` (None: the replica's): looked up by axis_index, so no
    host sync and one compiled graph for every replica."""
    members = _ops.decode_groups(groups, 0) or (tuple(range(size)),)
    sizes = [0] * size
    for g in members:
        for m in g:
            sizes[m] = len(g)
    index = _axis_index(names, device)
    table = torch.tensor(sizes, dtype=torch.int64, device=index.device)
    return table.index_select(0, index.reshape(1)).reshape(())  # vmap has a rule for it, not for take


def _canonical_axis(axis: Any, ndim: int, fn: str, arg: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{fn}: {arg} must be an int, got {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: {arg}={axis} is out of range for a tensor with {ndim} dimension(s)")
    return axis % ndim


def _as_tensor(x: Any, fn: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{fn}: expected tensors (or a pytree of tensors), got {type(x).__name__}")


# The tags of one exchange of a tree: see _ops (tree, leaf, dims).
Tags: TypeAlias = "tuple[str, int, list[int] | None]"
_BARE: Tags = ("", -1, None)


class _Leaves:
    """A collective's pytree, flattened: ``values`` in the replica's own order
    (results go back there) with their ``dtypes`` and ``shapes`` (read once:
    the reductions reuse them), ``order`` JAX's order (replicas exchange leaves
    in it), ``tree`` the description replicas compare ("" for a bare tensor)."""

    values: list[Any]
    dtypes: list[Any]
    shapes: list[torch.Size | None]
    spec: _pytree.TreeSpec
    order: tuple[int, ...]
    tree: str
    _dims: list[Any] | None  # for the first exchange

    def __init__(self, x: PyTree, prepare: Callable[[Any], Any]) -> None:
        if isinstance(x, torch.Tensor):
            v = prepare(x)
            self.values, self.spec = [v], _tree.flatten(x)[1]
            self.dtypes, self.shapes = [v.dtype], [v.shape]
            self.order, self.tree, self._dims = (0,), "", None
        else:
            values, self.spec = _pytree.tree_flatten(x)
            self.values = [None if v is None else prepare(v) for v in values]
            self.dtypes, self.shapes = _tree.dtypes_and_shapes(self.values)
            self.order, self.tree, self._dims = _tree.exchange_plan(self.spec, self.dtypes, self.shapes)

    def tags(self, leaf: int) -> Tags:
        """Tags for the exchange of leaf number ``leaf`` in JAX's order; the
        first exchange also carries every tensor leaf's dimensions."""
        if not self.tree:
            return _BARE
        dims, self._dims = self._dims, None
        return self.tree, leaf, dims

    def unflatten(self) -> PyTree:
        return _pytree.tree_unflatten(self.values, self.spec)


def _map_leaves(fn: Callable[[Any, Tags], Any], x: PyTree, prepare: Callable[[Any], Any]) -> PyTree:
    """fn(leaf, tags) for every leaf but None, exchanged in JAX's order."""
    leaves = _Leaves(x, prepare)
    for k, i in enumerate(leaves.order):
        if leaves.values[i] is not None:
            leaves.values[i] = fn(leaves.values[i], leaves.tags(k))
    return leaves.unflatten()


def _blocks_first(v: torch.Tensor, d: int, g: int, tiled: bool, fn: str, arg: str) -> torch.Tensor:
    """v cut along dimension d into g blocks, the block index moved to the
    front: (g, ...). Untiled, dimension d must have size g and disappears."""
    n = v.shape[d]
    if tiled:
        if n % g:
            raise ValueError(f"{fn}: tiled {arg} {d} has size {n}, not divisible by the axis size {g}")
        return v.unflatten(d, (g, n // g)).movedim(d, 0)
    if n != g:
        raise ValueError(f"{fn}: {arg} {d} has size {n} but the axis size is {g}; they must be equal unless tiled=True")
    return v.movedim(d, 0)


def _size(axis_name: AxisName) -> int:
    return _axis.static_axis_size(_names(axis_name))


# -- one graph node per collective under a stacked capture -----------------------------
# Dynamo interprets Python bytecode about a hundred times slower than Python runs it:
# tracing a psum's argument checks and tree handling cost ~40 ms of a capture, a pmean
# of six leaves ~200 ms. Under a stacked or lockstep capture a collective of a tensor
# (or of a flat dict, list or tuple of them) with plain arguments is one node of
# Dynamo's graph instead; the backend's make_fx runs the same Python (under the replica
# level, stacked) at Python's speed, so its graph is the same op for op. Everything it
# reads besides its arguments (the axis, the stacking mode) is fixed per capture, as before.
_COLLECTIVES: dict[str, Callable[..., Any]] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def _one_node_when_stacking(collective: _F) -> _F:
    name = collective.__name__
    _COLLECTIVES[name] = collective

    @functools.wraps(collective)
    def traced(x: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and _ops._capturing_for_stacking() and _plain(args) and _plain(kwargs):
            if isinstance(x, torch.Tensor):
                return _collective_node(name, x, args, kwargs)
            if _flat_tensors(x):
                out = _collective_node(name, x, args, kwargs)
                return dict(zip(x, out)) if type(x) is dict else type(x)(out)
        return collective(x, *args, **kwargs)

    return cast("_F", traced)


def _plain(value: Any) -> bool:
    """Whether ``value`` is a constant Dynamo passes to a graph node as it is."""
    if value is None or type(value) in (str, int, bool):
        return True
    if type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(_plain(v) for v in value.values())
    return False


def _flat_tensors(x: Any) -> bool:
    """A non-empty dict (with str or int keys: the graph's code spells them), list or tuple
    (exactly) of tensors."""
    if type(x) is dict and not all(type(k) in (str, int) for k in x):
        return False
    values = x.values() if type(x) is dict else x if type(x) in (list, tuple) else ()
    return len(values) > 0 and all(isinstance(v, torch.Tensor) for v in values)


# Set while a _collective_node's Python runs: at Dynamo's fake run, in the stacked
# backend, and when the stacked autograd traces its backward later (outside Dynamo).
_in_node = threading.local()


@torch._dynamo.assume_constant_result
def _inside_collective_node() -> bool:
    return getattr(_in_node, "depth", 0) > 0


@torch._dynamo.allow_in_graph
def _collective_node(name: str, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The collective ``name`` of x: a tensor, or the leaves of a flat container in its order.
    (FX hands a graph node's containers over as its immutable kinds: made plain again.)"""
    _in_node.depth = getattr(_in_node, "depth", 0) + 1
    try:
        if isinstance(x, torch.Tensor):
            return _COLLECTIVES[name](x, *args, **kwargs)
        if isinstance(x, dict):
            out = _COLLECTIVES[name](dict(x), *args, **kwargs)
            return tuple(out[k] for k in x)
        return tuple(_COLLECTIVES[name](tuple(x) if isinstance(x, tuple) else list(x), *args, **kwargs))
    finally:
        _in_node.depth -= 1


# -- reductions -------------------------------------------------------------------------
def _reduce(
    x: PyTree, axis_name: AxisName, op: str, axis_index_groups: AxisIndexGroups, fn: str, *, mean: bool = False
) -> PyTree:
    """The reduction of x; with ``mean``, the sum divided by the replica's group
    size (a tensor for groups of unequal sizes: it differs between replicas;
    made only when needed), one division per flat buffer rather than per leaf."""
    names = _names(axis_name, fn)
    axes = _ops.encode_axes(names)
    size = _size(names)
    groups, group_size = _groups(axis_index_groups, size, fn, equal_sizes=False)
    known: list[int | torch.Tensor] = []

    def replica_group_size(like: Any) -> int | torch.Tensor:
        if not known:
            if group_size:
                known.append(group_size)
            else:
                on = like.device if isinstance(like, torch.Tensor) else first_tensor_device()
                known.append(_own_group_size(names, groups, size, on))
        return known[0]

    def finish(v: Any) -> Any:
        if not mean:
            return v
        n = replica_group_size(v)
        if isinstance(v, torch.Tensor):
            return torch.true_divide(v, n.to(v.device) if isinstance(n, torch.Tensor) else n)
        return v / n

    numbers_rule = _numbers_rule(names)
    as_tensors: list[torch.Tensor] = []  # numbers reduced as 0-dim tensors ("tensor" rule)

    def prepare(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            if op != "sum" and isinstance(v, numbers.Complex) and not isinstance(v, numbers.Real):
                # (on every executor: a capture's constant is never exchanged, so nothing else would say it)
                raise TypeError(f"{fn}: complex numbers have no order; p{op} is undefined for them")
            if not isinstance(v, (bool, numbers.Number)):
                v = _as_tensor(v, fn)
            elif numbers_rule == "tensor" or (numbers_rule == "lockstep" and not _constant_in_trace(v)):
                # On the replica's device, not the default one (``with torch.device("meta")``).
                device = _axis.physical_device(names)
                v = torch.scalar_tensor(v, dtype=number_dtype(v, op, mean), device=device)  # type: ignore[arg-type]
                as_tensors.append(v)
            else:
                return v
        if op == "sum" and v.dtype == torch.bool:
            v = v.to(torch.int64)  # as jnp.sum: booleans count
        if op != "sum" and v.is_complex():
            raise TypeError(f"{fn}: complex tensors have no order; p{op} is undefined for {v.dtype}")
        _check_reducible(v, op, fn)
        return v

    leaves = _Leaves(x, prepare)
    values, shapes = leaves.values, leaves.shapes
    as_tensors_at = [j for j, v in enumerate(values) if any(v is t for t in as_tensors)]

    def first_tensor_device() -> torch.device | None:
        """Where a group size for constants goes: the tree's first tensor's device (None: the replica's)."""
        return next((v.device for v in values if isinstance(v, torch.Tensor)), None)

    # One collective per dtype and device, not one per leaf: a pmean over a
    # model's gradients costs one rendezvous (the leaves travel as one flat
    # buffer, in JAX's leaf order, and are split again, differentiably). The
    # stacked executor has no rendezvous to save, and there the flat buffer
    # would cost two copies of every replica's leaves: one collective per leaf.
    per_leaf = _inside_collective_node() or (torch.compiler.is_compiling() and _ops._capturing_for_stacking())
    numbers_at: list[int] = []
    buckets: dict[tuple[Any, ...], list[int]] = {}
    first_leaf: dict[tuple[Any, ...], int] = {}
    for k, j in enumerate(leaves.order):
        v = values[j]
        if isinstance(v, torch.Tensor):
            key = (j,) if per_leaf else (leaves.dtypes[j], v.device)
            first_leaf.setdefault(key, k)
            buckets.setdefault(key, []).append(j)
        elif v is not None and numbers_rule == "exchange":
            numbers_at.append(j)
        elif v is not None:
            values[j] = finish(v * replica_group_size(v)) if op == "sum" else v
    if numbers_at:
        members = None  # (every replica of the axis)
        if axis_index_groups is not None:  # (all_gather takes groups of one size only: the axis, then the group)
            me = int(axis_index(axis_name))
            members = next([operator.index(i) for i in g] for g in axis_index_groups if me in g)
        gather = functools.partial(all_gather, axis_name=axis_name)
        device = _axis.physical_device(names)  # (not the default device: ``with torch.device("meta")``)
        reduced_numbers = reduce_numbers([values[j] for j in numbers_at], op, mean, fn, gather, members, device)
        for j, number in zip(numbers_at, reduced_numbers):
            values[j] = number
    for key, idx in buckets.items():
        tags = leaves.tags(first_leaf[key])
        if len(idx) == 1:
            (j,) = idx
            values[j] = finish(_ops.call("all_reduce", values[j], op, axes, groups, group_size, *tags))
            continue
        flat = torch.cat([values[j].reshape(-1) for j in idx])
        # A leaf that autograd does not track comes back untracked, as it would alone (the flat
        # buffer requires grad when any leaf does). Not under a torch.func transform: there
        # requires_grad speaks for the innermost level only, and a detach would cut the outer
        # levels too (a zero mixed derivative of grad of grad); the piece's gradient at the inner
        # level is zero anyway. (Not by bucketing tracked and untracked leaves apart: replicas
        # may differ in which leaves autograd tracks, and must send one buffer alike.)
        untracked: set[int] = set()
        if flat.requires_grad and torch._C._functorch.peek_interpreter_stack() is None:
            tracked = [values[j].requires_grad for j in idx]
            if not torch.compiler.is_compiling():
                # Only leaves no replica tracks: where another replica's is tracked, this replica's
                # result depends on it too, and its cotangent must reach that replica (a detach lost
                # it: a gradient of that replica's share only). One small exchange of the mask.
                mask = torch.tensor(tracked, dtype=torch.int32, device=flat.device)
                tracked = _ops.call("all_reduce", mask, "max", axes, groups, group_size).tolist()
            untracked = {j for j, t in zip(idx, tracked) if not t}
        reduced = finish(_ops.call("all_reduce", flat, op, axes, groups, group_size, *tags))
        sizes = cast("list[torch.Size]", [shapes[j] for j in idx])  # tensor leaves: no None
        for j, piece, shape in zip(idx, reduced.split([s.numel() for s in sizes]), sizes):
            values[j] = piece.view(shape).detach() if j in untracked else piece.view(shape)
    for j in as_tensors_at:
        values[j] = values[j].item()
    return leaves.unflatten()


def _constant_in_trace(v: Any) -> bool:
    """Whether Dynamo traces number ``v`` as a constant: a symbol (the lockstep
    executor's integer ``.item()``) compares to itself as a symbolic bool, not as
    True (NaN, unequal to itself, is taken for a symbol: reduced as a tensor, still
    right). In the lockstep executor's one trace a constant is every replica's;
    reduced as a tensor, ``psum(1, "i")`` would become a data-dependent value.
    (``isinstance(v, torch.SymInt)`` is False under Dynamo, which calls it an int.)
    A test checks it on the installed torch."""
    return (v == v) is True


def _numbers_rule(names: tuple[str, ...]) -> str:
    """How a reduction treats Python numbers (``_number_reductions``): "exchange" where
    each replica's own Python runs (the threads: ``loss.item()`` is each one's own);
    "constant" where one run of the Python serves every replica, whose numbers are
    then constants (n * v, as JAX): the stacked executor's capture, and the replicas
    stacked under vmap (``_stacked_collectives``); "tensor" in other traces (a replica's
    own torch.compile specialising on its values): reduced as 0-dim tensors by the
    graph's collective, numbers again after; "lockstep" in the lockstep executor's one
    trace: its symbols (an integer ``.item()``) as "tensor", its constants as "constant"."""
    if not torch.compiler.is_compiling():
        # (A collective node's leaves are tensors; a stacked level's Python runs once for all.)
        return "constant" if _inside_collective_node() or _axis.bound_level(names) is not None else "exchange"
    if _ops._capturing_for_lockstep():
        return "lockstep"
    return "constant" if _ops._capturing_for_stacking() else "tensor"


# A dtype that holds every value of one torch cannot reduce, for the message.
_WIDER = {
    torch.uint16: " (int32 holds every uint16)",
    torch.uint32: " (int64 holds every uint32)",
    **{
        t: " (float32 holds every value of the float8 types)"
        for t in (
            getattr(torch, name)
            for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
            if hasattr(torch, name)
        )
    },
}


def _check_reducible(v: torch.Tensor, op: str, fn: str) -> None:
    """A TypeError naming the collective for a dtype torch cannot reduce (uint32 on the
    CPU), rather than torch's own error from inside the exchange."""
    problem = reduction_problem(op, v.dtype, v.device)
    # (Across processes the process group's backend refuses, after the processes compared
    # their collectives: a dtype on one process only is then a mismatch on every process.)
    if problem is not None and _devices.process_count() == 1:
        raise TypeError(
            f"{fn}: torch cannot {op} {v.dtype} tensors on {v.device.type} ({problem}); cast to a "
            f"dtype it reduces first{_WIDER.get(v.dtype, '')}"
        )


@_one_node_when_stacking
def psum(x: PyTree, axis_name: AxisName, *, axis_index_groups: AxisIndexGroups = None) -> PyTree:
    """All-reduce sum of ``x`` over the named axis (booleans are summed as ints)."""
    return _reduce(x, axis_name, "sum", axis_index_groups, "psum")


@_one_node_when_stacking
def pmean(x: PyTree, axis_name: AxisName, *, axis_index_groups: AxisIndexGroups = None) -> PyTree:
    """All-reduce mean; integer and boolean inputs give floating results."""
    return _reduce(x, axis_name, "sum", axis_index_groups, "pmean", mean=True)


@_one_node_when_stacking
def pmax(x: PyTree, axis_name: AxisName, *, axis_index_groups: AxisIndexGroups = None) -> PyTree:
    """All-reduce maximum (not differentiable, as in JAX)."""
    return _reduce(x, axis_name, "max", axis_index_groups, "pmax")


@_one_node_when_stacking
def pmin(x: PyTree, axis_name: AxisName, *, axis_index_groups: AxisIndexGroups = None) -> PyTree:
    """All-reduce minimum (not differentiable, as in JAX)."""
    return _reduce(x, axis_name, "min", axis_index_groups, "pmin")


# -- gathers and scatters ---------------------------------------------------------------
@_one_node_when_stacking
def all_gather(
    x: PyTree, axis_name: AxisName, *, axis_index_groups: AxisIndexGroups = None, axis: int = 0, tiled: bool = False
) -> PyTree:
    """Gather ``x`` from every replica of the group: stacked on a new ``axis``,
    or concatenated along ``axis`` when ``tiled``."""
    names = _names(axis_name, "all_gather")
    axes = _ops.encode_axes(names)
    groups, g = _groups(axis_index_groups, _size(names), "all_gather", equal_sizes=True)

    def prepare(v: Any) -> torch.Tensor:
        v = _as_tensor(v, "all_gather")
        if tiled and v.ndim == 0:
            raise ValueError("all_gather: tiled=True needs a tensor with at least one dimension")
        return v

    def leaf(v: torch.Tensor, tags: Tags) -> torch.Tensor:
        a = _canonical_axis(axis, v.ndim if tiled else v.ndim + 1, "all_gather", "axis")
        stacked = _ops.call("all_gather", v, axes, groups, g, *tags)  # (g, *v.shape)
        out = stacked.movedim(0, a)
        return out.flatten(a, a + 1) if tiled else out

    return _map_leaves(leaf, x, prepare)


@_one_node_when_stacking
def psum_scatter(
    x: PyTree,
    axis_name: AxisName,
    *,
    scatter_dimension: int = 0,
    axis_index_groups: AxisIndexGroups = None,
    tiled: bool = False,
) -> PyTree:
    """Sum over the group, then keep this replica's block of ``scatter_dimension``
    (untiled: that dimension must equal the group size and disappears)."""
    names = _names(axis_name, "psum_scatter")
    axes = _ops.encode_axes(names)
    groups, g = _groups(axis_index_groups, _size(names), "psum_scatter", equal_sizes=True)

    def prepare(v: Any) -> torch.Tensor:
        v = _as_tensor(v, "psum_scatter")
        if v.ndim == 0:
            raise ValueError("psum_scatter: x must have at least one dimension to scatter")
        if v.dtype == torch.bool:
            return v.to(torch.int64)
        _check_reducible(v, "sum", "psum_scatter")
        return v

    def leaf(v: torch.Tensor, tags: Tags) -> torch.Tensor:
        d = _canonical_axis(scatter_dimension, v.ndim, "psum_scatter", "scatter_dimension")
        blocks = _blocks_first(v, d, g, tiled, "psum_scatter", "scatter_dimension")
        return _ops.call("reduce_scatter", blocks, "sum", axes, groups, g, *tags)

    return _map_leaves(leaf, x, prepare)


@_one_node_when_stacking
def all_to_all(
    x: PyTree,
    axis_name: AxisName,
    split_axis: int,
    concat_axis: int,
    *,
    axis_index_groups: AxisIndexGroups = None,
    tiled: bool = False,
) -> PyTree:
    """Split ``split_axis`` into one block per replica, send block j to replica j,
    and put the received blocks along ``concat_axis`` (stacked on a new axis
    untiled, concatenated when ``tiled``), as ``jax.lax.all_to_all``."""
    names = _names(axis_name, "all_to_all")
    axes = _ops.encode_axes(names)
    groups, g = _groups(axis_index_groups, _size(names), "all_to_all", equal_sizes=True)

    def prepare(v: Any) -> torch.Tensor:
        v = _as_tensor(v, "all_to_all")
        if v.ndim == 0:
            raise ValueError("all_to_all: x must have at least one dimension to split")
        return v

    def leaf(v: torch.Tensor, tags: Tags) -> torch.Tensor:
        s = _canonical_axis(split_axis, v.ndim, "all_to_all", "split_axis")
        c = _canonical_axis(concat_axis, v.ndim, "all_to_all", "concat_axis")
        blocks = _blocks_first(v, s, g, tiled, "all_to_all", "split_axis")
        received = _ops.call("all_to_all", blocks, axes, groups, g, *tags)
        # received[j]: member j's block for this replica, (g, ...)
        return received.movedim(0, c).flatten(c, c + 1) if tiled else received.movedim(0, c)

    return _map_leaves(leaf, x, prepare)


@_one_node_when_stacking
def pswapaxes(x: PyTree, axis_name: AxisName, axis: int, *, axis_index_groups: AxisIndexGroups = None) -> PyTree:
    """Swap the mapped axis with the positional ``axis``: all_to_all(x, axis_name, axis, axis)."""
    for v in _pytree.tree_leaves(x):
        if isinstance(v, torch.Tensor):
            _canonical_axis(axis, max(v.ndim, 1), "pswapaxes", "axis")
    return all_to_all(x, axis_name, axis, axis, axis_index_groups=axis_index_groups)


# -- permutations -----------------------------------------------------------------------
@_one_node_when_stacking
def ppermute(x: PyTree, axis_name: AxisName, perm: Sequence[tuple[int, int]]) -> PyTree:
    """Send ``x`` from each ``source`` to its ``destination`` for every pair in
    ``perm``; replicas that no pair sends to receive zeros."""
    return _permute(x, axis_name, perm, "ppermute")


def _permute(x: PyTree, axis_name: AxisName, perm: Sequence[tuple[int, int]], fn: str) -> PyTree:
    """ppermute, its errors naming ``fn`` (the collective the user called)."""
    names = _names(axis_name, fn)
    axes = _ops.encode_axes(names)
    size = _size(names)
    try:
        pairs = [(operator.index(s), operator.index(d)) for s, d in perm]  # integers only: 0.5 is no index
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: perm must be a list of (source, destination) pairs of integers, got {perm!r}"
        ) from None
    for s, d in pairs:
        if not (0 <= s < size and 0 <= d < size):
            raise ValueError(f"{fn}: pair ({s}, {d}) in perm is out of range for axis size {size}")
    sources, dests = [s for s, _ in pairs], [d for _, d in pairs]
    if len(set(sources)) != len(sources) or len(set(dests)) != len(dests):
        raise ValueError(f"{fn}: perm has a repeated source or destination: {perm!r}")
    flat = [v for p in pairs for v in p]
    return _map_leaves(lambda v, tags: _ops.call("permute", v, axes, flat, *tags), x, lambda v: _as_tensor(v, fn))


@_one_node_when_stacking
def pshuffle(x: PyTree, axis_name: AxisName, perm: Sequence[int]) -> PyTree:
    """Replica i receives ``x`` from replica ``perm[i]``."""
    try:
        perm = [operator.index(p) for p in perm]
    except TypeError:
        raise ValueError(f"pshuffle: perm must be a permutation of range({_size(axis_name)}), got {perm!r}") from None
    if sorted(perm) != list(range(len(perm))) or len(perm) != _size(axis_name):
        raise ValueError(f"pshuffle: perm must be a permutation of range({_size(axis_name)}), got {perm!r}")
    return _permute(x, axis_name, [(src, dst) for dst, src in enumerate(perm)], "pshuffle")


# -- axis queries -----------------------------------------------------------------------
def axis_index(axis_name: AxisName) -> torch.Tensor:
    """This replica's index along the named axis (row-major over a tuple of
    names), as an int64 scalar tensor on the replica's device."""
    if torch.compiler.is_compiling() and _ops._capturing_for_stacking() and _plain(axis_name):
        return _axis_index_node(axis_name)  # see _one_node_when_stacking
    return _axis_index(_names(axis_name, "axis_index"), None)


@torch._dynamo.allow_in_graph
def _axis_index_node(axis_name: AxisName) -> torch.Tensor:
    names = _names(axis_name, "axis_index")
    # Run by the stacked backend under the replica level (and no axis frame): each replica's own index.
    level = _axis.bound_level(names)
    return _stacked.axis_index_batched(level) if level is not None else _axis_index(names, None)


def _stacked_level(names: tuple[str, ...]) -> _axis.ReplicaLevel | None:
    """The replica vmap level of these axes, when replicas run stacked (never compiled yet)."""
    return None if torch.compiler.is_compiling() else _axis.bound_level(names)


def _axis_index(names: tuple[str, ...], device: torch.device | None) -> torch.Tensor:
    """axis_index on ``device``; on stacked replicas, every replica's own index.
    With no tensor to take a device from (None), this is the one place a trace
    reads the replica's physical device: a constant per compiled program
    (_compile.py), and an argument of the op that a runner can rewrite."""
    level = _stacked_level(names)
    if level is not None:
        return _stacked.axis_index_batched(level)
    if device is None:
        device = torch.device(_axis.physical_device(names))
    if torch.compiler.is_compiling() and _ops._capturing_for_stacking():
        return _ops.opaque_axis_index(_ops.encode_axes(names), device)
    return _ops.OPS.axis_index.default(_ops.encode_axes(names), device)


def axis_size(axis_name: AxisName) -> int:
    """The size of the named axis (the product over a tuple of names)."""
    return _size(axis_name)
