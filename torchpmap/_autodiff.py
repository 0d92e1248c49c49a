"""Autograd through a pmap call.

Each replica builds its own autograd graph on its worker thread. pmap hides
those graphs behind one autograd Function whose backward runs every replica's
backward pass on its worker, concurrently and with the named axis bound again,
so the collectives' backward rules (psum of the cotangent, ...) communicate
exactly like the forward collectives did. Gradients then flow back to what the
caller passed: slices are stacked, broadcast arguments summed. Tensors the
function captured instead of taking as arguments (a closure's parameters) are
found by walking the replicas' graphs, and get their gradients the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

import torch
from torch.autograd.graph import Node
from torch.utils._pytree import TreeSpec

# A replica's output, flattened: (leaves, tree structure).
FlatOutput: TypeAlias = "tuple[list[Any], TreeSpec]"
# A tensor autograd must see (see differentiable_call): (leaf index, kind, source
# tensors, axis). InputSource is an argument's leaf; a Source's leaf index is None
# for a tensor the function captured instead.
InputSource: TypeAlias = "tuple[int, Literal['mapped', 'broadcast', 'shards'], list[torch.Tensor], int | None]"
Source: TypeAlias = "tuple[int | None, Literal['mapped', 'broadcast', 'shards'], list[torch.Tensor], int | None]"
# run(replica_fn): replica_fn(rank) on every replica with the axis bound, the results in rank order.
Runner: TypeAlias = "Callable[[Callable[[int], Any]], list[Any]]"


def differentiable_call(
    run: Runner,
    call_fun: Callable[[int, list[Any]], FlatOutput],
    per_leaf: list[list[Any]],
    sources: Sequence[InputSource],
    devices: Sequence[torch.device],
    n: int,
) -> list[FlatOutput]:
    """Run the replicas (``run(replica_fn)``) so that the caller's autograd sees
    through them. ``call_fun(rank, leaves)`` returns a replica's flattened
    output; so does this, one (leaves, spec) per replica.

    ``sources``: (leaf index, kind, source tensors, axis) for every input leaf
    that requires grad; kind is "mapped" (one tensor sliced along axis),
    "broadcast" (one tensor given to all) or "shards" (one tensor per replica).
    """
    replica_inputs = [[vals[r] for vals in per_leaf] for r in range(n)]
    grad_inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]  # per replica: its leaves that need grad
    for j, _, _, _ in sources:
        for r in range(n):
            v = replica_inputs[r][j].detach().requires_grad_()
            replica_inputs[r][j] = v
            grad_inputs[r].append(v)

    flat = run(lambda r: call_fun(r, replica_inputs[r]))  # (leaves, spec) per replica
    tensor_slots = [(r, k) for r in range(n) for k, v in enumerate(flat[r][0]) if isinstance(v, torch.Tensor)]
    outputs = [flat[r][0][k] for r, k in tensor_slots]
    if not any(o.requires_grad for o in outputs):
        return flat  # nothing for the caller's autograd to see
    captured = _captured_leaves(outputs, grad_inputs)
    every_source: Sequence[Source] = sources
    if captured:
        every_source = [*sources, *[(None, "broadcast", [t], None) for t in captured]]
        for r in range(n):
            grad_inputs[r] = [*grad_inputs[r], *captured]
    source_tensors = [t for _, _, ts, _ in every_source for t in ts]
    state = _ReplicaGraphs(run, devices, n, every_source, grad_inputs, outputs, tensor_slots)
    results = _ThroughReplicas.apply(state, *source_tensors)
    for (r, k), t in zip(tensor_slots, results):
        flat[r][0][k] = t
    return flat


def _captured_leaves(outputs: list[torch.Tensor], grad_inputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that the replicas' graphs reach but that
    were not passed as arguments: they came in through a closure. Without
    this, the caller's backward would run the replicas' collective backward
    rules on its own thread, where no replica is there to meet them."""
    known = {id(t) for per in grad_inputs for t in per}
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[Node | None] = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if var is not None:
            if id(var) not in known:
                found[id(var)] = var
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return list(found.values())


class _ReplicaGraphs:
    """What the backward pass needs; dropped as soon as it has run."""

    def __init__(
        self,
        run: Runner,
        devices: Sequence[torch.device],
        n: int,
        sources: Sequence[Source],
        grad_inputs: list[list[torch.Tensor]],
        outputs: list[torch.Tensor],
        tensor_slots: list[tuple[int, int]],
    ) -> None:
        self.run = run
        self.devices = devices
        self.n = n
        self.sources = sources
        self.grad_inputs = grad_inputs
        self.outputs = outputs
        self.tensor_slots = tensor_slots


class _ThroughReplicas(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, state: _ReplicaGraphs, *source_tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.state = state
        outs = tuple(o.detach() for o in state.outputs)
        ctx.mark_non_differentiable(*[d for o, d in zip(state.outputs, outs) if not o.requires_grad])
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        state: _ReplicaGraphs = ctx.state
        if state is None:
            raise RuntimeError(
                "Trying to backward through a pmap call a second time; the replicas' "
                "graphs were freed after the first backward (use retain_graph=True "
                "to keep them)"
            )
        # backward(retain_graph=True) (gradcheck does it, as do users taking
        # several vjps) must keep the replicas' graphs for the next pass too.
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        if not keep:
            ctx.state = None
        n = state.n
        per_replica_outs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        per_replica_grads: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for (r, _), out, g in zip(state.tensor_slots, state.outputs, grads):
            if g is not None and out.requires_grad:
                per_replica_outs[r].append(out)
                per_replica_grads[r].append(g)

        def replica_backward(r: int) -> list[torch.Tensor | None]:
            if not per_replica_outs[r]:
                return [None] * len(state.grad_inputs[r])
            return list(
                torch.autograd.grad(
                    per_replica_outs[r],
                    state.grad_inputs[r],
                    per_replica_grads[r],
                    retain_graph=keep,
                    allow_unused=True,
                )
            )

        with torch.enable_grad():
            replica_grads = state.run(replica_backward)
        source_grads: list[torch.Tensor | None] = []
        for s, (_, kind, tensors, axis) in enumerate(state.sources):
            per_r = [replica_grads[r][s] for r in range(n)]
            if kind == "shards":
                source_grads += [g if g is None else g.to(t.device) for g, t in zip(per_r, tensors)]
                continue
            (src,) = tensors
            if all(g is None for g in per_r):
                source_grads.append(None)
                continue
            if kind == "broadcast":
                total = None
                for g in per_r:
                    if g is not None:
                        g = g.to(src.device)
                        total = g if total is None else total + g
                source_grads.append(total)
            else:  # mapped: the replicas' slices back into one tensor
                assert axis is not None  # a mapped source has its axis
                template = src.select(axis, 0)
                parts = [torch.zeros_like(template) if g is None else g.to(src.device) for g in per_r]
                source_grads.append(torch.stack(parts, dim=axis))
        return (None, *source_grads)
