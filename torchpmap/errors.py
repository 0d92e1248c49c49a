"""Exceptions torchpmap raises on its own account."""

from __future__ import annotations


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
