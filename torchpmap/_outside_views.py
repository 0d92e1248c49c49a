"""Views Dynamo takes outside the captured graph, rebuilt for every replica.

A function that returns ``x.mT`` (or ``x.real``, ``x.mH``) of an input gives
Dynamo nothing to put in the graph: its bytecode takes that view of replica 0's
value after the graph ran. The captured executors must return the same view of
every replica's value. Two things make that safe:

* only an output whose memory lies inside replica 0's value can be a view of it;
  a tensor the function closes over that merely shares a storage with the input
  (another slice of one buffer) is the same in every replica;
* the view keeps the output's dtype (``x.real`` of a complex input) and its
  conjugate and negative bits (``x.mH``), which strides alone do not carry.
"""

from __future__ import annotations

import torch


def byte_offset(t: torch.Tensor) -> int:
    """Where ``t`` starts in its storage, in bytes."""
    return int(t.storage_offset()) * t.element_size()


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of ``t``'s storage that ``t`` can reach: [first, end)."""
    size = t.element_size()
    first = last = int(t.storage_offset())  # real tensors: never symbolic
    for n, stride in zip(t.shape, t.stride()):
        if n == 0:
            return first * size, first * size
        if stride >= 0:
            last += (n - 1) * stride
        else:
            first += (n - 1) * stride
    return first * size, (last + 1) * size


def lies_within(leaf: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``leaf``'s memory is inside ``value``'s (same storage)."""
    if leaf.untyped_storage().data_ptr() != value.untyped_storage().data_ptr():
        return False
    lo, hi = byte_span(leaf)
    vlo, vhi = byte_span(value)
    return vlo <= lo and hi <= vhi


def rebuilt(
    base: torch.Tensor, leaf: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...], byte_offset: int
) -> torch.Tensor | None:
    """The view of ``base``'s storage with ``leaf``'s dtype and conjugate and
    negative bits, ``shape`` and ``stride`` counted in ``leaf``'s elements,
    starting ``byte_offset`` bytes into the storage; None when ``base`` cannot be
    seen as ``leaf``'s dtype."""
    if base.is_conj() or base.is_neg():
        return None
    if base.dtype != leaf.dtype:
        try:
            base = base.view(leaf.dtype)
        except RuntimeError:
            return None
    if byte_offset % leaf.element_size():
        return None
    out = base.as_strided(shape, stride, byte_offset // leaf.element_size())
    if leaf.is_neg():
        out = torch._neg_view(out)
    if leaf.is_conj():
        out = out.conj()
    return out
