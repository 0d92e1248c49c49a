"""Exceptions torchpmap raises on its own account, and how its code walks an
exception's chain to find what caused it."""

from __future__ import annotations

from collections.abc import Iterator


def exception_chain(e: BaseException, *, inner: bool = False) -> Iterator[BaseException]:
    """``e``, then what it was raised from or while handling (``__cause__``,
    else ``__context__``), each once; with ``inner``, an exception's
    ``inner_exception`` (Dynamo wraps errors in it) comes before those."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        yield cur
        seen.add(id(cur))
        wrapped = getattr(cur, "inner_exception", None) if inner else None
        cur = wrapped if isinstance(wrapped, BaseException) else (cur.__cause__ or cur.__context__)


class CollectiveError(RuntimeError):
    """A collective could not complete: replicas disagreed, or one left early."""


class CollectiveMismatchError(CollectiveError):
    """Replicas called different collectives, or the same one with different
    shapes, dtypes or parameters, at the same point of their programs."""


class CollectiveTimeoutError(CollectiveError, TimeoutError):
    """A collective waited longer than the configured timeout for its peers."""


class ReplicaAbortedError(CollectiveError):
    """Raised inside a replica whose collective was cancelled because another
    replica failed. The caller sees the other replica's original exception."""


class DeletedShardedTensorError(RuntimeError):
    """A ShardedTensor whose buffers were donated to a pmap call was used."""


class CompileError(RuntimeError):
    """torch.compile could not compile a pmapped function."""
