"""Writes PyTorch makes without counting a version: batch_norm's running statistics.

aten's batch_norm updates ``running_mean``/``running_var`` in place without
bumping their version counters (its backward saves them and checks their
versions, so it must not). The check that no replica wrote a shared input
compares versions, so such a write would race unseen. The replicas' streams
mode (``_random``) records these writes here, as does the lockstep executor for
the graph inputs such aten ops write (``inputs_written_uncounted``), and the check
compares each tensor's version plus its count of recorded writes.
"""

from __future__ import annotations

import threading
import weakref

import torch

from ._fork import reinit_after_fork
from ._view_roots import view_root

_lock = reinit_after_fork(threading.Lock())
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


def recorded() -> bool:
    """Whether a tensor alive now had a write recorded (else ``writes_of`` is its version)."""
    return bool(_counts)


def writes_of(t: torch.Tensor) -> int:
    """How many writes ``t`` had, as far as can be told: its version plus the recorded writes."""
    return t._version + _counts.get(id(t), 0) if _counts else t._version


_aten = torch.ops.aten
# aten ops that update the running statistics (arguments 3 and 4) in training mode
# (argument 5) without a version count: their schemas do not mark the arguments written.
_BATCH_NORMS = {
    _aten.native_batch_norm.default,
    _aten.batch_norm.default,
    _aten._batch_norm_impl_index.default,
    _aten.cudnn_batch_norm.default,
    _aten.miopen_batch_norm.default,
}


def inputs_written_uncounted(graph: torch.fx.Graph) -> tuple[int, ...]:
    """The positions of ``graph``'s placeholders (an aten graph) that its ops
    write without counting a version (a batch_norm's running statistics)."""
    placeholders = {node: k for k, node in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    written: set[int] = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _BATCH_NORMS or len(node.args) < 6 or not node.args[5]:
            continue
        for stat in node.args[3:5]:
            k = placeholders.get(view_root(stat)) if isinstance(stat, torch.fx.Node) else None
            if k is not None:
                written.add(k)
    return tuple(sorted(written))
