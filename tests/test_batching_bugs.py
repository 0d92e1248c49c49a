"""Calls whose functorch batching rule gives a replica another result than eager
run on the threads under the stacked executor, with a warning naming the op
(``_batching_bugs``); before, the batched graph was silently wrong."""

import pytest
import torch
from helpers import assert_same_bits, devices, executor, rows

import torchpmap as tp

CASES = {
    "roll_of_a_scalar": (lambda x: x.sum().roll(1), "roll"),
    "roll_of_a_scalar_function": (lambda x: torch.roll(x.sum(), shifts=(3,)), "roll"),
    "argmax_keepdim": (lambda x: x.argmax(keepdim=True), "argmax"),
    "argmin_keepdim": (lambda x: torch.argmin(x, None, True), "argmin"),
    "aminmax_keepdim": (lambda x: torch.aminmax(x, keepdim=True), "aminmax"),
    "all_of_no_dims": (lambda x: (x > 0).all(dim=()), "all"),
    "any_of_no_dims": (lambda x: x.any(dim=[], keepdim=True), "any"),
    # integer add-multiplies: float beta/alpha made float32 (eager truncates them), int8 addbmm int64
    "baddbmm_int": (lambda x: torch.baddbmm(*[x[None].long()] * 3, beta=0.2, alpha=0.6), "baddbmm"),
    "addbmm_int8": (
        lambda x: torch.addbmm(x[0].to(torch.int8), x[None].to(torch.int8), x[None].to(torch.int8)),
        "addbmm",
    ),
    "addmv_int": (lambda x: x[0].long().addmv(x.long(), x[1].long(), alpha=0.6), "addmv"),
    "addmm_int_in_place": (lambda x: x.long().addmm_(x.long(), x.long(), beta=0.5), "addmm_"),
    # the batched tensor kept its shape and strides: the call was lost
    "as_strided_in_place": (lambda x: x.clone().as_strided_((2, 2), (1, 3)), "as_strided_"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_wrong_batching_rule_falls_back_to_the_threads(case):
    f, op = CASES[case]
    x = rows(4, 3, 3)
    with executor("threads"):  # the reference, whatever TORCHPMAP_EXECUTOR says
        want = tp.pmap(f, "i", devices=devices(4))(x)
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match=rf"{op} with these arguments"):
        got = tp.pmap(f, "i", devices=devices(4))(x)
    assert_same_bits(got, want)


def test_the_same_ops_with_their_dims_stay_stacked():
    def f(x):
        return x.roll(1, 0), x.argmax(dim=1, keepdim=True), (x > 0).all(dim=(0, 1)), x.logsumexp(dim=[1])

    x = rows(4, 3, 3)
    want = tp.pmap(f, "i", devices=devices(4))(x)
    with executor("stacked"):  # a fallback warning would fail the test
        assert_same_bits(tp.pmap(f, "i", devices=devices(4))(x), want, close=True)
