"""State every replica of a call shares, and the check that none wrote it.

The replicas run one function, so an object they all reach is one object:
modules, optimizers and LR schedulers passed broadcast or static, and the
modules, optimizers and tensors the function reaches without being passed them (through
its closure, the globals its code names, the object of a bound method or a
module pmapped itself, a ``functools.partial``'s arguments, and functions of
its own module that it calls, a few levels deep). Reading one is fine (a
closed-over model whose gradients the caller's ``loss.backward()`` takes after
the call). A replica that writes one in place during the call (BatchNorm's
running statistics in training mode, an optimizer step, a backward into a
shared model) races with the others: a result that changes from run to run,
with no error. So an optimizer or scheduler passed shared is refused before
the call, and the version counters of the rest are compared around it.
"""

from __future__ import annotations

import dis
import functools
import itertools
import operator
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import _uncounted_writes
from ._sharded import version_of
from ._uncounted_writes import writes_of

REPLICATE_HINT = (
    "Give each replica its own copy with "
    "`models, opts = torchpmap.replicate(model, lambda p: torch.optim.AdamW(p, ...))` "
    "and pass those (PerReplica arguments, mapped over the devices)."
)
_REACHED = "that the function reaches without being passed it (its closure, a global, its object)"
_MAX_DEPTH = 3


def is_stateful_object(v: Any) -> bool:
    return isinstance(v, (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler))


Shared = torch.nn.Module | torch.optim.Optimizer | torch.Tensor


@dataclass
class Snapshot:
    """The version counters of a shared module's parameters and buffers (an
    optimizer's parameters, or one shared tensor) and of the parameters'
    gradients, before the call."""

    path: str
    how: str  # how the replicas share it, for the message
    owner: Shared
    tensors: list[torch.Tensor]
    versions: list[int]
    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    grad_versions: list[int | None]

    @classmethod
    def of(cls, owner: Shared, path: str, how: str, walk: bool = True) -> Snapshot:
        """``owner`` as it is now. ``walk=False``: a module's or optimizer's
        tensors as its last walk found them (``_walked``), if it was walked."""
        params: list[torch.Tensor]
        if isinstance(owner, torch.Tensor):  # itself (not cached: nothing to walk)
            params, tensors = [], [] if owner.is_inference() else [owner]
        else:
            params, tensors = (None if walk else _last_walk(owner)) or _walk(owner)
        grads = [p.grad for p in params]
        return cls(path, how, owner, tensors, versions_of(tensors), params, grads, _grad_versions(grads))

    def written(self) -> str | None:
        """What a replica wrote (a path), or None."""
        if versions_of(self.tensors) != self.versions:  # (the common case, no write: one comparison)
            for t, version in zip(self.tensors, self.versions):
                if writes_of(t) != version:
                    return self._name_of(t)
        grads = [p.grad for p in self.params]
        if any(map(operator.is_not, grads, self.grads)) or _grad_versions(grads) != self.grad_versions:
            for p, g, grad_version in zip(self.params, self.grads, self.grad_versions):
                if p.grad is not g or version_of(p.grad) != grad_version:
                    return f"{self._name_of(p)}.grad"
        return None

    def _name_of(self, t: torch.Tensor) -> str:
        if isinstance(self.owner, torch.nn.Module):
            named = [
                *self.owner.named_parameters(remove_duplicate=False),
                *self.owner.named_buffers(remove_duplicate=False),
            ]
            for name, value in named:
                if value is t:
                    return f"{self.path}.{name}"
        if isinstance(self.owner, torch.optim.Optimizer):
            for g, group in enumerate(self.owner.param_groups):
                for i, p in enumerate(group["params"]):
                    if p is t:
                        return f"{self.path}.param_groups[{g}]['params'][{i}]"
        return self.path


def _grad_versions(grads: list[torch.Tensor | None]) -> list[int | None]:
    """``version_of`` each gradient; at no cost per parameter while none has one."""
    if not any(map(operator.is_not, grads, itertools.repeat(None))):  # (C loops, no frame per element)
        return [None] * len(grads)
    return [version_of(g) for g in grads]


def versions_of(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's count of writes (``writes_of``), at a version's cost while no
    uncounted write was ever recorded."""
    return [writes_of(t) for t in tensors] if _uncounted_writes.recorded() else [t._version for t in tensors]


# Per module or optimizer (by id: a module's own == and hash may say two are one), weak references
# to its parameters and to its tensors that have a version counter (parameters and buffers), as its
# last walk found them. Walking a module costs ~1-2 us per parameter and buffer, reading the versions
# of the tensors found ~0.1 us each (with the dereferences and gradients, a call pays ~0.2 us per tensor
# stacked, ~0.5 on the threads: 2,000 tensors measured), so the calls between two walks (``_pmap``'s periodic check)
# read the versions only: a write on any call raises at once, and a tensor the module gains after a
# walk is seen from the next one. Weak references throughout: a module the function stops reaching
# is freed with its entry, a tensor it replaced (load_state_dict(assign=True)) is not kept alive
# (and, freed, makes the next check walk again).
_walked: dict[int, tuple[list[weakref.ref[torch.Tensor]], int | None, list[weakref.ref[torch.Tensor]]]] = {}


def _walk(owner: torch.nn.Module | torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``owner``'s parameters (whose gradients are watched too) and every tensor
    of it that has a version counter (inference tensors have none)."""
    buffers: list[torch.Tensor] = []
    if isinstance(owner, torch.optim.Optimizer):
        params = [p for group in owner.param_groups for p in group["params"]]
    else:
        params, buffers = _tensors_of(owner)
    tensors = [t for t in (*params, *buffers) if not t.is_inference()]
    key = id(owner)
    if key not in _walked:
        try:
            weakref.finalize(owner, _walked.pop, key, None)
        except TypeError:  # no weak references to it: walked on every call
            return params, tensors
    refs = [weakref.ref(t) for t in tensors]
    # The parameters lead ``tensors`` unless one is an inference tensor: then referenced apart.
    leading = len(params) if len(tensors) >= len(params) and all(map(operator.is_, tensors, params)) else None
    _walked[key] = (refs, leading, [] if leading is not None else [weakref.ref(p) for p in params])
    return params, tensors


def _last_walk(owner: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """What ``owner``'s last walk found, or None: walk it (never walked, or a tensor it held is gone)."""
    walked = _walked.get(id(owner))
    if walked is None:
        return None
    refs, leading, param_refs = walked
    tensors = [r() for r in refs]
    params = tensors[:leading] if leading is not None else [r() for r in param_refs]
    none = itertools.repeat(None)
    if any(map(operator.is_, tensors, none)) or (leading is None and any(map(operator.is_, params, none))):
        return None  # (not `None in`, which calls a tensor's ==)
    return params, tensors  # type: ignore[return-value]  # no None in them


class ReachedVersions:
    """The check the stacked fast path makes around a call, for what the
    function reached when the fast path was made: the version of each tensor it
    reaches directly and of each tensor of its modules and optimizers as last
    walked (no gradients: a backward inside the function never runs stacked).
    Weak references: an object the function no longer reaches is not kept."""

    __slots__ = ("reached",)

    def __init__(self, reached: list[tuple[str, Shared]]) -> None:
        self.reached = [(path, weakref.ref(obj)) for path, obj in reached]

    def tensors(self) -> list[torch.Tensor] | None:
        """The tensors to watch, or None: the general path (an object is gone, or not walked)."""
        out: list[torch.Tensor] = []
        for _, ref in self.reached:
            obj = ref()
            if isinstance(obj, torch.Tensor):
                if not obj.is_inference():
                    out.append(obj)
                continue
            walked = None if obj is None else _last_walk(obj)
            if walked is None:
                return None
            out += walked[1]
        return out

    def check(self, tensors: list[torch.Tensor], versions: list[int], n: int) -> None:
        """Raise as ``check_not_written`` if one of ``tensors`` moved from ``versions``."""
        if versions_of(tensors) == versions:
            return
        snapshots, k = [], 0
        for path, ref in self.reached:
            obj = ref()
            if obj is None:  # freed during the call (its tensors live on in ``tensors``): name them all
                paths = ", ".join(p for p, _ in self.reached)
                raise RuntimeError(
                    f"pmap: a replica wrote in place a tensor of {paths}, which the function reaches without "
                    f"being passed it (its closure, a global, its object): all {n} replicas share it, so their "
                    f"writes raced. {REPLICATE_HINT}"
                )
            snapshot = Snapshot.of(obj, path, _REACHED, walk=False)
            snapshot.versions = versions[k : k + len(snapshot.tensors)]  # as they were before the call
            k += len(snapshot.tensors)
            snapshots.append(snapshot)
        check_not_written(snapshots, n)


def _tensors_of(module: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every parameter and buffer of ``module`` and its submodules (a tied one
    may come twice): what ``parameters()``/``buffers()`` walk, without building
    names, 3-4x faster, for a check that runs on many calls."""
    params: list[torch.Tensor] = []
    buffers: list[torch.Tensor] = []
    stack, seen = [module], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        params.extend(p for p in m._parameters.values() if p is not None)
        buffers.extend(b for b in m._buffers.values() if b is not None)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))  # in parameters()' order
    return params, buffers


def watch_passed(objects: list[tuple[str, Any, str]], n: int) -> list[Snapshot]:
    """Refuse an optimizer or LR scheduler shared by several replicas (stepping
    it is the only thing to do with one, and that races); snapshot a shared
    module. One replica sharing with the caller is single-device training: fine."""
    if n < 2:
        return []
    snapshots = []
    for path, obj, how in objects:
        if not isinstance(obj, torch.nn.Module):
            kind = "an optimizer" if isinstance(obj, torch.optim.Optimizer) else "an LR scheduler"
            raise ValueError(
                f"pmap: {path} is {kind} ({type(obj).__name__}) {how}, so all {n} replicas "
                f"would step this one object, and the parameters it updates, at once: wrong weights, "
                f"different on every run. {REPLICATE_HINT}"
            )
        snapshots.append(Snapshot.of(obj, path, how))
    return snapshots


def watch_reached(reached: list[tuple[str, Shared]], n: int, walk: bool = True) -> list[Snapshot]:
    """Snapshot the modules and tensors a function reaches without being passed
    them (``reached_by``); ``walk=False``: modules as last walked (``_walked``)."""
    if n < 2:
        return []
    return [Snapshot.of(obj, path, _REACHED, walk) for path, obj in reached]


def check_not_written(snapshots: list[Snapshot], n: int, cause: Exception | None = None) -> None:
    """A replica that changed a shared module's parameter, gradient or buffer,
    or a shared tensor, raced with the others: a wrong result, so an error."""
    for snapshot in snapshots:
        written = snapshot.written()
        if written is None:
            continue
        path, how = snapshot.path, snapshot.how
        if isinstance(snapshot.owner, torch.Tensor):
            raise RuntimeError(
                f"pmap: a replica wrote {written} in place, but {path} is a tensor {how}: all {n} "
                f"replicas share this one tensor, so their writes raced (a result that changes from run "
                f"to run). clone() it inside the function before writing to it, or pass one per "
                f"replica (a mapped argument, or a PerReplica). (The check reads its version counter: "
                f"another thread writing it during the call reads the same.)"
            ) from cause
        if isinstance(snapshot.owner, torch.optim.Optimizer):
            raise RuntimeError(
                f"pmap: a replica wrote {written} in place, but {path} is an optimizer "
                f"({type(snapshot.owner).__name__}) {how}: all {n} replicas stepped this one object, and "
                f"the parameters it updates, at once (wrong weights, different on every run). {REPLICATE_HINT}"
            ) from cause
        from .batchnorm import SyncBatchNorm  # (it imports this module's package)

        statistics = (
            "a SyncBatchNorm too: its collectives keep each replica's own copy equal"
            if any(isinstance(m, SyncBatchNorm) for m in _modules_in(snapshot.owner))
            else "tp.SyncBatchNorm for BatchNorm statistics"
        )
        raise RuntimeError(
            f"pmap: a replica wrote {written} in place, but {path} is an nn.Module {how}: "
            f"all {n} replicas share this one module, so they trained it at once and raced (wrong "
            f"weights, different on every run). A shared module is for reading only (eval mode, "
            f"no backward into it, no updates; {statistics}). {REPLICATE_HINT}"
        ) from cause


def _modules_in(owner: Any) -> list[Any]:
    return list(owner.modules()) if isinstance(owner, torch.nn.Module) else []


# -- what a function reaches without being passed it -----------------------------------------
def reached_by(fun: Callable[..., Any]) -> list[tuple[str, Shared]]:
    """The modules, optimizers and tensors ``fun`` reaches without being passed
    them, each once, with a name for messages. Best effort: an object that
    fails to be looked at (a lazy proxy) ends the search, not the call."""
    found: dict[int, tuple[str, Shared]] = {}
    try:
        _scan(fun, found, None, 0, set())
    except Exception:
        pass
    return list(found.values())


def without_arguments(reached: list[tuple[str, Shared]], arguments: list[Any]) -> list[tuple[str, Shared]]:
    """``reached`` less the tensors that share memory with the call's arguments:
    a replica writing its own slice of a mapped argument bumps the version counter
    of every view of it (the argument checks in ``_pmap`` watch those)."""
    if not any(isinstance(obj, torch.Tensor) for _, obj in reached):
        return reached
    storages = set()
    for a in arguments:
        if isinstance(a, torch.Tensor):
            for t in getattr(a, "shards", None) or (a,):  # a ShardedTensor's memory is its shards'
                storages.add(t.untyped_storage().data_ptr())
    return [
        (path, obj)
        for path, obj in reached
        if not (isinstance(obj, torch.Tensor) and obj.untyped_storage().data_ptr() in storages)
    ]


def _add(name: str, value: Any, found: dict[int, tuple[str, Any]]) -> None:
    if isinstance(value, (torch.nn.Module, torch.optim.Optimizer, torch.Tensor)) and id(value) not in found:
        found[id(value)] = (name, value)
    elif type(value) in (dict, list, tuple) and len(value) <= _MAX_CONTAINER:
        # A tensor the function reads as params["c"] is reached as surely as one closed over
        # (a computed one's history is every replica's, and autograd must see it once).
        items = value.items() if type(value) is dict else enumerate(value)
        for key, item in items:
            if isinstance(item, (torch.nn.Module, torch.optim.Optimizer, torch.Tensor)):  # (one level only)
                _add(f"{name}[{key!r}]", item, found)


_MAX_CONTAINER = 256  # (a bigger dict or list closed over is looked into no further: a call reads it)


def _scan(f: Any, found: dict[int, tuple[str, Any]], home: dict[str, Any] | None, depth: int, seen: set[int]) -> None:
    """Add to ``found`` what ``f`` reaches; ``home``: the globals of the pmapped function's module."""
    if depth > _MAX_DEPTH or id(f) in seen:
        return
    seen.add(id(f))
    if isinstance(f, functools.partial):
        for i, a in enumerate(f.args):
            _add(f"functools.partial argument {i}", a, found)
        for k, a in f.keywords.items():
            _add(f"functools.partial argument {k}", a, found)
        _scan(f.func, found, home, depth, seen)
        return
    if isinstance(f, torch.nn.Module):
        _add(f"the pmapped {type(f).__name__}", f, found)
        return
    wrapped = getattr(f, "__wrapped__", None)  # a decorator's wrapper (functools.wraps): the function inside
    if wrapped is not None and callable(wrapped):
        _scan(wrapped, found, home, depth, seen)
    owner = getattr(f, "__self__", None)
    if isinstance(f, types.MethodType) and owner is not None:
        name = type(owner).__name__
        _add(f"the {name} whose method is pmapped", owner, found)
        if not isinstance(owner, torch.nn.Module):
            for attr, value in vars(owner).items() if hasattr(owner, "__dict__") else ():
                _add(f"{name}.{attr}", value, found)
        f = f.__func__
    code = getattr(f, "__code__", None)
    if not isinstance(code, types.CodeType):
        return
    module_globals = getattr(f, "__globals__", None)
    if home is None:  # the pmapped function's own module: the functions it calls from there are followed
        home = module_globals
    for i, value in enumerate(getattr(f, "__defaults__", None) or ()):  # def f(x, c=c)
        _add(f"default argument {i}", value, found)
    for name, value in (getattr(f, "__kwdefaults__", None) or {}).items():
        _add(f"default argument {name}", value, found)
    cells = getattr(f, "__closure__", None) or ()
    for name, cell in zip(code.co_freevars, cells):
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        _add(name, value, found)
        _follow(value, found, home, depth, seen)  # (a closure over a function of that module: followed too)
    if module_globals is None:
        return
    for name in _global_names(code):
        if name in module_globals:
            value = module_globals[name]
            _add(name, value, found)
            _follow(value, found, home, depth, seen)


def _follow(
    value: Any, found: dict[int, tuple[str, Any]], home: dict[str, Any] | None, depth: int, seen: set[int]
) -> None:
    """Look into a function ``fun`` calls when it comes from ``fun``'s own module."""
    if isinstance(value, (types.FunctionType, functools.partial)):
        target = value.func if isinstance(value, functools.partial) else value
        if getattr(target, "__globals__", None) is home:
            _scan(value, found, home, depth + 1, seen)


_LOADS_A_GLOBAL = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})


@functools.lru_cache(maxsize=256)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The global names ``code`` and the functions defined in it load (not
    ``co_names``, which also holds attribute names: ``cfg.x`` is no global ``x``)."""
    names = [i.argval for i in dis.get_instructions(code) if i.opname in _LOADS_A_GLOBAL]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return tuple(dict.fromkeys(names))
