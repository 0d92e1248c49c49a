"""The lockstep executor: one host thread runs every replica, piece by piece.

For replicas on distinct devices (several GPUs; virtual CPU devices work too).
The per-replica function is captured once per guard set, as for the stacked
executor (``_stacked``: Dynamo, ``fullgraph=True``, static shapes, collectives
and ``axis_index`` as opaque nodes), but its backend makes a plain per-replica
graph, ``make_fx(graph)`` on replica 0's inputs, which spells every collective
as one ``torchpmap`` op node, those of a ``torch.func.grad`` backward included.
That graph is cut at those nodes into a plan (``_Plan``) of steps:

* ``_Compute``: a segment of ordinary ops, run for replica 0, 1, ..., n-1 on
  that replica's values (a copy of the segment per device when the devices
  differ, its device constants moved there);
* ``_Exchange``: a collective, computed on the list of every replica's input by
  the group's backend (``LocalBackend``, or ``ProcessGroupBackend`` across
  processes): the same computation the threads executor's rendezvous does;
* ``_AxisIndex``: each replica's own index.

No thread waits for another and nothing waits for a device: on CUDA every op is
queued on each device's current stream (a copy between devices orders the two
streams), so one thread keeps every device busy.

Dynamo runs the captured function on replica 0's inputs (its guards check
them); the backend's callable finds every replica's inputs by the identity of
replica 0's (a thread-local gives them), runs the plan and hands Dynamo replica
0's outputs, which the runner maps back to every replica's by identity.
Everything outside the scope falls back to the threads executor, with a
RuntimeWarning once per function and reason.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar, cast

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from . import _escapes, _forward_ad, _ops, _outside_views, _uncounted_writes, _value_checks
from ._autodiff import FlatOutput
from ._call import CallRecord
from ._communicator import Collective, GroupBackend, LocalBackend, mismatch_error
from ._compile import DYNAMO_GATE, Backend, arguments_share_memory, capture_config, requested_backend
from ._devices import physical_device
from ._graph_passes import simplify
from ._identity_map import WeakIdentityMap
from ._recapture_watch import RecaptureWatch
from ._runtime import add_replica_note
from ._stacked import (
    CapturedExecutor,
    Unsupported,
    _CaptureFrame,
    _unsupported_inside,
    _written_inputs,
    call_signature,
    capture_failure,
    capture_key,
    capture_scope,
    capture_scope_reason,
    check_supported_ops,
    compile_graph,
    compile_per_replica,
    refuse_numpy_outputs,
    refuse_replaced_torch_functions,
    refuse_value_guards,
    reusable_after_failures,
    trampoline_entry,
)
from ._tree import flatten
from ._view_roots import view_root

T = TypeVar("T")

# The collective ops as a make_fx graph spells them, by the name _ops gives them.
_COLLECTIVE_OPS = {getattr(_ops.OPS, name).default: name for name in _ops._KERNELS}
_AXIS_INDEX = _ops.OPS.axis_index.default
# How Dynamo returns a Python number computed in the graph.
_NUMBER_OUTPUTS = (torch.ops.aten.scalar_tensor.default,)


def unsupported_reason(record: CallRecord) -> str | None:
    """Why ``record`` cannot run in lockstep, checked before any capture; None if it may."""
    if record.group.new_backend is None:
        return "the replica group has no backend to call the collectives on"
    if torch.is_grad_enabled() and record.grad_leaves:
        return "autograd through the call (an input requires grad)"
    if record.compile_options is not None and record.compile_options.get("dynamic"):
        return "compile= with dynamic=True (lockstep capture is for static shapes)"
    return capture_scope_reason(record)


# -- the plan ----------------------------------------------------------------------------
# Each value of a call lives in a slot of a per-replica list: the graph's inputs first.
@dataclass(frozen=True, slots=True)
class _Compute:
    programs: tuple[Callable[..., Any], ...]  # per replica: the segment on its device
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Exchange:
    collective: Collective
    input: int
    output: int


@dataclass(frozen=True, slots=True)
class _AxisIndex:
    devices: tuple[torch.device, ...]  # per replica, where its index goes
    output: int


_Step: TypeAlias = "_Compute | _Exchange | _AxisIndex"


@dataclass(frozen=True, slots=True)
class _Plan:
    steps: tuple[_Step, ...]
    dead_after: tuple[tuple[int, ...], ...]  # per step, the slots nobody reads after it
    slots: int
    inputs: int
    outputs: tuple[int | None, ...]  # the graph's outputs (None: a None output)
    compiled: bool = False  # compile=: its segments were compiled for inputs that share no memory


class _PlanBuilder:
    """Cuts a make_fx graph into a ``_Plan``, in graph order."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        axis_name: str,
        devices: Sequence[torch.device],
        compiler: Backend | None = None,
    ) -> None:
        self.gm, self.axis_name, self.devices = gm, axis_name, list(devices)
        self.compiler = compiler  # compile=: each segment compiled once per physical device
        self.slot: dict[torch.fx.Node, int] = {}
        self.steps: list[_Step] = []
        self.pending: list[torch.fx.Node] = []

    def build(self) -> _Plan:
        outputs: tuple[int | None, ...] = ()
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self._new_slot(node)
            elif node.op == "output":
                self._flush()
                outputs = self._outputs(node)
            elif node.op == "call_function" and node.target in _COLLECTIVE_OPS:
                self._flush()
                self._exchange(node)
            elif node.op == "call_function" and node.target is _AXIS_INDEX:
                self._flush()
                self._axis_index(node)
            else:
                self.pending.append(node)
        inputs = sum(1 for n in self.gm.graph.nodes if n.op == "placeholder")
        compiled = self.compiler is not None
        return _Plan(tuple(self.steps), self._dead_after(outputs), len(self.slot), inputs, outputs, compiled)

    def _new_slot(self, node: torch.fx.Node) -> int:
        self.slot[node] = len(self.slot)
        return self.slot[node]

    def _check_axes(self, axes: str) -> None:
        if any(name != self.axis_name for name in axes.split(_ops.AXIS_SEP)):
            # The threads executor raises the NameError of an unbound axis name.
            raise Unsupported("a collective over an axis name the call does not bind")

    def _exchange(self, node: torch.fx.Node) -> None:
        name = _COLLECTIVE_OPS[node.target]
        x, *args = node.args
        if node.kwargs or not isinstance(x, torch.fx.Node):
            raise Unsupported(f"a {name} node of an unexpected form")
        # A graph node's arguments are as the op's schema types them (OpArg).
        axes, collective = _ops.collective_of(name, *cast("list[_ops.OpArg]", args))
        self._check_axes(_ops.encode_axes(axes))
        self.steps.append(_Exchange(collective, self.slot[x], self._new_slot(node)))

    def _axis_index(self, node: torch.fx.Node) -> None:
        axes, device = node.args
        assert isinstance(axes, str) and isinstance(device, torch.device)  # the op's schema
        self._check_axes(axes)
        first = self.devices[0]
        per_replica = tuple(d if device == first else device for d in self.devices)
        self.steps.append(_AxisIndex(per_replica, self._new_slot(node)))

    def _flush(self) -> None:
        """The pending nodes as one segment, a copy per physical device."""
        nodes, self.pending = self.pending, []
        if not nodes:
            return
        inside = set(nodes)
        inputs = [self.slot[a] for a in _inputs_from_outside(nodes, inside)]
        leaving = [n for n in nodes if any(user not in inside for user in n.users)]
        first = self.devices[0]
        # A compiled segment takes its inputs as unrelated tensors: one that writes a view
        # of a tensor it also reads (made before a collective cut them apart) would read
        # the old values. Such a segment runs as traced (eagerly) instead.
        # So does one with a symbolic value (an integer read by ``.item()``, a shape it decides),
        # for which there are no example inputs to compile with.
        compiled = (
            self.compiler is not None
            and not _writes_into_aliased_inputs(nodes, inside)
            and _static_values(nodes, inside)
        )
        per_device: dict[torch.device, Callable[..., Any]] = {}
        for d in dict.fromkeys(self.devices):
            segment = _segment(self.gm, nodes, inside, leaving, first, d)
            per_device[d] = self._compiled(segment, nodes, inside, first, d) if compiled else segment
        programs = tuple(per_device[d] for d in self.devices)
        self.steps.append(_Compute(programs, tuple(inputs), tuple(self._new_slot(n) for n in leaving)))

    def _compiled(
        self,
        segment: torch.fx.GraphModule,
        nodes: list[torch.fx.Node],
        inside: set[torch.fx.Node],
        first: torch.device,
        device: torch.device,
    ) -> Callable[..., Any]:
        """``segment`` compiled for ``device``, on example inputs with the shapes,
        strides and dtypes its inputs had when traced (their values do not matter)."""
        assert self.compiler is not None
        examples = []
        for a in _inputs_from_outside(nodes, inside):
            val = a.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise Unsupported("compile= over a segment that takes a value other than a tensor")
            where = device if val.device == first else val.device
            examples.append(torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=where))
        return compile_graph(self.compiler, segment, examples)

    def _outputs(self, node: torch.fx.Node) -> tuple[int | None, ...]:
        (values,) = node.args
        if not isinstance(values, (tuple, list)):
            raise Unsupported("the captured graph returns something other than tensors")
        slots: list[int | None] = []
        for v in values:
            if v is not None and not isinstance(v, torch.fx.Node):
                raise Unsupported("the captured graph returns something other than tensors")
            if v is not None and (not isinstance(v.meta.get("val"), torch.Tensor) or v.target in _NUMBER_OUTPUTS):
                # A number each replica computes (``.item()``): Dynamo returns it as a tensor
                # and makes replica 0's a number again, which would be every replica's.
                raise Unsupported("the function returns a Python number computed from a tensor")
            slots.append(None if v is None else self.slot[v])
        return tuple(slots)

    def _dead_after(self, outputs: tuple[int | None, ...]) -> tuple[tuple[int, ...], ...]:
        """Per step, the slots read last there (or written and never read): dropped
        after it, so that a call holds no more memory than the replicas would."""
        last: dict[int, int] = {}
        for k, step in enumerate(self.steps):
            reads = step.inputs if isinstance(step, _Compute) else (step.input,) if isinstance(step, _Exchange) else ()
            writes = step.outputs if isinstance(step, _Compute) else (step.output,)
            for s in (*reads, *writes):
                last[s] = k
        kept = set(outputs)
        dead: list[list[int]] = [[] for _ in self.steps]
        for s, k in last.items():
            if s not in kept:
                dead[k].append(s)
        return tuple(tuple(d) for d in dead)


def _static_values(nodes: list[torch.fx.Node], inside: set[torch.fx.Node]) -> bool:
    """Whether every value the segment takes or makes is a tensor of static shape and strides
    (or None): no SymInt, SymFloat or SymBool, as ``.item()`` and data-dependent shapes give."""
    for node in (*_inputs_from_outside(nodes, inside), *nodes):
        for value in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            if isinstance(value, torch.Tensor):
                if not all(type(d) is int for d in (*value.shape, *value.stride())):
                    return False
            elif type(value) not in (int, float, bool):
                return False
    return True


def _writes_into_aliased_inputs(nodes: list[torch.fx.Node], inside: set[torch.fx.Node]) -> bool:
    """Whether the segment writes in place while two of its inputs are views of one tensor."""
    roots = [view_root(a) for a in _inputs_from_outside(nodes, inside)]
    if len(set(roots)) == len(roots):
        return False
    return any(
        node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
        for node in nodes
    )


def _inputs_from_outside(nodes: list[torch.fx.Node], inside: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """The values a segment reads that other steps made, in first-use order."""
    seen: dict[torch.fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside:
                seen.setdefault(arg)
    return list(seen)


def _segment(
    gm: torch.fx.GraphModule,
    nodes: list[torch.fx.Node],
    inside: set[torch.fx.Node],
    leaving: list[torch.fx.Node],
    first: torch.device,
    device: torch.device,
) -> torch.fx.GraphModule:
    """``nodes`` of ``gm`` (traced on replica 0's device ``first``) as a module for a
    replica on ``device``: the device arguments and tensor constants that were on
    ``first`` moved there, so that its tensors are made where the threads would."""
    graph = torch.fx.Graph()
    env = {a: graph.placeholder(f"in_{k}") for k, a in enumerate(_inputs_from_outside(nodes, inside))}

    def retarget(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a == first else a

    for node in nodes:
        copied = env[node] = graph.node_copy(node, env.__getitem__)
        if device != first:
            copied.args = torch.fx.node.map_aggregate(copied.args, retarget)
            copied.kwargs = torch.fx.node.map_aggregate(copied.kwargs, retarget)
    graph.output(tuple(env[n] for n in leaving))
    segment = torch.fx.GraphModule(gm, graph)
    if device != first:
        for node in graph.nodes:
            value = getattr(segment, node.target) if node.op == "get_attr" else None
            if isinstance(value, torch.Tensor) and value.device == first:
                setattr(segment, node.target, value.to(device))
    return segment


# -- running a plan ------------------------------------------------------------------------
def _execute(plan: _Plan, envs: list[list[Any]], backend: GroupBackend, devices: Sequence[torch.device]) -> None:
    """Run every step for every replica; ``envs[r]`` holds replica r's slots. Replicas on
    virtual CPU devices compute with the intra-op threads the threads executor gives each
    (the caller's, split among the replicas): a kernel may round otherwise on another
    thread count (conv2d's backward on 1 thread and on 2), and the results must be the
    threads' bit for bit."""
    before = torch.get_num_threads()
    split = max(1, before // len(devices))
    if split == before or not any(d.type == "cpu" for d in devices):
        _execute_steps(plan, envs, backend, devices)
        return
    torch.set_num_threads(split)
    try:
        _execute_steps(plan, envs, backend, devices)
    finally:
        torch.set_num_threads(before)


def _execute_steps(plan: _Plan, envs: list[list[Any]], backend: GroupBackend, devices: Sequence[torch.device]) -> None:
    cuda = any(d.type == "cuda" for d in devices)
    local = isinstance(backend, LocalBackend)
    first = backend.first
    for step, dead in zip(plan.steps, plan.dead_after):
        if isinstance(step, _Compute):
            for r, env in enumerate(envs):
                # (A replica on the CPU beside GPUs, e.g. cuda:0 and cpu:0, has no CUDA device to make current.)
                try:
                    with torch.cuda.device(devices[r]) if devices[r].type == "cuda" else contextlib.nullcontext():
                        outs = step.programs[r](*[env[s] for s in step.inputs])
                except Exception as e:
                    add_replica_note(e, first + r, backend.devices[r])  # as the threads name the replica
                    raise
                for s, v in zip(step.outputs, outs):
                    env[s] = v
        elif isinstance(step, _Exchange):
            if cuda and not local:  # a process group reads the inputs outside the streams' order
                for d in {d for d in devices if d.type == "cuda"}:
                    torch.cuda.synchronize(d)
            xs = [env[step.input] for env in envs]
            _forward_ad.check_not_dual(step.collective, xs[0])
            _check_signatures(step.collective, xs)
            results = backend.run(step.collective, xs)
            for env, v in zip(envs, results):
                env[step.output] = _ops.as_kernel_result(v)  # as traced: the fake kernel's layout
        else:
            for r, env in enumerate(envs):
                env[step.output] = torch.full((), first + r, dtype=torch.int64, device=step.devices[r])
        for s in dead:
            for env in envs:
                env[s] = None


_ASSERTION = "Runtime assertion failed for expression "


def _broken_assumption(e: BaseException) -> str | None:
    """The expression of a runtime assertion the traced graph carries (``aten._assert_scalar``:
    what Dynamo assumed of an unbacked size), if ``e`` is its failure."""
    message = str(e) if isinstance(e, RuntimeError) else ""
    if not message.startswith(_ASSERTION):
        return None
    return message[len(_ASSERTION) :].split(" on node ")[0]


def _check_signatures(collective: Collective, xs: Sequence[torch.Tensor]) -> None:
    """Shapes that depend on the data (``x[x > 0]``) may differ between replicas."""
    shape, dtype = xs[0].shape, xs[0].dtype
    if any(x.shape != shape or x.dtype != dtype for x in xs):
        raise mismatch_error([collective.signature(x) for x in xs])


# -- the call state the backend's callable reads ------------------------------------------
@dataclass
class _CallState:
    record: CallRecord
    devices: tuple[torch.device, ...]  # physical, per replica
    replicas_of: dict[int, list[Any]]  # id(replica 0's value) -> every replica's
    keep: list[Any] = field(default_factory=list)  # keeps the ids above alive
    # The tensors the function reaches outside its arguments (globals, closures): one for every replica.
    shared: list[torch.Tensor] = field(default_factory=list)
    refused: Unsupported | None = None  # why this call (not its capture) cannot run in lockstep
    started: bool = False  # a replica's code ran: no fallback any more
    error: BaseException | None = None  # a replica's own exception
    ran: bool = False


_tls = threading.local()


def _current() -> _CallState:
    state: _CallState | None = getattr(_tls, "state", None)
    if state is None:
        raise Unsupported("the captured program ran outside a lockstep call")
    return state


class _Program:
    """The backend's callable for one guard set: the plan, run on every replica's inputs."""

    def __init__(self, plan: _Plan, uncounted: tuple[int, ...], writes_inputs: bool) -> None:
        self.plan = plan
        self.uncounted = uncounted  # the inputs it writes without a version count (batch_norm's statistics)
        self.writes_inputs = writes_inputs  # whether it writes an input in place (counted or not)

    def __call__(self, *args: Any) -> list[Any]:
        state = _current()
        n = len(state.devices)
        try:
            if len(args) != self.plan.inputs:
                raise Unsupported("the captured graph takes other inputs than Dynamo gives it")
            per_input = [self._replicas(state, a, n) for a in args]
            if self.plan.compiled and any(arguments_share_memory(tuple(v[r] for v in per_input), {}) for r in range(n)):
                raise Unsupported(
                    "compile= with two inputs of a replica that share memory (the same tensor passed twice, or "
                    "mapped and also whole): the compiled segments assume they do not"
                )
        except Unsupported as e:
            state.refused = e
            raise
        envs: list[list[Any]] = [[None] * self.plan.slots for _ in range(n)]
        for r, env in enumerate(envs):
            env[: len(per_input)] = [values[r] for values in per_input]
        new_backend = state.record.group.new_backend
        assert new_backend is not None  # unsupported_reason checked it
        backend = new_backend()  # made now: a process group numbers its runs
        state.started = True
        try:
            _execute(self.plan, envs, backend, state.devices)
        except BaseException as e:
            assumption = _broken_assumption(e)
            if assumption is not None and not self.writes_inputs and isinstance(backend, LocalBackend):
                # The capture assumed of a data-dependent size what this call's values break (a
                # replica's x[x > 0] has 1 element, which eager broadcasts): nothing was written and
                # no other process waits, so the threads run this call, as eager would.
                state.started = False
                state.refused = Unsupported(f"a capture's assumption about a data-dependent size ({assumption})", True)
                raise state.refused from None
            if assumption is not None and hasattr(e, "add_note"):  # Python 3.11+
                e.add_note(
                    "(an assumption the lockstep executor's capture made about a data-dependent size, which this "
                    "call's values break; it ran on, not again on the threads executor, because the function "
                    "writes its inputs in place or other processes take part. torchpmap.set_executor('threads') "
                    "runs it as eager does)"
                )
            state.error = e
            raise
        finally:
            for k in self.uncounted:  # so that the check of shared inputs sees these writes
                for t in {id(v): v for v in per_input[k]}.values():
                    _uncounted_writes.record(t)
        outs0: list[Any] = []
        for s in self.plan.outputs:
            if s is None:
                outs0.append(None)
                continue
            values = [env[s] for env in envs]
            if id(values[0]) not in state.replicas_of:  # an input handed back keeps its own
                state.replicas_of[id(values[0])] = values
                state.keep.append(values[0])
            outs0.append(values[0])
        state.ran = True
        return outs0

    @staticmethod
    def _replicas(state: _CallState, a: Any, n: int) -> list[Any]:
        """Every replica's value of the input replica 0 sees as ``a``: the same
        value for one the function closes over."""
        values = state.replicas_of.get(id(a)) if isinstance(a, torch.Tensor) else None
        if values is None:
            if isinstance(a, torch.Tensor):
                if torch.is_grad_enabled() and a.requires_grad:
                    raise Unsupported("autograd through the call (a tensor the function uses requires grad)")
                state.shared.append(a)  # a view of it is not a view of a replica's value
            return [a] * n
        for v in values[1:]:
            # Dynamo's guards checked replica 0's; the graph holds for the others if they look the same.
            if v.shape != a.shape or v.dtype != a.dtype or v.stride() != a.stride():
                raise Unsupported("the replicas' inputs differ in shape, dtype or strides")
        return values


# -- capture -------------------------------------------------------------------------------
def _backend(
    axis_name: str, devices: tuple[torch.device, ...], count: list[int], compiler: Backend | None
) -> Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]:
    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        count[0] += 1
        refuse_value_guards("lockstep")
        refuse_replaced_torch_functions(gm)
        _refuse_symbolic_floats(gm)
        state = _current()
        # What Dynamo was given as replica 0's value: the key's tensor (an alias of
        # ``vs[0]`` for an input, see _call_state), found among the tensors kept alive.
        given = {id(t): t for t in state.keep}
        differ = [given[k] for k, vs in state.replicas_of.items() if k in given and any(v is not vs[0] for v in vs[1:])]
        stored = _escapes.stored_replica_tensor(differ)
        if stored is not None:
            raise Unsupported(_escapes.refusal(stored))
        # The capture frame stays bound: a collective's backward checks its axis.
        # Away from Dynamo's tracing context: make_fx would otherwise trace in
        # Dynamo's fake mode and leave symbols in its shape environment.
        with DYNAMO_GATE.holding(), torch._guards.tracing(None):
            checked = _value_checks.checked(gm)  # one_hot's value check, which tracing drops, kept
            graph = make_fx(checked, tracing_mode="fake", _allow_non_fake_inputs=True)(*example_inputs)
        check_supported_ops(graph.graph, "lockstep")
        simplify(graph)  # each segment runs op by op per replica: no node that does nothing
        uncounted = _uncounted_writes.inputs_written_uncounted(graph.graph)
        writes = bool(uncounted or _written_inputs(graph))
        return _Program(_PlanBuilder(graph, axis_name, devices, compiler).build(), uncounted, writes)

    return backend


def _refuse_symbolic_floats(gm: torch.fx.GraphModule) -> None:
    """Refuse a capture that computes with a Python float it read from a tensor
    (``.item()``, or an int read so and divided): Dynamo traces such a number as
    a symbol and simplifies the arithmetic on it as algebra, so ``(s + c) - c``
    becomes ``s``, ``s - s`` and ``s * 0.0`` become 0 (for inf and nan too):
    not what Python's rounding gives on the threads. (Captures are static, so
    only such reads make symbolic floats; integer arithmetic is exact either way.)"""
    graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]  # HOPs' bodies too
    for node in (node for graph in graphs for node in graph.nodes):
        if isinstance(node.meta.get("example_value"), torch.SymFloat):
            raise Unsupported(
                "a Python float read from a tensor (.item()): Dynamo computes with it as a symbol, "
                "simplifying what Python would round"
            )


@dataclass
class _Capture:
    compiled: Callable[..., Any]
    frame: _CaptureFrame
    count: list[int]  # how many times the backend captured (Dynamo compiled) it
    failed: str | None = None  # why a capture failed: Dynamo may skip the code from then on
    failed_for: dict[Any, str] = field(default_factory=dict)  # as the stacked executor's capture
    recaptures: RecaptureWatch = field(default_factory=RecaptureWatch)


# Per function: its captures, per capture_key (the global axis size; the physical devices).
_captures: WeakIdentityMap[dict[tuple[Any, ...], _Capture]] = WeakIdentityMap()


def _capture_for(record: CallRecord, devices: tuple[torch.device, ...], signature: Any) -> _Capture:
    group = record.group
    options = record.compile_options
    key = capture_key(record, group.axis_size, devices)
    try:
        per_fun = _captures.setdefault(record.fun, {})
    except TypeError:
        raise Unsupported("the function cannot be weakly referenced (its captures could not be cached)") from None
    try:
        capture = per_fun.get(key)
    except TypeError:
        raise Unsupported("a compile= option is not hashable (captures are cached per options)") from None
    failed_for = reusable_after_failures(capture, signature)
    if failed_for is not None:
        count = [0]
        compiler = None if options is None else requested_backend(options)
        backend = _backend(group.axis_name, devices, count, compiler)
        compiled = compile_per_replica(trampoline_entry(record.fun), backend)
        frame = _CaptureFrame(group.axis_name, group.axis_size, devices[0])
        capture = per_fun[key] = _Capture(compiled, frame, count, failed_for=failed_for)
    assert capture is not None
    return capture


# -- the call ------------------------------------------------------------------------------
def _call_state(record: CallRecord, devices: tuple[torch.device, ...]) -> tuple[list[Any], _CallState]:
    """Replica 0's leaves, and the state that maps each to every replica's."""
    state = _CallState(record, devices, {})
    row0: list[Any] = []
    aliases: dict[int, torch.Tensor] = {}
    for values in record.per_leaf:
        first = values[0]
        if isinstance(first, torch.Tensor) and first.layout == torch.strided:
            # A fresh alias, not the tensor itself: a global that is replica 0's
            # tensor (``S.shards[0]``) must stay one value, not become each replica's.
            # (One that requires grad, in a call autograd does not record: a leaf that
            # does too, as a view made under no_grad would not.)
            alias = first.detach().requires_grad_() if first.requires_grad else first.view_as(first)
            first = aliases.setdefault(id(first), alias)
        row0.append(first)
        if not isinstance(first, torch.Tensor):
            continue
        state.keep.append(first)
        known = state.replicas_of.setdefault(id(first), list(values))
        if any(a is not b for a, b in zip(known, values)):
            raise Unsupported("two inputs are one tensor in replica 0 but not in the others")
    return row0, state


def run(record: CallRecord) -> list[FlatOutput]:
    """Run ``record`` in lockstep, or raise Unsupported (before any replica's code
    ran, except Python side effects); a replica's own exception once one has."""
    devices = tuple(physical_device(d) for d in record.group.devices)
    row0, state = _call_state(record, devices)
    signature = call_signature(record)
    capture = _capture_for(record, devices, signature)
    args, kwargs = record.unflatten(row0)
    before = capture.count[0]
    try:
        with capture_scope(capture, _tls, state, _ops.LOCKSTEP_SCOPE), capture_config(eager_rounding=True):
            out = capture.compiled(*args, **kwargs)
    except Exception as e:
        if state.started:
            if record.donated:
                record.release_donated()
            error = state.error if state.error is not None else e
            raise error from None
        if state.refused is not None:
            raise state.refused from None
        if isinstance(e, Unsupported):
            # This call's, not the capture's (its capture limit, say): marked failed, the
            # capture would give way to a new one, whose count starts again (unbounded).
            raise
        inner = _unsupported_inside(e)
        capture.failed = inner.reason if inner is not None else capture_failure(e)
        capture.failed_for.setdefault(signature, capture.failed)
        raise Unsupported(capture.failed) from None
    if record.donated:
        record.release_donated()
    capture.recaptures.after_call(capture.count[0], before, args, kwargs, record.fun, "lockstep")
    return _replica_outputs(out, state)


def _replica_outputs(out: Any, state: _CallState) -> list[FlatOutput]:
    if not state.ran:
        # No graph: nothing for the replicas to compute (the function returns its
        # inputs or constants), or Dynamo ran it eagerly on replica 0. Never trust that.
        raise Unsupported("the captured function has no graph to run")
    leaves, spec = flatten(out)
    refuse_numpy_outputs(leaves)
    n = len(state.devices)
    per_leaf = [_every_replica(v, state) if isinstance(v, torch.Tensor) else [v] * n for v in leaves]
    return [([values[r] for values in per_leaf], spec) for r in range(n)]


def _every_replica(leaf: torch.Tensor, state: _CallState) -> list[Any]:
    """Every replica's value of an output leaf: the graph's, or, for a view
    Dynamo takes outside the graph (``x.mT`` of an input: its bytecode takes
    the view of replica 0's value), the same view of each replica's value.
    Anything else (a tensor the function closes over, even one sharing an
    input's storage) is the same in every replica. See ``_outside_views``."""
    n = len(state.devices)
    known = state.replicas_of.get(id(leaf))
    if known is not None:
        return known
    if leaf.device.type == "meta" or leaf.is_sparse:
        return [leaf] * n
    bases = [vs for vs in state.replicas_of.values() if _outside_views.lies_within(leaf, vs[0])]
    if not bases:
        return [leaf] * n  # the same in every replica
    if any(_outside_views.lies_within(leaf, t) for t in state.shared):
        # A view of a global that shares memory with replica 0's value (``ref = x[0]``) looks the
        # same as a view of that value: which one it is decides every other replica's result.
        raise RuntimeError(
            "pmap: the lockstep executor ran the function, and cannot return its result: an output is a view "
            "that Dynamo takes outside the graph, of memory that a tensor the function reaches outside its "
            "arguments shares with an input; torchpmap.set_executor('threads') runs it"
        )
    base = bases[0]
    offset = _outside_views.byte_offset
    same_view = all(
        vs[r].untyped_storage().data_ptr() == base[r].untyped_storage().data_ptr()
        and offset(vs[r]) - offset(vs[0]) == offset(base[r]) - offset(base[0])
        for vs in bases
        for r in range(n)
    )
    same_view = same_view and all(b.stride() == base[0].stride() and b.shape == base[0].shape for b in base)
    shift = offset(leaf) - offset(base[0])
    views = [_outside_views.rebuilt(b, leaf, tuple(leaf.shape), leaf.stride(), offset(b) + shift) for b in base]
    if not same_view or any(v is None for v in views):  # the replicas have run: no fallback
        raise RuntimeError(
            "pmap: the lockstep executor ran the function, and cannot return its result: an output is a view "
            "that Dynamo takes outside the graph, of inputs whose memory is laid out differently in the replicas"
        )
    return views


LOCKSTEP = CapturedExecutor("lockstep", unsupported_reason, run)
