"""psum, pmean, pmax and pmin of Python numbers that replicas hold as their own.

In JAX a Python number inside a pmapped function is a constant, the same on
every replica, so ``psum(v)`` is ``n * v`` with no exchange. torchpmap's
replicas run Python (the threads executor), where a number is often the
replica's own: ``loss.item()``, ``int(axis_index("i"))``. Taken for a constant,
``pmean(loss.item(), "i")`` silently gave each replica its own loss. Where a
replica's Python runs, such numbers are exchanged (one all_gather of their
bits) and reduced in replica order, the same on every replica; numbers equal
on every replica give exactly what the constant rule gives, so results match
the captured executors, in whose traces numbers are constants.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import CollectiveMismatchError

# How a number travels: [kind, a, b] as int64 (floats by their bits).
_BOOL, _INT, _FLOAT, _COMPLEX = range(4)


def reduce_numbers(
    values: Sequence[Any],
    op: str,
    mean: bool,
    fn: str,
    gather: Callable[[torch.Tensor], torch.Tensor],
    members: Sequence[int] | None,
    device: torch.device | str,
) -> list[Any]:
    """``values`` (this replica's numbers) reduced with ``op`` over its group: the
    axis's replicas whose encodings ``gather`` stacks on a new first dimension
    (all_gather), those at ``members`` only when given (axis_index_groups); the
    encodings travel on ``device``, the replica's."""
    mine = torch.tensor([_encode(v, fn) for v in values], dtype=torch.int64, device=device)
    try:
        every = gather(mine).tolist()  # [replica][leaf] -> [kind, a, b]
    except CollectiveMismatchError as e:
        raise CollectiveMismatchError(
            f"{fn} of Python numbers exchanges them between the replicas (an all_gather of their bits): every "
            f"replica must call it, with the same tree, at the same point. {e}"
        ) from None
    if members is not None:
        every = [every[m] for m in members]
    results = []
    for j, v in enumerate(values):
        coded = [member[j] for member in every]
        decoded = [_decode(c) for c in coded]  # (a complex one only summed: pmax/pmin refuse it before)
        n = len(decoded)
        if all(c == coded[0] for c in coded):
            # The same number everywhere: exactly the constant rule (n * v), as a capture computes it.
            result = v * n if op == "sum" else v
            results.append(result / n if mean else result)
            continue
        results.append(_as_type_of(v, coded, _reduced(decoded, op, mean)))
    return results


def _reduced(decoded: list[Any], op: str, mean: bool) -> Any:
    if op == "sum":
        total = decoded[0]
        for d in decoded[1:]:  # in replica order: every replica adds alike
            total = total + d
        return total / len(decoded) if mean else total
    if any(isinstance(d, float) and math.isnan(d) for d in decoded):
        return math.nan  # NaN propagates, as pmax/pmin of tensors
    return max(decoded) if op == "max" else min(decoded)


def _as_type_of(v: Any, coded: list[list[int]], result: Any) -> Any:
    """A numpy scalar's reduction of numbers all of its kind as that numpy type."""
    if isinstance(v, np.generic) and all(c[0] == coded[0][0] for c in coded) and not isinstance(result, bool):
        return type(v)(result)
    return result


def _encode(v: Any, fn: str) -> list[int]:
    if isinstance(v, (bool, np.bool_)):
        return [_BOOL, int(v), 0]
    if isinstance(v, numbers.Integral):
        i = int(v)
        if not -(2**63) <= i < 2**63:
            raise TypeError(f"{fn}: the Python int {i} does not fit in 64 bits; reduce it as a tensor")
        return [_INT, i, 0]
    if isinstance(v, numbers.Real):
        return [_FLOAT, _bits(float(v)), 0]
    if isinstance(v, numbers.Complex):
        c = complex(v)
        return [_COMPLEX, _bits(c.real), _bits(c.imag)]
    raise TypeError(f"{fn}: cannot reduce {type(v).__name__} {v!r}")


def _decode(c: list[int]) -> Any:
    kind, a, b = c
    if kind == _BOOL:
        return bool(a)
    if kind == _INT:
        return a
    if kind == _FLOAT:
        return _float(a)
    return complex(_float(a), _float(b))


def _bits(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def number_dtype(v: Any, op: str, mean: bool) -> torch.dtype:
    """The dtype of the 0-dim tensor a number is reduced as inside a trace, so that
    its result is the number Python's arithmetic gives (a mean of ints is a float64)."""
    if isinstance(v, numbers.Complex) and not isinstance(v, numbers.Real):
        return torch.complex128
    if mean or (isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral)):
        return torch.float64
    if isinstance(v, bool) and op != "sum":
        return torch.bool  # (a sum of booleans counts them)
    return torch.int64
