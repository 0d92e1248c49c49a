"""Per-replica random streams for replicas that run on worker threads.

PyTorch draws random numbers from one process-wide generator per device. Replicas
running on threads would share it and draw in whatever order the threads run:
the same seed would give different dropout masks on every run, and replicas
could get the same masks. Instead, each replica draws from its own stream:

* A run through the replicas (a forward, or a backward) derives its streams
  from one 64-bit number drawn from the caller's CPU generator, the first time
  a replica needs one (so a call without randomness leaves the caller's
  generator alone), and from the replica's global index along the axis. Replica
  i of a job gets the same stream whether it runs as 1 process x 4 devices or
  2 x 2, provided every process seeded alike.
* A `torch.Generator` passed explicitly is used as it is. One created in the
  replica is the replica's own; one that two replicas of a call draw from is
  refused (`CallRandomness.claim`), since their numbers would depend on thread
  order.

A thread-local torch-function mode (`ReplicaRandomness`) sees the random
functions a replica calls. Those that take ``generator=`` and were given none
get the replica's generator for their device; the others (dropout, RNNs,
attention with dropout, rrelu, ...) run with the replica's state swapped into
the device's default generator under a process-wide lock. A draw that bypasses
both (a C++ function not listed here, ``torch.manual_seed`` in a replica)
changes the caller's generator; `CallRandomness.finish` notices that and warns.
Under ``compile=`` the mode is hidden from Dynamo and active while the
compiled graphs run (`hidden_from_dynamo`, `restored`).

The mode costs a Python call per torch function, so a function's replicas run
under it only if they drew on its first run (`Interception`).
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode

from . import _uncounted_writes
from ._fork import reinit_after_fork
from ._sharded import written_without_saying
from ._torch_originals import original

# Guards the process's default generators while a replica's state is swapped
# into one, and the draws of call seeds from the caller's generator.
_DEFAULT_GENERATORS_LOCK = reinit_after_fork(threading.Lock())
# Call seeds drawn so far: a call that sees this move during its run cannot
# tell its own draws from another call's, and skips the bypass check.
_seeds_drawn = 0

# Functions that draw random numbers and take ``generator=``: the replica's
# generator for the op's device is passed. (Names as the torch-function mode
# sees them: torch.*, Tensor methods, torch.nn.init.*, torch.ops.aten.*.)
_TAKE_GENERATOR = frozenset(
    """
    rand rand_like randn randn_like randint randint_like randperm bernoulli bernoulli_ multinomial
    normal normal_ uniform_ random_ exponential_ geometric_ cauchy_ log_normal_ poisson binomial
    _standard_gamma _sample_dirichlet _fused_dropout rrelu_with_noise rrelu_with_noise_ rrelu_with_noise_functional
    trunc_normal_ kaiming_uniform_ kaiming_normal_ xavier_uniform_ xavier_normal_ orthogonal_ sparse_
    uniform exponential geometric cauchy log_normal random normal_functional
    """.split()
)

# Functions that draw from the default generator without taking one, or call
# such functions internally once the mode has handed them over: they run with
# the replica's state swapped in. The spec says when they draw at all, as eager
# PyTorch does: where to find the probability, then the training flag, as
# (index, keywords, default), None where not an argument; and the probabilities
# at which nothing is drawn (dropout at p=1 returns zeros without a draw, and so
# does any of them on an empty input; native_dropout draws its mask at any p).
_Where = tuple[int, tuple[str, ...], Any]


class _Spec(NamedTuple):
    probability: _Where | None
    training: _Where | None
    no_draw_at: tuple[float, ...] = (0.0,)


_P, _TRAINING = (1, ("p",), 0.5), (2, ("training", "train"), True)
_DROPOUT = _Spec(_P, _TRAINING, (0.0, 1.0))
# F.alpha_dropout and F.feature_alpha_dropout (training=False); torch.alpha_dropout's flag has no default.
_DROPOUT_OFF_BY_DEFAULT = _Spec(_P, (2, ("training", "train"), False), (0.0, 1.0))
_SWAP_WHEN: dict[str, _Spec | None] = {
    **dict.fromkeys(
        """dropout dropout_ alpha_dropout_ feature_dropout feature_dropout_ feature_alpha_dropout_
        dropout1d dropout2d dropout3d""".split(),
        _DROPOUT,
    ),
    **dict.fromkeys(("alpha_dropout", "feature_alpha_dropout"), _DROPOUT_OFF_BY_DEFAULT),
    "native_dropout": _Spec(_P, _TRAINING, ()),  # draws its mask at p=0 and p=1 too (eager's kernel does)
    "rrelu": _Spec(None, (3, ("training",), False)),
    "rrelu_": _Spec(None, (3, ("training",), False)),
    "scaled_dot_product_attention": _Spec((4, ("dropout_p",), 0.0), None, (0.0, 1.0)),
    "multi_head_attention_forward": _Spec((10, ("dropout_p",), 0.0), (13, ("training",), True)),
    # Always: their arguments vary by overload, and they are rarely hot.
    **dict.fromkeys(
        """gumbel_softmax fractional_max_pool2d fractional_max_pool3d fractional_max_pool2d_with_indices
        fractional_max_pool3d_with_indices lstm gru rnn_tanh rnn_relu inductor_seeds inductor_random
        inductor_randint""".split(),
        None,
    ),
}

_CPU = torch.device("cpu")
_DEVICE_TYPE_STREAM = {"cpu": 1, "cuda": 2}
_MASK64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """A 64-bit hash of ``words`` (splitmix64 steps): nearby indices give
    unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (w & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _state_bytes(g: torch.Generator) -> bytes:
    return bytes(g.get_state().numpy())


def _set_state(device: torch.device, state: bytes) -> None:
    """The default generator of ``device`` back at ``state`` (from ``_state_bytes``)."""
    _default_generator(device).set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))


class Interception:
    """Whether one pmapped function's replicas run under the streams mode.

    The mode costs a Python call per torch function in every replica (about a
    third of a small MLP step), so only functions that draw pay it: the first
    run always has it and records whether a replica drew; later runs of a
    function that did not draw run without it, and if one of them does draw
    after all (a module switched to train(), a branch), `CallRandomness.finish`
    sees the caller's generator moved, warns once, and the function keeps the
    mode from then on."""

    def __init__(self) -> None:
        self.needed: bool | None = None  # None: not known before the first run


class CallRandomness:
    """The random streams of one run through the replicas."""

    def __init__(self, devices: Sequence[torch.device], interception: Interception | None = None) -> None:
        self._interception = interception
        self.active = interception is None or interception.needed is not False
        self._lock = threading.Lock()
        self._seed: int | None = None
        self._state_before_seed: bytes | None = None  # the caller's CPU generator before the draw
        self._drew = False
        # The replica that used each explicitly passed generator first.
        self._generator_users: dict[torch.Generator, int] = {}
        physical = [_CPU, *sorted({d for d in devices if d.type == "cuda"}, key=str)]
        with _DEFAULT_GENERATORS_LOCK:
            self._seeds_drawn = _seeds_drawn
            self._expected = {d: _state_bytes(_default_generator(d)) for d in physical}

    @classmethod
    def replaying(cls, devices: Sequence[torch.device], seed: int) -> CallRandomness:
        """The streams of an earlier run whose seed was ``seed``, from their start:
        the same draws in the same order give the same numbers again (a stacked
        backward that recomputes its forward). The caller's generator is not read."""
        call = cls(devices, None)
        call._seed = seed
        return call

    @property
    def drawn_seed(self) -> int | None:
        """This run's seed if a replica drew one, else None."""
        return self._seed

    def seed(self) -> int:
        """This run's seed, drawn from the caller's CPU generator on first use."""
        global _seeds_drawn
        with self._lock:
            self._drew = True
            if self._seed is None:
                with _DEFAULT_GENERATORS_LOCK:
                    with torch._C._DisableFuncTorch():  # a replica may be inside a torch.func transform
                        self._state_before_seed = self._expected[_CPU]  # read at the start: nothing drew since
                        self._seed = int(torch.empty((), dtype=torch.int64, device="cpu").random_()) & _MASK64
                        self._expected[_CPU] = _state_bytes(torch.default_generator)
                    _seeds_drawn += 1
                    self._seeds_drawn += 1
            return self._seed

    def rewind(self) -> None:
        """Undo this run's seed draw: a run that is about to be done again (a
        captured executor falling back to the threads after its replicas drew)
        must draw the same seed, as if this run had never been. Not when another
        call drew a seed since: the caller's generator has moved on for it."""
        with self._lock, _DEFAULT_GENERATORS_LOCK:
            if self._state_before_seed is None or _seeds_drawn != self._seeds_drawn:
                return
            _set_state(_CPU, self._state_before_seed)
            self._state_before_seed = None

    def replica(self, index: int) -> AbstractContextManager[Any]:
        return ReplicaRandomness(self, index) if self.active else nullcontext()

    def claim(self, generator: torch.Generator, index: int) -> None:
        """Replica ``index`` draws from ``generator``: refuse a generator that
        another replica of this run drew from, since the numbers each gets
        would depend on the order the threads run in."""
        with self._lock:
            user = self._generator_users.setdefault(generator, index)
        if user != index:
            raise RuntimeError(
                f"replicas {min(user, index)} and {max(user, index)} both drew random numbers from one "
                "torch.Generator, so each one's numbers would depend on thread timing. Create the generator "
                "inside the pmapped function (seeded alike in every replica for the same numbers, or from "
                "tp.axis_index for different ones), or use PyTorch's default generator, which gives every "
                "replica its own stream."
            )

    def finish(self, label: str, *, failed: bool) -> None:
        """After the run: learn whether the function draws, and warn if a
        replica drew from a default generator behind the streams' back."""
        if self.active and self._interception is not None and self._interception.needed is None and not failed:
            self._interception.needed = self._drew
        if failed:
            return
        with _DEFAULT_GENERATORS_LOCK:
            if _seeds_drawn != self._seeds_drawn:
                return  # another call drew a seed meanwhile: the states say nothing
            changed = [str(d) for d, state in self._expected.items() if _state_bytes(_default_generator(d)) != state]
        if not changed:
            return
        where = ", ".join(changed)
        if not self.active:
            # The generator is left as it is: another thread may have drawn from it during the
            # call too (a data loader), and setting it back would give that thread its numbers again.
            assert self._interception is not None
            self._interception.needed = True
            warnings.warn(
                f"{label} drew random numbers on this call but not on its first, so this call's replicas "
                f"drew from PyTorch's shared generator ({where}) in thread order: this call's numbers are "
                "not reproducible. From now on every call gives each replica its own stream. To have that "
                "from the first call, make the first call draw (e.g. call it in train() mode first). "
                f"{_CHECKPOINT_HINT}",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        warnings.warn(
            f"{label}: a replica drew random numbers from PyTorch's default generator ({where}) in a way "
            "torchpmap does not intercept (a function it does not know draws, or torch.manual_seed or "
            "set_rng_state inside the replica), so those numbers depend on thread timing and are not "
            "reproducible. Pass generator= to that function, or set the state outside the pmapped "
            f"function. {_CHECKPOINT_HINT}",
            RuntimeWarning,
            stacklevel=4,
        )


# The other ways than a draw for a call to change a default generator's state.
_CHECKPOINT_HINT = (
    "torch.utils.checkpoint's recomputation also saves and restores that generator (preserve_rng_state=True, "
    "its default), which replicas on threads do at once: pass preserve_rng_state=False to a checkpoint in a "
    "pmapped function (a replica may not draw inside one anyway). Another thread drawing random numbers during "
    "the call also triggers this warning."
)


class ReplicaRandomness(TorchFunctionMode):
    """Routes one replica's random functions to its own streams (thread-local).

    It sees every torch function of a function's first run, so it also records the
    writes PyTorch makes without counting a version (batch_norm's running
    statistics, ``_uncounted_writes``): the check that no replica wrote a shared
    input then sees them."""

    def __init__(self, call: CallRandomness, index: int) -> None:
        super().__init__()
        self._call = call
        self._index = index
        self._streams: dict[torch.device, torch.Generator] = {}
        self._claimed: set[torch.Generator] = set()  # explicit generators this replica drew from

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        try:
            kind, spec, func = _kinds[func]
        except (KeyError, TypeError):
            kind, spec, func = _kind_of(func)
        if kind is _NOT_RANDOM:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if kind is _UNCOUNTED_WRITES:
            result = func(*args, **kwargs)
            for t in written_without_saying(func, args, kwargs):
                if isinstance(t, torch.Tensor):
                    _uncounted_writes.record(t)
            return result
        if kind is _PASS_GENERATOR:
            given = kwargs.get("generator")
            kwargs = dict(kwargs)
            if given is None:
                device = _op_device(args, kwargs)
                if device.type == "meta":  # no values: nothing to draw
                    return func(*args, **kwargs)
                _refuse_draw_in_checkpoint(func)
                kwargs["generator"] = self._stream(device)
            elif given not in self._claimed:
                self._call.claim(given, self._index)
                self._claimed.add(given)
            return func(*args, **kwargs)
        if kind is _SWAP and _draws(spec, args, kwargs):
            device = _op_device(args, kwargs)
            if device.type == "meta":  # no values: nothing to draw
                return func(*args, **kwargs)
            _refuse_draw_in_checkpoint(func)
            with self._swapped_in(device):
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _stream(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            device = _CPU  # one stream, as eager has one CPU generator for cpu, cpu:0, cpu:3
        elif device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._streams.get(device)
        if g is None:
            if device.type not in _DEVICE_TYPE_STREAM:
                raise NotImplementedError(f"torchpmap: per-replica random streams support cpu and cuda, not {device}")
            g = torch.Generator(device)
            g.manual_seed(_mix(self._call.seed(), self._index, _DEVICE_TYPE_STREAM[device.type]))
            self._streams[device] = g
        return g

    @contextmanager
    def _swapped_in(self, device: torch.device) -> Iterator[None]:
        mine = self._stream(device)
        default = _default_generator(device)
        with _DEFAULT_GENERATORS_LOCK:
            saved = default.get_state()
            default.set_state(mine.get_state())
            try:
                yield
            finally:
                mine.set_state(default.get_state())
                default.set_state(saved)


def _refuse_draw_in_checkpoint(func: Callable[..., Any]) -> None:
    """Refuse a replica's draw inside a function that torch.utils.checkpoint
    will recompute in the backward pass. The recomputation restores the
    default generator's state, not the replica's stream (and runs with no
    torch-function mode, so nothing routes it): its dropout would take another
    mask, and the gradients would be silently wrong."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None:
        # Non-reentrant checkpoint: its hooks are there only when the checkpoint records
        # a graph (grad mode on where it was called), whatever the mode inside.
        inside = getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")
    elif torch.is_grad_enabled():
        return
    else:
        # Reentrant checkpoint runs the function under no_grad, in its Function's forward,
        # whose context has a graph to go back through only when a backward can come.
        frame = sys._getframe(2)
        while frame is not None and frame.f_code is not _REENTRANT_CHECKPOINT:
            frame = frame.f_back
        ctx = frame.f_locals.get("ctx") if frame is not None else None
        inside = bool(getattr(ctx, "next_functions", ()))
    if inside:
        raise RuntimeError(
            f"torchpmap: {getattr(func, '__name__', func)} draws random numbers inside torch.utils.checkpoint "
            "in a pmap replica. Replicas draw from torchpmap's per-replica streams, which the backward's "
            "recomputation cannot rewind: it would draw other numbers (another dropout mask) than the "
            "forward, and the gradients would be wrong. Keep random ops (dropout) outside the checkpointed "
            "function."
        )


_REENTRANT_CHECKPOINT = torch.utils.checkpoint.CheckpointFunction.forward.__code__
_PASS_GENERATOR, _SWAP, _NOT_RANDOM = "pass generator", "swap", "not random"
# Not random, but they update arguments without counting a version.
_UNCOUNTED_WRITES = "uncounted writes"
_kinds: dict[Any, tuple[str, _Spec | None, Callable[..., Any]]] = {}


def _kind_of(func: Callable[..., Any]) -> tuple[str, _Spec | None, Callable[..., Any]]:
    """How the mode handles ``func``, and what it calls for it (the torch function
    a user's replacement stands in for: ``_torch_originals``), on a miss of the
    handler's ``_kinds`` lookup: classified once per function object and cached."""
    target = original(func)
    entry = (*_classify(target), target)
    try:
        _kinds[func] = entry
    except TypeError:  # unhashable: classified on every call
        pass
    return entry


def _classify(func: Callable[..., Any]) -> tuple[str, _Spec | None]:
    if func is torch.nn.functional.batch_norm or func is torch.nn.functional.instance_norm:
        return _UNCOUNTED_WRITES, None
    name = getattr(func, "__name__", "")
    if isinstance(func, torch._ops.OpOverload):
        # One overload of an aten op (compiled graphs call these): overloads
        # without a generator argument (aten.rand.default, randint.low_out in
        # Inductor's seeds) draw from the default generator.
        name = func._opname  # (an attribute, not str.split: a replica's own torch.compile traces this mode)
        if name in _TAKE_GENERATOR:
            takes = any(a.name == "generator" for a in func._schema.arguments)
            return (_PASS_GENERATOR, None) if takes else (_SWAP, None)
    if name in _TAKE_GENERATOR:
        return _PASS_GENERATOR, None
    if name in _SWAP_WHEN:
        return _SWAP, _SWAP_WHEN[name]
    return _NOT_RANDOM, None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], where: _Where) -> Any:
    index, keywords, default = where
    if len(args) > index:
        return args[index]
    for k in keywords:
        if k in kwargs:
            return kwargs[k]
    return default


def _draws(spec: _Spec | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call of a listed function draws at all (dropout with p=0 or
    p=1, in eval mode or on an empty tensor does not, and need not take the lock)."""
    if spec is None:
        return True
    probability, training, no_draw_at = spec
    try:
        if args and isinstance(args[0], torch.Tensor) and args[0].numel() == 0:
            return False
        if probability is not None and float(_arg(args, kwargs, probability)) in no_draw_at:
            return False
        if training is not None:
            return bool(_arg(args, kwargs, training))
    except (TypeError, ValueError, RuntimeError):
        return True  # an unexpected signature: assume it draws
    return True


def _op_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    """The device whose generator an op draws from: its first tensor's, else
    its ``device=``, else PyTorch's default device."""
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        return out.device
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    device = kwargs.get("device")
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return torch.get_default_device()


_hidden = threading.local()


@contextmanager
def hidden_from_dynamo() -> Iterator[None]:
    """Take this replica's mode off the stack while Dynamo runs (it would trace
    the mode, and trips over Tensor methods under it); `restored` puts it back
    while a compiled graph runs, so the graph's random ops (or Inductor's
    seeds op) still draw from the replica's streams."""
    if torch._C._len_torch_function_stack() == 0 or not isinstance(
        torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1), ReplicaRandomness
    ):
        yield
        return
    previous = getattr(_hidden, "mode", None)
    with torch.overrides._pop_mode_temporarily() as mode:
        _hidden.mode = mode
        try:
            yield
        finally:
            _hidden.mode = previous


@contextmanager
def restored() -> Iterator[None]:
    mode = getattr(_hidden, "mode", None)
    if mode is None or torch._C._len_torch_function_stack() != 0:
        yield
        return
    _hidden.mode = None
    try:
        with mode:
            yield
    finally:
        _hidden.mode = mode


def replica_modes_only() -> bool:
    """True when the only torch-function mode active is this replica's streams
    mode, which the collectives' fast path may ignore (it draws nothing)."""
    return torch._C._len_torch_function_stack() == 1 and isinstance(
        torch._C._get_function_stack_at(0), ReplicaRandomness
    )
