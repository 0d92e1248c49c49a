"""What a process forked from one that used pmap must not inherit.

``fork()`` copies the calling thread only: torchpmap's worker threads are gone
in the child, their task queues would never be read (a call would wait for the
collective timeout), and a lock another thread held at the fork stays held for
ever. Locks are made anew in the child (``reinit_after_fork``, and the compile gate's
own hook); the worker pool forgets its workers (``_runtime``)."""

from __future__ import annotations

import os
from typing import TypeVar

Lock = TypeVar("Lock")


def reinit_after_fork(lock: Lock) -> Lock:
    """``lock``, unheld again in a forked child (in place: every reference sees it)."""
    os.register_at_fork(after_in_child=getattr(lock, "_at_fork_reinit"))  # noqa: B009 (private, not in the stubs)
    return lock
