"""Value checks that eager kernels make and a traced graph would lose.

Some eager kernels read their inputs' values to refuse them: ``F.one_hot`` of a
label that is negative or not below ``num_classes``, ``F.embedding`` or
``index_fill`` of an index out of range. Traced, the check is gone: one_hot's
decomposition gives an all-zero row, and functorch's batching rules for
embedding and index_fill, which index one flat tensor of every replica's rows,
reach into another replica's. Each would be a silent wrong result where the
threads executor raises.

So while a capture is traced (the stacked executor's batched graph, a lockstep
segment), these ops are spelled with ops whose kernels check the same values
when the graph runs, with the same results: one_hot as a ``scatter`` into zeros,
a lookup in a per-replica table as ``index_select`` and a per-replica
index_fill as a ``where`` over a scattered mask, both bounds-checked per
replica. A value out of range then makes the graph raise: the stacked
executor reruns that call on the threads, which raise the eager error; the
lockstep executor raises the kernel's ("index 7 is out of bounds ...").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._promotion_guard import batched, under
from ._torch_originals import original


class UncheckedLookup(Exception):
    """An embedding lookup into a per-replica table with options the rewrite does not keep."""


def _one_hot(labels: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
    if num_classes < 0:  # the width depends on the values: Dynamo does not capture it
        return F.one_hot(labels, num_classes)
    zeros = torch.zeros((*labels.shape, num_classes), dtype=torch.int64, device=labels.device)
    if not batched(labels):
        # A lockstep segment, which compile= hands to Inductor: its scatter does not check
        # the index (an out-of-range label gave a row of zeros). (Batched, the stacked
        # executor's scatter checks; _assert_async has no batching rule.)
        torch._assert_async(
            ((labels >= 0) & (labels < num_classes)).all(),
            "one_hot: Class values must be non-negative and smaller than num_classes.",
        )
    return zeros.scatter(-1, labels.unsqueeze(-1), 1)


def _lookup(indices: torch.Tensor, weight: torch.Tensor, padding: int | None, unsupported: list[str]) -> torch.Tensor:
    """``weight[indices]`` (rows of the last dimension), bounds-checked per replica;
    ``padding``: the row (0 ... rows - 1) whose lookups pass no gradient back, or None."""
    if unsupported:
        raise UncheckedLookup(
            f"an embedding lookup into a per-replica table with {', '.join(unsupported)}: batched, an index out "
            f"of range would read another replica's table"
        )
    rows = weight.index_select(0, indices.reshape(-1)).reshape(*indices.shape, weight.shape[-1])
    if padding is not None:
        rows = torch.where((indices == padding).unsqueeze(-1), rows.detach(), rows)
    return rows


def _F_embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    if not batched(weight):  # one table: the kernel checks the indices against it
        return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    options = {"max_norm": max_norm is not None, "scale_grad_by_freq": scale_grad_by_freq, "sparse": sparse}
    unsupported = [name for name, on in options.items() if on]
    if padding_idx is not None and padding_idx < 0:  # F.embedding counts a negative one from the end
        padding_idx += weight.shape[0]
    return _lookup(input, weight, padding_idx, unsupported)


def _torch_embedding(
    weight: torch.Tensor,
    indices: torch.Tensor,
    padding_idx: int = -1,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    if not batched(weight):
        return torch.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)
    options = {"scale_grad_by_freq": scale_grad_by_freq, "sparse": sparse}
    unsupported = [name for name, on in options.items() if on]
    return _lookup(indices, weight, None if padding_idx < 0 else padding_idx, unsupported)  # here -1 is none


def _index_fill(self: torch.Tensor, dim: int, index: torch.Tensor, value: Any) -> torch.Tensor:
    """``self.index_fill(dim, index, value)``, bounds-checked per replica. Batched,
    index_fill reads its indices into one flat tensor of every replica's, and it
    fills with the last replica's value where that is per replica."""
    per_replica = [t for t in (self, index, value) if isinstance(t, torch.Tensor) and batched(t)]
    if not per_replica or self.dim() == 0:
        return torch.Tensor.index_fill(self, dim, index, value)
    dim %= self.dim()
    size = self.shape[dim]
    flat = index.reshape(-1)
    rows = torch.zeros(size, dtype=torch.bool, device=self.device).scatter(
        0, torch.where(flat < 0, flat + size, flat), True
    )
    shape = [1] * self.dim()
    shape[dim] = size
    if isinstance(value, torch.Tensor):
        fill = value.to(self.dtype)
    else:
        fill = torch.tensor(value, dtype=self.dtype, device=self.device)  # index_fill casts the value to self's dtype
    return torch.where(rows.view(shape), fill, self)


def _index_fill_(self: torch.Tensor, dim: int, index: torch.Tensor, value: Any) -> torch.Tensor:
    return self.copy_(_index_fill(self, dim, index, value))


_REWRITES: dict[Any, Callable[..., torch.Tensor]] = {
    torch.index_fill: _index_fill,
    torch.Tensor.index_fill: _index_fill,
    torch.Tensor.index_fill_: _index_fill_,
    F.one_hot: _one_hot,
    F.embedding: _F_embedding,
    torch.embedding: _torch_embedding,
}


class _Checked(TorchFunctionMode):
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        func = original(func)  # (a user's replacement would run again: _torch_originals)
        rewrite = _REWRITES.get(func)
        if rewrite is not None:
            return rewrite(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced with the rewrites above."""
    return under(_Checked, fn)
