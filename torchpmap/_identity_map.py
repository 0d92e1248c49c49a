"""A weak mapping keyed by object identity, not equality.

``weakref.WeakKeyDictionary`` finds a key by ``==`` and ``hash``: two callables
that compare equal (a frozen dataclass with ``__call__``: ``Affine(2)`` and
``Affine(2.0)``) would share what is cached per function, and one would run the
other's capture. Captures are per object.
"""

from __future__ import annotations

import weakref
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class WeakIdentityMap(Generic[V]):
    """Values per object, by identity; an entry leaves with its object. Raises
    TypeError for an object that cannot be weakly referenced."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[Any], V]] = {}

    def get(self, obj: Any) -> V | None:
        item = self._items.get(id(obj))
        return item[1] if item is not None and item[0]() is obj else None

    def setdefault(self, obj: Any, value: V) -> V:
        key = id(obj)
        item = self._items.get(key)
        if item is not None and item[0]() is obj:
            return item[1]

        def forget(ref: weakref.ref[Any]) -> None:
            current = self._items.get(key)
            if current is not None and current[0] is ref:  # (the id may be another object's by now)
                del self._items[key]

        self._items[key] = (weakref.ref(obj, forget), value)
        return value

    def __getitem__(self, obj: Any) -> V:
        item = self._items.get(id(obj))
        if item is None or item[0]() is not obj:
            raise KeyError(obj)
        return item[1]

    def __contains__(self, obj: Any) -> bool:
        item = self._items.get(id(obj))
        return item is not None and item[0]() is obj

    def __len__(self) -> int:
        return len(self._items)
