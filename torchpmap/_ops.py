"""The collective primitives as torch.library custom ops.

Each op has a fake (meta) implementation so torch.compile traces through it
with no graph break, an autograd rule (JAX's transposes), and a kernel that
finds the running replica's communicator at run time. Axis names are strings;
``groups`` is axis_index_groups flattened (empty: one group of everybody) with
``group_size`` members each.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _axis


def _unflatten_groups(groups: list[int], group_size: int):
    if not groups:
        return None
    return tuple(tuple(groups[i : i + group_size]) for i in range(0, len(groups), group_size))


# Axis names travel as one string (the schema has no str[]), joined by a
# control character that no sensible axis name contains.
AXIS_SEP = "\x1f"


def encode_axes(names) -> str:
    return AXIS_SEP.join(names)


def _frame(axes: str, x: Tensor | None = None) -> _axis.ReplicaFrame:
    return _axis.resolve(tuple(axes.split(AXIS_SEP)), like=x)


# -- all_reduce ---------------------------------------------------------------
@torch.library.custom_op("torchpmap::all_reduce", mutates_args=())
def all_reduce(x: Tensor, op: str, axes: str, groups: list[int], group_size: int) -> Tensor:
    f = _frame(axes, x)
    return f.comm.all_reduce(f.index, x, op, _unflatten_groups(groups, group_size))


@all_reduce.register_fake
def _(x, op, axes, groups, group_size):
    return torch.empty_like(x)


def _all_reduce_setup(ctx, inputs, output):
    _, ctx.op, ctx.axes, ctx.groups, ctx.group_size = inputs


def _all_reduce_backward(ctx, grad):
    if ctx.op != "sum":
        raise RuntimeError(
            f"p{ctx.op} is not differentiable (as in JAX); use psum/pmean, or "
            f"wrap the value in .detach() if no gradient should flow through it"
        )
    # JAX's pmap rule: the transpose of psum is psum (see README, 'Gradients
    # through collectives').
    return all_reduce(grad, "sum", ctx.axes, ctx.groups, ctx.group_size), None, None, None, None


all_reduce.register_autograd(_all_reduce_backward, setup_context=_all_reduce_setup)


# -- all_gather: (…) -> (g, …) ------------------------------------------------
@torch.library.custom_op("torchpmap::all_gather", mutates_args=())
def all_gather(x: Tensor, axes: str, groups: list[int], group_size: int) -> Tensor:
    f = _frame(axes, x)
    return f.comm.all_gather(f.index, x, _unflatten_groups(groups, group_size))


@all_gather.register_fake
def _(x, axes, groups, group_size):
    return x.new_empty((group_size, *x.shape))


def _gather_scatter_setup(ctx, inputs, output):
    _, ctx.axes, ctx.groups, ctx.group_size = inputs


def _all_gather_backward(ctx, grad):
    return reduce_scatter(grad, "sum", ctx.axes, ctx.groups, ctx.group_size), None, None, None


all_gather.register_autograd(_all_gather_backward, setup_context=_gather_scatter_setup)


# -- reduce_scatter: (g, …) -> (…) ------------------------------------------------
@torch.library.custom_op("torchpmap::reduce_scatter", mutates_args=())
def reduce_scatter(x: Tensor, op: str, axes: str, groups: list[int], group_size: int) -> Tensor:
    f = _frame(axes, x)
    return f.comm.reduce_scatter(f.index, x, op, _unflatten_groups(groups, group_size))


@reduce_scatter.register_fake
def _(x, op, axes, groups, group_size):
    return x.new_empty(x.shape[1:])


def _reduce_scatter_setup(ctx, inputs, output):
    _, _, ctx.axes, ctx.groups, ctx.group_size = inputs


def _reduce_scatter_backward(ctx, grad):
    return all_gather(grad, ctx.axes, ctx.groups, ctx.group_size), None, None, None, None


reduce_scatter.register_autograd(_reduce_scatter_backward, setup_context=_reduce_scatter_setup)


# -- all_to_all: (g, …) -> (g, …), out[j] = member j's x[k] ----------------------
@torch.library.custom_op("torchpmap::all_to_all", mutates_args=())
def all_to_all(x: Tensor, axes: str, groups: list[int], group_size: int) -> Tensor:
    f = _frame(axes, x)
    return f.comm.all_to_all(f.index, x, _unflatten_groups(groups, group_size))


@all_to_all.register_fake
def _(x, axes, groups, group_size):
    return torch.empty_like(x)


def _all_to_all_backward(ctx, grad):
    # out_k[j] = x_j[k], so the transpose is the same exchange.
    return all_to_all(grad, ctx.axes, ctx.groups, ctx.group_size), None, None, None


all_to_all.register_autograd(_all_to_all_backward, setup_context=_gather_scatter_setup)


# -- permute: pairs flattened as [src0, dst0, src1, dst1, …] --------------------
@torch.library.custom_op("torchpmap::permute", mutates_args=())
def permute(x: Tensor, axes: str, pairs: list[int]) -> Tensor:
    f = _frame(axes, x)
    return f.comm.permute(f.index, x, list(zip(pairs[0::2], pairs[1::2])))


@permute.register_fake
def _(x, axes, pairs):
    return torch.empty_like(x)


def _permute_setup(ctx, inputs, output):
    _, ctx.axes, ctx.pairs = inputs


def _permute_backward(ctx, grad):
    inverse = [v for s, d in zip(ctx.pairs[0::2], ctx.pairs[1::2]) for v in (d, s)]
    return permute(grad, ctx.axes, inverse), None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


# -- axis_index -------------------------------------------------------------------
@torch.library.custom_op("torchpmap::axis_index", mutates_args=())
def axis_index(axes: str, device: torch.device) -> Tensor:
    # Evaluated at run time: a compiled graph must not bake in the index of the
    # replica that happened to trace it.
    return torch.tensor(_frame(axes).index, dtype=torch.int64, device=device)


@axis_index.register_fake
def _(axes, device):
    return torch.empty((), dtype=torch.int64, device=device)
