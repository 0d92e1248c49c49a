"""The collective primitives as torch.library custom ops.

Each op has a fake (meta) implementation so torch.compile traces through it
with no graph break, an autograd rule (JAX's transposes), and a kernel that
finds the running replica's communicator at run time. Axis names are strings;
``groups`` is axis_index_groups flattened (empty: one group of everybody) with
``group_size`` members each, or, with ``group_size`` 0 (groups of unequal sizes,
reductions only), separated by -1.

A collective over a pytree runs one op per leaf (or per bucket of leaves), each
tagged with ``tree`` (a description of the whole tree, "" for a bare tensor),
``leaf`` (the exchange's place in the tree) and ``dims`` (every leaf's shape, on
the tree's first exchange): the communicator compares them across replicas, so
replicas holding different trees fail instead of pairing leaves wrongly.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch import Tensor

from . import _axis, _forward_ad
from . import _stacked_collectives as _stacked
from ._communicator import Collective
from ._random import replica_modes_only

if TYPE_CHECKING:
    from ._communicator import Groups, TreePlace

# The non-tensor arguments of the ops: op names, encoded axes, flattened groups or pairs,
# group sizes, and the tree tags (description, leaf, dims).
OpArg: TypeAlias = "str | int | list[int] | None"
# An autograd context (torch's FunctionCtx, or the one torch.library passes): the
# rules below keep their saved values on it as attributes.
Ctx: TypeAlias = Any


# Between the groups of unequal sizes in a flattened ``groups`` (group_size 0).
GROUP_SEP = -1


def encode_groups(groups: list[list[int]]) -> tuple[list[int], int]:
    """axis_index_groups as the ops take them: (flattened, group_size)."""
    sizes = {len(g) for g in groups}
    if len(sizes) == 1:
        return [i for g in groups for i in g], len(groups[0])
    return [i for g in groups for i in (*g, GROUP_SEP)][:-1], 0


def decode_groups(groups: Sequence[int], group_size: int) -> Groups:
    """The inverse of encode_groups."""
    if not groups:
        return None
    if group_size == 0:
        out: list[tuple[int, ...]] = []
        start = 0
        for end in [*(i for i, m in enumerate(groups) if m == GROUP_SEP), len(groups)]:
            out.append(tuple(groups[start:end]))
            start = end + 1
        return tuple(out)
    return tuple(tuple(groups[i : i + group_size]) for i in range(0, len(groups), group_size))


def _tree_place(tree: str, leaf: int, dims: Sequence[int] | None) -> TreePlace:
    """The tree tags of an op as the communicator compares them; None for a bare tensor."""
    if not tree:
        return None
    return tree, leaf, tuple(dims) if dims else ()


# Every op waits for other replicas (or reads the running replica's index) on the
# host: a CUDA graph would record one exchange and replay it without communicating.
# Inductor's cudagraph trees (compile mode="reduce-overhead") keep such ops out. And
# no trace may run one on constants to fold its result (fake tensors' and make_fx's
# constant propagation, Inductor's constant folding skip ops tagged as random):
# ``psum(torch.tensor(1.0))`` traced on one replica's thread exchanged for real there,
# while the others waited to enter Dynamo (a hang), and would bake its result in.
_TAGS = (torch.Tag.cudagraph_unsafe, torch.Tag.nondeterministic_seeded)

OPS = torch.ops.torchpmap


def _eager_ok(x: Tensor) -> bool:
    """True when a plain call of the kernel is indistinguishable from the op:
    no autograd to record, no compiler, functorch transform or mode to see it.
    The dispatcher costs ~10 us a call, and replicas pay it under one GIL."""
    return (
        type(x) is Tensor
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and (not torch._C._is_torch_function_mode_enabled() or replica_modes_only())
        and torch._C._len_torch_dispatch_stack() == 0
    )


def call(name: str, x: Tensor, *args: OpArg) -> Tensor:
    """Run collective ``name`` on x: the kernel directly when that is safe,
    else the registered op inside an autograd.Function (autograd,
    torch.compile and functorch transforms such as torch.func.grad)."""
    if torch.compiler.is_compiling():
        if _capturing_for_stacking() or _inside_functorch_transform():
            return _opaque_call(name, x, *args)
        # Dynamo traces the op and its registered autograd rule directly.
        return getattr(OPS, name).default(x, *args)
    by_id = getattr(stand_ins, "by_id", None)
    if by_id is not None:  # an autograd.Function: the stand-in mode (_autodiff) does not see it
        x = by_id.get(id(x), x)
    if _eager_ok(x):
        return _KERNELS[name](x, *args)
    return _Collective.apply(name, x, *args)


_stacking = threading.local()
# While a replica runs with stand-ins for closed-over computed tensors (``_autodiff``):
# ``by_id``, their stand-in leaves by the id of the tensor they stand for.
stand_ins = threading.local()


@torch._dynamo.assume_constant_result
def _capturing_for_stacking() -> bool:
    """Whether Dynamo traces for the stacked executor (``_stacked``), which runs
    the graph under torch.func.vmap, or for the lockstep one: constant for a trace."""
    return getattr(_stacking, "on", False)


@torch._dynamo.assume_constant_result
def _capturing_for_lockstep() -> bool:
    """Whether that trace is the lockstep executor's, whose replicas run its pieces on
    their own values (an integer ``.item()`` is each one's own)."""
    return getattr(_stacking, "on", False) and getattr(_stacking, "executor", None) == LOCKSTEP_SCOPE


# What the lockstep executor's captures call their scope (``_stacked.capture_scope``; in messages).
LOCKSTEP_SCOPE = "in lockstep"


@torch._dynamo.assume_constant_result
def _inside_functorch_transform() -> bool:
    """Whether Dynamo traces inside a torch.func transform of the function
    (grad, vjp, jacrev: Dynamo enters their levels while it traces), where the
    op's registered autograd rule is not functorch-ready but _Collective is."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@torch._dynamo.allow_in_graph
def _opaque_call(name: str, x: Tensor, *args: OpArg) -> Tensor:
    """A collective as one node of a Dynamo graph that stays a Python call: run
    later under the replica vmap level, it meets the batching rules, also inside
    a torch.func transform of the function (which Dynamo inlines, and where the
    op itself has no functorch-ready autograd)."""
    if _eager_ok(x):
        return _KERNELS[name](x, *args)
    return _Collective.apply(name, x, *args)


@torch._dynamo.allow_in_graph
def opaque_axis_index(axes: str, device: torch.device) -> Tensor:
    """axis_index as one node of a Dynamo graph for the stacked executor: under
    the replica vmap level, every replica's own index."""
    level = _axis.bound_level(tuple(axes.split(AXIS_SEP)))
    if level is not None:
        return _stacked.axis_index_batched(level)
    return OPS.axis_index.default(axes, device)


class _Collective(torch.autograd.Function):
    """The op with its JAX transpose rule, in the form functorch accepts.

    torch.library's own autograd registration builds an old-style Function
    that torch.func.grad rejects; this one reuses the same rules (below) with
    a separate setup_context, so grad_and_value over a psum works."""

    @staticmethod
    def forward(name: str, x: Tensor, *args: OpArg) -> Tensor:
        return getattr(OPS, name).default(x, *args)

    @staticmethod
    def setup_context(ctx: Ctx, inputs: tuple[Any, ...], output: Tensor) -> None:
        name, x, *args = inputs
        ctx.name = name
        _RULES[name][0](ctx, (x, *args), output)

    @staticmethod
    def backward(ctx: Ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *_RULES[ctx.name][1](ctx, grad))

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], name: str, x: Tensor, *args: OpArg
    ) -> tuple[Tensor, int | None]:
        return _function_vmap_rule(info, in_dims, name, x, *args)


# Axis names travel as one string (the schema has no str[]), joined by a
# control character that no sensible axis name contains.
AXIS_SEP = "\x1f"


def encode_axes(names: Iterable[str]) -> str:
    return AXIS_SEP.join(names)


def _frame(axes: str) -> _axis.ReplicaFrame:
    return _axis.resolve(tuple(axes.split(AXIS_SEP)))


@functools.lru_cache(maxsize=4096)
def _interned(
    kind: str,
    op: str | None,
    groups: tuple[int, ...],
    group_size: int,
    pairs: tuple[int, ...] | None,
    tree: str,
    leaf: int,
    dims: tuple[int, ...] | None,
) -> Collective:
    """The Collective of an op's arguments (lists made tuples), made once: the
    replicas then bring the same object, which compares at once, and a repeated
    collective costs a cache hit instead of a dataclass construction."""
    return Collective(
        kind,
        op,
        decode_groups(groups, group_size),
        None if pairs is None else tuple(zip(pairs[0::2], pairs[1::2])),
        _tree_place(tree, leaf, dims),
    )


def _exchange(axes: str, x: Tensor, collective: Collective) -> Tensor:
    """The kernels' common end: the running replica's communicator does the exchange."""
    f = _frame(axes)
    if f.capturing or _axis.bound_level(axes.split(AXIS_SEP)) is not None:
        raise _no_captured_form(collective.kind)
    _forward_ad.check_no_collective(collective.kind)
    _forward_ad.check_not_dual(collective, x)
    return as_kernel_result(f.comm.exchange(f.index, collective, x))


def as_kernel_result(out: Tensor) -> Tensor:
    """A collective's result as its fake kernel describes it: a tensor of its own,
    contiguous, at offset 0. An exchange may give a block of a larger result (a
    scatter's chunk, a tiled gather's strided block) or a reduction with its
    input's strides; compiled code asserts the strides and the 16-byte alignment,
    and a traced graph turns a reshape of it into a view."""
    if out.storage_offset() or not out.is_contiguous():
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def _refuse_unbatched(axes: str, kind: str) -> None:
    """In a fake kernel: under the replica level of a stacked trace, a batched
    operand meets the batching rule, so one reaching the fake kernel is the
    same in every replica, which the batched graph does not lift to a batch.
    Refused while tracing: at run time the graph may have written its inputs."""
    if _axis.bound_level(axes.split(AXIS_SEP)) is not None:
        raise _no_captured_form(kind)


def _no_captured_form(kind: str) -> RuntimeError:
    return RuntimeError(
        f"a collective ({kind}) of a value that is the same in every replica (computed from no mapped "
        "argument, e.g. from a broadcast one) has no captured form"
    )


def _check_backward_in_replica(axes: str, grad: Tensor) -> None:
    """The backward rules communicate, so they must run in the replicas' own
    backward pass (pmap arranges that for its arguments, see _autodiff.py). A
    tensor that needs a gradient but reached a replica through a closure instead
    of an argument leaves the rule to the caller's backward, where no axis is
    bound: say how to fix that rather than just 'unbound axis name'."""
    if _axis.bound_level(axes.split(AXIS_SEP)) is not None:
        return  # stacked replicas: the batching rule exchanges along the replica level
    try:
        _frame(axes)
    except NameError as e:
        raise NameError(
            f"{e} This is the backward pass of a collective running outside its pmap: "
            f"a tensor that requires grad was probably captured by the pmapped function "
            f"instead of passed to it; pass it as an argument (in_axes=None to broadcast it)."
        ) from None


# Every op ends with the tree tags (tree, leaf, dims); the backward rules pass the
# forward's tree and leaf on (the forward already compared every leaf's dims).
def _saved_tags(ctx: Ctx, tags: list[Any]) -> None:
    # (A call may leave them out, as the tree reduction's exchange of the tracked mask does.)
    tree, leaf = (tags[0], tags[1]) if tags else ("", -1)
    ctx.tags = (tree, leaf, None)


# -- all_reduce ---------------------------------------------------------------
def _all_reduce_kernel(
    x: Tensor,
    op: str,
    axes: str,
    groups: list[int],
    group_size: int,
    tree: str = "",
    leaf: int = -1,
    dims: list[int] | None = None,
) -> Tensor:
    return _exchange(axes, x, _all_reduce_collective(op, groups, group_size, tree, leaf, dims))


def _all_reduce_collective(
    op: str, groups: list[int], group_size: int, tree: str = "", leaf: int = -1, dims: list[int] | None = None
) -> Collective:
    return _interned("all_reduce", op, tuple(groups), group_size, None, tree, leaf, tuple(dims) if dims else None)


all_reduce = torch.library.custom_op("torchpmap::all_reduce", _all_reduce_kernel, mutates_args=(), tags=_TAGS)


@all_reduce.register_fake
def _(
    x: Tensor,
    op: str,
    axes: str,
    groups: list[int],
    group_size: int,
    tree: str = "",
    leaf: int = -1,
    dims: list[int] | None = None,
) -> Tensor:
    _refuse_unbatched(axes, "all_reduce")
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # as _exchange returns it


def _all_reduce_setup(ctx: Ctx, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, ctx.op, ctx.axes, ctx.groups, ctx.group_size, *tags = inputs
    _saved_tags(ctx, tags)


def _all_reduce_backward(ctx: Ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    if ctx.op != "sum":
        raise RuntimeError(
            f"p{ctx.op} is not differentiable (as in JAX); use psum/pmean, or "
            f"wrap the value in .detach() if no gradient should flow through it"
        )
    _check_backward_in_replica(ctx.axes, grad)
    # JAX's pmap rule: the transpose of psum is psum (see README, 'Gradients
    # through collectives').
    dx = call("all_reduce", grad, "sum", ctx.axes, ctx.groups, ctx.group_size, *ctx.tags)
    return dx, None, None, None, None, None, None, None


all_reduce.register_autograd(_all_reduce_backward, setup_context=_all_reduce_setup)


# -- all_gather: (…) -> (g, …) ------------------------------------------------
def _all_gather_kernel(
    x: Tensor,
    axes: str,
    groups: list[int],
    group_size: int,
    tree: str = "",
    leaf: int = -1,
    dims: list[int] | None = None,
) -> Tensor:
    return _exchange(axes, x, _all_gather_collective(groups, group_size, tree, leaf, dims))


def _all_gather_collective(
    groups: list[int], group_size: int, tree: str = "", leaf: int = -1, dims: list[int] | None = None
) -> Collective:
    return _interned("all_gather", None, tuple(groups), group_size, None, tree, leaf, tuple(dims) if dims else None)


all_gather = torch.library.custom_op("torchpmap::all_gather", _all_gather_kernel, mutates_args=(), tags=_TAGS)


@all_gather.register_fake
def _(
    x: Tensor,
    axes: str,
    groups: list[int],
    group_size: int,
    tree: str = "",
    leaf: int = -1,
    dims: list[int] | None = None,
) -> Tensor:
    _refuse_unbatched(axes, "all_gather")
    return x.new_empty((group_size, *x.shape))


def _gather_scatter_setup(ctx: Ctx, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, ctx.axes, ctx.groups, ctx.group_size, *tags = inputs
    _saved_tags(ctx, tags)


def _all_gather_backward(ctx: Ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    _check_backward_in_replica(ctx.axes, grad)
    dx = call("reduce_scatter", grad, "sum", ctx.axes, ctx.groups, ctx.group_size, *ctx.tags)
    return dx, None, None, None, None, None, None


all_gather.register_autograd(_all_gather_backward, setup_context=_gather_scatter_setup)


# -- reduce_scatter: (g, …) -> (…) ------------------------------------------------
def _reduce_scatter_kernel(
    x: Tensor,
    op: str,
    axes: str,
    groups: list[int],
    group_size: int,
    tree: str = "",
    leaf: int = -1,
    dims: list[int] | None = None,
) -> Tensor:
    return _exchange(axes, x, _reduce_scatter_collective(op, groups, group_size, tree, leaf, dims))


def _reduce_scatter_collective(
    op: str, groups: list[int], group_size: int, tree: str = "", leaf: int = -1, dims: list[int] | None = None
) -> Collective:
    return _interned("reduce_scatter", op, tuple(groups), group_size, None, tree, leaf, tuple(dims) if dims else None)


reduce_scatter = torch.library.custom_op(
    "torchpmap::reduce_scatter", _reduce_scatter_kernel, mutates_args=(), tags=_TAGS
)


@reduce_scatter.register_fake
def _(
    x: Tensor,
    op: str,
    axes: str,
    groups: list[int],
    group_size: int,
    tree: str = "",
    leaf: int = -1,
    dims: list[int] | None = None,
) -> Tensor:
    _refuse_unbatched(axes, "reduce_scatter")
    return x.new_empty(x.shape[1:])


def _reduce_scatter_setup(ctx: Ctx, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, _, ctx.axes, ctx.groups, ctx.group_size, *tags = inputs
    _saved_tags(ctx, tags)


def _reduce_scatter_backward(ctx: Ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    _check_backward_in_replica(ctx.axes, grad)
    dx = call("all_gather", grad, ctx.axes, ctx.groups, ctx.group_size, *ctx.tags)
    return dx, None, None, None, None, None, None, None


reduce_scatter.register_autograd(_reduce_scatter_backward, setup_context=_reduce_scatter_setup)


# -- all_to_all: (g, …) -> (g, …), out[j] = member j's x[k] ----------------------
def _all_to_all_kernel(
    x: Tensor,
    axes: str,
    groups: list[int],
    group_size: int,
    tree: str = "",
    leaf: int = -1,
    dims: list[int] | None = None,
) -> Tensor:
    return _exchange(axes, x, _all_to_all_collective(groups, group_size, tree, leaf, dims))


def _all_to_all_collective(
    groups: list[int], group_size: int, tree: str = "", leaf: int = -1, dims: list[int] | None = None
) -> Collective:
    return _interned("all_to_all", None, tuple(groups), group_size, None, tree, leaf, tuple(dims) if dims else None)


all_to_all = torch.library.custom_op("torchpmap::all_to_all", _all_to_all_kernel, mutates_args=(), tags=_TAGS)


@all_to_all.register_fake
def _(
    x: Tensor,
    axes: str,
    groups: list[int],
    group_size: int,
    tree: str = "",
    leaf: int = -1,
    dims: list[int] | None = None,
) -> Tensor:
    _refuse_unbatched(axes, "all_to_all")
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # the kernel stacks what it receives


def _all_to_all_backward(ctx: Ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    _check_backward_in_replica(ctx.axes, grad)
    # out_k[j] = x_j[k], so the transpose is the same exchange.
    dx = call("all_to_all", grad, ctx.axes, ctx.groups, ctx.group_size, *ctx.tags)
    return dx, None, None, None, None, None, None


all_to_all.register_autograd(_all_to_all_backward, setup_context=_gather_scatter_setup)


# -- permute: pairs flattened as [src0, dst0, src1, dst1, …] --------------------
def _permute_kernel(
    x: Tensor, axes: str, pairs: list[int], tree: str = "", leaf: int = -1, dims: list[int] | None = None
) -> Tensor:
    return _exchange(axes, x, _permute_collective(pairs, tree, leaf, dims))


def _permute_collective(pairs: list[int], tree: str = "", leaf: int = -1, dims: list[int] | None = None) -> Collective:
    return _interned("permute", None, (), 0, tuple(pairs), tree, leaf, tuple(dims) if dims else None)


permute = torch.library.custom_op("torchpmap::permute", _permute_kernel, mutates_args=(), tags=_TAGS)


@permute.register_fake
def _(x: Tensor, axes: str, pairs: list[int], tree: str = "", leaf: int = -1, dims: list[int] | None = None) -> Tensor:
    _refuse_unbatched(axes, "permute")
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # as _exchange returns it


def _permute_setup(ctx: Ctx, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, ctx.axes, ctx.pairs, *tags = inputs
    _saved_tags(ctx, tags)


def _permute_backward(ctx: Ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    _check_backward_in_replica(ctx.axes, grad)
    inverse = [v for s, d in zip(ctx.pairs[0::2], ctx.pairs[1::2]) for v in (d, s)]
    return call("permute", grad, ctx.axes, inverse, *ctx.tags), None, None, None, None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


# -- axis_index -------------------------------------------------------------------
def _axis_index_kernel(axes: str, device: torch.device) -> Tensor:
    # Evaluated at run time: a compiled graph must not bake in the index of the
    # replica that happened to trace it.
    # torch.full passes the value as a kernel argument: no host-to-device copy.
    return torch.full((), _frame(axes).index, dtype=torch.int64, device=device)


axis_index = torch.library.custom_op("torchpmap::axis_index", _axis_index_kernel, mutates_args=(), tags=_TAGS)


@axis_index.register_fake
def _(axes: str, device: torch.device) -> Tensor:
    return torch.empty((), dtype=torch.int64, device=device)


_KERNELS: dict[str, Callable[..., Tensor]] = {
    "all_reduce": _all_reduce_kernel,
    "all_gather": _all_gather_kernel,
    "reduce_scatter": _reduce_scatter_kernel,
    "all_to_all": _all_to_all_kernel,
    "permute": _permute_kernel,
}

# Each op's non-tensor arguments after ``axes`` -> the Collective its kernel runs.
_COLLECTIVES: dict[str, Callable[..., Collective]] = {
    "all_reduce": lambda op, axes, *rest: _all_reduce_collective(op, *rest),
    "all_gather": lambda axes, *rest: _all_gather_collective(*rest),
    "reduce_scatter": lambda op, axes, *rest: _reduce_scatter_collective(op, *rest),
    "all_to_all": lambda axes, *rest: _all_to_all_collective(*rest),
    "permute": lambda axes, *rest: _permute_collective(*rest),
}


def collective_of(name: str, *args: OpArg) -> tuple[tuple[str, ...], Collective]:
    """(axis names, Collective) of a call of op ``name`` with its non-tensor
    arguments ``args`` (as in a traced graph): what a runner that holds every
    replica's tensor hands a GroupBackend instead of calling the kernel."""
    axes = args[1] if name in ("all_reduce", "reduce_scatter") else args[0]
    assert isinstance(axes, str)
    return tuple(axes.split(AXIS_SEP)), _COLLECTIVES[name](*args)


# (setup_context, backward) of each differentiable collective, shared by the
# op registrations above and by _Collective.
_RULES: dict[
    str,
    tuple[
        Callable[[Ctx, tuple[Any, ...], Tensor], None],
        Callable[[Ctx, Tensor], tuple[Tensor | None, ...]],
    ],
] = {
    "all_reduce": (_all_reduce_setup, _all_reduce_backward),
    "all_gather": (_gather_scatter_setup, _all_gather_backward),
    "reduce_scatter": (_reduce_scatter_setup, _reduce_scatter_backward),
    "all_to_all": (_gather_scatter_setup, _all_to_all_backward),
    "permute": (_permute_setup, _permute_backward),
}


# -- batching rules (torch.func.vmap) ----------------------------------------------------
# A vmap level is either a user's torch.func.vmap inside a replica, whose dimension the
# collective carries as data (it still communicates across replicas), or the replica
# axis itself (_stacked_collectives.vmap_replicas), where the collective becomes an
# exchange along the vmapped dimension. Both rules return (result, its batch dim).
# Every op takes the tensor first and the tree tags last; in between:
# all_reduce/reduce_scatter (op, axes, groups, group_size), all_gather/all_to_all
# (axes, groups, group_size), permute (axes, pairs).
def _carry_batch_dim(name: str, x: Tensor, bdim: int, args: tuple[OpArg, ...]) -> tuple[Tensor, int]:
    """The collective of every batch member at once: the batch dim rides along
    behind the ops' leading group dimension, if they have one."""
    if name in ("all_reduce", "permute"):  # elementwise across replicas
        return call(name, x, *args), bdim
    if name == "all_gather":  # (B, ...) -> (g, B, ...)
        return call(name, x.movedim(bdim, 0), *args), 1
    if name == "reduce_scatter":  # (g, B, ...) -> (B, ...)
        return call(name, x.movedim(bdim, 1), *args), 0
    if name == "all_to_all":  # (g, B, ...) -> (g, B, ...)
        return call(name, x.movedim(bdim, 1), *args), 1
    raise AssertionError(f"no batching rule for collective {name!r}")


def _over_replicas(name: str, level: _axis.ReplicaLevel, xs: Tensor, args: tuple[Any, ...]) -> Tensor:
    """The collective as an exchange along the replica dimension (first) of xs."""
    if name in ("all_reduce", "reduce_scatter"):
        op, axes, groups, group_size = args[:4]
    elif name == "permute":
        axes, pairs = args[:2]
    else:
        axes, groups, group_size = args[:3]
    names = axes.split(AXIS_SEP)
    if _axis.bound_level(names) is not level:
        other = next(n for n in names if n != level.axis_name)
        raise _axis.unbound_in(other, level.axis_name)
    if xs.shape[0] != level.size:
        raise ValueError(
            f"the replica axis {level.axis_name!r} has {level.size} replicas but vmap batches {xs.shape[0]}: "
            f"the vmapped dimension must be the replicas"
        )
    if name == "permute":
        return _stacked.permute(xs, list(zip(pairs[0::2], pairs[1::2])))
    decoded = decode_groups(groups, group_size)
    if name == "all_reduce":
        return _stacked.all_reduce(xs, op, decoded)
    if name == "reduce_scatter":
        return _stacked.reduce_scatter(xs, op, decoded)
    if name == "all_gather":
        return _stacked.all_gather(xs, decoded)
    return _stacked.all_to_all(xs, decoded)


def _batch(
    name: str, level: _axis.ReplicaLevel | None, x: Tensor, bdim: int | None, args: tuple[Any, ...]
) -> tuple[Tensor, int | None]:
    if bdim is None:  # only a non-tensor argument varies: never for these ops
        return call(name, x, *args), None
    if level is not None:
        return _over_replicas(name, level, x.movedim(bdim, 0), args), 0
    return _carry_batch_dim(name, x, bdim, args)


def _op_vmap_rule(name: str) -> Callable[..., tuple[Tensor, int | None]]:
    def rule(info: Any, in_dims: tuple[int | None, ...], x: Tensor, *args: Any) -> tuple[Tensor, int | None]:
        # torch.library runs this with the batched level still current.
        level = _axis.replica_level(torch._C._functorch.maybe_current_level())
        return _batch(name, level, x, in_dims[0], args)

    return rule


def _function_vmap_rule(
    info: Any, in_dims: tuple[int | None, ...], name: str, x: Tensor, *args: Any
) -> tuple[Tensor, int | None]:
    # An autograd.Function's rule runs with its level popped.
    level = _axis.replica_level_below(torch._C._functorch.maybe_current_level())
    return _batch(name, level, x, in_dims[1], args)


for _name, _op in (
    ("all_reduce", all_reduce),
    ("all_gather", all_gather),
    ("reduce_scatter", reduce_scatter),
    ("all_to_all", all_to_all),
    ("permute", permute),
):
    _op.register_vmap(_op_vmap_rule(_name))
