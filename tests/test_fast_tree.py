"""_fast_tree's structure keys stand for torch's TreeSpecs on a call's hot path:
the same leaves in the same order, the same trees rebuilt, equal keys exactly
for equal specs with keys of the same types, and None (torch's pytree decides)
for any node it does not know."""

from __future__ import annotations

import collections
import dataclasses
import enum
import random

import numpy as np
import pytest
import torch
from helpers import assert_same_bits, devices, executor, rows
from torch.utils import _pytree as pytree

import torchpmap as tp
from torchpmap import _fast_tree
from torchpmap._constant_signature import spec_signature

Pair = collections.namedtuple("Pair", "a b")


class Color(enum.IntEnum):
    RED = 1


class Name(str, enum.Enum):
    A = "a"


# Dict keys equal to each other (torch's specs are equal) but of other types.
_EQUAL_KEYS = [1, True, 1.0, Color.RED, np.int64(1), "a", Name.A]


def _random_tree(rng: random.Random, depth: int = 0):
    """Tuples, lists and dicts (str, int and mixed keys, in any insertion order) of the leaves a call passes."""
    kind = rng.choice(["leaf", "leaf", "tuple", "list", "dict"] if depth < 3 else ["leaf"])
    if kind == "leaf":
        return rng.choice([torch.zeros(2), torch.ones(()), 1, 2.5, True, None, "s", 1j, np.ones(2), np.float32(3)])
    children = [_random_tree(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return children
    keys = rng.sample(["a", "b", "c", 0, 1], len(children))
    return dict(zip(keys, children))


def _corpus(n: int = 200):
    rng = random.Random(0)
    return [_random_tree(rng) for _ in range(n)]


def _same_tree(a, b) -> bool:
    """The same containers, keys and key order, holding the very same leaves."""
    (leaves_a, spec_a), (leaves_b, spec_b) = pytree.tree_flatten(a), pytree.tree_flatten(b)
    return spec_a == spec_b and len(leaves_a) == len(leaves_b) and all(x is y for x, y in zip(leaves_a, leaves_b))


@pytest.mark.parametrize("tree", _corpus(), ids=lambda t: type(t).__name__)
def test_flatten_gives_torchs_leaves_and_unflatten_its_tree(tree):
    leaves, structure = _fast_tree.flatten(tree)
    expected_leaves, spec = pytree.tree_flatten(tree)
    assert len(leaves) == len(expected_leaves)
    assert all(a is b for a, b in zip(leaves, expected_leaves))
    assert _same_tree(_fast_tree.unflatten(leaves, structure), pytree.tree_unflatten(leaves, spec))
    assert _same_tree(_fast_tree.unflatten(leaves, spec), tree)


def _keys_as_written(tree):
    """Every dict key in ``tree`` as its type and repr, in flattening order: keys
    equal by == but written otherwise ((1,) and (True,), 0.0 and -0.0) differ."""
    if isinstance(tree, dict):
        keys = tuple((type(k), repr(k)) for k in tree)
        return (keys, *[_keys_as_written(v) for v in tree.values()])
    if isinstance(tree, (tuple, list)):
        return tuple(_keys_as_written(v) for v in tree)
    return None


# Equal by ==, hashed alike, written otherwise: a tuple key's element types, a zero's sign.
_NESTED_EQUAL_KEYS = [(1,), (True,), (1.0,), 0.0, -0.0, ("a", 1), ("a", 1.0), frozenset({1}), frozenset({1.0})]


def test_keys_are_equal_exactly_where_torchs_specs_and_the_keys_as_written_are():
    trees = _corpus(150) + [{"a": 1, "b": 2}, {"b": 2, "a": 1}, (1, 2), [1, 2], ((),), ([],), {}, (), [], ({},)]
    # (not np.int64(1): numpy's == against a tuple key gives an array, ambiguous to compare)
    keys = [k for k in _EQUAL_KEYS if not isinstance(k, np.generic)] + _NESTED_EQUAL_KEYS
    trees += [{k: 1} for k in keys] + [[{"x": {k: 2}}] for k in keys]
    found = [(_fast_tree.flatten(t)[1], pytree.tree_flatten(t)[1], _keys_as_written(t)) for t in trees]
    for key_a, spec_a, keys_a in found:
        for key_b, spec_b, keys_b in found:
            assert (key_a == key_b) == (spec_a == spec_b and keys_a == keys_b)
            if key_a == key_b:
                assert hash(key_a) == hash(key_b)


def test_spec_signatures_tell_apart_specs_torch_takes_for_equal():
    # The TreeSpec path's half of the plan key: an OrderedDict sends a tree there.
    keys = _EQUAL_KEYS + _NESTED_EQUAL_KEYS
    specs = [pytree.tree_structure([collections.OrderedDict([(k, 1)]), {k: 2}]) for k in keys]
    assert specs[0] == specs[1] == specs[2] and specs[-2] == specs[-1]  # what the signatures are for
    signatures = [spec_signature(spec) for spec in specs]
    assert len(set(signatures)) == len(keys)
    again = pytree.tree_structure([collections.OrderedDict([(True, 7)]), {True: 8}])
    assert spec_signature(again) == signatures[1]


@dataclasses.dataclass
class _Registered:
    x: torch.Tensor


pytree.register_dataclass(_Registered)


class _MyDict(dict):
    pass


class _Unregistered:
    pass


@pytest.mark.parametrize(
    "node",
    [
        Pair(torch.zeros(1), 1),
        collections.OrderedDict(a=torch.zeros(1)),
        collections.defaultdict(list, a=torch.zeros(1)),
        collections.deque([torch.zeros(1)]),
        _MyDict(a=torch.zeros(1)),  # a leaf to torch: left to it all the same
        _Registered(torch.zeros(1)),
        _Unregistered(),
        torch.Size([2, 3]),
    ],
    ids=lambda v: type(v).__name__,
)
def test_any_other_node_or_object_is_left_to_torchs_pytree(node):
    assert _fast_tree.flatten(node) is None
    assert _fast_tree.flatten({"params": [torch.zeros(1), (node,)]}) is None


def test_a_type_registered_as_a_node_is_left_to_torchs_pytree():
    class Box(torch.Tensor):  # a leaf type, until someone registers it
        pass

    box = torch.zeros(1).as_subclass(Box)
    assert _fast_tree.flatten([box])[0] == [box]
    pytree.register_pytree_node(Box, lambda b: ([], None), lambda children, context: Box())
    try:
        assert _fast_tree.flatten([box]) is None
    finally:
        pytree._deregister_pytree_node(Box)


def test_unflatten_refuses_leaves_its_structure_does_not_hold():
    _, structure = _fast_tree.flatten({"a": 1, "b": (2, 3)})
    with pytest.raises(ValueError, match="more leaves"):
        _fast_tree.unflatten([1, 2, 3, 4], structure)
    with pytest.raises(ValueError, match="fewer leaves"):
        _fast_tree.unflatten([1, 2], structure)


def test_calls_with_trees_torch_alone_knows_keep_their_types_on_the_fast_path():
    # Dicts and lists take the structure keys; a namedtuple and an OrderedDict in the
    # same call send the whole tree through torch's pytree, call after call.
    n = 4

    def f(t):
        return {"pair": Pair(t["pair"].b, t["pair"].a), "od": t["od"], "l": [t["l"][0] * 2]}

    pf = tp.pmap(f, "i", devices=devices(n))
    tree = {
        "pair": Pair(rows(n, 2), rows(n, 3)),
        "od": collections.OrderedDict(z=rows(n, 1), a=rows(n, 2)),
        "l": [rows(n, 2)],
    }
    with executor("threads"):
        expected = pf(tree)
    with executor("stacked"):
        for _ in range(3):
            out = pf(tree)
            assert type(out["pair"]) is Pair and type(out["od"]) is collections.OrderedDict
            assert list(out["od"]) == ["z", "a"]
            assert_same_bits(expected, out)


@pytest.mark.parametrize("name", ["threads", "stacked", "lockstep"])
@pytest.mark.parametrize("ordered", [False, True], ids=["dict", "OrderedDict"])
def test_each_call_gets_its_own_dict_keys_when_keys_of_other_types_are_equal(name, ordered):
    # {1: x} and {True: x} have equal TreeSpecs. A plan keyed by the spec alone
    # replayed the first call's keys: the stacked fast path gave the function
    # {1: x} for {True: x}, and the output came back with the int key.
    n = 2
    container = collections.OrderedDict if ordered else dict
    seen = []

    def f(d):
        seen.append(tuple(type(k) for k in d))
        return container((k, v * 2) for k, v in d.items())

    pf = tp.pmap(f, "i", devices=devices(n))
    x = rows(n, 3)
    with executor(name):
        # (not np.int64: Dynamo cannot capture a dict keyed by one, and falls back)
        for key in [1, True, 1.0, Color.RED, "a", Name.A, "a", True, 1]:
            for _ in range(3):  # the second and third calls take the stacked fast path
                out = pf(container([(key, x)]))
                (got,) = out
                assert type(got) is type(key) and got == key
                assert type(out) is container
                assert_same_bits(out[key].unshard(), x * 2)
            assert seen[-1] == (type(key),)  # what the function saw (last capture or replica)


def test_a_tensor_type_registered_as_a_node_is_a_tree_when_passed_positionally_too():
    # Positional plain tensors skip flattening; a tensor subclass registered as a
    # pytree node must still be flattened, as it is when passed by keyword.
    class Scaled(torch.Tensor):
        pass

    pytree.register_pytree_node(
        Scaled, lambda s: ([s.as_subclass(torch.Tensor) * 10], None), lambda children, _: children[0]
    )
    try:
        n = 2
        pf = tp.pmap(lambda s: s + 1, "i", devices=devices(n))
        x = rows(n, 3)
        scaled = x.clone().as_subclass(Scaled)
        with executor("threads"):
            assert_same_bits(pf(scaled).unshard(), x * 10 + 1)
            assert_same_bits(pf(s=scaled).unshard(), x * 10 + 1)
    finally:
        pytree._deregister_pytree_node(Scaled)
