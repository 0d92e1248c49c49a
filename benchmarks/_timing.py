"""Shared timing helper: median seconds per call over several trials."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def per_call(fn: Callable[[], object], *, calls: int, trials: int, warmup: int = 3) -> float:
    """Median over ``trials`` of the mean wall time of ``calls`` back-to-back
    calls of ``fn`` (which must return only when its work is done)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def calls_for(seconds_per_call_guess: float, budget: float = 0.2) -> int:
    return max(3, min(2000, int(budget / max(seconds_per_call_guess, 1e-7))))
