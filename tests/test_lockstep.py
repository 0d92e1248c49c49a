"""The lockstep executor: the same bits as the threads executor (one thread runs
every replica's segments between collectives, the collectives on the list of
replica tensors), captured soundly, and a warned fallback outside its scope."""

import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_bits, devices, executor, expect_error, notes, rows

import torchpmap as tp
from torchpmap import _config, _lockstep, _stacked

N = 4


def both(pf, *args, **kwargs):
    with executor("threads"):
        expected = pf(*args, **kwargs)
    with executor("lockstep"):
        got = pf(*args, **kwargs)
    assert_same_bits(expected, got)
    return got


def pm(f, **kwargs):
    return tp.pmap(f, "i", devices=devices(N), **kwargs)


def ran_in_lockstep(pf, *args):
    """Whether the call ran in lockstep (no fallback warning), and its result."""
    with executor("lockstep", allow_fallback=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        out = pf(*args)
    return not [w for w in caught if "lockstep" in str(w.message)], out


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
    "collectives_in_sequence": lambda x: (
        tp.pmax(tp.psum(x.sin(), "i") * x + tp.axis_index("i"), "i").cos() - tp.all_gather(x * 3, "i").sum(0)
    ),
    "transposed_input": lambda x: x.mT,
    "transposed_input_in_a_tree": lambda x: {"t": x.T, "twice": x.mT.mT, "sum": x.sum()},
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_same_bits_as_threads(name):
    both(pm(FUNCTIONS[name]), rows(N, 4, 3))


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
    with executor("lockstep"):
        got = f(f(x))
    assert_same_bits(expected, got)


def test_static_argument_recaptures():
    f = pm(lambda x, k: x * k, static_broadcasted_argnums=1)
    x = rows(N, 3)
    for k in (2, 3, 2):
        both(f, x, k)


def test_inputs_returned_unchanged_are_each_replicas_own():
    both(pm(lambda x, w: (x, w, tp.psum(x, "i")), in_axes=(0, None), out_axes=(0, None, 0)), rows(N, 3), rows(3))


def test_collective_inside_grad():
    def loss(w, x):
        return tp.psum((x @ w).square().sum(), "i")

    def f(w, x):
        return torch.func.grad(loss)(w, x)

    both(pm(f, in_axes=(None, 0)), rows(3, 2), rows(N, 5, 3))


def test_functional_mlp_step_with_grad_inside_same_bits():
    torch.manual_seed(0)
    params = {"w1": torch.randn(8, 16) * 0.3, "w2": torch.randn(16, 1) * 0.3}

    def loss(p, x, y):
        h = torch.tanh(x @ p["w1"])
        return ((h @ p["w2"] - y) ** 2).mean()

    def step(p, x, y):
        grads, value = torch.func.grad_and_value(loss)(p, x, y)
        grads = tp.pmean(grads, "i")
        return {k: p[k] - 0.1 * grads[k] for k in p}, tp.pmean(value, "i")

    f = pm(step, in_axes=(None, 0, 0), out_axes=(None, None))
    x, y = torch.randn(N, 5, 8), torch.randn(N, 5, 1)
    results = {}
    for name in ("threads", "lockstep"):
        p = dict(params)
        with executor(name):
            losses = []
            for _ in range(3):
                p, value = f(p, x, y)
                losses.append(value)
        results[name] = (p, losses)
    assert_same_bits(results["threads"], results["lockstep"])


def test_writes_to_own_slices_reach_the_caller_as_on_threads():
    def f(r):
        r.mul_(2)
        return r + tp.psum(r, "i")

    pf = pm(f)
    expected_x, got_x = rows(N, 3), rows(N, 3)
    with executor("threads"):
        expected = pf(expected_x)
    with executor("lockstep"):
        got = pf(got_x)
    assert_same_bits((expected, expected_x), (got, got_x))


def test_one_capture_serves_later_calls():
    pf = pm(lambda x: tp.psum(x, "i") * 2)
    both(pf, rows(N, 3))
    (capture,) = _lockstep._captures[pf._fun].values()
    for _ in range(3):
        both(pf, rows(N, 3, offset=1.0))
    assert capture.count[0] == 1


# -- sound capture ---------------------------------------------------------------------
SCALE = torch.tensor(2.0)


def test_closed_over_tensor_changed_in_place_or_reassigned():
    global SCALE
    f = pm(lambda x: x * SCALE)
    x = rows(N, 3)
    both(f, x)
    SCALE.add_(1)
    assert torch.equal(both(f, x).unshard(), x * 3)
    SCALE = torch.tensor(5.0)
    assert torch.equal(both(f, x).unshard(), x * 5)


def test_shape_change_recaptures():
    f = pm(lambda x: tp.psum(x, "i"))
    both(f, rows(N, 3))
    both(f, rows(N, 5, 2))


# -- fallbacks -------------------------------------------------------------------------
def fallback(pf, *args, match):
    """Runs pf in lockstep, expecting one fallback warning matching ``match``; the
    result must still be the threads executor's."""
    with executor("threads"):
        expected = pf(*args)
    with executor("lockstep", allow_fallback=True), pytest.warns(RuntimeWarning, match=match):
        got = pf(*args)
    assert_same_bits(expected, got)
    with executor("lockstep", allow_fallback=True), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per function and reason
        assert_same_bits(expected, pf(*args))


def test_branch_on_a_tensor_value_falls_back():
    fallback(pm(lambda x: x * 2 if x.sum() > 0 else x - 1), rows(N, 3), match="lockstep.*capture failed")


def test_item_and_data_dependent_shapes_run_per_replica():
    # Unlike stacked replicas, each replica's segment runs on its own values.
    both(pm(lambda x: x * x.argmax().item()), rows(N, 3))
    both(pm(lambda x: tp.psum(x[x > 0].sum(), "i")), rows(N, 3))
    both(pm(lambda x: x * tp.axis_index("i").item()), rows(N, 3))
    both(pm(lambda x: x * ((x.argmax().item() * 3 + 7) // 2 - 7)), rows(N, 3))  # integer arithmetic is exact


def test_replicas_compute_with_the_threads_executors_intra_op_threads():
    # The threads executor splits the caller's intra-op threads among the replicas; lockstep ran
    # each replica with all of them, and conv2d's backward rounds otherwise on 2 threads than on
    # 1: gradients differed from the threads' in the last place (training hunt).
    def f(x, w):
        return torch.func.grad(lambda w: (F.conv2d(x, w).relu() * x[:, :2, 1:-1, 1:-1]).sum())(w)

    x = torch.randn(N, 3, 2, 6, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    w = torch.randn(N, 2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        both(pm(f), x, w)
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(before)


def test_item_and_data_dependent_shapes_compile_around_their_segments():
    # With compile=, a segment holding a symbolic value (the integer .item() reads, a shape it
    # decides) runs as traced and the others compile: compiling it failed the whole capture with
    # "u0 possible memo disaster", and the call ran on the threads (Inductor hunt).
    options = dict(compile=dict(backend="aot_eager"))
    for f in (
        lambda y, x: x * y.sum().item() + tp.psum(x, "i"),
        lambda y, x: tp.psum(x[x > 0].sum(), "i") * x + y.argmax().item(),
    ):
        y, x = torch.tensor([[1, 5, 2], [3, 0, 7], [2, 2, 2], [9, 1, 0]]), rows(N, 3)
        lockstep, got = ran_in_lockstep(pm(f, **options), y, x)
        assert lockstep
        with executor("threads"):
            assert_same_bits(pm(f)(y, x), got)


MAGIC = 6755399441055744.0  # 1.5 * 2**52: (s + MAGIC) - MAGIC rounds s to an integer


@pytest.mark.parametrize(
    "f",
    [
        lambda x: x + ((x[0].item() + MAGIC) - MAGIC),
        lambda x: x + (x.max().item() - x.max().item()),  # nan for an inf
        lambda x: torch.atan2(torch.tensor(x.sum().item() * 0.0, dtype=x.dtype), x),  # -0.0 for a negative sum
        lambda x: x * x.max().item(),
        lambda x: x + x.argmax().item() / 49 * 49,
    ],
    ids=["rounding", "inf_minus_itself", "signed_zero", "plain", "int_divided"],
)
def test_a_python_float_read_from_a_tensor_falls_back(f):
    # Dynamo traces such a float as a symbol and simplifies the arithmetic on it as algebra:
    # (s + c) - c gave s, s - s and s * 0.0 gave 0 (for inf too), silently (found by a hunt).
    x = torch.tensor([[0.3, -1.0, 2.0], [float("inf"), 1.0, 0.0]] * (N // 2), dtype=torch.float64)
    x[2, 0] = -5.0
    fallback(pm(f), x, match="Python float read from a tensor")
    with executor("lockstep", allow_fallback=True):
        got = pm(f)(x).unshard()
    want = torch.stack([f(row) for row in x])
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.signbit(), want.signbit())


def test_a_data_dependent_size_the_capture_assumed_otherwise_falls_back_for_that_call():
    # Dynamo assumes an unbacked size broadcasts without being 1; a replica whose x[x > 0] has
    # one element broke that assertion at run time, where eager (the threads) broadcasts it.
    def f(x):
        return (x[x > 0] + torch.arange(3.0)).sum()

    x = rows(N, 4)
    x[1] = torch.tensor([-1.0, -1.0, 7.0, -1.0])  # one positive element in replica 1
    x[0] = torch.tensor([1.0, 2.0, 3.0, -1.0])
    x[2:] = x[0]
    fallback(pm(f), x, match="assumption about a data-dependent size")
    ok = x.clone()
    ok[1] = x[0]
    both(pm(f), ok)  # values that keep the assumption run in lockstep


@pytest.mark.parametrize("write", ["method", "out_keyword"])
def test_a_broken_size_assumption_after_an_input_write_names_itself(write):
    # Not run again on the threads: the write would apply twice. A write by out= (passed by
    # name in the traced graph) was not seen as one, and the call ran twice (review).
    def f(x):
        if write == "method":
            x.mul_(2)
        else:
            torch.mul(x, 2, out=x)
        return (x[x > 0] + torch.arange(3.0)).sum()

    x = torch.tensor([[1.0, 2.0, 3.0, -1.0], [-1.0, -1.0, 7.0, -1.0]] * (N // 2))
    with executor("lockstep"), pytest.raises(RuntimeError, match="Runtime assertion failed") as e:
        pm(f)(x)
    assert "set_executor('threads')" in "".join(getattr(e.value, "__notes__", [])) + str(e.value)
    assert torch.equal(x[0], torch.tensor([2.0, 4.0, 6.0, -2.0]))  # written once


def test_a_failed_make_fx_names_its_error():
    def f(x, idx):
        return tp.psum(x, "i")[idx]  # a tensor index: a data-dependent select make_fx cannot trace

    # (Dynamo guards the index's value, which refuse_value_guards finds first.)
    fallback(
        pm(f), rows(N, 3), torch.tensor([0, 1, 2, 2]), match="capture failed .*DataDependent|branch on a tensor's value"
    )


def test_a_python_number_from_item_returned_falls_back():
    # Each replica's own number, which Dynamo would make replica 0's for every replica.
    fallback(pm(lambda x: (x * 2, x.sum().item())), rows(N, 3), match="Python (number|float)|capture failed")
    fallback(pm(lambda x: (x * 2, x[x > 0].shape[0])), rows(N, 3), match="Python number|capture failed")


def test_replicas_bringing_different_shapes_to_a_collective_fail_as_on_threads():
    pf = pm(lambda x: tp.all_gather(x[x > 0], "i"))
    for name in ("threads", "lockstep"):
        with executor(name), pytest.raises(tp.errors.CollectiveMismatchError, match="different"):
            pf(rows(N, 3))


@pytest.mark.parametrize("stored", ["computed", "argument"])
def test_a_replica_tensor_stored_outside_the_function_falls_back(stored):
    # "argument": the mapped input itself, which lockstep once stored for replica 0 alone.
    logs = {"threads": [], "lockstep": []}
    for name in logs:
        log = logs[name]
        with executor(name, allow_fallback=True), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f = pm(lambda x, log=log: (log.append(x * 2 if stored == "computed" else x), x + 1)[1])
            f(rows(N, 3))
        if name == "lockstep":
            assert any("stores a tensor that differs" in str(w.message) for w in caught)
    assert sorted(t.tolist() for t in logs["lockstep"]) == sorted(t.tolist() for t in logs["threads"])


def test_random_op_falls_back():
    pf = pm(lambda x: x + torch.rand_like(x))
    reason = "a random op the lockstep executor does not give each replica's stream"
    with executor("lockstep", allow_fallback=True), pytest.warns(RuntimeWarning, match=reason):
        torch.manual_seed(1)
        got = pf(rows(N, 3))
    with executor("threads"):
        torch.manual_seed(1)
        expected = pf(rows(N, 3))
    assert_same_bits(expected, got)


def test_tensor_set_falls_back():
    def f(x):
        b = torch.zeros_like(x)
        y = tp.psum(x, "i") * 2
        b.set_(y)
        b.add_(1)
        return y

    pf = pm(f)
    with executor("lockstep", allow_fallback=True), pytest.warns(RuntimeWarning, match=r"Tensor\.set_"):
        got = pf(rows(N, 3))
    with executor("threads"):
        expected = pf(rows(N, 3))
    assert_same_bits(expected, got)
    assert torch.equal(expected.unshard(), rows(N, 3).sum(0).expand(N, 3) * 2 + 1)


def test_a_failed_capture_is_remembered_per_call_signature():
    def f(x, how):
        return x + torch.rand_like(x) if how == "random" else tp.psum(x, "i")

    pf = pm(f, static_broadcasted_argnums=1)
    assert not ran_in_lockstep(pf, rows(N, 3), "random")[0]
    lockstep, got = ran_in_lockstep(pf, rows(N, 3), "sum")  # another static value captures
    assert lockstep and torch.equal(got.unshard(), rows(N, 3).sum(0).expand(N, 3))
    captures = list(_lockstep._captures[f].values())
    assert len(captures) == 1 and captures[0].failed is None  # the "sum" capture replaced the "random" one
    ran_in_lockstep(pf, rows(N, 3), "random")
    assert list(_lockstep._captures[f].values()) == captures and captures[0].count == [1]  # refused at once


def test_autograd_through_the_call_falls_back():
    x = rows(N, 3).requires_grad_()
    pf = pm(lambda x: tp.psum(x * x, "i"))
    with executor("lockstep", allow_fallback=True), pytest.warns(RuntimeWarning, match="autograd"):
        y = pf(x)
    y.unshard().sum().backward()
    assert torch.equal(x.grad, 2 * x.detach() * N)


def test_compile_compiles_each_segment_once_for_every_replica():
    """compile= over the segments between collectives: one compile per segment and
    physical device (virtual CPU devices: one), none per replica or per call."""
    shapes = []

    def backend(gm, examples):
        shapes.append([tuple(e.shape) for e in examples])
        return gm.forward

    pf = pm(lambda x, w: tp.psum(x @ w, "i").relu() * 2, in_axes=(0, None), compile={"backend": backend})
    x, w = rows(N, 3), torch.randn(3, 5)
    with executor("threads"):
        expected = pm(lambda x, w: tp.psum(x @ w, "i").relu() * 2, in_axes=(0, None))(x, w)
    with executor("lockstep"):
        got = [pf(x, w) for _ in range(3)]
    assert shapes == [[(3,), (3, 5)], [(5,)]]  # before the psum and after it, compiled once each
    for g in got:
        assert_same_bits(expected, g)


def _write_a_slice_of_a_copy(x):
    t = x * 1
    t[0].copy_(x[1] + tp.axis_index("i"))  # the view t[0] is made before the cut, written after
    return t * 1


def _write_a_slice_of_the_input(x):
    x[0].copy_(tp.psum(x[1], "i"))
    return x * 1


def _write_the_input_read_a_split_view(x):
    v = x.split(1, -1)[0]  # a view by way of a list of views, made before the cut
    s = tp.psum(x, "i")
    x[:, :1].mul_(2)
    return v + s


@pytest.mark.parametrize(
    "f", [_write_a_slice_of_a_copy, _write_a_slice_of_the_input, _write_the_input_read_a_split_view]
)
def test_compiled_segments_see_a_write_into_a_view_made_before_a_collective(f):
    """A compiled segment took the view and the tensor it reads as unrelated inputs:
    the write into the view was lost from the result, silently."""
    results = {}
    for name in ("threads", "lockstep"):
        x = rows(N, 2, 3)
        pf = pm(f, compile={"backend": "aot_eager"})
        with executor(name):
            results[name] = [(pf(x).unshard(), x.clone()) for _ in range(2)]
    assert_same_bits(results["threads"], results["lockstep"])


def test_compile_with_dynamic_shapes_falls_back():
    fallback(pm(lambda x: x + 1, compile={"backend": "eager", "dynamic": True}), rows(N, 3), match="dynamic=True")


@pytest.mark.slow
def test_compile_with_inductor_matches_eager_threads():
    def step(w, x):
        loss, g = torch.func.grad_and_value(lambda w: (torch.tanh(x @ w) ** 2).mean())(w)
        return w - 0.1 * tp.pmean(g, "i"), tp.pmean(loss, "i")

    w, x = torch.randn(6, 4), torch.randn(N, 8, 6)
    with executor("threads"):
        expected = pm(step, in_axes=(None, 0))(w, x)
    with executor("lockstep"):
        got = pm(step, in_axes=(None, 0), compile=True)(w, x)
    assert_same_bits(expected, got, close=True)  # Inductor's fused kernels round differently


def test_per_replica_argument_falls_back():
    values = tp.PerReplica([torch.tensor(float(i)) for i in range(N)], devices(N))
    fallback(pm(lambda x, v: x * v), rows(N, 3), values, match="PerReplica")


def test_a_function_without_a_graph_falls_back():
    fallback(pm(lambda x, k: (x, k), in_axes=(0, None)), rows(N, 3), 3, match="no graph")


def test_a_collective_over_another_axis_falls_back_and_raises_as_on_threads():
    pf = pm(lambda x: tp.psum(x, "j"))
    with executor("lockstep", allow_fallback=True), pytest.warns(RuntimeWarning, match="capture failed|axis name"):
        with pytest.raises(NameError, match="unbound axis name"):
            pf(rows(N, 3))


def test_executor_setting():
    tp.set_executor("lockstep")
    assert _config.executor_name() == "lockstep"
    with pytest.raises(ValueError, match="lockstep"):
        tp.set_executor("gpu")


# -- failures ----------------------------------------------------------------------------
def test_an_error_in_a_replica_fails_the_call_promptly():
    def f(x, idx):
        y = tp.psum(x, "i")
        return y.index_select(0, idx.reshape(1))  # replica 0's index is in range, replica 2's is not

    pf = pm(f)
    idx = torch.tensor([0, 1, 7, 2])
    with executor("lockstep"):
        start = time.monotonic()
        with pytest.raises(IndexError):
            pf(rows(N, 3), idx)
        assert time.monotonic() - start < 30
        # The capture survives a replica's failure: the next call runs in lockstep.
        ok, out = ran_in_lockstep(pf, rows(N, 3), torch.tensor([0, 1, 2, 2]))
    assert ok
    with executor("threads"):
        assert_same_bits(pf(rows(N, 3), torch.tensor([0, 1, 2, 2])), out)


def test_donated_inputs_are_deleted_even_when_a_replica_fails():
    def f(x, idx):
        return x.index_select(0, idx.reshape(1)) + tp.psum(x, "i")

    pf = pm(f, donate_argnums=0)
    x = tp.device_put_sharded(list(rows(N, 3)), devices(N))
    with executor("lockstep"):
        pf(x, torch.tensor([0, 1, 2, 0]))  # captured, x donated
        with pytest.raises(RuntimeError, match="deleted|donated"):
            x.unshard()
        y = tp.device_put_sharded(list(rows(N, 3)), devices(N))
        with pytest.raises(IndexError):
            pf(y, torch.tensor([0, 1, 9, 0]))
        with pytest.raises(RuntimeError, match="deleted|donated"):
            y.unshard()


def test_a_segment_for_another_device_makes_its_tensors_there():
    """What several GPUs need, checked with the meta device as replica 1's: the
    device constants traced on replica 0's device move to the replica's."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        return (x + torch.ones(3, device=x.device) + torch.tensor([1.0, 2.0, 3.0], device=x.device),)  # as Dynamo

    gm = make_fx(f)(torch.zeros(3))
    plan = _lockstep._PlanBuilder(gm, "i", [torch.device("cpu"), torch.device("meta")]).build()
    (step,) = plan.steps
    on_cpu, on_meta = step.programs
    assert torch.equal(on_cpu(torch.zeros(3))[0], torch.tensor([2.0, 3.0, 4.0]))
    assert on_meta(torch.zeros(3, device="meta"))[0].device.type == "meta"


@pytest.mark.parametrize(("split", "concat"), [(1, -1), (0, 2), (2, 0)])
def test_a_tiled_all_to_all_of_a_strided_block_view_runs_as_on_the_threads(split, concat):
    # all_to_all's fake result kept the strides of the permuted blocks it got, while the kernel
    # stacks them contiguously: a view the graph took of it failed at run time (found by a fuzzer).
    x = torch.arange(16.0).view(2, 2, 2, 2)
    f = lambda v: tp.all_to_all(v, "i", split, concat, tiled=True) * 1  # noqa: E731
    with executor("threads"):
        want = tp.pmap(f, "i", devices=devices(2))(x)
    with executor("lockstep"):
        got = tp.pmap(f, "i", devices=devices(2))(x)
    assert torch.equal(got.unshard(), want.unshard())


def test_a_static_argument_new_every_call_stops_capturing_at_the_limit(monkeypatch):
    """Past its capture limit a function once got a new capture (its count started again),
    so a scheduled learning rate passed static captured on every call, for ever."""
    from torch._dynamo.utils import counters

    # A lower limit than Dynamo's (63 lockstep captures took ~30 s): the same logic, sooner.
    monkeypatch.setattr(_stacked, "_MAX_CAPTURES", 6)
    pf = pm(lambda w, lr: w - lr * tp.pmean(w, "i"), static_broadcasted_argnums=(1,))
    w = rows(N, 3)
    before = counters["stats"]["unique_graphs"]
    with executor("lockstep", allow_fallback=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for i in range(_stacked._MAX_CAPTURES + 10):
            pf(w, 0.001 * (i + 1))
    assert counters["stats"]["unique_graphs"] - before == _stacked._MAX_CAPTURES
    assert any(f"captured {_stacked._MAX_CAPTURES} times" in str(c.message) for c in caught)


def test_batch_norm_updating_broadcast_statistics_raises_as_on_the_threads():
    # aten's native_batch_norm updates running statistics without a version count: each
    # replica updated the shared ones in turn, silently (found running the suite under
    # TORCHPMAP_EXECUTOR=lockstep). Their own statistics per replica are fine.
    def f(a, mean, var):
        return torch.nn.functional.batch_norm(a, mean, var, training=True)

    x = torch.randn(2, 4, 3)
    with executor("lockstep"):
        mean, var = torch.zeros(3), torch.ones(3)
        with pytest.raises(RuntimeError, match=r"args\[1\] in place.*shared by every replica"):
            tp.pmap(f, in_axes=(0, None, None), devices=devices(2))(x, mean, var)
        means, variances = torch.zeros(2, 3), torch.ones(2, 3)
        tp.pmap(f, devices=devices(2))(x, means, variances)
    for r in range(2):
        want_mean, want_var = torch.zeros(3), torch.ones(3)
        f(x[r], want_mean, want_var)
        torch.testing.assert_close(means[r], want_mean)
        torch.testing.assert_close(variances[r], want_var)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: tp.psum(x.T, "i").flatten(),
        lambda x: tp.pmax(x.mT, "i").reshape(2, -1),
        lambda x: tp.ppermute(x.T, "i", [(0, 1), (1, 0)]).contiguous().view(-1),
    ],
    ids=["psum_flatten", "pmax_reshape", "ppermute_view"],
)
def test_a_collective_of_a_transposed_tensor_has_its_traced_layout(fn):
    # The exchange kept the input's strides where the trace saw the fake kernel's contiguous
    # tensor (and made the reshape a view): "view size is not compatible" (found by a hunt).
    x = rows(4, 3, 4)
    with executor("threads"):
        want = tp.pmap(fn, "i", devices=devices(4))(x)
    with executor("lockstep"):
        assert_same_bits(tp.pmap(fn, "i", devices=devices(4))(x), want)


def test_a_global_that_is_replica_0s_shard_requiring_grad_stays_one_value():
    # Replica 0's value was given to Dynamo as the tensor itself when it required grad,
    # so a closed-over S.shards[0] became each replica's shard (found by a hunt).
    shards = [torch.full((3,), float(r)).requires_grad_() for r in range(4)]
    s = tp.device_put_sharded(shards, devices(4))
    first = tp.unreplicate(s)  # s.shards[0] itself

    def distance_to_the_first(v):
        return v - first

    with torch.no_grad(), executor("lockstep"):
        got = tp.pmap(distance_to_the_first, "i", devices=devices(4))(s)
    assert torch.equal(got.unshard()[:, 0], torch.arange(4.0))


def test_an_error_in_one_replica_names_it_as_on_the_threads():
    def f(i):
        return torch.arange(5)[i] * 2

    index = torch.tensor([[0], [1], [9], [2]])  # out of range in replica 2 only
    for name in ("threads", "lockstep"):
        with executor(name):
            err, seconds = expect_error(tp.pmap(f, "i", devices=devices(4)), index, kind=IndexError)
        assert "(raised in pmap replica 2 on device" in notes(err), name
        assert seconds < 5
