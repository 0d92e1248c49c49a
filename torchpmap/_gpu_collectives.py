"""Collectives among this process's replicas on distinct GPUs, queued on the
replicas' own CUDA streams: no host synchronisation, no star through one GPU.

A runner that holds every replica's input also knows the stream each one was
made on, which is the stream its result will be used on (the threads
executor's rendezvous gets it with the deposit; the lockstep runner's current
streams are every replica's). Here:

* a reduction or gather of a dtype NCCL handles goes through
  ``torch.cuda.nccl``: one call, from one thread, launches every member's
  kernel on its stream (NCCL ranks are the order of the tensors given);
* all_to_all and ppermute are one copy per pair of replicas into results
  allocated on the receiving GPU, and a reduction or gather NCCL does not take
  (other dtypes, empty tensors) is ``compute_results``; both run with each
  replica's stream current on its GPU. A copy between two GPUs then orders
  both streams (PyTorch makes the source stream wait for the destination's,
  copies, and makes the destination's wait for the copy), and each result is
  allocated on the stream that uses it.

Either way nothing is left for the host to wait for, and the caching
allocator needs no ``record_stream``: inputs are read, and results written,
on the streams that own them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._communicator import Collective, compute_results

# ncclRedOp_t of the reductions a Collective names.
NCCL_OPS = {"sum": 0, "max": 2, "min": 3}
_NCCL_KINDS = ("all_reduce", "all_gather", "reduce_scatter")
# What torch.cuda.nccl maps to an NCCL type that reduces like torch does (bool
# would be summed as uint8; int16, complex and the rest have no NCCL type).
_INTEGERS = frozenset({torch.int8, torch.uint8, torch.int32, torch.int64})
_NCCL_DTYPES = _INTEGERS | {torch.float16, torch.bfloat16, torch.float32, torch.float64}
# NCCL's float max and min are fmax/fmin, which drop a NaN that torch.maximum keeps.
_NCCL_MAX_MIN_DTYPES = _INTEGERS
# Set TORCHPMAP_NCCL=0 to keep every collective among GPUs off NCCL.
_ENV_SWITCH = "TORCHPMAP_NCCL"
# One launch at a time: the collectives of one communicator must be queued in
# the same order on every GPU, whichever thread completes an exchange.
_LAUNCH = threading.Lock()

# The module the NCCL calls go to (tests put a CPU model of NCCL here).
nccl: Any = torch.cuda.nccl
# (Device list, dtype) pairs whose NCCL call failed (communicator set-up, say, in a
# container without peer access; a dtype this NCCL lacks): they go the copying way from
# then on. Per dtype: one NCCL refuses bfloat16 and still sums float32.
_failed: set[tuple[tuple[torch.device, ...], torch.dtype]] = set()


def nccl_built() -> bool:
    return hasattr(torch._C, "_nccl_all_reduce")


def uses_nccl(collective: Collective, x: torch.Tensor) -> bool:
    """Whether ``run`` hands this collective of tensors like ``x`` to NCCL."""
    if collective.kind not in _NCCL_KINDS or x.dtype not in _NCCL_DTYPES or x.numel() == 0:
        return False
    if collective.kind != "all_gather":
        if collective.op not in NCCL_OPS:
            return False
        if collective.op != "sum" and x.dtype not in _NCCL_MAX_MIN_DTYPES:
            return False
    return _nccl_switched_on() and nccl_built()


def _nccl_switched_on() -> bool:
    raw = os.environ.get(_ENV_SWITCH, "")
    value = raw.strip().lower()
    if value in ("", "1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{_ENV_SWITCH} must be 0 or 1 (or false/true, off/on), got {raw!r}")


def _nccl_applies(
    collective: Collective, x: torch.Tensor, groups: Sequence[tuple[int, ...]], devices: Sequence[torch.device]
) -> bool:
    if not uses_nccl(collective, x) or (tuple(devices), x.dtype) in _failed:
        return False
    # NCCL's reduce_scatter gives rank k the k-th of g equal blocks: x must have a row per member.
    return collective.kind != "reduce_scatter" or all(x.ndim > 0 and x.shape[0] == len(g) for g in groups)


@contextlib.contextmanager
def streams_current(streams: Sequence[torch.cuda.Stream] | None) -> Iterator[None]:
    """Each stream current on its own device (they are on distinct devices)."""
    with contextlib.ExitStack() as stack:
        for s in streams or ():
            stack.enter_context(torch.cuda.stream(s))
        yield


def run(
    collective: Collective,
    xs: Sequence[torch.Tensor],
    devices: Sequence[torch.device],
    streams: Sequence[torch.cuda.Stream] | None,
) -> list[torch.Tensor]:
    """Every replica's result, ``xs[r]`` on ``devices[r]`` made on ``streams[r]``
    (None: the calling thread's current streams, or the CPU in tests)."""
    size = len(xs)
    groups = collective.groups or (tuple(range(size)),)
    with streams_current(streams):
        if collective.kind == "permute":
            return [_received(collective.pairs or (), xs, devices, r) for r in range(size)]
        if collective.kind == "all_to_all":
            return _all_to_all(groups, xs, devices)
        if _nccl_applies(collective, xs[0], groups, devices):
            try:
                return _through_nccl(collective, xs, groups, streams)
            except _NcclFailed as failure:  # NCCL could not run here: say so once, and copy instead
                e = failure.__cause__
                _failed.add((tuple(devices), xs[0].dtype))
                warnings.warn(
                    f"torchpmap: NCCL failed for the {xs[0].dtype} collectives among {[str(d) for d in devices]} "
                    f"({type(e).__name__}: {e}); they copy between the GPUs instead from now on "
                    f"(set {_ENV_SWITCH}=0 to skip NCCL altogether)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return compute_results(collective, xs, size, lambda t, r: t.to(devices[r]))


def _through_nccl(
    collective: Collective,
    xs: Sequence[torch.Tensor],
    groups: Sequence[tuple[int, ...]],
    streams: Sequence[torch.cuda.Stream] | None,
) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(xs)
    for group in groups:
        members = [xs[r] for r in group]
        if len(group) == 1:  # nobody to exchange with: its own input, as a fresh tensor
            out[group[0]] = _alone(collective, members[0])
            continue
        member_streams = None if streams is None else [streams[r] for r in group]
        for r, result in zip(group, nccl_group(collective, members, member_streams)):
            out[r] = result
    assert all(t is not None for t in out)  # the groups cover every replica
    return [t for t in out if t is not None]


def _received(
    pairs: tuple[tuple[int, int], ...], xs: Sequence[torch.Tensor], devices: Sequence[torch.device], r: int
) -> torch.Tensor:
    """Replica r's result of a ppermute: its source's input, one copy (or zeros)."""
    for src, dst in pairs:
        if dst == r:
            out = torch.empty_like(xs[src], device=devices[r])
            return out.copy_(xs[src])
    return torch.zeros_like(xs[r])


def _all_to_all(
    groups: Sequence[tuple[int, ...]], xs: Sequence[torch.Tensor], devices: Sequence[torch.device]
) -> list[torch.Tensor]:
    """Member k's result is row k of every member's input, in group order: one copy per pair."""
    out: list[torch.Tensor] = list(xs)  # every replica is in one group: all replaced below
    for group in groups:
        for k, r in enumerate(group):
            x = xs[r]
            result = x.new_empty((len(group), *x.shape[1:]), device=devices[r])
            for j, source in enumerate(group):
                result[j].copy_(xs[source][k])
            out[r] = result
    return out


def _alone(collective: Collective, x: torch.Tensor) -> torch.Tensor:
    """The result of a group of one (what NCCL gives one rank)."""
    if collective.kind == "all_gather":
        return x.unsqueeze(0).clone(memory_format=torch.contiguous_format)
    if collective.kind == "reduce_scatter":
        return x[0].clone(memory_format=torch.contiguous_format)
    return x.clone(memory_format=torch.contiguous_format)


def nccl_group(
    collective: Collective, xs: Sequence[torch.Tensor], streams: Sequence[torch.cuda.Stream] | None
) -> list[torch.Tensor]:
    """One group's results from NCCL, in group order (``xs`` in group order too:
    NCCL's ranks). Call with each stream current on its device."""
    inputs = [x.contiguous() for x in xs]
    g = len(inputs)
    kind = collective.kind
    if kind == "all_reduce":
        outputs = [torch.empty_like(x) for x in inputs]
    elif kind == "all_gather":  # every rank's input, in rank order: (g, *x)
        outputs = [x.new_empty((g, *x.shape)) for x in inputs]
    else:  # reduce_scatter: x is (g, ...); rank k gets the reduction of row k
        outputs = [x.new_empty(x.shape[1:]) for x in inputs]
    with _LAUNCH:
        try:
            if kind == "all_reduce":
                nccl.all_reduce(inputs, outputs, op=NCCL_OPS[collective.op or ""], streams=streams)
            elif kind == "all_gather":
                nccl.all_gather(inputs, outputs, streams=streams)
            else:
                nccl.reduce_scatter(inputs, outputs, op=NCCL_OPS[collective.op or ""], streams=streams)
        except torch.OutOfMemoryError:
            raise  # the GPUs are full now, not NCCL unusable: the caller's error
        except Exception as e:
            raise _NcclFailed from e
    return outputs


class _NcclFailed(Exception):
    """A torch.cuda.nccl call raised (its cause); not an error of the tensors around it."""
