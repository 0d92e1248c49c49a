"""Stacked buffers whose rows compute as the replicas' own tensors do.

A stacked runner computes over an ``(n, ...)`` buffer whose row r stands for
replica r's tensor. Values are the same whatever the layout, but which ops
return views and which return copies is not: ``reshape``, ``flatten`` and
``contiguous`` return a view exactly when their input is laid out suitably,
and a later in-place write shows through a view and not through a copy. So
every intermediate row must be laid out as eagerly computed on the replica's
own tensor. Two rules of PyTorch's decide those layouts:

* an elementwise op (TensorIterator) lays out its result densely in the order
  of its input's strides, largest outermost; over a buffer, the replica
  dimension must then come outermost, or a row of the result is not laid out
  as that op on the row alone (``x.movedim(1, 0) * 1``: rows with strides
  (8, 1) where the row alone gives (2, 1));
* ``clone``, ``empty_like`` and their kin keep the strides of a dense input
  and make a non-dense one contiguous; over a buffer they see the buffer's
  density, not the row's.

``faithful`` says whether a buffer (a view of the caller's memory) satisfies
both; ``faithful_copy`` stacks separate tensors into one that does, or says
that none does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _extent(shape: Sequence[int], strides: Sequence[int]) -> int:
    """One past the largest offset a tensor of ``shape`` and ``strides`` reaches."""
    return 1 + sum(st * (sz - 1) for sz, st in zip(shape, strides) if sz > 1)


def _dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Non-overlapping and dense: its elements fill exactly ``numel`` consecutive places."""
    expected = 1
    for sz, st in sorted(((sz, st) for sz, st in zip(shape, strides) if sz > 1), key=lambda p: p[1]):
        if st != expected:
            return False
        expected *= sz
    return True


def faithful(buffer: torch.Tensor) -> bool:
    """Whether ops over ``buffer`` lay out each row of their results as the same
    ops over that row alone do (see the module docstring)."""
    if buffer.is_contiguous() or buffer.shape[0] < 2 or buffer.numel() == 0:
        return True
    shape, strides = buffer.shape, buffer.stride()
    row_shape, row_strides = shape[1:], strides[1:]
    if strides[0] < _extent(row_shape, row_strides):
        return False  # the replicas interleave: the replica dimension is not outermost
    if not _dense(row_shape, row_strides):
        return True  # clone and TensorIterator make such rows dense, over the buffer as over the row
    # Dense rows keep their strides through clone only if the buffer is dense too.
    return _contiguous(row_shape, row_strides) or strides[0] == _numel(row_shape)


def _contiguous(shape: Sequence[int], strides: Sequence[int]) -> bool:
    expected = 1
    for sz, st in zip(reversed(shape), reversed(strides)):
        if sz > 1 and st != expected:
            return False
        expected *= sz
    return True


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for sz in shape:
        n *= sz
    return n


def _order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dimensions with more than one element, innermost (smallest stride) first:
    the order TensorIterator lays a result out in. None when two share a stride
    (or one has none): an order PyTorch decides otherwise."""
    dims = sorted((d for d in range(t.ndim) if t.shape[d] > 1), key=lambda d: t.stride(d))
    strides = [t.stride(d) for d in dims]
    if any(st <= 0 for st in strides) or len(set(strides)) != len(strides):
        return None
    return tuple(dims)


def _row_major(t: torch.Tensor) -> bool:
    order = _order(t)
    return order is not None and list(order) == sorted(order, reverse=True)


def faithful_copy(values: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The replicas' tensors ``values`` stacked into a new ``(n, ...)`` buffer that
    is ``faithful`` to them, or None when no buffer is. Contiguous rows for
    contiguous tensors and for non-dense ones in row-major order (both compute
    contiguous results); rows with the tensors' own strides for dense tensors
    that share them; rows spaced out in the tensors' own order for non-dense
    ones that share it. (A copy's rows may still be views where the replica's
    tensor gives copies, ``x.reshape(-1)`` of a non-dense row: only a write to
    the input tells, and the stacked executor refuses writes to a copied input.)"""
    first, n = values[0], len(values)
    if all(v.is_contiguous() or (not _dense(v.shape, v.stride()) and _row_major(v)) for v in values):
        return torch.stack(list(values))
    shape, strides = first.shape, first.stride()
    if _dense(shape, strides):
        if any(v.stride() != strides for v in values[1:]):
            return None
        out = torch.empty_strided((n, *shape), (first.numel(), *strides), dtype=first.dtype, device=first.device)
    else:
        order = _order(first)
        if order is None or any(_dense(v.shape, v.stride()) or _order(v) != order for v in values[1:]):
            return None
        spaced = [1] * first.ndim
        step = 2  # the innermost dimension every other element: not dense, as the tensors
        for d in order:
            spaced[d] = step
            step *= shape[d]
        out = torch.empty_strided((n, *shape), (step, *spaced), dtype=first.dtype, device=first.device)
    for row, v in zip(out.unbind(0), values):
        row.copy_(v)
    return out
