"""Pytree helpers for pmap: axis-spec prefixes and readable leaf paths."""

from __future__ import annotations

import numbers
from typing import Any, TypeAlias

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
        return ValueError(
            f"pmap: {roots[0]} must be a pytree prefix of {roots[1]}, but {pname} is "
            f"{_describe(prefix)} while {tname} is {_describe(tree)}"
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
