"""Data-parallel training helpers, for both idioms users bring.

Module idiom (PyTorch): ``replicate`` copies an ``nn.Module`` (and builds its
optimizer) once per device; the copies travel into pmap as a ``PerReplica``
argument, so replica i gets module i and optimizer i. Inside the step,
``pmean_grads`` averages every gradient across the axis in a few flat buckets
rather than one collective per parameter.

Functional idiom (JAX): parameters are pytrees replicated with
``device_put_replicated``; ``functional_call`` runs a module with given
parameters safely from many replica threads at once.

``shard_batch`` splits a batch over the devices, with a mask when the batch
size is not a multiple of the device count.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeAlias, overload

import numpy as np
import torch
from torch.optim import optimizer as _torch_optimizer
from torch.utils._pytree import PyTree, tree_flatten, tree_unflatten

from . import _axis
from ._axis import AxisName
from ._devices import as_devices, default_devices, physical_device, usable_devices
from ._optim_calls import step_directly, takes_direct_step
from ._sampler import is_flag
from ._sharded import tensor_leaves
from .collectives import axis_index, pmean, psum


class PerReplica:
    """One Python object per device (modules, optimizers, ...).

    pmap maps it like a ShardedTensor along axis 0: replica i receives
    ``values[i]``. The devices must be the ones the pmap runs on.
    """

    __slots__ = ("values", "devices")
    values: list[Any]
    devices: tuple[torch.device, ...]

    def __init__(self, values: Sequence[Any], devices: Sequence[torch.device]) -> None:
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(
                f"PerReplica: values must be a sequence of one value per device, got {type(values).__name__}"
            )
        values, devices = list(values), as_devices(devices, "PerReplica")  # "cpu" is cpu:0, as in pmap
        if len(values) != len(devices):
            raise ValueError(f"PerReplica: {len(values)} values but {len(devices)} devices")
        _refuse_shared_state(values)
        self.values = values
        self.devices = devices

    # pmap reads the mapped size from .shape like a tensor's.
    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self.values)])

    ndim = 1

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> Any:
        return self.values[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values)

    def __repr__(self) -> str:
        kinds = sorted({type(v).__name__ for v in self.values})
        return f"PerReplica({'/'.join(kinds)} x {len(self.values)}, devices={[str(d) for d in self.devices]})"

    # -- the module / optimizer API, for all replicas at once ------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """Replica 0's ``state_dict()`` (one copy, to save), once
        ``assert_replicas_identical`` has checked that every replica holds the
        same state."""
        self._require("state_dict")
        _check_identical(self, grads=False)
        return self.values[0].state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        """Load ``state_dict`` into every replica, each getting its own copy on
        its own device (an optimizer's ``load_state_dict`` keeps the given
        tensors, so loading one dict into each would make the replicas share
        their moment buffers). Returns replica 0's result."""
        self._require("load_state_dict")
        results = []
        for value, device in zip(self.values, self.devices):
            assign = isinstance(value, torch.nn.Module) and kwargs.get("assign", False)
            if isinstance(value, torch.nn.Module) and not assign:
                own = state_dict  # Module.load_state_dict copies into the replica's own tensors
            else:
                own = _own_copy(state_dict, physical_device(device), cpu_too=assign)
            results.append(value.load_state_dict(own, *args, **kwargs))
        return results[0]

    def step(self, *args: Any, **kwargs: Any) -> None:
        """``step()`` on every replica: one call steps every replica's LR
        scheduler or optimizer (outside pmap; inside, each replica steps its own)."""
        self._call_each("step", args, kwargs)

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        """``zero_grad()`` on every replica module or optimizer."""
        self._call_each("zero_grad", args, kwargs)

    def _call_each(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._require(method)  # before any replica changes, so a failure leaves them all alike
        for v in self.values:
            getattr(v, method)(*args, **kwargs)

    def train(self, mode: bool = True) -> PerReplica:
        """``train(mode)`` on every replica module."""
        for m in self._modules("train"):
            m.train(mode)
        return self

    def eval(self) -> PerReplica:
        """``eval()`` on every replica module."""
        return self.train(False)

    def to(self, *args: Any, **kwargs: Any) -> PerReplica:
        """``Module.to`` on every replica module, in place (returns self):
        dtype and memory format only, since each replica stays on its device."""
        modules = self._modules("to")
        device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            raise ValueError(
                f"PerReplica.to: each replica stays on its own device {[str(d) for d in self.devices]}; "
                f"to use other devices, replicate the model again with torchpmap.replicate(model, "
                f"devices=...)"
            )
        for m in modules:
            m.to(*args, **kwargs)
        return self

    def _require(self, method: str) -> None:
        for v in self.values:
            if not callable(getattr(v, method, None)):
                raise TypeError(f"PerReplica.{method}: the replicas are {type(v).__name__}s, which have no {method}()")

    def _modules(self, method: str) -> list[torch.nn.Module]:
        for v in self.values:
            if not isinstance(v, torch.nn.Module):
                raise TypeError(f"PerReplica.{method}: the replicas must be nn.Modules, got {type(v).__name__}")
        return self.values


def _refuse_shared_state(values: list[Any]) -> None:
    """Refuse values of which two replicas would change the same state at once: one
    object given for several replicas (``[model.to("cpu") for d in devices]`` is one
    module: ``.to`` returns it unchanged), or distinct ones holding the same trainable
    parameter, buffer in training mode or optimizer (an optimizer factory that ignores
    its argument). The replicas would race on it, and the training would be silently
    wrong. (Other values may repeat: frozen parameters, tensors, configurations, which
    replicas read.)"""
    owner: dict[int, tuple[int, str]] = {}
    for i, value in enumerate(values):
        for what, obj in _state_of(value):
            first = owner.setdefault(id(obj), (i, what))
            if first[0] != i:
                hint = (
                    " (an optimizer factory that closes over one tensor: make it inside the factory, "
                    "or pass lr=lr.clone())"
                    if what.startswith("tensor hyperparameter")
                    else ""
                )
                raise ValueError(
                    f"PerReplica: replicas {first[0]} and {i} share one {what}: each replica changes its "
                    f"own in place, so they would race on it. Give each replica its own{hint} "
                    f"(torchpmap.replicate(model, optimizer_factory) copies a module and builds an optimizer "
                    f"over each copy's parameters; on CPU devices module.to('cpu') returns the module itself); "
                    f"a module every replica only reads goes in broadcast (in_axes=None) instead"
                )


def _state_of(value: Any) -> Iterator[tuple[str, Any]]:
    """What a replica's module, optimizer or LR scheduler holds that training
    changes in place (named for an error): a module's trainable parameters and,
    in training mode, its buffers (BatchNorm's statistics); nothing for other
    values. Frozen parameters, and buffers in eval mode, may be shared."""
    if isinstance(value, torch.nn.Module):
        for name, p in value.named_parameters():
            if p.requires_grad:
                yield f"trainable parameter ({name})", p
        for prefix, module in value.named_modules():
            if module.training:
                for name, b in module.named_buffers(prefix=prefix, recurse=False):
                    yield f"buffer of a module in training mode ({name})", b
    elif isinstance(value, torch.optim.Optimizer):
        yield type(value).__name__, value
        yield from _optimizer_state(value)
    elif isinstance(getattr(value, "optimizer", None), torch.optim.Optimizer):  # an LR scheduler
        yield type(value).__name__, value
        yield f"optimizer ({type(value.optimizer).__name__})", value.optimizer
        yield from _optimizer_state(value.optimizer)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, Any]]:
    """Its parameters, and its hyperparameters given as tensors (a tensor ``lr``, which
    LR schedulers change in place: shared, every replica's scheduler would decay it)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield f"parameter of its {type(optimizer).__name__}", p
        for key, value in group.items():
            if key == "params":
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):  # betas=(b1, b2)
                if isinstance(t, torch.Tensor):
                    yield f"tensor hyperparameter {key!r} of its {type(optimizer).__name__}", t


def _own_copy(state: Any, device: torch.device, *, cpu_too: bool) -> Any:
    """``state`` with every tensor copied, onto ``device``; a CPU tensor stays
    on the CPU unless ``cpu_too`` (an optimizer moves its state itself, and
    keeps some, such as Adam's step counts, on the CPU)."""
    leaves, spec = tree_flatten(state)
    copies = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            copies.append(v.to(device, copy=True) if cpu_too or v.device.type != "cpu" else v.clone())
        else:
            copies.append(copy.deepcopy(v))
    return tree_unflatten(copies, spec)


def assert_replicas_identical(*replicated: PerReplica) -> None:
    """Check that every replica of each ``PerReplica`` (modules, optimizers,
    LR schedulers) holds the same state as replica 0, bit for bit, in its own
    tensors: parameters, buffers and gradients of a module, state and
    hyperparameters of an optimizer, ``state_dict()`` of anything else.
    Raises ``AssertionError`` naming the first tensor that differs (or that
    two replicas share) and the replica."""
    if not replicated:  # a check of nothing would pass, whatever the caller meant to check
        raise TypeError("assert_replicas_identical: pass the PerReplica values to check (models, optimizers, ...)")
    for per_replica in replicated:
        if not isinstance(per_replica, PerReplica):
            raise TypeError(
                f"assert_replicas_identical: expected PerReplica arguments, got {type(per_replica).__name__}"
            )
        _check_identical(per_replica, grads=True)


def _check_identical(per_replica: PerReplica, *, grads: bool) -> None:
    states = [dict(_replica_state(v, grads)) for v in per_replica.values]
    kind = type(per_replica.values[0]).__name__
    for r in range(1, len(states)):
        _compare_replica(states[0], states[r], r, kind)


def _replica_state(value: Any, grads: bool) -> Iterator[tuple[str, Any]]:
    """A replica's state by name: with ``grads``, a module's parameters, their
    gradients and every buffer; without, what its ``state_dict`` saves (no
    non-persistent buffer: replicas may differ there and still save alike)."""
    if isinstance(value, torch.nn.Module) and not grads:
        for name, v in value.state_dict().items():
            if isinstance(v, torch.Tensor):  # (not a module's extra state, which may not compare with ==)
                yield name, v.detach()
    elif isinstance(value, torch.nn.Module):
        for name, p in value.named_parameters():
            yield name, p.detach()
            if grads and p.grad is not None:
                yield f"{name}.grad", p.grad
        for name, b in value.named_buffers():
            yield name, b
    elif callable(getattr(value, "state_dict", None)):
        yield from _walk(value.state_dict(), "")
    else:
        raise TypeError(f"assert_replicas_identical: cannot compare {type(value).__name__}s (no state_dict())")


def _walk(state: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(state, dict):
        for k, v in state.items():
            yield from _walk(v, f"{path}[{k!r}]")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, state


def _compare_replica(first: dict[str, Any], other: dict[str, Any], r: int, kind: str) -> None:
    if first.keys() != other.keys():
        missing = sorted(first.keys() ^ other.keys())
        raise AssertionError(f"{kind} replica {r} differs from replica 0: only one of them has {missing[0]}")
    for name, a in first.items():
        b = other[name]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.numel() and b.numel() and a.device == b.device and a.data_ptr() == b.data_ptr():
                raise AssertionError(
                    f"{kind} replica {r} shares {name} with replica 0 (one tensor for both): an "
                    f"update by either changes the other, so they drift apart. Load state with "
                    f"PerReplica.load_state_dict, which gives every replica its own copy."
                )
            same = a.shape == b.shape and a.dtype == b.dtype and _bitwise_equal(a, b.to(a.device))
        else:
            same = type(a) is type(b) and _equal_values(a, b)
        if not same:
            raise AssertionError(f"{kind} replica {r} differs from replica 0 at {name}")


def _equal_values(a: Any, b: Any) -> bool:
    """Whether two state values of one type are equal: numpy arrays element by element
    (their == is an array), NaNs equal to NaNs (a NaN hyperparameter)."""
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    try:
        return bool(a == b or (a != a and b != b))
    except (TypeError, ValueError):  # an object whose == gives something without a truth value
        return a is b


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point() or a.is_complex():  # NaN payloads and -0.0 count: compare the bits
        a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return torch.equal(a, b)


def _require_module(module: Any, fn: str) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{fn}: module must be an nn.Module, got {type(module).__name__}")


def replicate_module(module: torch.nn.Module, devices: Sequence[torch.device] | None = None) -> PerReplica:
    """An identical copy of ``module`` on every device (each with its own storage)."""
    _require_module(module, "replicate_module")
    devices = default_devices(None, "replicate") if devices is None else usable_devices(devices, "replicate")
    return PerReplica([copy.deepcopy(module).to(physical_device(d)) for d in devices], devices)


OptimizerFactory: TypeAlias = "Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]"


@overload
def replicate(
    module: torch.nn.Module, optimizer: None = None, devices: Sequence[torch.device] | None = None
) -> PerReplica: ...


@overload
def replicate(
    module: torch.nn.Module, optimizer: OptimizerFactory, devices: Sequence[torch.device] | None = None
) -> tuple[PerReplica, PerReplica]: ...


def replicate(
    module: torch.nn.Module,
    optimizer: OptimizerFactory | None = None,
    devices: Sequence[torch.device] | None = None,
) -> PerReplica | tuple[PerReplica, PerReplica]:
    """Module copies (and, given ``optimizer``, a factory such as
    ``lambda params: torch.optim.SGD(params, lr=0.1)``, one optimizer for each
    copy), made once, to pass to a pmapped training step every step."""
    if optimizer is not None and not callable(optimizer):
        raise TypeError(
            f"replicate: optimizer must be a factory such as lambda params: torch.optim.SGD(params, lr=0.1), "
            f"got {type(optimizer).__name__} (pass devices by keyword: replicate(module, devices=...))"
        )
    modules = replicate_module(module, devices)
    if optimizer is None:
        return modules
    opts = [optimizer(m.parameters()) for m in modules]
    for i, (m, o) in enumerate(zip(modules, opts)):
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"replicate: optimizer factory must return a torch.optim.Optimizer, got {type(o).__name__}")
        own = {id(p) for p in m.parameters()}
        if any(id(p) not in own for group in o.param_groups for p in group["params"]):
            raise ValueError(
                f"replicate: the optimizer factory must build the optimizer over the parameters it is given: "
                f"replica {i}'s optimizer holds parameters its module copy does not have (write "
                f"lambda params: torch.optim.SGD(params, lr=0.1), not ...SGD(model.parameters(), ...))"
            )
    return modules, PerReplica(opts, modules.devices)


def pmean_grads(
    params: torch.nn.Module | Iterable[torch.Tensor], axis_name: AxisName, *, bucket_mb: float = 25.0
) -> None:
    """Average ``.grad`` of every parameter across the axis, in place.

    Gradients are flattened into buckets of about ``bucket_mb`` MB per dtype and
    device, so a model with hundreds of parameters costs a handful of
    collectives. Every replica ends with bit-identical gradients. A parameter
    that has no gradient on some replicas (a branch they did not take) counts
    as a zero gradient there, as in JAX, and every replica gets the average;
    one that has none on any replica keeps ``grad`` None.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "pmean_grads: params must be a module or an iterable of parameters, got one tensor "
            "(pass [tensor], or pmean its gradient yourself)"
        )
    if not isinstance(params, (torch.nn.Module, Iterable)):
        raise TypeError(
            f"pmean_grads: params must be a module or an iterable of parameters, got {type(params).__name__}"
        )
    _check_bucket_mb(bucket_mb, "pmean_grads")
    named = list(params.named_parameters()) if isinstance(params, torch.nn.Module) else list(enumerate(params))
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"pmean_grads: params must hold tensors, but entry {name} is a {type(p).__name__}")
        if p.grad is not None and p.grad.layout != torch.strided:
            raise TypeError(
                f"pmean_grads: parameter {name!r} has a {p.grad.layout} gradient (nn.Embedding(sparse=True), "
                f"say); pmean_grads averages dense gradients: use sparse=False, or pmean that gradient yourself"
            )
    params = [p for _, p in named if p.requires_grad or p.grad is not None]
    if not params:
        return
    missing = [i for i, p in enumerate(params) if p.grad is None]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    # Which parameters have a gradient here, averaged along with the gradients: the
    # flat buffers pair the same parameters on every replica, and a replica learns
    # which gradients the others have without a collective of its own.
    like = grads[0]  # in its dtype, it joins the first gradients' bucket
    present = torch.ones(len(params), dtype=like.dtype if like.is_floating_point() else None, device=like.device)
    for i in missing:
        present[i] = 0.0
    _pmean_in_place([*grads, present], axis_name, bucket_mb)
    if missing:
        anywhere = present.tolist()
        for i in missing:
            if anywhere[i] > 0:
                params[i].grad = grads[i]


def pmean_buffers(module: torch.nn.Module, axis_name: AxisName, *, bucket_mb: float = 25.0) -> None:
    """Average every floating-point buffer of ``module`` (BatchNorm running
    statistics, ...) across the axis, in place, so the replicas hold
    bit-identical buffers again. Integer buffers (``num_batches_tracked``) are
    left alone: replicas that ran the same steps agree on them. Call it inside
    the pmapped step. The mean of per-shard running variances is not the
    variance of the whole batch; ``SyncBatchNorm`` gives the exact statistics."""
    _check_bucket_mb(bucket_mb, "pmean_buffers")
    floating = [b for b in _module_buffers(module, "pmean_buffers") if b.is_floating_point() or b.is_complex()]
    _pmean_in_place(floating, axis_name, bucket_mb)


def _check_bucket_mb(bucket_mb: Any, fn: str) -> None:
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not 0 < bucket_mb < float("inf"):
        raise ValueError(f"{fn}: bucket_mb must be a positive number of megabytes, got {bucket_mb!r}")


def broadcast_buffers(module: torch.nn.Module, axis_name: AxisName, *, source: int = 0) -> None:
    """Copy every buffer of replica ``source`` (its index along the axis) into
    the other replicas' modules, in place, as DDP's ``broadcast_buffers`` does.
    Call it inside the pmapped step."""
    size = _axis.static_axis_size(axis_name)
    if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < size:
        raise ValueError(f"broadcast_buffers: source must be an axis index in [0, {size}), got {source!r}")
    buffers = _module_buffers(module, "broadcast_buffers")
    if not buffers:
        return
    with torch.no_grad():
        is_source = axis_index(axis_name) == source
        # psum of the source's bits and zeros elsewhere: an exact copy (in floating point
        # -0.0 + 0.0 is +0.0; integers keep every bit, NaN payloads included).
        bits = [_as_bits(b) for b in buffers]
        kept = [torch.where(is_source, b, torch.zeros_like(b)) for b in bits]
        for b, as_bits, v in zip(buffers, bits, psum(kept, axis_name)):
            b.copy_(v if as_bits is b else v.view(b.dtype).reshape(b.shape))


# An integer dtype of each element size, to move floating-point bits unchanged.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# Unsigned dtypes PyTorch cannot add: moved as the signed integers of their size.
_UNSIGNED_WITHOUT_ADD = (torch.uint16, torch.uint32, torch.uint64)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """A floating, complex or wide unsigned tensor's bits as integers, flat
    (complex128 as two int64 each); other tensors unchanged."""
    if not (t.is_floating_point() or t.is_complex() or t.dtype in _UNSIGNED_WITHOUT_ADD):
        return t
    return t.reshape(-1).view(_BITS.get(t.element_size(), torch.int64))


def _module_buffers(module: torch.nn.Module, fn: str) -> list[torch.Tensor]:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{fn}: module must be an nn.Module (this replica's), got {type(module).__name__}")
    return list(module.buffers())


def _pmean_in_place(tensors: list[torch.Tensor], axis_name: AxisName, bucket_mb: float) -> None:
    """Average ``tensors`` across the axis in place, in flat buckets of about
    ``bucket_mb`` MB per dtype and device."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    limit = max(1, int(bucket_mb * 2**20))
    with torch.no_grad():
        for ts in groups.values():
            bucket: list[torch.Tensor] = []
            size = 0
            for t in ts:
                bucket.append(t)
                size += t.numel() * t.element_size()
                if size >= limit:
                    _average_bucket(bucket, axis_name)
                    bucket, size = [], 0
            if bucket:
                _average_bucket(bucket, axis_name)


def _average_bucket(bucket: list[torch.Tensor], axis_name: AxisName) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    flat = pmean(flat, axis_name)
    if not flat.dtype == bucket[0].dtype:  # integer grads do not exist; keep dtype
        flat = flat.to(bucket[0].dtype)
    offset = 0
    for g in bucket:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


# -- functional idiom ---------------------------------------------------------------------
def functional_call(
    module: torch.nn.Module,
    params_and_buffers: dict[str, torch.Tensor],
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
    *,
    tie_weights: bool = True,
    strict: bool = False,
) -> Any:
    """``torch.func.functional_call`` (with its ``tie_weights`` and ``strict``)
    that is safe inside pmap.

    torch.func.functional_call swaps the given tensors into the module object
    for the duration of the call; replicas share that object, so concurrent
    calls would see each other's parameters. Inside pmap each replica swaps
    into a twin of the module's structure instead, made at every call from the
    module as it is then: its training flags and attributes, and the tensors
    that are not passed (the module's own, as torch.func reads them). Pass
    every parameter and buffer the forward writes: an in-place write to one the
    replicas share is an error after the call.
    """
    _require_module(module, "functional_call")
    frame = _axis.current_frame()
    # Replicas on worker threads share the module object, so each swaps into a copy
    # of its own. A function being captured (the stacked and lockstep executors,
    # compile=) is traced one replica at a time into a graph that takes the tensors
    # as inputs: the module itself serves, and no replica index is read.
    target = module if frame is None or torch.compiler.is_compiling() else _twin(module)
    if not isinstance(args, tuple):
        args = (args,)
    return torch.func.functional_call(
        target, params_and_buffers, args, kwargs or {}, tie_weights=tie_weights, strict=strict
    )


def _twin(module: torch.nn.Module) -> torch.nn.Module:
    """A new object for ``module`` and each submodule (one per shared
    submodule), with the originals' attributes and their own dicts of
    parameters, buffers and submodules, whose tensors are the originals'.
    Methods of the tree bound as attributes or hooks are bound to the twins.
    Swapping tensors into it leaves the original untouched; cheap (no tensor
    is copied), so made afresh per call."""
    made: dict[int, torch.nn.Module] = {}
    root = _twin_tree(module, made)
    for twin in made.values():
        attributes = twin.__dict__
        for name, value in attributes.items():
            if value and (type(value) is types.MethodType or isinstance(value, dict)) and name not in _TENSOR_DICTS:
                rebound = _rebound(value, made)
                if rebound is not value:
                    attributes[name] = rebound
    return root


_TENSOR_DICTS = frozenset(("_parameters", "_buffers", "_modules"))  # made afresh by _twin_tree


def _twin_tree(module: torch.nn.Module, made: dict[int, torch.nn.Module]) -> torch.nn.Module:
    twin = made.get(id(module))
    if twin is None:
        cls = type(module)
        twin = made[id(module)] = cls.__new__(cls)
        for slot in _slots_of(cls):
            if hasattr(module, slot):
                object.__setattr__(twin, slot, getattr(module, slot))
        attributes = twin.__dict__  # written directly: Module.__setattr__ costs ~10 us a module
        attributes.update(module.__dict__)
        attributes["_parameters"] = dict(module._parameters)
        attributes["_buffers"] = dict(module._buffers)
        attributes["_modules"] = {
            name: None if child is None else _twin_tree(child, made) for name, child in module._modules.items()
        }
    return twin


_slots: dict[type, tuple[str, ...]] = {}  # per module class, its __slots__ names


def _slots_of(cls: type) -> tuple[str, ...]:
    names = _slots.get(cls)
    if names is None:
        found: list[str] = []
        for klass in cls.__mro__:
            slots = klass.__dict__.get("__slots__", ())
            found += [slots] if isinstance(slots, str) else [n for n in slots if n not in ("__dict__", "__weakref__")]
        names = _slots[cls] = tuple(found)
    return names


def _rebound(value: Any, made: dict[int, torch.nn.Module]) -> Any:
    """``value`` with a method bound to a module of the tree bound to its twin
    instead: the value itself, or a dict of them (the hooks' dicts), copied."""
    if isinstance(value, types.MethodType):
        twin = made.get(id(value.__self__))
        return value if twin is None else types.MethodType(value.__func__, twin)
    if isinstance(value, dict) and any(isinstance(v, types.MethodType) for v in value.values()):
        rebound = {k: _rebound(v, made) for k, v in value.items()}
        if any(rebound[k] is not v for k, v in value.items()):
            copied = copy.copy(value)  # keeps the dict's type (OrderedDict)
            copied.update(rebound)
            return copied
    return value


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers as a dict of detached tensors (a
    pytree to replicate with device_put_replicated)."""
    _require_module(module, "params_of")
    state = {k: v.detach() for k, v in module.named_parameters()}
    state.update({k: v.detach() for k, v in module.named_buffers()})
    return state


class FunctionalOptimizer:
    """A ``torch.optim`` optimizer as a pure function of a parameter dict, for
    the functional idiom: ``state = opt.init(params)``, then
    ``params, state = opt.step(params, grads, state)`` returns new tensors and
    leaves its arguments unchanged. The update is PyTorch's own code with
    PyTorch's defaults: SGD, Adam and AdamW call their ``torch.optim`` update
    function on copies of the tensors (``_optim_calls``); the others drive a
    real ``optimizer_class`` over copies. Make it with ``functional_optimizer``."""

    def __init__(self, optimizer_class: type[torch.optim.Optimizer], **hyperparams: Any) -> None:
        _check_optimizer_class(optimizer_class)
        self.optimizer_class = optimizer_class
        self.hyperparams = hyperparams
        self._resolve()

    def _resolve(self) -> None:
        """Build an optimizer from ``hyperparams``: PyTorch validates them here (and
        patches the class's step once, on this thread, not racing in the replica
        threads), and its param group holds them resolved, as the direct step takes
        them (None: this optimizer steps through an object)."""
        # A matrix: some optimizers take only those (Muon); every other takes any shape.
        template = self.optimizer_class([torch.zeros(1, 1, requires_grad=True)], **self.hyperparams)
        group = template.param_groups[0]
        self._resolved_from = dict(self.hyperparams)
        self._direct_group = {k: v for k, v in group.items() if k != "params"} if takes_direct_step(template) else None

    def _direct(self) -> dict[str, Any] | None:
        """The resolved hyperparameters of a direct step, or None: step through an object."""
        now, then = self.hyperparams, self._resolved_from
        if len(now) != len(then) or any(k not in then or then[k] is not v for k, v in now.items()):
            self._resolve()  # changed since (the object path reads them at every step)
        if self._direct_group is None or _global_optimizer_hooks():
            return None
        if self.optimizer_class is not torch.optim.SGD and torch.compiler.is_compiling():
            # Traced, Adam computes its bias corrections from the step count as tensors,
            # which rounds otherwise than eager: the object path cannot be traced, so the
            # capture fails and the call runs eagerly (on the threads executor).
            return None
        return self._direct_group

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"functional_optimizer(torch.optim.{self.optimizer_class.__name__}{', ' if args else ''}{args})"

    def init(self, params: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The state before the first step: an empty dict per parameter. As
        in ``torch.optim``, the first step fills it in (SGD's momentum buffer
        starts as the first gradient, not as zeros)."""
        _check_params(params, "init")
        return {name: {} for name in params}

    def step(
        self,
        params: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor | None],
        state: dict[str, dict[str, Any]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        """One optimizer step: ``(new_params, new_state)``. Parameters with no
        entry (or ``None``) in ``grads`` are returned unchanged, as
        ``torch.optim`` skips a parameter whose ``.grad`` is None: leave
        buffers out of ``grads`` so weight decay does not touch them."""
        _check_params(params, "step")
        _check_step_args(params, grads, state)
        with torch.no_grad():
            new = {name: p.detach().clone() for name, p in params.items()}
            given = {name: g for name, g in grads.items() if g is not None}
            trained = [name for name in params if name in given]
            new_state = {name: _clone_state(state[name]) for name in params}
            if not trained:
                return new, new_state
            _check_grads_match(new, given, trained)
            # Sparse gradients: the object's step takes them (SGD) or refuses them in its words.
            direct = self._direct() if all(given[name].layout == torch.strided for name in trained) else None
            if direct is not None:
                step_directly(
                    self.optimizer_class,
                    direct,
                    [new[name] for name in trained],
                    # Copies: some steps write the gradients (foreach Nesterov SGD).
                    [given[name].detach().clone() for name in trained],
                    [new_state[name] for name in trained],
                )
                return new, new_state
            self._step_through_an_object(new, given, trained, new_state)
        return new, new_state

    # Never traced: Dynamo would guard on the identity of the optimizer object each step
    # builds, and compile again at every step (a compile= program), until its recompile
    # limit ran the function eagerly; a capture (stacked, lockstep) falls back as before.
    @torch._dynamo.disable(reason="functional_optimizer builds an optimizer object per step")
    def _step_through_an_object(
        self,
        new: dict[str, torch.Tensor],
        given: dict[str, torch.Tensor],
        trained: list[str],
        new_state: dict[str, dict[str, Any]],
    ) -> None:
        opt = self.optimizer_class([new[name] for name in trained], **self.hyperparams)
        for name in trained:
            new[name].grad = given[name].detach().clone()  # the step may write it
            if new_state[name]:
                opt.state[new[name]] = new_state[name]
        opt.step()
        for name in trained:
            new[name].grad = None
            new_state[name] = dict(opt.state[new[name]])


def functional_optimizer(optimizer_class: type[torch.optim.Optimizer], **hyperparams: Any) -> FunctionalOptimizer:
    """``optimizer_class`` (a ``torch.optim`` optimizer such as SGD, Adam or
    AdamW) with ``hyperparams``, as a pure ``init`` / ``step`` pair for a
    pmapped step over a parameter dict::

        opt = tp.functional_optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
        state = opt.init(params)
        params, state = opt.step(params, tp.pmean(grads, "batch"), state)
    """
    return FunctionalOptimizer(optimizer_class, **hyperparams)


# Closure-driven or sparse-only: a step over plain tensors cannot drive them.
_UNSUPPORTED_OPTIMIZERS = {"LBFGS": "its step needs a closure", "SparseAdam": "it needs sparse gradients"}


def _check_optimizer_class(optimizer_class: Any) -> None:
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(
            f"functional_optimizer: optimizer_class must be a torch.optim optimizer class such as "
            f"torch.optim.AdamW (the class, not an instance), got {optimizer_class!r}"
        )
    name = optimizer_class.__name__
    # Other classes may keep state outside optimizer.state, which a fresh optimizer per step would lose.
    if getattr(torch.optim, name, None) is not optimizer_class or optimizer_class is torch.optim.Optimizer:
        raise TypeError(
            f"functional_optimizer: only torch.optim's own optimizers are supported (SGD, Adam, AdamW, "
            f"...), got {optimizer_class.__module__}.{optimizer_class.__qualname__}"
        )
    if name in _UNSUPPORTED_OPTIMIZERS:
        raise TypeError(f"functional_optimizer: torch.optim.{name} is not supported: {_UNSUPPORTED_OPTIMIZERS[name]}")


def _check_params(params: Any, fn: str) -> None:
    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise TypeError(
            f"FunctionalOptimizer.{fn}: params must be a dict of tensors (such as torchpmap.params_of(model)), "
            f"got {type(params).__name__}"
        )


def _check_step_args(params: dict[str, torch.Tensor], grads: Any, state: Any) -> None:
    if not isinstance(grads, dict):
        raise TypeError(f"FunctionalOptimizer.step: grads must be a dict like params, got {type(grads).__name__}")
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise ValueError(f"FunctionalOptimizer.step: grads has {unknown[0]!r}, which params lacks")
    if not isinstance(state, dict) or state.keys() != params.keys():
        raise ValueError(
            "FunctionalOptimizer.step: state must hold one entry per parameter: pass what init(params) or "
            "the previous step returned"
        )


def _global_optimizer_hooks() -> bool:
    """Whether step hooks for every optimizer are registered: they run around an object's step."""
    return bool(_torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks)


def _check_grads_match(params: dict[str, torch.Tensor], grads: dict[str, Any], names: list[str]) -> None:
    for name in names:
        p, g = params[name], grads[name]
        if not isinstance(g, torch.Tensor) or (g.shape, g.dtype, g.device) != (p.shape, p.dtype, p.device):
            got = f"{tuple(g.shape)} {g.dtype} on {g.device}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"FunctionalOptimizer.step: grads[{name!r}] must be a tensor of the parameter's shape, dtype "
                f"and device ({tuple(p.shape)} {p.dtype} on {p.device}), got {got}"
            )


def _clone_state(per_param: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in per_param.items()}


# -- batches --------------------------------------------------------------------------------
@overload
def shard_batch(batch: PyTree, num_devices: int | None = None, *, pad: Literal[False] = False) -> PyTree: ...


@overload
def shard_batch(
    batch: PyTree, num_devices: int | None = None, *, pad: Literal[True]
) -> tuple[PyTree, torch.Tensor]: ...


@overload
def shard_batch(batch: PyTree, num_devices: int | None = None, *, pad: bool) -> PyTree: ...


def shard_batch(batch: PyTree, num_devices: int | None = None, *, pad: bool = False) -> PyTree:
    """Reshape every leaf of ``batch`` from (B, ...) to (num_devices, B / num_devices, ...).

    When B is not a multiple of the device count: with ``pad=False`` a
    ValueError says so; with ``pad=True`` the leaves are zero-padded to the next
    multiple and ``(sharded_batch, mask)`` is returned, where ``mask`` (shape
    (num_devices, per_device), bool) marks the real rows. Use it to weight the
    loss: ``psum((loss * mask).sum()) / psum(mask.sum())``, and pass it to
    ``SyncBatchNorm`` so the padding rows stay out of the batch statistics.
    """
    if not is_flag(pad):
        raise TypeError(f"shard_batch: pad must be True or False, got {pad!r}")
    n = num_devices if num_devices is not None else len(default_devices(None, "shard_batch"))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shard_batch: num_devices must be a positive int, got {num_devices!r}")
    leaves, spec = tensor_leaves(batch, "shard_batch", "batch")
    if not leaves:
        raise ValueError("shard_batch: the batch has no tensors")
    sizes: set[int] = set()
    for v in leaves:
        if not v.ndim:
            raise ValueError("shard_batch: every leaf needs a leading batch dimension (got a scalar)")
        sizes.add(v.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"shard_batch: leaves have different batch sizes {sorted(sizes)}")
    (b,) = sizes
    per = -(-b // n)
    if b % n and not pad:
        raise ValueError(
            f"shard_batch: batch size {b} is not a multiple of the {n} devices; drop "
            f"{b % n} rows, or pass pad=True to pad to {per * n} rows and get a mask of "
            f"the real ones"
        )
    total = per * n
    out = []
    for v in leaves:
        if total != b:
            filler = v.new_zeros((total - b, *v.shape[1:]))
            v = torch.cat([v, filler])
        out.append(v.reshape(n, per, *v.shape[1:]))
    sharded = tree_unflatten(out, spec)
    if not pad:
        return sharded
    mask = (torch.arange(total) < b).reshape(n, per)
    return sharded, mask
