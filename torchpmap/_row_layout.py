"""Stacked buffers whose rows compute as the replicas' own tensors do.

A stacked runner computes over an ``(n, ...)`` buffer whose row r stands for
replica r's tensor. Values are the same whatever the layout, but which ops
return views and which return copies is not: ``reshape``, ``flatten`` and
``contiguous`` return a view exactly when their input is laid out suitably,
and a later in-place write shows through a view and not through a copy. So
every intermediate row must be laid out as eagerly computed on the replica's
own tensor. PyTorch lays out the result of an elementwise op (TensorIterator)
and of ``clone``/``empty_like`` densely in the order of the input's strides,
largest outermost (a dense input keeps its strides). Over a buffer, the
replica dimension must then come outermost, or a row of the result is not laid
out as the op on the row alone: ``x.movedim(1, 0) * 1`` has rows with strides
(8, 1) where the row alone gives (2, 1).

``faithful`` says whether a buffer (a view of the caller's memory) is so laid
out; ``faithful_copy`` stacks separate tensors into one that is, or says that
none is.

Not every batching rule keeps the layout of TensorIterator: ``batch_norm`` in
eval mode and a few others lay rows out otherwise even over a contiguous buffer;
``_layout_decisions`` refuses a view-or-copy decision that then differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _extent(shape: Sequence[int], strides: Sequence[int]) -> int:
    """One past the largest offset a tensor of ``shape`` and ``strides`` reaches."""
    return 1 + sum(st * (sz - 1) for sz, st in zip(shape, strides) if sz > 1)


def faithful(buffer: torch.Tensor) -> bool:
    """Whether ops over ``buffer`` lay out each row of their results as the same
    ops over that row alone do: the replica dimension is outermost."""
    if buffer.is_contiguous() or buffer.shape[0] < 2 or buffer.numel() == 0:
        return True
    return buffer.stride(0) >= _extent(buffer.shape[1:], buffer.stride()[1:])


def faithful_copy(values: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The replicas' tensors ``values`` stacked into a new ``(n, ...)`` buffer that
    is ``faithful`` to them, or None when none is (their stride orders differ): rows
    laid out densely in the tensors' stride order, as ``empty_like`` lays them out.
    (A copy's rows may still be views where a non-dense replica tensor gives copies,
    ``x.reshape(-1)``: only a write to the input tells, and the stacked executor
    refuses writes to a copied input.)"""
    if all(v.is_contiguous() for v in values):
        return torch.stack(list(values))
    first = values[0]
    strides = torch.empty_like(first, device="meta").stride()
    if any(torch.empty_like(v, device="meta").stride() != strides for v in values[1:]):
        return None
    out = torch.empty_strided(
        (len(values), *first.shape), (first.numel(), *strides), dtype=first.dtype, device=first.device
    )
    for r, v in enumerate(values):
        out.select(0, r).copy_(v)  # one view at a time: autograd refuses writes into unbind's views
    return out
