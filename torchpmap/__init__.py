"""torchpmap: an SPMD parallel map for PyTorch, with jax.pmap's semantics.

>>> import torch, torchpmap
>>> y = torchpmap.pmap(lambda x: x * 2)(torch.arange(12.).reshape(4, 3))
>>> type(y).__name__, tuple(y.shape)
('ShardedTensor', (4, 3))
"""

from __future__ import annotations

from ._config import collective_timeout, set_collective_timeout, set_executor
from ._devices import (
    device_count,
    devices,
    local_device_count,
    local_devices,
    process_count,
    process_index,
    replica_devices,
    set_cpu_device_count,
)
from ._pmap import Pmapped, pmap
from ._reparametrize import install as _install_reparametrize_guard
from ._sampler import ProcessBatchSampler
from ._sharded import ShardedTensor, device_put_replicated, device_put_sharded, unreplicate
from ._vector_math import settle_vector_math as _settle_vector_math
from .batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .checkpoint import load_checkpoint, save_checkpoint
from .collectives import (
    all_gather,
    all_to_all,
    axis_index,
    axis_size,
    pmax,
    pmean,
    pmin,
    ppermute,
    pshuffle,
    psum,
    psum_scatter,
    pswapaxes,
)
from .errors import (
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CompileError,
    DeletedShardedTensorError,
    ReplicaAbortedError,
)
from .training import (
    FunctionalOptimizer,
    PerReplica,
    assert_replicas_identical,
    broadcast_buffers,
    functional_call,
    functional_optimizer,
    params_of,
    pmean_buffers,
    pmean_grads,
    replicate,
    replicate_module,
    shard_batch,
)

__version__ = "0.1.0"

# torch.func.functional_call on a module the replicas share would race: raise instead (_reparametrize).
_install_reparametrize_guard()
# oneMKL's first call of a vector-math op races when replicas make it at once (_vector_math).
_settle_vector_math()

__all__ = [
    "pmap",
    "Pmapped",
    "ShardedTensor",
    "devices",
    "local_devices",
    "device_count",
    "local_device_count",
    "replica_devices",
    "process_index",
    "process_count",
    "set_cpu_device_count",
    "device_put_sharded",
    "device_put_replicated",
    "unreplicate",
    "psum",
    "pmean",
    "pmax",
    "pmin",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "pshuffle",
    "pswapaxes",
    "all_to_all",
    "axis_index",
    "axis_size",
    "set_collective_timeout",
    "collective_timeout",
    "set_executor",
    "PerReplica",
    "replicate",
    "replicate_module",
    "assert_replicas_identical",
    "pmean_grads",
    "pmean_buffers",
    "broadcast_buffers",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "functional_call",
    "functional_optimizer",
    "FunctionalOptimizer",
    "params_of",
    "shard_batch",
    "save_checkpoint",
    "load_checkpoint",
    "ProcessBatchSampler",
    "CollectiveError",
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "ReplicaAbortedError",
    "DeletedShardedTensorError",
    "CompileError",
]
