"""ShardedTensor: a logical tensor whose slices along one axis live on devices.

Shard i is the slice ``i`` of the mapped axis, without that axis, on device i
(the layout pmap produces and consumes). Feeding a ShardedTensor back into pmap
with the same devices and axis hands each replica its shard: no copy at all.

It is a ``torch.Tensor`` subclass (a storage-less wrapper, like DTensor) so that
code which checks ``isinstance(x, torch.Tensor)``, ``torch.testing.assert_close``
among it, accepts it. Its metadata (shape, dtype, device of shard 0) answers
without touching data; every other torch function or method runs on the
assembled full tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt
import torch
from torch.utils._pytree import PyTree, tree_map

from ._devices import default_devices, device_str, usable_devices
from .errors import DeletedShardedTensorError

# Tensor methods that only read metadata the wrapper already has.
_METADATA = {
    torch.Tensor.dim,
    torch.Tensor.size,
    torch.Tensor.numel,
    torch.Tensor.nelement,
    torch.Tensor.element_size,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.__len__,
    torch.Tensor.is_contiguous,
    torch.Tensor.get_device,
}


class ShardedTensor(torch.Tensor):
    _shards: tuple[torch.Tensor, ...]
    _devices: tuple[torch.device, ...]
    _axis: int
    _deleted: bool

    @staticmethod
    def __new__(
        cls: type[ShardedTensor], shards: Sequence[torch.Tensor], devices: Sequence[torch.device], axis: int = 0
    ) -> ShardedTensor:
        shards = tuple(shards)
        devices = tuple(torch.device(d) for d in devices)
        if not shards:
            raise ValueError("ShardedTensor needs at least one shard")
        if len(shards) != len(devices):
            raise ValueError(f"ShardedTensor: {len(shards)} shards but {len(devices)} devices")
        first = shards[0]
        for i, s in enumerate(shards):
            if not isinstance(s, torch.Tensor) or isinstance(s, ShardedTensor):
                raise TypeError(
                    f"ShardedTensor: shard {i} is a {type(s).__name__}, not a tensor (or is itself sharded)"
                )
            if s.shape != first.shape or s.dtype != first.dtype:
                raise ValueError(
                    f"ShardedTensor: shard {i} has shape {tuple(s.shape)} and dtype {s.dtype}, "
                    f"but shard 0 has {tuple(first.shape)} and {first.dtype}"
                )
        if not 0 <= axis <= first.ndim:
            raise ValueError(f"ShardedTensor: axis {axis} out of range for shards of rank {first.ndim}")
        shape = list(first.shape)
        shape.insert(axis, len(shards))
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=first.dtype, device=first.device)
        self._shards = shards
        self._devices = devices
        self._axis = axis
        self._deleted = False
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # everything happens in __new__
        pass

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

    # The shards carry autograd, not the wrapper: read-only here, while torch's
    # stubs type Tensor.requires_grad as a plain writable attribute.
    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        self._check_alive()
        return any(s.requires_grad for s in self._shards)

    # -- assembling ---------------------------------------------------------------------
    def unshard(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The full tensor on ``device`` (default: the first shard's device)."""
        self._check_alive()
        target = torch.device(device) if device is not None else self._shards[0].device
        parts = [s.to(target) for s in self._shards]
        return torch.stack(parts, dim=self._axis)

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        full = self.unshard("cpu").detach()
        arr = full.resolve_conj().resolve_neg().numpy()
        return arr.astype(dtype) if dtype is not None else arr

    def numpy(self, *, force: bool = False) -> np.ndarray:
        """The full tensor as a numpy array, with ``torch.Tensor.numpy``'s rules:
        shards that require grad or live on a GPU need ``force=True``."""
        return self.unshard().numpy(force=force)

    def __getitem__(self, index: Any) -> torch.Tensor:
        # An int on the mapped axis (axis 0) is shard i itself: no copy.
        if self._axis == 0 and isinstance(index, int) and not isinstance(index, bool):
            shards = self.shards
            if not -len(shards) <= index < len(shards):
                raise IndexError(f"index {index} is out of bounds for a ShardedTensor with {len(shards)} shards")
            return shards[index]
        return self.unshard()[index]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __len__(self) -> int:
        self._check_alive()
        return self.shape[0]

    # Tensor.__repr__'s own signature. mypy drops the names of a dunder method's
    # parameters, keyword-only ones too, so it cannot match this override to it.
    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        if self._deleted:
            return "ShardedTensor(<deleted>)"
        devs = ", ".join(device_str(d) for d in self._devices)
        body = repr(self.unshard())
        return (
            f"ShardedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, axis={self._axis}, "
            f"devices=[{devs}],\n  {body})"
        )

    def __reduce_ex__(
        self, protocol: SupportsIndex
    ) -> tuple[type[ShardedTensor], tuple[tuple[torch.Tensor, ...], tuple[torch.device, ...], int]]:
        self._check_alive()
        return (ShardedTensor, (self._shards, self._devices, self._axis))

    # -- every other torch function works on the full tensor -----------------------------------
    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Iterable[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "__get__" or func in _METADATA:
            # Attribute reads (shape, dtype, device, ...) and metadata methods:
            # the wrapper knows them without assembling anything.
            for a in args:
                if isinstance(a, ShardedTensor):
                    a._check_alive()
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        return func(*tree_map(_full, args), **tree_map(_full, kwargs))

    # torch's stubs type Tensor.__torch_dispatch__ as a plain function attribute
    # (_disabled_torch_dispatch_impl), not the classmethod that subclasses define.
    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: torch._ops.OpOverload,
        types: Iterable[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # Reached only from C++ paths that skip __torch_function__; same rule.
        return func(*tree_map(_full, args), **tree_map(_full, kwargs or {}))


def _full(v: Any) -> Any:
    return v.unshard() if isinstance(v, ShardedTensor) else v


# -- placement helpers -------------------------------------------------------------------
def _check_devices(devices: Sequence[torch.device] | None, n: int | None, fn: str) -> tuple[torch.device, ...]:
    if devices is None:
        return default_devices(n, fn, f"{n} shards")
    devices = usable_devices(devices, fn)
    if n is not None and len(devices) != n:
        raise ValueError(f"{fn}: {n} shards but {len(devices)} devices")
    return devices


def _to_device(t: torch.Tensor, d: torch.device) -> torch.Tensor:
    # Virtual CPU devices all share host memory: no copy for them.
    return t if d.type == "cpu" and t.device.type == "cpu" else t.to(d)


def device_put_sharded(shards: Sequence[PyTree], devices: Sequence[torch.device] | None = None) -> PyTree:
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


def device_put_replicated(x: PyTree, devices: Sequence[torch.device] | None = None) -> PyTree:
    """A copy of ``x`` (a tensor or pytree) on every device, as ShardedTensors
    with a leading axis of size len(devices). Each replica gets its own storage,
    so replicas may update their copy in place."""
    devices = _check_devices(devices, None, "device_put_replicated")

    def rep(t: Any) -> ShardedTensor:
        t = torch.as_tensor(t)
        return ShardedTensor([t.detach().to(d, copy=True) for d in devices], devices, axis=0)

    return tree_map(rep, x)


def unreplicate(tree: PyTree) -> PyTree:
    """Shard 0 of every ShardedTensor in ``tree`` (no gather, no copy)."""

    def first(v: Any) -> Any:
        if isinstance(v, ShardedTensor):
            if v.axis != 0:
                return v.unshard().select(v.axis, 0)
            return v.shards[0]
        return v

    return tree_map(first, tree)
