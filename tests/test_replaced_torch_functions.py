"""A torch function replaced by a user's wrapper that calls the original
(``F.relu = logged_relu``, as profiling, logging and kernel-swapping code does)
runs once per call of it, as in eager PyTorch, on every executor.

torch passes the name's current value (the wrapper) to each TorchFunctionMode,
and a mode that calls it runs the wrapper inside itself: with torchpmap's own
modes a wrapper multiplying by 3 gave 9 on the threads, 81 lockstep and 729
stacked (found by a hunt)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import devices, executor

import torchpmap as tp

N = 4


@pytest.fixture
def tripled(monkeypatch):
    """``name`` in ``namespace`` replaced by a wrapper calling the original, times 3."""

    def replace(namespace, name):
        original = getattr(namespace, name)

        def wrapper(*args, **kwargs):
            return original(*args, **kwargs) * 3

        monkeypatch.setattr(namespace, name, wrapper)

    return replace


def _calls(f, x, name, **kwargs):
    """Four calls of ``pmap(f)`` under executor ``name``; their results and warnings."""
    pf = tp.pmap(f, devices=devices(N), **kwargs)
    with executor(name, allow_fallback=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        got = [pf(x).unshard() for _ in range(4)]
    return got, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


EXECUTORS = ["threads", "auto", "stacked", "lockstep"]


@pytest.mark.parametrize("name", EXECUTORS)
def test_a_replaced_functional_runs_once_per_call(tripled, name):
    tripled(torch.nn.functional, "relu")
    x = torch.randn(N, 5)
    got, caught = _calls(lambda v: F.relu(v) + 1, x, name)
    for g in got:
        torch.testing.assert_close(g, x.relu() * 3 + 1, rtol=0, atol=0)
    if name in ("stacked", "lockstep"):  # captures fall back, and say why
        assert any("torch.nn.functional.relu (by" in m and "replaces a torch function" in m for m in caught)


@pytest.mark.parametrize("name", EXECUTORS)
def test_a_replaced_tensor_method_runs_once_per_call(tripled, name):
    tripled(torch.Tensor, "sigmoid")
    x = torch.randn(N, 5)
    got, _ = _calls(lambda v: v.sigmoid() - 1, x, name)
    for g in got:
        torch.testing.assert_close(g, torch.sigmoid(x) * 3 - 1, rtol=0, atol=0)


@pytest.mark.parametrize("name", EXECUTORS)
def test_a_replaced_random_function_still_draws_each_replicas_stream(tripled, name):
    # The streams mode classifies the function it is given: a wrapper of torch.rand is
    # torch.rand's draw, routed to the replica's stream (and applied once).
    tripled(torch, "rand")
    x = torch.zeros(N, 3)

    def f(v):
        return v + torch.rand(3)

    torch.manual_seed(0)
    got, _ = _calls(f, x, name)
    torch.manual_seed(0)
    with executor("threads"):
        reference = [tp.pmap(f, devices=devices(N))(x).unshard() for _ in range(4)]
    for g, r in zip(got, reference):
        assert (g >= 0).all() and (g < 3).all() and (g > 1).any()  # tripled once: up to 3, not 9
        assert len({tuple(row.tolist()) for row in g}) == N  # each replica its own numbers
        if name == "threads":
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_replacements_of_functions_a_capture_does_not_call_leave_it_captured(monkeypatch):
    # Libraries replace torch functions for their own ends (torch.load, Tensor.__repr__):
    # only those the captured graph calls send it to the threads.
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)
    monkeypatch.setattr(torch.Tensor, "__repr__", lambda self: "tensor")
    x = torch.randn(N, 5)
    got, caught = _calls(lambda v: F.relu(v) * 2, x, "stacked")
    assert not caught
    for g in got:
        torch.testing.assert_close(g, x.relu() * 2, rtol=0, atol=0)


def test_a_replacement_from_a_module_whose_name_starts_with_torch_is_recognised(tripled):
    # (torchvision, a user's torch_utils: not torch's own functions)
    tripled(torch.nn.functional, "relu")
    F.relu.__module__ = "torch_utils"
    x = torch.randn(N, 5)
    got, _ = _calls(lambda v: F.relu(v) + 1, x, "threads")
    for g in got:
        torch.testing.assert_close(g, x.relu() * 3 + 1, rtol=0, atol=0)


def _tripled_with_wraps(original):
    """A wrapper of ``original`` times 3, made with functools.wraps (which copies __module__)."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return original(*args, **kwargs) * 3

    return wrapper


def test_a_wrapper_made_with_functools_wraps_is_recognised(monkeypatch):
    # functools.wraps copies __module__ ("torch.nn.functional"): the wrapper passed for torch's own.
    monkeypatch.setattr(torch.nn.functional, "relu", _tripled_with_wraps(F.relu))
    x = torch.randn(N, 5)
    for name in EXECUTORS:
        got, _ = _calls(lambda v: F.relu(v) + 1, x, name)
        for g in got:
            torch.testing.assert_close(g, x.relu() * 3 + 1, rtol=0, atol=0)


def test_a_function_replaced_before_import_is_found_through_its_wrapped(monkeypatch):
    from torchpmap import _torch_originals

    original = F.relu
    wrapper = _tripled_with_wraps(original)
    monkeypatch.setattr(torch.nn.functional, "relu", wrapper)
    # As if torchpmap had been imported after the replacement: the import-time binding is the wrapper.
    monkeypatch.setitem(_torch_originals._bound_at_import, (2, "relu"), wrapper)
    monkeypatch.setattr(_torch_originals, "_resolved", {})
    assert _torch_originals.original(wrapper) is original
