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
gradients.

The first backward of a program (per set of differentiated inputs and input
layout) traces the forward and its vjp as one joint graph and cuts it where the
backward starts (``ResidualSplit``): every node that depends on a cotangent is
backward, every other one forward. That backward recomputes the forward part
once; from then on the forward runs the forward part, which also returns the
residuals (the forward values the backward reads), saved like any autograd
node's, and the backward only runs its part. With ``create_graph=True`` the
backward is the vjp program, recomputing the forward from the saved inputs, and
runs through the same Function, so higher orders work the same way. A function
that writes inputs in place (none requiring grad) has the forward keep copies of
them as they were, which a backward that recomputes the forward reads; inside a
vjp it writes a copy made there (torch.func refuses writes into tensors from
outside it), which the joint graph's forward then copies into the input. One
that draws random numbers recomputes its draws from the call's replayed streams
(``_RandomGraphs``).
"""

from __future__ import annotations

import functools
import operator
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import reduce
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from . import _axis, _batched_cotangents, _batching_bugs, _promotion_guard, _stacked_random, _value_checks
from ._compile import DYNAMO_GATE
from ._direct_calls import direct_forward
from ._graph_passes import simplify
from ._overlapping_writes import refuse_overlapping_writes
from ._sharded import _storage_key
from ._stacked_collectives import recording_order_reductions, vmap_replicas

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
        # Whether trace simplifies the graph (a joint graph is simplified after the
        # split instead: an op may only write into a temporary on its own side).
        self.simplified = True
        self.out_requires_grad: tuple[bool, ...] = ()
        # A vjp program's: per differentiated input, whether autograd reached it (_ReachedFlags).
        self.reached: _ReachedFlags | None = None
        self._vjps: dict[tuple[Any, ...], ReplicaProgram] = {}
        self.splits: dict[tuple[Any, ...], ResidualSplit] = {}  # by split_key
        # Whether an output is a view of an input the program writes: a split's forward, which
        # writes a copy of that input and then copies it back, would return a view of the copy.
        self.outputs_view_written = False
        self._draws: bool | None = None
        # Whether the graph reduces by order (pmax/pmin, which have no derivative): tangents
        # of the caller's forward-mode AD must not pass through it.
        self.order_reductions = False

    def trace(self, examples: list[Any]) -> torch.fx.GraphModule:
        """The batched graph (made once, on ``examples``' shapes), remembering
        which outputs depend on an input that requires grad."""
        if self.graph is None:
            frame = _axis.current_frame()  # the capture's: its device serves a function without tensor inputs
            device = None if frame is None else frame.device
            # vmap must promote as one replica does, check the values its kernels check, and
            # refuse the batching rules known to differ from eager
            guarded = _value_checks.checked(_promotion_guard.guarded(self.per_replica(1)))
            per_replica = _batching_bugs.refused(guarded)
            fn = vmap_replicas(per_replica, self.axis_name, self.n, device, in_dims=self.in_dims)

            def batched(*args: Any) -> tuple[torch.Tensor, ...]:
                outs = tuple(fn(*args))
                if self.folded is not None:
                    outs = tuple(_fold(o) if f else o for o, f in zip(outs, self.folded))
                self.out_requires_grad = tuple(o.requires_grad for o in outs)
                return outs

            _axis.unbind()  # under vmap_replicas the collectives find the replica level instead
            try:
                # Outside Dynamo's tracing context: make_fx's fake tensors would otherwise
                # add symbols (a strided input's) to Dynamo's shape env, which then has
                # guards it cannot build.
                with DYNAMO_GATE.holding(), torch._guards.tracing(None), _saved_tensor_hooks_set_aside():
                    with warnings.catch_warnings(), recording_order_reductions() as orders:
                        # functorch's loop for an op without a batching rule is traced once, into
                        # the graph: its "performance drop" warning is not the user's to act on.
                        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
                        graph = make_fx(batched, tracing_mode="fake", _allow_non_fake_inputs=True)(*examples)
                self.order_reductions = bool(orders)
            finally:
                _axis.bind(frame)
            refuse_overlapping_writes(graph.graph)  # before the passes, which write temporaries of their own
            if self.simplified:
                simplify(graph)  # it runs op by op on every call: no node that does nothing
            self.graph = graph
        return self.graph

    @property
    def draws(self) -> bool:
        """Whether the traced graph draws random numbers (from each replica's streams)."""
        if self._draws is None:
            assert self.graph is not None, "trace the program first"
            self._draws = any(_stacked_random.is_replica_draw(node.target) for node in self.graph.graph.nodes)
        return self._draws

    def vjp(
        self, diff: tuple[int, ...], cotangents: tuple[int, ...], inputs: list[Any], written: frozenset[int]
    ) -> ReplicaProgram:
        """The program computing, from this one's inputs and the cotangents of
        its outputs ``cotangents`` (``inputs``: both), the gradients of its
        inputs ``diff`` (it writes the inputs ``written`` in place, as this one
        does). One per layout of ``inputs``: a traced graph may hold views that
        only their strides allow (an expanded cotangent, say)."""
        grad_on = torch.is_grad_enabled()  # create_graph=True: which outputs require grad matters
        layout = tuple(
            (t.shape, t.stride(), grad_on and t.requires_grad) if isinstance(t, torch.Tensor) else None for t in inputs
        )
        key = (diff, cotangents, layout)
        program = self._vjps.get(key)
        if program is None:
            inner, k = self.per_replica, len(self.in_dims)

            reached = _ReachedFlags(len(diff))

            def per_replica(depth: int) -> Callable[..., tuple[torch.Tensor, ...]]:
                fn = inner(depth + 1)  # under one more transform: the vjp

                def replica_vjp(*args: Any) -> tuple[torch.Tensor, ...]:
                    primals, cots = list(args[:k]), args[k:]

                    def f(*diff_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
                        full = _primals_to_write(primals, diff, reached.watch(diff_values), written)
                        outs = fn(*full)
                        return tuple(outs[i] for i in cotangents)

                    # The recomputed forward writes copies of the inputs it writes: nothing to keep.
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
            program.reached = reached  # filled in when it is traced
            self._vjps[key] = program
        return program

    def split(
        self, diff: tuple[int, ...], inputs: list[Any], cotangents: list[torch.Tensor], written: frozenset[int]
    ) -> ResidualSplit:
        """This program and its vjp with respect to the inputs ``diff`` as one
        joint graph, cut in two (``ResidualSplit``); traced on ``inputs`` (of
        which it writes those at ``written`` in place) and the (contiguous)
        ``cotangents`` of the outputs that require grad."""
        key = split_key(diff, inputs)
        split = self.splits.get(key)
        if split is None:
            assert self.folded is None, "only a forward program is split"
            inner, k = self.per_replica, len(self.in_dims)
            cot_outputs = tuple(i for i, rg in enumerate(self.out_requires_grad) if rg)
            to_write = sorted(written)

            reached = _ReachedFlags(len(diff))

            def per_replica(depth: int) -> Callable[..., tuple[torch.Tensor, ...]]:
                fn = inner(depth + 1)  # under one more transform: the vjp

                def replica_joint(*args: Any) -> tuple[torch.Tensor, ...]:
                    primals, cots = list(args[:k]), args[k:]

                    def f(*diff_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Any]:
                        full = _primals_to_write(primals, diff, reached.watch(diff_values), written)
                        outs = tuple(fn(*full))
                        return tuple(outs[i] for i in cot_outputs), (outs, tuple(full[p] for p in to_write))

                    # With has_aux, vjp returns (outputs, pullback, aux); its stub says two values.
                    _, pullback, (outs, finals) = torch.func.vjp(  # type: ignore[misc]
                        f, *[primals[p] for p in diff], has_aux=True
                    )
                    for p, final in zip(to_write, finals):  # the forward's writes, into the inputs
                        primals[p].copy_(final)
                    return (*outs, *pullback(tuple(cots)))

                return replica_joint

            n_outs = len(self.out_requires_grad)
            joint = ReplicaProgram(
                per_replica,
                self.axis_name,
                self.n,
                (*self.in_dims, *[0] * len(cot_outputs)),
                folded=(*[False] * n_outs, *[self.in_dims[p] is None for p in diff]),
            )
            joint.simplified = False
            graph = joint.trace([*inputs, *cotangents])
            split = self.splits[key] = ResidualSplit(graph, k, n_outs, diff, cot_outputs, tuple(reached.flags))
        return split


@contextmanager
def _saved_tensor_hooks_set_aside() -> Iterator[None]:
    """The caller's saved-tensor hooks (``torch.autograd.graph.save_on_cpu``...)
    set aside while a program is traced: torch.func refuses to run under them,
    and a trace saves nothing of the caller's. What the program saves when it
    runs goes through them as usual."""
    hooks = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(True)) is not None:
        hooks.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(hooks):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def _primals_to_write(
    primals: list[Any], diff: tuple[int, ...], diff_values: tuple[torch.Tensor, ...], written: frozenset[int]
) -> list[Any]:
    """The per-replica function's arguments inside a vjp: the differentiated
    ones as the vjp gives them, and a copy made inside the transform of each
    one the function writes in place (torch.func refuses a write into a tensor
    from outside it, and these require no grad)."""
    full = list(primals)
    for p, v in zip(diff, diff_values):
        full[p] = v
    for p in written:
        full[p] = full[p].clone()
    return full


class _ReachedFlags:
    """Per differentiated input, whether autograd brought it a gradient while a vjp
    is traced. torch.func.vjp gives zeros for an input autograd does not reach,
    where autograd (and so the threads executor) gives None; whether the gradient
    reads the cotangents does not tell them apart, since some derivatives are
    zeros made from the input alone (``angle`` of a real tensor)."""

    __slots__ = ("flags",)

    def __init__(self, n: int) -> None:
        self.flags = [False] * n

    def watch(self, diff_values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``diff_values`` themselves, each with a hook that notes its gradient (a hook
        adds no op to the traced graphs, which run on every call)."""
        for k, v in enumerate(diff_values):
            v.register_hook(functools.partial(self._note, k))
        return diff_values

    def _note(self, k: int, grad: torch.Tensor) -> None:
        self.flags[k] = True


def split_key(diff: tuple[int, ...], inputs: list[Any]) -> tuple[Any, ...]:
    """What a split is traced for: the differentiated inputs and every input's
    layout (a traced graph may hold views that only those strides allow)."""
    return diff, tuple((t.shape, t.stride()) if isinstance(t, torch.Tensor) else None for t in inputs)


class ResidualSplit:
    """A joint forward-and-vjp graph cut where the backward starts: ``forward``
    maps the inputs to the outputs and the residuals (every value of the
    forward part that the backward part reads), ``backward`` maps the
    residuals and the cotangents to the gradients of the inputs ``diff``. The
    cut is by dependence: a node that depends on a cotangent is backward, every
    other node forward, so each runs once (a draw or a write included)."""

    def __init__(
        self,
        joint: torch.fx.GraphModule,
        n_inputs: int,
        n_outs: int,
        diff: tuple[int, ...],
        cot_outputs: tuple[int, ...],
        reached: tuple[bool, ...],
    ) -> None:
        self.diff, self.cot_outputs, self.n_outs = diff, cot_outputs, n_outs
        self.reached = reached  # per input in diff: whether autograd reached it (else its gradient is None)
        graph = joint.graph
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        cotangents = placeholders[n_inputs:]
        backward_nodes = set(cotangents)
        for node in graph.nodes:
            if node.op == "call_function" and any(a in backward_nodes for a in node.all_input_nodes):
                backward_nodes.add(node)
        outputs = list(graph.output_node().args[0])  # type: ignore[arg-type]
        outs, grads = outputs[:n_outs], outputs[n_outs:]
        saved: dict[torch.fx.Node, None] = {}  # forward values the backward reads, in order
        for node in graph.nodes:
            if node in backward_nodes and node.op == "call_function":
                saved.update((a, None) for a in node.all_input_nodes if a not in backward_nodes)
        saved.update((g, None) for g in grads if isinstance(g, torch.fx.Node) and g not in backward_nodes)

        forward = torch.fx.Graph()
        env: dict[torch.fx.Node, Any] = {}
        for node in graph.nodes:
            if node.op != "output" and node not in backward_nodes:  # the primals' placeholders included
                env[node] = forward.node_copy(node, lambda a: env[a])
        forward.output((*[_mapped(o, env) for o in outs], *[env[s] for s in saved]))
        self.forward = torch.fx.GraphModule(joint, forward)
        simplify(self.forward)

        backward = torch.fx.Graph()
        benv: dict[torch.fx.Node, Any] = {}
        for s in saved:
            benv[s] = backward.placeholder(f"saved_{s.name}")
        for c in cotangents:
            benv[c] = backward.placeholder(c.name)
        for node in graph.nodes:
            if node in backward_nodes and node.op == "call_function":
                benv[node] = backward.node_copy(node, lambda a: benv[a])
        backward.output(tuple(_mapped(g, benv) for g in grads))
        self.backward = torch.fx.GraphModule(joint, backward)
        simplify(self.backward)
        self.n_saved = len(saved)
        # What each call runs: the graphs' code with their aten ops called directly.
        self.run_forward, self.run_backward = direct_forward(self.forward), direct_forward(self.backward)

    def gradients(self, residuals: list[Any], grads: tuple[torch.Tensor | None, ...], n_inputs: int) -> list[Any]:
        """Per input, its gradient (None where not differentiated or not reached)."""
        cotangents = [_cotangent(grads[i], i) for i in self.cot_outputs]
        result: list[torch.Tensor | None] = [None] * n_inputs
        for p, g, reached in zip(self.diff, self.run_backward(*residuals, *cotangents), self.reached):
            result[p] = g if reached else None
        return result


def _mapped(value: Any, env: dict[torch.fx.Node, Any]) -> Any:
    return env[value] if isinstance(value, torch.fx.Node) else value


def _cotangent(g: torch.Tensor | None, i: int) -> torch.Tensor:
    # The backward graph was traced on contiguous cotangents (autograd may hand an expanded one).
    assert g is not None, f"autograd materializes the cotangent of output {i}"
    return g.contiguous()


def _fold(stack: torch.Tensor) -> torch.Tensor:
    """The sum of a stack's rows, left to right: the order in which autograd
    accumulates the threads executor's per-replica gradients of one tensor."""
    return reduce(operator.add, stack.unbind(0))


def run(
    program: ReplicaProgram, inputs: list[Any], written: frozenset[int] = frozenset(), copied: Sequence[Any] = ()
) -> tuple[torch.Tensor, ...]:
    """The program's outputs on ``inputs``, of which it writes those at
    ``written`` in place (none requiring grad); recorded by autograd as one
    node when grad mode is on and an input requires grad. ``copied``: the
    caller's tensors that inputs are stacked copies of (their backward refuses
    to run if they were written since, as for a saved tensor)."""
    graph = program.graph
    assert graph is not None, "run a traced program"
    tensors = [i for i in inputs if isinstance(i, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        watched = tuple((t, t._version) for t in copied if isinstance(t, torch.Tensor) and not t.is_inference())
        return _StackedCall.apply(program, written, watched, *inputs)
    return tuple(graph(*inputs))


def _copy_as_is(t: torch.Tensor) -> torch.Tensor:
    """A copy with ``t``'s strides: a program traced for that layout runs on it."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


class _StackedCall(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, program: ReplicaProgram, written: frozenset[int], watched: tuple[Any, ...], *inputs: Any
    ) -> tuple[torch.Tensor, ...]:
        assert program.graph is not None
        ctx.program = program
        ctx.written = written
        ctx.watched = watched
        ctx.tensor_positions = [k for k, i in enumerate(inputs) if isinstance(i, torch.Tensor)]
        ctx.others = [None if isinstance(i, torch.Tensor) else i for i in inputs]
        # After a first backward, the forward keeps what the backward reads (the split's
        # residuals) instead of having it recompute the forward.
        diff = tuple(k for k in ctx.tensor_positions if inputs[k].requires_grad)
        use_split = program.splits and not program.outputs_view_written
        split = program.splits.get(split_key(diff, list(inputs))) if use_split else None
        # A backward that recomputes the forward (the first one) reads the inputs it wrote as
        # they were before. Later calls keep residuals instead and save no written input (a
        # create_graph backward of theirs, which would recompute, refuses: ``_backward``).
        before = {k: _copy_as_is(inputs[k]) for k in written} if split is None else {}
        ctx.saved_positions = [k for k in ctx.tensor_positions if split is None or k not in written]
        residuals: list[Any] = []
        if split is None:
            outs = tuple(program.graph(*inputs))
            if written and not program.outputs_view_written:
                written_inputs = [inputs[k] for k in written]
                written_storages = {_storage_key(t) for t in written_inputs}
                program.outputs_view_written = any(
                    _storage_key(o) in written_storages and not any(o is t for t in written_inputs) for o in outs
                )
        else:
            values = tuple(split.run_forward(*inputs))
            outs, residuals = values[: split.n_outs], list(values[split.n_outs :])
        ctx.split = split
        ctx.residual_positions = [k for k, r in enumerate(residuals) if isinstance(r, torch.Tensor)]
        ctx.residual_others = [None if isinstance(r, torch.Tensor) else r for r in residuals]
        draw_graphs = _RandomGraphs.of_forward(program, keep=split is not None)
        ctx.draw_graphs = draw_graphs
        # The inputs too: a backward with create_graph=True differentiates the recomputed forward.
        ctx.save_for_backward(
            *[before.get(k, inputs[k]) for k in ctx.saved_positions],
            *[residuals[k] for k in ctx.residual_positions],
            *draw_graphs.to_save(),
        )
        # As the threads executor's node: outputs alias their values but are not views for autograd.
        outs = tuple(o.detach() for o in outs)
        # The first backward recomputes what it reads: it checks that the caller has not
        # written an output it reads since (as autograd checks a saved output's version).
        ctx.out_versions = tuple((weakref.ref(o), o._version) for o in outs) if split is None else ()
        ctx.mark_non_differentiable(*[o for o, rg in zip(outs, program.out_requires_grad) if not rg])
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if _batched_cotangents.is_batched(grads):  # (autograd.grad(..., is_grads_batched=True))
            return _batched_cotangents.per_cotangent(grads, lambda one: _StackedCall._one_backward(ctx, one))
        return _StackedCall._one_backward(ctx, grads)

    @staticmethod
    def _one_backward(ctx: Any, grads: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
        for t, version in ctx.watched:
            if t._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a {tuple(t.shape)} {t.dtype} tensor (a shard of an argument of a stacked pmap "
                    f"call, which autograd saved) is at version {t._version}; expected version {version} instead."
                )
        saved = ctx.saved_tensors
        n_inputs, n_residuals = len(ctx.saved_positions), len(ctx.residual_positions)
        draw_graphs: _RandomGraphs = ctx.draw_graphs
        try:
            # A recomputed forward draws the forward's numbers again; a draw's backward reads its graphs.
            with draw_graphs.replaying(saved[n_inputs + n_residuals :]):
                return _StackedCall._backward(ctx, saved[:n_inputs], saved[n_inputs : n_inputs + n_residuals], grads)
        except Exception as e:
            from ._stacked import Unsupported  # it imports this module

            if isinstance(e, Unsupported):  # the forward ran stacked: no executor to fall back to now
                raise RuntimeError(
                    f"torchpmap: the backward of a stacked pmap call cannot run: {e.reason}. Run that call on "
                    "the threads executor (torchpmap.set_executor('threads'))."
                ) from None
            raise

    @staticmethod
    def _backward(
        ctx: Any, saved_inputs: tuple[torch.Tensor, ...], saved_residuals: tuple[torch.Tensor, ...], grads: Any
    ) -> tuple[torch.Tensor | None, ...]:
        program: ReplicaProgram = ctx.program
        inputs = list(ctx.others)
        for k, t in zip(ctx.saved_positions, saved_inputs):
            inputs[k] = t
        if ctx.split is None:  # a recomputed forward writes these: into copies, the saved ones serve again
            for k in ctx.written:
                inputs[k] = _copy_as_is(inputs[k])
        diff = tuple(k for k in range(len(inputs)) if ctx.needs_input_grad[k + 3])
        if torch.is_grad_enabled() and ctx.written and ctx.split is not None:
            raise RuntimeError(
                "torchpmap: create_graph=True through a stacked pmap call that writes its inputs in place, "
                "after its first call: the forward kept no copy of them to recompute it from. Run that call on "
                "the threads executor (torchpmap.set_executor('threads'))."
            )
        # A vjp program (a create_graph=True backward's) differentiates by recomputing, as before.
        if not torch.is_grad_enabled() and diff and program.folded is None:
            split: ResidualSplit | None = ctx.split
            if split is None:  # the first backward: trace the split, recompute the forward once
                cot_outputs = [i for i, rg in enumerate(program.out_requires_grad) if rg]
                cots = [_cotangent(grads[i], i) for i in cot_outputs]
                split = program.split(diff, inputs, cots, ctx.written)
                values = list(split.run_forward(*inputs))
                residuals = values[split.n_outs :]
                _check_outputs_unwritten(ctx.out_versions, values[: split.n_outs], residuals)
            else:
                residuals = list(ctx.residual_others)
                for k, t in zip(ctx.residual_positions, saved_residuals):
                    residuals[k] = t
            return (None, None, None, *split.gradients(residuals, grads, len(inputs)))
        # As on threads: an output the caller did not use has zero cotangents (materialized by autograd).
        cotangents = tuple(i for i, g in enumerate(grads) if g is not None and program.out_requires_grad[i])
        result: list[torch.Tensor | None] = [None] * len(inputs)
        if diff and cotangents:
            vjp_inputs = [*inputs, *[grads[i] for i in cotangents]]
            vjp = program.vjp(diff, cotangents, vjp_inputs, ctx.written)
            vjp.trace(vjp_inputs)  # the first time: captured here, where it is needed
            assert vjp.reached is not None  # a vjp program's, filled in by its trace
            for p, g, reached in zip(diff, run(vjp, vjp_inputs, ctx.written), vjp.reached.flags):
                result[p] = g if reached else None
        return (None, None, None, *result)


def _check_outputs_unwritten(
    versions: tuple[tuple[weakref.ref[torch.Tensor], int], ...], outs: list[Any], residuals: list[Any]
) -> None:
    """Raise as autograd does for a saved tensor written in place when the
    caller wrote output i since the forward (its version moved) and the
    backward reads its memory (the recomputed output shares storage with a
    residual). An output the caller dropped is not checked."""
    storages = {_storage_key(r) for r in residuals if isinstance(r, torch.Tensor)} - {None}
    for i, ((ref, version), recomputed) in enumerate(zip(versions, outs)):
        out = ref()
        if out is None or out._version == version or not isinstance(recomputed, torch.Tensor):
            continue
        if _storage_key(recomputed) in storages:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: output {i} of a stacked pmap call, a {tuple(out.shape[1:])} {out.dtype} tensor per "
                f"replica, is at version {out._version}; expected version {version} instead."
            )


class _RandomGraphs:
    """A differentiable stacked call's random state, from its forward to its
    backward: the call's streams (``Replay``: a backward that recomputes the
    forward draws the same numbers again) and, when the forward kept its
    residuals, each draw's per-replica autograd graphs that the backward reads
    (the dropout masks, as a threads replica's own graph keeps them). They go
    through ``save_for_backward``, so autograd frees them after a backward as it
    frees any saved tensor (and a saved tensor keeps its autograd graph through
    saved-tensor hooks)."""

    def __init__(self, replay: _stacked_random.Replay | None, graphs: _stacked_random.Graphs) -> None:
        self.replay = replay
        self.layout: list[tuple[int, list[tuple[int, int]]]] = []  # per site: its key, per replica (inputs, outputs)
        self.tensors: list[torch.Tensor] = []
        for key, per_replica in graphs.items():
            self.layout.append((key, [(len(leaves), len(outs)) for leaves, outs in per_replica]))
            for leaves, outs in per_replica:
                self.tensors.extend(leaves)
                self.tensors.extend(outs)

    @classmethod
    def of_forward(cls, program: ReplicaProgram, keep: bool) -> _RandomGraphs:
        """Those of the forward running now; its graphs only if ``keep`` (the
        backward reads them, rather than recomputing the forward)."""
        if not program.draws:
            return cls(None, {})
        streams = _stacked_random.current()
        return cls(streams.replay(), streams.take_graphs() if keep else {})

    def to_save(self) -> list[torch.Tensor]:
        tensors, self.tensors = self.tensors, []  # from now on held by autograd only
        return tensors

    def replaying(self, saved: tuple[torch.Tensor, ...]) -> Any:
        if self.replay is None:
            return nullcontext()
        graphs: _stacked_random.Graphs = {}
        it = iter(saved)
        for key, sizes in self.layout:
            graphs[key] = [([next(it) for _ in range(a)], [next(it) for _ in range(b)]) for a, b in sizes]
        return _stacked_random.replaying(self.replay, graphs)
