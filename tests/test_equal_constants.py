"""Constants equal by == that a function tells apart: each call computes with its own.

Plans are looked up by keys holding a call's constants (static arguments, Python
values passed broadcast, dict keys, pytree contexts), captures by Dynamo's
guards, which compare constants with ==. ``-0.0 == 0.0``, ``(1,) == (True,)``,
``frozenset({1}) == frozenset({1.0})``, and a dataclass may leave fields out
of its ==. Every executor must give each call what the threads executor gives
it, on the stacked fast path (the second call on) as on the general path.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import devices, executor
from torch.utils import _pytree as pytree

import torchpmap as tp

CAPTURED = ["stacked", "auto", "lockstep"]


def _calls(name, fn, arguments, **pmap_kwargs):
    """fn pmapped over 2 devices and called on each of ``arguments`` under executor
    ``name``; per call, what the first replica's row of the output holds."""
    pf = tp.pmap(fn, devices=devices(2), **pmap_kwargs)
    with executor(name, allow_fallback=True):
        return [_first(pf(*args)) for args in arguments]


def _first(out):
    if isinstance(out, dict):
        return {k: _first(v) for k, v in out.items()}
    t = out.unshard()[0]
    signs = [math.copysign(1.0, v) for v in t.flatten().tolist()] if t.is_floating_point() else None
    return (t.dtype, t.tolist(), signs)


@pytest.mark.parametrize("name", CAPTURED)
def test_a_zero_passed_broadcast_keeps_its_sign_after_calls_with_no_zero(name):
    # The fast path compared the zeros' signs only when the first call had a zero.
    x = torch.ones(2, 3)
    arguments = [(x, s) for s in (1.0, 1.0, -0.0, 0.0, 0.0, -0.0, complex(-0.0, 0.0), 1 + 1j)]
    fn = lambda x, s: x * s  # noqa: E731
    expected = _calls("threads", fn, arguments, in_axes=(0, None))
    assert _calls(name, fn, arguments, in_axes=(0, None)) == expected
    assert [signs[0] for _, _, signs in expected[2:6]] == [-1.0, 1.0, 1.0, -1.0]


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    scale: float = dataclasses.field(compare=False)  # left out of ==, and of the hash


@pytest.mark.parametrize("name", CAPTURED)
def test_each_call_gets_its_own_dict_keys_when_they_compare_equal(name):
    # The fast path rebuilt every call's arguments with the first call's key objects.
    x = torch.ones(2, 3)
    fn = lambda d: {k.name: v * k.scale for k, v in d.items()}  # noqa: E731
    arguments = [({Param("w", s): x},) for s in (2.0, 2.0, 5.0, 7.0)]
    expected = _calls("threads", fn, arguments)
    assert _calls(name, fn, arguments) == expected
    assert [e["w"][1][0] for e in expected] == [2.0, 2.0, 5.0, 7.0]


@pytest.mark.parametrize("name", CAPTURED)
@pytest.mark.parametrize(
    "keys",
    [((1,), (1,), (1,), (True,), (1.0,)), (0.0, 0.0, -0.0, 0.0), (("a", 1), ("a", 1), ("a", 1.0))],
    ids=["tuple-element-types", "zero-signs", "mixed-tuples"],
)
def test_dict_keys_equal_but_written_otherwise_reach_the_function_as_passed(name, keys):
    x = torch.ones(2, 4)

    def fn(d):
        ((k, v),) = d.items()
        parts = k if isinstance(k, tuple) else (k,)
        # What the key is: its parts' types and signs, as values the output holds.
        code = [float(type(p) is bool) + 2 * float(type(p) is float) for p in parts]
        signs = [math.copysign(1.0, p) if isinstance(p, float) else 0.0 for p in parts]
        return v * 0 + torch.tensor([*code, *signs, 0.0, 0.0, 0.0][:4])

    arguments = [({k: x},) for k in keys]
    assert _calls(name, fn, arguments) == _calls("threads", fn, arguments)


@pytest.mark.parametrize("name", CAPTURED)
@pytest.mark.parametrize("static", [True, False], ids=["static", "broadcast"])
def test_sets_equal_but_of_other_element_types_are_other_constants(name, static):
    x = torch.zeros(2, 1, dtype=torch.int64)
    kwargs = dict(static_broadcasted_argnums=1) if static else dict(in_axes=(0, None))
    fn = lambda x, k: x + torch.tensor(sorted(k))  # noqa: E731
    arguments = [(x, k) for k in (frozenset({1}), frozenset({1}), frozenset({1.0}), frozenset({True}), frozenset({1}))]
    expected = _calls("threads", fn, arguments, **kwargs)
    assert _calls(name, fn, arguments, **kwargs) == expected
    assert [e[0] for e in expected] == [torch.int64, torch.int64, torch.float32, torch.int64, torch.int64]


class Box:
    def __init__(self, t, meta):
        self.t, self.meta = t, meta


pytree.register_pytree_node(Box, lambda b: ([b.t], b.meta), lambda leaves, meta: Box(leaves[0], meta))


@pytest.mark.parametrize("name", CAPTURED)
@pytest.mark.parametrize(
    ("fn", "contexts"),
    [
        (lambda b: b.t * b.meta.scale, [Param("w", s) for s in (2.0, 2.0, 5.0, 7.0)]),
        (lambda b: b.t * 0 + math.copysign(1.0, b.meta), [0.0, 0.0, 0.0, -0.0, 0.0]),
    ],
    ids=["dataclass", "zero"],
)
def test_a_registered_nodes_context_reaches_the_function_as_passed(name, fn, contexts):
    x = torch.ones(2, 3)
    arguments = [(Box(x, c),) for c in contexts]
    assert _calls(name, fn, arguments) == _calls("threads", fn, arguments)
