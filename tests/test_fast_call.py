"""The stacked executor's fast path (``_fast_call``): a call whose signature
already ran stacked skips the general path, and anything the general path
would decide differently goes back to it."""

import gc
import warnings
import weakref

import pytest
import torch
from helpers import assert_same_bits, devices, executor, rows

import torchpmap as tp
from torchpmap import _pmap

N = 4


@pytest.fixture
def general_calls(monkeypatch):
    """How many calls took the general path (it places the inputs; the fast path does not)."""
    count = [0]
    place = _pmap.Pmapped._place

    def counting(self, *args, **kwargs):
        count[0] += 1
        return place(self, *args, **kwargs)

    monkeypatch.setattr(_pmap.Pmapped, "_place", counting)
    return count


def pm(f, **kwargs):
    return tp.pmap(f, "i", devices=devices(N), **kwargs)


def on_threads(pf, *args):
    with executor("threads"):
        return pf(*args)


def test_repeated_calls_take_the_fast_path_with_the_same_bits(general_calls):
    pf = pm(lambda x, s: (tp.psum(x, "i") * s, x + tp.axis_index("i")), in_axes=(0, None))
    x = tp.device_put_sharded(list(rows(N, 3)), devices(N))
    expected = on_threads(pf, x, 2.0)
    with executor("stacked"):
        first = pf(x, 2.0)
        assert general_calls[0] == 2  # threads, then the first stacked call
        again = pf(x, 2.0)
        fed_back = pf(again[0], 2.0)  # the output, stacked, goes straight back in
        plain = pf(rows(N, 3), 2.0)  # a plain tensor mapped on axis 0
    assert general_calls[0] == 3  # the plain tensor is a new signature: one general call
    assert_same_bits(expected, first)
    assert_same_bits(expected, again)
    assert_same_bits(on_threads(pf, expected[0], 2.0), fed_back)
    assert_same_bits(on_threads(pf, rows(N, 3), 2.0), plain)


def test_a_changed_constant_or_closure_captures_again():
    scale = [2.0]
    pf = pm(lambda x, s: x * s + scale[0], in_axes=(0, None))
    x = rows(N, 3)
    with executor("stacked"):
        pf(x, 1.0)
        got = [pf(x, 1.0), pf(x, 3.0)]
        scale[0] = -1.0
        got.append(pf(x, 3.0))
    assert_same_bits(x * 1.0 + 2.0, got[0].unshard())
    assert_same_bits(x * 3.0 + 2.0, got[1].unshard())
    assert_same_bits(x * 3.0 - 1.0, got[2].unshard())


def test_switching_the_executor_runs_the_replicas_again():
    traced = []
    pf = pm(lambda x: traced.append(1) or x * 2)
    x = rows(N, 3)
    with executor("stacked"):
        pf(x)
        pf(x)
    before = len(traced)  # Dynamo traced the function; no replica ran it eagerly
    with executor("threads"):
        assert_same_bits(x * 2, pf(x).unshard())
    assert len(traced) == before + N


def test_an_input_that_requires_grad_goes_through_autograd(general_calls):
    pf = pm(lambda x: tp.psum(x * x, "i"))
    x = rows(N, 3)
    with executor("stacked"):
        pf(x)
        pf(x)
        calls = general_calls[0]
        w = x.clone().requires_grad_()
        pf(w).unshard().sum().backward()
    assert general_calls[0] == calls + 1
    w2 = x.clone().requires_grad_()
    on_threads(pf, w2).unshard().sum().backward()
    assert_same_bits(w2.grad, w.grad)


def test_inputs_on_other_devices_or_another_size_take_the_general_path(general_calls):
    pf = tp.pmap(lambda x: x + tp.axis_index("i"), "i")
    x = tp.device_put_sharded(list(rows(N, 3)), devices(N))
    with executor("stacked"):
        pf(x)
        pf(rows(N, 3))
        calls = general_calls[0]
        reordered = tp.device_put_sharded(list(rows(N, 3)), devices(N)[::-1])
        moved = pf(reordered)  # the call runs on devices(N), so the shards move
        smaller = pf(rows(2, 3))  # on 2 devices
        assert general_calls[0] == calls + 2
        pf(rows(N, 3))  # still stacked (a fallback warning would fail the test)
    assert list(moved.devices) == devices(N) and list(smaller.devices) == devices(2)
    assert_same_bits(on_threads(pf, reordered), moved)
    assert_same_bits(rows(2, 3) + torch.arange(2.0)[:, None], smaller.unshard())


def test_an_overlapping_input_takes_the_general_path(general_calls):
    pf = pm(lambda x: x * 2)
    with executor("stacked"):
        pf(rows(N, 3))
        calls = general_calls[0]
        row = rows(1, 3)
        got = pf(row.expand(N, 3))  # every slice is the same memory
    assert general_calls[0] == calls + 1
    assert_same_bits(row.expand(N, 3) * 2, got.unshard())


def test_a_shard_replaced_with_set_is_read_and_written_where_it_now_lives():
    def bump(x):
        x.add_(1)
        return x * 2

    pf = pm(bump)
    x = tp.device_put_sharded([torch.zeros(3) for _ in range(N)], devices(N))
    with executor("stacked", allow_fallback=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pf(x)
        pf(x)
        elsewhere = torch.full((3,), 10.0)
        x.shards[1].set_(elsewhere)  # shard 1 no longer lives in the stacked buffer
        got = pf(x)
    assert elsewhere.tolist() == [11.0] * 3  # the write reached the shard's new memory
    assert got.shards[1].tolist() == [22.0] * 3
    assert got.shards[0].tolist() == [6.0] * 3  # three calls


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.t_(),  # same address and shape, other strides
        lambda s: setattr(s, "data", s.t().contiguous()),  # other memory
        lambda s: setattr(s, "data", s.t()),  # same address, other strides, version unchanged
    ],
    ids=["t_", "data_elsewhere", "data_transposed"],
)
def test_a_shard_whose_geometry_changed_in_place_is_read_as_it_now_is(change):
    pf = pm(lambda x: x * 2)
    values = torch.arange(N * 9, dtype=torch.float32).reshape(N, 3, 3)
    x = tp.device_put_sharded(list(values.clone()), devices(N))
    with executor("stacked", allow_fallback=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pf(x)
        pf(x)
        change(x.shards[1])
        got = pf(x)
    assert got.shards[1].tolist() == (x.shards[1] * 2).tolist()
    assert got.shards[1].tolist() == (values[1].T * 2).tolist()
    assert got.shards[0].tolist() == (values[0] * 2).tolist()


def test_autocast_falls_back_with_its_warning():
    pf = pm(lambda x: x @ x.T)
    x = rows(N, 3, 3)
    with executor("stacked", allow_fallback=True):
        pf(x)
        pf(x)
        with pytest.warns(RuntimeWarning, match="autocast"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = pf(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = on_threads(pf, x)
    assert got.dtype == torch.bfloat16
    assert_same_bits(expected, got)


def test_donated_inputs_are_deleted_on_every_call():
    pf = pm(lambda x: x * 2, donate_argnums=0)
    with executor("stacked"):
        for _ in range(3):
            x = tp.device_put_sharded(list(rows(N, 3)), devices(N))
            y = pf(x)
            assert x.is_deleted
            assert_same_bits(rows(N, 3) * 2, y.unshard())


def test_the_fast_path_keeps_no_input_alive():
    pf = pm(lambda x: x * 2)
    with executor("stacked"):
        for _ in range(2):
            x = rows(N, 64)
            pf(x)
            ref = weakref.ref(x)
            del x
            gc.collect()
            assert ref() is None


def test_a_fast_call_reads_no_sharded_tensor_through_its_torch_function(general_calls, monkeypatch):
    # Reading a ShardedTensor's metadata through its __torch_function__ costs ~3 us a
    # leaf, which a call of a model's parameters pays hundreds of times.
    pf = pm(lambda p: {k: v * 2 for k, v in p.items()})
    params = tp.device_put_sharded([{f"w{k}": torch.ones(3) for k in range(5)} for _ in range(N)], devices(N))
    seen = []
    torch_function = tp.ShardedTensor.__torch_function__.__func__

    def counting(cls, func, types, args=(), kwargs=None):
        seen.append(func)
        return torch_function(cls, func, types, args, kwargs)

    with executor("stacked"):
        params = pf(pf(params))  # captured; its output goes back in
        calls = general_calls[0]
        monkeypatch.setattr(tp.ShardedTensor, "__torch_function__", classmethod(counting))
        out = pf(params)
    assert general_calls[0] == calls  # the fast path took it
    assert seen == []
    assert_same_bits(out, tp.device_put_sharded([{f"w{k}": torch.full((3,), 8.0) for k in range(5)}] * N, devices(N)))
