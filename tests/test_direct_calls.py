"""direct_forward runs an FX graph as gm.forward does, with its aten ops called
without OpOverload.__call__ (the uncompiled stacked executor's per-node cost)."""

from __future__ import annotations

import torch
from helpers import assert_same_bits, devices, executor, rows
from torch.fx.experimental.proxy_tensor import make_fx

import torchpmap as tp
from torchpmap._direct_calls import direct_forward

_CONSTANT = torch.tensor([0.5, -1.0, 2.0])


def _step(x, w, y):
    """Views, in-place ops, kwargs (dtype, device), a lifted constant, a reduction, a custom op's neighbours."""
    h = torch.relu(x @ w + _CONSTANT)
    h.mul_(0.1)
    loss = torch.nn.functional.cross_entropy(h, y)
    z = h.t().contiguous().view(-1)[:5].to(torch.float64)
    return loss, z.sum(dtype=torch.float32), torch.zeros_like(h, dtype=torch.int64).add_(3)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g), torch.randn(3, 3, generator=g), torch.tensor([0, 2, 1, 2])


class _CountingCalls:
    """Counts OpOverload.__call__ while inside."""

    def __enter__(self):
        self.count, self._call = 0, torch._ops.OpOverload.__call__
        counter = self

        def counted(op, /, *args, **kwargs):
            counter.count += 1
            return counter._call(op, *args, **kwargs)

        torch._ops.OpOverload.__call__ = counted
        return self

    def __exit__(self, *exc):
        torch._ops.OpOverload.__call__ = self._call


def test_direct_forward_computes_what_the_graph_module_does_without_op_overload_calls():
    gm = make_fx(_step)(*_inputs())
    assert any(node.op == "get_attr" for node in gm.graph.nodes)  # the lifted constant is read through self
    forward = direct_forward(gm)
    with _CountingCalls() as through_module:
        expected = gm.forward(*_inputs())
    with _CountingCalls() as direct:
        got = forward(*_inputs())
    assert through_module.count > 10 and direct.count == 0
    assert_same_bits(expected, got)
    assert_same_bits(expected, _step(*_inputs()))


def test_a_stacked_call_runs_its_graph_directly_and_equals_the_threads():
    n = 2

    def step(x, w):
        return torch.tanh(x @ w).sum(0) + tp.psum(x, "i").mean()

    pf = tp.pmap(step, "i", in_axes=(0, None), devices=devices(n))
    x, w = rows(n, 4, 3), rows(3, 3) / 10
    with executor("threads"):
        expected = pf(x, w)
    with executor("stacked"):
        pf(x, w)  # captures
        with _CountingCalls() as calls:
            got = pf(x, w)
    assert calls.count == 0  # (the collective is a custom op: called directly too)
    assert_same_bits(expected.unshard(), got.unshard())


@torch.library.custom_op("torchpmap_test::plus_length", mutates_args=())
def _plus_length(x: torch.Tensor, text: str) -> torch.Tensor:
    return x + len(text)


@_plus_length.register_fake
def _(x, text):
    return torch.empty_like(x)


def test_text_inside_a_string_argument_is_left_as_written():
    text = "torch.ops.aten.add.Tensor(x)"  # what a call looks like in FX's code, as a string
    gm = make_fx(lambda x: torch.ops.torchpmap_test.plus_length(x * 2, text))(torch.ones(3))
    assert torch.equal(direct_forward(gm)(torch.ones(3)), torch.full((3,), 2.0 + len(text)))
