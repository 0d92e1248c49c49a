"""What ``==`` leaves out of a constant, and a function may still see.

Plans and captures are looked up by keys that hold a call's constants (static
arguments, Python values passed broadcast, dict keys and other pytree
contexts), and Dynamo guards constants with ``==``. But ``1 == True == 1.0``,
``(1,) == (True,)``, ``frozenset({1}) == frozenset({1.0})`` and
``-0.0 == 0.0``, while ``torch.tensor(k)``'s dtype, ``math.copysign`` or
``1 / s`` tell them apart. A key that holds ``signature(value)`` besides the
value never serves one of them for another. It is built from types and the
signs of float zeros only, never from values: a constant that changes every
call (a learning rate) gives the same signature each time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch.utils._pytree import TreeSpec

_CONTAINERS = (tuple, list, frozenset, set)


def signature(value: Any, _inside: tuple[int, ...] = ()) -> Any:
    """``value``'s type, with the types (and float zero signs) of what it holds:
    tuple, list and set elements, complex parts, dataclass fields that ``==``
    compares. Any other value gives its type alone."""
    kind = type(value)
    if isinstance(value, float):
        return (kind, math.copysign(1.0, value) < 0) if value == 0 else kind
    if isinstance(value, complex):
        return (kind, signature(value.real), signature(value.imag))
    if isinstance(value, _CONTAINERS):
        return (kind, tuple([signature(v, _inside) for v in value]))
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and id(value) not in _inside:
        inside = (*_inside, id(value))  # (a cycle back to it ends here)
        fields = [f for f in dataclasses.fields(value) if f.compare and hasattr(value, f.name)]
        return (kind, tuple([signature(getattr(value, f.name), inside) for f in fields]))
    return kind


def spec_signature(spec: TreeSpec | None) -> Any:
    """The signatures of ``spec``'s node contexts (dict keys among them), nested as
    the spec is: torch's TreeSpec compares contexts with ``==``."""
    if spec is None or spec.is_leaf():
        return None
    context = spec.context
    # A dict's or an OrderedDict's context is its list of keys: the usual str keys cost a type each.
    own = keys_signature(tuple(context)) if type(context) is list else signature(context)
    return (own, *[None if child.is_leaf() else spec_signature(child) for child in spec.children()])


# Dict keys whose type says all: nothing of theirs that == ignores.
_PLAIN_KEYS = frozenset({str, int, bool, bytes})


def keys_signature(keys: tuple[Any, ...]) -> tuple[Any, ...]:
    """``signature`` of each of a dict's keys, cheaply for the usual str and int keys."""
    kinds = tuple(map(type, keys))
    return kinds if _PLAIN_KEYS.issuperset(kinds) else tuple(map(signature, keys))
