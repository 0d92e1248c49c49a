"""PyTorch's own op samples (its OpInfo database) through the stacked executor.

The stacked executor runs a replica's ops through functorch's batching rules,
and a wrong rule is a silent wrong result (``_batching_bugs``). Sweeps of the
whole database against the threads executor found the refused rules; this
keeps a curated part of it: ops whose rules do real work (reductions over
dims, indexing and scatters, sorting, views, in-place variants), each with
PyTorch's first float32 sample, every tensor in it mapped with a different
value per replica. Each must give the threads executor's bits, or fall back
to the threads (with the warning) and give them there.
"""

import warnings

import pytest
import torch
from helpers import assert_same_bits, devices, executor
from torch.utils._pytree import tree_flatten, tree_unflatten

import torchpmap as tp

pytestmark = pytest.mark.slow  # each op is captured (~0.1 s), and the import takes seconds

N = 2
# "name", "name.variant" (PyTorch's variant_test_name), ":int64" for an integer sample.
OPS = [
    # reductions over dims
    "sum", "mean", "amax", "amin", "prod", "std", "var", "logsumexp", "argmax", "argmin",
    "cumsum", "cumprod", "cummax", "all", "any", "count_nonzero", "aminmax",
    # indexing, gathers and scatters
    "index_select", "gather", "scatter", "scatter_add", "scatter_reduce.sum", "scatter_reduce.amax",
    "scatter_reduce.mean", "index_add", "index_copy", "index_fill", "index_put", "take", "take_along_dim",
    "masked_fill", "where", "nn.functional.one_hot:int64",
    # sorting and selection
    "sort", "argsort", "topk", "kthvalue", "median", "mode", "msort",
    # views and layout
    "reshape", "permute", "transpose", "unfold", "diagonal", "narrow", "split", "chunk", "flip", "roll",
    "rot90", "expand", "repeat", "tile", "movedim", "tril", "triu", "cat", "stack", "diag_embed",
    # pointwise ops with broadcasting, integer division and clamps
    "remainder", "fmod", "div.trunc_rounding", "div.floor_rounding", "floor_divide:int64", "clamp", "lerp",
    "atan2", "pow", "addcmul",
]  # fmt: skip
# Those with an in-place variant (op_(...)), run on a copy of the first argument.
IN_PLACE = [
    "cumsum", "cumprod", "scatter", "scatter_add", "scatter_reduce.sum", "index_add", "index_copy",
    "index_fill", "index_put", "masked_fill", "tril", "triu", "remainder", "fmod", "div.floor_rounding",
    "clamp", "lerp", "atan2", "pow", "addcmul",
]  # fmt: skip


def _op(spec):
    """The OpInfo ``spec`` names, and the dtype of its sample."""
    # Imported here, not when the suite is collected: it takes seconds (and needs expecttest,
    # a test dependency).
    from torch.testing._internal.common_methods_invocations import op_db

    name, _, dtype = spec.partition(":")
    name, _, variant = name.partition(".") if not name.startswith("nn.") else (name, "", "")
    found = [op for op in op_db if op.name == name and op.variant_test_name == variant]
    assert found, f"no OpInfo named {spec}"
    return found[0], getattr(torch, dtype or "float32")


def _first_sample(op, dtype):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sample = next(iter(op.sample_inputs("cpu", dtype)))
    return (sample.input, tuple(sample.args)), dict(sample.kwargs)


def _other_replica(t):
    """Another replica's value of a sample tensor: the same values in another order (valid
    indices stay valid), or a scaled 0-dim float."""
    if t.is_floating_point() and t.numel() <= 1:
        return t * 0.75 + 0.125
    return t.flip(list(range(t.dim()))) if t.dim() else t.clone()


def _check_op(op, dtype, call):
    (tensors_and_more, kwargs) = _first_sample(op, dtype)
    leaves, spec = tree_flatten(tensors_and_more)
    mapped = [j for j, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    stacks = [torch.stack([leaves[j], _other_replica(leaves[j])]) for j in mapped]

    def replica(*tensors):
        filled = list(leaves)
        for j, t in zip(mapped, tensors):
            filled[j] = t
        inp, args = tree_unflatten(filled, spec)
        return call(inp, *args, **kwargs)

    eager = [replica(*(s[r] for s in stacks)) for r in range(N)]
    with executor("threads"):
        want = tp.pmap(replica, "i", devices=devices(N))(*stacks)
    for r in range(N):  # the threads executor runs each replica as eager PyTorch does
        assert_same_bits(_row(want, r), eager[r])
    with executor("stacked", allow_fallback=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback is fine; a different result is not
        stacked = tp.pmap(replica, "i", devices=devices(N))
        for _ in range(2):  # the first call captures, the second takes the fast path
            assert_same_bits(stacked(*stacks), want)


def _row(out, r):
    leaves, spec = tree_flatten(out)
    return tree_unflatten([v.shards[r] if isinstance(v, tp.ShardedTensor) else v for v in leaves], spec)


@pytest.mark.parametrize("spec", OPS)
def test_op_gives_the_threads_bits_on_the_stacked_executor(spec):
    op, dtype = _op(spec)
    _check_op(op, dtype, op.op)


@pytest.mark.parametrize("spec", IN_PLACE)
def test_in_place_variant_gives_the_threads_bits_on_the_stacked_executor(spec):
    op, dtype = _op(spec)
    assert op.inplace_variant is not None
    _check_op(op, dtype, lambda inp, *args, **kwargs: op.inplace_variant(inp.clone(), *args, **kwargs))
