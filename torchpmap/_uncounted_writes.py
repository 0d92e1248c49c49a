"""Writes PyTorch makes without counting a version: batch_norm's running statistics.

aten's batch_norm updates ``running_mean``/``running_var`` in place without
bumping their version counters (its backward saves them and checks their
versions, so it must not). The check that no replica wrote a shared input
compares versions, so such a write would race unseen. The replicas' streams
mode (``_random``) records these writes here, and the check compares each
tensor's version plus its count of recorded writes.
"""

from __future__ import annotations

import threading
import weakref

import torch

_lock = threading.Lock()
# By id: a WeakKeyDictionary would compare tensors with ==. An entry leaves with its tensor.
_counts: dict[int, int] = {}


def record(t: torch.Tensor) -> None:
    """``t`` (and the tensor it is a view of) was written without counting a version."""
    with _lock:
        for written in (t, t._base):
            if written is None:
                continue
            key = id(written)
            if key not in _counts:
                weakref.finalize(written, _counts.pop, key, None)
            _counts[key] = _counts.get(key, 0) + 1


def writes_of(t: torch.Tensor) -> int:
    """How many writes ``t`` had, as far as can be told: its version plus the recorded writes."""
    return t._version + _counts.get(id(t), 0) if _counts else t._version
