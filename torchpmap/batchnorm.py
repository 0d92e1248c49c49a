"""Batch normalisation with statistics over the whole named axis.

Plain BatchNorm inside pmap normalises each replica's shard with that shard's
moments and updates each replica's running statistics from it, so replicas
drift apart and none matches single-device training on the whole batch.
``SyncBatchNorm`` reduces the moments over the axis (the mean from psum of
sum and count, then the variance from psum of squared deviations from it,
which is more accurate than a sum of squares), so every replica normalises
with, and records, the statistics of the global batch.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ._axis import AxisName, static_axis_size
from .collectives import _names, psum

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.BatchNorm{1,2,3}d`` whose batch statistics cover every
    replica of ``axis_name`` (like ``torch.nn.SyncBatchNorm`` under DDP).

    In training mode (or without running statistics) the mean and biased
    variance of the concatenated batch normalise the input, and the running
    statistics are updated with that mean and the unbiased variance, exactly as
    one BatchNorm on the whole batch would; so they stay identical on every
    replica. In eval mode the running statistics are used, with no
    communication. Call it inside ``pmap(..., axis_name=axis_name)``.

    ``forward(input, mask=None)``: ``mask`` (shape ``(N,)``, bool or 0/1, as
    ``shard_batch(..., pad=True)`` returns it per replica) leaves the rows where
    it is false (zero) out of the statistics; those rows are still normalised.
    It is a flag, not a weight: every nonzero entry keeps its row. A
    batch whose mask leaves at most one value per channel over the axis (the
    last batch of an epoch with one sample) leaves the running statistics as
    they were: the unbiased variance needs two values. Unmasked, that raises.
    """

    def __init__(
        self,
        num_features: int,
        axis_name: AxisName,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _names(axis_name, "SyncBatchNorm")  # a bad axis name fails here, not at the first forward
        try:
            count = operator.index(num_features)  # numpy integers too
        except TypeError:
            count = 0
        if isinstance(num_features, bool) or count < 1:
            raise ValueError(f"SyncBatchNorm: num_features must be a positive int, got {num_features!r}")
        num_features = count
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.axis_name = axis_name

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis_name={self.axis_name!r}"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected an input of shape (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm: expected {self.num_features} channels (dimension 1), got input of shape "
                f"{tuple(input.shape)}"
            )
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        mean, var, count = self._global_moments(input, mask)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, count, masked=mask is not None)
        return self._normalise(input, mean, var)

    def _global_moments(
        self, input: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, biased variance and row count (per channel) of the batch over the axis."""
        x = input.float() if input.dtype in _LOW_PRECISION else input
        dims = [0, *range(2, x.dim())]
        per_row = math.prod(x.shape[2:])
        weights = None if mask is None else _row_weights(mask, x)
        if weights is None:
            _check_enough_values(x.shape[0] * per_row * static_axis_size(self.axis_name))
            local_count = x.new_full((1,), float(x.shape[0] * per_row))
            local_sum = x.sum(dims)
        else:
            local_count = (weights.sum() * per_row).reshape(1)
            local_sum = (x * weights).sum(dims)
        totals = psum(torch.cat([local_sum, local_count]), self.axis_name)
        count = totals[-1]
        # A mask may leave no row at all: moments of zero (not 0/0), so that padding rows
        # come out finite and a masked loss over them gives zero gradients, not NaN.
        divisor = count if weights is None else count.clamp(min=1)
        mean = totals[:-1] / divisor
        deviations = (x - _per_channel(mean, x)).square()
        if weights is not None:
            deviations = deviations * weights
        var = psum(deviations.sum(dims), self.axis_name) / divisor
        return mean, var, count

    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, *, masked: bool
    ) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        with torch.no_grad():
            if not masked:
                self.num_batches_tracked.add_(1)
                self._blend_running_stats(mean, var * count / (count - 1))
                return
            # Unmasked, fewer than two values raise (_check_enough_values); a mask's count is only
            # known on the device, so a batch that leaves at most one value per channel (the last
            # batch of an epoch holding one sample) leaves the running statistics as they were,
            # instead of making the unbiased variance inf or NaN for good. No host sync.
            enough = count > 1
            old_mean, old_var = self.running_mean.clone(), self.running_var.clone()
            self.num_batches_tracked.add_(enough.to(self.num_batches_tracked.dtype))
            self._blend_running_stats(mean, var * count / (count - 1).clamp(min=1))
            self.running_mean.copy_(torch.where(enough, self.running_mean, old_mean))
            self.running_var.copy_(torch.where(enough, self.running_var, old_var))

    def _blend_running_stats(self, mean: torch.Tensor, unbiased: torch.Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        factor = 1.0 / max(1.0, float(self.num_batches_tracked)) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)

    def _normalise(self, input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        x = input.float() if input.dtype in _LOW_PRECISION else input
        out = (x - _per_channel(mean, x)) * _per_channel(torch.rsqrt(var + self.eps), x)
        if self.weight is not None and self.bias is not None:
            out = out * _per_channel(self.weight, x) + _per_channel(self.bias, x)
        return out.to(input.dtype)


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (like.dim() - 2))).to(like.dtype)


def _row_weights(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.shape != (x.shape[0],):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"SyncBatchNorm: mask must be a tensor of shape (N,) = ({x.shape[0]},), one flag per row of "
            f"this replica's input, got {shape}"
        )
    # A flag per row: a float mask of -1 or 2 used as a weight gave NaN or a wrong count, silently.
    return (mask.detach() != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _check_enough_values(count: int) -> None:
    if count <= 1:
        raise ValueError(
            f"SyncBatchNorm: expected more than 1 value per channel over the whole axis when training, got {count}"
        )


def convert_sync_batchnorm(module: torch.nn.Module, axis_name: AxisName) -> torch.nn.Module:
    """Replace every BatchNorm (``BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``)
    in ``module`` with a ``SyncBatchNorm`` over ``axis_name`` that takes over
    its parameters, running statistics and training flag. Like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: children are replaced
    in place, and a BatchNorm passed itself is returned converted."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert_sync_batchnorm: module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, _BatchNorm):
        return _converted(module, axis_name)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, axis_name)
        if new is not child:
            setattr(module, name, new)
    return module


def _converted(bn: _BatchNorm, axis_name: AxisName) -> SyncBatchNorm:
    if any(torch.nn.parameter.is_lazy(t) for t in (*bn.parameters(), *bn.buffers())):
        raise ValueError(
            f"convert_sync_batchnorm: {type(bn).__name__} is not initialised yet; run one forward "
            f"pass before converting"
        )
    sync = SyncBatchNorm(bn.num_features, axis_name, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    if hasattr(bn, "qconfig"):
        sync.qconfig = bn.qconfig
    return sync
