"""Stacked buffers whose rows compute as the replicas' own tensors (``_row_layout``):
which intermediate results are views and which are copies must not depend on
how the caller laid its tensor out, or a later in-place write shows through
on one executor and not on the other."""

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_bits, devices, executor

import torchpmap as tp
from torchpmap import _row_layout

N = 4


def _eager_layouts_kept(buffer):
    """Whether each op's rows over ``buffer`` have the strides the op gives on each row alone."""
    ops = [
        lambda t: t * 1,
        lambda t: t.clone(),
        torch.empty_like,
        lambda t: torch.add(t, t.sin()),
        lambda t: (t * 1).contiguous(),
        lambda t: (t + 0).reshape(t.shape[0], -1) if t.ndim > 2 else (t + 0).reshape(-1),
    ]
    for op in ops:
        batched = op(buffer)
        for r in range(buffer.shape[0]):
            row = op(buffer[r])
            got = batched[r] if batched.shape[0] == buffer.shape[0] and batched.ndim == buffer.ndim else None
            if got is not None and got.stride() != row.stride():
                return False
    return True


def _layouts(seed):
    """Random (n, 3, 2) buffers over one storage: permuted, sliced, with the replica dim anywhere."""
    rng = random.Random(seed)
    for _ in range(60):
        shape = [N, 3, 2]
        order = list(range(3))
        rng.shuffle(order)
        steps = [rng.choice([1, 1, 2]) for _ in range(3)]
        base = torch.arange(float(torch.Size([s * k for s, k in zip(shape, steps)]).numel()))
        base = base.reshape([shape[d] * steps[d] for d in order]).permute([order.index(d) for d in range(3)])
        yield base[:: steps[0], :: steps[1], :: steps[2]]


@pytest.mark.parametrize("seed", range(4))
def test_a_faithful_buffer_computes_each_row_as_the_row_alone(seed):
    """The property the stacked executor relies on, checked op by op; and the
    layouts it rejects do break it (else it would copy for nothing)."""
    rejected_and_broken = 0
    for buffer in _layouts(seed):
        if _row_layout.faithful(buffer):
            assert _eager_layouts_kept(buffer), (buffer.shape, buffer.stride())
        else:
            rejected_and_broken += not _eager_layouts_kept(buffer)
    assert rejected_and_broken > 0


def test_a_faithful_copy_computes_as_the_tensors_it_copies():
    base = torch.arange(4 * 6 * 4.0)
    cases = {
        "contiguous": [torch.randn(3, 2) for _ in range(N)],
        "non-dense, row-major": list(base.reshape(4, 6, 4)[:, ::2, :2]),
        "dense, transposed": [torch.randn(2, 3).mT for _ in range(N)],
        "non-dense, column-major": list(base.reshape(4, 4, 6)[:, :2, ::2].mT),
    }
    for name, values in cases.items():
        copy = _row_layout.faithful_copy(values)
        assert copy is not None and _row_layout.faithful(copy), name
        for op in (lambda t: t * 1, lambda t: t.clone(), torch.empty_like):
            for row, value in zip(op(copy), values):
                assert row.stride() == op(value).stride(), name
        assert torch.equal(copy, torch.stack(values))
    # No buffer computes as these: a transposed tensor and a plain one, or tensors in two orders.
    assert _row_layout.faithful_copy([torch.randn(2, 3).mT, torch.randn(3, 2)]) is None
    column_major = base.reshape(4, 4, 6)[:, :2, ::2].mT
    assert _row_layout.faithful_copy([column_major[0], base.reshape(4, 6, 4)[0, ::2, :2]]) is None


def _views_and_copies(x):
    """Each result is a view or a copy depending on its input's layout, then written."""
    v = x * 1
    flat, cont, flattened = v.reshape(-1), v.contiguous(), v.flatten()
    c = x.clone()
    c_flat = c.reshape(-1)
    e = torch.empty_like(x).copy_(x)
    e_flat = e.reshape(-1)
    v.add_(100)
    c.add_(1)
    e.mul_(3)
    return flat, cont, flattened, c_flat, e_flat


def _caller_layouts():
    per_replica = (3, 2)
    yield "in_axes=1", torch.arange(24.0).reshape(3, N, 2), 1
    yield "in_axes=2", torch.arange(24.0).reshape(3, 2, N), 2
    yield "in_axes=-1", torch.arange(24.0).reshape(3, 2, N), -1
    yield "reversed strides", torch.arange(24.0).reshape(2, 3, N).permute(2, 1, 0), 0
    yield "rows sliced", torch.arange(48.0).reshape(N, 3, 4)[..., ::2], 0
    yield "rows transposed, dense", torch.arange(24.0).reshape(N, 2, 3).mT, 0
    yield "rows transposed, spaced", torch.arange(48.0).reshape(2 * N, 2, 3)[::2].mT, 0
    yield "rows column-major, sliced", torch.arange(48.0).reshape(N, 2, 6)[..., ::2].mT, 0
    assert per_replica  # every layout gives (3, 2) per replica


@pytest.mark.parametrize(("name", "x", "axis"), list(_caller_layouts()), ids=[c[0] for c in _caller_layouts()])
def test_views_and_copies_follow_the_replicas_layout_on_every_executor(name, x, axis):
    """A differential hunt found ``x * 1`` over the caller's buffer keeping its
    interleaved layout, so ``reshape`` copied where each replica's eager
    ``reshape`` viewed: the stacked executor silently lost a later write."""
    f = tp.pmap(_views_and_copies, "i", in_axes=axis, devices=devices(N))
    with executor("threads"):
        want = [f(x.clone()) for _ in range(2)]
    for name_ in ("stacked", "lockstep"):
        with executor(name_):  # and no fallback
            for expected in want:
                assert_same_bits(f(x.clone()), expected)


@pytest.mark.parametrize(("name", "x", "axis"), list(_caller_layouts()), ids=[c[0] for c in _caller_layouts()])
def test_autograd_through_every_layout(name, x, axis):
    """A copy made for a layout must carry autograd to the caller's tensor (writing the
    copy's rows through unbind's views raised under autograd, a review found)."""
    f = tp.pmap(lambda v: (v.sin() * v.reshape(-1).sum()).sum(), "i", in_axes=axis, devices=devices(N))
    grads = {}
    for name_ in ("threads", "stacked"):
        with executor(name_):
            base = x._base.detach().clone().requires_grad_()  # the caller's memory, as a leaf
            view = base.as_strided(x.shape, x.stride(), x.storage_offset())
            grads[name_] = [torch.autograd.grad(f(view).unshard().sum(), base)[0] for _ in range(2)]
    for got, want in zip(grads["stacked"], grads["threads"]):
        assert_same_bits(got, want)


def test_a_function_writing_an_input_runs_stacked_when_its_layout_needs_no_copy():
    """Dense transposed rows with the replicas spaced out: no copy, so no fallback."""
    x = torch.arange(48.0).reshape(2 * N, 2, 3)[::2].mT
    assert _row_layout.faithful(x)

    def f(v):
        v.mul_(2)
        return v.reshape(-1) * 1

    with executor("threads"):
        a = x.clone()
        want = tp.pmap(f, "i", devices=devices(N))(a)
    with executor("stacked"):
        b = x.clone()
        got = tp.pmap(f, "i", devices=devices(N))(b)
    assert_same_bits(got, want)
    assert torch.equal(a, b)


def test_a_sharded_output_fed_back_along_another_axis_keeps_its_replicas_layout():
    f = tp.pmap(lambda x: x.mT * 2, "i", devices=devices(N), out_axes=1)
    g = tp.pmap(_views_and_copies, "i", in_axes=1, devices=devices(N))
    x = torch.arange(24.0).reshape(N, 2, 3)
    with executor("threads"):
        want = g(f(x))
    with executor("stacked"):
        got = [g(f(x)) for _ in range(3)]
    for out in got:
        assert_same_bits(out, want)


def test_the_common_layouts_are_not_copied():
    """Contiguous callers, dense transposed rows and any sharded output of a stacked call
    are taken as they are: their rows already compute as the replicas do."""
    for t in (torch.zeros(N, 3, 2), torch.zeros(N, 2, 3).mT, torch.zeros(N, 3, 4)[..., ::2], torch.zeros(N)):
        assert _row_layout.faithful(t)


_W = torch.arange(12.0).reshape(3, 4) / 7


def _batch_norm_then_written(x):
    y = F.batch_norm(x, torch.zeros(4), torch.ones(4), training=False)
    z = y.reshape(-1)
    y.add_(100)
    return z


def _mse_then_written(x):
    y = F.mse_loss(x, _W, reduction="none")
    z = y.mT.reshape(-1)
    y.add_(100)
    return z


def _mse_then_as_strided(x):
    return F.mse_loss(x.t(), x.t() * 0.5, reduction="none").as_strided((6,), (1,)) * 1


def _pooled_then_as_strided(x):
    return F.max_pool2d(x, 2, 1).as_strided((6,), (1,)) * 1


@pytest.mark.parametrize(
    ("f", "x", "message"),
    [
        (_batch_norm_then_written, torch.arange(N * 12.0).reshape(N, 3, 4), "would return a view on one"),
        (_mse_then_written, torch.arange(N * 12.0).reshape(N, 4, 3).mT, "would return a view on one"),
        (_mse_then_as_strided, torch.arange(N * 12.0).reshape(N, 3, 4), "as_strided of a value"),
        (_pooled_then_as_strided, torch.arange(N * 40.0).reshape(N, 4, 5, 2).permute(0, 3, 1, 2), "as_strided of"),
    ],
    ids=["batch_norm eval", "mse_loss none", "as_strided of mse_loss none", "as_strided of a channels-last pool"],
)
def test_a_batching_rule_that_lays_out_otherwise_falls_back_before_a_view_or_copy(f, x, message):
    """These batching rules lay their result out otherwise than one replica's op, even over
    a contiguous buffer (a review found them): a reshape or contiguous of it would copy where
    eager views (or the reverse), and the write after it was lost silently."""
    pf = tp.pmap(f, "i", devices=devices(N))
    with executor("threads"):
        want = pf(x.clone())
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match=message):
        got = pf(x.clone())
    assert_same_bits(got, want)
