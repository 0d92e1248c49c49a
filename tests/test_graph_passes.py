"""The batched graph's simplification: fewer nodes, the same values and aliasing."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from torchpmap._graph_passes import simplify

aten = torch.ops.aten


def traced(f, *examples):
    gm = make_fx(f, tracing_mode="fake")(*examples)
    before = [node.target for node in gm.graph.nodes]
    simplify(gm)
    return gm, before, [node.target for node in gm.graph.nodes]


def test_a_constant_only_read_is_not_copied_and_identity_permutes_go():
    def f(x):
        index = torch.tensor([1, 0])  # only read: the graph's constant serves
        written = torch.tensor([0.0, 2.0])
        written.mul_(x[0, 0])  # written: a fresh copy on every run
        return x.permute(0, 1).index_select(0, index) + written

    gm = make_fx(f)(torch.ones(2, 2))
    simplify(gm)
    targets = [node.target for node in gm.graph.nodes]
    assert targets.count(aten.lift_fresh_copy.default) == 1
    assert aten.permute.default not in targets
    x = torch.arange(4.0).reshape(2, 2) + 3
    assert torch.equal(gm(x), f(x)) and torch.equal(gm(x), f(x))


def test_views_and_expands_to_the_same_shape_go_and_real_ones_stay():
    def f(x, w):
        same = x.view(2, 3).expand(2, 3).reshape(2, 3)
        return (same @ w.expand(3, 4)).view(8)

    x, w = torch.randn(2, 3), torch.randn(3, 4)
    gm, before, after = traced(f, x, w)
    assert before.count(aten.expand.default) >= 2 and aten.expand.default not in after
    assert after.count(aten.view.default) == 1  # the (2, 4) -> (8,) one
    assert torch.equal(gm(x, w), f(x, w))


def test_the_same_pure_computation_runs_once():
    def f(x, y):
        a = torch.where(y != -100, x, 0.0).sum()
        b = torch.where(y != -100, x * 2, 0.0).sum()
        return a + b

    x, y = torch.randn(5), torch.tensor([1, -100, 3, -100, 5])
    gm, before, after = traced(f, x, y)
    assert before.count(aten.ne.Scalar) == 2 and after.count(aten.ne.Scalar) == 1
    assert torch.equal(gm(x, y), f(x, y))


def test_no_merging_across_an_in_place_write():
    def f(x):
        a = x.sum()
        x.add_(1)
        return a, x.sum()

    gm, _, after = traced(f, torch.zeros(3))
    assert after.count(aten.sum.default) == 2
    assert [v.item() for v in gm(torch.zeros(3))] == [0.0, 3.0]


def test_equal_outputs_stay_two_tensors():
    def f(x):
        return x * 2, x * 2, x.view(3)

    x = torch.ones(3)
    a, b, c = traced(f, x)[0](x)
    assert a is not b and a.data_ptr() != b.data_ptr()
    assert c is not x and c.data_ptr() == x.data_ptr()  # a view stays a view


def test_signed_zero_and_nan_constants_are_not_confused():
    def f(x):
        pos, neg = x * 0.0, x * -0.0
        nan1, nan2 = x + float("nan"), x + float("nan")
        return torch.copysign(torch.ones_like(x), pos) + torch.copysign(torch.ones_like(x), neg), nan1 + nan2

    x = torch.ones(2)
    gm, _, after = traced(f, x)
    assert after.count(aten.mul.Tensor) == 2  # 0.0 and -0.0: two products
    assert after.count(aten.add.Tensor) == 3  # the two equal nan sums merge, the outputs' sums stay
    signs, nans = gm(x)
    assert torch.equal(signs, torch.zeros(2)) and bool(nans.isnan().all())


def test_dead_views_go_and_an_unused_draw_stays():
    def f(x):
        x.view(-1)
        x.t()
        torch.rand_like(x)  # advances the generator even if unused
        return x + 1

    gm, _, after = traced(f, torch.ones(2, 2))
    assert aten.view.default not in after and aten.t.default not in after
    assert aten.rand_like.default in after
