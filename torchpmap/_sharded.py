"""ShardedTensor: a logical tensor whose slices along one axis live on devices.

Shard i is the slice ``i`` of the mapped axis, without that axis, on device i
(the layout pmap produces and consumes). Feeding a ShardedTensor back into pmap
with the same devices and axis hands each replica its shard: no copy at all.

It is a ``torch.Tensor`` subclass (a storage-less wrapper, like DTensor) so that
code which checks ``isinstance(x, torch.Tensor)``, ``torch.testing.assert_close``
among it, accepts it. Its metadata (shape, dtype, device of shard 0) answers
without touching data; every other torch function or method runs on the
assembled full tensor.

In-place updates (``x.add_(1)``, ``x[i] = v``, ``x.copy_(t)``, ``out=x``,
``torch.nn.init.*``) write back: the op runs on the full tensor, then every
shard is overwritten in place with its slice of the result, so the shards keep
their storage. Cheaper paths (``x[i] = v`` on the mapped axis, an elementwise op
with Python scalars, ``copy_`` between ShardedTensors of the same layout) update
the shards directly and give the same values. Updates the shards cannot follow
raise instead of being lost: ops that change the shape, strides, dtype or
storage (``transpose_``, ``resize_``, ``set_``, ``.data = t``), ops autograd
would record (use ``torch.no_grad()``), and shards that share memory.

Views: an index that picks one position on the mapped axis (``x[i]`` for axis 0,
``x[:, i]`` for axis 1, and further basic indices) is shard i or a view of it,
and ``x.real``, ``x.imag`` and ``x.data`` are ShardedTensors of the shards'
views, so writes through them reach the shards. Any other view (``x.T``,
``x[1:3]``, ``x.detach()``, ``x.view(-1)``, ``x.contiguous()``, ...) is a view of
a temporary full tensor: it reads like a plain tensor, but is a _TemporaryView,
which refuses every write through it or its own views (in-place ops, ``out=``,
``t[...] = v``, ``t += v``, ``torch.nn.init``, ``inplace=True``) with a
TypeError instead of losing it. Update ``x`` itself or ``x.shards``, or
``.clone()`` the view. pmap hands such a view to its replicas as a plain tensor
and fails the call if a replica writes it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt
import torch
from torch.utils._pytree import PyTree, tree_leaves, tree_map

from . import _transfers
from ._devices import as_device, default_devices, device_str, usable_devices
from ._layout import Layout, Storage, device_groups, mapped_layout
from ._row_layout import faithful
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


# Attributes whose value is a view of the tensor (.data, .real and .imag have their own paths).
_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH"}


class ShardedTensor(torch.Tensor):
    """A logical tensor whose slices along ``axis`` live on ``devices`` (see the
    module doc). In-place ops reach every shard or raise; to change the shards'
    shape or autograd history, update ``x.shards`` and build a new ShardedTensor."""

    _shard_views: tuple[torch.Tensor, ...] | None  # None until first use for from_stacked's lazy rows
    _devices: tuple[torch.device, ...]
    _axis: int
    _deleted: bool
    _layout: Layout | None  # built on first use: most ShardedTensors never need it
    _stacked: tuple[torch.Tensor, ...] | None  # the buffers the shards are views of, when known
    _rows_grad_mode: bool  # from_stacked's grad mode, in which its lazy rows are made
    _overlap: bool | None  # whether shards share memory; None until shards_overlap finds out

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
        self._layout = None
        self._stacked = None
        self._overlap = None  # whether shards share memory: found on first need (shards_overlap)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # everything happens in __new__
        pass

    # from_stacked makes the row views on first use: a stacked runner's result that
    # goes straight into the next call (stacked_buffers) never needs them, and
    # making n views per output per call would cost time that grows with n.
    @property
    def _shards(self) -> tuple[torch.Tensor, ...]:
        shards = self._shard_views
        if shards is None:
            shards = self._shard_views = self._rows_of_stacked()
        return shards

    @_shards.setter
    def _shards(self, shards: tuple[torch.Tensor, ...]) -> None:
        self._shard_views = shards

    def _rows_of_stacked(self) -> tuple[torch.Tensor, ...]:
        buffers = self._stacked
        assert buffers is not None  # only from_stacked leaves the rows to make
        shards: list[torch.Tensor] = [buffers[0]] * len(self._devices)  # every entry is replaced below
        with torch.set_grad_enabled(self._rows_grad_mode):  # views carry the mode they were made in
            for buffer, (_, members) in zip(buffers, device_groups(self._devices)):
                for row, i in enumerate(members):
                    shards[i] = buffer.select(0, row)  # not unbind: autograd refuses in-place ops on its views
        return tuple(shards)

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
        self._stacked = None

    # -- layout and the stacked form (for the SPMD runners) ----------------------------------
    # (Not ``layout``: that is torch's memory layout, torch.strided, which torch itself reads.)
    @property
    def shard_layout(self) -> Layout:
        """How this tensor is laid out over its devices (see ``_layout``)."""
        if self._layout is None:
            self._check_alive()
            if self._stacked is not None:  # _of_batched's (its rows made or not)
                first = self._stacked[0]
                self._layout = _stacked_layout(first.shape[1:], first.dtype, self._axis, self._devices)
            else:
                first = self._shards[0]
                self._layout = mapped_layout(first.shape, first.dtype, self._axis, self._devices)
        return self._layout

    def is_mapped_on(self, axis: int, devices: tuple[torch.device, ...]) -> bool:
        """``shard_layout.is_mapped_on(axis, devices)``, without building the layout:
        pmap asks it of every ShardedTensor it is given, most of them new."""
        return self._axis == axis and self._devices == devices

    @classmethod
    def from_stacked(
        cls, buffers: torch.Tensor | Sequence[torch.Tensor], devices: Sequence[torch.device], axis: int = 0
    ) -> ShardedTensor:
        """The ShardedTensor whose shards are the dim-0 views of ``buffers``: one
        ``(k, ...)`` buffer per physical device, in ``device_groups(devices)`` order,
        row j for that device's j-th replica (a single tensor when every device
        is one physical device, as virtual CPU devices are). No copy: the stacked
        runner's results, which its next call takes back as they are."""
        devices = tuple(torch.device(d) for d in devices)
        buffers = (buffers,) if isinstance(buffers, torch.Tensor) else tuple(buffers)
        return cls._of_stacked(buffers, devices, axis)

    @classmethod
    def _of_stacked(
        cls, buffers: tuple[torch.Tensor, ...], devices: tuple[torch.device, ...], axis: int
    ) -> ShardedTensor:
        """from_stacked for arguments already in its normal form (the stacked
        runner's): the same checks, none of which grows with the number of replicas."""
        _check_stacked_buffers(buffers, device_groups(devices))
        first = buffers[0]
        shard_shape = first.shape[1:]
        for g, b in enumerate(buffers[1:], start=1):
            if b.shape[1:] != shard_shape or b.dtype != first.dtype:
                raise ValueError(
                    f"ShardedTensor.from_stacked: buffer {g} holds rows of shape {tuple(b.shape[1:])} and dtype "
                    f"{b.dtype}, but buffer 0 holds {tuple(shard_shape)} and {first.dtype}"
                )
        if not 0 <= axis <= len(shard_shape):
            raise ValueError(f"ShardedTensor: axis {axis} out of range for shards of rank {len(shard_shape)}")
        st = cls._wrap_stacked(buffers, devices, axis)
        if torch.is_inference_mode_enabled() or any(b.requires_grad for b in buffers):
            st._shard_views = st._rows_of_stacked()  # autograd sees the views when they are made
        st._layout = _stacked_layout(shard_shape, first.dtype, axis, devices)
        return st

    @classmethod
    def _of_batched(
        cls, buffer: torch.Tensor, devices: tuple[torch.device, ...], axis: int, physical: torch.device
    ) -> ShardedTensor | None:
        """``_of_stacked((buffer,), devices, axis)`` for a stacked call's result on
        ``physical``, the devices' one physical device, with ``axis`` in range (the
        output plan checked it), built with no more than it needs: pmap wraps every
        output of every call. None for anything else (rows sharing memory, another
        device), which ``_of_stacked`` then handles as it does."""
        n = len(devices)
        if (
            type(buffer) is not torch.Tensor
            or buffer.ndim == 0
            or buffer.shape[0] != n
            or buffer.device != physical
            or (n > 1 and not buffer.is_contiguous() and _rows_overlap(buffer))
            or buffer.requires_grad
            or torch.is_inference_mode_enabled()  # (both make the shard views at once, as _of_stacked)
        ):
            return None
        return cls._wrap_stacked((buffer,), devices, axis)  # shard_layout builds the layout on first use

    @classmethod
    def _wrap_stacked(
        cls, buffers: tuple[torch.Tensor, ...], devices: tuple[torch.device, ...], axis: int
    ) -> ShardedTensor:
        """The ShardedTensor of ``buffers`` (checked by the caller: rows that share no
        memory, on their devices), its row views and layout not made yet."""
        first = buffers[0]
        shape = list(first.shape)
        shape[0:1] = []
        shape.insert(axis, len(devices))
        st = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=first.dtype, device=first.device)
        st._devices, st._axis, st._deleted, st._stacked = devices, axis, False, buffers
        st._overlap = False  # rows of buffers whose rows share no memory
        st._rows_grad_mode = torch.is_grad_enabled()
        st._shard_views = None
        st._layout = None
        return st

    @classmethod
    def _of_distinct(cls, shards: Sequence[torch.Tensor], devices: Sequence[torch.device], axis: int) -> ShardedTensor:
        """A ShardedTensor of ``distinct_shards(shards)``, known not to overlap."""
        st = cls(distinct_shards(shards), devices, axis)
        st._overlap = False
        return st

    def shards_overlap(self) -> bool:
        """Whether two shards share memory, or one repeats an element (found
        once per ShardedTensor, whose shards are fixed; a shard's own storage
        changed later by ``set_`` is not seen)."""
        if self._overlap is None:
            self._overlap = _overlapping_shards(self.shards) is not None
        return self._overlap

    def stacked_buffers(self) -> tuple[torch.Tensor, ...] | None:
        """Per physical device (``shard_layout.device_groups``), the ``(k, ...)``
        buffer whose dim-0 views the shards are, without a copy; None when the
        shards are not disjoint, evenly spaced views of one storage per device
        (``to_stacked`` copies them into such buffers). Checked on every call, so
        a shard whose storage changed since (``set_``) is never missed."""
        self._check_alive()
        return self._current_buffers(device_groups(self._devices))

    def _current_buffers(
        self, groups: tuple[tuple[torch.device, tuple[int, ...]], ...]
    ) -> tuple[torch.Tensor, ...] | None:
        """``stacked_buffers`` of a ShardedTensor known to be alive."""
        if self._stacked is not None and (
            self._shard_views is None or _still_views_of(self._shard_views, self._stacked, groups)
        ):
            return self._stacked
        return self._restack(groups)

    def _restack(self, groups: tuple[tuple[torch.device, tuple[int, ...]], ...]) -> tuple[torch.Tensor, ...] | None:
        """``stacked_buffers`` when the buffers it had are gone or no longer the shards'."""
        self._stacked = None
        found = [_stacked_view([self._shards[i] for i in members]) for _, members in groups]
        if any(b is None for b in found):
            if self.shard_layout.storage is Storage.STACKED:
                self._layout = self.shard_layout.with_storage(Storage.SHARDS)
            return None
        self._stacked = tuple(b for b in found if b is not None)
        self._layout = self.shard_layout.with_storage(Storage.STACKED)
        return self._stacked

    def _fast_call_buffer(self, axis: int, devices: tuple[torch.device, ...], grad_on: bool) -> torch.Tensor | None:
        """What pmap's fast path (``_fast_call``) asks of a ShardedTensor argument on
        every call, in one call: None where it requires grad (``grad_on``: grad mode is
        on), is not ``is_mapped_on(axis, devices)``, or has no one ``faithful`` stacked
        buffer (``_stacked.sharded_buffer``); else that buffer. The same checks, in the
        same order, as ``requires_grad``, ``is_mapped_on`` and ``sharded_buffer`` (each
        a call of its own: ~10 Python frames a leaf)."""
        self._check_alive()
        if grad_on and self._views_require_grad():
            return None
        if self._axis != axis or self._devices != devices:
            return None
        buffers = self._current_buffers(device_groups(devices))
        if buffers is None or len(buffers) != 1:
            return None
        return buffers[0] if faithful(buffers[0]) else None

    def to_stacked(self) -> ShardedTensor:
        """This tensor in the stacked form: itself when its shards already are
        (``stacked_buffers``), else a copy (one ``torch.stack`` per physical device,
        recorded by autograd) whose shards are views of new buffers; writes to
        that copy do not reach this one."""
        if self.stacked_buffers() is not None:
            return self
        groups = device_groups(self._devices)
        buffers = [torch.stack([self._shards[i] for i in members]) for _, members in groups]
        return ShardedTensor.from_stacked(buffers, self._devices, self._axis)

    def _check_alive(self) -> None:
        """Raise if the shards are not what the ShardedTensor stands for (every read of them checks)."""
        if self._deleted:
            raise DeletedShardedTensorError(
                "this ShardedTensor was donated to a pmap call (donate_argnums) or "
                "deleted, so its buffers may have been reused; use the call's result instead"
            )
        with torch._C.DisableTorchFunctionSubclass():
            history = self.grad_fn
        if history is not None:
            # Autograd recorded the wrapper, whose shards know nothing of it: a gradient through
            # them would silently miss that Function's backward.
            raise RuntimeError(
                f"this ShardedTensor was returned by a torch.autograd.Function ({type(history).__name__}; "
                f"torch.utils.checkpoint(..., use_reentrant=True) is one), which records its history on the "
                f"ShardedTensor, not on its shards, where torchpmap reads it: its gradient would be lost. Return "
                f"x.unshard() from the Function, or use torch.utils.checkpoint(..., use_reentrant=False)"
            )

    # The shards carry autograd, not the wrapper: setting it sets it on every shard.
    @property
    def requires_grad(self) -> bool:
        self._check_alive()
        return self._views_require_grad()

    @requires_grad.setter
    def requires_grad(self, requires_grad: bool) -> None:
        _set_requires_grad(self, requires_grad)

    def _views_require_grad(self) -> bool:
        """``requires_grad`` of a ShardedTensor known to be alive."""
        # A loop, not any() of a generator: pmap reads it of every ShardedTensor it is given.
        views = self._shard_views
        if views is None:  # rows not made yet: views require grad as their buffer does
            views = self._stacked or ()
        for t in views:
            if t.requires_grad:
                return True
        return False

    # .real and .imag are the shards' (views of them), so that writes through
    # them (x.imag += 1, x.real.zero_()) reach the shards. Tensor's own setters
    # go to C++ without __torch_function__, and would write into a temporary full tensor.
    @property
    def real(self) -> torch.Tensor:
        if not self.is_complex():  # x itself, as for a plain tensor
            return self
        return ShardedTensor([s.real for s in self.shards], self._devices, self._axis)

    @real.setter
    def real(self, value: Any) -> None:
        _set_attribute(_tensor_attribute("real").__set__, (self, value))

    @property
    def imag(self) -> torch.Tensor:
        return ShardedTensor([s.imag for s in self.shards], self._devices, self._axis)

    @imag.setter
    def imag(self, value: Any) -> None:
        _set_attribute(_tensor_attribute("imag").__set__, (self, value))

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedTensor:
        # Tensor.__deepcopy__ would go through __torch_function__ and return the
        # full tensor; copy the shards instead (the memo keeps shared ones shared).
        self._check_alive()
        if id(self) not in memo:
            shards = [copy.deepcopy(s, memo) for s in self._shards]
            memo[id(self)] = ShardedTensor(shards, self._devices, self._axis)
        result: ShardedTensor = memo[id(self)]
        return result

    # -- assembling ---------------------------------------------------------------------
    def unshard(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The full tensor on ``device`` (default: the first shard's device)."""
        self._check_alive()
        target = self._shards[0].device if device is None else _unshard_target(device)
        if target.type == "cpu":  # from several GPUs at once, through pinned memory
            return _transfers.stack_on_host(self._shards, self._axis)
        parts = [_transfers.between_gpus_safe(s, target).to(target) for s in self._shards]
        return torch.stack(parts, dim=self._axis)

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        """The full tensor, always a copy: read-only unless a copy was asked for
        (``np.array(x)``), so that a write meant for ``x`` raises instead of
        being lost (``np.asarray`` of a tensor shares its memory; as in JAX)."""
        if copy is False:
            raise ValueError("a ShardedTensor's values cannot be a numpy array without a copy: use np.array(x)")
        full = self.unshard("cpu").detach()
        arr = full.resolve_conj().resolve_neg().numpy()
        arr = arr.astype(dtype) if dtype is not None else arr
        if copy is None:
            arr.flags.writeable = False
        return arr

    def numpy(self, *, force: bool = False) -> np.ndarray:
        """The full tensor as a numpy array, with ``torch.Tensor.numpy``'s rules:
        shards that require grad or live on a GPU need ``force=True``. A copy,
        read-only (see ``__array__``): ``.copy()`` it to write."""
        arr: np.ndarray = self.unshard().numpy(force=force)
        arr.flags.writeable = False
        return arr

    def __getitem__(self, index: Any) -> torch.Tensor:
        # One position on the mapped axis is (a view of) that shard: no copy, and
        # writes through it reach the shard. Anything else views a temporary copy.
        if self._axis == 0 and _is_plain_int(index):
            shards = self.shards
            if not -len(shards) <= index < len(shards):
                raise IndexError(f"index {index} is out of bounds for a ShardedTensor with {len(shards)} shards")
            return shards[index]
        picked = _shard_and_rest(self, index)
        if picked is not None:
            i, rest = picked
            shard = self._shards[i]
            return shard if _picks_everything(rest, shard.ndim) else shard[rest]
        full = self.unshard()
        index = tuple(map(_full, index)) if isinstance(index, tuple) else _full(index)
        result: torch.Tensor = _guard_views(full[index], [full])
        return result

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
        if func is torch.autograd.grad:
            return _autograd_grad(*args, **kwargs)
        if func is torch.autograd.backward:
            return _autograd_backward(*args, **kwargs)
        name = getattr(func, "__name__", None)
        if name == "__get__":
            attribute = _attribute_name(func)
            if attribute == "data":
                return _data(args[0])
            if attribute == "grad":
                return _grad_of(args[0])
            if attribute in _VIEW_ATTRIBUTES:
                # On the full tensor, so that the view it gives can be guarded.
                return _call_on_full_tensors(func, args, kwargs, f".{attribute}")
        elif func in _HOOKS:
            raise RuntimeError(
                f"ShardedTensor.{name}: its shards carry autograd, not the ShardedTensor, so the hook would never "
                f"run: use it on each of x.shards (each shard's gradient), or compute from full = x.unshard() and "
                f"use it on full (the whole tensor's gradient)"
            )
        if name == "__get__" or func in _METADATA:
            # Attribute reads (shape, dtype, device, ...) and metadata methods:
            # the wrapper knows them without assembling anything.
            for a in args:
                if isinstance(a, ShardedTensor):
                    a._check_alive()
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name == "__set__":
            return _set_attribute(func, args)
        if func is torch.Tensor.requires_grad_:
            return _set_requires_grad(*args, **kwargs)
        _refuse_memory_escapes(func, kwargs, "a ShardedTensor")
        done, result = _update_shards_directly(func, args, kwargs)
        if done:
            return result
        return _call_on_full_tensors(func, args, kwargs, _op_name(func))

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
        # Reached only from C++ paths that skip __torch_function__ (set_, for
        # one); same rule.
        return _call_on_full_tensors(func, args, kwargs or {}, func.overloadpacket.__name__)


# A saved ShardedTensor (its __reduce_ex__ calls the class on its shards, devices
# and axis) loads with torch.load's default weights_only=True.
torch.serialization.add_safe_globals([ShardedTensor])


def _unshard_target(device: torch.device | str | int) -> torch.device:
    """Where ``unshard(device)`` puts the full tensor: any CPU device is the host (the
    virtual devices' index says nothing about where memory goes; a multi-process job
    numbers them globally); a GPU must exist (``"cuda"``: the current one), but need
    not be one the call ran on."""
    where = "unshard: device"
    if isinstance(device, (str, torch.device)):
        try:
            named = torch.device(device)
        except RuntimeError:
            named = None  # as_device says what is wrong
        if named is not None and named.type == "cpu":
            return torch.device("cpu")
        if named is not None and named.type == "cuda" and named.index is None and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
    return as_device(device, where)


def _full(v: Any) -> Any:
    return v.unshard() if isinstance(v, ShardedTensor) else v


def _op_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", None) or repr(func)


def _tensor_attribute(name: str) -> Any:
    """Tensor's own descriptor for attribute ``name`` (its __get__ and __set__)."""
    return torch._C.TensorBase.__dict__[name]


# Autograd hooks and retain_grad act on the tensor autograd records, which a
# ShardedTensor is not: its shards are.
_HOOKS = {torch.Tensor.register_hook, torch.Tensor.retain_grad, torch.Tensor.register_post_accumulate_grad_hook}


def _autograd_grad(
    outputs: Any, inputs: Sequence[Any], grad_outputs: Any = None, allow_unused: bool | None = None, **kwargs: Any
) -> tuple[Any, ...]:
    """``torch.autograd.grad`` where a ShardedTensor is among ``outputs`` (its
    full tensor is differentiated) or ``inputs``: autograd records its shards
    (or, for a pmap output, the stacked buffers they are rows of), so the
    gradient is theirs, as a ShardedTensor of the same devices and axis."""

    flat: list[torch.Tensor] = []
    spans: list[tuple[int, int, ShardedTensor | None, bool]] = []  # start, count, input, stacked
    for x in inputs:
        if isinstance(x, ShardedTensor):
            x._check_alive()
            stacked = _autograd_records_buffers(x)
            targets = x._stacked if stacked else x._shards
            assert targets is not None  # (_autograd_records_buffers: only when they exist)
            spans.append((len(flat), len(targets), x, stacked))
            flat.extend(targets)
        else:
            spans.append((len(flat), 1, None, False))
            flat.append(x)
    with torch._C.DisableTorchFunctionSubclass():
        # Unused targets come back as None: a ShardedTensor is unused only if all of them are.
        grads = torch.autograd.grad(_fulls(outputs), flat, _fulls(grad_outputs), allow_unused=True, **kwargs)
    result: list[Any] = []
    for k, (start, count, x, stacked) in enumerate(spans):
        part = list(grads[start : start + count])
        if all(g is None for g in part) and not allow_unused and not kwargs.get("materialize_grads"):
            raise RuntimeError(
                f"torch.autograd.grad: input {k}{' (a ShardedTensor)' if x is not None else ''} appears to not have "
                f"been used in the graph. Set allow_unused=True if this is the desired behavior."
            )
        if x is None:
            result.append(part[0])
        elif all(g is None for g in part):
            result.append(None)
        else:
            part = [torch.zeros_like(t) if g is None else g for g, t in zip(part, flat[start : start + count])]
            if stacked:
                result.append(ShardedTensor._of_stacked(tuple(part), x._devices, x._axis))
            else:
                result.append(ShardedTensor(part, x._devices, x._axis))
    return tuple(result)


def _autograd_backward(
    tensors: Any,
    grad_tensors: Any = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Any = None,
) -> None:
    """``torch.autograd.backward`` (``loss.backward(inputs=...)``) where a ShardedTensor
    is among ``tensors`` (its full tensor is differentiated) or ``inputs``: its shards
    accumulate the gradients (``x.shards[i].grad``), as in a backward without ``inputs``."""
    if inputs is not None:
        mapped: list[Any] = []
        for k, x in enumerate(inputs):
            if not isinstance(x, ShardedTensor):
                mapped.append(x)
                continue
            shards = x.shards
            if not all(s.is_leaf for s in shards):
                raise RuntimeError(
                    f"backward(inputs=...): input {k} is a ShardedTensor computed by autograd (a pmap output), whose "
                    f"shards keep no .grad; use torch.autograd.grad(loss, x), which returns its gradient as a "
                    f"ShardedTensor"
                )
            mapped.extend(shards)
        inputs = tuple(mapped)
    with torch._C.DisableTorchFunctionSubclass():
        torch.autograd.backward(_fulls(tensors), _fulls(grad_tensors), retain_graph, create_graph, inputs=inputs)


def _fulls(v: Any) -> Any:
    """``v`` (a tensor, a sequence of them or None) with each ShardedTensor's full tensor."""
    if isinstance(v, (tuple, list)):
        return type(v)(_fulls(x) for x in v)
    return _full(v)


def _autograd_records_buffers(st: ShardedTensor) -> bool:
    """Whether autograd records ``st`` through its stacked buffers (a pmap output:
    its rows are views made from them, and the next call may read the buffers
    themselves) rather than through its shards (leaves of their own)."""
    buffers = st._stacked
    if buffers is None or not any(b.requires_grad for b in buffers):
        return False
    views = st._shard_views
    return views is None or not all(v.is_leaf for v in views)


def _grad_of(st: ShardedTensor) -> torch.Tensor | None:
    """``st.grad``: the wrapper's own (None), unless its shards have gradients,
    which nothing would see there (an optimizer over ``[st]`` would skip it)."""
    with torch._C.DisableTorchFunctionSubclass():
        own = st.grad
    views = st._shard_views if st._shard_views is not None else ()
    if own is None and any(s.grad is not None for s in views):
        raise RuntimeError(
            "ShardedTensor.grad: the gradients are on its shards (x.shards[i].grad), not on the ShardedTensor; "
            "optimize the shards (torch.optim.SGD(x.shards, ...)), or update x from them under torch.no_grad()"
        )
    return own


def _attribute_name(descriptor_method: Callable[..., Any]) -> str:
    # Tensor.data.__set__ is a method-wrapper bound to the `data` descriptor.
    return str(getattr(getattr(descriptor_method, "__self__", None), "__name__", ""))


# -- views of a temporary full tensor -----------------------------------------------------------


def _within_storage(array: np.ndarray, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``array``'s memory lies in the storage of one of ``tensors``."""
    start = array.__array_interface__["data"][0]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.device.type == "cpu" and storage.data_ptr() <= start < storage.data_ptr() + storage.nbytes():
            return True
    return False


class _TemporaryView(torch.Tensor):
    """A tensor that shares memory with the temporary full tensor an op on a
    ShardedTensor ran on (``x.T``, ``x[1:3]``, ``x.detach()``). It reads like a
    plain tensor; a write through it raises, since it would reach only that
    temporary copy and be lost. Ops on it give plain tensors, except views of
    it, which stay guarded."""

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Iterable[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if any(issubclass(t, ShardedTensor) for t in types):
            return NotImplemented  # ShardedTensor runs it, and guards what it returns
        _refuse_writes_to_views(func, args, kwargs)
        if func is torch.Tensor.__dlpack__:  # (not its storage: torch.compile's fake tensors read that)
            _refuse_memory_escapes(func, kwargs, "a view of a temporary copy of a ShardedTensor (x.T, x.detach())")
        if torch.compiler.is_compiling():
            return _run_while_compiling(func, args, kwargs)
        views = [v for v in tree_leaves((args, kwargs)) if isinstance(v, _TemporaryView)]
        with torch._C.DisableTorchFunctionSubclass():
            versions = [version_of(v) for v in views]
            result = func(*args, **kwargs)
            if [version_of(v) for v in views] != versions:  # wrote without saying so (batch_norm's running stats)
                raise TypeError(_lost_write_message(f"{_op_name(func)} wrote into"))
            if isinstance(result, np.ndarray) and _within_storage(result, views):  # numpy(), np.asarray
                result.flags.writeable = False  # a write would be lost with the temporary, as a tensor's would
            return _guard_views(result, views)

    # Tensor's own .real/.imag setters skip __torch_function__.
    @property
    def real(self) -> torch.Tensor:
        return _tensor_attribute("real").__get__(self)

    @real.setter
    def real(self, value: Any) -> None:
        raise TypeError(_lost_write_message(".real = would write into"))

    @property
    def imag(self) -> torch.Tensor:
        return _tensor_attribute("imag").__get__(self)

    @imag.setter
    def imag(self, value: Any) -> None:
        raise TypeError(_lost_write_message(".imag = would write into"))

    # Printing, copying and saving see a plain tensor (a copy is one).
    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]  # as ShardedTensor's
        with _as_plain_tensor(self):
            return torch._tensor_str._str(self, tensor_contents=tensor_contents)

    def __copy__(self) -> torch.Tensor:
        return self.view_as(self)  # shares the memory, as copy.copy of a tensor does: guarded too

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
        with _as_plain_tensor(self):
            return copy.deepcopy(self, memo)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        with _as_plain_tensor(self):
            return self.__reduce_ex__(protocol)


# torch turns a TypeError raised inside `t += v` into NotImplemented, and Python
# then rebinds t to t + v, a new tensor: the write would be lost without a word.
# So _TemporaryView refuses these operators itself, before torch runs them.
_IN_PLACE_OPERATOR_SYMBOLS = {
    "__iadd__": "+=",
    "__isub__": "-=",
    "__imul__": "*=",
    "__itruediv__": "/=",
    "__idiv__": "/=",
    "__ifloordiv__": "//=",
    "__imod__": "%=",
    "__ipow__": "**=",
    "__iand__": "&=",
    "__ior__": "|=",
    "__ixor__": "^=",
    "__ilshift__": "<<=",
    "__irshift__": ">>=",
}


def _refusing_operator(symbol: str) -> Callable[[_TemporaryView, Any], Any]:
    def refuse(view: _TemporaryView, other: Any) -> Any:
        raise TypeError(_lost_write_message(f"{symbol} would write into"))

    return refuse


for _name, _symbol in _IN_PLACE_OPERATOR_SYMBOLS.items():
    setattr(_TemporaryView, _name, _refusing_operator(_symbol))


def _run_while_compiling(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``func`` as torch.compile traces it: Dynamo can tell a view by its ``_base``
    but not by its storage, so the views an op on a view gives stay guarded."""
    with torch._C.DisableTorchFunctionSubclass():
        result = func(*args, **kwargs)
        if not args or not isinstance(args[0], _TemporaryView):
            return result

        def guard(v: Any) -> Any:
            if type(v) is not torch.Tensor or v._base is None:
                return v
            # view_as first: Dynamo fails on as_subclass of an attribute (x.T) itself.
            return v.view_as(v).as_subclass(_TemporaryView)

        return guard(result) if isinstance(result, torch.Tensor) else tree_map(guard, result)


@contextlib.contextmanager
def _as_plain_tensor(view: torch.Tensor) -> Iterator[None]:
    """``view`` seen as a plain tensor, for torch code that treats subclasses apart."""
    view.__class__ = torch.Tensor
    try:
        yield
    finally:
        view.__class__ = _TemporaryView


def _guard_views(result: Any, temporaries: Sequence[torch.Tensor]) -> Any:
    """``result`` with every plain tensor that shares memory with one of
    ``temporaries`` made a _TemporaryView (in place: the op made it)."""
    if not temporaries:
        return result
    with torch._C.DisableTorchFunctionSubclass():
        keys = {s._cdata for s in map(_storage_of, temporaries) if s is not None}

        def guard(v: Any) -> Any:
            if type(v) is torch.Tensor:
                storage = _storage_of(v)
                if storage is not None and storage._cdata in keys:
                    v.__class__ = _TemporaryView
            return v

        # Most ops give one tensor: no tree to walk.
        return guard(result) if isinstance(result, torch.Tensor) else tree_map(guard, result)


def _storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    t = _innermost(t)
    return t.untyped_storage() if _may_have_storage(t) else None


def _innermost(t: torch.Tensor) -> torch.Tensor:
    """``t``, or under torch.func.grad or vmap the tensor its functorch wrappers hold
    (a wrapper raises when asked for its storage)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _may_have_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is of a kind that has a storage (a functorch wrapper still
    raises when asked for it: unwrap it first)."""
    return t.layout is torch.strided and not t.is_nested and not t.is_meta  # (no device object made)


# Tensor.__iand__ & co. reach __torch_function__ under their own names (`t += v`
# comes as add_); Tensor.__setitem__ writes too.
_IN_PLACE_OPERATORS = {*_IN_PLACE_OPERATOR_SYMBOLS, "__setitem__"}
# In place by name, but they change only the tensor's own autograd state, no values.
_NOT_WRITES = {"requires_grad_", "detach_"}


def _is_in_place_name(name: str) -> bool:
    return name in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES)


@torch.compiler.assume_constant_result  # Dynamo calls it while tracing, on the function it traces
def _is_in_place_function(func: Callable[..., Any]) -> bool:
    # An operator overload is named with its overload: torch.ops.aten.add_.Tensor is "add_.Tensor".
    return _is_in_place_name(_op_name(func).split(".")[0])


def _writes_first_argument(func: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    return kwargs.get("inplace") is True or _is_in_place_function(func)  # F.relu(t, inplace=True)


def _refuse_writes_to_views(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Raise, before anything runs, if ``func`` would write into a _TemporaryView."""
    name, targets = _write_targets(func, args, kwargs)
    if any(isinstance(v, _TemporaryView) for v in tree_leaves(targets)):
        raise TypeError(_lost_write_message(f"{name} would write into"))


# Ways to reach a tensor's memory that no op sees: a write through them could not be
# refused, and a ShardedTensor's full tensor (and its views) is a temporary copy.
_STORAGE_GETTERS = {torch.Tensor.untyped_storage, torch.Tensor.storage, torch.Tensor._typed_storage}


def _refuse_memory_escapes(func: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Raise if ``func`` hands out the memory of ``what`` (its storage, or a DLPack capsule
    that is not a copy): what is written there would be lost with the temporary, unseen."""
    if func in _STORAGE_GETTERS:
        raise TypeError(
            f"{_op_name(func)}() of {what}: its memory would be a temporary copy, where a write is lost; use a "
            f"shard's (x.shards[i].untyped_storage()), or x.unshard() for a tensor of your own"
        )
    if func is torch.Tensor.__dlpack__ and kwargs.get("copy") is not True:
        # The array API lets copy=None export a copy, but a PyTorch consumer writes into
        # from_dlpack's result expecting the producer to see it, as with any tensor: only an
        # explicit copy=True is one's own. (BufferError, the array API's export error;
        # torch.from_dlpack retries a TypeError with other arguments.)
        raise BufferError(
            f"DLPack export of {what}: it can only be exported as a copy, which a write meant for it would not "
            f"reach; pass copy=True (torch.from_dlpack(x, copy=True)), or export one shard (x.shards[i])"
        )


def _write_targets(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, list[Any]]:
    """``func``'s name for messages, and the arguments it writes in place."""
    first = []
    if _writes_first_argument(func, kwargs):
        # nn.init's functions name it: nn.init.constant_(tensor=x, val=0).
        first = [args[0]] if args else [kwargs.get(k) for k in ("tensor", "input", "self") if k in kwargs][:1]
    if torch.compiler.is_compiling():  # only what Dynamo traces: no names, no signatures
        return "an in-place op", [*first, kwargs.get("out")]
    return _op_name(func), [*first, kwargs.get("out"), *written_without_saying(func, args, kwargs)]


# Functions that update arguments in place without a name that says so:
# function -> (the argument that makes them update when not None or False, the arguments they update).
_WRITES_WITHOUT_SAYING = {
    torch.nn.functional.batch_norm: ("training", ("running_mean", "running_var")),
    torch.nn.functional.instance_norm: ("use_input_stats", ("running_mean", "running_var")),
    torch.nn.functional.embedding: ("max_norm", ("weight",)),  # renormalises the rows it looks up
}


def written_without_saying(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The arguments ``func`` updates in place without a name that says so (nor, for
    batch_norm's statistics, a version count)."""
    if func not in _WRITES_WITHOUT_SAYING:
        return []
    flag, updated = _WRITES_WITHOUT_SAYING[func]
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    value = bound.arguments[flag]
    return [bound.arguments[a] for a in updated] if value is not None and value is not False else []


def _lost_write_message(lead: str) -> str:
    return (
        f"{lead} a view of a temporary copy of a ShardedTensor (the result of an op such as x.T, x[1:3] or "
        "x.detach() on it), where a write is lost; update the ShardedTensor itself (x[...] = v, x.copy_(t), "
        "an in-place op on x) or each of x.shards, or .clone() the view for a tensor of your own"
    )


def _plain_view(view: _TemporaryView) -> torch.Tensor:
    """A plain tensor over ``view``'s memory, for code that cannot take the
    subclass (torch.compile's kernels); its writes show in view._version."""
    with torch._C.DisableTorchFunctionSubclass():
        return view.view_as(view)


def version_of(t: torch.Tensor | None) -> int | None:
    """``t._version``, or None for no tensor or an inference tensor (which counts no versions)."""
    return None if t is None or t.is_inference() else t._version


# -- in-place updates ----------------------------------------------------------------------------
# Every path checks everything before it writes anything, so an update that
# raises leaves the ShardedTensor as it was.

_OWN_MEMORY = "ShardedTensor([s.clone() for s in x.shards], x.devices, x.axis)"


def _data(st: ShardedTensor) -> ShardedTensor:
    """``x.data``: the shards' ``.data``, so that ``x.data.add_(1)`` updates x."""
    return ShardedTensor([s.data for s in st.shards], st.devices, st.axis)


def _set_attribute(setter: Callable[..., Any], args: Sequence[Any]) -> Any:
    st, value = args
    attr = _attribute_name(setter)
    if attr in ("real", "imag"):  # copies values into the real or imaginary part
        return _call_on_full_tensors(setter, args, {}, f".{attr} =", writes_first=True)
    if not isinstance(st, ShardedTensor):
        return setter(*tree_map(_full, args))
    hint = "; to copy values in, use `with torch.no_grad(): x.copy_(value)`" if attr == "data" else ""
    raise TypeError(
        f"ShardedTensor: setting .{attr} in place would not reach its shards; set it on each of x.shards instead{hint}"
    )


def _set_requires_grad(st: ShardedTensor, requires_grad: bool = True) -> ShardedTensor:
    shards = st.shards
    if not requires_grad:
        for i, s in enumerate(shards):
            if not s.is_leaf:
                raise RuntimeError(
                    f"ShardedTensor.requires_grad_(False): shard {i} was computed by autograd (it is not a "
                    "leaf), so its flag cannot change; use x.detach() for a tensor outside the graph"
                )
    for s in shards:
        s.requires_grad_(requires_grad)
    return st


@dataclass(frozen=True)
class _Geometry:
    """What an in-place op on the full tensor must leave alone for the shards to follow it."""

    shape: torch.Size
    stride: tuple[int, ...]
    storage_offset: int
    dtype: torch.dtype
    device: torch.device
    data_ptr: int

    @staticmethod
    def of(t: torch.Tensor) -> _Geometry:
        t = _innermost(t)  # made inside torch.func.grad or vmap
        if t.layout != torch.strided:  # no strides or storage to compare
            return _Geometry(t.shape, (), 0, t.dtype, t.device, 0)
        storage = t.untyped_storage().data_ptr()
        return _Geometry(t.shape, t.stride(), int(t.storage_offset()), t.dtype, t.device, storage)


class _FullCopy:
    """The full tensor an op runs on in place of a ShardedTensor, and what it was
    like before, to tell afterwards whether and how the op changed it."""

    def __init__(self, st: ShardedTensor) -> None:
        self.sharded = st
        self.full = st.unshard()
        self._geometry = _Geometry.of(self.full)
        self._version = version_of(self.full)
        self._autograd = (self.full.requires_grad, self.full.grad_fn)
        # Under inference mode the copy counts no versions: then whether the op
        # wrote it is read from the op itself (its name, out=).
        self.written_by_name = False

    @property
    def written(self) -> bool:
        if self._version is None:
            return self.written_by_name
        return self.written_by_name or self.full._version != self._version

    def check_shards_can_follow(self, name: str) -> None:
        if _Geometry.of(self.full) != self._geometry:
            raise TypeError(
                f"ShardedTensor: {name} changes its shape, strides, dtype or storage in place, which its "
                "shards cannot follow; use the out-of-place op, or build a new ShardedTensor from changed "
                "x.shards"
            )
        autograd_changed = (self.full.requires_grad, self.full.grad_fn) != self._autograd
        if autograd_changed and not self.written:  # detach_, for one
            raise TypeError(
                f"ShardedTensor: {name} changes its autograd state in place, which its shards cannot follow; "
                "build a new ShardedTensor from x.shards (ShardedTensor([s.detach() for s in x.shards], "
                "x.devices, x.axis)), or update x.shards"
            )
        if autograd_changed and torch.is_grad_enabled():
            raise RuntimeError(
                f"ShardedTensor: {name} would update it in place while autograd records, and its shards "
                "cannot take that history; run it under torch.no_grad(), or update each of x.shards in "
                "place (for s in x.shards: ...), which autograd records shard by shard"
            )


def _call_on_full_tensors(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], name: str, *, writes_first: bool = False
) -> Any:
    """Run ``func`` on the full tensors; write what it changed back into the shards.
    ``writes_first``: it writes its first argument whatever its name (a setter)."""
    copies: dict[tuple[Any, ...], _FullCopy] = {}
    # The keys before any copy is made: making one makes a stacked result's row views, which
    # changes its key, and a second mention of it got a copy of its own (a stale read, a lost write).
    keys = {id(v): _alias_key(v) for v in tree_leaves((args, kwargs)) if isinstance(v, ShardedTensor)}

    def to_full(v: Any) -> Any:
        if not isinstance(v, ShardedTensor):
            return v
        # One full tensor per ShardedTensor, and per ShardedTensors over the same shards
        # (copy.copy(x)): aliasing as in torch (_foreach_add_([x, y], 1) adds 2 where y is x's).
        key = keys[id(v)]
        copy = copies.get(key)
        if copy is None:
            copy = copies[key] = _FullCopy(v)
        return copy.full

    result = func(*tree_map(to_full, args), **tree_map(to_full, kwargs))

    if any(c.full.is_inference() for c in copies.values()):
        targets = {id(v) for v in tree_leaves(_write_targets(func, args, kwargs)[1])}
    else:  # batch_norm updates its running statistics without counting a version
        targets = {id(v) for v in written_without_saying(func, args, kwargs)}
    if writes_first and args:
        targets.add(id(args[0]))
    for c in copies.values():
        c.written_by_name = id(c.sharded) in targets
    for c in copies.values():
        c.check_shards_can_follow(name)
    written = [c for c in copies.values() if c.written]
    if len(written) > 1:
        _refuse_overlapping_write_backs(written, name)
    for c in written:
        _check_shards_writable(c.sharded, name)
    for c in written:
        _write_back(c.sharded, c.full)

    if written or (name.endswith("_") and not name.startswith("__")):  # in place: give back x, not its copy
        sharded_of = {id(c.full): c.sharded for c in copies.values()}
        result = tree_map(lambda v: sharded_of.get(id(v), v) if isinstance(v, torch.Tensor) else v, result)
    return _guard_views(result, [c.full for c in copies.values()])


def _alias_key(st: ShardedTensor) -> tuple[Any, ...]:
    """What tells apart the ShardedTensors an op gets one full tensor each for:
    their axis and the tensors their shards are (or the stacked buffers of a
    pmap output whose rows were never asked for)."""
    if st._shard_views is None and st._stacked is not None:
        return (st._axis, "stacked", *map(id, st._stacked))
    return (st._axis, "shards", *map(id, st._shards))


def _refuse_overlapping_write_backs(written: list[_FullCopy], name: str) -> None:
    """Raise if two ShardedTensors an op wrote share memory without being over the
    same shards: each was written in its own full copy, so writing both back would
    keep one update and lose the other."""
    shards = [s for c in written for s in c.sharded._shards]
    owner = [k for k, c in enumerate(written) for _ in c.sharded._shards]
    for i, j in pairs_sharing_memory(shards):
        if owner[i] != owner[j]:
            raise RuntimeError(
                f"ShardedTensor: {name} writes two ShardedTensors whose shards share memory, which torchpmap "
                f"cannot update as one tensor (only ShardedTensors over the very same shards are); update them "
                f"one after the other"
            )


def _write_back(st: ShardedTensor, full: torch.Tensor) -> None:
    # The op already ran (and autograd was checked) on the full tensor: copying
    # its values back is not part of the graph.
    with torch.no_grad():
        for i, s in enumerate(st._shards):
            s.copy_(full.select(st._axis, i))


def _check_shards_writable(st: ShardedTensor, name: str) -> None:
    """Raise unless every shard can be overwritten on its own, before any is."""
    shards = st.shards
    for i, s in enumerate(shards):
        if s.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"ShardedTensor: {name} would update it in place, but shard {i} is an inference tensor, "
                f"which only torch.inference_mode() may update; update a copy (x = {_OWN_MEMORY})"
            )
    overlap = _overlapping_shards(shards)
    if overlap is not None:
        i, j = overlap
        where = f"shard {i} overlaps itself" if i == j else f"shards {i} and {j} share memory"
        raise RuntimeError(
            f"ShardedTensor: {name} cannot update it in place because {where} (a tensor broadcast to every "
            "replica and returned, for one), so they cannot hold different values; give the shards their "
            f"own memory first (x = {_OWN_MEMORY}), or update x.shards directly"
        )


def _overlapping_shards(shards: Sequence[torch.Tensor]) -> tuple[int, int] | None:
    """The first pair (i, j) of shards that share memory, (i, i) for a shard
    that repeats an element (an expanded tensor), or None."""
    for i, s in enumerate(shards):
        if torch._debug_has_internal_overlap(s) == 1:  # 1: MemOverlap::Yes
            return i, i
    return next(pairs_sharing_memory(shards), None)


def distinct_shards(shards: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """``shards``, with every shard that shares memory with another replaced by
    a copy. Replicas that return one tensor (a broadcast input, on virtual CPU
    devices) must not make shards that are one buffer, where an update of one
    shard would change them all (and the caller's tensor). Shards that are
    disjoint views of one storage (replicas returning their slices of an
    input) stay views."""
    if len(shards) < 2:
        return shards
    try:
        storages = [s.untyped_storage().data_ptr() for s in shards]
    except (RuntimeError, NotImplementedError):  # a layout without storage: nothing to share
        return shards
    if len(set(storages)) == len(storages):  # the common case: every shard has its own storage
        return shards
    shared = {k for pair in pairs_sharing_memory(shards) for k in pair}
    if not shared:
        return shards
    return [s.clone() if k in shared else s for k, s in enumerate(shards)]


# -- the stacked form -----------------------------------------------------------------------


def _check_stacked_buffers(
    buffers: Sequence[torch.Tensor], groups: tuple[tuple[torch.device, tuple[int, ...]], ...]
) -> None:
    """Raise unless ``buffers`` hold one (k, ...) buffer per device group, on its
    physical device, with rows that share no memory (as distinct_shards ensures for
    the shards of eager replicas)."""
    if len(buffers) != len(groups):
        raise ValueError(
            f"ShardedTensor.from_stacked: {len(buffers)} buffers, but the devices are {len(groups)} physical "
            f"devices ({', '.join(str(p) for p, _ in groups)}); pass one buffer per physical device"
        )
    for g, (buffer, (physical, members)) in enumerate(zip(buffers, groups)):
        if not isinstance(buffer, torch.Tensor) or isinstance(buffer, ShardedTensor):
            raise TypeError(f"ShardedTensor.from_stacked: buffer {g} is a {type(buffer).__name__}, not a tensor")
        if buffer.ndim == 0 or buffer.shape[0] != len(members):
            raise ValueError(
                f"ShardedTensor.from_stacked: buffer {g} has shape {tuple(buffer.shape)}, but {physical} "
                f"holds {len(members)} replicas; its dim 0 must have that size"
            )
        if buffer.device != physical:
            raise ValueError(f"ShardedTensor.from_stacked: buffer {g} is on {buffer.device}, not on {physical}")
        if len(members) > 1 and _rows_overlap(buffer):
            raise ValueError(
                f"ShardedTensor.from_stacked: the rows of buffer {g} share memory (an expand()ed tensor, "
                "for one), so its shards could not hold different values; pass buffer.clone()"
            )


@functools.lru_cache(maxsize=1024)
def _stacked_layout(
    shard_shape: torch.Size, dtype: torch.dtype, axis: int, devices: tuple[torch.device, ...]
) -> Layout:
    return mapped_layout(shard_shape, dtype, axis, devices).with_storage(Storage.STACKED)


def _rows_overlap(buffer: torch.Tensor) -> bool:
    overlap = torch._debug_has_internal_overlap(buffer)  # 0: no, 1: yes, 2: too hard to tell
    if overlap != 2:
        return overlap == 1
    return _overlapping_shards(buffer.unbind(0)) is not None


def _still_views_of(
    shards: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    groups: tuple[tuple[torch.device, tuple[int, ...]], ...],
) -> bool:
    """Whether every shard is still the dim-0 view of its buffer that from_stacked
    made (a shard's own storage or geometry may have been changed since, by set_)."""
    # By address, not storage (a storage object per shard per call costs): a shard
    # that starts at its row's address on the buffer's device, with the row's
    # geometry, is that row's memory, the buffer keeping it alive.
    for buffer, (_, members) in zip(buffers, groups):
        # What _storage_key asks, without making a storage object (~1.5 us a call).
        if not _may_have_storage(buffer):
            return False
        try:
            address = buffer.data_ptr()
        except (RuntimeError, NotImplementedError):  # no storage (a functorch wrapper, for one)
            return False
        strides = buffer.stride()
        step = strides[0] * buffer.element_size()
        stride, shape, dtype, grad = strides[1:], buffer.shape[1:], buffer.dtype, buffer.requires_grad
        # The device by its index and the address (device objects cost ~0.3 us a shard): an address
        # on another device type is in another range (CUDA's unified addressing), never the row's.
        index = buffer.get_device()
        for row, i in enumerate(members):
            s = shards[i]
            try:
                if s.data_ptr() != address + row * step:
                    return False
            except RuntimeError:  # no storage (a functorch wrapper, for one)
                return False
            # requires_grad_() on the shards: autograd must see them.
            if s.get_device() != index or s.dtype is not dtype or s.requires_grad != grad:  # (dtypes are singletons)
                return False
            if s.stride() != stride or s.shape != shape:
                return False
    return True


def _stacked_view(shards: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The (k, ...) tensor whose dim-0 rows are ``shards``, as a view of their
    storage (no copy); None unless they are disjoint views of one storage, with one
    geometry, at evenly increasing offsets. With autograd, a view of the tensor they
    were all taken from, so that gradients reach it."""
    first = shards[0]
    if len(shards) == 1:
        return first.unsqueeze(0)
    key = _storage_key(first)
    if key is None or any(_storage_key(s) != key for s in shards[1:]):
        return None
    offset, stride = first.storage_offset(), first.stride()
    step = shards[1].storage_offset() - offset
    if step <= 0:  # the same memory, or rows in decreasing order (no negative strides)
        return None
    for row, s in enumerate(shards):
        if s.storage_offset() != offset + row * step or s.stride() != stride or s.device != first.device:
            return None
    source: torch.Tensor | None = first
    if any(s.requires_grad for s in shards):
        source = first._base
        if any(s._base is not source for s in shards):
            source = None
    if source is None or any(s.requires_grad != source.requires_grad for s in shards):
        return None  # no tensor that autograd connects to every shard
    try:
        view = source.as_strided((len(shards), *first.shape), (step, *stride), offset)
    except RuntimeError:  # past the end of the storage
        return None
    return None if _rows_overlap(view) else view


def _storage_key(t: torch.Tensor) -> int | None:
    """An id of ``t``'s storage (shared by all its views), None when it has none."""
    try:
        storage = _storage_of(t)
    except (RuntimeError, NotImplementedError):  # a functorch wrapper, for one
        return None
    return None if storage is None else int(storage._cdata)


def pairs_sharing_memory(shards: Sequence[torch.Tensor]) -> Iterator[tuple[int, int]]:
    """Every pair (i, j), i < j, of shards that share an element. A sweep over
    the shards' address ranges in order: only ranges that overlap need the
    element-wise check (interleaved views overlap in range only)."""
    spans = sorted((span, k) for k, span in enumerate(map(_byte_span, shards)) if span is not None)
    active: list[tuple[int, int]] = []  # (end, k) of the ranges that may still overlap the next one
    for (begin, end), k in spans:
        active = [(e, i) for e, i in active if e > begin]
        for _, i in active:
            if shards[i] is shards[k] or _share_an_element(shards[i], shards[k]):
                yield min(i, k), max(i, k)
        active.append((end, k))


def _byte_span(t: torch.Tensor) -> tuple[int, int] | None:
    """The addresses [first, end) that ``t`` covers, None when empty. Addresses,
    not storages: two storages can view one buffer (torch.from_numpy of overlapping
    numpy views)."""
    numel, start, itemsize = t.numel(), t.data_ptr(), t.element_size()
    if numel == 0:
        return None
    if t.is_contiguous():
        return start, start + numel * itemsize
    offsets = [(size - 1) * stride for size, stride in zip(t.shape, t.stride())]
    lo = sum(min(0, o) for o in offsets)
    hi = sum(max(0, o) for o in offsets) + 1
    return start + lo * itemsize, start + hi * itemsize


def _share_an_element(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Interleaved views (the columns of one matrix) overlap in range but not in
    # elements: compare the elements' positions themselves.
    shift, misaligned = divmod(b.data_ptr() - a.data_ptr(), a.element_size())
    if misaligned:
        return True  # elements straddle each other: some bytes are shared
    return bool(torch.isin(_element_offsets(a), _element_offsets(b) + shift).any())


def _element_offsets(t: torch.Tensor) -> torch.Tensor:
    """Each element's position in ``t``'s storage, counted from its first element."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return offsets.reshape(-1)


# -- cheaper paths that update the shards directly ---------------------------------------------
# Each gives exactly the values the write-back gives: it runs the same op on the
# same elements, and only when autograd records nothing.

# Elementwise in-place ops whose result per element depends only on that element
# and on Python scalars, and is exactly rounded however the kernel is vectorized.
_ELEMENTWISE_WITH_SCALARS = {
    torch.Tensor.add_,
    torch.Tensor.sub_,
    torch.Tensor.mul_,
    torch.Tensor.fill_,
    torch.Tensor.zero_,
    torch.Tensor.neg_,
    torch.Tensor.clamp_,
    torch.Tensor.clamp_min_,
    torch.Tensor.clamp_max_,
    torch.Tensor.clip_,
}
_SCALAR_KWARGS = {"min", "max"}  # not alpha: a fused multiply-add may round differently


def _update_shards_directly(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """(True, result) when a cheaper path updated the shards, else (False, None)."""
    if not args or not isinstance(args[0], ShardedTensor):
        return False, None
    st = args[0]
    if func is torch.Tensor.__setitem__ and len(args) == 3:
        return _set_one_shard(st, args[1], args[2])
    if func in _ELEMENTWISE_WITH_SCALARS:
        return _elementwise_with_scalars(func, st, args[1:], kwargs)
    if func is torch.Tensor.copy_ and len(args) == 2 and set(kwargs) <= {"non_blocking"}:
        return _copy_shard_by_shard(st, args[1], kwargs)
    return False, None


def _records_autograd(tensors: Iterable[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, complex))


def _elementwise_with_scalars(
    func: Callable[..., Any], st: ShardedTensor, rest: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[bool, Any]:
    if not all(_is_scalar(v) for v in rest) or not set(kwargs) <= _SCALAR_KWARGS:
        return False, None
    if not all(_is_scalar(v) for v in kwargs.values()) or _records_autograd(st.shards):
        return False, None
    if st.dtype.is_complex:  # a vectorized complex product may round unlike the scalar one
        return False, None
    _check_shards_writable(st, _op_name(func))
    for s in st._shards:  # a dtype error raises at shard 0, before any write
        func(s, *rest, **kwargs)
    return True, st


def _copy_shard_by_shard(st: ShardedTensor, src: Any, kwargs: dict[str, Any]) -> tuple[bool, Any]:
    if not isinstance(src, ShardedTensor) or src.axis != st.axis or len(src.shards) != len(st.shards):
        return False, None
    if src.shards[0].shape != st.shards[0].shape or _records_autograd([*st.shards, *src.shards]):
        return False, None
    ours = {s.untyped_storage().data_ptr() for s in st.shards}
    if any(s.untyped_storage().data_ptr() in ours for s in src.shards):
        return False, None  # one shard's copy could overwrite another's source: write back instead
    _check_shards_writable(st, "copy_")
    for s, o in zip(st._shards, src._shards):
        s.copy_(o, **kwargs)
    return True, st


def _set_one_shard(st: ShardedTensor, index: Any, value: Any) -> tuple[bool, Any]:
    """``x[index] = value`` where ``index`` picks one position on the mapped axis."""
    picked = _shard_and_rest(st, index)
    if picked is None:
        return False, None
    i, rest = picked
    value = _full(value)
    if _records_autograd([*st.shards, value]):
        return False, None
    _check_shards_writable(st, "__setitem__")
    st._shards[i][rest] = value
    return True, None


def _shard_and_rest(st: ShardedTensor, index: Any) -> tuple[int, Any] | None:
    """(i, rest) when ``x[index]`` is ``x.shards[i][rest]`` with basic indexing only:
    full slices before the mapped axis, an int on it, then ints, slices, None, ...."""
    parts = index if isinstance(index, tuple) else (index,)
    axis, n = st.axis, len(st.shards)
    if len(parts) <= axis or not all(_is_full_slice(p) for p in parts[:axis]):
        return None
    i, after = parts[axis], parts[axis + 1 :]
    if not _is_plain_int(i) or not -n <= i < n or not all(_is_basic_index(p) for p in after):
        return None
    rest = parts[:axis] + after
    return i % n, rest if rest else Ellipsis


def _picks_everything(index: Any, ndim: int) -> bool:
    """Whether ``t[index]`` is all of ``t`` (``...``, or up to ``ndim`` full slices)."""
    parts = index if isinstance(index, tuple) else (index,)
    return len(parts) <= ndim and all(p is Ellipsis or _is_full_slice(p) for p in parts) and parts.count(...) <= 1


def _is_plain_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # torch reads True as a mask


def _is_full_slice(v: Any) -> bool:
    return isinstance(v, slice) and v.start is None and v.stop is None and v.step is None


def _is_basic_index(v: Any) -> bool:
    if isinstance(v, slice):
        return all(b is None or _is_plain_int(b) for b in (v.start, v.stop, v.step))
    return v is None or v is Ellipsis or _is_plain_int(v)


# -- placement helpers -------------------------------------------------------------------
def tensor_leaves(tree: PyTree, fn: str, prefix: str = "") -> tuple[list[torch.Tensor], Any]:
    """The leaves of ``tree`` as tensors (arrays and numbers converted), and its
    structure; a leaf that is none of those raises a TypeError naming it."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    pairs, spec = tree_flatten_with_path(tree)
    out = []
    for path, v in pairs:
        if not isinstance(v, torch.Tensor):
            if isinstance(v, np.ndarray) and not v.flags.writeable:
                v = v.copy()  # torch.as_tensor would share (and write) read-only memory
            try:
                v = torch.as_tensor(v)
            except (TypeError, RuntimeError, ValueError):
                where = f"{prefix}{keystr(path)}" or "the value"
                raise TypeError(f"{fn}: {where} is a {type(v).__name__}, not a tensor, array or number") from None
        out.append(v)
    return out, spec


def _check_devices(devices: Sequence[torch.device] | None, n: int | None, fn: str) -> tuple[torch.device, ...]:
    if devices is None:
        return default_devices(n, fn, f"{n} shards")
    devices = usable_devices(devices, fn)
    if n is not None and len(devices) != n:
        raise ValueError(f"{fn}: {n} shards but {len(devices)} devices")
    return devices


def device_put_sharded(shards: Sequence[PyTree], devices: Sequence[torch.device] | None = None) -> PyTree:
    """Place ``shards[i]`` (a tensor or a pytree of tensors) on ``devices[i]``; a
    pytree of ShardedTensors mapped along a new leading axis comes back. When the
    devices are one physical device (virtual CPU devices), a leaf's shards become
    the rows of one buffer (a copy, unless they already are such rows), the form
    the stacked executor reads without copying."""
    shards = list(shards)
    if not shards:
        raise ValueError("device_put_sharded: shards must not be empty")
    devices = _check_devices(devices, len(shards), "device_put_sharded")
    from torch.utils._pytree import tree_unflatten

    flat = [tensor_leaves(s, "device_put_sharded", f"shards[{i}]") for i, s in enumerate(shards)]
    spec = flat[0][1]
    for i, (_, sp) in enumerate(flat):
        if sp != spec:
            raise ValueError(f"device_put_sharded: shard {i} has a different tree structure than shard 0")
    out = []
    for j in range(len(flat[0][0])):
        parts = [_transfers.to_device(f[0][j], d) for f, d in zip(flat, devices)]
        stacked = _stacked_if_shared(parts, devices)
        out.append(stacked if stacked is not None else ShardedTensor._of_distinct(parts, devices, 0))
    return tree_unflatten(out, spec)


def _stacked_if_shared(parts: list[torch.Tensor], devices: tuple[torch.device, ...]) -> ShardedTensor | None:
    """When every device is one physical device (virtual CPU devices, or replicas
    sharing a GPU), ``parts`` as the rows of one (n, ...) buffer: one copy now, none
    on each call of the stacked executor, which reads such a ShardedTensor whole.
    Parts that already are such rows stay as they are (no copy), and parts that
    require grad stay the tensors autograd knows; None where it does not apply."""
    if len(parts) < 2 or len(device_groups(devices)) != 1:
        return None
    first = parts[0]
    if any(p.requires_grad for p in parts) or first.layout != torch.strided:
        return None
    if any(p.shape != first.shape or p.dtype != first.dtype or p.device != first.device for p in parts):
        return None
    if _stacked_view(parts) is not None:  # already rows of one buffer: keep them, no copy
        return None
    return ShardedTensor._of_stacked((torch.stack(parts),), devices, 0)


def device_put_replicated(x: PyTree, devices: Sequence[torch.device] | None = None) -> PyTree:
    """A copy of ``x`` (a tensor or pytree) on every device, as ShardedTensors
    with a leading axis of size len(devices). Each replica gets memory of its own
    (on one physical device, a row of one buffer), so replicas may update their
    copy in place."""
    devices = _check_devices(devices, None, "device_put_replicated")
    groups = device_groups(devices)
    shared = len(devices) > 1 and len(groups) == 1

    def rep(t: torch.Tensor) -> ShardedTensor:
        t = t.detach()
        if shared and t.layout == torch.strided:  # one buffer, a row per replica (see _stacked_if_shared)
            buffer = (
                t.to(groups[0][0])
                .unsqueeze(0)
                .expand(len(devices), *t.shape)
                .clone(memory_format=torch.contiguous_format)
            )
            return ShardedTensor._of_stacked((buffer,), devices, 0)
        return ShardedTensor(_transfers.copies_on(t, devices), devices, axis=0)

    from torch.utils._pytree import tree_unflatten

    leaves, spec = tensor_leaves(x, "device_put_replicated", "x")
    return tree_unflatten([rep(t) for t in leaves], spec)


def unreplicate(tree: PyTree) -> PyTree:
    """Shard 0 of every ShardedTensor in ``tree`` (no gather, no copy). A view: where the
    shards are rows of one stacked buffer (the stacked executor's outputs), it keeps the
    whole buffer alive; ``.clone()`` it to hold one replica's memory only."""

    def first(v: Any) -> Any:
        # Shard 0 is the slice 0 of the mapped axis, whatever that axis is.
        return v.shards[0] if isinstance(v, ShardedTensor) else v

    return tree_map(first, tree)
