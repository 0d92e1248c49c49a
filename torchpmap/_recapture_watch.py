"""A warning, once per capture, when a Python float argument keeps taking new values:
each value costs a capture (or a compile) of its own."""

from __future__ import annotations

import warnings
from typing import Any

import torch


class RecaptureWatch:
    """Tells the user once when a capture keeps being made again because a Python float
    argument takes new values (a learning rate passed as a float): a capture bakes the
    value in (static, as ``torch.compile(dynamic=False)``), so each value costs a capture
    (the stacked and lockstep executors; ``compile=``'s per-replica programs, a compile),
    until the recapture limit sends the function to the threads (or runs it eagerly). A
    0-dim tensor is traced."""

    WARN_AFTER = 3  # recaptures with a new float value

    __slots__ = ("floats", "count")

    def __init__(self) -> None:
        self.floats: list[float] | None = None  # the Python floats among the last capture's arguments
        self.count = 0

    def after_call(
        self, captures: int, before: int, args: Any, kwargs: dict[str, Any], fun: Any, executor: str
    ) -> None:
        """``captures``/``before``: the capture count after and before the call."""
        if captures == before:
            return
        floats = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if type(v) is float]
        previous, self.floats = self.floats, floats
        if before == 0 or previous is None or len(previous) != len(floats) or previous == floats:
            return
        self.count += 1
        if self.count == self.WARN_AFTER:
            changed = next((a, b) for a, b in zip(previous, floats) if a != b)
            name = getattr(fun, "__qualname__", None) or repr(fun)
            warnings.warn(
                f"torchpmap: pmap of {name} ({executor}): a Python float argument took a new value "
                f"({changed[0]!r} -> {changed[1]!r}), and each new value captures the function again "
                f"({self.count} times so far): a capture bakes the value in. Pass it as a 0-dim tensor "
                f"(torch.tensor(value), in_axes=None), which one capture serves for every value.",
                RuntimeWarning,
                stacklevel=2,
            )
