"""The stacked executor: the same bits as the threads executor, captured soundly,
and a warned fallback for everything outside its scope."""

import collections
import dataclasses
import enum
import gc
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_same_bits, devices, executor, rows

import torchpmap as tp
from torchpmap import _stacked

N = 4


def both(pf, *args, **kwargs):
    with executor("threads"):
        expected = pf(*args, **kwargs)
    with executor("stacked"):
        got = pf(*args, **kwargs)
    assert_same_bits(expected, got)
    return got


def pm(f, **kwargs):
    return tp.pmap(f, "i", devices=devices(N), **kwargs)


# -- the same bits -----------------------------------------------------------------------
FUNCTIONS = {
    "elementwise": lambda x: x * 2 + 1,
    "psum": lambda x: tp.psum(x, "i"),
    "pmean": lambda x: tp.pmean(x, "i"),
    "pmax": lambda x: tp.pmax(x, "i"),
    "pmin": lambda x: tp.pmin(x, "i"),
    "psum_groups": lambda x: tp.psum(x, "i", axis_index_groups=[[0, 2], [1, 3]]),
    "pmean_unequal_groups": lambda x: tp.pmean(x, "i", axis_index_groups=[[0], [1, 2, 3]]),
    "all_gather": lambda x: tp.all_gather(x, "i"),
    "all_gather_tiled_axis1": lambda x: tp.all_gather(x, "i", axis=1, tiled=True),
    "all_gather_groups": lambda x: tp.all_gather(x, "i", axis_index_groups=[[0, 1], [3, 2]]),
    "psum_scatter": lambda x: tp.psum_scatter(x, "i"),
    "psum_scatter_tiled": lambda x: tp.psum_scatter(x, "i", tiled=True),
    "all_to_all": lambda x: tp.all_to_all(x, "i", 0, 0),
    "all_to_all_groups": lambda x: tp.all_to_all(x[:2], "i", 0, 1, axis_index_groups=[[0, 1], [2, 3]]),
    "pswapaxes": lambda x: tp.pswapaxes(x, "i", 0),
    "ppermute": lambda x: tp.ppermute(x, "i", [(0, 1), (1, 2), (2, 0)]),
    "pshuffle": lambda x: tp.pshuffle(x, "i", [3, 2, 0, 1]),
    "axis_index": lambda x: x + tp.axis_index("i"),
    "axis_size": lambda x: x * tp.axis_size("i"),
    "pytree_collective": lambda x: tp.psum({"a": x, "b": (x * 2, x.sum())}, "i"),
    "pmean_tree_then_update": lambda x: {
        k: v - 0.1 * g for (k, v), g in zip({"a": x, "b": x[0]}.items(), tp.pmean([x, x[0]], "i"))
    },
    "psum_written_in_place": lambda x: tp.psum(x, "i").mul_(2).add_(x),
    "psum_written_through_a_slice": lambda x: _written_through_a_slice(tp.psum(x, "i")) * 2 + x,
    "complex_pmean_then_update": lambda x: (x + 1j) - 0.3 * tp.pmean((x + 2j) * (x - 1j), "i") * (1 + 1j),
    # Views Dynamo takes outside the graph, from replica 0's row: each replica's own.
    "transposed_input": lambda x: x.mT,
    "transposed_input_in_a_tree": lambda x: {"t": x.T, "twice": x.mT.mT, "sum": x.sum()},
    # Dynamo's default writes these as a fused multiply-add, which rounds otherwise.
    "in_place_updates_with_value_or_alpha": lambda x: _updated_in_place(x * 1.7, x + 0.3, x.abs() + 1),
    # Flat containers: one graph node per collective (see test_a_collective_is_one_node_of_the_capture).
    "collectives_of_flat_containers": lambda x: (
        tp.pmean({"b": x, "a": x * 2}, "i"),  # not in JAX's (sorted) order: the caller's order comes back
        tp.psum([x, x.sum(0)], "i"),
        tp.pmax((x, -x), "i"),
        tp.psum({"bool": x > 0, "int": x.to(torch.int32)}, "i"),
        tp.pmean({"g": x}, "i", axis_index_groups=[[0], [1, 2, 3]]),
        tp.all_gather({"z": x, "y": x[0]}, "i", tiled=True),
        tp.psum_scatter([x, x * 2], "i", tiled=True),
        tp.all_to_all({"k": x}, "i", 0, 1, tiled=True),
        tp.pswapaxes([x], "i", 0),
        tp.ppermute((x, x * 3), "i", [(0, 1), (1, 0)]),
        tp.pshuffle((x,), "i", [1, 0, 3, 2]),
    ),
}


def _updated_in_place(p, a, b):
    p.addcmul_(a, b, value=0.3).addcdiv_(a, b, value=-0.7).add_(a, alpha=0.1)
    return p.sub_(b, alpha=1.3)


def _written_through_a_slice(total):
    total[:1].zero_()
    return total


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_same_bits_as_threads(name):
    both(pm(FUNCTIONS[name]), rows(N, 4, 3))


def test_a_collective_is_one_node_of_the_capture(monkeypatch):
    """Dynamo interprets Python ~100x slower than it runs: a stacked capture takes each
    collective of a tensor or flat container as one node, not the collective's own
    Python (its checks, tree handling and pmean's division), which the backend runs."""
    from torchpmap import _ops, collectives

    graphs = []
    refuse_autocast = _stacked._refuse_autocast

    def spy(gm):
        graphs.append([node.target for node in gm.graph.nodes if node.op == "call_function"])
        return refuse_autocast(gm)

    monkeypatch.setattr(_stacked, "_refuse_autocast", spy)

    def f(x):
        g = tp.pmean({"w": x, "b": x[0]}, "i")
        return tp.psum(g["w"] * tp.axis_index("i"), "i"), tp.all_gather(g["b"], "i", tiled=True)

    both(pm(f), rows(N, 4, 3))
    (targets,) = graphs
    assert targets.count(collectives._collective_node) == 3
    assert targets.count(collectives._axis_index_node) == 1
    assert _ops._opaque_call not in targets and torch.true_divide not in targets


class _Key(enum.Enum):
    A = "a"


def test_a_dict_with_keys_the_graph_cannot_spell_is_still_captured():
    """An Enum key made the one-node collective's graph code unwritable (a review found it):
    such a dict takes the traced path."""
    both(pm(lambda x: tp.psum({_Key.A: x, 3: x * 2}, "i")[_Key.A]), rows(N, 3))


def test_a_stacked_backward_reduces_each_leaf_on_its_own(monkeypatch):
    """The backward's graphs are traced later, outside Dynamo: the collectives' Python must
    still take the stacked per-leaf path, not concatenate the leaves (copies per call)."""
    from torchpmap import _stacked_autograd

    graphs = []
    split = _stacked_autograd.ResidualSplit.__init__

    def spy(self, joint, *args):
        graphs.append([node.target for node in joint.graph.nodes])
        return split(self, joint, *args)

    monkeypatch.setattr(_stacked_autograd.ResidualSplit, "__init__", spy)
    x = rows(N, 3).requires_grad_()
    with executor("stacked"):
        out = pm(lambda v: tp.pmean({"a": v, "b": v.sin(), "c": v * 2}, "i"))(x)
        sum(o.unshard().sum() for o in out.values()).backward()
    (targets,) = graphs
    assert torch.ops.aten.cat.default not in targets and torch.ops.aten.split_with_sizes.default not in targets


def _total_then_pointwise(x, p):
    """Pointwise ops on an all-reduce's result (run once on its row) and
    readers meeting a replica's own value (given a broadcast view of it)."""
    t = tp.pmean(x, "i")
    real = not t.is_complex()
    once = (t * t, torch.add(t, t, alpha=0.3), t.exp(), torch.sigmoid(t), torch.tanh(t), t / 3.0, t.abs().sqrt())
    readers = (torch.add(p, t, alpha=0.3), t.exp() + p, t * p, torch.addcmul(p, t, p, value=0.7), torch.sigmoid(t) * p)
    if real:
        once += (torch.nn.functional.silu(t), torch.nn.functional.gelu(t))
        readers += (torch.pow(p.abs() + 1, t), torch.lerp(p, t, 0.3), torch.where(p > 0, t * 1.3, p))
    return once, readers


def test_a_per_replica_tensor_alpha_falls_back_with_the_threads_bits():
    """add_ with a per-replica tensor alpha needs its value as a number (Dynamo's fused
    multiply-add, which rounds otherwise, is off in captures): the call runs on the threads."""

    def f(x):
        return x.clone().add_(x, alpha=x[0, 0])

    x = rows(N, 3, 2)
    with executor("threads"):
        want = pm(f)(x)
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="capture failed"):
        got = pm(f)(x)
    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [33, 1027])
def test_pointwise_ops_on_an_all_reduce_result_give_the_threads_bits(dtype, size):
    """Computed once on the row and read through a broadcast view, they give
    the threads' bits even where the kernels' vectorised and scalar paths round
    differently (complex, half precision, alpha, transcendental)."""
    torch.manual_seed(size)
    x, p = torch.randn(N, size, dtype=dtype) * 3, torch.randn(N, size, dtype=dtype)
    both(pm(_total_then_pointwise), x, p)


def test_a_reduction_result_returned_is_each_replica_own():
    """All-reduce results are one row computed once and broadcast inside the
    graph: what the call returns is still n tensors of their own."""
    out = both(pm(lambda x: (tp.psum(x, "i"), tp.pmean(x, "i") * 2)), rows(N, 3))
    for y in out:
        shards = y.shards
        shards[0].fill_(-1.0)
        assert not torch.equal(shards[1], shards[0])


def test_pytrees_in_and_out():
    def f(d, t):
        return {"s": d["a"] + t[0], "p": (tp.psum(d["b"], "i"), t[1] * 3)}, None

    both(pm(f), {"a": rows(N, 3), "b": rows(N, 2, 2)}, (rows(N, 3, offset=1.0), rows(N, 5)))


def test_in_axes_and_out_axes():
    f = pm(lambda x, w: (x @ w, tp.pmean(x.sum(0), "i")), in_axes=(1, None), out_axes=(1, None))
    both(f, rows(3, N, 5), rows(5, 2))


def test_sharded_inputs_fed_back():
    f = pm(lambda x: tp.psum(x, "i") / 2 + x)
    x = tp.device_put_sharded(list(rows(N, 6)), devices(N))
    with executor("threads"):
        expected = f(f(x))
    with executor("stacked"):
        y = f(x)
        assert y.shard_layout.storage.value == "stacked"
        got = f(y)
    assert_same_bits(expected, got)


def test_a_stacked_output_fed_back_moves_nothing():
    with executor("stacked"):
        y = pm(lambda x: x * 2)(rows(N, 3))
        (buffer,) = y.stacked_buffers()
        z = pm(lambda r: r.add_(1))(y)  # writes the replicas' rows: the buffer itself
    assert z.stacked_buffers()[0].data_ptr() == buffer.data_ptr() == y.stacked_buffers()[0].data_ptr()
    assert torch.equal(buffer, rows(N, 3) * 2 + 1) and torch.equal(y.unshard(), buffer)
    assert [s.data_ptr() for s in y.shards] == [buffer[i].data_ptr() for i in range(N)]


def test_static_argument_recaptures():
    f = pm(lambda x, k: x * k, static_broadcasted_argnums=1)
    x = rows(N, 3)
    for k in (2, 3, 2):
        both(f, x, k)


def test_functional_mlp_step_with_grad_inside():
    torch.manual_seed(0)
    params = {
        "w1": torch.randn(8, 16) * 0.3,
        "w2": torch.randn(16, 16) * 0.3,
        "w3": torch.randn(16, 1) * 0.3,
    }

    def loss(p, x, y):
        h = torch.tanh(x @ p["w1"])
        h = torch.tanh(h @ p["w2"])
        return ((h @ p["w3"] - y) ** 2).mean()

    def step(p, x, y):
        grads, value = torch.func.grad_and_value(loss)(p, x, y)
        grads = tp.pmean(grads, "i")
        return {k: p[k] - 0.1 * grads[k] for k in p}, tp.pmean(value, "i")

    f = pm(step, in_axes=(None, 0, 0), out_axes=(None, None))
    x, y = torch.randn(N, 5, 8), torch.randn(N, 5, 1)
    results = {}
    for name in ("threads", "stacked"):
        p = dict(params)
        with executor(name):
            losses = []
            for _ in range(3):
                p, value = f(p, x, y)
                losses.append(value)
        results[name] = (p, losses)
    # Not bit for bit: the batched backward of a matmul runs other BLAS kernels
    # (bmm over the replicas) than each replica's mm, which round differently.
    assert_same_bits(results["threads"], results["stacked"], close=True)


# -- sound capture ---------------------------------------------------------------------
SCALE = torch.tensor(2.0)


def test_closed_over_tensor_changed_in_place_or_reassigned():
    global SCALE
    f = pm(lambda x: x * SCALE)
    x = rows(N, 3)
    both(f, x)
    SCALE.add_(1)
    got = both(f, x)
    assert torch.equal(got.unshard(), x * 3)
    SCALE = torch.tensor(5.0)
    got = both(f, x)
    assert torch.equal(got.unshard(), x * 5)


MODE = "double"


def test_python_global_read_recaptures():
    global MODE
    f = pm(lambda x: x * 2 if MODE == "double" else x * 3)
    x = rows(N, 3)
    assert torch.equal(both(f, x).unshard(), x * 2)
    MODE = "triple"
    try:
        assert torch.equal(both(f, x).unshard(), x * 3)
    finally:
        MODE = "double"


def _calls_through_dynamo(pf):
    """Records each call of pf's capture that goes through Dynamo's frame: a
    call whose guards no cache entry passes (the fast path takes the others)."""
    from torchpmap import _stacked

    (capture,) = _stacked._captures[pf._fun].values()
    calls, real = [], capture.compiled

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    capture.compiled = spy
    return calls


def test_the_fast_path_sees_a_closed_over_tensor_changed_in_place_or_reassigned():
    scale = torch.tensor(2.0)
    pf = pm(lambda x: x * scale)
    x = rows(N, 3)
    both(pf, x)
    through_dynamo = _calls_through_dynamo(pf)
    assert torch.equal(both(pf, x).unshard(), x * 2)
    scale.add_(1)
    assert torch.equal(both(pf, x).unshard(), x * 3)
    scale = torch.tensor(5.0)  # the closure's cell now holds another tensor, read at run time
    assert torch.equal(both(pf, x).unshard(), x * 5)
    assert through_dynamo == []  # the same guards: the fast path every time
    scale = torch.tensor([1.0, 2.0, 3.0])  # another shape: no entry's guards pass, Dynamo captures again
    assert torch.equal(both(pf, x).unshard(), x * scale)
    assert len(through_dynamo) == 1


def test_the_fast_path_recaptures_when_a_python_global_changes():
    global MODE
    pf = pm(lambda x: x * 2 if MODE == "double" else x * 3)
    x = rows(N, 3)
    both(pf, x)
    through_dynamo = _calls_through_dynamo(pf)
    for _ in range(3):
        assert torch.equal(both(pf, x).unshard(), x * 2)
    assert through_dynamo == []
    MODE = "triple"
    try:
        assert torch.equal(both(pf, x).unshard(), x * 3)
        assert len(through_dynamo) == 1
    finally:
        MODE = "double"
    for _ in range(2):  # back to the first entry, whose guards pass again
        assert torch.equal(both(pf, x).unshard(), x * 2)
    assert len(through_dynamo) == 1


def test_the_fast_path_picks_the_entry_of_each_static_argument():
    pf = pm(lambda x, k: x * k, static_broadcasted_argnums=1)
    x = rows(N, 3)
    both(pf, x, 2)
    through_dynamo = _calls_through_dynamo(pf)
    both(pf, x, 3)
    for k in (2, 3, 2, 3):
        assert torch.equal(both(pf, x, k).unshard(), x * k)
    assert len(through_dynamo) == 1  # the capture for k=3 only


def test_shape_change_recaptures():
    f = pm(lambda x: tp.psum(x, "i"))
    both(f, rows(N, 3))
    both(f, rows(N, 5, 2))


def test_strided_input_captures():
    both(pm(lambda x: tp.psum(x, "i") + x), rows(N, 4, 6)[..., :3])


def test_as_strided_on_rows_another_distance_apart_runs_as_on_the_threads():
    """The batched as_strided names the stacked buffer's strides, which Dynamo's
    guards on replica 0's row do not cover: a capture made on rows 4 apart read
    other replicas' elements for rows 25 apart, with no error."""
    f = pm(lambda x: x.as_strided((2,), (2,)) * 1)
    dense = rows(N, 4)
    spaced = rows(N, 25)[:, :4]  # each row (4,) with stride (1,), as dense's
    offset = rows(N, 25)[:, 1:5]
    both(f, dense)
    with executor("stacked"):
        f(dense)  # the capture, on dense rows
    fallback(f, spaced, match="as_strided on inputs laid out otherwise")
    with executor("stacked", allow_fallback=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x in (offset, dense, spaced):
            assert torch.equal(f(x).unshard(), torch.stack([r.as_strided((2,), (2,)) for r in x]))


def fallback(pf, *args, match):
    """Runs pf stacked, expecting one fallback warning matching ``match``; the
    result must still be the threads executor's."""
    with executor("threads"):
        expected = pf(*args)
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match=match):
        got = pf(*args)
    assert_same_bits(expected, got)
    with executor("stacked", allow_fallback=True), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per function and reason
        assert_same_bits(expected, pf(*args))


def _write_x_return_y(x, y):
    x.mul_(2)
    return y + 0  # eagerly, y shows the write wherever it overlaps x


def test_a_write_into_an_input_another_input_overlaps_runs_as_on_the_threads():
    """Stacked once computed such a write as if the other input were a copy."""
    results = {}
    for name in ("threads", "stacked", "stacked"):  # the second stacked call: the capture's own path
        b = rows(N, 6)
        with executor(name, allow_fallback=True), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            out = pm(_write_x_return_y)(b[:, :3], b[:, 1:4])
        results.setdefault(name, []).append((out.unshard(), b))
        if name == "stacked" and len(results[name]) == 1:
            assert any("shares memory with another input" in str(c.message) for c in caught)
    for got in results["stacked"]:
        assert_same_bits(results["threads"][0], got)


def test_an_in_place_op_between_overlapping_inputs_raises_as_on_the_threads():
    pf = pm(lambda x, y: x.add_(y) * 1)
    for name in ("threads", "stacked", "stacked"):
        b = rows(N, 6)
        with executor(name, allow_fallback=True), pytest.raises(RuntimeError, match="unsupported operation"):
            pf(b[:, :3], b[:, 1:4])


def test_inputs_from_disjoint_blocks_of_one_tensor_stay_stacked():
    pf = pm(lambda x, y: x.add_(y) * 1)
    b = rows(2 * N, 3)
    expected = b[:N] + b[N:]
    with executor("stacked"):  # no fallback warning
        out = pf(b[:N], b[N:])
    assert torch.equal(out.unshard(), expected)
    assert torch.equal(b[:N], expected)


@pytest.mark.parametrize("split", ["interleaved columns", "empty"])
def test_inputs_that_share_no_element_stay_stacked(split):
    pf = pm(lambda x, y: x.add_(1) * 1 + y.sum())
    b = rows(N, 6)
    x, y = (b[:, ::2], b[:, 1::2]) if split == "interleaved columns" else (b[:, :5], b[:, 2:2])
    expected = x + 1 + y.sum(-1, keepdim=True)
    with executor("stacked"):  # no fallback warning
        out = pf(x, y)
    assert torch.equal(out.unshard(), expected)


def _linear_under_autocast(x, w, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.nn.functional.linear(x, w, b)  # with a bias: functorch's rule ignores autocast


@pytest.mark.parametrize("where", ["body", "under_grad"])
def test_autocast_turned_on_inside_the_function_falls_back(where):
    """The batched graph computed such a linear in float32, silently."""
    w, b = rows(8, 16) / 16, rows(8) / 8

    def body(x):
        return _linear_under_autocast(x, w, b)

    def under_grad(x):
        return torch.func.grad_and_value(lambda x: _linear_under_autocast(x, w, b).float().sum())(x)

    f = pm(body if where == "body" else under_grad)
    x = rows(N, 5, 16) / 50
    with executor("threads"):
        expected = f(x)
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="turns autocast on"):
        got = f(x)
    assert_same_bits(expected, got)
    out = got if where == "body" else got[1]
    assert out.dtype == (torch.bfloat16 if where == "body" else torch.float32)


def test_autocast_turned_off_inside_the_function_stays_stacked():
    w, b = rows(8, 16) / 16, rows(8) / 8

    def f(x):
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.linear(x, w, b)

    both(pm(f), rows(N, 5, 16) / 50)


def _live_graph_modules():
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # isinstance on torch.distributed.reduce_op warns
        return sum(isinstance(o, torch.fx.GraphModule) for o in gc.get_objects())


@pytest.mark.parametrize("name", ["stacked", "lockstep"])
def test_a_pmapped_function_dropped_frees_its_captured_graphs(name):
    """Dynamo keeps each capture's trampoline code alive, and the cache entries on it
    held every graph: a pmapped function made and dropped in a loop leaked them all."""

    def evaluate(x):
        f = pm(lambda a: tp.psum(a * 2, "i"))
        f(x)
        return f(x)

    x = rows(N, 8)
    with executor(name):
        evaluate(x)
        before, managers = _live_graph_modules(), _live_guard_managers()
        for _ in range(10):
            evaluate(x)
    assert _live_graph_modules() <= before
    # Dynamo's finalizers on the modules and types its guards name held every dropped capture's
    # guard manager (~130 KB each) for good (found by a hunt).
    assert _live_guard_managers() <= managers


def _live_guard_managers():
    gc.collect()
    return sum(type(o).__name__ == "CheckFunctionManager" for o in gc.get_objects())


def test_branch_on_a_tensor_value_falls_back():
    fallback(pm(lambda x: x * 2 if x.sum() > 0 else x - 1), rows(N, 3), match="capture failed")


def test_item_falls_back():
    fallback(pm(lambda x: x * x.max().item()), rows(N, 3), match="capture failed")


def test_data_dependent_shape_falls_back():
    fallback(pm(lambda x: tp.psum(x[x > 0].sum(), "i")), rows(N, 3), match="capture failed")


def _takes_the_storage_of(x):
    b = torch.zeros_like(x)
    y = tp.psum(x, "i") * 2
    b.set_(y)  # b and y share a storage now: the write below changes y
    b.add_(1)
    return y, x.clone().set_(x * 3) + 1


def test_tensor_set_falls_back():
    """functorch's fallback for set_ aliases nothing: batched, the write
    through b was lost (y came back without it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # functorch: no batching rule for set_
        fallback(pm(_takes_the_storage_of), rows(N, 3), match=r"Tensor\.set_")


def test_a_collective_of_a_broadcast_value_falls_back_saying_so():
    pf = pm(lambda x, w: x + tp.psum(w, "i"), in_axes=(0, None))
    fallback(pf, rows(N, 3), torch.arange(3.0), match=r"collective \(all_reduce\) of a value that is the same in every")
    # Made inside the function: Dynamo wraps the error ("RuntimeError when making fake tensor call").
    constant = pm(lambda x: x * tp.pmean(torch.tensor(2.0), "i"))
    fallback(constant, rows(N, 3), match=r"capture failed \(RuntimeError: a collective \(all_reduce\) of a value")


def _item_or_sum(x, w, how):
    return x * x.max().item() if how == "item" else tp.psum(w, "i") + x


def test_a_failed_capture_is_remembered_per_call_signature():
    """A capture that failed for one tree, static value or in_axes does not
    send other calls of the function to the threads for good (without a
    warning: the reason had been given once)."""
    x, w = rows(N, 3), rows(N, 3, scale=0.25)
    with executor("threads"):
        expected = pm(_item_or_sum, static_broadcasted_argnums=2)(x, w, "item")
    item = pm(_item_or_sum, static_broadcasted_argnums=2)
    fallback(item, x, w, "item", match="capture failed")
    both(item, x, w, "sum")  # another static value
    broadcast_w = pm(_item_or_sum, in_axes=(0, None, None), static_broadcasted_argnums=2)
    fallback(broadcast_w, x, w[0], "sum", match="instead of the stacked one")
    both(pm(_item_or_sum, in_axes=(0, 0, None), static_broadcasted_argnums=2), x, w, "sum")  # other in_axes
    captures = list(_stacked._captures[_item_or_sum].values())
    counts = [list(c.count) for c in captures]
    with executor("stacked", allow_fallback=True), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the failed ones fall back still, warned once
        assert_same_bits(item(x, w, "item"), expected)
        assert torch.equal(broadcast_w(x, w[0], "sum").unshard(), x + w[0] * N)
    # Refused at once: no capture tried again.
    assert list(_stacked._captures[_item_or_sum].values()) == captures
    assert [list(c.count) for c in captures] == counts


def _written_then_broadcast_psum(x, b):
    x.add_(1)  # each replica updates its own row of the mapped input
    return tp.psum(b, "i")


def test_a_collective_of_a_broadcast_value_is_refused_before_anything_runs():
    """Once refused only when the batched graph ran it, after the write: the
    threads then wrote the input a second time."""
    pf = pm(_written_then_broadcast_psum, in_axes=(0, None))
    for name in ("threads", "stacked"):
        x = torch.zeros(N, 3)
        with executor(name, allow_fallback=True), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            total = pf(x, torch.ones(3))
        assert torch.equal(x, torch.ones(N, 3)), name
        assert torch.equal(total.unshard(), torch.full((N, 3), float(N))), name


def _written_then_indexed(x, i):
    x.add_(1)
    return x.index_select(0, i)


def test_an_error_after_the_batched_graph_wrote_its_inputs_is_raised_not_rerun():
    """An error while the batched graph runs, after it may have written its
    inputs in place, is the call's: rerun on the threads, the writes applied twice."""
    pf = pm(_written_then_indexed)
    with executor("stacked"):
        pf(torch.zeros(N, 3), torch.zeros(N, 1, dtype=torch.long))  # captured
        x = torch.zeros(N, 3)
        with pytest.raises((IndexError, RuntimeError), match="out of") as error:
            pf(x, torch.full((N, 1), 7))
    assert torch.equal(x, torch.ones(N, 3))
    if hasattr(error.value, "add_note"):  # Python 3.11+
        assert "not run again on the threads executor" in "".join(error.value.__notes__)


def test_a_view_outside_the_graph_of_one_of_two_inputs_sliced_from_one_tensor():
    z = rows(N, 4, 3)
    out = both(pm(lambda a, b: (b.mT, a * 2)), z[:, :2], z[:, 2:])
    assert torch.equal(out[0].unshard(), z[:, 2:].mT)


def test_a_view_outside_the_graph_of_memory_a_broadcast_input_shares_falls_back():
    """w.mT of a broadcast w that is x[0]: replica 0's row or the broadcast
    value, the storage cannot tell which."""
    x = rows(N, 2, 3)
    fallback(pm(lambda x, w: (w.mT, x + 1), in_axes=(0, None)), x, x[0], match="several inputs share")


def test_an_error_of_one_calls_values_falls_back_for_that_call_only():
    """An index out of range in the batched graph (which writes nothing): that
    call runs on the threads and raises as they do; the capture serves the next."""
    f = lambda x, i: x.index_select(0, i) * 2  # noqa: E731
    pf = pm(f)
    x = rows(N, 3)
    with executor("stacked", allow_fallback=True):
        pf(x, torch.zeros(N, 1, dtype=torch.long))
        with pytest.warns(RuntimeWarning, match="the batched graph raised"), pytest.raises(IndexError):
            pf(x, torch.full((N, 1), 7))
    with executor("stacked"):  # no fallback warning: stacked again
        got = pf(x, torch.ones(N, 1, dtype=torch.long))
    assert torch.equal(got.unshard(), x[:, 1:2] * 2)
    assert [c.failed for c in _stacked._captures[f].values()] == [None]


def _reads_an_unbound_local(x):
    if x.shape[0] > 100:
        y = x
    return y + 1  # unbound on purpose


def test_the_fallback_warning_names_the_cause_not_an_error_dynamo_handled():
    # Dynamo's Unsupported is raised while it handles a KeyError of its own: not the cause.
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="undefined local variable"):
        with pytest.raises(UnboundLocalError):
            pm(_reads_an_unbound_local)(rows(N, 3))


def test_functorchs_performance_warning_from_the_capture_does_not_reach_the_user():
    with executor("stacked"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = pm(lambda x: x.clone().clamp_(0, 1))(rows(N, 3))  # clamp_ has no batching rule
    assert not [w for w in caught if "performance drop" in str(w.message)]
    assert torch.equal(got.unshard(), rows(N, 3).clamp(0, 1))


def test_calls_with_no_mapped_argument_run_stacked():
    broadcast = pm(lambda w: w * 2 + tp.axis_index("i") + torch.rand(()), in_axes=None, axis_size=N)
    no_arguments = pm(lambda: torch.ones(2) * tp.axis_index("i"), axis_size=N)
    with executor("threads"):
        torch.manual_seed(0)
        expected = broadcast(torch.arange(3.0))
    with executor("stacked"):
        torch.manual_seed(0)
        assert_same_bits(expected, broadcast(torch.arange(3.0)))  # each replica's own draw too
    out = both(no_arguments)
    assert out.shape == (N, 2) and out.shards[1].tolist() == [1.0, 1.0]
    out.shards[0].add_(5)  # the rows are each replica's own, not views of one row
    assert out.shards[1].tolist() == [1.0, 1.0]


class _Box:
    pass


_STORED = None


def _store_global(x):
    global _STORED
    _STORED = x * 2
    return x + 1


def _stores(kind):
    """A function that stores each replica's tensor outside itself, and what it stored."""
    log, table, box = [], {}, _Box()
    if kind == "list":
        return lambda x: (log.append(x * 2), x + 1)[1], lambda: sorted(t.tolist() for t in log)
    if kind == "dict":
        return lambda x: (table.__setitem__("last", x.sum()), x + 1)[1], lambda: table["last"].shape
    if kind == "unused_input":
        return lambda x, y: (log.append(y), x + 1)[1], lambda: sorted(t.tolist() for t in log)
    if kind == "attribute":
        return lambda x: (setattr(box, "seen", x), x + 1)[1], lambda: box.seen.shape
    if kind == "global":
        return _store_global, lambda: _STORED.shape
    if kind == "dict_key":
        return lambda x: (table.__setitem__(x * 2, "seen"), x + 1)[1], lambda: sorted(k.tolist() for k in table)
    if kind == "set_member":
        members: set[torch.Tensor] = set()
        return lambda x: (members.add(x * 2), x + 1)[1], lambda: sorted(k.tolist() for k in members)
    if kind == "object_argument":  # an object the caller passes is not rebuilt per replica
        f = tp.pmap(lambda x, b: (setattr(b, "seen", x), x + 1)[1], "i", devices=devices(N), in_axes=(0, None))
        return lambda x: f(x, box), lambda: box.seen.shape
    cell = None

    def closure(x):
        nonlocal cell
        cell = x - 1
        return x + 1

    return closure, lambda: cell.shape


_KINDS = ["list", "unused_input", "dict", "attribute", "global", "closure", "dict_key", "set_member"]


@pytest.mark.parametrize("kind", [*_KINDS, "object_argument"])
def test_a_replica_tensor_stored_outside_the_function_falls_back(kind):
    """Captured, Dynamo would store replica 0's tensor alone: the threads store each replica's."""
    args = (rows(N, 3), rows(N, 2, offset=5.0)) if kind == "unused_input" else (rows(N, 3),)
    pmapped = (lambda f: f) if kind == "object_argument" else pm
    f, stored = _stores(kind)
    with executor("threads"):
        expected = pmapped(f)(*args)
        expected_stored = stored()
    f, stored = _stores(kind)
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="stores a tensor that differs"):
        got = pmapped(f)(*args)
    assert_same_bits(expected, got)
    assert stored() == expected_stored


def test_writes_to_the_functions_own_argument_containers_stay_stacked():
    # pmap rebuilds its arguments' containers for every replica and call: no caller sees them.
    Pair = collections.namedtuple("Pair", "state extra")

    def step(params, pair, log):
        g = tp.pmean(params["w"] * 2, "i")
        params["w"] = params["w"] - 0.1 * g
        pair.state["seen"] = g
        log.append(g)
        log[0] = params["w"]
        return params, pair, log

    params, pair, log = {"w": rows(N, 3)}, Pair({"s": rows(N, 2)}, [rows(N, 1)]), [rows(N, 2)]
    got = both(pm(step), params, pair, log)
    assert set(params) == {"w"} and set(pair.state) == {"s"} and len(log) == 1  # the caller's stay as they were
    assert set(got[0]) == {"w"} and set(got[1].state) == {"s", "seen"} and len(got[2]) == 2


def test_side_effects_without_replica_tensors_stay_stacked():
    counts, shared, table = [], torch.ones(3), {}

    def f(x):
        counts.append(1)  # once per call when captured, as documented
        table["shared"] = shared  # the same object in every replica
        out = []
        out.append(x * 2)  # a new list the function returns
        return out

    got = both(pm(f), rows(N, 3))
    assert isinstance(got, list) and table["shared"] is shared


def test_random_ops_draw_the_threads_numbers():
    # Each replica draws from its own stream, as on threads (more in test_stacked_random.py).
    pf = pm(lambda x: x + torch.rand_like(x))
    with executor("threads"):
        torch.manual_seed(1)
        expected = pf(rows(N, 3))
    with executor("stacked"):
        torch.manual_seed(1)
        got = pf(rows(N, 3))
    assert_same_bits(expected, got)


def test_autograd_through_the_call_runs_stacked():  # more in test_stacked_autograd.py
    x = rows(N, 3).requires_grad_()
    pf = pm(lambda x: tp.psum(x * x, "i"))
    with executor("stacked"):
        y = pf(x)
    y.unshard().sum().backward()
    assert torch.equal(x.grad, 2 * x.detach() * N)


def test_compile_with_dynamic_shapes_falls_back():
    fallback(pm(lambda x: x + 1, compile={"backend": "eager", "dynamic": True}), rows(N, 3), match="dynamic=True")


def test_per_replica_tensors_run_stacked_as_on_threads():
    # One tensor per replica, stacked once per call: reads, collectives, autograd.
    values = tp.PerReplica([torch.full((3,), float(i)) for i in range(N)], devices(N))
    pf = pm(lambda x, v: tp.psum(x * v, "i") + v.sin())
    with executor("threads"):
        expected = pf(rows(N, 3), values)
    with executor("stacked"):
        for _ in range(2):
            assert_same_bits(expected, pf(rows(N, 3), values))
    weights = [torch.full((3,), float(i), requires_grad=True) for i in range(N)]
    grads = {}
    for name in ("threads", "stacked"):
        for w in weights:
            w.grad = None
        with executor(name):
            pf(rows(N, 3), tp.PerReplica(weights, devices(N))).unshard().pow(2).sum().backward()
        grads[name] = [w.grad.clone() for w in weights]
    for e, g in zip(grads["threads"], grads["stacked"]):
        assert torch.equal(e, g)


def test_a_write_to_a_stacked_per_replica_tensor_is_not_lost():
    # The stack is a copy of the replicas' tensors: a write to it falls back, and the threads write them.
    from torchpmap import _stacked

    values = [torch.zeros(3) for _ in range(N)]
    fn = lambda x, v: v.add_(x)  # noqa: E731
    pf = pm(fn)
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="only be stacked by a copy"):
        pf(rows(N, 3), tp.PerReplica(values, devices(N)))
    assert all(torch.equal(values[r], rows(N, 3)[r]) for r in range(N))
    # That call's inputs only: the capture is not marked failed, and one buffer runs stacked.
    assert all(capture.failed is None for capture in _stacked._captures[fn].values())
    with executor("stacked"):
        buf = torch.zeros(N, 3)
        pf(rows(N, 3), buf)
        assert torch.equal(buf, rows(N, 3))


@pytest.mark.parametrize(
    "values",
    [[float(i) for i in range(N)], [torch.zeros(i + 1) for i in range(N)]],
    ids=["floats", "shapes"],
)
def test_other_per_replica_arguments_fall_back(values):
    fallback(
        pm(lambda x, v: x * (v.sum() if isinstance(v, torch.Tensor) else v)),
        rows(N, 3),
        tp.PerReplica(values, devices(N)),
        match="PerReplica argument of other values",
    )


def test_executor_setting():
    with pytest.raises(ValueError, match="set_executor"):
        tp.set_executor("gpu")


def test_writes_to_own_slices_reach_the_caller_as_on_threads():
    def f(r):
        r.mul_(2)
        return r + tp.psum(r, "i")

    pf = pm(f)
    expected_x, got_x = rows(N, 3), rows(N, 3)
    with executor("threads"):
        expected = pf(expected_x)
    with executor("stacked"):
        got = pf(got_x)
    assert_same_bits((expected, expected_x), (got, got_x))


def test_a_failed_capture_is_not_retried():
    calls = []

    def f(x):
        calls.append(1)
        return x * x.max().item()

    pf = pm(f)
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="capture failed"):
        pf(rows(N, 3))
    traced = len(calls) - N  # Dynamo's attempt, before the threads executor's N runs
    with executor("stacked", allow_fallback=True):
        pf(rows(N, 3))
    assert len(calls) == traced + 2 * N


def test_a_function_without_a_graph_falls_back():
    fallback(pm(lambda x, k: (x, k), in_axes=(0, None)), rows(N, 3), 3, match="no graph")


def test_a_disabled_dynamo_falls_back_where_a_capture_is_due_and_is_not_remembered():
    pf = pm(lambda x: x * 2)
    with torch._dynamo.config.patch(disable=True):
        fallback(pf, rows(N, 3), match="disabled Dynamo")
    both(pf, rows(N, 3))  # captures now


def test_a_call_under_a_torch_dispatch_mode_falls_back_for_that_call_only():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    pf = pm(lambda x: x * 2)
    with Passthrough():
        fallback(pf, rows(N, 3), match="a TorchDispatchMode is active")
    with executor("stacked"):  # outside the mode it runs stacked: nothing was remembered
        assert torch.equal(pf(rows(N, 3)).unshard(), rows(N, 3) * 2)


def test_a_dynamo_stance_falls_back():
    pf = pm(lambda x: x * 2)
    with torch.compiler.set_stance("force_eager"):
        fallback(pf, rows(N, 3), match="set_stance")


@pytest.mark.parametrize("name", ["stacked", "lockstep"])
def test_a_pmapped_function_and_its_captures_are_freed_with_it(name):
    import gc
    import weakref

    from torchpmap import _lockstep, _stacked

    captures = (_stacked if name == "stacked" else _lockstep)._captures
    scale = torch.ones(3)
    f = lambda x: x * scale  # noqa: E731
    with executor(name):
        pm(f)(rows(N, 3))
    assert f in captures
    freed = weakref.ref(f)
    del f
    gc.collect()
    assert freed() is None


def test_a_failed_capture_forgets_its_random_call_sites():
    from torchpmap import _stacked_random

    before = set(_stacked_random._sites)

    def f(x):
        return torch.rand(3, out=torch.empty(3)) + x  # routed, then refused while tracing

    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="out="):
        pm(f)(rows(N, 3))
    assert set(_stacked_random._sites) == before


def test_a_capture_that_fails_while_traced_prints_nothing_beside_its_warning(capfd):
    # GraphModule.__call__ printed the graph's traceback to stderr before the warning said why.
    def f(x):
        return x.data * 2 + x

    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="accessing `data`"):
        out = tp.pmap(f, devices=devices(4))(torch.ones(4, 3))
    torch.testing.assert_close(out.unshard(), torch.full((4, 3), 3.0))
    assert "Traceback" not in capfd.readouterr().err


@dataclasses.dataclass(frozen=True)
class Config:
    scale: object


@pytest.mark.parametrize("wrap", [lambda s: s, Config], ids=["value", "dataclass"])
def test_equal_static_values_of_other_types_do_not_share_a_capture(wrap):
    # 1 == 1.0 == True: keyed by value alone, the second call replayed the first's capture
    # (the fast path passed the first call's static value, not this call's: found by a hunt).
    x = torch.full((4, 2), 127, dtype=torch.int8)
    f = lambda x, s: x * getattr(s, "scale", s) + 100  # noqa: E731
    want = [tp.pmap(f, static_broadcasted_argnums=1, devices=devices(4))(x, wrap(s)) for s in (1, 1.0, True)]
    with executor("stacked"):
        p = tp.pmap(f, static_broadcasted_argnums=1, devices=devices(4))
        for _ in range(2):
            for s, w in zip((1, 1.0, True), want):
                assert_same_bits(p(x, wrap(s)), w)


@pytest.mark.parametrize("how", ["stacked", "lockstep"])
@pytest.mark.parametrize(
    "zeros",
    [(0.0, -0.0), ((1, 0.0), (1, -0.0)), (complex(0, 0.0), complex(0, -0.0)), (Config(0.0), Config(-0.0))],
    ids=["float", "tuple", "complex", "dataclass"],
)
def test_a_static_negative_zero_does_not_replay_the_positive_zeros_capture(how, zeros):
    # -0.0 == 0.0, and Dynamo guards constants with ==: the capture for one zero served the other.
    def sign(s):
        s = s[1] if isinstance(s, tuple) else s
        s = s.scale if isinstance(s, Config) else s
        return math.copysign(1.0, s.imag if isinstance(s, complex) else s)

    f = lambda x, s: x + sign(s)  # noqa: E731
    x = torch.zeros(4, 2)
    with executor(how):
        p = tp.pmap(f, static_broadcasted_argnums=1, devices=devices(4))
        for _ in range(2):
            for s in zeros:
                assert torch.equal(p(x, s).unshard(), torch.full((4, 2), sign(s))), s


@pytest.mark.parametrize("how", ["stacked", "lockstep", "auto"])
def test_a_broadcast_negative_zero_does_not_replay_the_positive_zeros_capture(how):
    # The same with Python numbers passed broadcast (in_axes=None), alone or in a pytree,
    # through the stacked fast path too: a hunt found +1 where the threads give -1.
    f = lambda x, s, t: x + math.copysign(1.0, s) + 10 * math.copysign(1.0, t["a"][1])  # noqa: E731
    x = torch.zeros(4, 2)
    with executor(how):
        p = tp.pmap(f, in_axes=(0, None, None), devices=devices(4))
        for s, a in [(0.0, 0.0)] * 3 + [(-0.0, 0.0), (-0.0, -0.0), (0.0, -0.0), (-0.0, -0.0), (0.0, 0.0)]:
            want = math.copysign(1.0, s) + 10 * math.copysign(1.0, a)
            assert torch.equal(p(x, s, {"a": (1, a)}).unshard(), torch.full((4, 2), want)), (s, a)


VALUE_READS = {
    "item": lambda x, s: x * 3 if s.item() > 0 else x * 2,
    "int": lambda x, s: x * 3 if int(s) > 0 else x * 2,
    "bool": lambda x, s: x * 3 if bool(s) else x * 2,
    "tolist": lambda x, s: x * 3 if s.tolist() > 0 else x * 2,
    "index": lambda x, s: x * [2, 3][s],
    "arithmetic": lambda x, s: x * (2 + s.item()),
}


@pytest.mark.parametrize("how", ["stacked", "lockstep", "auto"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
@pytest.mark.parametrize("read", VALUE_READS)
def test_a_branch_on_a_replicas_own_scalar_is_not_replica_zeros(how, dtype, read):
    # Under fullgraph Dynamo turns .item() of a 0-dim input into a number it guards on; the
    # capture checked replica 0's only, and every replica took replica 0's branch (found by a
    # hunt: an assert or raise in some replicas was skipped).
    if read == "index" and dtype.is_floating_point:
        pytest.skip("a float cannot index")
    f = VALUE_READS[read]
    x = torch.ones(4, 2)
    s = torch.tensor([0, 0, 1, 0], dtype=dtype)
    want = torch.stack([f(r, v) for r, v in zip(x, s)])
    with executor(how, allow_fallback=True):
        p = tp.pmap(f, devices=devices(4))
        for _ in range(3):
            assert torch.equal(p(x, s).unshard(), want)


GLOBAL_X = torch.arange(24.0).reshape(4, 3, 2)
GLOBAL_ROW = GLOBAL_X[0]  # replica 0's row of the argument below, reached as a global


def test_a_view_of_a_global_that_is_replica_zeros_row_stays_that_view():
    # Dynamo takes ref.mT outside the graph; by its memory it looked like a view of replica 0's
    # row, and every replica got the view of its own row (a silent difference, found by a hunt).
    f = lambda v: (GLOBAL_ROW.mT, v - GLOBAL_ROW)  # noqa: E731
    with executor("stacked", allow_fallback=True):
        p = tp.pmap(f, devices=devices(4))
        for _ in range(3):
            out, diff = p(GLOBAL_X)
            assert all(torch.equal(out.unshard()[r], GLOBAL_ROW.mT) for r in range(4))
            assert torch.equal(diff.unshard(), GLOBAL_X - GLOBAL_ROW)


def test_on_lockstep_it_raises_rather_than_guess():
    f = lambda v: (GLOBAL_ROW.mT, v * 1)  # noqa: E731
    with executor("lockstep"), pytest.raises(RuntimeError, match="reaches outside its arguments"):
        for _ in range(2):
            tp.pmap(f, devices=devices(4))(GLOBAL_X)


def _separate_shards(n, value=0.0):
    """A ShardedTensor whose shards are separate tensors (a threads result): stacking copies it."""
    shards = [torch.full((3,), value + r) for r in range(n)]
    return tp.ShardedTensor(shards, devices(n), axis=0), shards


def test_an_input_returned_unchanged_is_the_input_even_when_stacking_copied_it():
    # On the threads each replica returns its input itself: writes to the result reach the
    # input and back. The stacked executor had returned rows of the copy it stacked them into.
    x, shards = _separate_shards(3)
    ts = [torch.zeros(2) for _ in range(3)]
    with executor("stacked"):
        y, q, _ = tp.pmap(lambda a, p: (a, p, a.sum() + p.sum()), devices=devices(3))(x, tp.PerReplica(ts, devices(3)))
    assert all(s is t for s, t in zip(y.shards, shards)) and all(s is t for s, t in zip(q.shards, ts))
    y.add_(100)
    assert shards[2][0].item() == 102.0


def test_a_view_of_an_input_stacking_copied_falls_back_with_the_threads_numbers_and_donation():
    # The view cannot be rebuilt on the separate shards: the call runs again on the threads,
    # after the stacked run drew random numbers and before the donated input is released.
    f = lambda v: (v[1:], torch.nn.functional.dropout(v, 0.5))  # noqa: E731
    results = {}
    for how in ("threads", "stacked"):
        torch.manual_seed(0)
        with executor(how, allow_fallback=True) if how == "stacked" else executor(how):
            x, shards = _separate_shards(2, 1.0)
            view, dropped = tp.pmap(f, devices=devices(2), donate_argnums=0)(x)
        assert view.shards[1].data_ptr() == shards[1][1:].data_ptr()  # a view of the input, as on the threads
        results[how] = (dropped.unshard(), torch.rand(1))
    assert torch.equal(results["threads"][0], results["stacked"][0])
    assert torch.equal(results["threads"][1], results["stacked"][1])  # the caller's generator too


# -- one tensor reaching the function twice -------------------------------------------------------
_CLOSED = torch.zeros(1)  # rebound by the closure case


def _twice_calls(case):
    """Per case: the pmapped function and its calls, aliased twice, then with two tensors."""
    global _CLOSED
    t, a, b = torch.ones(4, 3), torch.ones(4, 3), torch.zeros(4, 3) + 5
    if case == "positional":
        f = tp.pmap(lambda x, y: x * 2 + y * 3)
        return f, [(t, t), (t, t), (a, b)]
    if case == "in_place":

        def g(x, y):
            x.add_(1)
            return x * 10 + y

        return tp.pmap(g), [(t, t), (t, t), (a, b)]
    if case == "tied_dict":
        f = tp.pmap(lambda p: p["enc"] * 2 + p["dec"] * 3)
        return f, [({"enc": t, "dec": t},), ({"enc": t, "dec": t},), ({"enc": a, "dec": b},)]
    if case == "mapped_and_broadcast":
        f = tp.pmap(lambda x, w: x * 2 + w.sum(0) * 3, in_axes=(0, None))
        return f, [(t, t), (t, t), (a, b)]
    assert case == "closure"
    _CLOSED = t
    f = tp.pmap(lambda x: x * 2 + _CLOSED.sum(0) * 3)
    return f, [(t,), (t,), (a,)]


@pytest.mark.parametrize("case", ["positional", "in_place", "tied_dict", "mapped_and_broadcast", "closure"])
def test_one_tensor_reaching_the_function_twice_is_two_inputs_of_the_capture(case):
    # make_fx bound the one buffer to one graph input: the capture read the first input for
    # both, then and in every later call with two tensors (found by a differential hunt).
    results = {}
    for name in ("threads", "stacked"):
        with executor(name, allow_fallback=True):
            f, calls = _twice_calls(case)
            outs = [f(*args) for args in calls]
            results[name] = [o.unshard() for o in outs] + [
                v.clone() for args in calls[-1:] for v in torch.utils._pytree.tree_leaves(args)
            ]
    for got, want in zip(results["stacked"], results["threads"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "how, compile",
    [("stacked", False), ("lockstep", False), ("stacked", {"backend": "eager"}), ("threads", {"backend": "eager"})],
    ids=["stacked", "lockstep", "stacked-compiled", "threads-compiled"],
)
def test_a_module_hook_added_after_the_capture_runs(how, compile):
    # Dynamo skips guarding module hooks by default: the capture ignored a hook added
    # after it (found by a hunt). torchpmap's captures guard them.
    lin = torch.nn.Linear(3, 3).requires_grad_(False)
    x = torch.ones(4, 3)
    with executor(how):
        p = tp.pmap(lambda x: lin(x), devices=devices(4), compile=compile)
        plain = p(x).unshard()
        p(x)
        handle = lin.register_forward_hook(lambda m, i, o: o * 10)
        try:
            torch.testing.assert_close(p(x).unshard(), plain * 10)
        finally:
            handle.remove()
        torch.testing.assert_close(p(x).unshard(), plain)


@pytest.mark.parametrize("compile", [False, {"backend": "eager"}], ids=["eager", "compiled"])
def test_global_module_hooks_run_eagerly_with_a_warning(compile):
    # Dynamo guards no global module hook: while one is registered, calls run eagerly.
    lin = torch.nn.Linear(3, 3).requires_grad_(False)
    x = torch.ones(4, 3)
    with executor("stacked" if not compile else "threads", allow_fallback=True):
        p = tp.pmap(lambda x: lin(x), devices=devices(4), compile=compile)
        plain = p(x).unshard()
        p(x)
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o + 1000)
        try:
            with pytest.warns(RuntimeWarning, match="global nn.Module hooks"):
                got = p(x).unshard()
        finally:
            handle.remove()
        torch.testing.assert_close(got, plain + 1000)


@dataclasses.dataclass(frozen=True)
class ConfigWithState:
    scale: float
    calls: list = dataclasses.field(default_factory=list, compare=False, hash=False)


@dataclasses.dataclass(eq=False)
class Node:
    scale: float
    parent: object = None


def test_static_dataclasses_are_keyed_by_what_their_equality_compares():
    # A field == leaves out (a growing list) keeps one plan; a cycle back to the object is fine.
    f = lambda x, c: x * c.scale  # noqa: E731
    x = torch.ones(4, 2)
    p = tp.pmap(f, static_broadcasted_argnums=1, devices=devices(4))
    config = ConfigWithState(2.0)
    for step in range(3):
        config.calls.append(step)
        assert torch.equal(p(x, config).unshard(), x * 2)
    assert len(p._in_plans) == 1
    node = Node(3.0)
    node.parent = node
    assert torch.equal(p(x, node).unshard(), x * 3)


@pytest.mark.parametrize(
    "rebind",
    [
        lambda x: setattr(x, "data", torch.full_like(x, 50.0)),
        lambda x: x.set_(torch.full_like(x, 60.0)),
        lambda x: x.requires_grad_(),
    ],
    ids=["data", "set_", "requires_grad_"],
)
def test_an_input_returned_is_a_view_of_the_callers_tensor_not_the_object(rebind, monkeypatch):
    # A mapped input returned unchanged was wrapped around the caller's tensor itself:
    # rebinding that tensor afterwards (.data =, set_) changed the earlier result. The
    # threads return views of the input's memory, which a rebinding leaves as they were.
    pf = pm(lambda x: (x, x * 2))
    seen = {}
    for general in (False, True):
        # 1: every call takes the general path; else the second and third take the fast one
        monkeypatch.setattr(tp._pmap, "_RECHECK_EVERY", 1 if general else 32)
        for name in ("stacked", "threads"):
            with executor(name):
                for call in range(3):
                    x = rows(N, 3)
                    returned, _ = pf(x)
                    rebind(x)
                    before = returned.unshard().detach()
                    x.data.add_(1)  # the memory x holds now (still the result's after requires_grad_)
                    seen[general, name, call] = (before, returned.unshard().detach(), returned.requires_grad)
    for (general, _name, call), (before, after, requires_grad) in seen.items():
        expected = seen[general, "threads", call]
        assert torch.equal(before, rows(N, 3))
        assert torch.equal(after, expected[1]) and requires_grad == expected[2]


def test_the_capture_scope_gives_everything_back_when_its_exit_is_interrupted(monkeypatch):
    # An interrupt while the saved-tensor hooks switch is restored must not leave the
    # Dynamo gate held, the collectives stacking or the frame bound (later calls would wait).
    import threading
    import types

    from torchpmap import _axis, _ops
    from torchpmap._compile import DYNAMO_GATE

    def interrupted(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(_stacked, "_restore_saved_tensor_hooks_switch", interrupted)
    capture, tls = types.SimpleNamespace(failed=None, count=[0], frame=None), threading.local()
    with pytest.raises(KeyboardInterrupt):
        with _stacked.capture_scope(capture, tls, "state", "stacked"):
            raise RuntimeError("the body failed")
    assert not DYNAMO_GATE.held() and not _ops._stacking.on and tls.state is None and _axis.current_frame() is None


def test_a_stacked_result_is_laid_out_stacked_whichever_is_read_first():
    # The wrapper builds its layout on first use: reading the shards first must not change it.
    pf = tp.pmap(lambda x: x * 2, devices=devices(4))
    with executor("stacked"):
        for read_shards_first in (False, True):
            out = pf(torch.ones(4, 3))
            if read_shards_first:
                assert len(out.shards) == 4
            assert out.shard_layout.storage.value == "stacked"
            assert out.stacked_buffers() is not None and out.shard_layout.storage.value == "stacked"


@pytest.mark.parametrize("name", ["stacked", "lockstep"])
@pytest.mark.parametrize(
    "fn",
    [lambda r: np.asarray(r.sum()), lambda r: r.sum().numpy(), lambda r: np.sum(np.asarray(r))],
    ids=["asarray", "numpy", "np.sum"],
)
def test_a_numpy_output_is_each_replicas_own(name, fn):
    # Dynamo makes a numpy output outside the graph, from replica 0's tensor: under
    # out_axes=None every replica "agreed" on replica 0's value (found running the suite
    # under TORCHPMAP_EXECUTOR=lockstep). Such a capture falls back to the threads.
    x = rows(4, 3)
    pf = tp.pmap(fn, out_axes=None, devices=devices(4))
    with executor(name, allow_fallback=True), pytest.warns(RuntimeWarning, match="returns a numpy value"):
        for _ in range(2):
            with pytest.raises(ValueError, match="replica 1 returned a different value"):
                pf(x)


VMAPS_INSIDE = {
    "elementwise": lambda x: torch.func.vmap(lambda v: v * 2 + v.sum())(x),
    "collective": lambda x: torch.func.vmap(lambda v: tp.psum(v, "i"))(x),
    "grad_inside": lambda x: torch.func.vmap(
        lambda v: torch.func.grad(lambda u: (u.sin() * tp.axis_index("i")).sum())(v)
    )(x),
    "nested": lambda x: torch.func.vmap(torch.func.vmap(lambda v: v.exp() * v.sum()))(x[:, None].expand(-1, 2, -1)),
}


@pytest.mark.parametrize("case", sorted(VMAPS_INSIDE))
def test_a_vmap_inside_the_function_stays_stacked(case):
    # It fell back for a functorch call Dynamo writes first (lazy_load_decompositions),
    # with that name as the reason (found by a hunt).
    fn = VMAPS_INSIDE[case]
    x = rows(4, 3, 2)
    with executor("threads"):
        want = tp.pmap(fn, "i", devices=devices(4))(x)
    pf = tp.pmap(fn, "i", devices=devices(4))
    with executor("stacked"):  # a fallback warning would fail the test
        for _ in range(2):
            assert_same_bits(pf(x), want)


@pytest.mark.parametrize("name", ["stacked", "lockstep"])
def test_the_order_of_keyword_arguments_is_part_of_the_capture(name):
    # Dynamo, forwarding **kwargs through the trampoline, does not guard their order: the
    # capture made for a=, b= served b=, a= (found by a hunt).
    def concat(**parts):
        return torch.cat(list(parts.values()))

    a, b = torch.zeros(4, 2), torch.ones(4, 2)
    pf = tp.pmap(concat, "i", devices=devices(4))
    with executor(name):
        for _ in range(2):
            assert torch.equal(pf(a=a, b=b).unshard(), torch.cat([a, b], 1))
        for _ in range(2):
            assert torch.equal(pf(b=b, a=a).unshard(), torch.cat([b, a], 1))


def test_two_pmaps_of_one_function_with_other_in_axes_both_stay_stacked():
    # A row and a broadcast tensor of one shape pass the same guards: the two pmaps shared a
    # capture, and the second fell back to the threads for good (found by a hunt).
    def f(x, y):
        return x * 2 + y

    mapped = tp.pmap(f, "i", devices=devices(4))
    broadcast = tp.pmap(f, "i", devices=devices(4), in_axes=(0, None))
    x, y = rows(4, 3), rows(4, 3, offset=1.0)
    with executor("stacked"):  # a fallback warning would fail the test
        for _ in range(2):
            assert torch.equal(broadcast(x, y[0]).unshard(), x * 2 + y[0])
            assert torch.equal(mapped(x, y).unshard(), x * 2 + y)


def test_a_function_without_var_keywords_has_one_capture_for_every_keyword_order():
    def f(a, b, c):
        return a * 2 + b - c

    x = rows(4, 3)
    pf = tp.pmap(f, "i", devices=devices(4))
    with executor("stacked"):
        for order in ("abc", "cba", "bac"):
            assert torch.equal(pf(**{k: x for k in order}).unshard(), x * 2)
    assert len(_stacked._captures[f]) == 1


@dataclasses.dataclass(frozen=True)
class _Scale:
    factor: float

    def __call__(self, x):
        return x * self.factor + tp.psum(x, "i")


@pytest.mark.parametrize("name", ["stacked", "lockstep", "auto"])
def test_callables_that_compare_equal_keep_captures_of_their_own(name):
    # _Scale(2) == _Scale(2.0): the captures, cached per function by ==, were shared, and
    # one returned the other's dtype (int64 for the float scale) (found by a hunt).
    x = torch.arange(8).view(4, 2)
    as_int, as_float = (tp.pmap(_Scale(f), "i", devices=devices(4)) for f in (2, 2.0))
    with executor(name):
        for _ in range(3):
            assert as_int(x).dtype == torch.int64
            assert as_float(x).dtype == torch.float32


@pytest.mark.parametrize("executor_name", ["stacked", "lockstep"])
def test_a_float_argument_that_keeps_changing_is_named_once(executor_name):
    # A capture bakes a Python float in (static), so a learning rate passed as a float
    # captured the function again on every step, silently, up to the recapture limit.
    f = tp.pmap(lambda p, lr: p - lr * 2, in_axes=(0, None), devices=tp.devices()[:2])
    p = torch.zeros(2, 3)
    with executor(executor_name), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for step in range(8):
            p = f(p, 0.5**step)
    named = [w for w in caught if "a Python float argument took a new value" in str(w.message)]
    assert len(named) == 1 and "torch.tensor(value)" in str(named[0].message)
    assert torch.equal(p.unshard(), torch.full((2, 3), -2 * sum(0.5**k for k in range(8))))
    g = tp.pmap(lambda p, lr: p - lr * 2, in_axes=(0, None), devices=tp.devices()[:2])
    with executor(executor_name), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for step in range(8):
            p = g(p, torch.tensor(0.5**step))  # one capture serves every value
            p = g(p, 0.25)  # the same float every call: captured once
    assert not [w for w in caught if "Python float" in str(w.message)]


def test_a_capture_of_a_failing_op_logs_no_traceback():
    # Capturing `v @ w` with mismatched shapes logged a 20-line traceback from the fake-tensor
    # module before the eager run raised the error itself (found by a hunt).
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    logger.addHandler(handler)
    try:
        f = tp.pmap(lambda v: v @ torch.ones(4, 4), devices=devices(2))
        with executor("stacked"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's
            for _ in range(2):
                with pytest.raises(RuntimeError, match="cannot be multiplied"):
                    f(torch.ones(2, 3))
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "failed while attempting to run meta" in r.getMessage()]


def _sine(x):
    return x.sin() * 2 + 1


def test_a_pmap_without_axis_name_made_anew_each_step_shares_one_capture():
    # The unnamed axis was named after the pmap object, and a capture is keyed by its axis: a
    # pmap(f) made each step added a capture of f (and its graphs) that lived as long as f did
    # (found by a hunt).
    with executor("stacked"):
        for _ in range(5):
            pf = tp.pmap(_sine, devices=devices(4))
            x = torch.randn(4, 3)
            torch.testing.assert_close(pf(x).unshard(), x.sin() * 2 + 1)
    assert len(_stacked._captures[_sine]) == 1
