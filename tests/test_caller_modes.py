"""Modes the caller has open around a call (TorchFunctionMode, TorchDispatchMode,
``torch.device``, FlopCounterMode, anomaly detection) reach every replica on every
executor, as they would in a loop over the replicas (found by a hunt: the threads
executor dropped them, so "auto" changed its answer on its second call)."""

import pytest
import torch
from helpers import devices, executor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import torchpmap as tp

N = 4
EXECUTORS = ["threads", "stacked", "lockstep", "auto"]
W = torch.linspace(-1, 1, 9).reshape(3, 3)


class ScaleProducts(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 10 if func is torch.Tensor.mul else out


class ScaleProductsBelow(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 10 if func is torch.ops.aten.mul.Tensor else out


def f(x):
    return (x * 2) @ W


def per_replica(fn, x):
    return torch.stack([fn(r) for r in x])


X = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)


@pytest.mark.parametrize("how", EXECUTORS)
@pytest.mark.parametrize("mode", [ScaleProducts, ScaleProductsBelow])
def test_a_mode_open_around_the_call_applies_in_every_replica(how, mode):
    with mode():
        want = per_replica(f, X)
    # A dispatch mode sends the captured executors to the threads (warned).
    with executor(how, allow_fallback=mode is ScaleProductsBelow):
        pf = tp.pmap(f, "i", devices=devices(N))
        for _ in range(3):  # auto: threads first, then captured
            with mode():
                assert torch.equal(pf(X).unshard(), want)
            assert torch.equal(pf(X).unshard(), per_replica(f, X))  # and not after it closed


@pytest.mark.parametrize("how", EXECUTORS)
def test_torch_device_context_reaches_the_replicas(how):
    def where(x):
        return x * 0 + (1.0 if torch.empty(0).device.type == "meta" else 0.0)

    with executor(how):
        pf = tp.pmap(where, "i", devices=devices(N))
        for _ in range(3):
            with torch.device("meta"):
                assert pf(X).unshard().eq(1).all()
            assert pf(X).unshard().eq(0).all()


@pytest.mark.parametrize("how", EXECUTORS)
def test_flop_counter_counts_every_replica(how):
    with FlopCounterMode(display=False) as counter:
        per_replica(f, X)
    want = counter.get_total_flops()
    assert want > 0
    with executor(how, allow_fallback=True):
        pf = tp.pmap(f, "i", devices=devices(N))
        for _ in range(3):
            with FlopCounterMode(display=False) as counter:
                pf(X)
            assert counter.get_total_flops() == want


@pytest.mark.parametrize("how", ["stacked", "auto"])
def test_anomaly_detection_runs_autograd_through_the_call(how):
    # The stacked capture raised "Could not guard on data-dependent expression" under it.
    w = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    pf = tp.pmap(lambda x: (torch.sin(x) * w).sum(), "i", devices=devices(N))
    with executor(how, allow_fallback=True):
        for _ in range(2):
            w.grad = None
            with torch.autograd.detect_anomaly():
                pf(X).sum().backward()
            assert torch.allclose(w.grad, torch.sin(X).sum(0))
