"""Batching rules that give one replica another result than eager: refused.

The stacked executor traces the function under functorch's vmap, so where a
batching rule is wrong the batched graph is silently wrong. Those found by
differential runs against the threads executor (``torch.vmap`` shows each):

* ``roll`` of a 0-dim tensor without ``dims`` rolls across the replicas;
* ``argmax``/``argmin``/``aminmax`` with ``keepdim=True`` and no ``dim`` keep
  one dimension instead of every one;
* ``all``/``any``/``logsumexp`` over an empty ``dim`` list reduce everything
  (eager: ``all``/``any`` are elementwise, ``logsumexp`` raises);
* ``as_strided_`` (in place) leaves the batched tensor as it was: the call is
  lost, with its shape and strides;
* ``baddbmm``/``addbmm``/``addmv``/``addmm``/``addr`` of integer tensors give
  float32 with float ``beta``/``alpha`` (eager keeps the dtype and truncates
  them), and int64 for int8 ``addbmm``.

While the batched graph is traced, such a call stops the capture: the call
runs on the threads, with a warning naming the op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ._promotion_guard import batched, under
from ._torch_originals import original


class BatchingRuleDiffers(Exception):
    """A call whose batching rule gives another result than one replica's eager run."""


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _roll(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return args[0].dim() == 0 and _arg(args, kwargs, 2, "dims") in (None, (), [])


def _keepdim_without_dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return args[0].dim() >= 2 and _arg(args, kwargs, 1, "dim") is None and bool(_arg(args, kwargs, 2, "keepdim"))


def _empty_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    dim = _arg(args, kwargs, 1, "dim", default=0)
    return isinstance(dim, (tuple, list)) and len(dim) == 0


def _integer(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return not (args[0].is_floating_point() or args[0].is_complex())


# The add-multiply family: functions, methods and in place.
_INTEGER_MATMUL = {f"{op}{suffix}" for op in ("baddbmm", "addbmm", "addmv", "addmm", "addr") for suffix in ("", "_")}

_WRONG: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], bool]] = {
    **dict.fromkeys(_INTEGER_MATMUL, _integer),
    "roll": _roll,
    "as_strided_": lambda args, kwargs: True,
    "argmax": _keepdim_without_dim,
    "argmin": _keepdim_without_dim,
    "aminmax": _keepdim_without_dim,  # (its dim and keepdim are keyword-only: _arg finds them there)
    "all": _empty_dims,
    "any": _empty_dims,
    "logsumexp": _empty_dims,
}


class _Refuse(TorchFunctionMode):
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        func = original(func)  # (a user's replacement would run again: _torch_originals)
        wrong = _WRONG.get(getattr(func, "__name__", ""))
        if wrong is not None and args and isinstance(args[0], torch.Tensor):
            # The batching rule applies when any tensor argument is batched (the add-multiplies
            # take several; the other ops one).
            if any(isinstance(a, torch.Tensor) and batched(a) for a in args) and wrong(args, kwargs):
                raise BatchingRuleDiffers(
                    f"{func.__name__} with these arguments: its batching rule gives a replica another "
                    f"result than eager PyTorch"
                )
        return func(*args, **kwargs)


def refused(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced with the refusals above."""
    return under(_Refuse, fn)
