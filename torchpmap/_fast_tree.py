"""Structure keys: a cheaper stand-in for torch's TreeSpec on a call's hot path.

Every call flattens its arguments (to key its plan) and its outputs (to wrap
them), and torch.utils._pytree spends 10-30 us a call on that, more with a cold
cache: it builds a TreeSpec object per node, and hashing or comparing one walks
it in Python. The trees calls pass are nearly always tuples, lists and dicts of
tensors and numbers. For those, ``flatten`` gives the leaves in torch's order
and a nested tuple that stands for the structure (hashed and compared in C).
Anything else (a namedtuple, an OrderedDict, a registered class, an object
torch's pytree might know) gives None, and the caller uses torch's pytree, so
the two never disagree: two trees get equal keys exactly when torch gives
them equal TreeSpecs and their dict keys have equal ``_constant_signature``s.

Key types matter: torch compares a spec's dict keys with ``==``, so ``{1: x}``,
``{True: x}``, ``{1.0: x}``, ``{(1,): x}`` and ``{(True,): x}``, or an IntEnum
member's dict, have equal specs, and a capture found through such a key would
serve one for the other. ``spec_signature`` gives the same distinction for a TreeSpec.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import torch
from torch.utils._pytree import SUPPORTED_NODES, TreeSpec, tree_unflatten

from ._constant_signature import keys_signature

# A structure key: _LEAF, or a tuple (_TUPLE | _LIST, *children) or (_DICT, keys, keys' signature, *children).
Structure: TypeAlias = "int | tuple[Any, ...]"
_LEAF, _TUPLE, _LIST, _DICT = range(4)
LEAF: Structure = _LEAF  # the structure of a tree that is one leaf

# Leaf types torch's pytree treats as leaves unless someone registers them as nodes
# (None is a leaf there too).
_SCALARS = frozenset({int, float, bool, complex, str, bytes, type(None)})
_ARRAYS = (torch.Tensor, np.ndarray, np.generic)


_CONTAINERS = (tuple, list, dict)  # exactly these types: subclasses go to torch's pytree


class _Unknown(Exception):
    """A node ``flatten`` does not handle: the caller uses torch's pytree."""


def flatten(tree: Any) -> tuple[list[Any], Structure] | None:
    """torch's ``tree_flatten(tree)`` leaves and a structure key, or None when
    ``tree`` holds anything but tuples, lists and dicts (exactly those types) of
    tensors, numpy arrays and scalars, None, and Python numbers, strings and bytes."""
    leaves: list[Any] = []
    try:
        if type(tree) in _CONTAINERS:
            return leaves, _walk(tree, leaves)
        _walk((tree,), leaves)  # a leaf, checked as a tuple's only child
    except _Unknown:
        return None
    return leaves, _LEAF


def _walk(node: tuple[Any, ...] | list[Any] | dict[Any, Any], leaves: list[Any]) -> Structure:
    kind = type(node)
    if kind is dict:
        # torch flattens a dict in insertion order, and its spec keeps the keys in that order.
        keys = tuple(node)
        structure: list[Any] = [_DICT, keys, keys_signature(keys)]
        children: Any = node.values()  # type: ignore[union-attr]  # a dict here
    else:
        structure, children = [_TUPLE if kind is tuple else _LIST], node
    for child in children:  # leaves inline: a call per leaf would be most of the time
        ck = type(child)
        if ck in _CONTAINERS:
            structure.append(_walk(child, leaves))
        elif ck in SUPPORTED_NODES or not (ck in _SCALARS or issubclass(ck, _ARRAYS)):
            raise _Unknown
        else:
            leaves.append(child)
            structure.append(_LEAF)
    return tuple(structure)


def unflatten(leaves: list[Any], structure: Structure | TreeSpec) -> Any:
    """The tree of ``structure`` (a key from ``flatten``, or a TreeSpec) holding ``leaves``."""
    if isinstance(structure, TreeSpec):
        return tree_unflatten(leaves, structure)
    it = iter(leaves)
    try:
        tree = _build(structure, it)
    except StopIteration:
        raise ValueError("unflatten: fewer leaves than the structure holds") from None
    if next(it, it) is not it:
        raise ValueError("unflatten: more leaves than the structure holds")
    return tree


def _build(structure: Structure, it: Any) -> Any:
    if type(structure) is int:  # _LEAF
        return next(it)
    assert isinstance(structure, tuple)
    tag = structure[0]
    if tag == _TUPLE:
        return tuple([_build(child, it) for child in structure[1:]])
    if tag == _LIST:
        return [_build(child, it) for child in structure[1:]]
    keys = structure[1]
    return dict(zip(keys, [_build(child, it) for child in structure[3:]]))
