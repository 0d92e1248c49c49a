"""Halo exchange: stencil programs on a 1-D domain split across devices.

Each device owns a contiguous block of cells and gets its neighbours'
boundary cells with ``ppermute`` (right-most cell to the right neighbour,
left-most cell to the left neighbour). A periodic domain closes the ring; a
bounded one relies on ppermute's zeros for the devices nobody sends to, which
is exactly a zero (dead / cold) boundary. Every program is checked against a
sequential reference on the whole domain.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import pmap_k

import torchpmap as tp

DEVICE_COUNTS = [1, 2, 4, 8]


def halo(block: torch.Tensor, periodic: bool):
    """The cell left of this block and the cell right of it (zeros past a
    bounded domain's ends)."""
    k = tp.axis_size("i")
    if periodic:
        to_right = [(r, (r + 1) % k) for r in range(k)]
        to_left = [(r, (r - 1) % k) for r in range(k)]
    else:
        to_right = [(r, r + 1) for r in range(k - 1)]
        to_left = [(r, r - 1) for r in range(1, k)]
    left = tp.ppermute(block[-1:], "i", to_right)  # my left neighbour's last cell
    right = tp.ppermute(block[:1], "i", to_left)  # my right neighbour's first cell
    return left, right


# -- rule 110 ------------------------------------------------------------------------------
RULE = 110


def rule_step(cells: np.ndarray, periodic: bool) -> np.ndarray:
    """One step of an elementary cellular automaton on the whole domain."""
    if periodic:
        left, right = np.roll(cells, 1), np.roll(cells, -1)
    else:
        left = np.concatenate([[0], cells[:-1]])
        right = np.concatenate([cells[1:], [0]])
    pattern = 4 * left + 2 * cells + right
    return (RULE >> pattern) & 1


def rule_step_block(block: torch.Tensor, periodic: bool) -> torch.Tensor:
    left, right = halo(block, periodic)
    padded = torch.cat([left, block, right])
    pattern = 4 * padded[:-2] + 2 * padded[1:-1] + padded[2:]
    return (RULE >> pattern) & 1


@pytest.mark.parametrize("periodic", [True, False], ids=["ring", "bounded"])
@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_rule110_one_step(k, periodic):
    n = 6 * k
    cells = np.random.default_rng(k).integers(0, 2, size=n)
    blocks = torch.from_numpy(cells).reshape(k, n // k)
    out = pmap_k(lambda b: rule_step_block(b, periodic), k)(blocks)
    expected = rule_step(cells, periodic)
    np.testing.assert_array_equal(out.unshard().reshape(-1).cpu().numpy(), expected)
    assert out.dtype == torch.int64


@pytest.mark.parametrize("periodic", [True, False], ids=["ring", "bounded"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_rule110_many_steps_single_cell_seed(k, periodic):
    """The classic rule 110 triangle from a single live cell: many exchanges
    in one pmap call, and pattern growth crosses every device boundary."""
    n = 8 * k
    steps = n  # rule 110 grows leftwards by one cell a step
    cells = np.zeros(n, dtype=np.int64)
    cells[-2] = 1

    def run(block):
        for _ in range(steps):
            block = rule_step_block(block, periodic)
        return block

    out = pmap_k(run, k)(torch.from_numpy(cells).reshape(k, -1))
    expected = cells
    for _ in range(steps):
        expected = rule_step(expected, periodic)
    assert expected[: n // k].any(), "the test should make live cells reach the first device"
    np.testing.assert_array_equal(out.unshard().reshape(-1).cpu().numpy(), expected)


def test_rule110_steps_across_calls_keep_data_on_devices():
    """Feeding the ShardedTensor result back in: one step per pmap call."""
    k, n = 4, 32
    cells = np.random.default_rng(1).integers(0, 2, size=n)
    step = pmap_k(lambda b: rule_step_block(b, True), k)
    state = step(torch.from_numpy(cells).reshape(k, -1))
    expected = rule_step(cells, True)
    for _ in range(10):
        state = step(state)
        expected = rule_step(expected, True)
    np.testing.assert_array_equal(state.unshard().reshape(-1).numpy(), expected)


# -- heat equation -------------------------------------------------------------------------
ALPHA = 0.25


def heat_step(u: np.ndarray, periodic: bool) -> np.ndarray:
    """Explicit Euler for u_t = u_xx on the whole domain (zero Dirichlet
    boundary when bounded)."""
    if periodic:
        left, right = np.roll(u, 1, axis=-1), np.roll(u, -1, axis=-1)
    else:
        z = np.zeros_like(u[..., :1])
        left = np.concatenate([z, u[..., :-1]], axis=-1)
        right = np.concatenate([u[..., 1:], z], axis=-1)
    return u + ALPHA * (left - 2 * u + right)


def heat_step_block(block: torch.Tensor, periodic: bool) -> torch.Tensor:
    # block: (cells,) or (batch, cells) with cells last: move them first for the halo
    u = block.movedim(-1, 0)
    left, right = halo(u, periodic)
    padded = torch.cat([left, u, right])
    new = u + ALPHA * (padded[:-2] - 2 * u + padded[2:])
    return new.movedim(0, -1)


@pytest.mark.parametrize("periodic", [True, False], ids=["ring", "bounded"])
@pytest.mark.parametrize("k", DEVICE_COUNTS)
def test_heat_equation_steps(k, periodic):
    n, steps = 5 * k, 20
    u0 = np.random.default_rng(k).random(n)

    def run(block):
        for _ in range(steps):
            block = heat_step_block(block, periodic)
        return block

    out = pmap_k(run, k)(torch.from_numpy(u0).reshape(k, -1))
    expected = u0
    for _ in range(steps):
        expected = heat_step(expected, periodic)
    np.testing.assert_allclose(out.unshard().reshape(-1).cpu().numpy(), expected, rtol=1e-12, atol=1e-14)
    if periodic:  # the ring conserves heat
        np.testing.assert_allclose(out.unshard().sum().item(), u0.sum(), rtol=1e-12)


def test_heat_equation_batched_domain_mapped_on_last_axis():
    """A batch of rods laid out (batch, devices, cells) and mapped with
    in_axes=out_axes=1: every halo message is a whole column of the batch."""
    k, batch, per = 4, 3, 5
    u0 = np.random.default_rng(2).random((batch, k * per))
    x = torch.from_numpy(u0).reshape(batch, k, per)

    def run(block):  # (batch, per)
        for _ in range(5):
            block = heat_step_block(block, False)
        return block

    out = pmap_k(run, k, in_axes=1, out_axes=1)(x)
    expected = u0
    for _ in range(5):
        expected = heat_step(expected, False)
    np.testing.assert_allclose(out.unshard().reshape(batch, -1).numpy(), expected, rtol=1e-12)


def test_heat_equation_compiled_matches_eager():
    k, n = 4, 16
    u0 = torch.from_numpy(np.random.default_rng(3).random(n)).reshape(k, -1)

    def run(block):
        for _ in range(3):
            block = heat_step_block(block, True)
        return block

    eager = pmap_k(run, k)(u0).unshard()
    compiled = pmap_k(run, k, compile=dict(backend="eager", fullgraph=True))(u0).unshard()
    torch.testing.assert_close(compiled, eager)
    expected = u0.reshape(-1).numpy()
    for _ in range(3):
        expected = heat_step(expected, True)
    np.testing.assert_allclose(eager.reshape(-1).numpy(), expected, rtol=1e-12)


def test_heat_equation_gradient_through_the_halo():
    """Backward through ppermute runs the halo exchange in reverse: the
    gradient of the final total heat in the left half with respect to the
    initial state matches the sequential program's."""
    k, n, steps = 4, 12, 4
    u0 = torch.from_numpy(np.random.default_rng(4).random(n))

    def run(block):
        for _ in range(steps):
            block = heat_step_block(block, False)
        return block

    x = u0.clone().reshape(k, -1).requires_grad_()
    out = pmap_k(run, k)(x).unshard().reshape(-1)
    out[: n // 2].sum().backward()

    ref = u0.clone().requires_grad_()
    u = ref
    for _ in range(steps):
        left = torch.cat([u.new_zeros(1), u[:-1]])
        right = torch.cat([u[1:], u.new_zeros(1)])
        u = u + ALPHA * (left - 2 * u + right)
    u[: n // 2].sum().backward()
    torch.testing.assert_close(x.grad.reshape(-1), ref.grad)
    assert x.grad.reshape(-1)[n // 2 :].abs().sum() > 0  # heat crossed the device boundary
