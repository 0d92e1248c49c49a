"""The stacked executor: every replica at once, as one batched graph.

When all replicas share one physical device (virtual CPU devices), their
inputs are rows of one (n, ...) buffer per input leaf, so one graph over those
buffers computes every replica, each collective an exchange along dim 0
(``_stacked_collectives``). Capture happens once per guard set:

1. Dynamo traces the per-replica function (``fullgraph=True``, static shapes)
   on replica 0's inputs. Its guards decide when to capture again (a new static
   value, shape, dtype, Python value the function read); anything it cannot
   capture soundly (a graph break: ``.item()``, a branch on a tensor value, a
   data-dependent shape) raises, and the call falls back to the threads executor.
2. Its backend turns Dynamo's per-replica graph, whose placeholders are the
   arguments and every tensor the function closes over, into the batched graph:
   ``make_fx(vmap_replicas(graph))`` on fake stacked inputs. functorch runs
   only here. Each random call becomes one op that draws every replica's
   numbers from its own stream at run time (``_stacked_random``); a random op
   left over refuses (vmap's randomness="error", and a check of the graph).
   Under ``compile=`` the batched graph is then compiled with the requested
   backend (inductor by default): one compiled program computes every replica.
3. Each call runs Dynamo's compiled function on replica 0's row views (cheap
   views with a replica's shape and strides, so its guards check what they
   should); the backend's callable swaps them for the stacked buffers, which a
   thread-local gives it, runs the batched graph, and hands row-0 views of its
   outputs back to Dynamo, which rebuilds the output structure. The runner maps
   those views back to their stacked outputs by identity.

With autograd (grad mode on, a graph input requiring grad), the batched graph
runs inside one autograd Function whose backward is a batched vjp graph
(``_stacked_autograd``).

Everything outside that scope falls back to the threads executor, with a
RuntimeWarning once per function and reason.
"""

from __future__ import annotations

import functools
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad
import torch.autograd.profiler as _profiler
import torch.utils.checkpoint
from torch._dynamo.source import CallMethodItemSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._pytree import SUPPORTED_NODES, TreeSpec, tree_flatten

from . import (
    _axis,
    _escapes,
    _fast_tree,
    _layout_decisions,
    _ops,
    _outside_views,
    _row_layout,
    _runtime,
    _stacked_autograd,
    _stacked_random,
    _torch_originals,
    _transfers,
)
from ._autodiff import FlatOutput
from ._call import _THREADS, CallRecord, Executor, Placement, ReplicaGroup
from ._compile import (
    DYNAMO_GATE,
    GLOBAL_HOOKS_REASON,
    Backend,
    capture_config,
    clear_cache_when_dropped,
    global_module_hooks,
    options_key,
    requested_backend,
    torch_compile,
)
from ._direct_calls import direct_forward
from ._fast_tree import Structure
from ._identity_map import WeakIdentityMap
from ._layout import device_groups
from ._recapture_watch import RecaptureWatch
from ._sharded import ShardedTensor, _stacked_view, pairs_sharing_memory
from ._stacked_autograd import ReplicaProgram
from ._view_roots import view_root
from .errors import exception_chain

T = TypeVar("T")


class Unsupported(Exception):
    """This call cannot run stacked; ``reason`` says why (for the fallback's warning).
    ``per_call``: only this call (its capture stays usable for other calls)."""

    def __init__(self, reason: str, per_call: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.per_call = per_call


@dataclass(slots=True)
class StackedOutput:
    """A stacked call's output, flattened: per leaf, an (n, ...) tensor whose row
    r is replica r's value (``batched``), or one value every replica returned."""

    leaves: list[Any]
    batched: list[bool]
    spec: TreeSpec | Structure  # _fast_tree.unflatten takes either
    # Leaf k -> every replica's own value, where leaf k is an input returned unchanged that had
    # to be copied to be stacked: the replicas return their inputs themselves, as on the threads.
    inputs_returned: dict[int, list[Any]] = field(default_factory=dict)
    # The capture that ran, when a call with the same signature may run it again
    # straight from the caller's stacked buffers (``_fast_call``); None if not.
    replay: Any = field(default=None, compare=False)


_DYNAMO_OFF = "torch.compiler.set_stance or a disabled Dynamo"


class _DynamoDisabled(Exception):
    """A capture is due but Dynamo is disabled: this call falls back, later ones may capture."""


def unsupported_reason(record: CallRecord) -> str | None:
    """Why ``record`` cannot run stacked, checked before any capture; None if it may."""
    group = record.group
    if record.compile_options is not None and record.compile_options.get("dynamic"):
        return "compile= with dynamic=True (stacked capture is for static shapes)"
    if group.axis_size != record.n or group.first_index != 0:
        return "the axis spans several processes"
    if len(device_groups(group.devices)) != 1:
        return "the devices are on several physical devices"
    return capture_scope_reason(record, stacks_per_replica_tensors=True)


def capture_scope_reason(record: CallRecord, stacks_per_replica_tensors: bool = False) -> str | None:
    """Why ``record`` cannot run from one capture of its function (stacked or
    lockstep), checked before any capture; None if it may. The stacked executor
    stacks a PerReplica of tensors of one shape (``_stack_inputs``)."""
    reason = blocked_reason()
    if reason is not None:
        return reason
    for j, (placement, leaf) in enumerate(zip(record.placements, record.caller_leaves)):
        if placement is Placement.PER_REPLICA:
            if not stacks_per_replica_tensors:
                return "a PerReplica argument"
            if not _same_tensors(record.per_leaf[j]):
                return "a PerReplica argument of other values than tensors of one shape"
        if isinstance(leaf, (torch.nn.Module, torch.optim.Optimizer)):
            return f"a {type(leaf).__name__} argument"
    return None


def _same_tensors(values: Sequence[Any]) -> bool:
    """Whether ``values`` are plain tensors of one shape, dtype and device (rows of one stack)."""
    first = values[0]
    return all(
        type(v) is torch.Tensor and v.shape == first.shape and v.dtype == first.dtype and v.device == first.device
        for v in values
    )


# Whether autocast is on for any device type: one call without argument parsing, which
# answers for the two blocked_reason asks about when it is False (the common case).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def blocked_reason() -> str | None:
    """Why no call can run from a capture right now (the state of the calling
    thread and of Dynamo, whatever the call); None if calls may."""
    if _any_autocast() and (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
        return "autocast is enabled"
    if torch.is_inference_mode_enabled():
        return "inference mode is enabled"
    if global_module_hooks():
        return GLOBAL_HOOKS_REASON
    if torch.is_anomaly_enabled():
        # Its checks do not trace (data-dependent guards); the threads' replicas run under it.
        return "anomaly detection is enabled"
    if torch._C._len_torch_dispatch_stack():
        # Dynamo captures nothing under one; a failed capture would be remembered for later calls.
        return "a TorchDispatchMode is active"
    stance = torch._dynamo.eval_frame._stance
    if stance.stance != "default" or stance.skip_guard_eval_unsafe:
        # Dynamo would run the function eagerly on replica 0, or skip its guards.
        return _DYNAMO_OFF  # (a disabled Dynamo matters only to a capture: _Capture.call checks it)
    pool = _runtime._pool  # (_runtime.pool() makes it: none yet, no worker is busy)
    if getattr(_axis._tls, "frame", None) is not None or (pool is not None and pool.busy()):  # (in_replica())
        # The threads executor detects a nested pmap (or one from a thread a replica started).
        return "called inside a replica, or while a call on the threads executor runs"
    return None


# -- the call state the backend's callable reads ----------------------------------------
@dataclass
class _CallState:
    n: int
    stacked_of: dict[int, torch.Tensor]  # id(replica 0's row view) -> its stacked buffer
    # id(a buffer that is a copy of an input) -> the (buffer, per-replica values) it copies.
    copied: dict[int, tuple[torch.Tensor, list[Any]]] = field(default_factory=dict)
    keep: list[Any] = field(default_factory=list)  # keeps the ids above alive
    # Tensors every replica reads as one: the broadcast inputs, and the tensors the function
    # reaches outside its arguments (globals, closures), which Dynamo lifts into the graph.
    shared: list[torch.Tensor] = field(default_factory=list)
    ran: bool = False
    started: bool = False  # the batched program began to run: an error now is this call's data's
    # The inputs a started program writes in place, with their versions before it ran.
    written_versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    # ids of the buffers that are the caller's own tensors (mapped along dim 0; ``stacked_of`` holds
    # them): an output returns a view of one, never the object, which the caller may rebind
    # later (set_, .data =).
    caller_tensors: set[int] = field(default_factory=set)

    def wrote_inputs(self) -> bool:
        """Whether the program wrote one of its inputs in place: no fallback then
        (the threads would apply the write a second time)."""
        return any(t._version != version for t, version in self.written_versions)

    def row_of(self, buffer: torch.Tensor) -> torch.Tensor:
        """Replica 0's row view of ``buffer``, which stands for it in the captured program."""
        row = buffer[0]  # select(0, 0) (the same view), without Tensor.select's argument parsing
        self.stacked_of[id(row)] = buffer
        self.keep.append(row)
        return row


_tls = threading.local()


def _current() -> _CallState:
    state: _CallState | None = getattr(_tls, "state", None)
    if state is None:
        raise Unsupported("the captured program ran outside a stacked call")
    return state


# -- inputs --------------------------------------------------------------------------
def _stack_inputs(record: CallRecord) -> tuple[list[Any], _CallState]:
    """Replica 0's leaves (row views for mapped and sharded leaves, the value
    itself for broadcast ones) and the state that maps each row view to its buffer."""
    state = _CallState(record.n, {})
    row0: list[Any] = []
    for j, placement in enumerate(record.placements):
        if placement is Placement.BROADCAST:
            value = record.per_leaf[j][0]
            row0.append(value)
            if isinstance(value, torch.Tensor):
                state.shared.append(value)
            continue
        buffer = _stacked_leaf(record, j)
        if buffer is None:
            values = list(record.per_leaf[j])
            buffer = _row_layout.faithful_copy(values)
            if buffer is None:
                raise Unsupported(_UNFAITHFUL, per_call=True)
            state.copied[id(buffer)] = (buffer, values)
        elif buffer is record.caller_leaves[j]:
            state.caller_tensors.add(id(buffer))
        row0.append(state.row_of(buffer))
    return row0, state


def _stacked_leaf(record: CallRecord, j: int) -> torch.Tensor | None:
    """Leaf j's replicas' values as rows of one buffer without a copy (a write
    to a row must reach what the replica would have written), or None."""
    caller, placement = record.caller_leaves[j], record.placements[j]
    buffer = None
    if placement is Placement.MAPPED and type(caller) is torch.Tensor:
        axis = record.axes[j]
        assert axis is not None  # a mapped leaf has an axis
        buffer = mapped_buffer(caller, axis, record.group.devices[0])
    elif placement is Placement.SHARDED and isinstance(caller, ShardedTensor):
        buffer = sharded_buffer(caller)
    if buffer is None:  # (mapped_buffer and sharded_buffer check faithful themselves)
        buffer = _stacked_view(record.per_leaf[j])
        if buffer is not None and not _row_layout.faithful(buffer):
            return None
    return buffer


# An input whose replicas' tensors no stacked buffer computes as they do (see _row_layout).
_UNFAITHFUL = (
    "an input's replicas are laid out so that no stacked buffer computes as they do "
    "(their tensors' strides are in different orders)"
)


def mapped_buffer(t: torch.Tensor, axis: int, device: torch.device) -> torch.Tensor | None:
    """``t`` with its mapped ``axis`` first, when the replicas on ``device`` get
    views of ``t`` itself (it is there already) and ops over it compute as over
    those views (``_row_layout.faithful``); None if they get copies."""
    if not _transfers.is_there(t, device):
        return None
    buffer = t.movedim(axis, 0) if axis else t
    return buffer if _row_layout.faithful(buffer) else None


def sharded_buffer(st: ShardedTensor) -> torch.Tensor | None:
    """The one stacked buffer whose rows are ``st``'s shards and over which ops
    compute as over the shards, or None."""
    buffers = st.stacked_buffers()
    if buffers is None or len(buffers) != 1:
        return None
    return buffers[0] if _row_layout.faithful(buffers[0]) else None


# -- capture ---------------------------------------------------------------------------
class _CaptureComm:
    """The communicator of the frame bound while Dynamo traces: never used, since
    Dynamo runs the ops on fake tensors; a real exchange would be a bug."""

    def exchange(self, *args: Any) -> Any:
        raise Unsupported("a collective ran eagerly while capturing")


class _CaptureFrame(_axis.ReplicaFrame):
    """A frame for tracing: the axis name, size and device, but no index (a
    Python read of it would bake replica 0's index into every replica)."""

    capturing: ClassVar[bool] = True

    def __init__(self, axis_name: str, axis_size: int, device: torch.device) -> None:
        self.axis_name, self.axis_size, self.device = axis_name, axis_size, device
        self.comm = _CaptureComm()  # type: ignore[assignment]  # no exchange may happen while tracing

    @property
    def index(self) -> int:  # type: ignore[override]  # read-only on purpose: see the class docstring
        raise Unsupported("the function reads the replica index in Python (e.g. torchpmap.functional_call)")


# functorch calls in a Dynamo graph whose level argument is absolute: under the
# replica level it must move up by one. (target name, position of the level)
_LEVEL_ARGS = {"_wrap_for_grad": 1, "_unwrap_for_grad": 1, "_add_batch_dim": 2, "_remove_batch_dim": 1}
_LEVEL_FREE = {
    "lazy_load_decompositions",  # (torch.func.vmap loads its decompositions first)
    "_grad_increment_nesting",
    "_grad_decrement_nesting",
    "_vmap_increment_nesting",
    "_vmap_decrement_nesting",
    "set_inplace_requires_grad_allowed",
    "_set_tensor_requires_grad",
    "_autograd_grad",
    "_saved_tensors_hooks_disable",
    "_saved_tensors_hooks_enable",
}


def _quiet(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    """``gm``'s generated forward, called directly: ``GraphModule.__call__`` prints a
    traceback to stderr when the graph raises while it is traced (``x.data`` under
    vmap), before the fallback's own warning says why."""
    gm.code  # noqa: B018 (a lazy GraphModule writes its forward on first use)
    return gm.forward


def _shifted_functorch_levels(gm: torch.fx.GraphModule, depth: int) -> torch.fx.GraphModule:
    """``gm`` to run under ``depth`` functorch transforms (the replica level, and
    a vjp's under autograd): Dynamo writes the levels of torch.func transforms
    inside the function as constants counted from no transform. A copy when a
    level moves; unknown functorch calls refuse."""
    functorch_nodes = [
        node
        for node in gm.graph.nodes
        if node.op == "call_function" and "functorch" in (getattr(node.target, "__module__", "") or "")
    ]
    shifted = [node for node in functorch_nodes if getattr(node.target, "__name__", "") not in _LEVEL_FREE]
    for node in shifted:
        name = getattr(node.target, "__name__", "")
        if name not in _LEVEL_ARGS:
            raise Unsupported(f"a torch.func transform the stacked executor does not know ({name})")
    if not shifted:
        return gm
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        copy = graph.node_copy(node, lambda n: env[n])
        if node in shifted:
            args, k = list(copy.args), _LEVEL_ARGS[getattr(node.target, "__name__", "")]
            level = args[k]
            assert isinstance(level, int), f"a functorch level argument that is not an int: {level!r}"
            args[k] = level + depth
            copy.args = tuple(args)
        env[node] = copy
    return torch.fx.GraphModule(gm, graph)


def _written_inputs(gm: torch.fx.GraphModule) -> frozenset[int]:
    """The placeholders (by position) that an in-place op of ``gm`` writes,
    directly or through views."""
    placeholders = {node: k for k, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    return frozenset(k for node in gm.graph.nodes for k in _placeholders_written_by(node, placeholders))


def _placeholders_written_by(node: torch.fx.Node, placeholders: dict[torch.fx.Node, int]) -> Iterator[int]:
    """The positions of the placeholders ``node`` writes in place, directly or through views."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return
    for k, arg in enumerate(target._schema.arguments):
        # By position or by name: make_fx passes out= (torch.mul(x, 2, out=x)) by name.
        value = node.args[k] if k < len(node.args) else node.kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.fx.Node):
            root = view_root(value)
            if root in placeholders:
                yield placeholders[root]


_DETACHING = (torch.ops.aten.detach.default, torch.ops.aten.detach_.default)


def _may_require_grad(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value may carry autograd history: a floating or complex
    tensor (or a value the trace did not record, or a tuple of values)."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() or value.is_complex()
    return True


def _written_from(gm: torch.fx.GraphModule) -> dict[int, frozenset[int]]:
    """Per placeholder an in-place op writes (by position), the other placeholders whose
    values reach what is written into it (through the graph, and through other writes)."""
    placeholders = {node: k for k, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    into: dict[int, set[int]] = {}
    changed = True
    while changed:  # a write that reads a written input carries that input's sources too
        changed = False
        reach: dict[torch.fx.Node, set[int]] = {}
        for node in gm.graph.nodes:
            if node in placeholders:
                k = placeholders[node]
                reach[node] = {k} | into.get(k, set())
                continue
            sources: set[int] = set()
            # A detached value carries no history, nor does one of a dtype that cannot
            # require grad (a comparison, an index).
            if node.target not in _DETACHING and _may_require_grad(node):
                for arg in node.all_input_nodes:
                    sources |= reach.get(arg, set())
            reach[node] = sources
            for k in _placeholders_written_by(node, placeholders):
                new = sources - {k} - into.get(k, set())
                if new:
                    into.setdefault(k, set()).update(new)
                    changed = True
    return {k: frozenset(v) for k, v in into.items()}


def check_supported_ops(graph: torch.fx.Graph, executor: str = "stacked") -> None:
    """Refuse the ops a captured graph cannot run as the threads do: random
    ops that draw from no replica's stream, and ``Tensor.set_``, after which
    a tensor shares another's storage (functorch's fallback for it aliases
    nothing, so later writes through either tensor were lost)."""
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            # (torchpmap's own ops carry the tag too: the collectives, so that no tracer folds
            # them on constants, and the replica draws, which draw from each replica's stream.)
            if torch.Tag.nondeterministic_seeded in target.tags and target.namespace != "torchpmap":
                raise Unsupported(f"a random op the {executor} executor does not give each replica's stream ({target})")
            if target.overloadpacket is torch.ops.aten.set_:
                raise Unsupported(
                    f"Tensor.set_ (a tensor takes another's storage: the {executor} executor cannot run it)"
                )


def refuse_replaced_torch_functions(gm: torch.fx.GraphModule) -> None:
    """Refuse a capture whose graph calls a torch function that a user's
    replacement now stands in for (``F.relu = logged_relu``): tracing the graph
    would run the replacement inside itself (``_torch_originals``)."""
    replaced = _torch_originals.replaced_in(gm.graph)
    if replaced is not None:
        raise Unsupported(
            f"{replaced} replaces a torch function the function calls: a capture calls torch functions by name, "
            f"and would apply the replacement twice"
        )


def refuse_value_guards(executor: str = "stacked") -> None:
    """Refuse a capture that guards on a tensor's value: under fullgraph, Dynamo
    turns ``.item()`` of a 0-dim input into a number it guards on (``if s.item() > 0``),
    and a capture's guards check replica 0's values only, so other replicas would
    take replica 0's branch. (Shapes and dtypes are alike in every replica; values
    are not.)"""
    context = torch._guards.TracingContext.try_get()
    shape_env = None if context is None or context.fake_mode is None else context.fake_mode.shape_env
    if shape_env is None:
        return
    # Dynamo makes such a number for every 0-dim integer input; only one a guard (a branch)
    # or a replacement (a specialization) reads is replica 0's alone.
    read = {
        symbol: source.name
        for symbol, sources in shape_env.var_to_sources.items()
        for source in sources
        if _reads_a_value(source)
    }
    if not read:
        return
    guarded = set(shape_env.replacements)
    for guard in shape_env.guards:
        guarded |= guard.expr.free_symbols
    for symbol, name in read.items():
        if symbol in guarded:
            raise Unsupported(
                f"a Python branch on a tensor's value ({name}), which the {executor} executor's capture "
                f"would check in replica 0 only"
            )


def _reads_a_value(source: Any) -> bool:
    while source is not None:
        if isinstance(source, CallMethodItemSource):
            return True
        source = getattr(source, "base", None)
    return False


class _Batched:
    """The backend's callable for one guard set: the batched graph (compiled
    with ``compiler`` under compile=), and per Dynamo placeholder whether it is
    a stacked input (in_dim 0) or shared."""

    def __init__(
        self,
        program: ReplicaProgram,
        compiler: Backend | None = None,
        examples: Sequence[Any] = (),
        checkpoints: bool = False,
    ) -> None:
        assert program.graph is not None  # traced by the backend
        self.program, self.graph, self.in_dims = program, program.graph, program.in_dims
        # Whether it runs torch.utils.checkpoint, whose saved-tensor hooks functorch's vjp refuses.
        self.checkpoints = checkpoints
        self.written = _written_inputs(self.graph)  # read before a compiler may rewrite the graph
        # The inputs whose values flow into what the program writes into its inputs.
        self.written_from = frozenset().union(*_written_from(self.graph).values()) if self.written else frozenset()
        # as_strided's batched form names the stacked buffers' own strides and offsets (how
        # far apart the rows are), which Dynamo's guards on replica 0's row do not cover.
        self.layout = _layout(examples) if any(n.target is _AS_STRIDED for n in self.graph.graph.nodes) else None
        self.compiler = compiler
        self.direct: Callable[..., Any] | None = None  # the uncompiled graph's direct_forward, once made
        # Per layout of the inputs, its compiled program: Dynamo guards replica 0's
        # row views, not how far apart the rows are, and Inductor's code assumes
        # (and asserts) the strides it was compiled for.
        self.programs: dict[tuple[Any, ...], Callable[..., Any]] = {}
        if compiler is not None:
            self._program(list(examples))

    def _program(self, inputs: list[Any]) -> Callable[..., Any]:
        if self.compiler is None:
            # Not __call__ (no module hooks to run, ~2 us less), and each op called directly.
            if self.direct is None:
                self.direct = direct_forward(self.graph)
            return self.direct
        key = tuple(a.stride() if isinstance(a, torch.Tensor) else None for a in inputs)
        program = self.programs.get(key)
        if program is None:
            if len(self.programs) >= _MAX_LAYOUTS:
                raise Unsupported(f"compiled for {_MAX_LAYOUTS} layouts of the inputs: not stacked any more")
            program = self.programs[key] = compile_graph(
                self.compiler, self.graph, inputs, round_low_precision=_computes_in_low_precision(self.graph.graph)
            )
        return program

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        state = _current()
        inputs = []
        for k, (a, d) in enumerate(zip(args, self.in_dims)):
            stacked = state.stacked_of.get(id(a)) if isinstance(a, torch.Tensor) else None
            if (stacked is None) != (d is None):
                raise Unsupported("an input's placement changed under the same guards")
            if stacked is not None and k in self.written and id(stacked) in state.copied:
                # This call's inputs only (separate tensors): another call's may be one buffer.
                raise Unsupported(
                    "the function writes an input in place that could only be stacked by a copy", per_call=True
                )
            if stacked is None and isinstance(a, torch.Tensor):
                state.shared.append(a)  # a view of it is not a view of a row (see _view_of_every_row)
            inputs.append(a if stacked is None else stacked)
        if self.layout is not None and _layout(inputs) != self.layout:
            raise Unsupported(
                "Tensor.as_strided on inputs laid out otherwise than at capture (rows another distance apart)",
                per_call=True,
            )
        if self.program.order_reductions and _forward_ad._current_level >= 0 and _has_tangent(inputs):
            # The batched pmax/pmin would pass tangents by torch.maximum's tie rule; they have no
            # derivative (as in JAX): the threads raise if a tangent reaches one.
            raise Unsupported(
                "forward-mode AD (dual inputs) through pmax/pmin, which have no derivative", per_call=True
            )
        if self.written and _aliases_a_written_input(inputs, self.written):
            # The capture writes through a copy of such an input, so the other input would read
            # the old values; eagerly, the write shows through it (or PyTorch refuses a write
            # that reads memory it overlaps). The threads run it eagerly.
            raise Unsupported(
                "the function writes in place an input that shares memory with another input", per_call=True
            )
        needs_grad = False
        if torch.is_grad_enabled():  # _any_requires_grad(inputs), inline (every call)
            for a in inputs:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    needs_grad = True
                    break
        if needs_grad:
            if any(inputs[k].requires_grad for k in self.written):
                raise Unsupported(
                    "autograd through a function that writes in place an input that requires grad", per_call=True
                )
            if any(self.in_dims[k] is None for k in self.written):
                raise Unsupported(
                    "autograd through a function that writes in place a tensor the replicas share", per_call=True
                )
            if any(isinstance(inputs[j], torch.Tensor) and inputs[j].requires_grad for j in self.written_from):
                # Eagerly the written tensor would take the value's history (the threads raise,
                # as a view made in no_grad); the batched node would drop it.
                raise Unsupported(
                    "autograd through a function that writes a value that requires grad into an input in place",
                    per_call=True,
                )
            if self.checkpoints:
                raise Unsupported("autograd through torch.utils.checkpoint", per_call=True)
            if self.compiler is not None:  # the compiled program has no backward of its own
                raise Unsupported("autograd through a compile= call", per_call=True)
            # An input stacked by a copy: autograd saves the copy, so a write into the caller's
            # tensors before the backward would go unseen; the backward checks their versions.
            copied = [v for a in inputs if isinstance(a, torch.Tensor) for v in state.copied.get(id(a), (None, ()))[1]]
            if any(isinstance(a, torch.Tensor) and a.is_inference() for a in (*inputs, *copied)):
                # Eagerly, autograd refuses to save one for a backward (the threads raise as eager
                # does); the batched backward would save its own stacked copy.
                raise Unsupported("autograd with an inference-mode tensor among the inputs", per_call=True)
            program: Callable[..., Any] = functools.partial(
                _stacked_autograd.run, self.program, inputs, self.written, copied
            )
            arguments: Sequence[Any] = ()
        else:
            # self._program(inputs), without its call where the graph runs uncompiled and its direct forward is made
            direct = self.direct
            program = direct if direct is not None and self.compiler is None else self._program(inputs)
            arguments = inputs
        if self.written:
            state.written_versions = [(inputs[k], inputs[k]._version) for k in self.written]
        state.started = True
        outs = program(*arguments)
        rows = []
        for o in outs:
            if o.ndim and o.stride(0) == 0 and state.n > 1:  # a value the same in every replica, expanded
                o = o.contiguous()
            rows.append(state.row_of(o))
        state.ran = True
        return rows


_AS_STRIDED = torch.ops.aten.as_strided.default


def _has_tangent(inputs: Sequence[Any]) -> bool:
    """Whether a tensor among ``inputs`` carries a forward-mode tangent."""
    return any(isinstance(a, torch.Tensor) and _forward_ad.unpack_dual(a).tangent is not None for a in inputs)


def _layout(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """The strides and storage offsets of the tensors among ``inputs``."""
    return tuple((a.stride(), a.storage_offset()) if isinstance(a, torch.Tensor) else None for a in inputs)


def _aliases_a_written_input(inputs: list[Any], written: frozenset[int]) -> bool:
    """Whether a tensor input shares an element with an input the program
    writes (views of one tensor's disjoint columns or blocks do not)."""
    if not _ranges_meet(inputs):  # the common case, without the element-wise check
        return False
    positions = [k for k, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    return any(
        positions[i] in written or positions[j] in written
        for i, j in pairs_sharing_memory([inputs[k] for k in positions])
    )


def _ranges_meet(inputs: list[Any]) -> bool:
    """Whether the address ranges of two tensor inputs may meet (a contiguous tensor's
    exactly; another's from its first element to the end of its storage)."""
    spans = []
    for a in inputs:
        if isinstance(a, torch.Tensor) and a.numel():
            start = a.data_ptr()
            if a.is_contiguous():
                spans.append((start, start + a.nbytes))
            else:
                storage = a.untyped_storage()
                spans.append((start, storage.data_ptr() + storage.nbytes()))
    spans.sort()
    end = -1
    for begin, stop in spans:
        if begin < end:
            return True
        end = max(end, stop)
    return False


# How many input layouts (strides) a compiled capture serves before it falls back.
_MAX_LAYOUTS = 8


def compile_graph(
    compiler: Backend, graph: torch.fx.GraphModule, examples: Sequence[Any], round_low_precision: bool = False
) -> Callable[..., Any]:
    """compile= over a graph of ours (the batched graph: one compiled program
    computes every replica; a lockstep segment). In a tracing context of its own:
    Dynamo's describes replica 0's graph (its inputs, fake tensors and output
    strides), not this one; a fake mode with a shape env lets Inductor cache the
    compiled graph across processes. ``round_low_precision``: Inductor rounds each
    float16/bfloat16 op's result as eager does, instead of keeping fused ops in
    float32 (``_computes_in_low_precision``)."""
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    rounding: Any = nullcontext()
    if round_low_precision:
        from torch._inductor import config as inductor_config  # (only such a call imports Inductor)

        rounding = inductor_config.patch(emulate_precision_casts=True)
    # Without autograd: the compiled program serves calls autograd does not record
    # (one it records runs on the threads, see _Batched.__call__), and a joint graph
    # of a program whose graph passes write temporaries in place would not trace.
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)), torch.no_grad(), rounding:
        return compiler(graph, list(examples))


def _computes_in_low_precision(graph: torch.fx.Graph) -> bool:
    """Whether the batched graph has float16/bfloat16 values. Its collectives fold the
    replicas' rows with pointwise adds, which Inductor would fuse keeping float32
    partial sums: a psum that overflows to inf on the threads (each replica's compiled
    program calls the collective's kernel, which adds in the dtype) would not. The
    whole graph then rounds as eager does, its other float16 ops too: in the last
    place they may differ from the threads' compile=, whose fused ops keep float32."""
    low = (torch.float16, torch.bfloat16)
    return any(getattr(node.meta.get("val"), "dtype", None) in low for node in graph.nodes)


def _backend(
    axis_name: str, n: int, count: list[int], compiler: Backend | None
) -> Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]:
    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        count[0] += 1
        refuse_value_guards()
        refuse_replaced_torch_functions(gm)
        state = _current()
        in_dims = tuple(0 if id(e) in state.stacked_of else None for e in example_inputs)
        stored = _escapes.stored_replica_tensor([t for t in state.keep if id(t) in state.stacked_of])
        if stored is not None:
            raise Unsupported(_escapes.refusal(stored))
        examples = _distinct_objects([state.stacked_of.get(id(e), e) for e in example_inputs])
        _refuse_autocast(gm)
        _shifted_functorch_levels(gm, 1)  # refuses unknown transforms before anything is traced
        sites = _stacked_random.route_random_ops(gm)
        if sites and compiler is not None:
            # A compiler would replace the replicas' streams with its own random ops.
            _stacked_random.forget(sites)
            raise Unsupported("random ops under compile=")
        try:
            program = ReplicaProgram(
                lambda depth: _quiet(_layout_decisions.checked(_shifted_functorch_levels(gm, depth))),
                axis_name,
                n,
                in_dims,
            )
            check_supported_ops(program.trace(examples).graph)
            checkpoints = any(node.target is _CHECKPOINT for node in gm.graph.nodes)
            result = _Batched(program, compiler, examples, checkpoints)
        except BaseException:
            _stacked_random.forget(sites)  # no program will draw at them
            raise
        # On the program, not the callable: a backward of a call made from it (its autograd
        # node holds the program) replays the draws after the capture is dropped.
        weakref.finalize(program, _stacked_random.forget, sites)
        return result

    return backend


def _refuse_autocast(gm: torch.fx.GraphModule) -> None:
    """Refuse an autocast region the function opens: functorch's batching rules
    for linear (with a bias), addmm, baddbmm, convolutions and attention compute
    in the inputs' dtype, whatever autocast says, so the stacked graph would run
    in float32 what each replica runs in bfloat16. (A region that turns autocast
    off changes nothing: calls never run stacked under autocast.)"""
    graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]  # HOPs' bodies too
    for node in (node for graph in graphs for node in graph.nodes):
        if node.op == "call_function" and node.target is _ENTER_AUTOCAST:
            enabled = node.args[2] if len(node.args) > 2 else node.kwargs.get("enabled", True)
            if enabled is not False:
                raise Unsupported(
                    "the function turns autocast on (the batched graph would ignore it for linear, conv, "
                    "addmm and attention)"
                )


_ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast
# What Dynamo makes of a torch.utils.checkpoint call.
_CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def _distinct_objects(examples: list[Any]) -> list[Any]:
    """``examples`` with a tensor that comes again replaced by a view of it: make_fx
    binds a tensor object to one graph input, so one buffer standing for two
    inputs (``f(t, t)``, tied weights, a mapped input the function also closes
    over) left the first input unread, and later calls with two tensors read
    the second for both."""
    seen: set[int] = set()
    out = []
    for e in examples:
        if isinstance(e, torch.Tensor):
            if id(e) in seen:
                e = e.view(e.shape)
            seen.add(id(e))
        out.append(e)
    return out


@dataclass
class _Capture:
    compiled: Callable[..., Any]
    frame: _CaptureFrame
    count: list[int]  # how many times the backend captured (Dynamo compiled) it
    entry: types.FunctionType  # the trampoline that ``compiled`` wraps: Dynamo's cache is on its code
    failed: str | None = None  # why a capture failed: Dynamo may skip the code from then on
    # Per call_signature, why its capture failed (carried over to the capture that replaces this one).
    failed_for: dict[Any, str] = field(default_factory=dict)
    # Per cache entry's transformed code, two functions running it with the trampoline's globals
    # and closure: without and with the pre-graph bytecode's timing (for the profiler).
    transformed: dict[types.CodeType, tuple[types.FunctionType, types.FunctionType] | None] = field(
        default_factory=dict
    )
    recaptures: RecaptureWatch = field(default_factory=RecaptureWatch)

    def call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """``compiled(*args, **kwargs)``. When not inside another compiled frame,
        Dynamo's own guard managers pick the cache entry as Dynamo would (the first
        whose guards pass, in its cache's order), and that entry's code runs
        without Dynamo's frame machinery around it (~20 us a call); a miss goes
        through Dynamo, which captures again."""
        if _cache_entries is not None and _eval_frame_callback() is None:
            # The frame's locals as Dynamo's guards read them: the trampoline's arguments and its free variable.
            scope = {"args": tuple(args), "kwargs": kwargs, "ref": self.fun_ref}
            for cache_entry in _cache_entries(self.entry.__code__):
                # The guard manager's root, as its wrapper's check() (a Python frame) calls it.
                if cache_entry.guard_manager.root.check(scope):
                    code = cache_entry.code
                    pair = self.transformed.get(code)  # (self._transformed, inline when made)
                    if pair is None and code not in self.transformed:
                        pair = self._transformed(code)
                    if pair is not None:
                        # The one that times the pre-graph bytecode while the profiler runs.
                        transformed = pair[1] if _profiler._is_profiler_enabled else pair[0]
                        return transformed(*args, **kwargs)
                    break
        if torch._dynamo.config.disable:  # Dynamo would run the function eagerly on replica 0
            raise _DynamoDisabled
        with capture_config(eager_rounding=True):
            return self.compiled(*args, **kwargs)

    @property
    def fun_ref(self) -> Any:
        closure = self.entry.__closure__
        assert closure is not None  # the trampoline closes over a weak reference to the function
        return closure[0].cell_contents

    def _transformed(self, code: types.CodeType) -> tuple[types.FunctionType, types.FunctionType] | None:
        """Two functions of ``code`` (``_fast_globals``: timing off and on); None if
        it does not take the trampoline's free variables (not Dynamo's usual code: its
        frame runs it)."""
        if code in self.transformed:
            return self.transformed[code]
        e = self.entry
        pair = None
        if code.co_freevars == e.__code__.co_freevars:
            untimed, timed = (
                types.FunctionType(
                    code, _fast_globals(code, e.__globals__, t), e.__name__, e.__defaults__, e.__closure__
                )
                for t in (False, True)
            )
            pair = (untimed, timed)
        self.transformed[code] = pair
        return pair


def _fast_globals(code: types.CodeType, module_globals: dict[str, Any], timed: bool) -> dict[str, Any]:
    """The globals for running Dynamo's transformed ``code`` with no eval-frame
    callback set (the fast path): the compiled function is our ``_Batched``
    itself, not Dynamo's wrapper that disables Dynamo (off already) around it,
    and the pre-graph bytecode is timed only while the profiler runs (``timed``:
    the globals for then). ~10 us a call."""
    fast = dict(module_globals)
    for name in code.co_names:
        value = module_globals.get(name)
        wrapped = getattr(value, "__wrapped__", None)
        if name.startswith("__compiled_fn") and isinstance(wrapped, _Batched):
            fast[name] = wrapped
        elif name == "__import_torch_dot__dynamo_dot_utils" and value is torch._dynamo.utils:
            fast[name] = _UtilsTimedByProfiler(value) if timed else _UtilsWithoutTiming(value)
    return fast


class _UtilsTimedByProfiler:
    """``torch._dynamo.utils`` whose pre-graph bytecode timing runs only while
    the profiler is on (the real ones are Dynamo-disabled calls, ~5 us each)."""

    def __init__(self, utils: types.ModuleType) -> None:
        self._utils = utils

    def __getattr__(self, name: str) -> Any:
        return getattr(self._utils, name)

    def record_pregraph_bytecode_enter(self) -> Any:
        return self._utils.record_pregraph_bytecode_enter() if _profiler._is_profiler_enabled else None

    def record_pregraph_bytecode_exit(self, cm: Any) -> None:
        if cm is not None:
            self._utils.record_pregraph_bytecode_exit(cm)


class _UtilsWithoutTiming:
    """``torch._dynamo.utils`` without the pre-graph bytecode timing, for calls
    while the profiler is off (``_Capture.call`` chooses): the timing functions are
    C callables that do nothing, not two Python frames a call."""

    def __init__(self, utils: types.ModuleType) -> None:
        self._utils = utils
        self.record_pregraph_bytecode_enter = type(None)  # returns None, the "not timed" of enter
        self.record_pregraph_bytecode_exit = id  # takes enter's None; its result is dropped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._utils, name)


_eval_frame_callback = torch._C._dynamo.eval_frame.get_eval_frame_callback
# Dynamo's live cache entries of a code object (an invalidated entry is gone from
# the list); without it, every call goes through Dynamo's frame.
_cache_entries: Callable[[types.CodeType], list[Any]] | None = getattr(
    torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list", None
)


# Dynamo's recompile limit for a capture, and how many captures we allow (fewer:
# a call that would exceed the limit must not reach Dynamo, which would run eagerly).
_RECOMPILE_LIMIT = 64
_MAX_CAPTURES = _RECOMPILE_LIMIT - 1


# Per function: its captures, per capture_key (the physical device is where they run).
_captures: WeakIdentityMap[dict[tuple[Any, ...], _Capture]] = WeakIdentityMap()


def capture_key(record: CallRecord, axis_size: int, where: Any) -> tuple[Any, ...]:
    """What a function's captures (stacked or lockstep) are told apart by: the
    axis, where they run, compile= options, the signs of float zeros among
    the static and broadcast non-tensor arguments, and the types nested in them
    and in the dict keys (``CallRecord.constants_signature``), the order of
    the keyword arguments, and which leaves are broadcast (a row and a broadcast
    tensor of one shape pass the same guards: two pmaps of one function with other
    in_axes would share a capture, and one would fall back for good)."""
    options = record.compile_options
    return (
        record.group.axis_name,
        axis_size,
        where,
        None if options is None else options_key(options),
        record.constants_signature(),
        record.keyword_order(),
        tuple(p is Placement.BROADCAST for p in record.placements),
    )


def _capture_for(record: CallRecord, signature: Any) -> _Capture:
    group = record.group
    device = device_groups(group.devices)[0][0]
    options = record.compile_options
    key = capture_key(record, record.n, device)
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
        compiler = None if options is None else requested_backend(options)
        count = [0]
        entry = trampoline_entry(record.fun)
        compiled = compile_per_replica(entry, _backend(group.axis_name, record.n, count, compiler))
        frame = _CaptureFrame(group.axis_name, record.n, device)
        capture = per_fun[key] = _Capture(compiled, frame, count, entry, failed_for=failed_for)
    assert capture is not None
    return capture


def call_signature(record: CallRecord) -> Any:
    """What a capture failure is remembered by: the arguments' tree, static
    values and mapped axes. The same function under another pmap (other
    in_axes, say) may capture where this one could not."""
    return (record.treedef, record.static_items, tuple(record.axes))


def reusable_after_failures(capture: Any, signature: Any) -> dict[Any, str] | None:
    """None when ``capture`` (stacked or lockstep) serves a call of
    ``signature``; raises Unsupported when a call of that signature failed to
    capture; otherwise the failures to carry over to a new capture (none yet,
    or another signature's failure: a new trampoline's code, which Dynamo has
    not given up on, captures this one)."""
    if capture is None:
        return {}
    reason = capture.failed_for.get(signature)
    if reason is not None:
        raise Unsupported(reason)
    return None if capture.failed is None else capture.failed_for


def _weak_trampoline(fun: Callable[..., Any]) -> Callable[..., Any]:
    ref = weakref.ref(fun)

    def pmap_replica(*args: Any, **kwargs: Any) -> Any:
        return ref()(*args, **kwargs)  # type: ignore[misc]  # the caller holds fun while it runs

    return pmap_replica


def trampoline_entry(fun: Callable[..., Any]) -> types.FunctionType:
    """A trampoline calling ``fun`` with a code object of its own (Dynamo keeps
    its cache on the code, so each gets a distinct one). It holds ``fun``
    weakly (Dynamo guards what the reference points to): the captures cached
    per function would otherwise keep the function, and themselves, alive for ever."""
    try:
        t = _weak_trampoline(fun)
    except TypeError:
        raise Unsupported("the function cannot be weakly referenced (its captures could not be cached)") from None
    return types.FunctionType(t.__code__.replace(), t.__globals__, t.__name__, t.__defaults__, t.__closure__)


def compile_per_replica(
    entry: types.FunctionType, backend: Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]
) -> Callable[..., Any]:
    """``entry`` (a ``trampoline_entry``) under Dynamo with ``backend``: one
    full graph, static shapes. Once the result is dropped (with its capture), so
    are Dynamo's cache entries on the trampoline's code (``clear_cache_when_dropped``)."""
    compiled = torch_compile(entry, _RECOMPILE_LIMIT, backend=backend, fullgraph=True, dynamic=False)
    clear_cache_when_dropped(compiled, entry.__code__)
    return compiled


# -- the call ------------------------------------------------------------------------
def run(record: CallRecord) -> StackedOutput:
    """Run ``record`` stacked, or raise Unsupported (before anything ran that
    the threads executor would run again, except Python side effects)."""
    row0, state = _stack_inputs(record)
    signature = call_signature(record)
    capture = _capture_for(record, signature)
    args, kwargs = record.unflatten(row0)
    try:
        result = run_capture(capture, record.group, args, kwargs, state)
    except Unsupported:
        if capture.failed is not None:
            capture.failed_for.setdefault(signature, capture.failed)
        raise
    if record.donated:  # only now: the threads executor runs a call that falls back, donated inputs and all
        record.release_donated()
    result.replay = None if state.copied else capture
    return result


def run_capture(
    capture: _Capture, group: ReplicaGroup, args: Any, kwargs: dict[str, Any], state: _CallState
) -> StackedOutput:
    """``capture`` run on replica 0's arguments ``args``/``kwargs``, whose row
    views ``state`` maps to their stacked buffers; its output as stacked
    buffers. Raises Unsupported as ``run``, with the caller's generator as it
    was (the threads executor draws the call's seed again)."""
    streams: _stacked_random.CallStreams | None = None
    before = capture.count[0]
    try:
        with capture_scope(capture, _tls, state, "stacked"), _stacked_random.call_streams(group) as streams:
            out = capture.call(args, kwargs)
            result = _stacked_output(out, state)
    except _DynamoDisabled:
        raise Unsupported(_DYNAMO_OFF) from None
    except Unsupported:
        if streams is not None:
            streams.rewind()
        raise
    except Exception as e:
        if isinstance(_cause(e), _STOP_RECOMPUTATION):
            # Non-reentrant checkpoint's recomputation of a call has what its backward needs:
            # its pack hook stops it, as it stops any recomputation (no fallback: the threads
            # would save again, which the checkpoint refuses).
            if streams is not None:
                streams.rewind()
            raise _cause(e) from None
        if state.wrote_inputs():
            # The threads would apply the writes a second time: the error is the call's.
            note = (
                "(raised while the stacked executor ran the function, after it had written its inputs in place: "
                "not run again on the threads executor; torchpmap.set_executor('threads') runs it there)"
            )
            if hasattr(e, "add_note"):  # Python 3.11+
                e.add_note(note)
            raise
        if streams is not None:
            streams.rewind()
        inner = _unsupported_inside(e)
        if inner is not None and inner.per_call:
            raise Unsupported(inner.reason) from None
        if inner is None and state.started:
            # Captured, and failed on this call's values (an index out of range): the
            # threads run this call (and raise as they do); the capture stays for the next.
            raise Unsupported(f"the batched graph raised {_describe(_cause(e))}", True) from None
        capture.failed = inner.reason if inner is not None else capture_failure(e)
        raise Unsupported(capture.failed) from None
    # Outside the try: a warning about the draws must not read as a capture failure.
    assert streams is not None  # entered, since the capture ran
    streams.finish(failed=not state.ran)  # not ran: the threads executor runs the call, and learns
    if capture.count[0] != before:  # (after_call does nothing otherwise)
        capture.recaptures.after_call(capture.count[0], before, args, kwargs, capture.fun_ref(), "stacked")
    return result


class capture_scope:
    """The scope a capture (stacked or lockstep: ``failed``, ``count``, ``frame``)
    runs in on this thread: ``state`` where its backend and programs read it,
    the Dynamo gate held, the capture's axis frame bound, the collectives in
    stacking mode. Raises Unsupported first if the capture cannot run. A class,
    not a generator: it is entered on every call (~1.5 us less)."""

    __slots__ = ("capture", "tls", "state", "executor", "previous", "hooks_disabled")

    def __init__(self, capture: Any, tls: threading.local, state: Any, executor: str) -> None:
        self.capture, self.tls, self.state, self.executor = capture, tls, state, executor

    def __enter__(self) -> None:
        capture = self.capture
        if capture.failed is not None:
            raise Unsupported(capture.failed)
        if capture.count[0] >= _MAX_CAPTURES:
            # Past its recompile limit Dynamo would run the function eagerly on replica 0.
            raise Unsupported(f"captured {_MAX_CAPTURES} times (its guards keep failing): not {self.executor} any more")
        self.tls.state = self.state
        DYNAMO_GATE.enter()
        axis_tls = _axis._tls  # _axis.current_frame() and bind(), inline (every call)
        self.previous = getattr(axis_tls, "frame", None)
        axis_tls.frame = capture.frame
        _ops._stacking.on, _ops._stacking.executor = True, self.executor
        self.hooks_disabled = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: Any) -> None:
        try:
            if kind is not None:
                _restore_saved_tensor_hooks_switch(self.hooks_disabled)
        finally:  # whatever the restore raises (an interrupt), the gate and the thread's state go back
            _ops._stacking.on = False
            _axis._tls.frame = self.previous  # (_axis.bind)
            DYNAMO_GATE.exit()
            self.tls.state = None


def _restore_saved_tensor_hooks_switch(disabled: str | None) -> None:
    """Saved-tensor hooks allowed again (or disabled as before) after a failed
    capture: Dynamo leaves them disabled when an exception leaves a
    torch.func.grad it is tracing, and ``save_on_cpu`` would then refuse to start."""
    if torch._C._autograd._saved_tensors_hooks_get_disabled_error_message() == disabled:
        return
    if disabled is None:
        torch._C._autograd._saved_tensors_hooks_enable()
    else:
        torch._C._autograd._saved_tensors_hooks_disable(disabled, False)


def _unsupported_inside(e: BaseException) -> Unsupported | None:
    return next((cur for cur in exception_chain(e, inner=True) if isinstance(cur, Unsupported)), None)


def capture_failure(e: BaseException) -> str:
    """The reason of a failed capture, naming the error that caused it (``_cause``)."""
    if _inside_functional_optimizer_step(e):  # (Dynamo's own words name an optimizer internal)
        return (
            "capture failed: functional_optimizer steps only SGD in a capture (unless fused, sparse or under "
            "global step hooks); others step eagerly (Adam's and AdamW's bias corrections, traced, would round "
            "otherwise than eager's)"
        )
    return f"capture failed {_describe(_cause(e))}"


_TRAINING_FILE = __file__.rsplit("_stacked.py", 1)[0] + "training.py"


def _inside_functional_optimizer_step(e: BaseException) -> bool:
    """Whether Dynamo stopped inside torch.optim, called from ``FunctionalOptimizer.step``
    (its user stack says), or at the step's object path, which it never traces."""
    for cur in exception_chain(e, inner=True):
        names = [(frame.filename, frame.name) for frame in getattr(cur, "real_stack", None) or ()]
        steps = [k for k, (filename, name) in enumerate(names) if filename == _TRAINING_FILE and name == "step"]
        if steps and (
            any(_OPTIM_DIR in filename for filename, _ in names[steps[0] + 1 :])
            or "_step_through_an_object" in str(cur)
        ):
            return True
    return False


_OPTIM_DIR = torch.optim.__file__.rsplit("__init__.py", 1)[0]


# Raised by torch.utils.checkpoint's pack hook to end a recomputation early (private to PyTorch).
_STOP_RECOMPUTATION: Any = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())


def _cause(e: BaseException) -> BaseException:
    """The innermost error raised outside Dynamo (a collective's or the
    backend's), as Dynamo's wrappers name only themselves (BackendCompilerFailed
    says "backend='backend' raised:", TorchRuntimeError "RuntimeError when
    making fake tensor call"); Dynamo's own error when it is the cause."""
    cause, seen = e, set()
    cur: BaseException | None = e
    explicit = True  # cur is e, or the explicit cause of the one before
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if explicit and not type(cur).__module__.startswith("torch._dynamo"):
            cause = cur
        inner = getattr(cur, "inner_exception", None)
        if isinstance(inner, BaseException) or cur.__cause__ is not None:
            cur, explicit = inner if isinstance(inner, BaseException) else cur.__cause__, True
        else:
            # Dynamo re-raises its errors from a handler; the handled error (a KeyError for
            # a variable it had not seen) is no cause, but a Dynamo error there may have one.
            cur, explicit = cur.__context__, False
    return cause


def _describe(e: BaseException) -> str:
    return f"({type(e).__name__}: {_first_line(e)})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _stacked_output(out: Any, state: _CallState) -> StackedOutput:
    """The call's output, its leaves mapped to the stacked values they stand for.
    Raises Unsupported when the call should fall back, unless the program wrote
    its inputs (the threads would write them a second time): RuntimeError then."""
    try:
        return _mapped_output(out, state)
    except Unsupported as e:
        if state.wrote_inputs():
            raise RuntimeError(
                f"pmap: the stacked executor ran the function, and cannot return its result: {e}"
            ) from None
        raise


def _mapped_output(out: Any, state: _CallState) -> StackedOutput:
    if type(out) is torch.Tensor and torch.Tensor not in SUPPORTED_NODES:  # one tensor: flatten's answer, no call
        found: tuple[list[Any], Structure] | None = [out], _fast_tree.LEAF
    else:
        found = _fast_tree.flatten(out)
    leaves, spec = found if found is not None else tree_flatten(out)
    batched = []
    inputs_returned: dict[int, list[Any]] = {}
    for k, leaf in enumerate(leaves):
        stacked = None
        if isinstance(leaf, torch.Tensor):
            stacked = state.stacked_of.get(id(leaf))
            if stacked is None:
                stacked = _view_of_every_row(leaf, state)
            elif id(stacked) in state.caller_tensors:
                # The same memory under another object: a view, as the threads' shards of it are.
                stacked = stacked.view(stacked.shape)
            if stacked is not None and state.copied:
                originals = _copied_input(stacked, state)
                if originals is not None:
                    inputs_returned[k] = originals
        elif isinstance(leaf, _NUMPY_VALUES):
            raise Unsupported(_NUMPY_OUTPUT)
        if stacked is not None:
            leaves[k] = stacked
        batched.append(stacked is not None)
    if not state.ran:
        # No graph: nothing for the replicas to compute (the function returns its
        # inputs or constants), or Dynamo ran it eagerly on replica 0. Never trust that.
        raise Unsupported("the captured function has no graph to run")
    return StackedOutput(leaves, batched, spec, inputs_returned=inputs_returned)


# A numpy value among a capture's outputs is made by Dynamo's code outside the graph, from
# replica 0's tensor (np.asarray(x.sum())): every replica would return replica 0's (and
# out_axes=None would take them as agreed).
_NUMPY_VALUES = (np.ndarray, np.generic)
_NUMPY_OUTPUT = "the function returns a numpy value (Dynamo makes it from replica 0's tensor)"


def refuse_numpy_outputs(leaves: Sequence[Any]) -> None:
    """Refuse a numpy value among a capture's outputs (``_NUMPY_OUTPUT``)."""
    if any(isinstance(leaf, _NUMPY_VALUES) for leaf in leaves):
        raise Unsupported(_NUMPY_OUTPUT)


def _copied_input(stacked: torch.Tensor, state: _CallState) -> list[Any] | None:
    """The replicas' own inputs when ``stacked`` is the copy made to stack them
    (an input returned unchanged: on the threads each replica returns its
    input itself, and writes to the result reach it); None when ``stacked``
    shares no memory with such a copy. A view of the copy cannot be rebuilt
    on the inputs (their layouts differ from the copy's): that call falls back."""
    copy = state.copied.get(id(stacked))
    if copy is not None:
        return copy[1]
    ptr = stacked.untyped_storage().data_ptr()
    if any(ptr == buffer.untyped_storage().data_ptr() for buffer, _ in state.copied.values()):
        raise Unsupported("an output is a view of an input that had to be copied to be stacked", per_call=True)
    return None


def _view_of_every_row(leaf: torch.Tensor, state: _CallState) -> torch.Tensor | None:
    """An output that is not one of the graph's: a view Dynamo takes outside
    the graph (``x.mT`` of an input: the graph returns nothing, and Dynamo's
    bytecode takes the view of replica 0's row) stands for that view of every
    row; anything else (a broadcast input, a view of one, a tensor the function
    closes over) is the same in every replica (None). See ``_outside_views``."""
    if leaf.device.type == "meta" or leaf.is_sparse or torch._C._functorch.is_functorch_wrapped_tensor(leaf):
        return None
    buffers = {id(b): b for b in state.stacked_of.values() if _outside_views.lies_within(leaf, b.select(0, 0))}
    if not buffers:
        return None
    # Any buffer whose row 0 holds it serves when all step from row to row alike
    # (inputs sliced from one tensor); a broadcast input there may be what the view is of.
    buffer, *others = buffers.values()
    alike = all(b.stride(0) == buffer.stride(0) for b in others)
    if not alike or any(_outside_views.lies_within(leaf, t) for t in state.shared):
        raise Unsupported("an output is a view that Dynamo takes outside the graph, of memory several inputs share")
    row_bytes = buffer.stride(0) * buffer.element_size()
    view = None
    if row_bytes % leaf.element_size() == 0:
        view = _outside_views.rebuilt(
            buffer,
            leaf,
            (buffer.shape[0], *leaf.shape),
            (row_bytes // leaf.element_size(), *leaf.stride()),
            _outside_views.byte_offset(leaf),
        )
    if view is None:
        raise Unsupported(
            f"an output is a {leaf.dtype} view that Dynamo takes outside the graph, of a {buffer.dtype} input"
        )
    return view


# -- warnings -----------------------------------------------------------------------------
_warned: WeakIdentityMap[set[tuple[str, str]]] = WeakIdentityMap()
_warned_by_id: dict[int, set[tuple[str, str]]] = {}  # functions that cannot be weakly referenced


def warn_fallback(fun: Callable[..., Any], label: str, reason: str, executor: str = "stacked") -> None:
    """A RuntimeWarning, once per function, executor and reason."""
    try:
        seen = _warned.setdefault(fun, set())
    except TypeError:
        seen = _warned_by_id.setdefault(id(fun), set())
    if (executor, reason) in seen:
        return
    seen.add((executor, reason))
    warnings.warn(
        f"torchpmap: {label} runs on the threads executor instead of the {executor} one: {reason}",
        RuntimeWarning,
        stacklevel=4,
    )


class CapturedExecutor(Executor):
    """An executor that runs a call from one capture of its function (``run``)
    when it can, else on the threads executor, warning once per function and
    reason. The stacked and lockstep executors are two; ``auto`` is the
    default executor's variant (see ``_config.set_executor``): calls outside
    its scope and a function's first call run on the threads without a word,
    and only a failed capture warns."""

    def __init__(
        self,
        name: str,
        unsupported_reason: Callable[[CallRecord], str | None],
        run: Callable[[CallRecord], list[FlatOutput] | StackedOutput],
        auto: bool = False,
    ) -> None:
        self.name, self._unsupported_reason, self._run, self._auto = name, unsupported_reason, run, auto

    def run_replicas(
        self,
        group: ReplicaGroup,
        replica_fn: Callable[[int], T],
        caller_streams: Sequence[torch.cuda.Stream | None] | None = None,
    ) -> list[T]:
        return _THREADS.run_replicas(group, replica_fn, caller_streams)

    def call(self, record: CallRecord) -> list[FlatOutput] | StackedOutput:
        reason = self._unsupported_reason(record)
        if reason is not None:
            if not self._auto:
                warn_fallback(record.fun, record.group.label, reason, self.name)
            return _THREADS.call(record)
        if self._auto and _first_call(record):
            return _THREADS.call(record)
        try:
            return self._run(record)
        except Unsupported as e:
            warn_fallback(record.fun, record.group.label, e.reason, self.name)
        return _THREADS.call(record)


def auto_unsupported_reason(record: CallRecord) -> str | None:
    """``unsupported_reason``, and GPUs: the stacked executor has not run on one yet."""
    if any(d.type != "cpu" for d in record.group.devices):
        return "not CPU devices"
    return unsupported_reason(record)


# The functions the default executor has seen a call of (their first ran on the threads).
_called_once: WeakIdentityMap[bool] = WeakIdentityMap()


def _first_call(record: CallRecord) -> bool:
    """Whether this is the first call of the function that the default executor
    sees: a function called once then costs no capture (~0.1-1 s). A compile=
    call is captured at once: its first call would compile per replica first."""
    if record.compile_options is not None:
        return False
    try:
        if record.fun in _called_once:
            return False
        _called_once.setdefault(record.fun, True)
    except TypeError:  # not weakly referenceable or not hashable: captured at once
        return False
    return True


STACKED = CapturedExecutor("stacked", unsupported_reason, run)
AUTO = CapturedExecutor("stacked", auto_unsupported_reason, run, auto=True)
