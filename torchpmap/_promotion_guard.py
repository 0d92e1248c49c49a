"""Type promotion that batching changes: refused while the stacked executor traces.

One replica's 0-dim tensor (a loss, a norm, ``x[i]``) is a batched (n,) tensor
under vmap. PyTorch promotes a 0-dim tensor more weakly than a dimensioned one
(``bf16_tensor * f32_scalar`` stays bfloat16, computed with the scalar at full
precision; ``uint8 < int32_scalar`` compares as uint8), and functorch's batching
rules do not all keep that: ``torch.where`` gives float64 for a float32 tensor
and a float64 scalar, the comparison runs in int32, the product rounds the
scalar to bfloat16 first. PyTorch's CPU kernels also read a 0-dim operand's
value in the op's math type (float32 for bfloat16 and float16), where the
batched operand is first cast to the tensor's dtype (``bf16_loss * 0.1``,
``bf16_x * count``, a rounding division), and they check what batching skips
(a bool operand of ``sub``, a fill value that overflows). Each would be a silent
difference from the threads executor, so while the batched graph is traced, such
an op (``_refusal``) stops the capture: the call runs on the threads, with a
warning naming the op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ._torch_originals import original

# Python operator names whose aten op is named otherwise, and aliases whose own
# aten packet is a composite without the pointwise tag (torch.multiply runs
# aten.mul): tests/test_promotion_guard.py finds every function that runs one
# pointwise op and checks that it is named here or is that op.
_ATEN_NAME = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "mod": "remainder",
    "and": "bitwise_and",
    "or": "bitwise_or",
    "xor": "bitwise_xor",
    "lshift": "bitwise_left_shift",
    "rshift": "bitwise_right_shift",
    "multiply": "mul",
    "divide": "div",
    "subtract": "sub",
    "greater": "gt",
    "greater_equal": "ge",
    "less": "lt",
    "less_equal": "le",
    "not_equal": "ne",
    "arctan2": "atan2",
    "special_gammainc": "igamma",
    "special_gammaincc": "igammac",
    "special_xlogy": "xlogy",
    "special_logit": "logit",
}
# Promoting elementwise ops that aten does not tag pointwise.
_UNTAGGED_POINTWISE = {"floor_divide"}


class PerReplicaScalarPromotion(Exception):
    """A promoting op met a per-replica 0-dim tensor and a tensor of another dtype."""


@functools.cache
def _aten_name(name: str) -> str | None:
    """The pointwise aten op that the torch function or Tensor method ``name``
    (``mul``, ``mul_``, ``__rmul__``, ``__truediv__``, ``multiply``) runs, None
    for any other: pointwise ops promote their tensor arguments to one dtype."""
    name = name.strip("_")
    candidates = [name, _ATEN_NAME.get(name, name)]
    if name[:1] in ("r", "i"):  # reflected and in-place operators: __radd__, __imul__
        candidates += [name[1:], _ATEN_NAME.get(name[1:], name[1:])]
    for candidate in candidates:
        if candidate in _UNTAGGED_POINTWISE:
            return candidate
        packet = getattr(torch.ops.aten, candidate, None)
        if isinstance(packet, torch._ops.OpOverloadPacket) and any(
            torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads()
        ):
            return candidate
    return None


def _promotes(name: str) -> bool:
    return _aten_name(name) is not None


# For these, CPU kernels read a 0-dim operand's value (a tensor's or a Python
# number's) in float32, the math type of bfloat16 and float16, where batching
# first casts it to the tensor's dtype: ``bf16 * 0.1``, ``bf16 * count``. Others
# (add, pow, clamp, where, ...) compute alike (tests/test_promotion_guard.py).
_REDUCED_FLOATS = (torch.bfloat16, torch.float16)
_READS_SCALAR_IN_FLOAT32 = {"mul", "div", "floor_divide"}
# Ops one replica refuses for a bool operand, or for operands of two dtypes, which
# a batched (n,) operand gets past: the threads raise as eager does.
_REFUSES_BOOL = {"sub", "rsub"}
_ONE_DTYPE_ONLY = {"heaviside", "nextafter"}


def _diverges(scalar: torch.Tensor, other: torch.Tensor, aten: str) -> bool:
    """Whether batching may promote a per-replica 0-dim ``scalar`` with ``other``
    in op ``aten`` unlike one replica does. Alike: the same dtype, a bool on
    either side (it promotes to the other's dtype both ways), an integer scalar
    with a floating tensor (cast to it both ways: ``x + axis_index``), except a
    bfloat16 or float16 one in a product or quotient (eager multiplies by 257 in
    float32, batching rounds it to 256 first). Not: a floating scalar with a
    tensor of another dtype (a reduced-precision tensor computes with the scalar
    at full precision in eager, and ``where``/``clamp`` let the batched scalar
    win), an integer scalar with an integer tensor of another dtype."""
    if scalar.dtype == other.dtype or torch.bool in (scalar.dtype, other.dtype):
        return False
    if scalar.is_floating_point() or scalar.is_complex():
        return True
    if other.is_floating_point() or other.is_complex():
        return other.dtype in _REDUCED_FLOATS and aten in _READS_SCALAR_IN_FLOAT32
    return True


def _refusal(name: str, aten: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why batching would compute pointwise op ``name`` (aten ``aten``) on these
    arguments unlike one replica does, None if it would not."""
    leaves = tree_leaves((args, kwargs))
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    per_replica_scalar = [t.dim() == 0 and batched(t) for t in tensors]
    scalars = [t for t, s in zip(tensors, per_replica_scalar) if s]
    if not scalars:
        return None
    others = [t for t, s in zip(tensors, per_replica_scalar) if not s]
    s = scalars[0]
    head = f"{name} of a per-replica 0-dim {s.dtype} tensor"
    if aten == "ldexp":
        return f"{head}: batching multiplies by a power of two (0 * inf gives nan where one replica gives 0)"
    if aten in _REFUSES_BOOL and any(t.dtype == torch.bool for t in tensors):
        return f"{head} and a bool operand, which one replica refuses and batching does not"
    if aten in _ONE_DTYPE_ONLY and len({t.dtype for t in tensors}) > 1:
        return f"{head} and a tensor of another dtype, which one replica refuses and batching does not"
    rounding = aten == "floor_divide" or (aten == "div" and kwargs.get("rounding_mode") is not None)
    if rounding and any(t.dtype in _REDUCED_FLOATS for t in tensors):
        return (
            f"{head}: a rounding division in bfloat16 or float16 rounds the quotient to it before the "
            f"rounding mode when batched, one replica rounds once"
        )
    numbers = [a for a in leaves if isinstance(a, (int, float, complex)) and not isinstance(a, bool)]
    reduced = next((t for t in scalars if t.dtype in _REDUCED_FLOATS), None)
    reads_in_float32 = aten in _READS_SCALAR_IN_FLOAT32 or ("alpha" in kwargs and aten in ("add", "sub", "rsub"))
    if reduced is not None and numbers and reads_in_float32:
        return (
            f"{name} of a per-replica 0-dim {reduced.dtype} tensor and the Python number {numbers[0]!r}: batching "
            f"rounds the number to {reduced.dtype} first, one replica computes with it in float32"
        )
    for scalar in scalars:
        other = next((t for t in others if _diverges(scalar, t, aten)), None)
        if other is not None:
            return (
                f"{name} of a per-replica 0-dim {scalar.dtype} tensor and a {other.dtype} tensor: batching "
                f"would promote them unlike one replica does (cast one to the other's dtype first)"
            )
    return None


def _index_fill_refusal(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """index_fill's value, a per-replica 0-dim tensor of another dtype than the
    tensor it fills: one replica checks that it fits (int8 overflow raises),
    batching writes it converted."""
    target = args[0] if args else kwargs.get("input", kwargs.get("self"))
    value = args[3] if len(args) > 3 else kwargs.get("value")
    if isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor) and value.dim() == 0 and batched(value):
        if value.dtype != target.dtype:
            return (
                f"{name} of a per-replica 0-dim {value.dtype} value into a {target.dtype} tensor: batching "
                f"skips the check one replica makes that the value fits"
            )
    return None


_INDEX_FILLS = {"index_fill", "index_fill_"}


def batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched at some functorch level (under a grad transform too)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


class _Guard(TorchFunctionMode):
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        func = original(func)  # (a user's replacement would run again: _torch_originals)
        name = getattr(func, "__name__", "")
        aten = _aten_name(name) if name else None
        reason = None
        if aten is not None:
            reason = _refusal(name, aten, args, kwargs)
        elif name in _INDEX_FILLS:
            reason = _index_fill_refusal(name, args, kwargs)
        if reason is not None:
            raise PerReplicaScalarPromotion(reason)
        return func(*args, **kwargs)


def under(mode: type[TorchFunctionMode], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with ``mode`` active (inside vmap, where the stacked executor
    traces: the mode sees one replica's logical tensors)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with mode():
            return fn(*args, **kwargs)

    return run


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced under the guard."""
    return under(_Guard, fn)
