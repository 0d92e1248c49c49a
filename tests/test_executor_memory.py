"""Memory the captured executors must not mix up, found by differential runs
against the threads executor: each case gave another value (or wrote the
caller's input) on the stacked or lockstep executor, with no error."""

import pytest
import torch
from helpers import devices, executor

import torchpmap as tp

EXECUTORS = ["threads", "stacked", "lockstep"]


@pytest.mark.parametrize("name", EXECUTORS)
def test_a_tensor_closed_over_that_shares_the_inputs_storage_is_the_same_in_every_replica(name):
    """Not a view of the input Dynamo takes outside the graph: the global lies
    outside replica 0's row, so every replica returns it as it is."""
    flat = torch.arange(100.0)
    x = flat[:40].view(4, 10)
    c = flat[40:50]
    pf = tp.pmap(lambda v: (c, v * 2), "i", devices=devices(4))
    with executor(name):
        for _ in range(2):
            out, doubled = pf(x)
            torch.testing.assert_close(out.unshard(), c.expand(4, 10))
            torch.testing.assert_close(doubled.unshard(), x * 2)


@pytest.mark.parametrize("name", EXECUTORS)
def test_real_and_conjugate_views_of_an_input_keep_their_dtype_and_bits(name):
    big = torch.arange(50.0).reshape(10, 5) * (1 + 2j)
    x = big[:4]  # its storage holds more than the 4 rows
    y = torch.arange(24.0).reshape(4, 3, 2) * (1 + 2j)
    real = tp.pmap(lambda v: (v.real, v * 2), "i", devices=devices(4))
    mh = tp.pmap(lambda v: (v.mH, v + 1), "i", devices=devices(4))
    neg_imag = tp.pmap(lambda v: (v.conj().imag, v + 1), "i", devices=devices(4))
    with executor(name):
        for _ in range(2):
            r = real(x)[0].unshard()
            assert r.dtype == torch.float32
            assert torch.equal(r, x.real)
            assert torch.equal(mh(y)[0].unshard(), y.mH)
    with executor(name, allow_fallback=True):  # vmap has no rule for a negative view: stacked falls back
        for _ in range(2):
            assert torch.equal(neg_imag(y)[0].unshard().resolve_neg(), y.conj().imag.resolve_neg())


@pytest.mark.parametrize("name", EXECUTORS)
def test_an_all_to_all_result_written_in_place_leaves_the_input_alone(name):
    """The stacked all_to_all was a transpose of its input made contiguous: for
    an input mapped on axis 1 that is the input's own memory."""

    def f(v):
        y = tp.all_to_all(v, "i", 0, 1, tiled=True)
        y.add_(100)
        return v * 1, y

    x0 = torch.arange(32.0).reshape(4, 4, 2)
    x = x0.clone()
    pf = tp.pmap(f, "i", in_axes=1, devices=devices(4))
    with executor(name):
        for _ in range(2):
            same, _ = pf(x)
            assert torch.equal(x, x0)
            assert torch.equal(same.unshard(), x0.movedim(1, 0))


@pytest.mark.parametrize("name", EXECUTORS)
def test_a_global_that_is_a_shard_of_the_argument_stays_that_shard(name):
    """Lockstep handed Dynamo replica 0's shard itself, which Dynamo took for
    the global of the same identity: every replica then added its own shard."""
    s = tp.device_put_sharded([torch.full((3,), float(r)) for r in range(4)], devices(4))
    first = s.shards[0]
    pf = tp.pmap(lambda v: v * 10 + first, "i", devices=devices(4))
    with executor(name):
        for _ in range(2):
            assert pf(s).unshard()[:, 0].tolist() == [0.0, 10.0, 20.0, 30.0]


@pytest.mark.parametrize("name", EXECUTORS)
def test_two_copies_stay_two_tensors(name):
    """Each reshape of a strided row copies; merging the two equal copies (the
    copy's _unsafe_view was taken for a plain read) made the outputs one tensor."""
    x = torch.arange(32.0).reshape(2, 4, 4).permute(2, 1, 0)
    pf = tp.pmap(lambda v: (v.reshape(-1), v.reshape(-1)), "i", devices=devices(4))
    with executor(name):
        for _ in range(2):
            a, b = pf(x)
            a.shards[0][0] = 100.0
            assert b.shards[0][0].item() == x[0].reshape(-1)[0].item()
