"""In-place writes that read memory they write, refused in a batched graph.

Eagerly, ``x[1:] += x[:-1]`` on a contiguous row raises ("some elements of the
input tensor and the written-to tensor refer to a single memory location"), and
``x.mul_(x[:, :1])`` runs in the kernel's element order. Batched over the
replicas, the same operands are non-contiguous (n, ...) views, for which ATen's
overlap check gives up ("too hard to tell"): the op runs and smears the row (a
running sum where eager refuses), or runs in another order. So a traced batched
graph in which an op writes an argument sharing an element with another argument
it reads, in another layout, stops the capture: the threads executor runs the
call eagerly and raises or computes as PyTorch does. (Two different inputs that
share memory are the call's, not the graph's: the stacked executor checks them on
every call.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ._sharded import _storage_key
from ._view_roots import view_root

# Above this many storage elements between two views, sharing is assumed (the check
# takes a flag per element: 256 MB).
_EXACT_CHECK_LIMIT = 1 << 28


class OverlappingWrite(Exception):
    """An in-place op reads memory it writes, in another layout."""


def refuse_overlapping_writes(graph: torch.fx.Graph) -> None:
    """Raise OverlappingWrite for the first op of ``graph`` (traced by make_fx,
    its values in ``meta["val"]``) that writes a tensor sharing an element with a
    tensor it reads, unless both are the same view (``x.add_(x)``) or come from
    two different inputs."""
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        written, read = _operands(node, target)
        for w_root, w in written:
            for r_root, r in read:
                if w_root is not r_root and w_root.op == r_root.op == "placeholder":
                    continue  # inputs sharing memory: the call's, checked on each call
                if _shares_an_element(w, r):
                    raise OverlappingWrite(
                        f"{target} writes memory that another of its arguments reads, laid out differently "
                        "(eager PyTorch refuses that or runs it in its kernel's element order; batched, neither)"
                    )


Operand = tuple[torch.fx.Node, torch.Tensor]  # a tensor argument: its view root and its value


def _operands(node: torch.fx.Node, target: torch._ops.OpOverload) -> tuple[list[Operand], list[Operand]]:
    """The tensor arguments ``node`` writes and those it only reads."""
    written: list[Operand] = []
    read: list[Operand] = []
    for arg, value in _bound(node, target):
        into = written if arg.alias_info is not None and arg.alias_info.is_write else read
        into.extend(_values(value))
    return written, read


def _bound(node: torch.fx.Node, target: torch._ops.OpOverload) -> Iterator[tuple[Any, Any]]:
    for k, arg in enumerate(target._schema.arguments):
        if k < len(node.args):
            yield arg, node.args[k]
        elif arg.name in node.kwargs:
            yield arg, node.kwargs[arg.name]


def _values(value: Any) -> Iterator[Operand]:
    items = value if isinstance(value, (list, tuple)) else (value,)
    for item in items:
        if isinstance(item, torch.fx.Node):
            val = item.meta.get("val")
            if isinstance(val, torch.Tensor):
                yield view_root(item), val


Geometry = tuple[int, tuple[int, ...], tuple[int, ...]]  # storage offset, shape, strides


def _geometry(t: torch.Tensor) -> Geometry | None:
    """``t``'s place in its storage, or None where a size is symbolic."""
    offset, shape, stride = t.storage_offset(), tuple(t.shape), tuple(t.stride())
    if not all(type(v) is int for v in (offset, *shape, *stride)):
        return None
    return offset, shape, stride  # type: ignore[return-value]  # checked above: ints only


def _shares_an_element(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (fake or real) have an element at one address,
    unless they are the same view of it."""
    if a.numel() == 0 or b.numel() == 0 or not _same_storage(a, b):
        return False
    ga, gb = _geometry(a), _geometry(b)
    if ga is None or gb is None or a.element_size() != b.element_size():
        return ga is None or ga != gb  # symbolic sizes, or a view as another dtype: assume it does
    if ga == gb:
        return False
    (a_first, a_last), (b_first, b_last) = _span(ga), _span(gb)
    if a_last < b_first or b_last < a_first:
        return False
    # Mark a's elements in a flag per storage element of the span, then look under b's.
    low = min(a_first, b_first)
    span = max(a_last, b_last) - low + 1
    if span > _EXACT_CHECK_LIMIT:
        return True
    flags = torch.zeros(span, dtype=torch.bool)
    flags.as_strided(ga[1], ga[2], a_first - low).fill_(True)
    return bool(flags.as_strided(gb[1], gb[2], b_first - low).any())


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    key = _storage_key(a)
    return key is not None and key == _storage_key(b)


def _span(geometry: Geometry) -> tuple[int, int]:
    """The first and last element offsets a tensor reaches in its storage (strides are never negative)."""
    first, shape, stride = geometry
    return first, first + sum((size - 1) * step for size, step in zip(shape, stride))
