"""Random ops on the stacked executor: every replica draws from its own streams,
the same numbers as on the threads executor, bit for bit.

One batched op cannot draw replica r's numbers from replica r's generator, so
each random call of the captured function becomes one opaque op that, at run
time, calls the function once per replica on that replica's row, routed by that
replica's `_random.ReplicaRandomness` exactly as on a worker thread, and stacks
the results:

1. `route_random_ops` rewrites Dynamo's torch-level graph before it is
   batched: every call the streams mode would route (``_random._kind_of``)
   becomes a call of `draw` with a `_Site` that keeps the call's per-replica
   output shapes and input strides (Dynamo's example values).
2. Under the replica vmap level `draw` applies `_Draw`, an autograd.Function
   whose vmap rule emits the ``torchpmap::replica_draw`` op on the stacked
   tensors (its fake impl gives the shapes); under a ``torch.func.grad`` in the
   function its backward emits ``torchpmap::replica_draw_backward``.
3. At run time the op's kernel loops over the replicas in the call's
   `CallStreams`: one `CallRandomness` (the call seed drawn lazily, on the first
   draw) and one `ReplicaRandomness` per replica, kept for the whole call so a
   replica's second draw continues its stream. A differentiable call keeps each
   replica's autograd graph until the backward op runs on it (the forward's
   dropout mask, as on threads).
4. Autograd through the whole call (``_stacked_autograd``): a backward that
   recomputes the forward runs under `replaying`, streams started again from
   the forward call's seed (the same numbers); one that reads the forward's
   residuals gets the forward's per-replica graphs.

What cannot give the threads' numbers raises `Unsupported`, and the call falls
back: a random op inside a ``torch.func.vmap`` (or another transform than grad)
in the function, an explicit ``torch.Generator``, ``out=``, a second derivative,
an in-place draw into a tensor without the replica dimension (unless a factory
just made it: then later uses read the draw's result, `_fills_fresh`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import Tensor
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten

from . import _axis, _random, _stacked_collectives
from ._call import ReplicaGroup
from ._random import CallRandomness, Interception, ReplicaRandomness


def _unsupported(reason: str) -> Exception:
    """The stacked executor's Unsupported (the fallback's reason); imported
    late, as ``_stacked`` imports this module."""
    from ._stacked import Unsupported

    return Unsupported(reason)


# -- the sites: one per random call of a captured graph ----------------------------------
@dataclass(frozen=True)
class _OutputMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _meta(t: Tensor) -> _OutputMeta:
    return _OutputMeta(tuple(t.shape), t.dtype, t.device)


@dataclass
class _Site:
    """One random call of a captured graph, as a replica would make it."""

    func: Callable[..., Any]  # as the streams mode sees it (a Tensor method unbound)
    in_place: bool  # it writes its first argument and returns it
    arg_strides: dict[int, tuple[int, ...]]  # per positional tensor argument: empty_like's strides in a replica
    out_spec: TreeSpec  # of the per-replica result, its tensors as leaves
    out_leaves: list[Any]  # per leaf: _OutputMeta for a tensor, else the constant
    # Filled when traced (`draw`): the non-tensor leaves of (args, kwargs), None
    # where a tensor goes, and which arguments the autograd graph needs.
    arg_spec: TreeSpec | None = None
    constants: list[Any] = field(default_factory=list)
    tensor_at: list[int] = field(default_factory=list)
    tensor_strides: list[tuple[int, ...] | None] = field(default_factory=list)  # per tensor, as in a replica
    # In place into a tensor just made (torch.empty(...).uniform_()): later uses
    # read the site's result instead, which may vary over the replicas.
    fills_fresh: bool = False
    grad_inputs: tuple[int, ...] = ()  # positions in the tensor list
    grad_input_meta: list[_OutputMeta] = field(default_factory=list)

    @property
    def outputs(self) -> list[_OutputMeta]:
        return [o for o in self.out_leaves if isinstance(o, _OutputMeta)]


_sites: dict[int, _Site] = {}
_keys = itertools.count()


def _site(key: int) -> _Site:
    return _sites[key]


def _function_of(node: torch.fx.Node) -> Callable[..., Any] | None:
    if node.op == "call_function":
        return node.target if callable(node.target) else None
    if node.op == "call_method" and isinstance(node.target, str):
        return getattr(torch.Tensor, node.target, None)
    return None


def _example(value: Any) -> Any:
    return value.meta.get("example_value") if isinstance(value, torch.fx.Node) else value


_RANDOM_KINDS = (_random._PASS_GENERATOR, _random._SWAP)


def route_random_ops(gm: torch.fx.GraphModule) -> list[int]:
    """Turn every call of ``gm`` (Dynamo's per-replica graph) that draws random
    numbers into a call of `draw`, in place; the keys of its sites (`forget`
    them with the batched graph)."""
    keys = []
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        func = _function_of(node)
        if func is None or func is draw:
            continue
        kind, _, _ = _random._kind_of(func)
        if kind not in _RANDOM_KINDS:  # (batch_norm's uncounted writes are the threads' concern)
            continue
        key = next(_keys)
        site = _sites[key] = _new_site(node, func)
        if site.in_place and _fills_fresh(node, order):
            site.fills_fresh = True
            _read_result_after(node, order)
        node.op, node.target = "call_function", draw
        node.args = (key, *node.args)
        keys.append(key)
    if keys:
        gm.recompile()
    return keys


# Functions whose result is a new tensor that aliases nothing.
_FRESH = frozenset(
    getattr(torch, name)
    for name in "empty zeros ones full empty_like zeros_like ones_like full_like empty_strided".split()
)


def _fills_fresh(node: torch.fx.Node, order: dict[torch.fx.Node, int]) -> bool:
    """Whether in-place ``node`` writes a tensor made just for it: a factory's
    result that nothing used before ``node``."""
    target = node.args[0]
    if not isinstance(target, torch.fx.Node) or target.op != "call_function" or target.target not in _FRESH:
        return False
    return all(order[user] >= order[node] for user in target.users)


def _read_result_after(node: torch.fx.Node, order: dict[torch.fx.Node, int]) -> None:
    """Every use of in-place ``node``'s target after it reads ``node`` instead."""
    target = node.args[0]
    assert isinstance(target, torch.fx.Node)
    position = order[node]
    target.replace_all_uses_with(node, delete_user_cb=lambda user: order[user] > position)


def forget(keys: Sequence[int]) -> None:
    for key in keys:
        _sites.pop(key, None)


def _new_site(node: torch.fx.Node, func: Callable[..., Any]) -> _Site:
    name = getattr(func, "__name__", str(func))
    if name.startswith("rrelu_with_noise"):
        raise _unsupported(f"a random op that writes an argument besides its first ({name})")
    out = node.meta.get("example_value")
    if out is None:
        raise _unsupported(f"a random op ({name}) without Dynamo's example value")
    leaves, out_spec = tree_flatten(out)
    out_leaves = [_meta(o) if isinstance(o, Tensor) else o for o in leaves]
    arg_strides = {}
    examples = [_example(a) for a in node.args]
    if any(isinstance(e, Tensor) and torch._C._functorch.is_batchedtensor(e) for e in [*examples, *leaves]):
        # (Dynamo's example values inside a vmap are its batched tensors, which escape their level here.)
        raise _inside_transform(name, "torch.func.vmap")
    for i, example in enumerate(examples):
        if isinstance(example, Tensor):
            # The layout of a tensor the op allocates like this argument (empty_like):
            # the order a draw into it fills memory, and a dense layout to copy into.
            arg_strides[i] = tuple(torch.empty_like(example).stride())
    first = _example(node.args[0]) if node.args else None
    tensors_out = [o for o in leaves if isinstance(o, Tensor)]
    in_place = isinstance(first, Tensor) and bool(tensors_out) and _aliases(tensors_out[0], first)
    return _Site(func, in_place, arg_strides, out_spec, out_leaves)


def _aliases(a: Tensor, b: Tensor) -> bool:
    return bool(torch._C._is_alias_of(a, b))  # type: ignore[attr-defined]  # missing from torch's stubs


# -- at capture: the random call as an opaque op -----------------------------------------
def draw(key: int, *args: Any, **kwargs: Any) -> Any:
    """The random call of site ``key``, traced under the replica vmap level."""
    site = _site(key)
    kind, spec, _ = _random._kind_of(site.func)
    if kind == _random._SWAP and not _random._draws(spec, args, kwargs):
        return site.func(*args, **kwargs)  # dropout in eval mode or with p=0 draws nothing
    flat, arg_spec = tree_flatten((args, kwargs))
    tensor_at = [i for i, a in enumerate(flat) if isinstance(a, Tensor)]
    constants = [None if isinstance(a, Tensor) else a for a in flat]
    name = getattr(site.func, "__name__", str(site.func))
    if any(isinstance(c, torch.Generator) for c in constants):
        raise _unsupported(f"a random op given an explicit torch.Generator ({name})")
    if "out" in kwargs:
        raise _unsupported(f"a random op with out= ({name})")
    _check_transforms(name)
    tensors = [flat[i] for i in tensor_at]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if site.in_place and grad:
        raise _unsupported(f"an in-place random op on a tensor that requires grad ({name})")
    site.arg_spec, site.constants, site.tensor_at = arg_spec, constants, tensor_at
    site.tensor_strides = _tensor_strides(site, len(args))
    site.grad_inputs = tuple(k for k, t in enumerate(tensors) if t.requires_grad) if grad else ()
    site.grad_input_meta = [_meta(tensors[k]) for k in site.grad_inputs]
    # A batched anchor: the op meets the replica level's vmap rule even when no
    # argument varies over the replicas (torch.rand(shape)).
    anchor = _stacked_collectives.axis_index_batched(_replica_level_of_trace(name))
    results = iter(_Draw.apply(key, anchor, *tensors))
    out = tree_unflatten([next(results) if isinstance(o, _OutputMeta) else o for o in site.out_leaves], site.out_spec)
    if site.in_place and not site.fills_fresh:
        return args[0].copy_(out if isinstance(out, Tensor) else tree_leaves(out)[0])
    return out


def _replica_level_of_trace(name: str) -> _axis.ReplicaLevel:
    levels = _axis._levels()
    if not levels:
        raise _unsupported(f"a random op ({name}) traced outside the replica vmap level")
    return levels[-1]


def _check_transforms(name: str) -> None:
    """Only grad transforms may lie between the replica level and the op: a
    user's vmap would need one draw per replica and vmapped row."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    replica = max(r.level for r in _axis._levels())
    for interpreter in retrieve_all_functorch_interpreters():
        if interpreter.level() <= replica:
            continue
        if interpreter.key() != TransformType.Grad:
            kind = "torch.func.vmap" if interpreter.key() == TransformType.Vmap else "a forward-mode transform"
            raise _inside_transform(name, kind)


def _inside_transform(name: str, kind: str) -> Exception:
    return _unsupported(
        f"a random op ({name}) inside {kind} in the function: per-replica streams are not stacked there"
    )


class _Draw(torch.autograd.Function):
    """A site's random call over the replicas; only its vmap rule runs (the
    replica level is always below it)."""

    @staticmethod
    def forward(key: int, anchor: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        raise _unsupported("a random op ran outside the replica vmap level")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.key = inputs[0]
        ctx.inputs = len(inputs) - 2

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        site = _site(ctx.key)
        anchor = _stacked_collectives.axis_index_batched(_replica_level_of_trace("a random op's backward"))
        computed = iter(_DrawBackward.apply(ctx.key, anchor, *grads))
        per_input = [next(computed) if k in site.grad_inputs else None for k in range(ctx.inputs)]
        return (None, None, *per_input)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], key: int, anchor: Tensor, *tensors: Tensor) -> tuple[Any, Any]:
        site = _site(key)
        _replica_level(info, site)
        dims = in_dims[2:]
        if site.in_place and not site.fills_fresh and dims[0] is None:
            raise _unsupported(
                f"an in-place random op ({getattr(site.func, '__name__', site.func)}) on a tensor without the "
                "replica dimension (a broadcast argument, a closed-over tensor, or one made in the function and "
                "read before the draw): each replica would need its own values in one shared tensor"
            )
        stacked = [t if d is None else t.movedim(d, 0) for t, d in zip(tensors, dims)]
        outs = torch.ops.torchpmap.replica_draw(key, stacked, [d is not None for d in dims], info.batch_size)
        return tuple(outs), (0,) * len(outs)


class _DrawBackward(torch.autograd.Function):
    """The backward of a `_Draw` under torch.func.grad: each replica's own
    autograd graph of the forward, at run time."""

    @staticmethod
    def forward(key: int, anchor: Tensor, *grads: Tensor) -> tuple[Tensor, ...]:
        raise _unsupported("a random op's backward ran outside the replica vmap level")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        raise _unsupported("a second derivative through a random op")

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], key: int, anchor: Tensor, *grads: Tensor) -> tuple[Any, Any]:
        site = _site(key)
        _replica_level(info, site)
        n = info.batch_size
        stacked = [g.expand(n, *g.shape) if d is None else g.movedim(d, 0) for g, d in zip(grads, in_dims[2:])]
        outs = torch.ops.torchpmap.replica_draw_backward(key, stacked, n)
        return tuple(outs), (0,) * len(outs)


def _replica_level(info: Any, site: _Site) -> _axis.ReplicaLevel:
    # An autograd.Function's vmap rule runs with its level popped.
    level = _axis.replica_level_below(torch._C._functorch.maybe_current_level())
    if level is None:
        name = getattr(site.func, "__name__", site.func)
        raise _unsupported(f"a random op ({name}) inside torch.func.vmap in the function")
    if info.batch_size != level.size:
        raise _unsupported("a random op batched over something else than the replicas")
    return level


# -- at run time: the call's streams ------------------------------------------------------
# Per differentiable site: per replica, (inputs, outputs) of its autograd graph.
Graphs: TypeAlias = "dict[int, list[tuple[list[Tensor], list[Tensor]]]]"


@dataclass(frozen=True)
class Replay:
    """What a backward needs to draw a stacked forward's numbers again: the
    call's replicas and its seed (None: the forward drew nothing)."""

    group: ReplicaGroup
    seed: int | None


class CallStreams:
    """One stacked call's random streams: created on its first draw, so a call
    that draws nothing leaves the caller's generator alone. With ``replay``,
    the streams of an earlier call, from their start."""

    def __init__(self, group: ReplicaGroup, replay: Replay | None = None) -> None:
        self._group = group
        self._replay = replay
        self._call: CallRandomness | None = None
        self._modes: list[ReplicaRandomness] = []
        self.graphs: Graphs = {}

    def mode(self, rank: int) -> ReplicaRandomness:
        if self._call is None:
            if self._replay is None:
                self._call = CallRandomness(self._group.devices, None)
            elif self._replay.seed is None:
                raise RuntimeError("torchpmap: a stacked backward drew random numbers its forward did not draw")
            else:
                self._call = CallRandomness.replaying(self._group.devices, self._replay.seed)
            first = self._group.first_index
            self._modes = [ReplicaRandomness(self._call, first + r) for r in range(len(self._group.devices))]
        return self._modes[rank]

    def rewind(self) -> None:
        """Undo the call's seed draw (``CallRandomness.rewind``): it falls back to the threads."""
        if self._call is not None:
            self._call.rewind()

    def replay(self) -> Replay:
        """What a backward needs to draw this call's numbers again."""
        return Replay(self._group, None if self._call is None else self._call.drawn_seed)

    def take_graphs(self) -> Graphs:
        """The per-replica graphs whose backward has not run yet (a differentiable
        call's forward hands them to its backward)."""
        graphs, self.graphs = self.graphs, {}
        return graphs

    def finish(self, *, failed: bool) -> None:
        """As the threads executor's `CallRandomness.finish`: the function's
        `Interception` learns whether it draws (a stacked draw never needs the
        thread-order warning), and a draw behind the streams' back warns."""
        interception: Interception = self._group.interception
        self.graphs.clear()
        drew = self._call is not None and self._call._drew
        if not failed and (interception.needed is None or drew):
            interception.needed = drew or bool(interception.needed)
        if self._call is not None:
            self._call.finish(self._group.label, failed=failed)


_tls = threading.local()


class call_streams:
    """The streams of the stacked call running on this thread. The caller
    finishes them once the call succeeded (`CallStreams.finish`, which may
    warn); a call that raises finishes them here, as failed. A class, not a
    generator: it is entered on every call (~1.5 us less)."""

    __slots__ = ("streams", "previous")

    def __init__(self, group: ReplicaGroup) -> None:
        self.streams = CallStreams(group)

    def __enter__(self) -> CallStreams:
        self.previous = getattr(_tls, "streams", None)
        _tls.streams = self.streams
        return self.streams

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: Any) -> None:
        try:
            if kind is not None:
                self.streams.finish(failed=True)
        finally:
            _tls.streams = self.previous


@contextmanager
def replaying(replay: Replay, graphs: Graphs) -> Iterator[None]:
    """Stacked random ops run in here (a backward) draw again what the forward
    whose ``replay`` this is drew, from the start of its streams; their backward
    ops read ``graphs``, the forward's per-replica graphs (a copy: a retained
    graph's backward may run again)."""
    streams = CallStreams(replay.group, replay)
    streams.graphs.update(graphs)
    previous = getattr(_tls, "streams", None)
    _tls.streams = streams
    try:
        yield
    finally:
        _tls.streams = previous


def current() -> CallStreams:
    """The streams of the stacked call (or backward) running on this thread."""
    streams: CallStreams | None = getattr(_tls, "streams", None)
    if streams is None:
        raise RuntimeError("torchpmap: a stacked random op ran outside a stacked call")
    return streams


def _tensor_strides(site: _Site, positional: int) -> list[tuple[int, ...] | None]:
    """Per tensor leaf of (args, kwargs): the strides its positional argument
    had in the replica, when the leaf is a whole positional argument."""
    assert site.arg_spec is not None
    args_spec = site.arg_spec.child(0)
    owner: list[int | None] = []
    for i, child in enumerate(args_spec.children()[:positional]):
        owner.extend([i] if child.is_leaf() else [None] * child.num_leaves)
    owner.extend([None] * (site.arg_spec.num_leaves - len(owner)))
    positions = [owner[i] for i in site.tensor_at]
    return [None if p is None else site.arg_strides.get(p) for p in positions]


def _replica_args(
    site: _Site, tensors: Sequence[Tensor], batched: Sequence[bool], r: int
) -> tuple[tuple[Any, Any], list[Tensor]]:
    """Replica r's (args, kwargs) of the site's call, and the leaves its
    autograd graph starts from (its differentiable inputs)."""
    flat = list(site.constants)
    leaves = []
    for k, (i, t, b) in enumerate(zip(site.tensor_at, tensors, batched)):
        row = t.select(0, r) if b else t
        strides = site.tensor_strides[k]
        if site.in_place and k == 0:
            row = _with_strides(row, strides, copy=True)
        elif strides is not None and row.stride() != strides:
            row = _with_strides(row, strides, copy=False)
        if k in site.grad_inputs:
            row = row.detach().requires_grad_()
            leaves.append(row)
        flat[i] = row
    assert site.arg_spec is not None
    return tree_unflatten(flat, site.arg_spec), leaves


def _with_strides(row: Tensor, strides: tuple[int, ...] | None, *, copy: bool) -> Tensor:
    """``row`` laid out as a tensor allocated like the replica's own was (a
    draw into ``empty_like`` of it fills memory in that order)."""
    if strides is None or len(strides) != row.ndim:
        return row.clone() if copy else row
    return torch.empty_strided(row.shape, strides, dtype=row.dtype, device=row.device).copy_(row)


def _draw_rows(key: int, tensors: list[Tensor], batched: list[bool], n: int) -> list[Tensor]:
    site = _site(key)
    streams = current()
    per_replica: list[list[Tensor]] = []
    graphs = []
    with _autograd_inside_kernel() if site.grad_inputs else nullcontext():
        for r in range(n):
            (args, kwargs), leaves = _replica_args(site, tensors, batched, r)
            out = streams.mode(r).__torch_function__(site.func, (), args, kwargs)
            outs = [out] if isinstance(out, Tensor) else [o for o in tree_leaves(out) if isinstance(o, Tensor)]
            _check_outputs(site, outs)
            per_replica.append(outs)
            graphs.append((leaves, outs))
    if site.grad_inputs:
        streams.graphs[key] = graphs
    return [torch.stack([outs[j].detach() for outs in per_replica]) for j in range(len(site.outputs))]


_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality,
    torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.AutogradNestedTensor,
)


@contextmanager
def _autograd_inside_kernel() -> Iterator[None]:
    """Autograd on inside an op's kernel (which runs below the autograd keys),
    to record a replica's graph for the op's backward."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _check_outputs(site: _Site, outs: list[Tensor]) -> None:
    want = site.outputs
    if len(outs) != len(want) or any(tuple(o.shape) != w.shape or o.dtype != w.dtype for o, w in zip(outs, want)):
        raise RuntimeError(
            f"torchpmap: a replica's {getattr(site.func, '__name__', site.func)} returned "
            f"{[(tuple(o.shape), o.dtype) for o in outs]}, not the captured {[(w.shape, w.dtype) for w in want]}"
        )


def _draw_rows_backward(key: int, grads: list[Tensor], n: int) -> list[Tensor]:
    graphs = current().graphs.pop(key, None)
    if graphs is None:
        raise RuntimeError("torchpmap: a stacked random op's backward ran without its forward")
    # One engine run over every replica's graph: they share nothing, so each
    # input's gradient is what its replica's own backward gives.
    outputs, inputs, grad_outputs = [], [], []
    for r, (leaves, outs) in enumerate(graphs):
        for o, g in zip(outs, grads):
            if o.requires_grad:
                outputs.append(o)
                grad_outputs.append(g.select(0, r))
        inputs.extend(leaves)
    # Retained: a stacked call's backward with retain_graph=True may run it again.
    with _autograd_inside_kernel():
        got = torch.autograd.grad(
            outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True, materialize_grads=True
        )
    per_replica = len(graphs[0][0])
    return [torch.stack(got[k::per_replica]) for k in range(per_replica)]


# -- the ops -------------------------------------------------------------------------------
# Random (a compiler must neither drop nor reorder them: each replica's stream
# advances in program order) and host-driven (a CUDA graph would replay one draw).
_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.cudagraph_unsafe)


def is_replica_draw(target: Any) -> bool:
    """Whether a batched graph's node target is one of these ops (which draw
    from each replica's stream)."""
    return target in (torch.ops.torchpmap.replica_draw.default, torch.ops.torchpmap.replica_draw_backward.default)


@torch.library.custom_op("torchpmap::replica_draw", mutates_args=(), tags=_TAGS)
def replica_draw(key: int, tensors: list[Tensor], batched: list[bool], n: int) -> list[Tensor]:
    """Site ``key``'s random call once per replica on its rows, stacked."""
    return _draw_rows(key, tensors, batched, n)


@replica_draw.register_fake
def _(key: int, tensors: list[Tensor], batched: list[bool], n: int) -> list[Tensor]:
    return [torch.empty((n, *o.shape), dtype=o.dtype, device=o.device) for o in _site(key).outputs]


@torch.library.custom_op("torchpmap::replica_draw_backward", mutates_args=(), tags=_TAGS)
def replica_draw_backward(key: int, grads: list[Tensor], n: int) -> list[Tensor]:
    """Per replica, the gradients of site ``key``'s differentiable inputs."""
    return _draw_rows_backward(key, grads, n)


@replica_draw_backward.register_fake
def _(key: int, grads: list[Tensor], n: int) -> list[Tensor]:
    site = _site(key)
    return [torch.empty((n, *s.shape), dtype=s.dtype, device=s.device) for s in site.grad_input_meta]
