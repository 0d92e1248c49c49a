"""Layout: how a logical tensor is laid out over a call's devices.

The description a ``ShardedTensor`` carries (``x.shard_layout``), in the spirit of
DTensor's spec (tensor metadata plus a placement on a device mesh) for pmap's
one-dimensional device list, with one more field the SPMD runners need: the
storage form.

* ``Storage.SHARDS``: one tensor per replica, wherever its memory is. What eager
  replicas return; the threads executor and the lockstep runner take any form as
  shards. (Such shards may still be views of one buffer, a deep copy of stacked
  ones for one: ``ShardedTensor.stacked_buffers`` finds them.)
* ``Storage.STACKED``: known to be stacked: the replicas that share a physical
  device hold disjoint views, in replica order along dim 0, of one
  ``(k, *shard_shape)`` buffer on that device (``device_groups`` says which
  replicas). The stacked runner runs its captured graph once over that buffer,
  and returns results in this form, so that feeding them to the next call moves
  nothing.

The form is recorded, not detected on every construction, since pmap builds a
ShardedTensor per output leaf per call and most are never stacked; the record
can go stale (``set_`` on a shard), ``stacked_buffers`` cannot: it checks.

The storage form never changes what the data means: a call takes a tensor as it
is when ``is_mapped_on(axis, devices)``, whatever its form. For the runners: the
lockstep runner and the threads executor take ``x.shards``; the stacked runner
takes ``x.stacked_buffers()`` (when None, ``x.to_stacked()``: one copy) and wraps
its results with ``ShardedTensor.from_stacked``. A call record can describe each
input by a Layout (``axis=None`` for a broadcast one).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._devices import physical_device


class Storage(enum.Enum):
    SHARDS = "shards"  # one tensor per replica
    STACKED = "stacked"  # per physical device, one (k, *shard_shape) buffer; shards are its dim-0 views


@dataclass(frozen=True)
class Layout:
    """A logical tensor of ``shape`` and ``dtype`` whose slice ``i`` along ``axis``
    lives on ``devices[i]``, stored as ``storage`` says. ``axis=None``: replicated,
    every device holds all of ``shape`` (an ``in_axes=None`` input, an
    ``out_axes=None`` output); such data is never stacked."""

    shape: torch.Size
    dtype: torch.dtype
    axis: int | None
    devices: tuple[torch.device, ...]
    storage: Storage = Storage.SHARDS

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("Layout: devices must not be empty")
        if self.axis is None:
            if self.storage is Storage.STACKED:
                raise ValueError("Layout: replicated data (axis=None) has no stacked form; use Storage.SHARDS")
            return
        if not 0 <= self.axis < len(self.shape):
            raise ValueError(f"Layout: axis {self.axis} out of range for shape {tuple(self.shape)}")
        if self.shape[self.axis] != len(self.devices):
            raise ValueError(
                f"Layout: the mapped axis {self.axis} of shape {tuple(self.shape)} has size "
                f"{self.shape[self.axis]}, but there are {len(self.devices)} devices"
            )

    @property
    def is_replicated(self) -> bool:
        return self.axis is None

    @property
    def shard_shape(self) -> torch.Size:
        """What each device holds: ``shape`` without the mapped axis."""
        if self.axis is None:
            return self.shape
        return self.shape[: self.axis] + self.shape[self.axis + 1 :]

    def is_mapped_on(self, axis: int, devices: tuple[torch.device, ...]) -> bool:
        """Whether a call mapped over ``axis`` on ``devices`` can hand each replica
        its shard as it is (either storage form: only the stacked runner tells them apart)."""
        return self.axis == axis and self.devices == devices

    def with_storage(self, storage: Storage) -> Layout:
        return Layout(self.shape, self.dtype, self.axis, self.devices, storage)

    @property
    def device_groups(self) -> tuple[tuple[torch.device, tuple[int, ...]], ...]:
        """Per physical device, the replicas on it, in order: one stacked buffer each."""
        return device_groups(self.devices)


@functools.lru_cache(maxsize=1024)
def mapped_layout(shard_shape: torch.Size, dtype: torch.dtype, axis: int, devices: tuple[torch.device, ...]) -> Layout:
    """The per-shard layout of shards of ``shard_shape`` stacked on ``axis``. Cached:
    pmap asks for one per ShardedTensor it is given, and they repeat call after call."""
    shape = list(shard_shape)
    shape.insert(axis, len(devices))
    return Layout(torch.Size(shape), dtype, axis, devices)


@functools.lru_cache(maxsize=64)
def device_groups(devices: tuple[torch.device, ...]) -> tuple[tuple[torch.device, tuple[int, ...]], ...]:
    """``devices``' replica indices grouped by physical device (every virtual CPU
    device is the CPU), groups in order of first appearance, indices ascending."""
    groups: dict[torch.device, list[int]] = {}
    for i, d in enumerate(devices):
        groups.setdefault(physical_device(d), []).append(i)
    return tuple((p, tuple(members)) for p, members in groups.items())


def distinct_gpus(devices: Sequence[torch.device]) -> bool:
    """Whether ``devices`` are two or more GPUs, none of them twice: what
    collectives queued on the replicas' own streams need (replicas sharing a
    GPU, or a CPU replica beside GPUs, exchange through the host instead)."""
    if len(devices) < 2 or any(d.type != "cuda" for d in devices):
        return False
    return len(device_groups(tuple(devices))) == len(devices)


def slices_overlap(t: torch.Tensor, axis: int) -> bool:
    """Whether two slices of ``t`` along ``axis`` may share memory (an
    expand()ed axis, as_strided windows). Stride-0 dimensions inside a slice
    do not count: eager PyTorch refuses writes through them."""
    if t.is_contiguous() or t.shape[axis] < 2 or t.numel() == 0:
        return False
    strides, sizes = t.stride(), t.shape
    dims = sorted((strides[d], sizes[d]) for d in range(t.ndim) if sizes[d] > 1 and (strides[d] or d == axis))
    span = 0  # the offsets the smaller-stride dimensions reach
    for stride, size in dims:
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False
