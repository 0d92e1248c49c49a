"""One-call checkpoints of a replicated training state.

``save_checkpoint(path, model=models, opt=opts, sched=scheds, step=step)``
writes one file: one copy of every ``PerReplica`` (replica 0's state, after
checking that every replica still holds the same state), the state of other
objects with ``state_dict``, tensors (a ShardedTensor as its full value),
plain Python values, and the caller's random state. ``load_checkpoint`` puts
the state back into the objects given and returns the rest.

Across processes every process calls both; process 0 alone writes, and the
processes first check that their replicas agree and gather their random
states, then wait for the write, so no process reads a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parameter import is_lazy

from . import distributed as _distributed
from ._devices import process_count, process_index
from ._sharded import ShardedTensor
from .training import PerReplica, _check_identical, _replica_state, _walk

_FORMAT = "torchpmap.checkpoint"
_VERSION = 1

# What an entry holds: the state of replicated objects, of one object, a tensor, or a plain value.
_REPLICATED, _OBJECT, _TENSOR, _VALUE = "replicated", "object", "tensor", "value"


def save_checkpoint(path: str | os.PathLike[str], /, *, rng: bool = True, **state: Any) -> None:
    """Write ``state`` (name=value pairs) to ``path`` in one file, atomically
    (a temporary file in the same directory, then ``os.replace``).

    Values may be: ``PerReplica`` modules, optimizers, LR schedulers, grad
    scalers or anything else with ``state_dict``/``load_state_dict``, saved
    once (replica 0's state) after checking that every replica still holds
    the same parameters, buffers and optimizer state (a ValueError names the
    entry and the first difference otherwise: one copy would lose the
    others). To keep replicas that are meant to differ, save their states
    explicitly, e.g. ``per_replica=[m.state_dict() for m in models]``. Also:
    single objects with ``state_dict``, tensors (a ShardedTensor is saved as
    its full tensor), and plain Python values (step, epoch, lists, dicts).

    With ``rng`` (the default) the caller's random state is saved too:
    ``torch.get_rng_state()`` and, once CUDA is initialised,
    ``torch.cuda.get_rng_state_all()``. pmap derives every replica's random
    stream from a number drawn from the caller's CPU generator and the
    replica's global index, so this is the random state of every replica.

    With several processes (``torchpmap.distributed``) every process must
    call it with the same names: process 0 alone writes (the random state of
    every process included), and every process returns once the file is
    complete. So every entry is compared across processes, and a ValueError
    on every process names the first that would lose another process's
    state: a name or kind that differs, replicas, tensors, plain values or
    object states that differ (gather values meant to differ and save the
    list), or a value holding only this process's part (a ShardedTensor,
    PerReplica or sharded DTensor) inside a dict, list or tuple.
    """
    path = _check_path(path, "save_checkpoint")
    if process_count() > 1:
        _save_across_processes(path, state, rng)
        return
    entries = {name: _entry(name, value) for name, value in state.items()}
    _write(path, _payload(entries, [_rng_state()] if rng else None))


def _save_across_processes(path: str, state: dict[str, Any], rng: bool) -> None:
    """Every process checks its own state, then they compare what they found
    (so a failure anywhere fails everywhere instead of leaving peers waiting);
    process 0 writes, and all learn whether it managed."""
    error, entries, summary, rng_state = None, {}, {}, None
    try:
        entries = {name: _entry(name, value) for name, value in state.items()}
        summary = {name: (_describe(entries[name]), _digest(value, entries[name])) for name, value in state.items()}
        rng_state = _rng_state() if rng else None
    except Exception as e:
        error = e
    everyone = _gather((None if error is None else f"{type(error).__name__}: {error}", summary, rng_state))
    if error is not None:
        raise error
    _raise_for_peers([e for e, _, _ in everyone], "save_checkpoint")
    _check_same_across_processes([s for _, s, _ in everyone])
    written: str | None = None
    if process_index() == 0:
        try:
            _write(path, _payload(entries, [r for _, _, r in everyone] if rng else None))
        except Exception as e:
            written = f"{type(e).__name__}: {e}"
    _raise_for_peers(_gather(written), "save_checkpoint (writing)")


def load_checkpoint(
    path: str | os.PathLike[str],
    /,
    *,
    rng: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
    **objects: Any,
) -> dict[str, Any]:
    """Load the checkpoint at ``path``: the state of each entry named in
    ``objects`` goes into that object in place (a ``PerReplica`` gives every
    replica its own copy on its own device; a tensor or ShardedTensor is
    overwritten with the saved values), and every other entry of the file is
    returned in a dict (plain values as saved, tensors as plain tensors, the
    state dicts of objects not given).

    With ``rng`` (the default) the random state saved with the checkpoint is
    restored (see ``save_checkpoint``), so a resumed run draws the numbers the
    uninterrupted one would have drawn. Tensors load onto ``map_location``
    (CPU by default, so a checkpoint loads anywhere; objects then move their
    state to their own devices). ``weights_only=True`` (the default) refuses
    to unpickle arbitrary objects; plain values of your own classes need
    ``weights_only=False``, for files you trust.
    """
    path = _check_path(path, "load_checkpoint")
    payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(
            f"load_checkpoint: {os.fspath(path)!r} is not a torchpmap checkpoint (save_checkpoint writes them)"
        )
    saved: dict[str, dict[str, Any]] = payload["entries"]
    for name in objects:
        if name not in saved:
            raise KeyError(f"load_checkpoint: the checkpoint has no entry {name!r}; it has {sorted(saved)}")
    parameters = _parameter_names(objects)
    for name, target in objects.items():  # every check before any object changes
        _check_target(name, saved[name], target, parameters)
    if rng:
        _check_rng(payload["rng"])
    for name, target in objects.items():
        _load_entry(saved[name], target)
    if rng:
        _restore_rng(payload["rng"])
    return {name: entry["state"] for name, entry in saved.items() if name not in objects}


# -- saving ---------------------------------------------------------------------------------
def _entry(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, PerReplica):
        return {"kind": _REPLICATED, "category": _category(value.values[0]), "state": _replicated_state(name, value)}
    _refuse_per_process(name, value)
    if isinstance(value, ShardedTensor):
        return {"kind": _TENSOR, "state": value.unshard("cpu").detach()}
    if isinstance(value, torch.Tensor):
        return {"kind": _TENSOR, "state": value.detach()}
    if _has_state_methods(value):
        state = value.state_dict()
        _refuse_per_process(f"{name}.state_dict()", state)
        return {"kind": _OBJECT, "category": _category(value), "state": state}
    return {"kind": _VALUE, "state": value}


def _refuse_per_process(name: str, value: Any) -> None:
    """Across processes process 0 alone writes: a value holding only this process's part,
    anywhere inside a dict, list or tuple, would silently lose the other processes' parts."""
    if process_count() == 1:
        return
    for path, leaf in _walk(value, ""):
        what, instead = _per_process(leaf, f"{name}{path}")
        if what:
            raise ValueError(f"save_checkpoint: {name}{path} is {what}; {instead}")


def _per_process(value: Any, name: str) -> tuple[str, str]:
    """What ``value`` holds of this process only, and what to save instead ("" if it is whole)."""
    if isinstance(value, ShardedTensor):
        return (
            "a ShardedTensor, which holds only this process's shards",
            f"save its full value (torchpmap.distributed.to_dtensor({name}).full_tensor()) instead",
        )
    if isinstance(value, PerReplica):
        return (
            "a PerReplica, which holds only this process's replicas",
            "pass it as an entry of its own (save_checkpoint(path, name=per_replica)), so that its replicas are "
            "compared across processes and saved once",
        )
    if isinstance(value, torch.Tensor) and _is_sharded_dtensor(value):
        return (
            "a DTensor sharded across processes, which holds only this process's part",
            f"save {name}.full_tensor() instead",
        )
    return "", ""


def _is_sharded_dtensor(value: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor  # only across processes, where torch.distributed works

    return isinstance(value, DTensor) and not all(p.is_replicate() for p in value.placements)


def _replicated_state(name: str, value: PerReplica) -> Any:
    for v in value.values:
        if not _has_state_methods(v):
            raise TypeError(
                f"save_checkpoint: {name} holds {type(v).__name__}s, which have no state_dict() and "
                f"load_state_dict(); save their values as a list instead"
            )
    try:
        _check_identical(value, grads=False)
    except AssertionError as e:
        raise ValueError(
            f"save_checkpoint: the replicas of {name} differ ({e}), so one copy would lose state. Keep them "
            f"identical (convert_sync_batchnorm, pmean_buffers or broadcast_buffers for buffers, pmean_grads "
            f"for gradients), or save each replica's state explicitly: "
            f"{name}=[r.state_dict() for r in {name}]"
        ) from None
    return value.values[0].state_dict()


def _has_state_methods(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def _category(value: Any) -> str:
    """The kind of state an object has, so loading a module's into an optimizer fails clearly."""
    for kind, cls in (
        ("module", torch.nn.Module),
        ("optimizer", torch.optim.Optimizer),
        ("LR scheduler", torch.optim.lr_scheduler.LRScheduler),
        ("LR scheduler", torch.optim.lr_scheduler.ReduceLROnPlateau),
        ("grad scaler", torch.amp.GradScaler),
    ):
        if isinstance(value, cls):
            return kind
    return type(value).__qualname__


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _payload(entries: dict[str, Any], rng_per_process: list[Any] | None) -> dict[str, Any]:
    return {"format": _FORMAT, "version": _VERSION, "entries": entries, "rng": rng_per_process}


def _write(path: str, payload: dict[str, Any]) -> None:
    directory, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):  # else the error would name the temporary file
        raise FileNotFoundError(f"save_checkpoint: the directory of {path!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(payload, f)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                _raise_naming_the_entry(payload["entries"], e)
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _raise_naming_the_entry(entries: dict[str, dict[str, Any]], error: BaseException) -> None:
    """Pickle's error names the object, not the entry holding it: find that entry."""
    for name, entry in entries.items():
        try:
            torch.save(entry["state"], io.BytesIO())
        except (pickle.PicklingError, TypeError, AttributeError):
            raise TypeError(f"save_checkpoint: entry {name!r} cannot be saved: {error}") from error


def _check_path(path: Any, fn: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    result = os.fspath(path)
    if not isinstance(result, str):
        raise TypeError(f"{fn}: path must name a file as str, got {type(result).__name__}")
    return result


# -- across processes -----------------------------------------------------------------------
def _gather(obj: Any) -> list[Any]:
    if not (_distributed.is_initialized() and dist.is_initialized()):
        raise RuntimeError("save_checkpoint: several processes but torch.distributed is not initialized")
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def _raise_for_peers(errors: list[str | None], what: str) -> None:
    for rank, error in enumerate(errors):
        if error is not None:
            raise RuntimeError(f"{what} failed on process {rank}: {error}")


def _digest(value: Any, entry: dict[str, Any]) -> dict[str, str]:
    """A hash per key of what the entry saves (replica 0's state for a PerReplica), to compare
    the processes' entries."""
    if isinstance(value, PerReplica):
        return {key: _hash(v) for key, v in _replica_state(value.values[0], grads=False)}
    return {key: _hash(v) for key, v in _walk(entry["state"], "")}


def _hash(v: Any) -> str:
    h = hashlib.sha256()
    if isinstance(v, torch.Tensor):
        if hasattr(v, "to_local"):  # a DTensor (replicated: a sharded one was refused): its local value
            v = v.to_local()
        t = v.detach().to("cpu")
        t = (t.to_dense() if t.layout != torch.strided else t).resolve_conj().resolve_neg().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(v.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(v, np.ndarray):  # its repr elides the middle of a large array
        h.update(f"{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v).tobytes())
    elif isinstance(v, (set, frozenset)):  # iteration order varies with each process's string hashing
        h.update(f"{type(v).__name__}{sorted(_hash(x) for x in v)}".encode())
    elif type(v).__repr__ is object.__repr__:  # the default repr holds the address, which differs anyway
        h.update(type(v).__qualname__.encode())
    else:
        h.update(repr(v).encode())
    return h.hexdigest()


def _describe(entry: dict[str, Any]) -> str:
    if entry["kind"] == _REPLICATED:
        return f"PerReplica of {entry['category']}"
    if entry["kind"] == _OBJECT:
        return entry["category"]
    return "tensor" if entry["kind"] == _TENSOR else f"plain value ({type(entry['state']).__name__})"


def _check_same_across_processes(summaries: list[dict[str, tuple[str, dict[str, str]]]]) -> None:
    """Process 0 alone writes, so whatever another process passes differently would be lost:
    the same names, kinds and values on every process (each compares the same summaries, so all
    raise alike)."""
    first = summaries[0]
    for rank in range(1, len(summaries)):
        other = summaries[rank]
        if first.keys() != other.keys():
            raise ValueError(
                f"save_checkpoint: every process must pass the same entries, but process 0 passes "
                f"{sorted(first)} and process {rank} passes {sorted(other)}"
            )
        for name, (kind, keys) in first.items():
            if other[name][0] != kind:
                raise ValueError(
                    f"save_checkpoint: {name} is a {kind} on process 0 but a {other[name][0]} on process {rank}"
                )
            key = _first_difference(keys, other[name][1])
            if key is not None:
                raise ValueError(_differs(name, kind, key, rank))


def _first_difference(a: dict[str, str], b: dict[str, str]) -> str | None:
    return next((key for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)), None)


def _differs(name: str, kind: str, key: str, rank: int) -> str:
    if kind.startswith("PerReplica"):
        return (
            f"save_checkpoint: the replicas of {name} differ between process 0 and process {rank} at {key}, "
            f"so one copy would lose state"
        )
    where = f"{name}{key}" if kind == "tensor" or kind.startswith("plain value") else f"{name}.state_dict(){key}"
    return (
        f"save_checkpoint: {where} differs between process 0 and process {rank}; process 0 alone writes, so "
        f"process {rank}'s would be lost. Pass the same value on every process, or gather values meant to "
        f"differ (torch.distributed.all_gather_object) and save the list"
    )


# -- loading --------------------------------------------------------------------------------
def _check_target(name: str, entry: dict[str, Any], target: Any, parameters: dict[int, str]) -> None:
    kind, state = entry["kind"], entry["state"]
    if isinstance(target, torch.Tensor):
        if kind != _TENSOR:
            raise TypeError(f"load_checkpoint: {name} is a {_saved_as(entry)} in the checkpoint, not a tensor")
        if state.shape != target.shape or state.dtype != target.dtype:
            raise ValueError(
                f"load_checkpoint: {name} was saved with shape {tuple(state.shape)} and dtype {state.dtype}, "
                f"but the tensor passed has {tuple(target.shape)} and {target.dtype}"
            )
        return
    if kind not in (_REPLICATED, _OBJECT):
        raise TypeError(
            f"load_checkpoint: {name} is a {_saved_as(entry)} in the checkpoint; pass only objects to load "
            f"state into (it comes back in the returned dict when not passed)"
        )
    first = target.values[0] if isinstance(target, PerReplica) else target
    if not _has_state_methods(first):
        raise TypeError(f"load_checkpoint: {name} is a {type(first).__name__}, which has no load_state_dict()")
    if _category(first) != entry["category"]:
        raise TypeError(
            f"load_checkpoint: {name} holds the state of a {entry['category']} in the checkpoint, but a "
            f"{_category(first)} was passed"
        )
    # load_state_dict finds a mismatch only while loading, after the entries before it changed.
    if isinstance(first, torch.nn.Module):
        _check_module_state(name, state, first)
    elif isinstance(first, torch.optim.Optimizer):
        _check_optimizer_state(name, state, first, parameters)


def _check_module_state(name: str, saved: dict[str, Any], module: torch.nn.Module) -> None:
    """What ``load_state_dict(strict=True)`` checks, and the dtypes: a resumed run holds the saved values."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"load_checkpoint: {name} does not match its state in the checkpoint: "
            + "; ".join(
                [f"the checkpoint lacks {_some(missing)}"] * bool(missing)
                + [f"{name} lacks {_some(unexpected)}, which the checkpoint has"] * bool(unexpected)
            )
        )
    for key, mine in own.items():
        theirs = saved[key]
        if not (isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor)):
            continue
        if is_lazy(mine):
            continue  # a lazy module takes the saved shape
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            raise ValueError(
                f"load_checkpoint: {name}.{key} was saved with shape {tuple(theirs.shape)} and dtype "
                f"{theirs.dtype}, but {name} has {tuple(mine.shape)} and {mine.dtype}"
            )


def _check_optimizer_state(name: str, saved: Any, opt: torch.optim.Optimizer, parameters: dict[int, str]) -> None:
    """The groups as ``Optimizer.load_state_dict`` checks them, and the shape of each parameter's state,
    which it does not check (the next ``step()`` would fail with a bare broadcasting error)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        return  # a format of its own
    groups, saved_groups = opt.param_groups, saved["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"load_checkpoint: {name} has {len(groups)} parameter groups, but the checkpoint holds {len(saved_groups)}"
        )
    for g, (group, theirs) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(theirs["params"]):
            raise ValueError(
                f"load_checkpoint: parameter group {g} of {name} has {len(group['params'])} parameters, but the "
                f"checkpoint's has {len(theirs['params'])}"
            )
    if type(opt) not in _SHAPED_STATE:  # a subclass may keep state of other shapes
        return
    params = [p for group in groups for p in group["params"]]
    indices = [i for group in saved_groups for i in group["params"]]
    for n, (p, i) in enumerate(zip(params, indices)):
        for key, value in saved.get("state", {}).get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and not _state_fits(key, value, p):
                which = f"parameter {n}" + (f" ({parameters[id(p)]})" if id(p) in parameters else "")
                raise ValueError(
                    f"load_checkpoint: {name}'s {key!r} of {which} has shape {tuple(value.shape)} in the "
                    f"checkpoint, but the parameter has shape {tuple(p.shape)}"
                )


# torch.optim's optimizers keep each parameter's state in tensors of its shape (or, in
# Adafactor's factored variances, a shape that broadcasts to it); LBFGS keeps flat vectors,
# and other optimizers' state is theirs to know.
_SHAPED_STATE = tuple(
    c
    for c in vars(torch.optim).values()
    if isinstance(c, type)
    and issubclass(c, torch.optim.Optimizer)
    and c not in (torch.optim.Optimizer, torch.optim.LBFGS)
)


def _state_fits(key: str, value: torch.Tensor, param: torch.Tensor) -> bool:
    if key in ("row_var", "col_var"):
        return value.ndim == param.ndim and all(v in (1, q) for v, q in zip(value.shape, param.shape))
    return value.shape == param.shape


def _parameter_names(objects: dict[str, Any]) -> dict[int, str]:
    """The name of every parameter of the modules being loaded, to name one in an optimizer's error."""
    names = {}
    for name, target in objects.items():
        module = target.values[0] if isinstance(target, PerReplica) else target
        if isinstance(module, torch.nn.Module):
            names.update({id(p): f"{name}.{key}" for key, p in module.named_parameters()})
    return names


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _load_entry(entry: dict[str, Any], target: Any) -> None:
    if isinstance(target, torch.Tensor):
        with torch.no_grad():
            target.copy_(entry["state"])
    else:
        target.load_state_dict(entry["state"])


def _saved_as(entry: dict[str, Any]) -> str:
    if entry["kind"] in (_REPLICATED, _OBJECT):
        return f"{entry['category']} state"
    return "tensor" if entry["kind"] == _TENSOR else f"plain value ({type(entry['state']).__name__})"


def _check_rng(per_process: list[dict[str, Any]] | None) -> None:
    if per_process is None:
        raise ValueError("load_checkpoint: the checkpoint was saved without random state; pass rng=False")
    if len(per_process) != process_count():
        raise ValueError(
            f"load_checkpoint: the checkpoint holds the random state of {len(per_process)} processes, but "
            f"{process_count()} run now; pass rng=False to keep this run's random state"
        )
    cuda = per_process[process_index()]["cuda"]
    if cuda is not None and torch.cuda.is_available() and len(cuda) != torch.cuda.device_count():
        raise ValueError(
            f"load_checkpoint: the checkpoint holds the random state of {len(cuda)} GPUs, but "
            f"{torch.cuda.device_count()} are visible; pass rng=False to keep this run's random state"
        )


def _restore_rng(per_process: list[dict[str, Any]]) -> None:
    mine = per_process[process_index()]
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([c.cpu() for c in mine["cuda"]])
    torch.set_rng_state(mine["cpu"].cpu())
