"""torch.compile for pmap: one compiled program per device, safe across threads.

Dynamo keeps its cache on the code object and guards on tensor devices, so
compiling one function for 8 or 16 CUDA devices would recompile per device and
fall back to eager past ``recompile_limit``. Each (axis size, device) therefore
gets its own copy of a small trampoline's code object: its own cache, no
shared guard churn. Virtual CPU devices share one physical device and so share
one program.

Dynamo is not thread-safe: replicas that miss the cache together each compile
again, and even guard evaluation of a shared cache entry races (spurious
recompiles). So a replica holds the process-wide ``DYNAMO_GATE`` whenever it
is inside Dynamo (guards, tracing, compiling, eager code between graphs) and
gives it up while a compiled graph runs and while it waits in a collective.
Compiled graphs of all replicas still run concurrently.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.modules.module as _module_hooks
from torch.utils._pytree import tree_leaves

from . import _config, _random
from ._fork import reinit_after_fork
from ._recapture_watch import RecaptureWatch
from .errors import CollectiveTimeoutError, CompileError, exception_chain

# How often a replica waiting for the compile gate checks whether it, or the
# holder, was abandoned (it wakes at once when the gate is released).
_GATE_POLL_SECONDS = 0.1

_COMPILE_KEYS = {"backend", "mode", "dynamic", "fullgraph", "options"}

# A torch.compile backend: (graph, example inputs) -> the compiled graph.
Backend: TypeAlias = "Callable[[torch.fx.GraphModule, list[torch.Tensor]], Callable[..., Any]]"

# torch.compile takes a per-function recompile_limit in the PyTorch torchpmap requires (2.13).
_PER_FUNCTION_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters


def clear_cache_when_dropped(compiled: Callable[..., Any], code: types.CodeType) -> None:
    """Once ``compiled`` is dropped, drop Dynamo's cache entries on ``code``, its
    own code object: Dynamo keeps that code alive, and the entries hold every
    graph compiled for it (a pmapped function made and called in a loop kept
    them all)."""
    if _reset_code is not None:
        weakref.finalize(compiled, _drop_cache_entries, code).atexit = False


_reset_code: Callable[[types.CodeType], None] | None = getattr(torch._C._dynamo.eval_frame, "reset_code", None)
_cache_entries: Callable[[types.CodeType], list[Any]] | None = getattr(
    torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list", None
)


def _drop_cache_entries(code: types.CodeType) -> None:
    """Drop Dynamo's cache entries on ``code``, and the finalizers Dynamo put on the
    long-lived objects their guards name (modules, types): each holds the entry's guard
    manager (~130 KB) for as long as that object lives, to invalidate an entry that is
    gone now. (``torch.compile`` with ``reset_code`` leaks them alike.)"""
    assert _reset_code is not None
    # The entries' guard managers themselves, alive through the scan: compared by id alone, a
    # manager freed meanwhile could lend its address to another thread's new one.
    managers = [e.guard_manager for e in _cache_entries(code)] if _cache_entries is not None else []
    _reset_code(code)
    if not managers:
        return
    ours = {id(m): m for m in managers}
    for finalizer, info in list(weakref.finalize._registry.items()):  # type: ignore[attr-defined]
        invalidate = getattr(info.func, "func", None)  # functools.partial(manager.invalidate, obj_str=...)
        manager = getattr(getattr(invalidate, "__self__", None), "guard_manager", None)
        if getattr(invalidate, "__name__", None) == "invalidate" and ours.get(id(manager)) is manager:
            finalizer.detach()


def torch_compile(fun: Callable[..., Any], recompile_limit: int, **options: Any) -> Callable[..., Any]:
    """``torch.compile(fun, **options)`` allowed ``recompile_limit`` captures of
    its own. Older PyTorch (2.11 is what the GPU machines have) knows only
    Dynamo's global limit: there it is that one, and a function with more
    signatures runs eagerly past it, as Dynamo does."""
    if _PER_FUNCTION_LIMIT:
        options["recompile_limit"] = recompile_limit
    return torch.compile(fun, **options)


@contextlib.contextmanager
def capture_config(*, eager_rounding: bool, constant_floats: bool = False) -> Iterator[None]:
    """Dynamo's configuration for torchpmap's captures and compiles, which Dynamo reads
    while it traces and builds guards. Entered around the calls that may capture, with
    the gate held (not on the stacked fast path's guard check: setting Dynamo's config
    costs ~15 us).

    * Module hooks are guarded: Dynamo skips them by default, so a hook added after a
      capture would be ignored, silently.
    * ``eager_rounding`` (the stacked and lockstep captures, which run aten ops as eager
      does): no Dynamo decompositions. By default Dynamo writes ``addcmul_``/``addcdiv_``
      with ``value=`` and ``add_`` with a tensor ``alpha`` as a fused multiply-add,
      which rounds otherwise than the eager op (and the threads executor) and has no
      batching rule (functorch loops over the replicas, and warns). ``compile=``
      replicas keep them, as ``torch.compile`` does: inductor rounds its own way anyway,
      and they spare ``fullgraph=True`` steps (a compiled Adam) a graph break.
    * ``constant_floats`` (``compile=``'s per-replica programs): a Python float argument
      is a constant of the program, a new value compiles again, as the stacked executor
      captures again. Dynamo otherwise passes it as a symbol from its second value on, and
      Inductor may then reuse an earlier value silently (pytorch/pytorch#194976: a
      float's ``math.floor`` or ``clamp`` bound kept the value it had when it became a
      symbol).

    Scopes on different threads overlap where the gate is paused (a rendezvous, a
    forward-AD region) and may end in any order: the newest open scope's settings
    apply, and the caller's come back when the last one ends."""
    scope = _ConfigScope(eager_rounding, constant_floats)
    _quiet.depth = getattr(_quiet, "depth", 0) + 1
    with _config_lock:
        if not _open_scopes:
            config = torch._dynamo.config
            _callers_config[:] = [
                config.skip_nnmodule_hook_guards,
                config.enable_dynamo_decompositions,
                config.specialize_float,
            ]
        _open_scopes.append(scope)
        _apply_config()
    try:
        yield
    finally:
        _quiet.depth -= 1
        with _config_lock:
            _open_scopes.remove(scope)
            _apply_config()


# Inside a capture a failing op (the user's shape mistake, traced on fake tensors) makes the
# fake-tensor module log its traceback at ERROR level; the call then runs eagerly and raises
# the error itself. The log says nothing more, so this thread's captures leave it out.
_quiet = threading.local()


def _not_a_capture_meta_failure(record: logging.LogRecord) -> bool:
    return not (getattr(_quiet, "depth", 0) and record.msg == "failed while attempting to run meta for %s")


logging.getLogger("torch._subclasses.fake_tensor").addFilter(_not_a_capture_meta_failure)


class _ConfigScope:
    __slots__ = ("eager_rounding", "constant_floats")

    def __init__(self, eager_rounding: bool, constant_floats: bool) -> None:
        self.eager_rounding = eager_rounding
        self.constant_floats = constant_floats


_config_lock = reinit_after_fork(threading.Lock())
_open_scopes: list[_ConfigScope] = []  # capture_config scopes open now, oldest first
_callers_config: list[bool] = []  # Dynamo's settings before the first of them opened


def _apply_config() -> None:
    config = torch._dynamo.config
    hooks_skipped, decompositions, constant_floats = _callers_config
    if _open_scopes:
        hooks_skipped = False
        decompositions = decompositions and not _open_scopes[-1].eager_rounding
        constant_floats = constant_floats or _open_scopes[-1].constant_floats
    config.skip_nnmodule_hook_guards = hooks_skipped
    config.enable_dynamo_decompositions = decompositions
    config.specialize_float = constant_floats


# Dynamo guards no global nn.Module hook: one added after a capture would be ignored.
GLOBAL_HOOKS_REASON = "global nn.Module hooks are registered (torch.nn.modules.module.register_module_*_hook)"


def global_module_hooks() -> bool:
    """Whether a global nn.Module forward or backward hook is registered: captures run
    eagerly then (on the threads executor), as Dynamo would not notice a later one."""
    return bool(
        _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_backward_hooks
        or _module_hooks._global_backward_pre_hooks
    )


def normalize_options(compile: Any) -> dict[str, Any] | None:
    """``compile=`` of pmap: False/None (eager), True (defaults) or torch.compile's options."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        unknown = set(compile) - _COMPILE_KEYS
        if unknown:
            raise ValueError(
                f"pmap: compile= got unknown option(s) {sorted(unknown)}; torch.compile options "
                f"are {sorted(_COMPILE_KEYS)}"
            )
        _check_options(compile)
        return dict(compile)
    raise TypeError(f"pmap: compile must be False, True or a dict of torch.compile options, got {compile!r}")


def _check_options(compile: dict[str, Any]) -> None:
    """The types torch.compile takes, checked now rather than at the first compile."""
    backend, mode = compile.get("backend", "inductor"), compile.get("mode")
    if not (isinstance(backend, str) or callable(backend)):
        raise TypeError(f"pmap: compile= backend must be a backend name or a callable, got {backend!r}")
    if mode is not None and backend == "inductor":  # another backend takes its own modes
        from torch._inductor import list_mode_options  # only for a mode: importing Inductor takes a while

        if not isinstance(mode, str) or mode not in list_mode_options():
            raise ValueError(f"pmap: compile= mode must be one of {sorted(list_mode_options())}, got {mode!r}")
    for key in ("dynamic", "fullgraph"):
        if compile.get(key) is not None and not isinstance(compile[key], bool):
            raise TypeError(f"pmap: compile= {key} must be True, False or None, got {compile[key]!r}")
    if compile.get("options") is not None and not isinstance(compile["options"], dict):
        raise TypeError(f"pmap: compile= options must be a dict, got {compile['options']!r}")
    if mode is not None and compile.get("options") is not None:  # torch.compile's own rule, said now
        raise ValueError("pmap: compile= takes mode or options, not both (as torch.compile)")


def _trampoline_factory(fun: Callable[..., Any]) -> Callable[..., Any]:
    def pmap_replica(*args: Any, **kwargs: Any) -> Any:
        return fun(*args, **kwargs)

    return pmap_replica


class DynamoGate:
    """A lock that knows whether the current thread holds it.

    Waiting for it is bounded like every wait. A compile takes as long as it
    takes, but a holder that runs eager code between graphs (not compiling)
    for the whole timeout is like a peer that does not arrive in a collective:
    a replica stuck there would otherwise block every compiled call of the
    process, its own call's other replicas first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._holder: int | None = None  # thread ident, for the error of a waiter
        # Since when the holder has held the gate without compiling (Dynamo's
        # compile callbacks tell; only the holder compiles).
        self._idle_since = 0.0
        self._compiling = False
        self._tracing = False  # the holder traces outside Dynamo (``holding``): as long as a compile may take

    def _after_fork(self) -> None:
        """In a forked child, only the forking thread is there: the gate is held by it
        or by none, and nothing compiles (``_fork``)."""
        mine = self.held()
        self._lock._at_fork_reinit()  # type: ignore[attr-defined]
        self._compiling = self._tracing = False
        self._holder = None
        if mine:
            self._lock.acquire()
            self._holder = threading.get_ident()

    def held(self) -> bool:
        return getattr(self._tls, "held", False)

    def compiling_here(self) -> bool:
        """Whether this thread holds the gate and Dynamo is compiling (only the holder compiles)."""
        return self.held() and self._compiling

    def enter(self) -> None:
        if not self._lock.acquire(blocking=False):
            self._wait()
        self._holder = threading.get_ident()
        self._idle_since = time.monotonic()
        self._tls.held = True

    def compile_started(self) -> None:
        self._compiling = True

    def compile_ended(self) -> None:
        self._compiling = False
        self._idle_since = time.monotonic()

    def _wait(self) -> None:
        """Acquire the gate, or raise: when this replica's call was given up,
        or when the holder has kept the gate for the whole timeout without
        compiling (stuck in eager code between graphs, or abandoned)."""
        from . import _runtime  # only when contended: _runtime knows the calls

        timeout = _config.collective_timeout()
        while not self._lock.acquire(timeout=_GATE_POLL_SECONDS):
            _runtime.raise_if_abandoned(threading.get_ident())
            holder = self._holder
            held_for = time.monotonic() - self._idle_since
            if holder is None or self._compiling or self._tracing or held_for < timeout:
                continue
            raise CollectiveTimeoutError(
                f"torch.compile: waited for torchpmap's process-wide compile gate (Dynamo is not thread-safe, "
                f"so replicas take turns inside it), which {_runtime.describe_thread(holder)} has held for "
                f"{held_for:.1f} s without compiling: it runs eager code between compiled graphs and has not "
                f"returned. (Set TORCHPMAP_COLLECTIVE_TIMEOUT or torchpmap.set_collective_timeout to change "
                f"the limit.)"
            )

    def exit(self) -> None:
        if getattr(self._tls, "held", False):  # self.held(), inline (every stacked call)
            self._tls.held = False
            self._holder = None
            self._lock.release()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold the gate for the block (already held: as it is). For tracing outside
        Dynamo (make_fx), whose patching of torch and FX's tracing flag are process-wide."""
        if self.held():
            yield
            return
        self.enter()
        self._tracing = True
        try:
            yield
        finally:
            self._tracing = False
            self.exit()

    def pause(self) -> bool:
        """Before blocking (in a collective): give the gate up if held."""
        if self.held():
            self.exit()
            return True
        return False


DYNAMO_GATE = DynamoGate()
os.register_at_fork(after_in_child=DYNAMO_GATE._after_fork)
_callbacks_installed = False


def _track_compiles() -> None:
    """Let the gate know when Dynamo compiles (once per process)."""
    global _callbacks_installed
    if not _callbacks_installed:
        _callbacks_installed = True
        handler = torch._dynamo.callback.callback_handler
        handler.register_start_callback(lambda _: DYNAMO_GATE.compile_started())
        handler.register_end_callback(lambda _: DYNAMO_GATE.compile_ended())


def requested_backend(options: dict[str, Any]) -> Backend:
    """The torch.compile backend that ``options`` (``normalize_options``) ask for,
    with their ``mode``, ``options`` and ``dynamic``: inductor by default."""
    backend = options.get("backend", "inductor")
    mode, inductor_options, dynamic = options.get("mode"), options.get("options"), options.get("dynamic")
    if backend == "inductor":
        if mode is None and inductor_options is None:
            mode = "default"
        return torch._TorchCompileInductorWrapper(mode, inductor_options, dynamic)
    return torch._TorchCompileWrapper(backend, mode, inductor_options, dynamic)


def options_key(options: dict[str, Any]) -> tuple[Any, ...]:
    """``options`` as a hashable key (a cache key per set of options); dicts by
    their items, other values as they are (a backend function by identity)."""

    def hashable(v: Any) -> Any:
        if isinstance(v, dict):
            return tuple(sorted((k, hashable(x)) for k, x in v.items()))
        return tuple(hashable(x) for x in v) if isinstance(v, list) else v

    return hashable(options)


_compiles = threading.local()  # ``count``: graphs _gated_backend compiled on this thread


def _compiles_on_this_thread() -> int:
    return getattr(_compiles, "count", 0)


def _writes_outside_objects() -> bool:
    """Whether the frame Dynamo is compiling writes Python objects that existed
    before it ran (Dynamo replays those writes after the graph); False if this
    torch's Dynamo cannot tell (a test checks that it can)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew

        effects = InstructionTranslator.current_tx().output.side_effects
        return any(
            not isinstance(v.mutation_type, (AttributeMutationNew, ValueMutationNew)) and effects.is_modified(v)
            for v in effects.id_to_variable.values()
        )
    except Exception:  # (Dynamo's internals: a torch that moved them)
        return False


def _gated_backend(options: dict[str, Any], fun_name: str) -> Backend:
    """The requested torch.compile backend, whose compiled graphs run with the
    gate released."""
    inner = requested_backend(options)
    warned: list[bool] = []

    def backend_fn(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        _compiles.count = _compiles_on_this_thread() + 1
        if not warned and _writes_outside_objects():
            warned.append(True)
            warnings.warn(
                f"torchpmap: pmap of {fun_name} with compile=: the function writes Python objects it did not "
                f"create (a list it appends to, a counter, an attribute). Each replica's compiled copy "
                f"replays such writes after its graph, from what it read before, while the other replicas "
                f"run theirs (their collectives must meet): writes to an object the replicas share are "
                f"lost. Keep such writes outside the pmapped function, or pass compile=False",
                RuntimeWarning,
                stacklevel=2,
            )
        graph = inner(gm, example_inputs)

        def run_graph(*args: Any) -> Any:
            paused = DYNAMO_GATE.pause()
            try:
                with _random.restored():
                    return graph(*args)
            finally:
                if paused:
                    DYNAMO_GATE.enter()

        return run_graph

    return backend_fn


class CompiledReplicas:
    """The compiled programs of one pmapped function."""

    def __init__(self, fun: Callable[..., Any], options: dict[str, Any], fun_name: str) -> None:
        self._fun = fun
        self._options = options
        self._fun_name = fun_name
        self.options = options  # the stacked executor compiles its batched graph with them
        self._programs: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._lock = threading.Lock()
        # One backend object for every copy: Dynamo guards on the backend's
        # identity, so a backend per copy would recompile shared inner frames.
        self._backend = _gated_backend(options, fun_name)
        self._warned_eager: set[str] = set()  # why calls ran eagerly: each said once per function
        _track_compiles()

    def programs(
        self,
        devices: Sequence[torch.device],
        n: int,
        per_replica_objects: bool = False,
        signature: tuple[Any, ...] = (),
    ) -> list[Callable[..., Any]]:
        """One callable per replica; replicas on the same physical device share,
        unless each replica gets its own objects (PerReplica modules): Dynamo
        guards on those, so sharing would recompile per replica until it hit
        the recompile limit. ``signature`` (``CallRecord.constants_signature``):
        Dynamo's guards take a -0.0 argument for 0.0 (and (True,) for (1,)), so
        each signature gets its own copy."""
        out: list[Callable[..., Any]] = []
        for rank, d in enumerate(devices):
            key: tuple[Any, ...] = (n, "cpu" if d.type == "cpu" else str(d), signature)
            if per_replica_objects:
                key = (*key, rank)
            prog = self._programs.get(key)
            if prog is None:
                with self._lock:
                    prog = self._programs.get(key)
                    if prog is None:
                        prog = self._programs[key] = self._compile_copy(d, n)
            out.append(prog)
        return out

    def _compile_copy(self, device: torch.device, n: int) -> Callable[..., Any]:
        t = _trampoline_factory(self._fun)
        # A distinct code object: a distinct Dynamo cache (see module docstring).
        code = t.__code__.replace()
        entry = types.FunctionType(code, t.__globals__, t.__name__, t.__defaults__, t.__closure__)
        compiled = torch_compile(
            entry,
            backend=self._backend,
            fullgraph=self._options.get("fullgraph", False),
            dynamic=self._options.get("dynamic"),
            # Frames behind a graph break are compiled under their own (shared)
            # code objects, once per replica when replicas hold their own
            # modules (and again per axis size): leave room for all of them.
            recompile_limit=torch._dynamo.config.recompile_limit + 4 * n,
        )
        clear_cache_when_dropped(compiled, code)
        name, where, fun = self._fun_name, device, self._fun
        recompiles = RecaptureWatch()

        def run(*args: Any, **kwargs: Any) -> Any:
            eager = _why_eager(args, kwargs)
            if eager is not None:
                if eager not in self._warned_eager:
                    self._warned_eager.add(eager)
                    warnings.warn(f"torchpmap: pmap of {name} with compile=: {eager}", RuntimeWarning, stacklevel=2)
                return fun(*args, **kwargs)
            DYNAMO_GATE.enter()
            try:
                before = _compiles_on_this_thread()
                with _random.hidden_from_dynamo(), capture_config(eager_rounding=False, constant_floats=True):
                    out = compiled(*args, **kwargs)
                recompiles.after_call(_compiles_on_this_thread(), before, args, kwargs, fun, "compile=")
                return out
            except torch._dynamo.exc.TorchDynamoException as e:
                if _user_exception_while_tracing(e):
                    # With fullgraph=True Dynamo reports the user's own exception
                    # (a bad perm, an unbound axis) as Unsupported, without the
                    # original. Tracing ran nothing, so running the function
                    # eagerly raises the real exception, type and all.
                    DYNAMO_GATE.exit()
                    return fun(*args, **kwargs)
                raise CompileError(
                    f"torch.compile failed for {name} (pmap replica on {where}): "
                    f"{type(e).__name__}: {e}\nPass compile=False to pmap to run it eagerly."
                ) from e
            finally:
                DYNAMO_GATE.exit()

        return run


def _why_eager(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why a compile= replica runs this call eagerly; None if compiled code may run it."""
    if arguments_share_memory(args, kwargs):
        # AOTAutograd would merge them into their common base (the caller's whole
        # tensor, every replica's rows) and write all of it back after a mutation,
        # over the other replicas' rows: eager runs them as PyTorch does.
        return (
            "two arguments of a replica are views of one tensor (the same tensor passed twice, or mapped "
            "and also passed whole); such calls run eagerly"
        )
    if global_module_hooks():
        return (
            f"{GLOBAL_HOOKS_REASON}, which compiled code would not see if added later; calls run eagerly while they are"
        )
    if _forward_ad._current_level >= 0 and any(
        isinstance(v, torch.Tensor) and _forward_ad.unpack_dual(v).tangent is not None
        for v in tree_leaves((args, kwargs))
    ):
        # The compiled graph sees primals: the collectives' kernels, which move tangents
        # eagerly, would drop them without an error.
        return "its inputs carry forward-mode tangents (forward_ad, torch.func.jvp), which run eagerly"
    return None


def arguments_share_memory(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether two distinct tensor arguments share memory: a mapped argument's
    slices are views of the caller's tensor, and so are those of its
    ``detach()`` or ``.data``, which are no views of it by ``_base``. The same
    tensor object twice is fine (Dynamo makes it one input), and so are tensors
    that share no element (AOTAutograd keeps them apart)."""
    leaves = {id(v): v for v in tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)}
    strided = [v for v in leaves.values() if v.layout is torch.strided and not v.is_meta]
    if len(strided) < 2:
        return False
    # Tensors of storages of their own (a model's parameters) share nothing: no element-wise
    # check for them. (Two storages over one buffer, as from_numpy can make, are not seen.)
    by_storage: dict[int, list[torch.Tensor]] = {}
    for v in strided:
        by_storage.setdefault(v.untyped_storage().data_ptr(), []).append(v)
    shared = [v for group in by_storage.values() if len(group) > 1 for v in group]
    if not shared:
        return False
    from ._sharded import pairs_sharing_memory  # _sharded imports much of the package

    return next(pairs_sharing_memory(shared), None) is not None


def _user_exception_while_tracing(e: BaseException) -> bool:
    return any(isinstance(cur, torch._dynamo.exc.ObservedException) for cur in exception_chain(e))
