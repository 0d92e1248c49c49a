"""Each process of a multi-process job reads only its part of every global batch.

The global batch is cut into one contiguous block per process, in process
order, so that ``shard_batch`` on each process's block puts on every global
replica exactly the rows that ``shard_batch`` on the whole batch puts there in
a single-process job: a script gives the same results as 1 process x G devices
and as P processes x G/P devices. (torch's DistributedSampler interleaves
``rank::world`` instead, which changes which rows each replica sees.)
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from ._devices import process_count, process_index


class ProcessBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for this process: ``DataLoader(ds, batch_sampler=...)``.

    Each epoch orders the dataset (shuffled with ``torch.randperm`` seeded by
    ``seed`` and the epoch when ``shuffle``; call ``set_epoch(e)`` before each
    epoch), cuts the order into global batches of ``global_batch_size`` rows and
    yields this process's contiguous block of each: ``global_batch_size /
    process_count`` indices. The union over the processes is the global batch.

    The last global batch, when the dataset size is not a multiple of
    ``global_batch_size``: with ``drop_last=True`` it is dropped; otherwise it
    is completed to a full batch with rows from the start of the epoch's order
    (as DistributedSampler pads), so every process always gets the same number
    of rows and no process an empty batch. ``mask(i)`` marks the real rows of
    this process's i-th batch; weight the loss with it to count each sample
    once (``psum((loss * mask).sum()) / psum(mask.sum())``).

    ``process_index`` and ``process_count`` default to torchpmap's (1 process
    without torchpmap.distributed), read when iterating, so the same script runs
    in every layout. Every process must build its sampler alike (dataset length,
    ``global_batch_size``, ``shuffle``, ``seed``, ``drop_last``, epoch): nothing
    compares them across processes. Pick ``global_batch_size`` a multiple of ``device_count()``
    so that ``shard_batch`` needs no padding: otherwise each process pads its
    own block, and which replica gets which row depends on the layout (a
    masked loss is still the same).
    """

    def __init__(
        self,
        data_source_or_len: Sized | int,
        global_batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        self.num_samples = _dataset_size(data_source_or_len)
        self.global_batch_size = _positive_int(global_batch_size, "global_batch_size")
        if (process_index is None) != (process_count is None):
            raise ValueError("ProcessBatchSampler: pass both process_index and process_count, or neither")
        if process_count is not None:
            _positive_int(process_count, "process_count")
        if process_index is not None and (
            isinstance(process_index, bool) or not isinstance(process_index, int) or process_index < 0
        ):
            raise ValueError(f"ProcessBatchSampler: process_index must be an int >= 0, got {process_index!r}")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not is_flag(flag):
                raise TypeError(f"ProcessBatchSampler: {name} must be True or False, got {flag!r}")
        try:
            seed = operator.index(seed)  # numpy integers too; not 1.5
        except TypeError:
            raise TypeError(f"ProcessBatchSampler: seed must be an int, got {seed!r}") from None
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self._process_index = process_index
        self._process_count = process_count
        self.epoch = 0
        self._layout()  # fail now on a batch size the processes cannot share

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order (with ``shuffle``): call it before each epoch."""
        try:
            self.epoch = operator.index(epoch)  # numpy integers too; not 1.7 (int() made it epoch 1)
        except TypeError:
            raise TypeError(f"ProcessBatchSampler.set_epoch: epoch must be an int, got {epoch!r}") from None

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch_size)
        return full if self.drop_last or not rest else full + 1

    @property
    def rows_per_process(self) -> int:
        """How many indices every batch this sampler yields holds."""
        return self.global_batch_size // self._layout()[1]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._epoch_order()
        start = self._layout()[0] * self.rows_per_process
        for i in range(len(self)):
            first = i * self.global_batch_size + start
            # Positions past the dataset wrap to the start of the order (the padding).
            yield [order[p % self.num_samples] for p in range(first, first + self.rows_per_process)]

    def mask(self, batch: int) -> torch.Tensor:
        """Which rows of this process's ``batch``-th batch are real (bool, shape
        (rows_per_process,)); False only for the padding of the last batch."""
        if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < len(self):
            raise ValueError(f"ProcessBatchSampler.mask: batch must be an int in [0, {len(self)}), got {batch!r}")
        first = batch * self.global_batch_size + self._layout()[0] * self.rows_per_process
        return torch.arange(first, first + self.rows_per_process) < self.num_samples

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def _layout(self) -> tuple[int, int]:
        """(process index, process count), torchpmap's unless given."""
        count = self._process_count if self._process_count is not None else process_count()
        index = self._process_index if self._process_index is not None else process_index()
        if index >= count:
            raise ValueError(f"ProcessBatchSampler: process_index {index} is not below process_count {count}")
        if self.global_batch_size % count:
            raise ValueError(
                f"ProcessBatchSampler: global_batch_size {self.global_batch_size} is not a multiple of the "
                f"{count} processes (process_count); choose a multiple of {count}, ideally of the device "
                f"count, so every process and device gets the same number of rows"
            )
        return index, count


def _dataset_size(data_source_or_len: Sized | int) -> int:
    if isinstance(data_source_or_len, int) and not isinstance(data_source_or_len, bool):
        n = data_source_or_len
    elif isinstance(data_source_or_len, Sized):
        n = len(data_source_or_len)
    else:
        raise ValueError(
            "ProcessBatchSampler: data_source_or_len must be a dataset with len() or its length, "
            f"got {type(data_source_or_len).__name__}"
        )
    if n < 0:
        raise ValueError(f"ProcessBatchSampler: the dataset length must be >= 0, got {n}")
    return n


def is_flag(value: Any) -> bool:
    """A boolean argument: a bool, a numpy bool, or the int 0 or 1 (numpy's too)."""
    if isinstance(value, (bool, np.bool_)):
        return True
    return isinstance(value, (int, np.integer)) and value in (0, 1)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ProcessBatchSampler: {name} must be a positive int, got {value!r}")
    return value
