"""ProcessBatchSampler: every global replica sees the same rows whether the job
runs as 1 process x G devices or P processes x G/P devices."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchpmap as tp


def epoch_batches(n, batch, procs, proc, **kw):
    sampler = tp.ProcessBatchSampler(n, batch, process_index=proc, process_count=procs, **kw)
    return [(idx, sampler.mask(i)) for i, idx in enumerate(sampler)]


def replica_rows(n, batch, procs, devices, **kw):
    """Per global replica, per step: (rows, mask) as the processes' shard_batch place them."""
    data = torch.arange(n * 2).reshape(n, 2)
    per_proc = [epoch_batches(n, batch, procs, p, **kw) for p in range(procs)]
    steps = []
    for step in zip(*per_proc):
        shards = [tp.shard_batch((data[idx], mask), devices // procs) for idx, mask in step]
        steps.append((torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])))
    return steps


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(
    "n, batch, devices", [(24, 8, 4), (23, 8, 4), (5, 8, 4), (17, 12, 4), (40, 16, 8), (1, 4, 4), (0, 4, 4)]
)
def test_every_layout_gives_every_replica_the_same_rows(n, batch, devices, shuffle):
    single = replica_rows(n, batch, 1, devices, shuffle=shuffle, seed=3)
    assert len(single) == (n + batch - 1) // batch
    for procs in (p for p in (2, 4, 8) if devices % p == 0):
        assert_same_steps(replica_rows(n, batch, procs, devices, shuffle=shuffle, seed=3), single)
    # Each sample is real exactly once per epoch; padding only in the last batch.
    real = torch.cat([rows.reshape(-1, 2)[mask.reshape(-1)] for rows, mask in single] + [torch.empty(0, 2)])
    assert sorted(real[:, 0].tolist()) == list(range(0, 2 * n, 2))
    assert all(mask.all() for _, mask in single[:-1])


def assert_same_steps(got, want):
    assert len(got) == len(want)
    for (rows, mask), (want_rows, want_mask) in zip(got, want):
        torch.testing.assert_close(rows, want_rows)
        torch.testing.assert_close(mask, want_mask)


def test_drop_last_drops_the_partial_batch_in_every_layout():
    for procs in (1, 2, 4):
        batches = epoch_batches(23, 8, procs, procs - 1, drop_last=True)
        assert len(batches) == 2 and all(mask.all() for _, mask in batches)
    assert len(tp.ProcessBatchSampler(7, 8, drop_last=True)) == 0


def test_epochs_differ_and_are_reproducible():
    sampler = tp.ProcessBatchSampler(32, 8, shuffle=True, seed=5, process_index=1, process_count=2)
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    again = tp.ProcessBatchSampler(32, 8, shuffle=True, seed=5, process_index=1, process_count=2)
    again.set_epoch(1)
    assert list(again) == second
    assert list(tp.ProcessBatchSampler(32, 8, process_index=1, process_count=2))[0] == [4, 5, 6, 7]


def test_drives_a_dataloader_and_defaults_to_this_process():
    ds = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
    sampler = tp.ProcessBatchSampler(ds, 4)  # one process: the whole global batch
    assert (sampler.rows_per_process, len(sampler)) == (4, 3)
    loader = DataLoader(ds, batch_sampler=sampler)
    got = [(x.shape, y.tolist()) for x, y in loader]
    assert got[0] == (torch.Size([4, 1]), [0, 1, 2, 3])
    assert got[-1][1] == [8, 9, 0, 1] and sampler.mask(2).tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    "args, kw, message",
    [
        ((10, 6), dict(process_index=0, process_count=4), "global_batch_size 6 is not a multiple of the 4 processes"),
        ((10, 0), {}, "global_batch_size must be a positive int"),
        ((10, 4), dict(process_index=2, process_count=2), "process_index 2 is not below process_count 2"),
        ((10, 4), dict(process_count=2), "pass both process_index and process_count"),
        ((10, 4), dict(process_index=-1, process_count=2), "process_index must be an int >= 0"),
        ((10, 4), dict(process_index=0, process_count=0), "process_count must be a positive int"),
        ((object(), 4), {}, "data_source_or_len must be a dataset with len"),
        ((-1, 4), {}, "length must be >= 0"),
    ],
)
def test_clear_errors(args, kw, message):
    with pytest.raises(ValueError, match=message):
        tp.ProcessBatchSampler(*args, **kw)


@pytest.mark.parametrize("kw", [dict(shuffle="x"), dict(drop_last=None), dict(seed=1.5), dict(seed="0")])
def test_flags_and_seed_of_another_type_are_refused(kw):
    (name,) = kw
    with pytest.raises(TypeError, match=f"ProcessBatchSampler: {name} must be"):
        tp.ProcessBatchSampler(10, 2, **kw)


def test_numpy_flags_and_seeds_and_int_flags_are_taken():
    import numpy as np

    sampler = tp.ProcessBatchSampler(10, 2, shuffle=np.True_, drop_last=1, seed=np.int64(3))
    assert list(sampler) == list(tp.ProcessBatchSampler(10, 2, shuffle=True, drop_last=True, seed=3))


def test_mask_names_the_valid_batches():
    with pytest.raises(ValueError, match=r"batch must be an int in \[0, 3\)"):
        tp.ProcessBatchSampler(10, 4).mask(3)


def test_set_epoch_takes_ints_only():
    # int(1.7) made it epoch 1 silently, and int("a") a bare ValueError (found by a hunt).
    sampler = tp.ProcessBatchSampler(10, 2, shuffle=True, seed=0)
    for epoch in (1.7, "a", None):
        with pytest.raises(TypeError, match="ProcessBatchSampler.set_epoch: epoch must be an int"):
            sampler.set_epoch(epoch)
    sampler.set_epoch(np.int64(2))
    again = tp.ProcessBatchSampler(10, 2, shuffle=True, seed=0)
    again.set_epoch(2)
    assert list(sampler) == list(again)


@pytest.mark.parametrize("flag", [2, -1, np.int64(3)])
def test_flags_outside_zero_and_one_are_refused(flag):
    with pytest.raises(TypeError, match="shuffle must be True or False"):
        tp.ProcessBatchSampler(10, 2, shuffle=flag)
    with pytest.raises(TypeError, match="pad must be True or False"):
        tp.shard_batch((torch.ones(4, 2),), 2, pad=flag)
