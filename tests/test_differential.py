"""Differential tests between the executors on generated programs.

Each program is a short random sequence of per-replica ops and collectives,
written out as Python source (printed when a comparison fails). The threads
executor is the reference: the stacked and lockstep executors must give its
outputs bit for bit (close, where a batched matmul may round differently),
and autograd through a stacked call must give its gradients. The generator is
seeded, so every run checks the same programs.
"""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import as_plain, devices

import torchpmap as tp

N = 4
PROGRAMS = 16

# Per-replica steps on y, a (4, 6) float32 tensor; w is a broadcast (6, 6) weight, C a (6,)
# tensor computed before the call that the program reaches as a global.
ELEMENTWISE = [
    "y = y.sin()",
    "y = torch.tanh(y) * 2 + 1",
    "y = torch.relu(y) - 0.5",
    "y = (y.abs() + 1).sqrt()",
    "y = y * y - y",
    "y = y.cumsum(1) / 6",
    "y = y - y.mean(0, keepdim=True)",
    "y = y + tp.axis_index('i')",
    "t = y * 1\n    t.add_(1)\n    y = t * t",
    "y = y @ w",
    "y = y * C",
]
COLLECTIVES = [
    "y = tp.psum(y, 'i')",
    "y = tp.pmean(y, 'i')",
    "y = tp.all_gather(y, 'i').sum(0)",
    "y = tp.all_gather(y, 'i', axis=1, tiled=True)[:, 3:9]",
    "y = tp.ppermute(y, 'i', [(r, (r + 1) % N) for r in range(N)])",
    "y = tp.psum_scatter(y.repeat(N, 1), 'i', tiled=True)",
    "y = tp.all_to_all(y.repeat(N, 1), 'i', 0, 1, tiled=True)[:, :6]",
    "y = tp.psum({'a': y, 'b': y.sum()}, 'i')['a']",
    "y = tp.psum(y, 'i', axis_index_groups=[[0, 2], [1, 3]])",
]
RANDOM = ["y = F.dropout(y, 0.3)", "y = y + torch.rand_like(y)"]


def generate(seed):
    """A program's source: 3 to 6 steps, a random op in some. Program ``seed`` has
    collective and elementwise step number ``seed`` (modulo their count), so a
    run of as many programs as the longer list covers every step."""
    rng = random.Random(seed)
    steps = [COLLECTIVES[seed % len(COLLECTIVES)], ELEMENTWISE[seed % len(ELEMENTWISE)]]
    steps += [rng.choice(ELEMENTWISE + COLLECTIVES) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        steps.append(rng.choice(RANDOM))
    rng.shuffle(steps)
    body = "\n    ".join(["y = x", *steps, "return y, tp.pmean(y.sum(), 'i')"])
    return f"def program(x, w):\n    {body}\n"


def compile_program(source):
    namespace = {"tp": tp, "torch": torch, "F": F, "N": N}
    exec(compile(source, f"<program {hash(source)}>", "exec"), namespace)
    return namespace["program"]


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, 6, generator=g) * 0.5, torch.randn(6, 6, generator=g) * 0.4, torch.randn(6, generator=g)


def run(executor, fun, x, w, c, grad=False):
    """The call's outputs (and the gradients of a loss of them) on ``executor``,
    from one seed, and whether it fell back."""
    pf = tp.pmap(fun, "i", in_axes=(0, None), devices=devices(N))
    tp.set_executor(executor)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            torch.manual_seed(1)
            if grad:
                x, w, c = x.clone().requires_grad_(), w.clone().requires_grad_(), c.clone().requires_grad_()
            results = []
            for _ in range(2):  # a first call (capture, first backward) and a later one
                fun.__globals__["C"] = c * 1.5  # a history the call's backward stops at
                out = pf(x, w)
                if grad:
                    y = as_plain(out[0])
                    loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()
                    results.append(torch.autograd.grad(loss, (x, w, c), allow_unused=True))
                else:
                    results.append(tuple(as_plain(o) for o in out))
    finally:
        tp.set_executor("threads")
    fell_back = any("runs on the threads executor" in str(c.message) for c in caught)
    return results, fell_back


def assert_same(expected, got, source, close):
    for e_call, g_call in zip(expected, got, strict=True):
        for e, g in zip(e_call, g_call, strict=True):
            if e is None or g is None:  # an input the outputs do not reach
                assert e is None and g is None, source
            elif close:
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{m}\n{source}")
            else:
                assert torch.equal(e, g), f"{(e - g).abs().max()} apart in\n{source}"


@pytest.mark.parametrize("seed", range(PROGRAMS))
def test_generated_programs_agree_across_executors(seed):
    source = generate(seed)
    fun = compile_program(source)
    x, w, c = inputs()
    close = "@" in source  # bmm over the replicas against one mm per replica
    expected, _ = run("threads", fun, x, w, c)
    stacked, fell_back = run("stacked", fun, x, w, c)
    assert not fell_back, f"the stacked executor fell back on\n{source}"
    assert_same(expected, stacked, source, close)
    lockstep, fell_back = run("lockstep", fun, x, w, c)
    assert fell_back == any(r in source for r in RANDOM), source  # lockstep does not route draws
    assert_same(expected, lockstep, source, close)


@pytest.mark.parametrize("seed", range(PROGRAMS))
def test_generated_programs_differentiate_alike_on_threads_and_stacked(seed):
    source = generate(seed)
    fun = compile_program(source)
    x, w, c = inputs()
    expected, _ = run("threads", fun, x, w, c, grad=True)
    got, fell_back = run("stacked", fun, x, w, c, grad=True)
    assert not fell_back, f"the stacked executor fell back on\n{source}"
    assert_same(expected, got, source, close="@" in source)
