"""In-place ops that read memory they write (``_overlapping_writes``): eagerly a
partial overlap raises, but batched over the replicas the operands are
non-contiguous views ATen does not check, and the stacked executor returned a
smeared row (a running sum for ``x[1:] += x[:-1]``). They run on the threads now,
as eager PyTorch runs them; writes that share no element, or share one view,
stay stacked."""

import pytest
import torch
from helpers import assert_same_bits, devices, executor

import torchpmap as tp
from torchpmap._overlapping_writes import _shares_an_element


def _shift_add(x):
    x[1:] += x[:-1]
    return x * 1


def _shift_copy_of_a_temporary(x):
    y = x * 1
    y[1:] = y[:-1]
    return y


def _copy_into_overlap(x):
    x[1:].copy_(x[:-1])
    return x + 0


def _add_transposed(x):
    x.add_(x.t())
    return x * 1


REFUSED = {
    "shift_add": _shift_add,
    "shift_copy_of_a_temporary": _shift_copy_of_a_temporary,
    "copy_into_overlap": _copy_into_overlap,
    "add_transposed": _add_transposed,
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_overlapping_write_raises_as_eager_on_every_call(case):
    fn = REFUSED[case]
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        fn(torch.arange(9.0).reshape(3, 3))  # eager PyTorch refuses it
    f = tp.pmap(fn, "i", devices=devices(4))
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="OverlappingWrite"):
        for _ in range(3):  # the capture, then calls of the same signature
            x = torch.arange(36.0).reshape(4, 3, 3)
            with pytest.raises(RuntimeError, match="refer to a single memory location"):
                f(x)
            assert torch.equal(x, torch.arange(36.0).reshape(4, 3, 3))  # nothing smeared into the input


def _disjoint_rows(x):
    x[0].add_(x[1])
    return x * 1


def _disjoint_columns(x):
    x[:, 0].copy_(x[:, 1])
    return x + 0


def _same_view(x):
    x.add_(x)
    return x * 1


def _through_a_copy(x):
    x[1:].copy_(x[:-1].clone())
    return x + 0


STACKED = {
    "disjoint_rows": _disjoint_rows,
    "disjoint_columns": _disjoint_columns,
    "same_view": _same_view,
    "through_a_copy": _through_a_copy,
}


@pytest.mark.parametrize("case", sorted(STACKED))
def test_writes_sharing_no_element_stay_stacked(case):
    fn = STACKED[case]
    with executor("threads"):
        x = torch.arange(36.0).reshape(4, 3, 3)
        want = tp.pmap(fn, "i", devices=devices(4))(x), x
    f = tp.pmap(fn, "i", devices=devices(4))
    with executor("stacked"):  # a fallback warning would fail the test
        for _ in range(2):
            x = torch.arange(36.0).reshape(4, 3, 3)
            assert_same_bits((f(x), x), want)


def test_shares_an_element_reads_the_elements_not_only_the_ranges():
    base = torch.zeros(4, 6)
    assert not _shares_an_element(base[:, ::2], base[:, 1::2])  # interleaved: the ranges meet, no element
    assert _shares_an_element(base[:, ::2], base[:, 2::2])
    assert not _shares_an_element(base[0], base[0])  # the same view
    assert not _shares_an_element(base[0], torch.zeros(6))
    assert not _shares_an_element(base[:0], base)  # empty
    assert _shares_an_element(base.t(), base[1])  # another layout
    assert _shares_an_element(base.view(torch.float16), base)  # a view as a narrower dtype: assumed
