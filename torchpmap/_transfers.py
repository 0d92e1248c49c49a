"""Copies between the host and GPUs, through pinned memory, so that copies to
(or from) several GPUs run at the same time instead of one after another.

A copy from pageable host memory to a GPU holds the host until the driver has
staged it; from pinned memory it is queued on the destination's current stream
and the host goes on. torchpmap stages the values in pinned memory of its own
(PyTorch's caching host allocator keeps that block until the copies have run),
even when the caller's tensor is pinned already: the caller may write its
tensor as soon as the call returns, while the copies may not have run yet.
Copies back to the host are queued into one pinned buffer and waited for
together. Values autograd must follow (a tensor that requires grad, with grad
mode on, or any tensor while a forward-AD level is open) and tensors that are
not plain dense ones (subclasses, nested, quantized) keep PyTorch's plain
copies.

A copy to a GPU is then like any GPU op: ordered on that GPU's current stream
when the function returns, not finished; work on another stream must
``wait_stream`` first (pmap's replicas do).

Every function here gives the values a plain ``.to(device)`` would; on the
CPU alone (virtual CPU devices) nothing changes at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _plain(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain dense tensor whose values are all a copy must
    carry: no subclass, nested or quantized tensor, nothing autograd
    (backward or forward mode) follows through the copy."""
    if type(t) is not torch.Tensor or t.layout != torch.strided or t.is_nested or t.is_quantized:
        return False
    if t.requires_grad and torch.is_grad_enabled():
        return False  # autograd records the plain copy
    return not _forward_ad_on()


def _forward_ad_on() -> bool:
    # A dual tensor's tangent rides on .to(); a copy of its values would drop it.
    return torch.autograd.forward_ad._current_level >= 0


def _pinnable(t: torch.Tensor) -> bool:
    """Whether ``t``'s copies to GPUs may go through a pinned buffer."""
    if t.device.type != "cpu" or t.numel() == 0 or not _plain(t):
        return False
    return torch.cuda.is_available()


def _staged(t: torch.Tensor, keep_strides: bool = True) -> torch.Tensor:
    """A copy of ``t``'s values in pinned memory that nobody else holds, with
    ``t``'s strides where they are dense and ``keep_strides`` (channels_last
    stays channels_last, as ``.to()`` keeps it), else contiguous."""
    if keep_strides and torch.ops.aten.is_non_overlapping_and_dense(t):
        staged = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
    else:
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged


def is_there(t: torch.Tensor, d: torch.device) -> bool:
    """Whether ``to_device(t, d)`` is ``t`` itself."""
    return t.device.type == "cpu" if d.type == "cpu" else t.device == d


def to_device(t: torch.Tensor, d: torch.device) -> torch.Tensor:
    """``t`` on ``d``: ``t`` itself where both are the host (virtual CPU devices
    share host memory), else a copy."""
    if d.type == "cpu" and t.device.type == "cpu":
        return t
    if d.type == "cuda" and _pinnable(t):
        return _staged(t).to(d, non_blocking=True)
    return between_gpus_safe(t, d).to(d)


def between_gpus_safe(t: torch.Tensor, d: torch.device) -> torch.Tensor:
    """``t``, with a conjugate or negative bit resolved on its own GPU when it
    goes to another: PyTorch copies such a view between GPUs with a kernel that
    writes the other GPU's memory, which needs peer access the GPUs may lack."""
    if t.is_cuda and d.type == "cuda" and d != t.device and (t.is_conj() or t.is_neg()):
        return t.resolve_conj().resolve_neg()
    return t


def to_every(t: torch.Tensor, devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """``to_device(t, d)`` for every device, staging a host tensor once."""
    return _on_each(t, devices, lambda d: to_device(t, d))


def copies_on(t: torch.Tensor, devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """A copy of ``t`` of its own on every device (``device_put_replicated``)."""
    return _on_each(t, devices, lambda d: between_gpus_safe(t, d).to(d, copy=True))


def _on_each(
    t: torch.Tensor, devices: Sequence[torch.device], plain: Callable[[torch.device], torch.Tensor]
) -> list[torch.Tensor]:
    """``t`` on every device: ``plain(d)``, except that a host tensor bound for
    GPUs is staged once and copied from there to each of them."""
    if not any(d.type == "cuda" for d in devices) or not _pinnable(t):
        return [plain(d) for d in devices]
    staged = _staged(t)
    return [staged.to(d, non_blocking=True) if d.type == "cuda" else plain(d) for d in devices]


def slices_to(t: torch.Tensor, axis: int, devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """Slice i of ``t`` along ``axis`` on ``devices[i]``, as ``to_device`` would
    place it (slices on the host are views of ``t``)."""
    views = slices(t, axis, len(devices))
    if not any(d.type == "cuda" for d in devices) or not _pinnable(t):
        return [to_device(v, d) for v, d in zip(views, devices)]
    # The mapped axis first, contiguous: each slice of the staged buffer is one block, one copy.
    staged = _staged(t.movedim(axis, 0), keep_strides=False)
    return [
        staged[i].to(d, non_blocking=True) if d.type == "cuda" else to_device(v, d)
        for i, (v, d) in enumerate(zip(views, devices))
    ]


def slices(t: torch.Tensor, axis: int, n: int) -> Sequence[torch.Tensor]:
    """The views of ``t``'s slices along ``axis``. ``unbind``'s, whose in-place ops autograd
    refuses: a replica's write of a value that requires grad would give ``t`` history from
    several threads at once. Of a ``t`` that requires grad, ``select``'s: the replicas get
    leaves of their own in its place, and a slice returned as an output (which may be this
    view) must stay readable after the caller writes ``t`` in place, which autograd refuses
    for unbind's views."""
    return [t.select(axis, i) for i in range(n)] if t.requires_grad else t.unbind(axis)


def stack_on_host(parts: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
    """``torch.stack`` of ``parts`` along ``axis`` on the host. Parts on several
    GPUs are copied into one pinned buffer, every copy queued before any is
    waited for. (From one GPU there is nothing to overlap, and the result would
    keep pinned memory, which the host cannot page out, for as long as it lives.)"""
    first = parts[0]
    pinned = (
        all(p.is_cuda for p in parts)
        and len({p.device for p in parts}) > 1
        and first.layout == torch.strided
        and first.numel() > 0
        and all(p.shape == first.shape and p.dtype == first.dtype for p in parts)  # else torch.stack's error
        and all(_plain(p) for p in parts)
    )
    if not pinned:
        return torch.stack([p.to("cpu") for p in parts], dim=axis)
    out = torch.empty((len(parts), *first.shape), dtype=first.dtype, pin_memory=True)
    for row, p in zip(out, parts):
        # Queued on p's device's current stream. A conjugate or negative view is resolved on
        # the GPU first: copy_ would resolve it on the host before the copy has landed.
        row.copy_(p.resolve_conj().resolve_neg(), non_blocking=True)
    for d in {p.device for p in parts}:
        torch.cuda.current_stream(d).synchronize()
    return out if axis == 0 else out.movedim(0, axis).contiguous()
