"""Pytree helpers for pmap: axis-spec prefixes, readable leaf paths, and the
order and description of a collective's leaves."""

from __future__ import annotations

import collections
import functools
import numbers
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias

import torch
from torch.utils._pytree import KeyEntry, PyTree, SequenceKey, TreeSpec, keystr, tree_flatten, tree_flatten_with_path

# An in_axes/out_axes entry: None, or an int (any numbers.Integral but bool).
AxisSpec: TypeAlias = "int | None"

_MISSING = object()


def is_axis_spec(v: Any) -> bool:
    return v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def broadcast_prefix(prefix: PyTree, tree: PyTree, prefix_name: str, tree_name: str) -> list[AxisSpec]:
    """One entry of the ``prefix`` tree for every leaf of ``tree``.

    ``prefix`` is an axis spec (int or None) or a pytree whose structure is a
    prefix of ``tree``'s (as JAX's in_axes/out_axes). ``prefix_name`` and
    ``tree_name`` spell the two roots in error messages (``"in_axes[1]"``,
    ``"args[1]"``), so a mismatch names the exact path where it happens.
    """
    out: list[AxisSpec] = []
    _broadcast(prefix, tree, prefix_name, tree_name, (prefix_name, tree_name), out)
    return out


def _broadcast(
    prefix: PyTree, tree: PyTree, pname: str, tname: str, roots: tuple[str, str], out: list[AxisSpec]
) -> None:
    if is_axis_spec(prefix):
        out.extend([prefix] * tree_flatten(tree)[1].num_leaves)
        return
    p_items = _children(prefix)
    if p_items is None:
        raise TypeError(f"pmap: {roots[0]} must be ints or None (or a pytree of them), got {prefix!r} at {pname}")
    t_items = _children(tree)

    def mismatch() -> ValueError:
        # Same length, other container: say what differs (a list prefix for a tuple, say).
        kinds = (
            f" (containers must be of the same type: use a {type(tree).__name__})"
            if t_items is not None and type(prefix) is not type(tree)
            else ""
        )
        return ValueError(
            f"pmap: {roots[0]} must be a pytree prefix of {roots[1]}, but {pname} is "
            f"{_describe(prefix)} while {tname} is {_describe(tree)}{kinds}"
        )

    if t_items is None or type(prefix) is not type(tree):
        raise mismatch()
    # Children are matched by key, not by position: a registered dataclass
    # leaves its None-valued fields out of its children, so in_axes=P(w=0, b=None)
    # has one child where the argument P(w=x, b=y) has two. A key that only one
    # side has is fine when the other side's value there is None (JAX treats a
    # None in in_axes/out_axes as a leaf, and a None argument holds no data).
    p_map = dict(p_items)
    t_keys = {k for k, _ in t_items}
    for k in p_map:
        if k not in t_keys and _get(k, tree) is not None:
            raise mismatch()
    for k, child in t_items:
        sub = p_map.get(k, _MISSING)
        if sub is _MISSING:
            sub = _get(k, prefix)
            if sub is not None:
                raise mismatch()
        _broadcast(sub, child, pname + keystr((k,)), tname + keystr((k,)), roots, out)


def _children(node: PyTree) -> list[tuple[KeyEntry, PyTree]] | None:
    """``(key, child)`` for every child of a pytree node; None for a leaf."""
    children, spec = tree_flatten(node, is_leaf=lambda v: v is not node)
    if spec.is_leaf():
        return None
    try:
        return [(path[0], c) for path, c in tree_flatten_with_path(node, is_leaf=lambda v: v is not node)[0]]
    except ValueError:
        # Registered with torch.utils._pytree.register_pytree_node but without a
        # flatten_with_keys_fn: number the children instead of naming them.
        return [(SequenceKey(i), c) for i, c in enumerate(children)]


def _get(key: KeyEntry, node: PyTree) -> Any:
    try:
        return key.get(node)
    except Exception:
        return _MISSING


def _describe(v: Any) -> str:
    if isinstance(v, dict):
        return f"a {type(v).__name__} with keys {list(v)}"
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return f"a {type(v).__name__} namedtuple"
    if isinstance(v, (tuple, list)):
        return f"a {type(v).__name__} of length {len(v)}"
    if is_axis_spec(v):
        return repr(v)
    return f"a {type(v).__name__}"


def leaf_paths(tree: PyTree, root: str) -> list[str]:
    """A readable path (``args[0]['w']``) for every leaf of ``tree``, in
    tree_flatten order."""
    items = _children(tree)
    if items is None:
        return [root]
    return [p for k, child in items for p in leaf_paths(child, root + keystr((k,)))]


_LEAF = tree_flatten(0)[1]


def flatten(tree: PyTree) -> tuple[list[Any], TreeSpec]:
    """tree_flatten, with the common single-tensor case made cheap."""
    if isinstance(tree, torch.Tensor):
        return [tree], _LEAF
    return tree_flatten(tree)


# -- collectives over pytrees -------------------------------------------------------------
# What a collective knows of a leaf before it exchanges it: (dtype, ndim) for a
# tensor, None for None, the type of a Python constant.
LeafKind: TypeAlias = "tuple[torch.dtype, int] | type | None"

# Where a tensor leaf's dimensions go in a tree description (render_tree fills them
# in). repr() escapes it in dict keys, so it only ever marks a dimension.
DIM = "\x00"


def leaf_kind(v: Any) -> LeafKind:
    if isinstance(v, torch.Tensor):
        return v.dtype, v.dim()
    return None if v is None else type(v)


_DTYPE = operator.attrgetter("dtype")


def dtypes_and_shapes(leaves: list[Any]) -> tuple[list[Any], list[torch.Size | None]]:
    """Every leaf's dtype and shape; for a leaf that is not a tensor, its
    LeafKind and None. Two C-level passes when every leaf is a tensor (the
    common case): reading them leaf by leaf in Python costs ~0.2 us a leaf."""
    if not torch.compiler.is_compiling():
        try:
            shapes: list[torch.Size | None] = list(map(torch.Tensor.size, leaves))  # TypeError unless all tensors
            return list(map(_DTYPE, leaves)), shapes
        except TypeError:
            pass
    kinds = [v.dtype if isinstance(v, torch.Tensor) else leaf_kind(v) for v in leaves]
    return kinds, [v.shape if isinstance(v, torch.Tensor) else None for v in leaves]


# A tree's leaf indices in JAX's order, and its description.
Layout: TypeAlias = "tuple[tuple[int, ...], str]"


class ExchangePlan(NamedTuple):
    """How replicas exchange a tree's leaves: ``order``, the leaves' indices in
    JAX's order; ``tree``, the description replicas compare (structure, leaf
    dtypes and ranks); ``dims``, every tensor leaf's dimensions in that order."""

    order: tuple[int, ...]
    tree: str
    dims: list[Any]


def exchange_plan(spec: TreeSpec, dtypes: Sequence[Any], shapes: Sequence[torch.Size | None]) -> ExchangePlan:
    """The exchange plan of a tree of structure ``spec`` whose leaves have
    ``dtypes`` and ``shapes`` (as dtypes_and_shapes gives them). JAX's order
    sorts a dict's keys, so replicas agree whatever order they built their
    dicts in. Cached: a hit costs a few microseconds whatever the tree's size.
    Under torch.compile it is traced once into constants, with the dims left
    as traced (possibly symbolic) sizes."""
    if not torch.compiler.is_compiling():
        try:
            return _cached_exchange_plan(_SpecKey(spec), tuple(dtypes), tuple(shapes))
        except TypeError:  # an unhashable size (symbolic, traced outside Dynamo)
            pass
    order, description = _layout(spec, dtypes, _ranks(shapes))
    return ExchangePlan(order, description, _dims(order, shapes))


class _SpecKey:
    """A TreeSpec as a cache key. Hashing a TreeSpec walks every node (~0.2 us a
    leaf, and a flattened tree is a new TreeSpec every time), so this hashes
    only its type and size and leaves telling structures apart to the full
    comparison on a hash match, which is cheap: leaves share one spec object."""

    __slots__ = ("spec", "_hash")

    def __init__(self, spec: TreeSpec) -> None:
        self.spec = spec
        self._hash = hash((spec.type, spec.num_nodes, spec.num_leaves))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SpecKey) and self.spec == other.spec


@functools.lru_cache(maxsize=256)
def _cached_exchange_plan(
    spec: _SpecKey, dtypes: tuple[Any, ...], shapes: tuple[torch.Size | None, ...]
) -> ExchangePlan:
    """Keyed by the leaf shapes too, so that a hit need not list the dims."""
    order, description = _cached_layout(spec, dtypes, _ranks(shapes))
    return ExchangePlan(order, description, _dims(order, shapes))


@functools.lru_cache(maxsize=256)
def _cached_layout(spec: _SpecKey, dtypes: tuple[Any, ...], ranks: tuple[int | None, ...]) -> Layout:
    """_layout, cached apart from the shapes: leaves whose sizes change from call
    to call (a varying batch) still find their tree's description (~100 us for
    100 leaves) here."""
    return _layout(spec.spec, dtypes, ranks)


def _layout(spec: TreeSpec, dtypes: Sequence[Any], ranks: Sequence[int | None]) -> Layout:
    """The leaves' order and the tree's description."""
    kinds: list[LeafKind] = [dt if r is None else (dt, r) for dt, r in zip(dtypes, ranks)]
    order: list[int] = []
    description = _describe_node(spec, 0, kinds, order)
    return tuple(order), description


def _ranks(shapes: Sequence[torch.Size | None]) -> tuple[int | None, ...]:
    return tuple(None if s is None else len(s) for s in shapes)


def _dims(order: Sequence[int], shapes: Sequence[torch.Size | None]) -> list[Any]:
    """Every tensor leaf's dimensions, in ``order``."""
    return [d for i in order for d in shapes[i] or ()]


def _describe_node(spec: TreeSpec, first: int, kinds: Sequence[LeafKind], order: list[int]) -> str:
    """Describe the subtree ``spec`` whose leaves start at index ``first``,
    appending its leaf indices to ``order`` in JAX's order."""
    if spec.is_leaf():
        order.append(first)
        return _describe_leaf(kinds[first])
    children = spec.children()
    starts = _starts(children, first)
    if spec.type is dict or spec.type is collections.defaultdict:
        keys = spec.context if spec.type is dict else spec.context[1]
        items = [repr(keys[i]) + ": " + _describe_node(children[i], starts[i], kinds, order) for i in _sorted(keys)]
        return ("{" if spec.type is dict else "defaultdict{") + ", ".join(items) + "}"
    items = [_describe_node(children[i], starts[i], kinds, order) for i in range(len(children))]
    if spec.type is list:
        return "[" + ", ".join(items) + "]"
    if spec.type is tuple:
        return "(" + ", ".join(items) + ")"
    return spec.type.__name__ + _describe_context(spec.context) + "(" + ", ".join(items) + ")"


def _sorted(keys: Sequence[Any]) -> list[int]:
    """Positions of ``keys`` in sorted order; insertion order if they do not sort
    (the description lists the keys, so replicas that disagree still fail)."""
    try:
        return sorted(range(len(keys)), key=lambda i: keys[i])
    except TypeError:
        return list(range(len(keys)))


def _describe_context(context: Any) -> str:
    """A node's context (OrderedDict keys, dataclass fields) without object
    addresses, which differ between replicas."""
    if context is None:
        return ""
    if isinstance(context, (str, int, float, bool)):
        return repr(context)
    if isinstance(context, (list, tuple)):
        return "[" + ", ".join([_describe_context(c) for c in context]) + "]"
    if isinstance(context, type):
        return context.__name__
    return type(context).__name__


def _describe_leaf(kind: LeafKind) -> str:
    if kind is None:
        return "None"
    if isinstance(kind, type):
        return kind.__name__
    dtype, ndim = kind
    return str(dtype)[len("torch.") :] + "[" + ", ".join([DIM] * ndim) + "]"


def reorder_leaves(leaves: list[Any], spec: TreeSpec, target: TreeSpec) -> list[Any] | None:
    """The leaves of a tree of structure ``spec`` in the order of ``target``'s
    leaves, when the two differ only in the insertion order of their dicts
    (one structure to JAX); None when they differ otherwise."""
    pairs: list[tuple[int, int]] = []
    if not _match_leaves(spec, target, 0, 0, pairs):
        return None
    out: list[Any] = [None] * len(leaves)
    for mine, theirs in pairs:
        out[theirs] = leaves[mine]
    return out


def _match_leaves(a: TreeSpec, b: TreeSpec, a_first: int, b_first: int, pairs: list[tuple[int, int]]) -> bool:
    """Whether a and b are one structure but for dict order; appends (leaf of
    a, leaf of b) for every leaf, matching dict entries by key."""
    if a.type is not b.type or a.num_children != b.num_children:
        return False
    if a.is_leaf():
        pairs.append((a_first, b_first))
        return True
    a_children, b_children = a.children(), b.children()
    a_starts, b_starts = _starts(a_children, a_first), _starts(b_children, b_first)
    if a.type is dict or a.type is collections.defaultdict:
        if a.type is collections.defaultdict and a.context[0] != b.context[0]:
            return False
        a_keys = a.context if a.type is dict else a.context[1]
        b_keys = b.context if b.type is dict else b.context[1]
        where = {k: j for j, k in enumerate(b_keys)}
        matches = [(i, where.get(k, -1)) for i, k in enumerate(a_keys)]
    elif a.context == b.context:
        matches = [(i, i) for i in range(len(a_children))]
    else:
        return False
    return all(
        j >= 0 and _match_leaves(a_children[i], b_children[j], a_starts[i], b_starts[j], pairs) for i, j in matches
    )


def _starts(children: list[TreeSpec], first: int) -> list[int]:
    """The index of each child's first leaf."""
    starts = []
    for child in children:
        starts.append(first)
        first += child.num_leaves
    return starts


def render_tree(tree: str, dims: Sequence[int]) -> str:
    """A tree description with its dimensions filled in ("?" where unknown)."""
    parts = tree.split(DIM)
    if len(dims) != len(parts) - 1:
        return "?".join(parts)
    return "".join(p + str(d) for p, d in zip(parts, dims)) + parts[-1]
