"""More replicas than devices: ``devices=`` may list a device more than once, and
its replicas share it. Eight replicas on two devices, or on one, compute exactly
what eight replicas on eight devices compute, on either executor."""

import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import as_plain as plain
from helpers import assert_same_bits, devices, executor, module_train_step, rows
from torch.utils._pytree import tree_flatten

import torchpmap as tp
from torchpmap import _devices, _runtime

N = 8


def distinct():
    return tuple(devices(N))


def on_one():
    return (devices(1)[0],) * N


def on_two_blocks():
    d0, d1 = devices(2)
    return (d0,) * (N // 2) + (d1,) * (N // 2)


def on_two_interleaved():
    return tuple(devices(2)) * (N // 2)


SHARED = {"one": on_one, "two_blocks": on_two_blocks, "two_interleaved": on_two_interleaved}


def sharded_on(tree):
    return {leaf.devices for leaf in tree_flatten(tree)[0] if isinstance(leaf, tp.ShardedTensor)}


# -- the API ----------------------------------------------------------------------------------
def test_replica_devices_lists_each_device_for_a_contiguous_block():
    local = tp.local_devices()
    k = len(local)
    assert tp.replica_devices(k) == tuple(local)
    assert tp.replica_devices(1) == (local[0],)
    assert tp.replica_devices(2 * k) == tuple(d for d in local for _ in range(2))
    uneven = tp.replica_devices(2 * k + 1)  # the first device takes the one left over
    assert uneven == (local[0],) * 3 + tuple(d for d in local[1:] for _ in range(2))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="replica_devices: n must be a positive int"):
            tp.replica_devices(bad)


def test_a_repeated_device_runs_several_replicas():
    d = devices(1)[0]
    y = tp.pmap(lambda x: x + tp.axis_index("i"), "i", devices=[str(d)] * 3)(torch.zeros(3, 2))
    assert y.devices == (d,) * 3
    torch.testing.assert_close(y.unshard(), torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))


def test_without_devices_an_axis_larger_than_the_device_count_still_raises_and_says_how_to_share():
    k = tp.local_device_count()
    with pytest.raises(ValueError, match=rf"devices=torchpmap.replica_devices\({k + 1}\)"):
        tp.pmap(lambda x: x)(torch.zeros(k + 1, 1))
    with pytest.raises(ValueError, match=rf"only {k} local devices .*replica_devices\({k + 1}\)"):
        tp.device_put_sharded([torch.zeros(1)] * (k + 1))
    # As the message says:
    y = tp.pmap(lambda x: tp.psum(x, "i"), "i", devices=tp.replica_devices(k + 1))(torch.ones(k + 1, 1))
    torch.testing.assert_close(y.unshard(), torch.full((k + 1, 1), float(k + 1)))


def test_every_replica_on_a_shared_device_has_a_worker_of_its_own():
    shared = on_two_blocks()
    names = {}

    def where(x):
        names[int(tp.axis_index("i"))] = threading.current_thread().name
        return x

    with executor("threads"):
        tp.pmap(where, "i", devices=shared)(torch.zeros(N, 1))
    assert len(set(names.values())) == N
    assert names[0].endswith(_devices.device_str(shared[0])) and names[1].endswith("#1")
    assert _runtime.device_slots(shared) == (0, 1, 2, 3, 0, 1, 2, 3)
    assert _runtime.device_slots(on_two_interleaved()) == (0, 0, 1, 1, 2, 2, 3, 3)
    assert _runtime.device_slots(distinct()) == (0,) * N


def test_a_multi_process_job_refuses_repeated_devices():
    local = _devices.local_device_tuple()
    pf = tp.pmap(lambda x: x, devices=[local[0]] * 2)
    try:
        _devices._set_process_layout((0, 2, local * 2), local)
        with pytest.raises(ValueError, match=r"pmap: devices lists a device more than once .*multi-process"):
            pf(torch.zeros(2, 1))
    finally:
        _devices._set_process_layout(None, None)
        _devices._reset_for_tests()


# -- collectives: 8 replicas on 2 devices or 1 == 8 replicas on 8 devices, on both executors ----
GROUPS = [[0, 2, 4, 6], [1, 3, 5, 7]]
FUNCTIONS = {
    "elementwise": lambda x: x * 2 + 1,
    "psum": lambda x: tp.psum(x, "i"),
    "pmean": lambda x: tp.pmean(x, "i"),
    "pmax": lambda x: tp.pmax(x, "i"),
    "pmin": lambda x: tp.pmin(x, "i"),
    "psum_groups": lambda x: tp.psum(x, "i", axis_index_groups=GROUPS),
    "pmean_unequal_groups": lambda x: tp.pmean(x, "i", axis_index_groups=[[0], [1, 2, 3, 4, 5, 6, 7]]),
    "all_gather": lambda x: tp.all_gather(x, "i"),
    "all_gather_tiled_axis1": lambda x: tp.all_gather(x, "i", axis=1, tiled=True),
    "all_gather_groups": lambda x: tp.all_gather(x, "i", axis_index_groups=[[0, 1, 2, 3], [7, 6, 5, 4]]),
    "psum_scatter": lambda x: tp.psum_scatter(x, "i"),
    "psum_scatter_tiled": lambda x: tp.psum_scatter(x, "i", tiled=True),
    "all_to_all": lambda x: tp.all_to_all(x, "i", 0, 0),
    "all_to_all_groups": lambda x: tp.all_to_all(x[:4], "i", 0, 1, axis_index_groups=GROUPS),
    "pswapaxes": lambda x: tp.pswapaxes(x, "i", 0),
    "ppermute_ring": lambda x: tp.ppermute(x, "i", [(i, (i + 1) % N) for i in range(N)]),
    "ppermute_partial": lambda x: tp.ppermute(x, "i", [(0, 5), (5, 1), (3, 0)]),
    "pshuffle": lambda x: tp.pshuffle(x, "i", [3, 2, 0, 1, 7, 6, 4, 5]),
    "axis_index": lambda x: x + tp.axis_index("i"),
    "axis_size": lambda x: x * tp.axis_size("i"),
    "pytree_collective": lambda x: tp.psum({"a": x, "b": (x * 2, x.sum())}, "i"),
}


@pytest.mark.parametrize("layout", sorted(SHARED))
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_collectives_on_shared_devices_equal_distinct_devices_on_both_executors(name, layout):
    fun, shared, x = FUNCTIONS[name], SHARED[layout](), rows(N, 8, 3)
    with executor("threads"):
        expected = tp.pmap(fun, "i", devices=distinct())(x)
        got = tp.pmap(fun, "i", devices=shared)(x)
    assert_same_bits(expected, got)
    assert sharded_on(got) == {shared}
    with executor("stacked"):
        stacked = tp.pmap(fun, "i", devices=shared)(x)
    assert_same_bits(expected, stacked)
    assert sharded_on(stacked) == {shared}


@pytest.mark.parametrize("layout", sorted(SHARED))
def test_pytrees_in_and_out_axes(layout):
    def f(d, t, w):
        return {"s": d["a"] + t[0] @ w, "p": (tp.psum(d["b"], "i"), t[1] * 3)}, tp.pmean(t[1].sum(), "i")

    args = ({"a": rows(N, 3), "b": rows(N, 2, 2)}, (rows(N, 3, 5, offset=1.0), rows(N, 5)), rows(5, 3))
    kw = dict(in_axes=({"a": 0, "b": 0}, (0, 0), None), out_axes=({"s": 0, "p": (1, 0)}, None))
    with executor("threads"):
        expected = tp.pmap(f, "i", devices=distinct(), **kw)(*args)
        got = tp.pmap(f, "i", devices=SHARED[layout](), **kw)(*args)
    assert_same_bits(expected, got)
    with executor("stacked"):
        assert_same_bits(expected, tp.pmap(f, "i", devices=SHARED[layout](), **kw)(*args))


# -- ShardedTensor ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(SHARED))
def test_device_put_and_unshard_round_trip(layout):
    shared = SHARED[layout]()
    x = rows(N, 4).to(shared[0].type)  # on the devices' kind (a GPU on the cuda platform)
    st = tp.device_put_sharded(list(x.clone()), shared)  # views of the clone on virtual CPU devices
    assert st.devices == shared and torch.equal(st.unshard(), x)
    assert len({s.data_ptr() for s in st.shards}) == N  # every replica's shard is its own
    same = tp.device_put_sharded([x[0]] * N, shared)  # one tensor given for every replica
    assert len({s.data_ptr() for s in same.shards}) == N
    rep = tp.device_put_replicated({"w": x[0]}, shared)["w"]
    assert rep.devices == shared and len({s.data_ptr() for s in rep.shards}) == N
    rep.shards[3].add_(1)  # an update of one replica's copy changes no other
    assert torch.equal(rep.unshard()[2], x[0]) and torch.equal(rep.unshard()[3], x[0] + 1)
    assert torch.equal(tp.unreplicate(st), x[0])
    st.add_(1)  # an in-place update reaches every shard, two on one device included
    st[2] = torch.zeros(4)
    expected = x + 1
    expected[2] = 0
    assert torch.equal(st.unshard(), expected) and st.devices == shared


@pytest.mark.parametrize("layout", sorted(SHARED))
def test_a_sharded_tensor_fed_back_on_the_same_devices_moves_nothing(layout):
    shared = SHARED[layout]()
    seen = {}

    def f(x):
        return tp.psum(x, "i") / 2 + x

    def where(x):
        seen[int(tp.axis_index("i"))] = x.data_ptr()
        return x

    pf, probe = tp.pmap(f, "i", devices=shared), tp.pmap(where, "i", devices=shared)
    x = tp.device_put_sharded([r.clone() for r in rows(N, 6)], shared)
    with executor("threads"):
        probe(x)
        assert seen == {r: s.data_ptr() for r, s in enumerate(x.shards)}
        y = pf(x)
        z = pf(y)
        probe(y)
        assert seen == {r: s.data_ptr() for r, s in enumerate(y.shards)}
        expected = tp.pmap(f, "i", devices=distinct())(tp.pmap(f, "i", devices=distinct())(rows(N, 6)))
    assert_same_bits(expected, z)
    with executor("stacked"):
        ys = pf(x)
        assert ys.shard_layout.storage.value == "stacked" and ys.devices == shared
        buffers = ys.stacked_buffers()
        zs = pf(ys)
    assert buffers is not None and ys.stacked_buffers() == buffers
    with executor("threads"):
        probe(ys)  # the stacked result's rows reach the replicas as they are
    assert seen == {r: s.data_ptr() for r, s in enumerate(ys.shards)}
    assert_same_bits(expected, zs)
    # On other devices, the same data: moved, not reinterpreted.
    moved = tp.pmap(lambda v: v + 0, "i", devices=distinct())(zs)
    assert_same_bits(expected, moved)
    assert moved.devices == distinct()


def test_stacked_form_of_shards_on_shared_devices():
    shared = on_two_interleaved()
    x = tp.ShardedTensor([r.clone() for r in rows(N, 3)], shared)
    assert x.stacked_buffers() is None
    st = x.to_stacked()
    assert st.stacked_buffers() is not None and torch.equal(st.unshard(), x.unshard())
    st.shards[5].zero_()  # a write to the copy reaches only that copy's row
    assert torch.equal(x.unshard(), rows(N, 3)) and not st.unshard()[5].any()


# -- training ---------------------------------------------------------------------------------
def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))


def train(devs, steps=3, per=2):
    g = torch.Generator().manual_seed(1)
    models, opts = tp.replicate(make_model(), lambda p: torch.optim.AdamW(p, lr=0.01), devices=devs)
    step = tp.pmap(module_train_step, "i", devices=devs)
    torch.manual_seed(5)  # the dropout masks: each replica's stream comes from it and its index
    losses = []
    for _ in range(steps):
        x, y = torch.randn(N, per, 6, generator=g), torch.randint(0, 3, (N, per), generator=g)
        losses.append(step(models, opts, x, y))
        tp.assert_replicas_identical(models, opts)
    return models, opts, losses


@pytest.mark.parametrize("layout", sorted(SHARED))
def test_training_per_replica_modules_with_pmean_grads_matches_distinct_devices(layout):
    shared = SHARED[layout]()
    models, opts, losses = train(shared)
    assert models.devices == shared
    # Two replicas on one device are two copies: distinct modules, parameters and optimizers.
    assert len({id(m) for m in models}) == N and len({id(o) for o in opts}) == N
    assert len({m[0].weight.data_ptr() for m in models}) == N
    ref_models, _, ref_losses = train(distinct())
    assert_same_bits(ref_losses, losses)
    for p, q in zip(ref_models[0].parameters(), models[0].parameters()):
        assert torch.equal(p, q)


def test_functional_training_on_shared_devices():
    torch.manual_seed(0)
    params = {"w1": torch.randn(6, 16) * 0.3, "w2": torch.randn(16, 1) * 0.3}

    def loss(p, x, y):
        return ((torch.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2).mean()

    def step(p, x, y):
        grads, value = torch.func.grad_and_value(loss)(p, x, y)
        grads = tp.pmean(grads, "i")
        return {k: p[k] - 0.1 * grads[k] for k in p}, tp.pmean(value, "i")

    x, y = torch.randn(N, 5, 6), torch.randn(N, 5, 1)

    def run(devs, name):
        p = tp.device_put_replicated(params, devs)
        losses = []
        with executor(name):
            for _ in range(3):
                p, value = tp.pmap(step, "i", out_axes=(0, None), devices=devs)(p, x, y)
                losses.append(value)
        assert p["w1"].devices == devs
        return p, losses

    expected = run(distinct(), "threads")
    assert_same_bits(expected, run(on_two_interleaved(), "threads"))
    # The stacked executor runs the replicas on one device as one batched graph: its batched
    # matmuls may round differently in the last place (as on distinct devices, test_stacked).
    stacked = run(on_one(), "stacked")
    for a, b in zip(tree_flatten(expected)[0], tree_flatten(stacked)[0]):
        torch.testing.assert_close(plain(a), plain(b), rtol=1e-6, atol=1e-7)


def test_a_checkpoint_moves_between_shared_and_distinct_devices(tmp_path):
    models, opts, _ = train(on_two_blocks(), steps=1)
    tp.save_checkpoint(tmp_path / "c.pt", model=models, opt=opts, rng=False)
    loaded, loaded_opts = tp.replicate(make_model(9), lambda p: torch.optim.AdamW(p, lr=0.01), devices=distinct())
    tp.load_checkpoint(tmp_path / "c.pt", model=loaded, opt=loaded_opts, rng=False)
    tp.assert_replicas_identical(loaded, loaded_opts)
    for p, q in zip(models[0].parameters(), loaded[3].parameters()):
        assert torch.equal(p, q)
    assert len({m[0].weight.data_ptr() for m in loaded}) == N


@pytest.mark.parametrize("layout", sorted(SHARED))
def test_sync_batchnorm_on_shared_devices(layout):
    def make():
        torch.manual_seed(0)
        return tp.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)), "i")

    def step(model, x):
        return tp.pmean(model(x).square().mean(), "i")

    x = rows(N, 5, 3)
    outs = []
    for devs in (distinct(), SHARED[layout]()):
        models = tp.replicate(make(), devices=devs)
        outs.append((tp.pmap(step, "i", devices=devs)(models, x), models[6][1].running_mean.clone()))
    assert_same_bits(outs[0], outs[1])


def test_gradients_through_a_call_on_shared_devices():
    def loss(w, x):
        return tp.psum((x @ w).tanh().sum(), "i")

    grads = []
    for devs in (distinct(), on_two_interleaved()):
        w = rows(3, 2).requires_grad_()
        out = tp.pmap(loss, "i", in_axes=(None, 0), out_axes=None, devices=devs)(w, rows(N, 4, 3))
        out.backward()
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


# -- random streams ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(SHARED))
def test_replica_i_draws_the_same_numbers_on_shared_and_distinct_devices(layout):
    def draw(x):
        return x + torch.rand(4), F.dropout(torch.ones(6), 0.5)

    out = []
    for devs in (distinct(), SHARED[layout]()):
        torch.manual_seed(11)
        out.append(tp.pmap(draw, "i", devices=devs)(torch.zeros(N, 4)))
    assert_same_bits(out[0], out[1])
    rand = out[1][0].unshard()
    assert len({tuple(r.tolist()) for r in rand}) == N  # replicas on one device draw different numbers


# -- compile= ---------------------------------------------------------------------------------
def test_compile_on_shared_devices():
    def f(x):
        return tp.psum(x.sin(), "i") * tp.axis_index("i")

    x = rows(N, 5)
    with executor("threads"):
        expected = tp.pmap(f, "i", devices=distinct())(x)
        got = tp.pmap(f, "i", devices=on_two_interleaved(), compile=dict(backend="eager"))(x)
    assert_same_bits(expected, got)


# -- failures ---------------------------------------------------------------------------------
def test_a_failing_replica_on_a_shared_device_releases_the_others_and_is_named():
    shared = on_two_blocks()

    def f(x):
        if int(tp.axis_index("i")) == 5:
            raise KeyError("replica five")
        return tp.psum(x, "i")

    with executor("threads"):
        with pytest.raises(KeyError, match="replica five") as info:
            tp.pmap(f, "i", devices=shared)(torch.zeros(N, 1))
        assert f"replica 5 on device {shared[5]}" in "\n".join(info.value.__notes__)
        # The workers are free again: the next call on the same devices runs.
        y = tp.pmap(lambda x: tp.psum(x, "i"), "i", devices=shared)(torch.ones(N, 1))
    assert torch.equal(y.unshard(), torch.full((N, 1), float(N)))


def test_device_put_on_shared_devices_makes_the_stacked_form():
    """Devices on one physical device (virtual CPU devices here) get one buffer:
    the stacked executor reads it without a copy on every call."""
    shared = on_two_interleaved()
    separate = [r.clone() for r in rows(N, 3)]
    x = tp.device_put_sharded(separate, shared)
    assert x.stacked_buffers() is not None and torch.equal(x.unshard(), rows(N, 3))
    x.shards[2].zero_()  # a copy: the caller's tensors are untouched, the other rows too
    assert torch.equal(separate[2], rows(N, 3)[2]) and torch.equal(x.unshard()[3], rows(N, 3)[3])
    views = list(rows(N, 3))  # rows of one tensor already: kept, no copy
    y = tp.device_put_sharded(views, shared)
    assert all(s.data_ptr() == v.data_ptr() for s, v in zip(y.shards, views))
    r = tp.device_put_replicated({"w": torch.ones(2, 2)}, shared)["w"]
    assert r.stacked_buffers() is not None
    r.shards[0].add_(1)
    assert r.shards[1].eq(1).all() and r.shards[0].eq(2).all()
    leaf = torch.ones(3, requires_grad=True)  # autograd's tensors are not replaced by rows of a copy
    assert tp.device_put_sharded([leaf * 1 for _ in range(N)], shared).stacked_buffers() is None
