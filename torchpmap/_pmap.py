"""The pmap transform: argument handling, placement and output assembly.

A call flattens its arguments, looks up a plan cached per call signature
(tree structure, leaf kinds and ranks, static arguments), slices the mapped
leaves into one argument list per replica, describes the call in a
``CallRecord`` that an executor runs (``_call.py``), and wraps the
per-replica outputs into ShardedTensors.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import numbers
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar, overload

import numpy as np
import torch
from torch.utils._pytree import SUPPORTED_NODES, PyTree, TreeSpec, tree_flatten, tree_structure, tree_unflatten

from . import _axis, _devices, _fast_tree, _random, _transfers
from . import distributed as _distributed
from ._autodiff import FlatOutput, counted_once, named_grad_tensors
from ._call import CallRecord, Placement, ReplicaGroup, choose_executor, constants_signature_of
from ._communicator import GroupBackend, LocalBackend, ThreadRendezvous
from ._compile import DYNAMO_GATE, CompiledReplicas, DynamoGate, normalize_options
from ._constant_signature import spec_signature
from ._fast_call import FastCall
from ._fast_tree import Structure
from ._fork import reinit_after_fork
from ._layout import device_groups, slices_overlap
from ._sharded import (
    ShardedTensor,
    _lost_write_message,
    _plain_view,
    _storage_key,
    _TemporaryView,
    pairs_sharing_memory,
)
from ._shared_state import (
    ReachedVersions,
    Snapshot,
    check_not_written,
    is_stateful_object,
    reached_by,
    versions_of,
    watch_passed,
    watch_reached,
    without_arguments,
)
from ._stacked import StackedOutput
from ._tree import broadcast_prefix, is_axis_spec, leaf_paths, reorder_leaves
from ._uncounted_writes import writes_of
from .errors import CollectiveError, DeletedShardedTensorError
from .training import PerReplica

_TENSOR, _SHARDED, _NUMPY, _SCALAR, _OTHER, _PER_REPLICA = range(6)
# Module globals: an enum member's attribute lookup would cost in the per-leaf loop.
_PLACED_MAPPED, _PLACED_BROADCAST, _PLACED_SHARDED, _PLACED_PER_REPLICA = (
    Placement.MAPPED,
    Placement.BROADCAST,
    Placement.SHARDED,
    Placement.PER_REPLICA,
)


def _kind(v: Any) -> int:
    if isinstance(v, ShardedTensor):  # before Tensor: it is a Tensor subclass
        return _SHARDED
    if isinstance(v, torch.Tensor):
        return _TENSOR
    if isinstance(v, PerReplica):
        return _PER_REPLICA
    if isinstance(v, (np.ndarray, np.generic)):
        return _NUMPY
    if isinstance(v, numbers.Number):
        return _SCALAR
    return _OTHER


def _ndim(v: Any, kind: int) -> int:
    if kind in (_TENSOR, _SHARDED, _NUMPY, _PER_REPLICA):
        return v.ndim
    return 0


@dataclass
class _InPlan:
    axes: list[int | None]  # per input leaf: canonical mapped axis or None
    mapped: list[int]  # indices of mapped leaves
    kinds: list[int]  # per input leaf: _TENSOR, _SHARDED, ...
    paths: list[str]  # per input leaf: readable path (args[0]['w'])
    arg_of_leaf: list[int | None]  # positional index of the argument a leaf comes from (None: kwargs)
    # Modules, optimizers and LR schedulers every replica receives as one object: (path,
    # leaf index or static argument position, how it is shared). Not the objects: a later
    # call of this plan may pass others of the same type (``shared_objects``).
    shared_leaves: list[tuple[str, int, str]]
    shared_statics: list[tuple[str, int, str]]
    # The stacked executor's fast path for calls of this plan (``_fast_call``), once one ran stacked.
    fast: FastCall | None = None

    @property
    def shares_objects(self) -> bool:
        return bool(self.shared_leaves or self.shared_statics)

    def shared_objects(self, leaves: list[Any], static_vals: tuple[Any, ...]) -> list[tuple[str, Any, str]]:
        """This call's shared modules, optimizers and schedulers: (path, object, how)."""
        return [(path, leaves[j], how) for path, j, how in self.shared_leaves] + [
            (path, static_vals[k], how) for path, k, how in self.shared_statics
        ]


@dataclass
class _OutPlan:
    axes: list[int | None]  # per output leaf: canonical mapped axis or None (out_axes=None, or a None output)
    paths: list[str]


# What picks a cached plan. Inputs: (tree structure: a _fast_tree key, a TreeSpec
# with its spec_signature, or None for positional tensors; static argument values;
# positional argument count; (type, ndim) of every leaf). Outputs: (tree
# structure, per leaf its rank if a tensor, else its type).
_InKey: TypeAlias = (
    "tuple[tuple[TreeSpec, Any] | Structure | None, tuple[Any, ...], int, tuple[tuple[type, int | None], ...]]"
)
_OutKey: TypeAlias = "tuple[TreeSpec | Structure, tuple[int | type, ...]]"


@overload
def pmap(
    fun: Callable[..., Any],
    axis_name: str | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_broadcasted_argnums: int | Sequence[int] = (),
    devices: Sequence[torch.device] | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    compile: bool | dict[str, Any] | None = False,
) -> Pmapped: ...


@overload
def pmap(
    fun: None = None,
    axis_name: str | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_broadcasted_argnums: int | Sequence[int] = (),
    devices: Sequence[torch.device] | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    compile: bool | dict[str, Any] | None = False,
) -> Callable[[Callable[..., Any]], Pmapped]: ...


def pmap(
    fun: Callable[..., Any] | None = None,
    axis_name: str | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_broadcasted_argnums: int | Sequence[int] = (),
    devices: Sequence[torch.device] | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    compile: bool | dict[str, Any] | None = False,
) -> Pmapped | Callable[[Callable[..., Any]], Pmapped]:
    """Map ``fun`` over the leading (or ``in_axes``) axis of its arguments, one
    replica per device, like ``jax.pmap``. Usable as ``@pmap``,
    ``@pmap(axis_name="i")`` or ``pmap(f, "i", in_axes=...)``.

    Returns ShardedTensors (shards stay on their devices); ``out_axes=None``
    returns one tensor and checks that every replica produced the same value.
    ``devices`` names one device per replica; one listed several times runs
    several replicas (more replicas than devices, ``replica_devices(n)``).

    Inputs that replicas share are read-only: a replica that writes in place a
    broadcast (``in_axes=None``) tensor, or a mapped one whose slices are the
    same memory (``expand()``), or a broadcast ``nn.Module``'s parameters,
    gradients or buffers, makes the call raise ``RuntimeError``; a broadcast
    optimizer is refused. A replica may write its own slice of a mapped input;
    ``replicate`` gives each replica its own model and optimizer. A donated
    ShardedTensor (``donate_argnums``) is deleted once the replicas start,
    even if the call then fails; a call that fails before (a bad argument)
    leaves it usable, so the step can be retried.
    """
    options = dict(
        axis_name=axis_name,
        in_axes=in_axes,
        out_axes=out_axes,
        static_broadcasted_argnums=static_broadcasted_argnums,
        devices=devices,
        axis_size=axis_size,
        donate_argnums=donate_argnums,
        compile=compile,
    )
    if fun is None:
        return lambda f: Pmapped(f, **options)
    if isinstance(fun, str) and axis_name is None:
        raise TypeError(
            f"pmap: the first argument must be the function to map; to name the axis use pmap(axis_name={fun!r})"
        )
    return Pmapped(fun, **options)


def _argnums(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),)
    try:
        nums = tuple(value)
    except TypeError:
        raise TypeError(f"pmap: {name} must be an int or a sequence of ints, got {value!r}") from None
    for v in nums:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"pmap: {name} must be an int or a sequence of ints, got {value!r}")
    return tuple(int(v) for v in nums)


def _check_in_signature(fun: Callable[..., Any], nums: tuple[int, ...], name: str) -> None:
    """Refuse argument numbers past ``fun``'s positional parameters (when it has
    no ``*args`` and its signature can be read), as ``jax.jit`` does."""
    try:
        # The function's own signature: a functools.wraps wrapper's inner one may take fewer.
        parameters = inspect.signature(fun, follow_wrapped=False).parameters.values()
    except (TypeError, ValueError):
        return
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return
    count = sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)
    for i in nums:
        if not -count <= i < count:
            raise ValueError(
                f"pmap: {name} entry {i} is out of range: {getattr(fun, '__qualname__', fun)} takes "
                f"{count} positional argument(s)"
            )


class Pmapped:
    """The callable that ``pmap`` returns."""

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        axis_name: str | None,
        in_axes: Any,
        out_axes: Any,
        static_broadcasted_argnums: int | Sequence[int],
        devices: Sequence[torch.device] | None,
        axis_size: int | None,
        donate_argnums: int | Sequence[int],
        compile: bool | dict[str, Any] | None = False,
    ) -> None:
        if not callable(fun):
            raise TypeError(f"pmap: fun must be callable, got {type(fun).__name__}")
        # torch.compile's function or OptimizedModule (not torch.compiler.disable's, which carries it too)
        if hasattr(fun, "_torchdynamo_orig_callable") and not getattr(fun, "_torchdynamo_disable", False):
            warnings.warn(
                "pmap of a torch.compile'd function: each replica calls it in a context of its own (its random "
                "stream's torch-function mode), so Dynamo recompiles it per replica until its recompile limit, "
                "then runs it eagerly. Pass the plain function with pmap(f, compile=True) (or compile=dict of "
                "torch.compile's options): one compiled program per device, and one for all replicas stacked.",
                RuntimeWarning,
                stacklevel=3,
            )
        if isinstance(fun, Pmapped):
            raise NotImplementedError(
                "nested pmap is not supported: pmap of a pmapped function. Map the inner function with "
                "torch.vmap, or flatten both axes into one pmap."
            )
        if axis_name is not None and not (isinstance(axis_name, str) and axis_name):
            raise TypeError(f"pmap: axis_name must be a non-empty string or None, got {axis_name!r}")
        if isinstance(in_axes, list):
            in_axes = tuple(in_axes)  # JAX accepts a list at the top level
        if not (is_axis_spec(in_axes) or isinstance(in_axes, tuple)):
            raise TypeError(
                f"pmap: in_axes must be an int, None, or a tuple with one entry per "
                f"positional argument, got {in_axes!r}"
            )
        if not is_axis_spec(out_axes):
            # Its structure is checked against the outputs; its entries now, as in_axes' are.
            for entry in tree_flatten(out_axes, is_leaf=is_axis_spec)[0]:
                if not is_axis_spec(entry):
                    raise TypeError(f"pmap: out_axes must be ints or None (or a pytree of them), got {out_axes!r}")
        if axis_size is not None and (
            isinstance(axis_size, bool) or not isinstance(axis_size, numbers.Integral) or axis_size < 1
        ):
            raise ValueError(f"pmap: axis_size must be a positive int, got {axis_size!r}")
        if devices is not None:
            devices = _devices.as_devices(devices, "pmap")
        self._fun = fun
        self._axis_name = axis_name
        self._in_axes = in_axes
        self._out_axes = out_axes
        # Across processes, a call with out_axes=None outputs ends with an exchange that
        # compares them: whether it does is known before the call, the same on every process.
        self._checks_outputs = any(a is None for a in tree_flatten(out_axes, is_leaf=is_axis_spec)[0])
        self._static = _argnums(static_broadcasted_argnums, "static_broadcasted_argnums")
        self._donate = _argnums(donate_argnums, "donate_argnums")
        _check_in_signature(fun, self._donate, "donate_argnums")
        _check_in_signature(fun, self._static, "static_broadcasted_argnums")
        self._devices = devices
        self._devices_checked_for: tuple[torch.device, ...] | None = None  # the local devices they were checked against
        # Declared: mypy does not count int as a numbers.Integral, so after the check
        # above it would infer None.
        self._axis_size: int | None = None if axis_size is None else int(axis_size)
        self._in_plans: _PlanCache[_InKey, _InPlan] = _PlanCache()
        self._positional_specs: dict[int, TreeSpec] = {}  # by argument count
        self._out_plans: _PlanCache[_OutKey, _OutPlan] = _PlanCache()
        self._fun_name = getattr(fun, "__qualname__", None) or repr(fun)
        self._fun_identity = _identity(fun)
        self._random = _random.Interception()  # whether its replicas draw random numbers
        self._last_group: ReplicaGroup | None = None  # the replicas of the last one-process call
        self._reached_fingerprint: tuple[tuple[int, bool | None], ...] | None = None  # see _watch_reached
        self._calls = 0  # every call, fast or not: the periodic checks of _watch_reached
        options = normalize_options(compile)
        self._compiled = None if options is None else CompiledReplicas(fun, options, self._fun_name)
        # fun's attributes, but not over this object's own: a wrapper of a pmap has the same
        # names (update_wrapper's default overwrote them: the outer pmap became the inner one).
        functools.update_wrapper(self, fun, updated=())
        for name, value in getattr(fun, "__dict__", {}).items():
            self.__dict__.setdefault(name, value)

    def __repr__(self) -> str:
        return f"<pmap of {self._fun_name} axis_name={self._axis_name!r}>"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        """``@pmap`` on a method: the instance becomes args[0], mapped, broadcast
        or static by in_axes/static_broadcasted_argnums like any argument (as JAX)."""
        if obj is None:
            return self
        return types.MethodType(self, obj)

    # -- the call ------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if sys.is_finalizing():
            # Daemon threads are frozen and imports fail now: a call would wait for the timeout.
            raise RuntimeError(
                f"pmap of {self._fun_name} was called while Python shuts down (from __del__ or a finalizer "
                f"at exit), when its replicas can no longer run; call it before exit (an atexit handler works)"
            )
        if _functorch_level() is not None:
            raise _inside_function_transform(self._fun_name)
        # (No call without static arguments: most pmaps have none.)
        static_pos = self._static_positions(len(args)) if self._static else ()
        if static_pos:
            static_vals = tuple(args[i] for i in static_pos)
            dyn_args = tuple(a for i, a in enumerate(args) if i not in static_pos)
            # A tensor hashes by identity: every new one would be another cache entry and capture.
            if not _hashable(static_vals) or any(isinstance(v, torch.Tensor) for v in static_vals):
                raise _bad_static_argument(args, static_pos)
        else:
            static_vals, dyn_args = (), args
        treedef: TreeSpec | None
        key_spec: tuple[TreeSpec, Any] | Structure | None
        structure: Structure | TreeSpec | None  # this call's tree, as the fast path rebuilds it
        positional = not kwargs
        if positional:  # (a loop, not all() of a generator: every call asks)
            for a in dyn_args:
                if not isinstance(a, torch.Tensor) or type(a) in SUPPORTED_NODES:
                    positional = False
                    break
        if positional:
            # The common call, positional tensors only: skip the generic flatten, and key
            # the plan without hashing a tree structure (None stands for it). A tensor
            # type registered as a pytree node is a tree, flattened as torch's pytree does.
            # Its TreeSpec (_positional_spec) only where the general path needs it.
            leaves, treedef, key_spec = list(dyn_args), None, None
            structure = None
        else:
            # Tuples, lists and dicts of tensors and numbers: a structure key that is cheap to
            # build and hash (_fast_tree); torch's TreeSpec only where the general path needs it.
            found = _fast_tree.flatten((dyn_args, kwargs))
            if found is not None:
                (leaves, key_spec), treedef = found, None
                structure = key_spec
            else:
                leaves, treedef = tree_flatten((dyn_args, kwargs))
                # A TreeSpec's == takes a True key for 1: its spec_signature tells them apart.
                key_spec = (treedef, spec_signature(treedef))
                structure = treedef
        statics = tuple(_static_key(v) for v in static_vals) if static_pos else ()
        key: _InKey = (key_spec, statics, len(args), _leaf_kinds(leaves))
        plan = self._in_plans.get(key)
        if plan is None:
            plan = self._make_in_plan(args, static_pos, dyn_args, kwargs, leaves)
            self._in_plans.put(key, plan)
        self._calls += 1
        recheck = self._calls % _RECHECK_EVERY == 0  # this call takes the general path and its checks
        fast = plan.fast  # read once: another thread's call may replace it
        if fast is not None and not recheck:
            # The closed-over tensors, modules and optimizers found when the fast path was made
            # (the general path, every _RECHECK_EVERY-th call, looks again and makes a new one):
            # a write into one of their tensors raises. Versions only, ~0.2 us per tensor.
            reached = fast.reached
            watched = reached.tensors() if reached is not None else None
            if reached is None or watched is not None:
                versions = versions_of(watched) if watched else None
                fast_out = fast.call(leaves, structure, tuple(zip(static_pos, static_vals)) if static_pos else ())
                if fast_out is not None:
                    if versions is not None:
                        reached.check(watched, versions, len(fast.devices))  # type: ignore[union-attr,arg-type]
                    return self._assemble_stacked(fast_out, fast.devices)
            plan.fast = None  # the general path decides, and makes a new one if the call runs stacked

        if treedef is None:
            treedef = self._positional_spec(len(dyn_args)) if structure is None else tree_structure((dyn_args, kwargs))
        try:
            donated = self._donated_leaves(plan, len(args))
            with _claimed_for_donation([leaves[j] for j in donated]):
                return self._general_call(plan, leaves, treedef, static_pos, static_vals, donated, recheck)
        except BaseException:
            # A caller that catches the error and calls again is checked again (the
            # check may have raised, or the call failed after it was taken as done).
            self._reached_fingerprint = None
            raise

    def _general_call(
        self,
        plan: _InPlan,
        leaves: list[Any],
        treedef: TreeSpec,
        static_pos: tuple[int, ...],
        static_vals: tuple[Any, ...],
        donated: list[int],
        recheck: bool,
    ) -> Any:
        """A call that the stacked fast path did not take: placement, the checks, an
        executor. ``donated``: the donated leaves, claimed for this call by the caller."""
        n = self._axis_length(plan, leaves)
        devices = self._choose_devices(n, plan, leaves)
        shared_modules = watch_passed(plan.shared_objects(leaves, static_vals), n) if plan.shares_objects else []
        grad_on = torch.is_grad_enabled()
        found = reached_by(self._fun) if n > 1 or grad_on else []
        # Not in ``shared_modules``: a fast path stays possible.
        reached = self._watch_reached(found, leaves, n, recheck)
        reached_grads = (
            [t for _, t in found if isinstance(t, torch.Tensor) and t.grad_fn is not None] if grad_on else []
        )
        reached_named = _named_grad_tensors(found) if grad_on and _distributed.is_initialized() else []
        per_leaf, placements, grad_leaves, shared = self._place(plan, leaves, devices, n)

        programs: list[Callable[..., Any]]
        gate: DynamoGate | None
        if self._compiled is None:
            programs, gate = [self._fun] * n, None
        else:
            per_replica = _PER_REPLICA in plan.kinds
            signature = constants_signature_of(static_vals, leaves, treedef)
            programs, gate = self._compiled.programs(devices, n, per_replica, signature), DYNAMO_GATE
        record = CallRecord(
            self._replica_group(devices, gate),
            self._fun,
            programs,
            None if treedef is self._positional_specs.get(len(leaves)) else treedef,
            tuple(zip(static_pos, static_vals)),
            leaves,
            plan.axes,
            placements,
            per_leaf,
            grad_leaves,
            [leaves[j] for j in donated],
            compile_options=None if self._compiled is None else self._compiled.options,
            reached_grads=reached_grads,
            reached_named=reached_named,
        )
        watched = shared_modules + reached
        try:
            outs = choose_executor(record).call(record)
        except Exception as e:
            self._tell_other_processes_this_call_failed(record.group, devices, e)
            if watched:  # the race on a shared module may be why a replica failed
                check_not_written(watched, n, cause=e)
            raise
        try:
            _check_not_written(shared, plan.paths, leaves)
            if watched:
                check_not_written(watched, n)
        except Exception as e:
            self._tell_other_processes_this_call_failed(record.group, devices, e)
            raise
        if isinstance(outs, StackedOutput):
            if outs.replay is not None and not (donated or shared or shared_modules or grad_leaves):
                given_as_tensor = [kind in (_TENSOR, _SHARDED, _NUMPY) for kind in plan.kinds]
                kinds = FastCall.kinds_of(record, given_as_tensor)
                if kinds is not None:
                    watch = without_arguments(found, leaves) if n > 1 else []
                    reached_versions = ReachedVersions(watch) if watch else None
                    plan.fast = FastCall(outs.replay, record, _devices.local_device_tuple(), kinds, reached_versions)
            return self._assemble_stacked(outs, devices)
        return self._assemble(outs, devices, record.group)

    def _watch_reached(self, found: list[tuple[str, Any]], leaves: list[Any], n: int, recheck: bool) -> list[Snapshot]:
        """Snapshots of what the function reaches without being passed it
        (``_shared_state``), on every call: a write may start on any call, behind
        a Python flag or a submodule's train/eval mode. Walking a module for its
        parameters and buffers costs ~1-2 us each, reading their versions ~0.2-0.5 us,
        so modules and optimizers are walked again only on the first call, after
        those objects or their train/eval mode change, and every
        ``_RECHECK_EVERY``-th call (``recheck``: the stacked fast path leaves that
        one to the general path): a tensor a module gains between walks is
        watched from the next."""
        if n < 2 or not found:
            return []
        fingerprint = tuple((id(obj), getattr(obj, "training", None)) for _, obj in found)
        walk = fingerprint != self._reached_fingerprint or recheck
        self._reached_fingerprint = fingerprint
        return watch_reached(without_arguments(found, leaves), n, walk)

    def _positional_spec(self, n: int) -> TreeSpec:
        """The tree structure of ``((a0, ..., a{n-1}), {})`` with tensor leaves."""
        spec = self._positional_specs.get(n)
        if spec is None:
            spec = self._positional_specs[n] = tree_flatten((tuple(range(n)), {}))[1]
        return spec

    def _replica_group(self, devices: tuple[torch.device, ...], gate: DynamoGate | None) -> ReplicaGroup:
        """The replicas of a call on ``devices`` and their axis, which spans
        every process's replicas in a multi-process job. In one process the
        group of the last call is reused when its devices are the same (it
        holds no per-call state: each run makes its own communicator)."""
        layout = _distributed.call_layout(len(devices))
        if layout is None:
            group = self._last_group
            if group is not None and group.devices == devices:
                return group
        # An unnamed axis still needs a name internally; no user code can spell it.
        axis_name = self._axis_name if self._axis_name is not None else _axis.ANONYMOUS_AXIS
        new_backend: Callable[[], GroupBackend]
        if layout is None:  # one process: the axis is this call's replicas
            size, first = len(devices), 0
            new_backend = lambda: LocalBackend(devices)  # noqa: E731
        else:
            size, first, make_backend = layout
            identity = self._fun_identity
            new_backend = lambda: make_backend(devices, identity)  # noqa: E731
        new_comm = lambda: ThreadRendezvous(new_backend(), gate=gate)  # noqa: E731
        group = ReplicaGroup(
            axis_name, size, first, devices, new_comm, f"pmap of {self._fun_name}", self._random, new_backend
        )
        self._last_group = None if layout is not None else group
        return group

    # -- inputs --------------------------------------------------------------------------
    def _static_positions(self, nargs: int) -> tuple[int, ...]:
        if not self._static:
            return ()
        pos = []
        for i in self._static:
            j = i + nargs if i < 0 else i
            if not 0 <= j < nargs:
                raise ValueError(
                    f"pmap: static_broadcasted_argnums entry {i} is out of range: "
                    f"{self._fun_name} was called with {nargs} positional argument(s)"
                )
            pos.append(j)
        return tuple(sorted(set(pos)))

    def _make_in_plan(
        self,
        args: tuple[Any, ...],
        static_pos: tuple[int, ...],
        dyn_args: tuple[Any, ...],
        kwargs: dict[str, Any],
        leaves: list[Any],
    ) -> _InPlan:
        in_axes = self._in_axes
        # Readable paths: args[i] counts every positional argument, static ones too.
        dyn_index = [i for i in range(len(args)) if i not in static_pos]
        if isinstance(in_axes, tuple):
            if len(in_axes) == len(args):
                in_axes = tuple(a for i, a in enumerate(in_axes) if i not in static_pos)
                in_index = dyn_index
            elif len(in_axes) == len(dyn_args):
                in_index = list(range(len(dyn_args)))
            else:
                raise ValueError(
                    f"pmap: in_axes has {len(in_axes)} entries but {self._fun_name} was "
                    f"called with {len(args)} positional argument(s); give one entry per "
                    f"positional argument"
                )
        # One argument at a time, so that a structure mismatch names the entry of
        # in_axes and the argument it happens in (in_axes[1]['w'] vs args[1]['w']).
        axes: list[int | None] = []
        paths: list[str] = []
        arg_of_leaf: list[int | None] = []
        for j, a in enumerate(dyn_args):
            if isinstance(in_axes, tuple):
                axes += broadcast_prefix(in_axes[j], a, f"in_axes[{in_index[j]}]", f"args[{dyn_index[j]}]")
            else:
                axes += broadcast_prefix(in_axes, a, "in_axes", f"args[{dyn_index[j]}]")
            p = leaf_paths(a, f"args[{dyn_index[j]}]")
            paths += p
            arg_of_leaf += [dyn_index[j]] * len(p)
        for k, v in kwargs.items():
            axes += broadcast_prefix(0, v, "in_axes", f"kwargs[{k!r}]")  # keyword arguments: always axis 0
            p = leaf_paths(v, f"kwargs[{k!r}]")
            paths += p
            arg_of_leaf += [None] * len(p)
        kinds = [_kind(v) for v in leaves]
        canonical: list[int | None] = []
        for leaf, kind, axis, path in zip(leaves, kinds, axes, paths):
            if kind == _PER_REPLICA and axis not in (0, -1):
                raise ValueError(
                    f"pmap: {path} is a PerReplica (one object per device); it is always "
                    f"mapped over its only axis, so its in_axes must be 0, got {axis}"
                )
            if axis is None:
                canonical.append(None)
                continue
            if leaf is None:
                canonical.append(None)  # None holds no data: nothing to map
                continue
            if is_stateful_object(leaf):
                read_only = (
                    " (a module that replicas only read, never train, may instead be shared with in_axes=None)"
                    if isinstance(leaf, torch.nn.Module)
                    else ""
                )
                raise ValueError(
                    f"pmap: cannot map over {path}, a {type(leaf).__name__} (in_axes={axis}); give "
                    f"each replica its own copy with torchpmap.replicate(model, optimizer_factory), "
                    f"which returns PerReplica arguments that pmap maps{read_only}"
                )
            if kind in (_SCALAR, _OTHER):
                raise ValueError(
                    f"pmap: cannot map over {path}, a {type(leaf).__name__} (in_axes={axis}); "
                    f"pass a tensor, or use in_axes=None / static_broadcasted_argnums for it"
                )
            ndim = _ndim(leaf, kind)
            if ndim == 0:
                raise ValueError(
                    f"pmap: {path} is a rank-0 tensor but in_axes={axis} maps it; a mapped "
                    f"argument needs an axis to split (use in_axes=None to broadcast it)"
                )
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"pmap: in_axes={axis} is out of range for {path}, which has {ndim} "
                    f"dimension(s) (shape {tuple(leaf.shape)})"
                )
            canonical.append(axis % ndim)
        shared_leaves = [
            (paths[j], j, "passed broadcast (in_axes=None)")
            for j in range(len(leaves))
            if canonical[j] is None and is_stateful_object(leaves[j])
        ]
        shared_statics = [
            (f"args[{i}]", k, "passed static (static_broadcasted_argnums)")
            for k, i in enumerate(static_pos)
            if is_stateful_object(args[i])
        ]
        mapped = [j for j, a in enumerate(canonical) if a is not None]
        if not mapped and self._axis_size is None:
            raise ValueError(
                f"pmap: {self._fun_name} was called with no mapped argument, so the axis "
                f"size is unknown; map at least one argument (in_axes) or pass axis_size"
            )
        return _InPlan(canonical, mapped, kinds, paths, arg_of_leaf, shared_leaves, shared_statics)

    def _axis_length(self, plan: _InPlan, leaves: list[Any]) -> int:
        n: int | None = None
        first: int | None = None  # the leaf n comes from
        for j in plan.mapped:
            if plan.kinds[j] == _TENSOR:
                _refuse_unmappable(leaves[j], plan.paths[j])
            size = leaves[j].shape[plan.axes[j]]
            if n is None:
                n, first = size, j
            elif size != n:
                assert first is not None  # set with n
                sizes = "\n".join(
                    f"  {plan.paths[k]}: axis {plan.axes[k]} of shape {tuple(leaves[k].shape)} has size "
                    f"{leaves[k].shape[plan.axes[k]]}"
                    for k in plan.mapped
                )
                raise ValueError(
                    f"pmap: mapped arguments have different sizes along their mapped axes "
                    f"({plan.paths[first]} has {n}, {plan.paths[j]} has {size}):\n{sizes}"
                )
        if self._axis_size is not None:
            if n is not None and n != self._axis_size:
                assert first is not None  # set with n
                raise ValueError(
                    f"pmap: axis_size={self._axis_size} but {plan.paths[first]} has size {n} along its mapped axis"
                )
            n = self._axis_size
        if not n:  # 0 (never None: a plan maps an argument or the pmap has an axis_size)
            assert first is not None  # an axis_size is positive: a mapped argument has size 0
            raise ValueError(f"pmap: the mapped axis of {plan.paths[first]} has size 0; there is nothing to map")
        return n

    def _choose_devices(self, n: int, plan: _InPlan, leaves: list[Any]) -> tuple[torch.device, ...]:
        if self._devices is not None:
            if len(self._devices) != n:
                raise ValueError(
                    f"pmap: the mapped axis has size {n} but devices= lists "
                    f"{len(self._devices)} devices; they must be equal"
                )
            # Checked at the first call, not at decoration: the device list may
            # still change until then (set_cpu_device_count, distributed.initialize).
            local = _devices.local_device_tuple()
            if self._devices_checked_for is not local:
                _devices.check_local(self._devices, "pmap")
                _devices.check_not_repeated_across_processes(self._devices, "pmap")
                self._devices_checked_for = local
            return self._devices
        local = _devices.local_device_tuple()
        if n <= len(local):  # the common case: no message to build
            return local if n == len(local) else local[:n]
        if not plan.mapped:  # axis_size gave n
            return _devices.default_devices(n, "pmap", f"axis_size is {n}")
        j = plan.mapped[0]
        path = plan.paths[j]
        shape = tuple(leaves[j].shape)
        need = f"the mapped axis has size {n} ({path} has shape {shape}, mapped on axis {plan.axes[j]})"
        return _devices.default_devices(n, "pmap", need, batch=path)

    def _donated_leaves(self, plan: _InPlan, nargs: int) -> list[int]:
        if not self._donate:
            return []
        # An entry past this call's positional arguments donates nothing (an optional
        # parameter not passed, say); one past the signature's was refused by pmap().
        donate = {i + nargs if i < 0 else i for i in self._donate}
        if set(self._static_positions(nargs)) & donate:
            raise ValueError("pmap: an argument cannot be both static and donated")
        # Only a ShardedTensor's buffers are ours to release; a plain tensor
        # still belongs to the caller.
        return [j for j, a in enumerate(plan.arg_of_leaf) if a in donate and plan.kinds[j] == _SHARDED]

    def _place(
        self, plan: _InPlan, leaves: list[Any], devices: tuple[torch.device, ...], n: int
    ) -> tuple[_PerLeafValues, list[Placement], list[int], list[_Shared]]:
        """Per input leaf, its n per-replica values (slices and shards made on
        first use) and how they were placed;
        the leaves autograd must see (those that require grad when grad mode
        is on); and the tensors several replicas (or a replica and the caller)
        share, which no replica may write. The values are placed with grad mode on, so the caller's
        autograd takes their gradients back to the leaves: slices stacked,
        broadcast copies summed."""
        grad_on = torch.is_grad_enabled()
        per_leaf = _PerLeafValues(devices, grad_on)
        placements: list[Placement] = []
        grad_leaves: list[int] = []
        shared: list[_Shared] = []
        mapped: list[tuple[int, torch.Tensor, int]] = []  # the plain tensors mapped: (leaf index, tensor, axis)
        for j, (leaf, kind, axis) in enumerate(zip(leaves, plan.kinds, plan.axes)):
            if kind == _NUMPY:
                read_only = isinstance(leaf, np.ndarray) and not leaf.flags.writeable
                leaf = _numpy_as_tensor(leaf, plan.paths[j])
                kind = _TENSOR
                if read_only:  # a copy (torch shares no read-only memory): a write would be lost
                    _watch(shared, j, leaf, _READ_ONLY_ARRAY)
            if kind == _PER_REPLICA:
                if leaf.devices != devices:
                    raise ValueError(
                        f"pmap: {plan.paths[j]} is a PerReplica made for devices "
                        f"{[str(d) for d in leaf.devices]}, but this call runs on "
                        f"{[str(d) for d in devices]}"
                    )
                per_leaf.append(list(leaf.values))
                placements.append(_PLACED_PER_REPLICA)
                continue
            if kind == _SHARDED:
                if axis is not None and leaf.is_mapped_on(axis, devices):
                    if grad_on and leaf.requires_grad:
                        grad_leaves.append(j)
                    if leaf.shards_overlap():  # a write by one replica would change the others' shards
                        for shard in leaf.shards:
                            _watch(shared, j, shard, _OVERLAPPING_SHARDS)
                    per_leaf.append_shards(leaf)  # already in place: no data moves
                    placements.append(_PLACED_SHARDED)
                    continue
                other_axis = axis is not None and tuple(leaf.devices) == devices
                leaf = leaf.unshard()
                kind = _TENSOR
                if other_axis:  # a copy on the call's own devices: a write to it would look like one that lands
                    _watch(shared, j, leaf, _OTHER_AXIS_COPY)
            if kind == _TENSOR:
                if type(leaf) is _TemporaryView:  # replicas (and torch.compile) get a plain tensor
                    leaf = _plain_view(leaf)
                    _watch(shared, j, leaf, _TEMPORARY_COPY)
                if axis is None:
                    values = [leaf] * n if _on_host(leaf, devices) else _transfers.to_every(leaf, devices)
                    if values[0] is leaf and values[-1] is leaf:  # virtual CPU devices: no copy at all
                        _watch(shared, j, leaf, "every replica")
                    elif any(v is leaf for v in values):  # a GPU replica on the tensor's own device
                        _watch(shared, j, leaf, "the replica on its device")
                    if grad_on and leaf.requires_grad:
                        grad_leaves.append(j)
                    placements.append(_PLACED_BROADCAST)
                else:
                    if slices_overlap(leaf, axis):
                        _watch(shared, j, leaf, "overlapping slices")
                    if grad_on and leaf.requires_grad:
                        grad_leaves.append(j)
                    mapped.append((j, leaf, axis))
                    per_leaf.append_slices(leaf, axis)
                    placements.append(_PLACED_MAPPED)
                    continue
            else:
                values = [leaf] * n
                placements.append(_PLACED_BROADCAST)
            per_leaf.append(values)
        if len(mapped) > 1:
            for group in _storages_shared_by_arguments(mapped, n):
                for j, t, _ in group.members:  # (views share a version counter; other aliases need not)
                    _watch(shared, j, t, group)
        return per_leaf, placements, grad_leaves, shared

    # -- outputs -------------------------------------------------------------------------
    def _assemble(
        self, flat: list[FlatOutput], devices: tuple[torch.device, ...], group: ReplicaGroup | None = None
    ) -> PyTree:
        """The replicas' flattened outputs as ShardedTensors (or checked
        replicated values), in the output structure. ``group``: the call's
        replicas, whose axis may span processes."""
        try:
            result, plan, spec = self._assembled_leaves(flat, devices)
        except Exception as e:
            self._tell_other_processes_this_call_failed(group, devices, e)
            raise
        if self._checks_across_processes(group, devices):
            assert group is not None and group.new_backend is not None
            replicated = [(plan.paths[j], v) for j, (v, axis) in enumerate(zip(result, plan.axes)) if axis is None]
            _distributed.check_outputs_across_processes(group.new_backend, replicated)
            for j, (value, axis) in enumerate(zip(result, plan.axes)):
                if axis is None and isinstance(value, torch.Tensor) and value.requires_grad:
                    # Counted once by autograd through the call, as in one process.
                    result[j] = counted_once(value, seeds=group.first_index == 0)
        return tree_unflatten(result, spec)

    def _checks_across_processes(self, group: ReplicaGroup | None, devices: tuple[torch.device, ...]) -> bool:
        """Whether this call ends with the exchange that compares the processes'
        out_axes=None outputs (every process makes it, whatever its outputs)."""
        return (
            self._checks_outputs
            and group is not None
            and group.axis_size > len(devices)
            and group.new_backend is not None
        )

    def _tell_other_processes_this_call_failed(
        self, group: ReplicaGroup | None, devices: tuple[torch.device, ...], error: BaseException
    ) -> None:
        """This process cannot return its replicas' outputs. With an output check the other
        processes wait in it, and learn it there (they raise too, and all stay in step);
        without one they may wait in any of the call's exchanges, and a notice ends the job's
        collectives (``tell_peers_a_run_failed``)."""
        if not self._checks_across_processes(group, devices):
            if group is not None and group.axis_size > len(devices):
                _distributed.tell_peers_a_run_failed(error)
            return
        assert group is not None and group.new_backend is not None
        try:
            _distributed.check_outputs_across_processes(group.new_backend, [], failed_here=True)
        except CollectiveError:
            pass  # the job's collectives ended: this process's own error says more

    def _assembled_leaves(
        self, flat: list[FlatOutput], devices: tuple[torch.device, ...]
    ) -> tuple[list[Any], _OutPlan, TreeSpec]:
        """``_assemble``'s output leaves, their plan and the output structure."""
        spec = flat[0][1]
        for r, (leaves, s) in enumerate(flat):
            if s != spec:
                # Dicts built in different orders are one structure (as in JAX).
                aligned = reorder_leaves(leaves, s, spec)
                if aligned is None:
                    raise ValueError(
                        f"pmap: replicas returned different output structures: replica 0 "
                        f"returned {_structure_text(spec)} but replica {r} returned {_structure_text(s)} (* is a leaf)"
                    )
                flat[r] = (aligned, spec)
        first = flat[0][0]
        # A tensor's plan depends on its rank; anything else's on its type (a
        # None output and a number output need different plans).
        key = (spec, tuple(v.ndim if isinstance(v, torch.Tensor) else type(v) for v in first))
        plan = self._out_plans.get(key)
        if plan is None:
            plan = self._make_out_plan(tree_unflatten(first, spec), first)
            self._out_plans.put(key, plan)
        result: list[Any] = []
        for j, axis in enumerate(plan.axes):
            values = [f[0][j] for f in flat]
            none = values[0] is None
            odd = next((r for r, v in enumerate(values) if (v is None) != none), None)
            if odd is not None:  # None is an empty output (as in JAX): the structures differ
                raise ValueError(
                    f"pmap: replicas returned different output structures: at {plan.paths[j]} replica 0 returned "
                    f"{type(values[0]).__name__} but replica {odd} returned {type(values[odd]).__name__}"
                )
            if axis is None:
                result.append(_check_replicated(values, plan.paths[j]))
            else:
                shards = [
                    v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=d) for v, d in zip(values, devices)
                ]
                try:
                    result.append(ShardedTensor._of_distinct(shards, devices, axis))
                except (ValueError, TypeError) as e:  # e.g. replicas returned different shapes
                    raise type(e)(f"pmap: cannot stack output {plan.paths[j]} of the replicas: {e}") from None
        return result, plan, spec

    def _assemble_stacked(self, out: StackedOutput, devices: tuple[torch.device, ...]) -> PyTree:
        """The stacked executor's output: batched leaves wrapped without a copy,
        out_axes=None ones checked equal across the rows, like ``_assemble``."""
        # The key of _assemble: a row's rank is its buffer's less one.
        kinds = []
        for v, b in zip(out.leaves, out.batched):  # (a loop, not a generator: every call)
            kinds.append(v.ndim - b if isinstance(v, torch.Tensor) else type(v))
        key = (out.spec, tuple(kinds))
        plan = self._out_plans.get(key)
        if plan is None:
            first = [v.select(0, 0) if b else v for v, b in zip(out.leaves, out.batched)]
            plan = self._make_out_plan(_fast_tree.unflatten(first, out.spec), first)
            self._out_plans.put(key, plan)
        result: list[Any] = []
        physical = device_groups(devices)[0][0]
        for j, axis in enumerate(plan.axes):
            value, batched = out.leaves[j], out.batched[j]
            returned = out.inputs_returned.get(j)
            if returned is not None:  # the replicas' own inputs, as _assemble gets them from the threads
                if axis is None:
                    result.append(_check_replicated(returned, plan.paths[j]))
                else:
                    result.append(ShardedTensor._of_distinct(returned, devices, axis))
            elif axis is None:
                if batched:  # (_transfers.slices: not unbind's views where autograd records, which refuse writes)
                    value = _check_replicated(list(_transfers.slices(value, 0, value.shape[0])), plan.paths[j])
                result.append(value)
            elif batched:
                wrapped = ShardedTensor._of_batched(value, devices, axis, physical)
                if wrapped is not None:
                    result.append(wrapped)
                    continue
                try:
                    result.append(ShardedTensor._of_stacked((value,), devices, axis))
                except ValueError:  # rows that overlap in memory (a strided input returned): as _assemble
                    rows = list(_transfers.slices(value, 0, len(devices)))
                    result.append(ShardedTensor._of_distinct(rows, devices, axis))
            else:  # one value for every replica: as _assemble does with n equal values
                shards = [
                    value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device=d) for d in devices
                ]
                result.append(ShardedTensor._of_distinct(shards, devices, axis))
        if type(out.spec) is int and len(result) == 1:  # one output, not in a container (_fast_tree's leaf)
            return result[0]
        return _fast_tree.unflatten(result, out.spec)

    def _make_out_plan(self, out0: PyTree, first_leaves: list[Any]) -> _OutPlan:
        axes = broadcast_prefix(self._out_axes, out0, "out_axes", "out")
        paths = leaf_paths(out0, "out")
        canonical: list[int | None] = []
        for leaf, axis, path in zip(first_leaves, axes, paths):
            if axis is None or leaf is None:  # a None output holds no data: returned as is (as JAX)
                canonical.append(None)
                continue
            if not isinstance(leaf, (torch.Tensor, numbers.Number)):
                raise TypeError(
                    f"pmap: output {path} is a {type(leaf).__name__}; mapped outputs must be "
                    f"tensors or numbers (use out_axes=None for it)"
                )
            ndim = (leaf.ndim if isinstance(leaf, torch.Tensor) else 0) + 1
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"pmap: out_axes={axis} is out of range for output {path}, which gets "
                    f"{ndim} dimension(s) with the mapped axis"
                )
            canonical.append(axis % ndim)
        return _OutPlan(canonical, paths)


class _PerLeafValues(Sequence[Sequence[Any]]):
    """``CallRecord.per_leaf``: per input leaf, its per-replica values. A mapped
    tensor's slices and a ShardedTensor's shards are made on first use (with
    the grad mode of the call, so that autograd records the slicing as it would
    have): the stacked executor reads the leaves whole, and n views per leaf per
    call would cost it time that grows with n."""

    __slots__ = ("_values", "_sources", "_devices", "_grad_on")

    def __init__(self, devices: tuple[torch.device, ...], grad_on: bool) -> None:
        self._values: list[Sequence[Any] | None] = []
        self._sources: dict[int, tuple[torch.Tensor, int | None]] = {}  # leaf -> (tensor, mapped axis or None: shards)
        self._devices, self._grad_on = devices, grad_on

    def append(self, values: Sequence[Any]) -> None:
        self._values.append(values)

    def append_slices(self, leaf: torch.Tensor, axis: int) -> None:
        self._sources[len(self._values)] = (leaf, axis)
        self._values.append(None)

    def append_shards(self, leaf: ShardedTensor) -> None:
        self._sources[len(self._values)] = (leaf, None)
        self._values.append(None)

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, j: int) -> Sequence[Any]: ...
    @overload
    def __getitem__(self, j: slice) -> Sequence[Sequence[Any]]: ...
    def __getitem__(self, j: int | slice) -> Sequence[Any] | Sequence[Sequence[Any]]:
        if isinstance(j, slice):
            return [self[k] for k in range(len(self._values))[j]]
        values = self._values[j]
        if values is None:
            values = self._values[j] = self._make(j % len(self._values))
        return values

    def _make(self, j: int) -> list[Any]:
        leaf, axis = self._sources[j]
        if axis is None:
            assert isinstance(leaf, ShardedTensor)  # append_shards
            return list(leaf.shards)
        with torch.set_grad_enabled(self._grad_on):
            return _transfers.slices_to(leaf, axis, self._devices)


def _on_host(t: torch.Tensor, devices: tuple[torch.device, ...]) -> bool:
    """Whether ``t`` and every device are the host: ``_transfers.to_device`` gives ``t`` itself for all."""
    return t.device.type == "cpu" and _all_host(devices)


@functools.lru_cache(maxsize=64)
def _all_host(devices: tuple[torch.device, ...]) -> bool:
    return all(d.type == "cpu" for d in devices)


def _static_key(value: Any, _inside: tuple[int, ...] = ()) -> Any:
    """A static argument as the plans are keyed by: equal values of other types
    (``1``, ``1.0``, ``True``) or signs (``0.0``, ``-0.0``) compute other things,
    so they must not share a plan (its stacked fast path replays the first)."""
    if isinstance(value, (float, complex)):
        return (type(value), repr(value))  # -0.0 and 0.0 apart, nan equal to nan
    if isinstance(value, (tuple, list, frozenset)):
        return (type(value), tuple(_static_key(v, _inside) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and id(value) not in _inside:
        # A config object: the fields its == compares (a cycle back to it is keyed as itself).
        inside = (*_inside, id(value))
        try:
            key = (
                type(value),
                tuple(_static_key(getattr(value, f.name), inside) for f in dataclasses.fields(value) if f.compare),
            )
            hash(key)
            return key
        except (AttributeError, TypeError):  # a field never set, or one its own hash leaves out
            pass
    return (type(value), value)


def _leaf_kinds(leaves: list[Any]) -> tuple[tuple[type, int | None], ...]:
    """Per leaf its type and rank: the part of a call's plan key that the leaves
    give. Read with subclasses' __torch_function__ off: a ShardedTensor's rank is
    its wrapper's, which its __torch_function__ would answer the same, at ~3 us a
    leaf (a deleted one raises where the call reads its buffers)."""
    kinds = []
    with torch._C.DisableTorchFunctionSubclass():
        for v in leaves:  # (a loop, not a generator: every call keys its plan)
            kinds.append((type(v), getattr(v, "ndim", None)))
    return tuple(kinds)


class _Leaf:
    def __repr__(self) -> str:
        return "*"


def _structure_text(spec: TreeSpec) -> str:
    """A tree structure as Python writes the containers, each leaf a ``*``: ``(*, (*, *))``."""
    try:
        return repr(tree_unflatten([_Leaf()] * spec.num_leaves, spec))
    except Exception:  # a node type whose unflatten needs real leaves
        return str(spec)


def _refuse_unmappable(leaf: torch.Tensor, path: str) -> None:
    """A mapped tensor is split into slices that are views (or rows of one buffer):
    refuse those that have none, before anything fails deep inside the call. (Per
    call: the plan is keyed by type and rank only.)"""
    if leaf.is_nested:
        kind, hint = "a nested tensor", f" (torch.nested.to_padded_tensor({path}, 0) makes one)"
    elif leaf.layout is not torch.strided:
        kind, hint = f"a {str(leaf.layout).removeprefix('torch.')} tensor", f" ({path}.to_dense() makes one)"
    elif leaf.is_meta:
        kind, hint = "a meta tensor", ""
    else:
        return
    raise ValueError(
        f"pmap: cannot map over {path}, {kind}: a mapped argument must be a dense tensor with data, "
        f"which pmap splits along its mapped axis{hint}"
    )


# functorch's current transform level, None outside every torch.func transform.
_functorch_level = torch._C._functorch.maybe_current_level


def _inside_function_transform(fun_name: str) -> RuntimeError:
    # functorch's transform stack is per thread: the replicas' worker threads
    # would run outside the caller's grad/vmap and fail deep inside functorch.
    return RuntimeError(
        f"pmap: {fun_name} was called inside a torch.func transform (torch.func.grad, "
        f"torch.vmap, jacrev, ...), which cannot see into a pmap call. Differentiate "
        f"through a pmap call with torch.autograd (loss.backward(), torch.autograd.grad), "
        f"or apply the torch.func transform inside the pmapped function, where each "
        f"replica runs its own."
    )


def _numpy_as_tensor(a: np.ndarray | np.generic, path: str) -> torch.Tensor:
    try:
        if isinstance(a, np.ndarray):
            if not a.flags.writeable:  # (np.asarray of a ShardedTensor): torch would write into it
                a = a.copy()
            # ascontiguousarray makes a 0-d array 1-d: reshape back.
            return torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape))
        return torch.as_tensor(a)
    except TypeError as e:  # (an object or string array)
        raise TypeError(f"pmap: {path} is a numpy array of dtype {a.dtype}, which torch cannot hold: {e}") from None


# A tensor input no replica may write in place: (leaf index, the tensor, its
# version before the call, why it is shared).
_Shared: TypeAlias = "tuple[int, torch.Tensor, int, str | _SharedStorage]"


def _watch(shared: list[_Shared], j: int, t: torch.Tensor, why: str | _SharedStorage) -> None:
    if not t.is_inference():  # inference tensors have no version counter
        shared.append((j, t, writes_of(t), why))


# Why a view of a temporary copy of a ShardedTensor is watched: a write to it is lost.
_TEMPORARY_COPY = "a temporary copy"
# Why the copy of a read-only numpy array is watched: a write to it is lost.
_READ_ONLY_ARRAY = "a read-only numpy array"
# Why the shards of a ShardedTensor are watched: they share memory.
_OVERLAPPING_SHARDS = "shards that share memory"
# Why a copy of a ShardedTensor mapped along another axis than its own is watched: a write to it is lost.
_OTHER_AXIS_COPY = "a copy along another axis"


@dataclass(frozen=True)
class _SharedStorage:
    """Why mapped tensors are watched when two or more of them (of different
    arguments) are views of one storage (x[:4] and x[1:]): if one was written,
    ``overlap`` tells whether a replica's slice of one shares an element with
    another replica's slice of another (a race), worked out only then."""

    members: tuple[tuple[int, torch.Tensor, int], ...]  # (leaf index, tensor, mapped axis)
    n: int

    def overlap(self) -> tuple[int, int] | None:
        """Two leaf indices whose slices meet across replicas, or None."""
        members, n = self.members, self.n
        for p, (j, a, a_axis) in enumerate(members):
            for k, b, b_axis in members[p + 1 :]:
                if (a.data_ptr(), a.shape, a.stride(), a_axis) == (b.data_ptr(), b.shape, b.stride(), b_axis):
                    continue  # one tensor given twice: each replica gets its own slice twice
                slices = [a.select(a_axis, i) for i in range(n)] + [b.select(b_axis, i) for i in range(n)]
                if any(q >= n and q - n != r for r, q in pairs_sharing_memory(slices) if r < n):
                    return j, k
        return None


def _storages_shared_by_arguments(mapped: list[tuple[int, torch.Tensor, int]], n: int) -> list[_SharedStorage]:
    """The groups of mapped tensors of different arguments that share one storage."""
    by_storage: dict[int, list[tuple[int, torch.Tensor, int]]] = {}
    for j, t, axis in mapped:
        key = _storage_key(t)
        if key is not None and t.numel():
            by_storage.setdefault(key, []).append((j, t, axis))
    return [_SharedStorage(tuple(group), n) for group in by_storage.values() if len(group) > 1]


def _check_not_written(shared: list[_Shared], paths: list[str], leaves: list[Any]) -> None:
    """A replica's in-place write to a shared input raced with the others
    (and changed the caller's tensor), or was lost: a wrong answer, so an error."""
    for j, t, version, why in shared:
        if writes_of(t) == version:
            continue
        path = paths[j]
        if why == _TEMPORARY_COPY:
            raise TypeError(_lost_write_message(f"pmap: a replica wrote in place into {path},"))
        if why == _READ_ONLY_ARRAY:
            raise TypeError(
                f"pmap: a replica wrote in place into {path}, a read-only numpy array (np.asarray of a "
                f"ShardedTensor, say), which the call copies: the write would be lost. Pass a writable "
                f"array (np.array(x)) or a tensor, or clone() it inside the function before writing."
            )
        if why == _OTHER_AXIS_COPY:
            raise TypeError(
                f"pmap: a replica wrote in place into {path}, a ShardedTensor mapped along another axis than "
                f"its own, which the call copies (its shards stay as they were): the write would be lost. "
                f"Map it along its own axis (in_axes), or clone() it inside the function before writing."
            )
        if why == _OVERLAPPING_SHARDS:
            raise RuntimeError(
                f"pmap: a replica wrote {path} in place, but its shards share memory (one tensor given as "
                f"several shards, say): every replica writes the others' data. Give the shards their own "
                f"memory (clone each), or clone() inside the function before writing."
            )
        if isinstance(why, _SharedStorage):
            pair = why.overlap()
            if pair is None:
                continue  # views of one tensor, but each replica's own memory: no race
            first, second = paths[pair[0]], paths[pair[1]]
            written = " or ".join(dict.fromkeys(paths[k] for k, _, _ in why.members))
            raise RuntimeError(
                f"pmap: a replica wrote {written} in place (views of one tensor, which share a version "
                f"counter), and a replica's slice of {first} is the same memory as another replica's slice "
                f"of {second} (overlapping views, x[:n] and x[1:] say): the replicas read and wrote each "
                f"other's data in no set order, so the result is undefined. clone() inside the function "
                f"before writing, or pass tensors that do not overlap."
            )
        if why != "overlapping slices":
            others = _sharing_memory_with(t, j, leaves, paths)
            through = f" (or {others}, which shares its memory)" if others else ""
            raise RuntimeError(
                f"pmap: a replica wrote {path}{through} in place, but {path} is broadcast (in_axes=None) and "
                f"shared by {why} and the caller without a copy: the write changed the caller's "
                f"tensor (and races with the other replicas). clone() it inside the function before "
                f"writing to it, or map it (in_axes) so that each replica gets its own slice."
            )
        raise RuntimeError(
            f"pmap: a replica wrote {path} in place, but its slices along the mapped axis are the "
            f"same memory (strides {t.stride()}, e.g. from expand()): every replica writes the "
            f"others' data. clone() the slice inside the function before writing to it, or pass "
            f"{path}.contiguous()."
        )


def _sharing_memory_with(t: torch.Tensor, j: int, leaves: list[Any], paths: list[str]) -> str:
    """The other arguments whose tensors share ``t``'s storage ("args[0]",
    "args[0] or kwargs['y']"): a write through one of them shows as a write to ``t``."""
    storage = _storage_key(t)
    if storage is None:
        return ""
    others = [
        paths[k]
        for k, leaf in enumerate(leaves)
        if k != j and isinstance(leaf, torch.Tensor) and _storage_key(leaf) == storage
    ]
    return " or ".join(others)


# How often the state a function reaches is checked when nothing about it changed (_watch_reached).
_RECHECK_EVERY = 32

K = TypeVar("K")
V = TypeVar("V")


class _PlanCache(Generic[K, V]):
    """A function's plans by call signature, the ``limit`` most recently used: a
    static argument that changes every call (a step count, a scheduled float)
    makes a new signature each time, and must not grow memory without end
    (``jax.pmap``'s caches are bounded too). Thread-safe without a lock: each
    OrderedDict operation is one step under the GIL, and a key another thread
    evicted meanwhile is only a miss."""

    __slots__ = ("_plans", "_limit")

    def __init__(self, limit: int = 512) -> None:
        self._plans: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, key: K) -> V | None:
        plan = self._plans.get(key)
        if plan is not None:
            try:
                self._plans.move_to_end(key)
            except KeyError:  # evicted by another thread meanwhile
                pass
        return plan

    def put(self, key: K, plan: V) -> None:
        self._plans[key] = plan
        while len(self._plans) > self._limit:
            try:
                self._plans.popitem(last=False)
            except KeyError:  # another thread emptied it meanwhile
                break


def _bad_static_argument(args: tuple[Any, ...], static_pos: tuple[int, ...]) -> ValueError:
    """The error for the first static argument that cannot key the plan cache."""
    bad = next(i for i in static_pos if isinstance(args[i], torch.Tensor) or not _hashable(args[i]))
    what = (
        "is a tensor, which hashes by identity (every new tensor would be captured anew, as JAX refuses arrays there)"
        if isinstance(args[bad], torch.Tensor)
        else f"must be hashable, got {type(args[bad]).__name__}"
    )
    return ValueError(
        f"pmap: static_broadcasted_argnums argument {bad} {what}; pass it as a regular argument with "
        f"in_axes=None instead"
    )


def _hashable(v: Any) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


def _named_grad_tensors(found: list[tuple[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors requiring grad among what the function reaches, each once,
    named by how the function reaches them."""
    named: dict[int, tuple[str, torch.Tensor]] = {}
    for name, obj in found:
        for pair in named_grad_tensors(name, obj):
            named.setdefault(id(pair[1]), pair)
    return list(named.values())


# The ShardedTensors that calls running now were donated (by id), claimed under the lock: a
# second call donated one of them fails, instead of both running on it (another thread's).
_DONATION_LOCK = reinit_after_fork(threading.Lock())
_being_donated: set[int] = set()


@contextlib.contextmanager
def _claimed_for_donation(tensors: list[Any]) -> Iterator[None]:
    if not tensors:
        yield
        return
    ids = {id(t) for t in tensors}  # (one tensor donated twice in a call is that call's own)
    with _DONATION_LOCK:
        if ids & _being_donated:
            raise DeletedShardedTensorError(
                "pmap: a ShardedTensor donated to this call (donate_argnums) is being donated to another "
                "pmap call running now (another thread's), which deletes it; use that call's result"
            )
        _being_donated.update(ids)
    try:
        yield
    finally:
        with _DONATION_LOCK:
            _being_donated.difference_update(ids)


def _identity(fun: Callable[..., Any]) -> str:
    """The function as every process names it (no address): processes compare it with
    each collective, so that calls of different functions never pair."""
    inner = fun.func if isinstance(fun, functools.partial) else fun
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    code = getattr(inner, "__code__", None)
    if isinstance(code, types.CodeType):  # two lambdas: told apart by where they are
        name += f" ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"
    return name


def _check_replicated(values: list[Any], path: str) -> Any:
    first = values[0]
    for r, v in enumerate(values[1:], start=1):
        if isinstance(first, torch.Tensor) and isinstance(v, torch.Tensor):
            same = (
                first.shape == v.shape
                and first.dtype == v.dtype
                and _equal(first.detach(), v.detach().to(first.device))
            )
        else:
            same = type(first) is type(v) and _same_value(first, v)
        if not same:
            raise ValueError(
                f"pmap: out_axes=None for output {path}, but replica {r} returned a different "
                f"value than replica 0; make it equal on every replica (psum/pmean/all_gather) "
                f"or map it (out_axes=0)"
            )
    return first


def _same_value(a: Any, b: Any) -> bool:
    """Two non-tensor outputs of one type equal, NaN in the same places included
    (as for tensors, ``_equal``); numpy arrays compare as arrays."""
    if isinstance(a, np.ndarray):
        nan_is_equal = a.dtype.kind in "fc"  # (array_equal refuses equal_nan for other kinds)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=nan_is_equal))
    if isinstance(a, numbers.Complex) and not isinstance(a, numbers.Real):  # NaN parts compare alike
        return _same_value(a.real, b.real) and _same_value(a.imag, b.imag)
    if isinstance(a, numbers.Real) and a != a:  # NaN: a float, a numpy float
        return bool(b != b)
    return bool(a == b)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():  # NaN in the same places is equal
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return False
