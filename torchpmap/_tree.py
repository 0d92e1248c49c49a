"""Pytree helpers for pmap: axis-spec prefixes and readable leaf paths."""
from __future__ import annotations

import numbers
from typing import Any

from torch.utils._pytree import TreeSpec, keystr, tree_flatten, tree_flatten_with_path


def is_axis_spec(v: Any) -> bool:
    return v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def broadcast_prefix(prefix: Any, tree: Any, what: str, tree_name: str) -> list:
    """One entry of the ``prefix`` tree for every leaf of ``tree``.

    ``prefix`` is an axis spec (int or None) or a pytree whose structure is a
    prefix of ``tree``'s (as JAX's in_axes/out_axes).
    """
    spec_leaves, spec = tree_flatten(prefix, is_leaf=is_axis_spec)
    for path, leaf in tree_flatten_with_path(prefix, is_leaf=is_axis_spec)[0]:
        if not is_axis_spec(leaf):
            raise TypeError(
                f"{what} must be ints or None (or a pytree of them), got {leaf!r} at "
                f"{what}{keystr(path)}"
            )
    try:
        subtrees = spec.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{what} is not a pytree prefix of the {tree_name}: {what} has structure "
            f"{_describe(spec)} but the {tree_name} have structure "
            f"{_describe(tree_flatten(tree)[1])} ({e})"
        ) from None
    out = []
    for axis, sub in zip(spec_leaves, subtrees):
        out.extend([axis] * tree_flatten(sub)[1].num_leaves)
    return out


def _describe(spec: TreeSpec) -> str:
    text = repr(spec).replace("\n", " ")
    return " ".join(text.split())


def leaf_paths(tree: Any, root: str) -> list[str]:
    return [root + keystr(path) for path, _ in tree_flatten_with_path(tree)[0]]
