"""A backward pass given a batch of cotangents at once.

``torch.autograd.grad(..., is_grads_batched=True)`` and
``torch.autograd.functional.jacobian``/``hessian(vectorize=True)`` run the
backward under PyTorch's legacy vmap: an autograd Function's backward then gets
cotangents batched at that vmap's level. torchpmap's Functions cannot hand them
on (the stacked executor traces its backward on fake tensors, which have no
batched form; the replicas of the threads executor get one cotangent each, some
batched and some not, and their collectives would meet a different number of
times). So such a backward runs once per cotangent, and the gradients are
batched again at the same level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_MAX_LEVEL = 64  # legacy vmap levels are small integers, one per nested vmap


def is_batched(grads: Sequence[torch.Tensor | None]) -> bool:
    return any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads)


def _level_of(g: torch.Tensor) -> int:
    """The level ``g`` is batched at. (The vmap's own count is thread-local, and a backward
    on a GPU runs on the autograd engine's device thread: the tensor says it.)"""
    for level in range(1, _MAX_LEVEL):
        # A tensor not batched at ``level`` comes back still batched (broadcast to size 1).
        if not torch._C._functorch.is_legacy_batchedtensor(torch._remove_batch_dim(g, level, 1, 0)):
            return level
    raise NotImplementedError(
        "torchpmap: a backward through a pmap call whose cotangents are batched by nested vmaps "
        "(is_grads_batched inside another vmap): not supported; loop over one of them"
    )


def per_cotangent(
    grads: Sequence[torch.Tensor | None],
    backward: Callable[[tuple[torch.Tensor | None, ...]], Sequence[torch.Tensor | None]],
) -> tuple[torch.Tensor | None, ...]:
    """``backward`` run once per cotangent of the batch, its gradients batched again.
    A cotangent that is not batched is the same for every one."""
    level = next(_level_of(g) for g in grads if g is not None and torch._C._functorch.is_legacy_batchedtensor(g))
    physical = [
        None
        if g is None
        else torch._remove_batch_dim(g, level, 1, 0)  # the batch size is the tensor's own
        if torch._C._functorch.is_legacy_batchedtensor(g)
        else g.unsqueeze(0)
        for g in grads
    ]
    size = max(p.shape[0] for p in physical if p is not None)
    results = [backward(tuple(None if p is None else p[min(b, p.shape[0] - 1)] for p in physical)) for b in range(size)]
    batched: list[torch.Tensor | None] = []
    for parts in zip(*results):
        if all(part is None for part in parts):
            batched.append(None)
            continue
        like = next(part for part in parts if part is not None)
        stacked = torch.stack([torch.zeros_like(like) if part is None else part for part in parts])
        batched.append(torch._add_batch_dim(stacked, 0, level))
    return tuple(batched)
