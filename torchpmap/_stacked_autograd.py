"""Autograd through a stacked call.

The stacked executor's forward is one batched graph (``_stacked``). With
autograd, that graph runs inside one autograd Function (``_StackedCall``)
whose inputs are the tensors the graph reads (the stacked buffers, which
autograd connects to the caller's tensors, and the shared ones: broadcast
arguments and tensors the function closes over). Its backward is another
batched graph, captured the first time it is needed: ``torch.func.vjp`` of
the per-replica graph, under the replica vmap level. So each replica
differentiates exactly as it does on the threads executor: the collectives
use their own transpose rules (``_ops``: psum's is psum, pmax refuses), which
the replica level turns into exchanges along the stack; nothing is taken from
autograd's formulas for the stacked primitives' index ops.

A shared input's gradient is the sum over the replicas, folded in replica
order as the caller's autograd folds the threads executor's per-replica
gradients. The backward recomputes the forward inside the vjp (no residuals
are kept between the two graphs), so a function that writes an input in
place is refused. With ``create_graph=True`` the backward graph runs through
the same Function, so higher orders work the same way.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import reduce
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from . import _axis
from ._graph_passes import simplify
from ._stacked_collectives import vmap_replicas

# A per-replica function at a given functorch depth (how many transforms,
# the replica level included, it runs under): Dynamo writes the levels of a
# torch.func transform inside the function as constants, which must move up.
PerReplica = Callable[[int], Callable[..., tuple[torch.Tensor, ...]]]


class ReplicaProgram:
    """A per-replica function of tensors and its batched graph over the
    replicas: inputs with in_dim 0 are (n, ...) stacks, in_dim None shared;
    each output is a stack, or (``folded``) its sum over the replicas."""

    def __init__(
        self,
        per_replica: PerReplica,
        axis_name: str,
        n: int,
        in_dims: tuple[int | None, ...],
        folded: tuple[bool, ...] | None = None,
    ) -> None:
        self.per_replica, self.axis_name, self.n, self.in_dims = per_replica, axis_name, n, in_dims
        self.folded = folded
        self.graph: torch.fx.GraphModule | None = None
        self.out_requires_grad: tuple[bool, ...] = ()
        # Per output, whether it depends on an input from this position on
        # (a vjp: on a cotangent); None: not asked.
        self.connected_from: int | None = None
        self.connected: tuple[bool, ...] = ()
        self._vjps: dict[tuple[Any, ...], ReplicaProgram] = {}

    def trace(self, examples: list[Any]) -> torch.fx.GraphModule:
        """The batched graph (made once, on ``examples``' shapes), remembering
        which outputs depend on an input that requires grad."""
        if self.graph is None:
            fn = vmap_replicas(self.per_replica(1), self.axis_name, self.n, in_dims=self.in_dims)

            def batched(*args: Any) -> tuple[torch.Tensor, ...]:
                outs = tuple(fn(*args))
                if self.folded is not None:
                    outs = tuple(_fold(o) if f else o for o, f in zip(outs, self.folded))
                self.out_requires_grad = tuple(o.requires_grad for o in outs)
                return outs

            frame = _axis.current_frame()
            _axis.unbind()  # under vmap_replicas the collectives find the replica level instead
            try:
                # Outside Dynamo's tracing context: make_fx's fake tensors would otherwise
                # add symbols (a strided input's) to Dynamo's shape env, which then has
                # guards it cannot build.
                with torch._guards.tracing(None):
                    graph = make_fx(batched, tracing_mode="fake", _allow_non_fake_inputs=True)(*examples)
            finally:
                _axis.bind(frame)
            simplify(graph)  # it runs op by op on every call: no node that does nothing
            if self.connected_from is not None:
                self.connected = _outputs_depending_on(graph.graph, self.connected_from)
            self.graph = graph
        return self.graph

    def vjp(self, diff: tuple[int, ...], cotangents: tuple[int, ...], inputs: list[Any]) -> ReplicaProgram:
        """The program computing, from this one's inputs and the cotangents of
        its outputs ``cotangents`` (``inputs``: both), the gradients of its
        inputs ``diff``. One per layout of ``inputs``: a traced graph may hold
        views that only their strides allow (an expanded cotangent, say)."""
        grad_on = torch.is_grad_enabled()  # create_graph=True: which outputs require grad matters
        layout = tuple(
            (t.shape, t.stride(), grad_on and t.requires_grad) if isinstance(t, torch.Tensor) else None for t in inputs
        )
        key = (diff, cotangents, layout)
        program = self._vjps.get(key)
        if program is None:
            inner, k = self.per_replica, len(self.in_dims)

            def per_replica(depth: int) -> Callable[..., tuple[torch.Tensor, ...]]:
                fn = inner(depth + 1)  # under one more transform: the vjp

                def replica_vjp(*args: Any) -> tuple[torch.Tensor, ...]:
                    primals, cots = list(args[:k]), args[k:]

                    def f(*diff_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
                        full = list(primals)
                        for p, v in zip(diff, diff_values):
                            full[p] = v
                        outs = fn(*full)
                        return tuple(outs[i] for i in cotangents)

                    pullback = torch.func.vjp(f, *[primals[p] for p in diff])[1]
                    return tuple(pullback(tuple(cots)))

                return replica_vjp

            # A folded output's cotangent is every replica's (the sum's adjoint).
            cot_dims = tuple(None if self.folded and self.folded[i] else 0 for i in cotangents)
            program = ReplicaProgram(
                per_replica,
                self.axis_name,
                self.n,
                (*self.in_dims, *cot_dims),
                folded=tuple(self.in_dims[p] is None for p in diff),
            )
            # torch.func.vjp gives zeros for an input the outputs do not reach,
            # where autograd (and so the threads executor) gives None.
            program.connected_from = k
            self._vjps[key] = program
        return program


def _outputs_depending_on(graph: torch.fx.Graph, first: int) -> tuple[bool, ...]:
    """Per output of ``graph``, whether it depends on a placeholder from position ``first`` on."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    dependent = set(placeholders[first:])
    for node in graph.nodes:
        if node.op != "placeholder" and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    outputs = graph.output_node().args[0]
    assert isinstance(outputs, (tuple, list))
    return tuple(o in dependent for o in outputs)


def _fold(stack: torch.Tensor) -> torch.Tensor:
    """The sum of a stack's rows, left to right: the order in which autograd
    accumulates the threads executor's per-replica gradients of one tensor."""
    return reduce(operator.add, stack.unbind(0))


def run(program: ReplicaProgram, inputs: list[Any]) -> tuple[torch.Tensor, ...]:
    """The program's outputs on ``inputs``; recorded by autograd as one node when
    grad mode is on and an input requires grad."""
    graph = program.graph
    assert graph is not None, "run a traced program"
    tensors = [i for i in inputs if isinstance(i, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _StackedCall.apply(program, *inputs)
    return tuple(graph(*inputs))


class _StackedCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, program: ReplicaProgram, *inputs: Any) -> tuple[torch.Tensor, ...]:
        assert program.graph is not None
        outs = tuple(program.graph(*inputs))
        ctx.program = program
        ctx.tensor_positions = [k for k, i in enumerate(inputs) if isinstance(i, torch.Tensor)]
        ctx.others = [None if isinstance(i, torch.Tensor) else i for i in inputs]
        ctx.save_for_backward(*[inputs[k] for k in ctx.tensor_positions])
        # As the threads executor's node: outputs alias their values but are not views for autograd.
        outs = tuple(o.detach() for o in outs)
        ctx.mark_non_differentiable(*[o for o, rg in zip(outs, program.out_requires_grad) if not rg])
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        program: ReplicaProgram = ctx.program
        inputs = list(ctx.others)
        for k, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            inputs[k] = t
        diff = tuple(k for k in range(len(inputs)) if ctx.needs_input_grad[k + 1])
        # As on threads: an output the caller did not use has zero cotangents (materialized by autograd).
        cotangents = tuple(i for i, g in enumerate(grads) if g is not None and program.out_requires_grad[i])
        result: list[torch.Tensor | None] = [None] * len(inputs)
        if diff and cotangents:
            vjp_inputs = [*inputs, *[grads[i] for i in cotangents]]
            vjp = program.vjp(diff, cotangents, vjp_inputs)
            vjp.trace(vjp_inputs)  # the first time: captured here, where it is needed
            for p, g, connected in zip(diff, run(vjp, vjp_inputs), vjp.connected):
                result[p] = g if connected else None
        return (None, *result)
