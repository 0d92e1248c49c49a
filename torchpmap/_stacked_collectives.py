"""The five collective primitives over a stack of replicas: one (n, ...) tensor
whose row r is replica r's value, for executors that run every replica at once.

Each function computes, for all n replicas together, exactly what the threads
executor's communicator (``_communicator.compute_results``) computes for each
replica from every replica's input, bit for bit: reductions fold the group's
members in the same order, and every step is elementwise or an index copy. The
index tensors are made on the input's device, so a trace holds no device of its
own. Results never alias the input.

How a stacked runner uses them:

* with the replica dimension explicit, it calls these functions on its
  (n, ...) buffers where the replica function calls a collective;
* with the replica dimension as a ``torch.func.vmap`` level, it wraps the
  replica function with ``vmap_replicas``: the ops' batching rules (``_ops``)
  recognise that level and call these functions, while any other vmap level (a
  user's ``torch.func.vmap`` inside a replica) carries its dimension as data.
  ``axis_index`` under that level is the batched ``arange(n)``. A collective of
  a value that is not batched over the replicas (the same in every replica)
  never reaches a batching rule, so it raises instead of guessing.

``groups`` is axis_index_groups as tuples (``_ops.decode_groups``), None for
one group of everybody; ``pairs`` are (source, destination) pairs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch.fx.experimental import proxy_tensor

from . import _axis

if TYPE_CHECKING:
    from ._communicator import Groups

# As the threads executor's communicator reduces (_communicator.REDUCERS).
_REDUCERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sum": torch.add,
    "max": torch.maximum,
    "min": torch.minimum,
}


def _groups(groups: Groups, n: int) -> tuple[tuple[int, ...], ...]:
    return tuple(groups) if groups else (tuple(range(n)),)


def _equal_size_groups(groups: Groups, n: int, fn: str) -> tuple[tuple[int, ...], ...]:
    out = _groups(groups, n)
    if len({len(g) for g in out}) != 1:
        raise ValueError(f"{fn}: axis_index_groups must all have the same size, got {groups!r}")
    return out


def _members_and_positions(groups: tuple[tuple[int, ...], ...], n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """members[r]: the members of replica r's group, in group order, (n, g);
    position[r]: r's place in its group, (n,)."""
    members: list[tuple[int, ...]] = [()] * n
    position = [0] * n
    for g in groups:
        for k, r in enumerate(g):
            members[r], position[r] = g, k
    return (
        torch.tensor(members, dtype=torch.int64, device=device),
        torch.tensor(position, dtype=torch.int64, device=device),
    )


def _is_everybody(groups: Groups, n: int) -> bool:
    """One group of every replica in order: the exchange needs no index."""
    return not groups or (len(groups) == 1 and tuple(groups[0]) == tuple(range(n)))


def _check_stack(xs: Tensor, n: int, fn: str, min_ndim: int = 1) -> None:
    if xs.ndim < min_ndim or xs.shape[0] != n:
        raise ValueError(
            f"{fn}: expected a stack of {n} replicas' values with at least {min_ndim} dimension(s), "
            f"got shape {list(xs.shape)}"
        )


def _fold(rows: Sequence[Tensor], reduce: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """rows[0] reduced with each later row in order, as a fresh tensor
    (``_communicator._reduced``'s order: the same result bit for bit)."""
    if len(rows) == 1:
        return rows[0].clone()
    total = reduce(rows[0], rows[1])
    for row in rows[2:]:
        total = reduce(total, row)
    return total


# The node meta key that marks, in a traced graph, a stack of n copies of one
# value that is every replica's (an all-reduce's total, an all-gather's stack):
# _graph_passes computes pointwise ops on such a stack once. A user's own
# ``torch.stack([t, t])`` is not one: each replica computes over all its rows.
REPLICA_COPIES = "torchpmap_replica_copies"


def replica_copies(row: Tensor, n: int) -> Tensor:
    """``torch.stack([row] * n)``; under make_fx, its node is marked ``REPLICA_COPIES``.
    The mark goes on the node itself, found through the tracer: fx_traceback's
    annotations are process-wide state, which two threads tracing at once would
    leave switched on for every later node of any graph."""
    out = torch.stack([row] * n)
    mode = proxy_tensor.get_proxy_mode()
    if mode is not None:
        proxy = proxy_tensor.get_proxy_slot(out, mode.tracer, None, lambda slot: slot.proxy)
        if proxy is not None:
            proxy.node.meta[REPLICA_COPIES] = True
    return out


_traced = threading.local()  # .order_reductions: a list while a program is traced on this thread


@contextmanager
def recording_order_reductions() -> Iterator[list[str]]:
    """The ops of the order reductions (pmax/pmin) traced in the scope. They have
    no derivative (as in JAX), but their batched form is torch.maximum/minimum,
    which would pass tangents through by its tie rule: the caller refuses
    forward-mode AD through such a program."""
    previous = getattr(_traced, "order_reductions", None)
    found: list[str] = []
    _traced.order_reductions = found
    try:
        yield found
    finally:
        _traced.order_reductions = previous


def all_reduce(xs: Tensor, op: str, groups: Groups = None) -> Tensor:
    """out[r]: the reduction over r's group of xs[m], folded in group order."""
    n = xs.shape[0]
    if op != "sum":
        recording = getattr(_traced, "order_reductions", None)
        if recording is not None:
            recording.append(op)
    _check_stack(xs, n, "all_reduce")
    reduce = _REDUCERS[op]
    rows = xs.unbind(0)
    if _is_everybody(groups, n):
        total = _fold(rows, reduce)
        return replica_copies(total, n) if n > 1 else total.unsqueeze(0)
    total_of: dict[int, Tensor] = {}  # replica -> its group's total
    for g in _groups(groups, n):
        total = _fold([rows[m] for m in g], reduce)
        for r in g:
            total_of[r] = total
    if len(total_of) != n:
        raise ValueError(f"all_reduce: axis_index_groups {groups!r} must hold every replica 0..{n - 1} once")
    return torch.stack([total_of[r] for r in range(n)])


def all_gather(xs: Tensor, groups: Groups = None) -> Tensor:
    """out[r]: the stack of xs[m] for the members m of r's group, (n, g, ...)."""
    n = xs.shape[0]
    _check_stack(xs, n, "all_gather")
    groups_ = _equal_size_groups(groups, n, "all_gather")
    if _is_everybody(groups, n):
        return replica_copies(xs, n)
    members, _ = _members_and_positions(groups_, n, xs.device)
    return xs[members]


def reduce_scatter(xs: Tensor, op: str, groups: Groups = None) -> Tensor:
    """For xs (n, g, ...): out[r] is row k of the reduction over r's group,
    k being r's place in its group, (n, ...)."""
    n = xs.shape[0]
    groups_ = _equal_size_groups(groups, n, "reduce_scatter")
    _check_stack(xs, n, "reduce_scatter", min_ndim=2)
    reduce = _REDUCERS[op]
    if _is_everybody(groups, n):  # row r of the fold over the members is r's
        _check_group_dim(xs, n, "reduce_scatter")
        return _fold(xs.unbind(0), reduce)
    members, position = _members_and_positions(groups_, n, xs.device)
    _check_group_dim(xs, members.shape[1], "reduce_scatter")
    total = xs[members[:, 0], position]
    for j in range(1, members.shape[1]):
        total = reduce(total, xs[members[:, j], position])
    return total


def all_to_all(xs: Tensor, groups: Groups = None) -> Tensor:
    """For xs (n, g, ...): out[r][j] = xs[member j of r's group][r's place], (n, g, ...)."""
    n = xs.shape[0]
    groups_ = _equal_size_groups(groups, n, "all_to_all")
    _check_stack(xs, n, "all_to_all", min_ndim=2)
    if _is_everybody(groups, n):  # out[r][j] = xs[j][r]
        _check_group_dim(xs, n, "all_to_all")
        return xs.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # never a view of xs
    members, position = _members_and_positions(groups_, n, xs.device)
    _check_group_dim(xs, members.shape[1], "all_to_all")
    return xs[members, position[:, None]]


def permute(xs: Tensor, pairs: Sequence[tuple[int, int]]) -> Tensor:
    """out[dst] = xs[src] for every (src, dst) pair; zeros where nothing is sent."""
    n = xs.shape[0]
    _check_stack(xs, n, "permute")
    if not pairs:
        return _zeros_of(xs)
    source_of: dict[int, int] = {}
    for src, dst in pairs:
        source_of.setdefault(dst, src)  # the first pair that sends to dst, as _communicator._permuted
    rows = xs.unbind(0)
    zeros: Tensor | None = None
    picked = []
    for r in range(n):
        if r in source_of:
            picked.append(rows[source_of[r]])
            continue
        if zeros is None:
            zeros = torch.zeros_like(rows[0])
        picked.append(zeros)
    return torch.stack(picked)  # copies: no row aliases the input


def _zeros_of(xs: Tensor) -> Tensor:
    """Zeros like xs that stay in its autograd graph: the output then requires grad and
    backpropagates zeros, as the threads executor's op does (a fresh zeros_like would be
    cut off). Not xs * 0, which is NaN where xs is inf or NaN."""
    return xs.masked_fill(torch.ones((), dtype=torch.bool, device=xs.device), 0)


def axis_index(n: int, device: torch.device) -> Tensor:
    """Every replica's index: (n,) int64."""
    return torch.arange(n, dtype=torch.int64, device=device)


def _check_group_dim(xs: Tensor, g: int, fn: str) -> None:
    if xs.shape[1] != g:
        raise ValueError(
            f"{fn}: each replica's value must have a leading dimension of the group size {g}, "
            f"got shape {list(xs.shape[1:])}"
        )


# -- the replica axis as a vmap level ----------------------------------------------------
def vmap_replicas(
    fn: Callable[..., Any], axis_name: str, size: int, device: torch.device | None = None, **vmap_kwargs: Any
) -> Callable[..., Any]:
    """torch.func.vmap(fn, **vmap_kwargs) whose level is the replica axis
    ``axis_name`` of ``size`` replicas: collectives over that axis inside fn
    exchange along the vmapped dimension (the functions above), and
    ``axis_index`` is arange(size) on the device of fn's first tensor argument
    (``device`` when it has none: the replicas', CPU if not given)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        below = torch._C._functorch.maybe_current_level()
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        where = tensors[0].device if tensors else (device or torch.device("cpu"))

        def replica(*args: Any, **kwargs: Any) -> Any:
            level = _axis.ReplicaLevel(axis_name, size, torch._C._functorch.current_level(), below, where)
            with _axis.entered(level):
                return fn(*args, **kwargs)

        in_dims = vmap_kwargs.get("in_dims", 0)
        if _maps_a_tensor(args, in_dims):
            return torch.func.vmap(replica, **vmap_kwargs)(*args, **kwargs)
        # Every argument is the same in every replica (broadcast, or none): vmap needs a
        # batched input to know the size, so an empty one carries it.
        size_carrier = torch.empty(size, 0, device=where)
        per_arg = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        return torch.func.vmap(lambda *a, **kw: replica(*a[:-1], **kw), **{**vmap_kwargs, "in_dims": (*per_arg, 0)})(
            *args, size_carrier, **kwargs
        )

    return run


def _maps_a_tensor(args: tuple[Any, ...], in_dims: Any) -> bool:
    """Whether vmap's ``in_dims`` map at least one tensor of ``args``."""
    leaves, spec = torch.utils._pytree.tree_flatten(args)
    dims = torch.utils._pytree._broadcast_to_and_flatten(
        in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args), spec
    )
    if dims is None:
        return True  # vmap reports the mismatch
    return any(isinstance(a, Tensor) and d is not None for a, d in zip(leaves, dims))


def axis_index_batched(level: _axis.ReplicaLevel) -> Tensor:
    """axis_index under a replica level: every replica's own index, batched, and
    lifted into the grad levels above it (a vjp of the replica, under autograd),
    which functorch requires of a tensor made inside them."""
    index = axis_index(level.size, level.device)
    while torch._C._functorch.is_functorch_wrapped_tensor(index):  # made inside a grad level: lifted into it
        index = torch._C._functorch.get_unwrapped(index)
    index = torch._C._functorch._add_batch_dim(index, 0, level.level)
    for interpreter in torch._functorch.pyfunctorch.retrieve_all_functorch_interpreters():
        above = interpreter.level() > level.level
        if above and interpreter.key() in (TransformType.Grad, TransformType.Jvp):
            index = torch._C._functorch._wrap_for_grad(index, interpreter.level())
    return index
