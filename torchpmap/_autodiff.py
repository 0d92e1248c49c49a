"""Autograd through a pmap call.

Each replica builds its own autograd graph on its worker thread. pmap hides
those graphs behind one autograd Function whose backward runs every replica's
backward pass on its worker, concurrently and with the named axis bound again,
so the collectives' backward rules (psum of the cotangent, ...) communicate
exactly like the forward collectives did.

The Function's inputs are the caller-side tensors that each replica's leaves
stand for: its slice of a mapped argument, a broadcast argument, its shard, or
a tensor the function captured instead of taking as an argument (found by
walking the replica's graph). The caller's autograd then stacks the slices and
sums the broadcast gradients itself.

With create_graph=True the backward is itself such a call: the replicas
differentiate with create_graph=True, and their gradients are hidden behind a
new Function whose inputs are the first one's inputs and the cotangents. So a
derivative of any order runs in the replicas with the axis bound, where the
collectives' backward rules can communicate.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.autograd.graph import Node
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import TreeSpec, tree_map_only

from . import _batched_cotangents, _ops
from ._compile import DYNAMO_GATE
from ._torch_originals import original
from .distributed import backward_runs, tell_peers_a_run_failed

if TYPE_CHECKING:
    from ._call import CallRecord, Executor, ReplicaGroup

# A replica's output, flattened: (leaves, tree structure).
FlatOutput: TypeAlias = "tuple[list[Any], TreeSpec]"
# Per replica, a list of tensors (or of gradients, which may be None).
TensorsPerReplica: TypeAlias = "list[list[torch.Tensor]]"
GradsPerReplica: TypeAlias = "list[list[torch.Tensor | None]]"
T = TypeVar("T")


def differentiable_call(executor: Executor, record: CallRecord) -> list[FlatOutput]:
    """Run ``record``'s replicas on ``executor`` so that the caller's autograd
    sees through them; one flattened output (leaves, spec) per replica.

    ``record.per_leaf[j][r]`` is replica r's value of input leaf j, as placed
    for it (a slice, a copy or a shard, recorded by the caller's autograd);
    ``record.grad_leaves`` are the leaves whose gradients the caller needs.
    The backward runs on the same executor (``run_replicas``), holding only
    ``record.group``, not the call's inputs.
    """
    n = record.n
    replica_inputs = record.replica_inputs()
    caller_inputs: TensorsPerReplica = [[] for _ in range(n)]  # per replica: the placed values that need grad
    leaves: TensorsPerReplica = [[] for _ in range(n)]  # per replica: the leaves standing for them in its graph
    for j in record.grad_leaves:
        for r in range(n):
            value = replica_inputs[r][j]
            leaf = value.detach().requires_grad_()
            replica_inputs[r][j] = leaf
            caller_inputs[r].append(value)
            leaves[r].append(leaf)

    run_record, stand_ins = _with_stand_ins(record)
    for r, mine in enumerate(stand_ins):  # each replica's leaves for the closed-over computed tensors
        caller_inputs[r] += record.reached_grads
        leaves[r] += mine
    flat = executor.run(run_record, replica_inputs)  # (leaves, spec) per replica
    tensor_slots = [[k for k, v in enumerate(flat[r][0]) if isinstance(v, torch.Tensor)] for r in range(len(flat))]
    outputs = [[flat[r][0][k] for k in slots] for r, slots in enumerate(tensor_slots)]
    shared, per_replica = _shared_inputs(record, bool(stand_ins), replica_inputs)
    hidden = _hide_replica_graphs(
        executor,
        record.group,
        caller_inputs,
        leaves,
        outputs,
        reached=record.reached_grads,
        shared_inputs=shared,
        named_shared=[*record.reached_named, *_broadcast_module_tensors(record)]
        if record.group.axis_size > record.n
        else None,
        per_replica=per_replica,
        stood_in={id(c) for c in record.reached_grads} if stand_ins else frozenset(),
        compiled=record.compile_options is not None,
    )
    if hidden is not None:
        for r, slots in enumerate(tensor_slots):
            for k, t in zip(slots, hidden[r]):
                flat[r][0][k] = t
    return flat


def _shared_inputs(
    record: CallRecord, with_stand_ins: bool, replica_inputs: list[list[Any]]
) -> tuple[dict[int, str], set[int]]:
    """In a call across processes: the positions of the node's inputs that every
    replica shares (broadcast arguments, stand-ins' closed-over tensors), each named
    as every process names it; and the ids of the tensors PerReplica arguments hold
    (each replica's own). Nothing in one process."""
    if record.group.axis_size == record.n:
        return {}, set()
    from ._call import Placement  # (not at the top: _call imports this module)

    shared = {
        k: f"argument leaf {j}" for k, j in enumerate(record.grad_leaves) if record.placements[j] is Placement.BROADCAST
    }
    if with_stand_ins:
        names = {id(t): name for name, t in record.reached_named}
        base = len(record.grad_leaves)
        shared.update((base + i, names[id(c)]) for i, c in enumerate(record.reached_grads) if id(c) in names)
    per_replica: set[int] = set()
    for j, placement in enumerate(record.placements):
        if placement is Placement.PER_REPLICA:
            for inputs in replica_inputs:
                value = inputs[j]
                held = [*value.parameters(), *value.buffers()] if isinstance(value, torch.nn.Module) else [value]
                per_replica.update(id(t) for t in held if isinstance(t, torch.Tensor))
    return shared, per_replica


def named_grad_tensors(name: str, obj: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors requiring grad that ``obj`` stands for, named from ``name``: a
    module's parameters and buffers by their own names, a tensor by ``name``."""
    if isinstance(obj, torch.nn.Module):
        pairs = [*obj.named_parameters(), *obj.named_buffers()]
        return [(f"{name}.{key}", t) for key, t in pairs if t.requires_grad]
    if isinstance(obj, torch.Tensor) and obj.requires_grad:
        return [(name, obj)]
    return []


def _broadcast_module_tensors(record: CallRecord) -> list[tuple[str, torch.Tensor]]:
    """The tensors requiring grad of the modules passed as broadcast arguments,
    named by the argument's position (shared, like closed-over ones)."""
    from ._call import Placement  # (not at the top: _call imports this module)

    named = []
    for j, (leaf, placement) in enumerate(zip(record.caller_leaves, record.placements)):
        if placement is Placement.BROADCAST and isinstance(leaf, torch.nn.Module):
            named += named_grad_tensors(f"argument leaf {j}", leaf)
    return named


def _with_stand_ins(record: CallRecord) -> tuple[CallRecord, TensorsPerReplica]:
    """``record`` whose replicas see, for each computed tensor they reach without
    being passed it (``c = w + 1`` closed over), a leaf of their own standing for
    it, and those leaves per replica (none without such tensors). A replica's graph
    then stops at its stand-in: differentiated at ``c`` and at ``w`` too (also
    closed over), it would otherwise run c's history, adding the path through c to
    w's gradient, which the caller's backward adds again from c's gradient."""
    if not record.reached_grads:
        return record, []
    programs = record.programs
    if record.compile_options is not None:
        # Dynamo would trace the mode's substitutions (by identity) into the graph.
        warnings.warn(
            f"torchpmap: {record.group.label} with compile= closes over tensors computed before the call "
            f"that require grad; with autograd through the call its replicas run eagerly, so that their "
            f"gradients stop at those tensors",
            RuntimeWarning,
            stacklevel=4,
        )
        programs = [record.fun] * record.n
    stand_ins = [[c.detach().requires_grad_() for c in record.reached_grads] for _ in range(record.n)]

    def program_of(rank: int) -> Callable[..., Any]:
        program, mode = programs[rank], _StandIns(record.reached_grads, stand_ins[rank])

        def with_stand_ins(*args: Any, **kwargs: Any) -> Any:
            _ops.stand_ins.by_id = mode.by_id
            try:
                with mode:
                    return program(*args, **kwargs)
            finally:
                _ops.stand_ins.by_id = None

        return with_stand_ins

    return dataclasses.replace(record, programs=[program_of(r) for r in range(record.n)]), stand_ins


class _StandIns(TorchFunctionMode):
    """Every op a replica runs gets its stand-in leaf in place of a closed-over computed tensor."""

    def __init__(self, originals: Sequence[torch.Tensor], stand_ins: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.by_id = {id(c): s for c, s in zip(originals, stand_ins)}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        args, kwargs = tree_map_only(torch.Tensor, lambda t: self.by_id.get(id(t), t), (args, kwargs or {}))
        return original(func)(*args, **kwargs)  # (a user's replacement would run again: _torch_originals)


def _hide_replica_graphs(
    executor: Executor,
    group: ReplicaGroup,
    caller_inputs: TensorsPerReplica,
    leaves: TensorsPerReplica,
    outputs: TensorsPerReplica,
    shared: bool = False,
    caller_streams: list[torch.cuda.Stream | None] | None = None,
    reached: Sequence[torch.Tensor] = (),
    shared_inputs: dict[int, str] | None = None,
    named_shared: Sequence[tuple[str, torch.Tensor]] | None = None,
    per_replica: set[int] | frozenset[int] = frozenset(),
    stood_in: set[int] | frozenset[int] = frozenset(),
    compiled: bool = False,
) -> TensorsPerReplica | None:
    """``outputs[r]``, which replica r recorded from ``leaves[r]`` (standing for
    ``caller_inputs[r]``), as tensors the caller's autograd differentiates
    through the replicas; None when no output requires grad. ``reached``:
    tensors made before the call that the function reaches without being
    passed them (closed over), which the replicas' graphs may use.
    ``shared_inputs``: in a call across processes, the positions in
    ``caller_inputs[r]`` of the values every replica shares, named alike on every
    process; ``named_shared``: the tensors requiring grad the function reaches
    without being passed them, named so (None: none new, as in a backward's node);
    ``per_replica``: the ids of the tensors that PerReplica arguments hold."""
    if not any(o.requires_grad for per in outputs for o in per):
        return None
    shared_slots = dict(shared_inputs or {})
    captured_per_replica = [_captured_leaves(per, leaves[r], reached) for r, per in enumerate(outputs)]
    if group.axis_size > len(group.devices) and named_shared is not None:
        added = _add_named_shared(caller_inputs, leaves, captured_per_replica, named_shared, per_replica, shared_slots)
        captured_per_replica = [[t for t in captured if id(t) not in added] for captured in captured_per_replica]
    for r, captured in enumerate(captured_per_replica):
        if stood_in and any(id(t) in stood_in for t in captured):
            _refuse_bypassed_stand_in(next(t for t in captured if id(t) in stood_in))
        if captured:
            _refuse_hooks(captured)
            leaves[r] = [*leaves[r], *captured]
            caller_inputs[r] = [*caller_inputs[r], *captured]
    graphs = _ReplicaGraphs(
        executor, group, leaves, outputs, [len(c) for c in caller_inputs], shared, caller_streams, compiled
    )
    graphs.summed_across_processes = shared_slots
    _refuse_dual_inputs(caller_inputs, outputs)
    flat_outputs = _ThroughReplicas.apply(graphs, *[t for per in caller_inputs for t in per])
    return _split(list(flat_outputs), [len(per) for per in outputs])


def _refuse_dual_inputs(caller_inputs: TensorsPerReplica, outputs: TensorsPerReplica) -> None:
    """Autograd through a call is one Function with no forward-mode rule: refuse tangents,
    rather than PyTorch's "implement the jvp function" about our Function (an input that
    requires grad carries one) or outputs whose tangents it would drop, silently (another
    input carries one)."""
    if _forward_ad._current_level < 0:
        return
    tensors = [t for per in (*caller_inputs, *outputs) for t in per]
    if any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            "pmap: an input carries a forward-mode tangent (forward_ad.make_dual, torch.func.jvp) while "
            "autograd records the call (an input requires grad): autograd through a pmap call has no "
            "forward-mode rule, so forward and reverse mode cannot be mixed through the call. Pass detached "
            "inputs (x.detach()) for forward mode, drop the tangents for reverse mode, or apply both transforms "
            "inside the pmapped function."
        )


def _refuse_bypassed_stand_in(c: torch.Tensor) -> None:
    """A replica's graph reached a closed-over computed tensor itself, not its
    stand-in (an autograd.Function took it directly): its history would run in
    the replica, and a tensor it was computed from could get that path's gradient twice."""
    raise RuntimeError(
        f"pmap: the function passes a tensor of shape {tuple(c.shape)} that it closes over, computed before the "
        f"call and requiring grad, directly to an autograd.Function; autograd through the call cannot stop at it "
        f"there. Pass it as an argument (in_axes=None), or compute it inside the function"
    )


def _add_named_shared(
    caller_inputs: TensorsPerReplica,
    leaves: TensorsPerReplica,
    captured_per_replica: TensorsPerReplica,
    named_shared: Sequence[tuple[str, torch.Tensor]],
    per_replica: set[int] | frozenset[int],
    shared_slots: dict[int, str],
) -> set[int]:
    """Across processes, every replica is differentiated at every tensor the function
    reaches by name, whether or not this process's replicas used it (another's may
    have: every process must sum the same ones), and the sum pairs them by name. A
    tensor reached some other way could be neither paired nor known to be a
    replica's own: an error rather than a gradient of this process's replicas only.
    Returns the ids of the tensors added."""
    names = {id(t): name for name, t in named_shared}
    for captured in captured_per_replica:
        for t in captured:
            if id(t) not in names and id(t) not in per_replica:
                raise RuntimeError(
                    f"pmap: autograd through a call across processes reaches a tensor of shape {tuple(t.shape)} "
                    f"that requires grad and that the function was neither passed nor closes over where torchpmap "
                    f"looks (closures, globals, their modules' parameters), so its copies on the processes cannot "
                    f"be paired to sum its gradient; pass it as an argument (in_axes=None)"
                )
    present, added = {id(t) for t in caller_inputs[0]}, set()
    for name, t in named_shared:
        if id(t) in present or id(t) in added:
            continue  # a closed-over computed tensor, given already (its stand-ins)
        added.add(id(t))
        shared_slots[len(caller_inputs[0])] = name
        for r in range(len(caller_inputs)):
            leaves[r] = [*leaves[r], t]
            caller_inputs[r] = [*caller_inputs[r], t]
    return added


def _refuse_hooks(captured: list[torch.Tensor]) -> None:
    """Each replica differentiates its graph at the closed-over tensors, and
    the caller's backward reaches them again: their tensor hooks (and
    retain_grad) would run once per replica and once more."""
    for t in captured:
        if getattr(t, "_backward_hooks", None) or t.retains_grad:
            raise RuntimeError(
                f"pmap: the function closes over a tensor of shape {tuple(t.shape)} that has autograd hooks (or "
                f"retain_grad); on the threads executor they would run in every replica and once more. Pass the "
                f"tensor as an argument (in_axes=None for one every replica shares) instead"
            )


def _captured_leaves(
    outputs: list[torch.Tensor], known_leaves: list[torch.Tensor], reached: Sequence[torch.Tensor] = ()
) -> list[torch.Tensor]:
    """Tensors requiring grad, made before the call, that a replica's graph
    reaches but that were not passed as arguments: they came in through a
    closure. Leaves, and the non-leaf tensors of ``reached`` (``c = w * 2``
    closed over): the walk stops at those, which become inputs of the call's
    node, so the caller's backward runs their history once (every replica's
    would otherwise run it: twice is an error), and ``autograd.grad(out, c)``
    sees them. Without this the caller's backward would also run the replica's
    collective backward rules on its own thread, where no replica meets them."""
    known = {id(t) for t in known_leaves}
    # Non-leaf tensors the graph is differentiated at, by the edge into their node: (node, output number).
    boundary: dict[tuple[int, int], tuple[torch.Tensor, Node]] = {}
    for t in (*known_leaves, *reached):
        fn = t.grad_fn
        if fn is not None:
            boundary[(id(fn), t.output_nr)] = (t, fn)  # the node kept alive: its id stays its own
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[tuple[Node | None, int]] = [(o.grad_fn, o.output_nr) for o in outputs if o.grad_fn is not None]
    while stack:
        node, output_nr = stack.pop()
        if node is None:
            continue
        at = boundary.get((id(node), output_nr))
        if at is not None:
            if id(at[0]) not in known:
                found[id(at[0])] = at[0]
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if var is not None:
            if id(var) not in known:
                found[id(var)] = var
            continue
        stack.extend(node.next_functions)
    return list(found.values())


def _split(flat: list[Any], counts: list[int]) -> list[list[Any]]:
    """``flat`` cut into consecutive runs of ``counts[r]`` items."""
    out, start = [], 0
    for c in counts:
        out.append(flat[start : start + c])
        start += c
    return out


class _ReplicaGraphs:
    """The replicas' graphs behind one _ThroughReplicas node; dropped as soon
    as its backward has run (unless the graph is retained)."""

    def __init__(
        self,
        executor: Executor,
        group: ReplicaGroup,
        leaves: TensorsPerReplica,
        outputs: TensorsPerReplica,
        input_counts: list[int],
        shared: bool = False,
        caller_streams: list[torch.cuda.Stream | None] | None = None,
        compiled: bool = False,
    ) -> None:
        self.executor = executor  # the backward's tasks run where the forward ran
        self.compiled = compiled  # the replicas ran compile= programs
        self.group = group
        self.leaves = leaves  # per replica: what its graph is differentiated with respect to
        self.outputs = outputs  # per replica: its tensor outputs
        self.input_counts = input_counts  # per replica: how many of the node's inputs are its
        # True once a recorded backward (create_graph=True) links another node's
        # replica graphs to these: one backward pass can then traverse them from
        # both nodes, so neither may free the buffers the other still needs.
        self.shared = shared
        # The forward caller's CUDA streams (a node made in a backward inherits
        # them): the backward runs on the autograd engine's thread, whose current
        # streams on other devices are not the caller's.
        if caller_streams is None and any(d.type == "cuda" for d in group.devices):
            caller_streams = [torch.cuda.current_stream(d) if d.type == "cuda" else None for d in group.devices]
        self.caller_streams = caller_streams
        # In a call across processes, the positions of the inputs every replica shares (broadcast
        # arguments, closed-over tensors), by the name every process gives them: each process
        # holds its own copy of one value, whose gradient is the sum over every process's
        # replicas, not over this process's alone.
        self.summed_across_processes: dict[int, str] = {}

    def run(self, replica_fn: Callable[[int], T]) -> list[T]:
        with backward_runs():
            try:
                return self.executor.run_replicas(self.group, replica_fn, self.caller_streams)
            except Exception as e:
                if self.group.axis_size > len(self.group.devices):  # peers may wait in its exchanges
                    tell_peers_a_run_failed(e)
                raise

    def vjp(
        self, r: int, cotangents: list[torch.Tensor | None], keep: bool, create_graph: bool
    ) -> list[torch.Tensor | None]:
        """Replica r's gradients with respect to its leaves (None where unused)."""
        if self.caller_streams is not None:
            from ._call import used_on_this_stream  # (not at the top: _call imports this module)

            # Read on this worker's stream: a cotangent the caller made on a stream of its
            # own goes back to that stream's pool when the engine drops it, which does not
            # wait for this stream (the caller's streams do, see run_replicas).
            used_on_this_stream(cotangents)
        pairs = [(o, c) for o, c in zip(self.outputs[r], cotangents) if c is not None and o.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(self.leaves[r])
        if pairs:
            outs, cots = zip(*pairs)
            # Compiled replicas run their backward in turns, as a backward inside a replica
            # does (between compiled graphs, with the gate held): AOTAutograd compiles a
            # graph's backward at its first run, without a lock, and every worker would
            # compile the one backward graph they share at once (Inductor is not thread-safe).
            # A collective in it gives the gate up while it waits, as in the forward.
            gated = self.compiled and not DYNAMO_GATE.held()
            if gated:
                DYNAMO_GATE.enter()
            try:
                grads = list(
                    torch.autograd.grad(
                        outs,
                        self.leaves[r],
                        cots,
                        retain_graph=keep or self.shared,
                        create_graph=create_graph,
                        allow_unused=True,
                    )
                )
            finally:
                if gated:
                    DYNAMO_GATE.exit()
        if self.summed_across_processes:
            self._sum_shared_across_processes(r, grads, create_graph)
        return grads

    def _sum_shared_across_processes(self, r: int, grads: list[torch.Tensor | None], create_graph: bool) -> None:
        """The shared inputs' gradients summed over every replica of every process
        (one psum of them all), given to local replica 0; the caller's autograd
        adds the local replicas' gradients, so the others give none. Under
        create_graph a zero that is still recorded from the sum: the next
        order's backward must reach every replica's psum."""
        from .collectives import psum  # (not at the top: the collectives import the runtime)

        slots = _distinct_names(self.summed_across_processes)
        zeros = torch.zeros_like
        parts = {name: zeros(self.leaves[r][i]) if grads[i] is None else grads[i] for i, name in slots.items()}
        # And whether any replica had a gradient: none anywhere stays None, as in one process.
        present = torch.tensor([grads[i] is not None for i in slots], dtype=torch.int32)
        totals, anywhere = psum((parts, present), self.group.axis_name)  # the processes' copies pair by name
        for (i, name), used in zip(slots.items(), anywhere.tolist()):
            total = totals[name]
            if not used:
                grads[i] = None
            elif r == 0:
                # Every process holds this one gradient: a loss of it counts once, as an out_axes=None output.
                grads[i] = counted_once(total, self.group.first_index == 0) if create_graph else total
            elif create_graph:
                grads[i] = total.masked_fill(torch.ones((), dtype=torch.bool, device=total.device), 0)
            else:
                grads[i] = None


def _distinct_names(slots: dict[int, str]) -> dict[int, str]:
    """``slots`` with a name that comes again numbered by its occurrence: two tensors
    found under one name (each closure's own ``w``) would be one dict entry, and get
    one gradient. Every process finds them in the same order (the same code)."""
    count: dict[str, int] = {}
    out = {}
    for i, name in slots.items():
        count[name] = count.get(name, 0) + 1
        out[i] = name if count[name] == 1 else f"{name} ({count[name]})"
    return out


class _ThroughReplicas(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, graphs: _ReplicaGraphs, *caller_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.graphs = graphs
        ctx.save_for_backward(*caller_inputs)  # read only by a differentiable backward
        every = [o for per in graphs.outputs for o in per]
        outs = tuple(o.detach() for o in every)
        ctx.mark_non_differentiable(*[d for o, d in zip(every, outs) if not o.requires_grad])
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        graphs: _ReplicaGraphs | None = ctx.graphs
        if graphs is None:
            raise RuntimeError(
                "Trying to backward through a pmap call a second time; the replicas' "
                "graphs were freed after the first backward (use retain_graph=True "
                "to keep them)"
            )
        # backward(retain_graph=True) (gradcheck does it, as do users taking
        # several vjps) must keep the replicas' graphs for the next pass too.
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        if not keep:
            ctx.graphs = None
        if _batched_cotangents.is_batched(grads):
            # (is_grads_batched=True: each pass keeps the graphs for the next; dropped with ctx's reference)
            return _batched_cotangents.per_cotangent(
                grads, lambda one: _ThroughReplicas._backward(ctx, graphs, one, True)
            )
        return _ThroughReplicas._backward(ctx, graphs, grads, keep)

    @staticmethod
    def _backward(
        ctx: Any, graphs: _ReplicaGraphs, grads: tuple[torch.Tensor | None, ...], keep: bool
    ) -> tuple[torch.Tensor | None, ...]:
        cotangents = _split(list(grads), [len(per) for per in graphs.outputs])
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable too
            caller_inputs = _split(list(ctx.saved_tensors), graphs.input_counts)
            input_grads = _differentiable_vjp(graphs, caller_inputs, cotangents, keep)
        else:
            with torch.enable_grad():  # the replicas' default state: their fast path
                input_grads = graphs.run(lambda r: graphs.vjp(r, cotangents[r], keep, create_graph=False))
        return (None, *[g for per in input_grads for g in per])


def _differentiable_vjp(
    graphs: _ReplicaGraphs, caller_inputs: TensorsPerReplica, cotangents: GradsPerReplica, keep: bool
) -> GradsPerReplica:
    """The replicas' gradients, differentiable with respect to the node's
    inputs and to the cotangents: the replicas record their backward
    (create_graph=True), and a new node hides those graphs the way the first
    hides the forward's."""
    n = len(cotangents)
    next_callers: TensorsPerReplica = [list(caller_inputs[r]) for r in range(n)]
    next_leaves: TensorsPerReplica = [list(graphs.leaves[r]) for r in range(n)]
    replica_cotangents: GradsPerReplica = [[] for _ in range(n)]
    # A cotangent that requires grad (the caller's loss is nonlinear in the
    # output; gradgradcheck) becomes a leaf in its replica. If any does, every
    # replica's cotangents become leaves: a collective in the backward is
    # recorded only where its input requires grad, and every replica must then
    # meet in that collective's own backward.
    differentiable = any(c is not None and c.requires_grad for per in cotangents for c in per)
    for r in range(n):
        for out, c in zip(graphs.outputs[r], cotangents[r]):
            if differentiable and c is not None and out.requires_grad:
                leaf = c.detach().requires_grad_()
                next_callers[r].append(c)
                next_leaves[r].append(leaf)
                c = leaf
            replica_cotangents[r].append(c)
    grads: GradsPerReplica = graphs.run(lambda r: graphs.vjp(r, replica_cotangents[r], keep, create_graph=True))
    present = [[i for i, g in enumerate(per) if g is not None] for per in grads]
    outputs: TensorsPerReplica = [[g for g in per if g is not None] for per in grads]
    hidden = _hide_replica_graphs(
        graphs.executor,
        graphs.group,
        next_callers,
        next_leaves,
        outputs,
        shared=True,
        caller_streams=graphs.caller_streams,
        shared_inputs=graphs.summed_across_processes,  # next_callers[r] begins with caller_inputs[r]
        compiled=graphs.compiled,
    )
    if hidden is None:  # no gradient depends on anything that requires grad
        return grads
    graphs.shared = True
    for r in range(n):
        for i, t in zip(present[r], hidden[r]):
            grads[r][i] = t
    return grads


class _CountedOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seeds: bool) -> torch.Tensor:
        ctx.seeds = seeds
        return x.clone()  # not a view: the caller may update the output in place

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Zeros, not None: this process's replicas still run their backward, whose
        # collectives the other processes' replicas wait for.
        return (grad if ctx.seeds else torch.zeros_like(grad)), None


def counted_once(x: torch.Tensor, seeds: bool) -> torch.Tensor:
    """An out_axes=None output of a call across processes, as autograd should
    see it: every process holds the one value and differentiates it, and in one
    process it counts once; so only the process of the axis's replica 0
    (``seeds``) passes its cotangent to the replicas (else each process's
    backward would add one more, the gradient P times the true one)."""
    return _CountedOnce.apply(x, seeds)
