"""Host <-> device copies (``_transfers``). On the CPU alone they must be exactly
the plain ones (views where the host shares memory, fresh copies where asked);
tests/test_cuda.py checks the pinned staging on GPUs."""

from __future__ import annotations

import torch
from helpers import devices, rows

from torchpmap import _transfers


def test_on_virtual_cpu_devices_nothing_is_copied_unless_asked():
    x = rows(4, 3, 2)
    devs = devices(4)
    assert _transfers.to_device(x, devs[1]) is x
    assert _transfers.is_there(x, devs[2])
    assert all(v is x for v in _transfers.to_every(x, devs))
    slices = _transfers.slices_to(x, 1, devs[:3])
    for i, s in enumerate(slices):
        assert torch.equal(s, x[:, i]) and s.data_ptr() == x[:, i].data_ptr()  # views, as unbind gives
    copies = _transfers.copies_on(x, devs)
    ptrs = {c.data_ptr() for c in copies} | {x.data_ptr()}
    assert len(ptrs) == 5 and all(torch.equal(c, x) for c in copies)


def test_stack_on_host_is_torch_stack():
    parts = list(rows(3, 4, 5).unbind(0))
    for axis in (0, 1, 2):
        got = _transfers.stack_on_host(parts, axis)
        assert torch.equal(got, torch.stack(parts, axis)) and got.is_contiguous()


def test_autograd_sees_the_slices():
    x = rows(2, 3).requires_grad_()
    a, b = _transfers.slices_to(x, 0, devices(2))
    (a.sum() * 2 + b.sum() * 3).backward()
    assert torch.equal(x.grad, torch.tensor([[2.0] * 3, [3.0] * 3]))


def test_only_plain_dense_values_go_through_a_staging_copy():
    x = rows(2, 3)
    assert _transfers._plain(x)
    assert not _transfers._plain(x.clone().requires_grad_())
    with torch.no_grad():
        assert _transfers._plain(x.clone().requires_grad_())  # nothing for autograd to record
    assert not _transfers._plain(torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]))
    assert not _transfers._plain(torch.quantize_per_tensor(x, 0.1, 0, torch.qint8))
    assert not _transfers._plain(torch.nn.Parameter(x))

    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not _transfers._plain(x)  # a tangent could ride on it
