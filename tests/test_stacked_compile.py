"""compile= under the stacked executor: one compiled program over the batched
graph computes every replica, with the eager threads executor's results."""

import warnings

import pytest
import torch
from helpers import assert_same_bits, devices, executor, rows

import torchpmap as tp

N = 4
AOT = {"backend": "aot_eager"}  # traces like inductor (aot_autograd, functionalization), runs the ATen ops


def assert_same(a, b, close=False):
    # close: Inductor's fused kernels round differently from eager ATen.
    assert_same_bits(a, b, close=close, rtol=1e-5, atol=1e-6)


def pm(f, **kwargs):
    return tp.pmap(f, "i", devices=devices(N), **kwargs)


def eager_threads_vs_compiled_stacked(f, *args, compile=AOT, close=False, **pmap_kwargs):
    with executor("threads"):
        expected = pm(f, **pmap_kwargs)(*args)
    with executor("stacked"):
        got = pm(f, compile=compile, **pmap_kwargs)(*args)
    assert_same(expected, got, close=close)
    return got


class CountingBackend:
    """A torch.compile backend that records the graphs it compiles and counts runs."""

    def __init__(self):
        self.shapes = []  # per compile, the shapes of its example inputs
        self.runs = 0

    def __call__(self, gm, example_inputs):
        self.shapes.append([tuple(e.shape) for e in example_inputs if isinstance(e, torch.Tensor)])

        def run(*args):
            self.runs += 1
            return gm(*args)

        return run


def every_collective(x):
    return (
        tp.psum(x, "i"),
        tp.pmean(x, "i"),
        tp.pmax(x, "i"),
        tp.pmin(x, "i"),
        tp.psum(x, "i", axis_index_groups=[[0, 2], [1, 3]]),
        tp.pmean(x, "i", axis_index_groups=[[0], [1, 2, 3]]),
        tp.all_gather(x, "i"),
        tp.all_gather(x, "i", axis=1, tiled=True),
        tp.all_gather(x, "i", axis_index_groups=[[0, 1], [3, 2]]),
        tp.psum_scatter(x, "i"),
        tp.psum_scatter(x, "i", tiled=True),
        tp.all_to_all(x, "i", 0, 0),
        tp.all_to_all(x[:2], "i", 0, 1, axis_index_groups=[[0, 1], [2, 3]]),
        tp.ppermute(x, "i", [(0, 1), (1, 2), (2, 0)]),
        tp.pshuffle(x, "i", [3, 2, 0, 1]),
        x + tp.axis_index("i"),
        x * tp.axis_size("i"),
        tp.psum({"a": x, "b": (x * 2, x.sum())}, "i"),
    )


def mlp_step(p, x, y):
    def loss(p, x, y):
        h = torch.tanh(x @ p["w1"])
        h = torch.tanh(h @ p["w2"])
        return ((h @ p["w3"] - y) ** 2).mean()

    grads, value = torch.func.grad_and_value(loss)(p, x, y)
    grads = tp.pmean(grads, "i")
    return {k: p[k] - 0.1 * grads[k] for k in p}, tp.pmean(value, "i")


def train(f, steps=3):
    torch.manual_seed(0)
    p = {"w1": torch.randn(8, 16) * 0.3, "w2": torch.randn(16, 16) * 0.3, "w3": torch.randn(16, 1) * 0.3}
    x, y = torch.randn(N, 5, 8), torch.randn(N, 5, 1)
    losses = []
    for _ in range(steps):
        p, value = f(p, x, y)
        losses.append(value)
    return p, losses


# -- the same results ------------------------------------------------------------------
def test_every_collective_in_one_compiled_graph_same_bits():
    eager_threads_vs_compiled_stacked(every_collective, rows(N, 4, 3))


def test_one_program_for_every_replica_runs_once_per_call():
    backend = CountingBackend()
    f = pm(lambda x: tp.psum(x, "i") * 2, compile={"backend": backend})
    with executor("stacked"):
        for _ in range(3):
            out = f(rows(N, 3))
    assert backend.shapes == [[(N, 3)]]  # one compile, of the batched graph
    assert backend.runs == 3  # once per call, not once per replica
    assert torch.equal(out.unshard(), rows(N, 3).sum(0).expand(N, 3) * 2)


def test_training_step_fed_back_matches_eager_threads():
    with executor("threads"):
        expected = train(pm(mlp_step, in_axes=(None, 0, 0), out_axes=(None, None)))
    with executor("stacked"):
        got = train(pm(mlp_step, in_axes=(None, 0, 0), out_axes=(None, None), compile=AOT))
    # Not bit for bit: the batched matmuls (bmm over the replicas) round differently.
    assert_same(expected, got, close=True)


def test_sharded_outputs_fed_back():
    f = pm(lambda x: tp.psum(x, "i") / 2 + x, compile=AOT)
    x = tp.device_put_sharded(list(rows(N, 6)), devices(N))
    with executor("threads"):
        expected = pm(lambda x: tp.psum(x, "i") / 2 + x)(pm(lambda x: tp.psum(x, "i") / 2 + x)(x))
    with executor("stacked"):
        y = f(x)
        assert y.shard_layout.storage.value == "stacked"
        got = f(y)
    assert_same(expected, got)


SCALE = torch.tensor(2.0)


def test_closed_over_tensor_is_read_at_run_time():
    f = pm(lambda x: x * SCALE, compile=AOT)
    x = rows(N, 3)
    with executor("stacked"):
        assert torch.equal(f(x).unshard(), x * 2)
        SCALE.add_(1)
        try:
            assert torch.equal(f(x).unshard(), x * 3)
        finally:
            SCALE.sub_(1)


# -- aliasing and strides through a compiled program -----------------------------------
def test_writes_to_own_slices_reach_the_caller():
    def f(r):
        r.mul_(2)
        return r + tp.psum(r, "i")

    expected_x, got_x = rows(N, 3), rows(N, 3)
    with executor("threads"):
        expected = pm(f)(expected_x)
    with executor("stacked"):
        got = pm(f, compile=AOT)(got_x)
    assert_same((expected, expected_x), (got, got_x))


def test_outputs_that_alias_inputs_or_are_the_same_in_every_replica():
    def f(x):
        return x, x.t(), torch.ones(3) * tp.axis_size("i"), tp.psum(x, "i").sum(0)

    x = rows(N, 2, 3)
    got = eager_threads_vs_compiled_stacked(f, x)
    got[2].shards[0].add_(1)  # rows are distinct memory, like the threads executor's outputs
    assert torch.equal(got[2].shards[1], torch.full((3,), float(N)))


def test_shape_change_compiles_again_and_old_shapes_stay_compiled():
    backend = CountingBackend()
    f = pm(lambda x: tp.psum(x, "i"), compile={"backend": backend})
    with executor("stacked"):
        for shape in [(3,), (5, 2), (3,)]:
            assert torch.equal(f(rows(N, *shape)).unshard(), rows(N, *shape).sum(0).expand(N, *shape))
    assert backend.shapes == [[(N, 3)], [(N, 5, 2)]]


def test_a_new_layout_of_the_rows_compiles_again():
    # Replica 0's row view looks the same (Dynamo's guards pass) but the rows lie
    # further apart: Inductor's code for the first layout would assert or misread.
    backend = CountingBackend()
    f = pm(lambda x: x * 2 + tp.psum(x, "i"), compile={"backend": backend})
    wide = rows(N, 6)
    with executor("stacked"):
        for x in (rows(N, 3), wide[:, :3], rows(N, 3)):
            assert torch.equal(f(x).unshard(), x * 2 + x.sum(0))
    assert backend.shapes == [[(N, 3)], [(N, 3)]]
    assert backend.runs == 3


def test_eager_and_compiled_pmaps_of_one_function_capture_apart():
    backend = CountingBackend()

    def f(x):
        return x * 2

    with executor("stacked"):
        pm(f)(rows(N, 3))
        pm(f, compile={"backend": backend})(rows(N, 3))
    assert len(backend.shapes) == 1


# -- what falls back -------------------------------------------------------------------
def test_random_op_falls_back_to_per_replica_compile():
    backend = CountingBackend()

    def f(x):
        return x + torch.rand_like(x)

    pf = pm(f, compile={"backend": backend})
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="random ops under compile="):
        torch.manual_seed(1)
        got = pf(rows(N, 3))
    assert backend.runs == N  # every replica ran its compiled program
    with executor("threads"):
        torch.manual_seed(1)
        expected = pm(f)(rows(N, 3))
    assert_same(expected, got)


def test_autograd_through_a_compiled_call_falls_back_for_that_call():
    backend = CountingBackend()
    pf = pm(lambda x: tp.psum(x.sin(), "i"), compile={"backend": backend})
    x = rows(N, 3).requires_grad_()
    with (
        executor("stacked", allow_fallback=True),
        pytest.warns(RuntimeWarning, match="autograd through a compile= call"),
    ):
        pf(x).unshard().sum().backward()
    assert backend.runs == N  # the per-replica compile ran, with its backward
    torch.testing.assert_close(x.grad, N * x.detach().cos())
    with executor("stacked"), torch.no_grad():  # without autograd the same capture runs stacked
        assert torch.equal(pf(rows(N, 3)).unshard(), rows(N, 3).sin().sum(0).expand(N, 3))


def test_autograd_through_a_compiled_call_says_so_when_an_op_saves_its_output():
    # tanh saves its output for backward, and a graph pass writes a temporary in place: compiling
    # the batched program with autograd failed the capture with a version error (and an anomaly
    # warning) instead of the per-call reason, and the capture was lost for calls without autograd.
    pf = pm(lambda x, w: torch.tanh(x * w) * x, in_axes=(0, None), compile=AOT)
    x, w = rows(N, 3).requires_grad_(), torch.linspace(-1, 1, 3)
    with executor("stacked", allow_fallback=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pf(x, w).unshard().sum().backward()
    messages = [str(c.message) for c in caught]
    assert any("autograd through a compile= call" in m for m in messages), messages
    assert not any("Error detected in" in m or "capture failed" in m for m in messages), messages
    with executor("stacked"), torch.no_grad():  # the capture serves calls without autograd
        torch.testing.assert_close(pf(rows(N, 3), w).unshard(), torch.tanh(rows(N, 3) * w) * rows(N, 3))


def test_dynamic_true_falls_back_to_per_replica_compile():
    pf = pm(lambda x: tp.psum(x, "i"), compile={"backend": "eager", "dynamic": True})
    with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="dynamic=True"):
        got = pf(rows(N, 3))
    assert torch.equal(got.unshard(), rows(N, 3).sum(0).expand(N, 3))


def test_auto_warns_of_a_failed_capture_not_of_a_call_outside_its_scope():
    pf = pm(lambda x: x * x.max().item(), compile=AOT)
    with executor("auto", allow_fallback=True), pytest.warns(RuntimeWarning, match="capture failed"):
        assert torch.equal(pf(rows(N, 3)).unshard(), rows(N, 3) * rows(N, 3).amax(1, keepdim=True))
    pf = pm(lambda x: x * 2, compile=AOT)
    with executor("auto"), torch.autocast("cpu"):  # warnings are errors here
        assert torch.equal(pf(rows(N, 3)).unshard(), rows(N, 3) * 2)


def test_a_dynamo_stance_falls_back():
    pf = pm(lambda x: x * 2, compile=AOT)
    with torch.compiler.set_stance("force_eager"):
        with executor("stacked", allow_fallback=True), pytest.warns(RuntimeWarning, match="set_stance"):
            assert torch.equal(pf(rows(N, 3)).unshard(), rows(N, 3) * 2)


# -- inductor --------------------------------------------------------------------------
@pytest.mark.slow
def test_inductor_every_collective_and_training_step():
    eager_threads_vs_compiled_stacked(every_collective, rows(N, 4, 3), compile=True, close=True)
    eager_threads_vs_compiled_stacked(every_collective, rows(N, 4, 6)[..., :3], compile=True, close=True)
    with executor("threads"):
        expected = train(pm(mlp_step, in_axes=(None, 0, 0), out_axes=(None, None)))
    with executor("stacked"):
        got = train(pm(mlp_step, in_axes=(None, 0, 0), out_axes=(None, None), compile=True))
    assert_same(expected, got, close=True)


@pytest.mark.slow
def test_inductor_sums_low_precision_collectives_in_their_dtype():
    # Fused by Inductor, the batched psum's adds kept float32 partial sums: float16
    # 60000 + 60000 - 60000 - 60000 gave 0, where every replica's own psum (and the
    # README) gives inf (found by a hunt). Inductor rounds each op as eager does now.
    x = torch.tensor([[6e4, 1.0], [6e4, 1.0], [-6e4, 1.0], [-6e4, 1.0]], dtype=torch.float16)
    got = eager_threads_vs_compiled_stacked(lambda v: tp.psum(v, "i") * 2, x, compile=True)
    assert got.unshard()[0, 0].isinf()
