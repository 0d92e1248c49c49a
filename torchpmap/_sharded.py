"""ShardedTensor: a logical tensor whose slices along one axis live on devices.

Shard i is the slice ``i`` of the mapped axis, without that axis, on device i
(the layout pmap produces and consumes). Feeding a ShardedTensor back into pmap
with the same devices and axis hands each replica its shard: no copy at all.
Anything else torch does with it goes through the assembled full tensor.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_map

from ._devices import device_str
from .errors import DeletedShardedTensorError


class ShardedTensor:
    __slots__ = ("_shards", "_devices", "_axis", "_deleted", "__weakref__")

    def __init__(self, shards: Sequence[torch.Tensor], devices: Sequence[torch.device], axis: int = 0):
        shards = tuple(shards)
        devices = tuple(torch.device(d) for d in devices)
        if not shards:
            raise ValueError("ShardedTensor needs at least one shard")
        if len(shards) != len(devices):
            raise ValueError(f"ShardedTensor: {len(shards)} shards but {len(devices)} devices")
        first = shards[0]
        for i, s in enumerate(shards):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"ShardedTensor: shard {i} is a {type(s).__name__}, not a tensor")
            if s.shape != first.shape or s.dtype != first.dtype:
                raise ValueError(
                    f"ShardedTensor: shard {i} has shape {tuple(s.shape)} and dtype {s.dtype}, "
                    f"but shard 0 has {tuple(first.shape)} and {first.dtype}"
                )
        if not 0 <= axis <= first.ndim:
            raise ValueError(f"ShardedTensor: axis {axis} out of range for shards of rank {first.ndim}")
        self._shards = shards
        self._devices = devices
        self._axis = axis
        self._deleted = False

    # -- sharding -------------------------------------------------------------------
    @property
    def shards(self) -> tuple[torch.Tensor, ...]:
        """The per-device tensors (slice i of the mapped axis on device i)."""
        self._check_alive()
        return self._shards

    @property
    def devices(self) -> tuple[torch.device, ...]:
        return self._devices

    @property
    def axis(self) -> int:
        """The position of the mapped (device) axis in the logical tensor."""
        return self._axis

    @property
    def is_deleted(self) -> bool:
        return self._deleted

    def delete(self) -> None:
        """Drop the shards (their memory is freed once nothing else uses it)."""
        self._deleted = True
        self._shards = ()

    def _check_alive(self) -> None:
        if self._deleted:
            raise DeletedShardedTensorError(
                "this ShardedTensor was donated to a pmap call (donate_argnums) or "
                "deleted, so its buffers may have been reused; use the call's result instead"
            )

    # -- tensor-like metadata -----------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        self._check_alive()
        s = list(self._shards[0].shape)
        s.insert(self._axis, len(self._shards))
        return torch.Size(s)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def dtype(self) -> torch.dtype:
        self._check_alive()
        return self._shards[0].dtype

    @property
    def ndim(self) -> int:
        self._check_alive()
        return self._shards[0].ndim + 1

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def requires_grad(self) -> bool:
        self._check_alive()
        return any(s.requires_grad for s in self._shards)

    def __len__(self) -> int:
        return self.shape[0]

    # -- assembling ---------------------------------------------------------------------
    def unshard(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The full tensor on ``device`` (default: the first shard's device)."""
        self._check_alive()
        target = torch.device(device) if device is not None else self._shards[0].device
        parts = [s.to(target) for s in self._shards]
        return torch.stack(parts, dim=self._axis)

    def __array__(self, dtype=None, copy=None):
        full = self.unshard("cpu").detach()
        arr = full.resolve_conj().resolve_neg().numpy()
        return arr.astype(dtype) if dtype is not None else arr

    # torch.as_tensor / torch.tensor never call __array__ on a non-ndarray; they
    # take DLPack, or else iterate the object as a sequence of shards (and fail
    # on multi-element shards). Exporting the full tensor through DLPack makes
    # them, and so torch.testing.assert_close between ShardedTensors, work.
    def __dlpack__(self, *args, **kwargs):
        return self.unshard().detach().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        self._check_alive()
        return self._shards[0].__dlpack_device__()

    def numpy(self) -> np.ndarray:
        return self.__array__()

    def tolist(self):
        return self.unshard("cpu").tolist()

    def item(self):
        return self.unshard("cpu").item()

    def __getitem__(self, index):
        # An int on the mapped axis (axis 0) is shard i itself: no copy.
        if self._axis == 0 and isinstance(index, int) and not isinstance(index, bool):
            shards = self.shards
            if not -len(shards) <= index < len(shards):
                raise IndexError(f"index {index} is out of bounds for a ShardedTensor with {len(shards)} shards")
            return shards[index]
        return self.unshard()[index]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        if self._deleted:
            return "ShardedTensor(<deleted>)"
        devs = ", ".join(device_str(d) for d in self._devices)
        body = repr(self.unshard())
        return (
            f"ShardedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, axis={self._axis}, "
            f"devices=[{devs}],\n  {body})"
        )

    # -- every other torch function works on the full tensor -----------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        full = lambda v: v.unshard() if isinstance(v, ShardedTensor) else v  # noqa: E731
        return func(*tree_map(full, args), **tree_map(full, kwargs))

    def __getattr__(self, name: str) -> Any:
        # Tensor methods (x.sum(), x.float(), x.to(...)) run on the full tensor.
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(torch.Tensor, name, None)
        if attr is None:
            raise AttributeError(f"'ShardedTensor' object has no attribute {name!r}")
        full = self.unshard()
        return getattr(full, name)

    def __bool__(self) -> bool:
        return bool(self.unshard())

    def __float__(self) -> float:
        return float(self.unshard())

    def __int__(self) -> int:
        return int(self.unshard())

    def __eq__(self, other):  # elementwise, as for tensors
        return torch.eq(self, other)

    def __ne__(self, other):
        return torch.ne(self, other)

    __hash__ = None  # type: ignore[assignment]


def _binary(name: str):
    def op(self, other):
        return getattr(torch.Tensor, name)(self.unshard(), _full(other))

    op.__name__ = name
    return op


def _unary(name: str):
    def op(self):
        return getattr(torch.Tensor, name)(self.unshard())

    op.__name__ = name
    return op


def _full(v):
    return v.unshard() if isinstance(v, ShardedTensor) else v


for _name in (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__pow__", "__rpow__",
    "__matmul__", "__rmatmul__", "__lt__", "__le__", "__gt__", "__ge__", "__and__",
    "__or__", "__xor__",
):
    setattr(ShardedTensor, _name, _binary(_name))
for _name in ("__neg__", "__abs__", "__invert__", "__pos__"):
    setattr(ShardedTensor, _name, _unary(_name))


# -- placement helpers -------------------------------------------------------------------
def _check_devices(devices, n: int | None, fn: str) -> tuple[torch.device, ...]:
    from ._devices import local_devices

    if devices is None:
        devices = local_devices()
        if n is not None:
            if n > len(devices):
                raise ValueError(f"{fn}: {n} shards but only {len(devices)} devices")
            devices = devices[:n]
    devices = tuple(torch.device(d) for d in devices)
    if n is not None and len(devices) != n:
        raise ValueError(f"{fn}: {n} shards but {len(devices)} devices")
    if not devices:
        raise ValueError(f"{fn}: devices must not be empty")
    return devices


def _to_device(t: torch.Tensor, d: torch.device) -> torch.Tensor:
    # Virtual CPU devices all share host memory: no copy for them.
    return t if d.type == "cpu" and t.device.type == "cpu" else t.to(d)


def device_put_sharded(shards: Sequence[Any], devices: Sequence[torch.device] | None = None):
    """Place ``shards[i]`` (a tensor or a pytree of tensors) on ``devices[i]``; a
    pytree of ShardedTensors mapped along a new leading axis comes back."""
    shards = list(shards)
    if not shards:
        raise ValueError("device_put_sharded: shards must not be empty")
    devices = _check_devices(devices, len(shards), "device_put_sharded")
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat = [tree_flatten(s) for s in shards]
    spec = flat[0][1]
    for i, (_, sp) in enumerate(flat):
        if sp != spec:
            raise ValueError(f"device_put_sharded: shard {i} has a different tree structure than shard 0")
    out = []
    for j in range(len(flat[0][0])):
        parts = [_to_device(torch.as_tensor(f[0][j]), d) for f, d in zip(flat, devices)]
        out.append(ShardedTensor(parts, devices, axis=0))
    return tree_unflatten(out, spec)


def device_put_replicated(x: Any, devices: Sequence[torch.device] | None = None):
    """A copy of ``x`` (a tensor or pytree) on every device, as ShardedTensors
    with a leading axis of size len(devices). Each replica gets its own storage,
    so replicas may update their copy in place."""
    devices = _check_devices(devices, None, "device_put_replicated")

    def rep(t):
        t = torch.as_tensor(t)
        return ShardedTensor([t.detach().to(d, copy=True) for d in devices], devices, axis=0)

    return tree_map(rep, x)


def unreplicate(tree: Any):
    """Shard 0 of every ShardedTensor in ``tree`` (no gather, no copy)."""

    def first(v):
        if isinstance(v, ShardedTensor):
            if v.axis != 0:
                return v.unshard().select(v.axis, 0)
            return v.shards[0]
        return v

    return tree_map(first, tree)
