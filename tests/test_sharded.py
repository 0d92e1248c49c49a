"""ShardedTensor (the result type) and the placement helpers device_put_sharded,
device_put_replicated and unreplicate."""

import copy

import helpers
import numpy as np
import pytest
import torch
from helpers import devices as _devices
from helpers import rows

import torchpmap as tp
from torchpmap import ShardedTensor


def _rows(n, *rest, dtype=torch.float32):
    return rows(n, *rest, dtype=dtype, scale=0.25, offset=-1)


# -- metadata -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_metadata(n):
    devs = _devices(n)
    x = _rows(n, 3, 2, dtype=torch.float64)
    st = tp.pmap(lambda r: r * 2)(x)
    assert isinstance(st.shards, tuple) and len(st.shards) == n
    assert all(type(s) is torch.Tensor for s in st.shards)
    assert st.devices == tuple(devs)
    assert st.axis == 0
    assert st.shape == torch.Size([n, 3, 2]) and isinstance(st.shape, torch.Size)
    assert st.size() == st.shape and st.size(1) == 3
    assert st.dtype == torch.float64
    assert st.ndim == 3 and st.dim() == 3
    assert len(st) == n
    assert st.numel() == n * 6
    for i in range(n):
        torch.testing.assert_close(st.shards[i], 2 * x[i])


def test_metadata_with_mapped_axis_not_leading():
    x = _rows(4, 3)
    st = tp.pmap(lambda r: r + 1, out_axes=1)(x)
    assert st.axis == 1 and st.shape == (3, 4) and len(st) == 3
    assert all(s.shape == (3,) for s in st.shards)
    torch.testing.assert_close(st.unshard(), (x + 1).T)
    # indexing an axis-1 ShardedTensor indexes the full tensor
    torch.testing.assert_close(st[1], (x + 1).T[1])
    assert [t.tolist() for t in st] == (x + 1).T.tolist()


# -- shards, indexing, conversions ---------------------------------------------------------


def test_indexing_returns_the_shard_without_a_copy():
    st = tp.pmap(lambda r: r * 3)(_rows(4, 5))
    for i in range(4):
        assert st[i] is st.shards[i]
        assert st[i].data_ptr() == st.shards[i].data_ptr()
    assert st[-1] is st.shards[3]
    with pytest.raises(IndexError, match=r"index 4 is out of bounds for a ShardedTensor with 4 shards"):
        st[4]
    assert [s.data_ptr() for s in st] == [s.data_ptr() for s in st.shards]
    # anything but an int indexes the full tensor
    torch.testing.assert_close(st[1:3, 0], _rows(4, 5)[1:3, 0] * 3)


def test_unshard_and_numpy():
    x = _rows(4, 3)
    st = tp.pmap(lambda r: r - 0.5)(x)
    full = st.unshard()
    assert type(full) is torch.Tensor
    torch.testing.assert_close(full, x - 0.5)
    torch.testing.assert_close(st.unshard(device="cpu"), x - 0.5)
    torch.testing.assert_close(st.unshard(torch.device("cpu")), x - 0.5)
    full.zero_()  # a fresh tensor: the shards are untouched
    torch.testing.assert_close(st.shards[0], x[0] - 0.5)
    arr = np.asarray(st)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, (x - 0.5).numpy())
    assert np.asarray(st, dtype=np.float64).dtype == np.float64
    np.testing.assert_allclose(st.numpy(), (x - 0.5).numpy())
    assert st.tolist() == (x - 0.5).tolist()
    one = tp.pmap(lambda r: r.sum())(_rows(1, 3))
    assert one.item() == pytest.approx(float(_rows(1, 3).sum()))
    assert float(one) == pytest.approx(float(_rows(1, 3).sum()))


@pytest.mark.parametrize("to_numpy", [np.asarray, lambda st: st.numpy()])
def test_numpy_values_of_a_sharded_tensor_are_read_only(to_numpy):
    """They are a copy: a write into them was lost, silently (as in JAX, it raises)."""
    st = tp.device_put_replicated(torch.zeros(3), _devices(2))
    arr = to_numpy(st)
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 5.0
    writable = np.array(st)  # asked for a copy: one's own to write
    writable[0, 0] = 5.0
    assert st.unshard()[0, 0] == 0
    with pytest.raises(ValueError, match=r"without a copy: use np.array\(x\)"):
        np.asarray(st, copy=False)


def test_numpy_follows_torch_rules_for_force():
    x = _rows(2, 3).requires_grad_()
    st = tp.pmap(lambda r: r * 2)(x)
    # as torch.Tensor.numpy: a tensor that requires grad needs force=True
    with pytest.raises(RuntimeError, match=r"requires grad"):
        st.numpy()
    np.testing.assert_allclose(st.numpy(force=True), (x * 2).detach().numpy())
    np.testing.assert_allclose(np.asarray(st), (x * 2).detach().numpy())  # np.asarray reads the values


def test_as_tensor_reads_the_full_tensor():
    x = _rows(4, 3)
    st = tp.pmap(lambda r: r * 2, out_axes=1)(x)
    torch.testing.assert_close(torch.as_tensor(st), (2 * x).T)
    torch.testing.assert_close(torch.tensor(st), (2 * x).T)


def test_repr_shows_the_sharding():
    st = tp.pmap(lambda r: r + 1)(torch.zeros(2, 3))
    text = repr(st)
    assert text.startswith("ShardedTensor(shape=(2, 3), dtype=torch.float32, axis=0, devices=[")
    names = ", ".join(f"{d.type}:{d.index}" for d in st.devices)
    assert f"devices=[{names}]" in text
    assert repr(torch.ones(2, 3)) in text  # the values
    assert str(st) == text


def test_printing(capsys):
    st = tp.pmap(lambda r: r * 10)(torch.arange(4).reshape(2, 2))
    print(st)
    out = capsys.readouterr().out
    assert "ShardedTensor" in out and "20" in out and "30" in out


# -- feeding a ShardedTensor back in ------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_fed_back_with_same_devices_moves_no_data(n):
    _devices(n)
    st = tp.pmap(lambda r: r * 2)(_rows(n, 16))
    received = {}

    def f(r):
        received[int(tp.axis_index("i"))] = r.data_ptr()
        return torch.tensor(r.data_ptr())

    ptrs = tp.pmap(f, "i")(st)
    expected = [s.data_ptr() for s in st.shards]
    assert [received[i] for i in range(n)] == expected
    assert ptrs.unshard().tolist() == expected


def test_fed_back_with_matching_axis_moves_no_data():
    st = tp.pmap(lambda r: r * 2, out_axes=1)(_rows(4, 3))
    ptrs = tp.pmap(lambda r: torch.tensor(r.data_ptr()), in_axes=1)(st)
    assert ptrs.unshard().tolist() == [s.data_ptr() for s in st.shards]


def test_fed_back_differently_still_computes_the_right_values():
    x = _rows(4, 3)
    st = tp.pmap(lambda r: r * 2)(x)
    # other devices
    other = tp.pmap(lambda r: r + 1, devices=list(reversed(_devices(4))))(st)
    torch.testing.assert_close(other.unshard(), 2 * x + 1)
    # another axis: (4, 3) mapped over its axis 1
    t = tp.pmap(lambda r: r.sum(), in_axes=1)(st)
    torch.testing.assert_close(t.unshard(), (2 * x).sum(0))
    # broadcast whole
    b = tp.pmap(lambda r, full: r + full.sum(), in_axes=(0, None))(x, st)
    torch.testing.assert_close(b.unshard(), x + (2 * x).sum())


# -- torch functions on the full tensor -------------------------------------------------------


def test_torch_functions_and_operators_work_on_the_full_tensor():
    x = _rows(4, 3)
    st = tp.pmap(lambda r: r * 1)(x)
    w = torch.linspace(-1, 1, 3)
    checks = {
        "torch.add": (torch.add(st, 1), x + 1),
        "+": (st + 1, x + 1),
        "radd": (1 + st, x + 1),
        "-": (st - st, x - x),
        "rsub": (2 - st, 2 - x),
        "*": (st * w, x * w),
        "/": (st / 2, x / 2),
        "rtruediv": (1 / (st + 10), 1 / (x + 10)),
        "**": (st**2, x**2),
        "neg": (-st, -x),
        "abs": (abs(st), x.abs()),
        "@": (st @ w, x @ w),
        "rmatmul": (torch.ones(4) @ st, torch.ones(4) @ x),
        "sum": (st.sum(), x.sum()),
        "sum(dim)": (st.sum(dim=1), x.sum(1)),
        "mean": (st.mean(0), x.mean(0)),
        "max": (st.max(), x.max()),
        "float": (st.double(), x.double()),
        "stack": (torch.stack([st, st]), torch.stack([x, x])),
        "cat": (torch.cat([st, x]), torch.cat([x, x])),
        "where": (torch.where(st > 0, st, torch.zeros(())), torch.where(x > 0, x, torch.zeros(()))),
        "nn.functional": (torch.nn.functional.relu(st), x.relu()),
    }
    for name, (got, want) in checks.items():
        assert type(got) is torch.Tensor, name
        torch.testing.assert_close(got, want, msg=name)


def test_comparisons_are_elementwise():
    x = _rows(4, 3)
    st = tp.pmap(lambda r: r * 1)(x)
    for got, want in [
        (st > 0, x > 0),
        (st <= 0.5, x <= 0.5),
        (st == x, torch.ones_like(x, dtype=torch.bool)),
        (st != x + 1, torch.ones_like(x, dtype=torch.bool)),
        (st == st, x == x),
        (st >= x[0], x >= x[0]),
    ]:
        assert got.dtype == torch.bool
        assert torch.equal(got, want)
    assert bool((st == x).all())
    assert not bool((st == x + 1).any())


def test_assert_close_between_sharded_tensors():
    x = _rows(4, 3)
    a = tp.pmap(lambda r: r + 1)(x)
    torch.testing.assert_close(a, tp.pmap(lambda r: r + 1)(x))
    with pytest.raises(AssertionError, match=r"not close"):
        torch.testing.assert_close(a, tp.pmap(lambda r: r + 1.5)(x))
    torch.testing.assert_close(a.unshard(), x + 1)
    torch.testing.assert_close(a.sum(), (x + 1).sum())


def test_assert_close_between_sharded_tensor_and_tensor():
    x = _rows(4, 3)
    y = tp.pmap(lambda r: r + 1)(x)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, x + 1)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y, x + 2)


def test_requires_grad_follows_the_shards():
    x = _rows(2, 3).requires_grad_()
    assert tp.pmap(lambda r: r * 2)(x).requires_grad
    assert not tp.pmap(lambda r: r * 2)(x.detach()).requires_grad


# -- construction ------------------------------------------------------------------------------


def test_constructor_validates_its_shards():
    devs = _devices(2)
    with pytest.raises(ValueError, match=r"shard 1 has shape \(3,\) and dtype torch.float32, but shard 0 has \(2,\)"):
        ShardedTensor([torch.zeros(2), torch.zeros(3)], devs)
    with pytest.raises(ValueError, match=r"shard 1 has shape \(2,\) and dtype torch.int64"):
        ShardedTensor([torch.zeros(2), torch.zeros(2, dtype=torch.int64)], devs)
    with pytest.raises(ValueError, match=r"2 shards but 1 devices"):
        ShardedTensor([torch.zeros(2), torch.zeros(2)], devs[:1])
    with pytest.raises(ValueError, match=r"needs at least one shard"):
        ShardedTensor([], [])
    with pytest.raises(TypeError, match=r"shard 1 is a list, not a tensor"):
        ShardedTensor([torch.zeros(2), [0, 0]], devs)
    with pytest.raises(ValueError, match=r"axis 2 out of range for shards of rank 1"):
        ShardedTensor([torch.zeros(2), torch.zeros(2)], devs, axis=2)
    st = ShardedTensor([torch.zeros(2), torch.ones(2)], devs, axis=1)
    torch.testing.assert_close(st.unshard(), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


# -- placement helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_device_put_sharded(n):
    devs = _devices(n)
    parts = [torch.full((3,), float(i)) for i in range(n)]
    st = tp.device_put_sharded(parts, devs)
    assert isinstance(st, ShardedTensor)
    assert st.devices == tuple(devs) and st.shape == (n, 3)
    torch.testing.assert_close(st.unshard(), torch.stack(parts))
    # fed to pmap with the same devices: the replicas get the shards as they are
    ptrs = tp.pmap(lambda r: torch.tensor(r.data_ptr()), devices=devs)(st)
    assert ptrs.unshard().tolist() == [s.data_ptr() for s in st.shards]


def test_device_put_sharded_pytrees_and_errors():
    devs = _devices(3)[:2]
    tree = tp.device_put_sharded(
        [{"a": torch.zeros(2), "b": (torch.ones(1),)}, {"a": torch.ones(2), "b": (torch.zeros(1),)}], devs
    )
    assert set(tree) == {"a", "b"} and isinstance(tree["b"], tuple)
    torch.testing.assert_close(tree["a"].unshard(), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(tree["b"][0].unshard(), torch.tensor([[1.0], [0.0]]))
    default = tp.device_put_sharded([torch.zeros(1)] * 3)
    assert default.devices == tuple(tp.local_devices()[:3])
    with pytest.raises(ValueError, match=r"device_put_sharded: 3 shards but 2 devices"):
        tp.device_put_sharded([torch.zeros(1)] * 3, devs)
    with pytest.raises(ValueError, match=r"device_put_sharded: shard 1 has a different tree structure"):
        tp.device_put_sharded([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], devs)
    with pytest.raises(ValueError, match=r"device_put_sharded: shards must not be empty"):
        tp.device_put_sharded([], devs)
    twice = tp.device_put_sharded([torch.zeros(1)] * 2, [devs[0], devs[0]])  # two replicas on one device
    assert twice.devices == (devs[0], devs[0]) and twice.shards[0].data_ptr() != twice.shards[1].data_ptr()
    n = tp.local_device_count() + 1
    with pytest.raises(ValueError, match=rf"device_put_sharded: {n} shards, but only {n - 1} local devices are"):
        tp.device_put_sharded([torch.zeros(1)] * n)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_device_put_replicated_gives_each_replica_its_own_storage(n):
    devs = _devices(n)
    x = torch.tensor([1.0, 2.0, 3.0])
    st = tp.device_put_replicated(x, devs)
    assert st.shape == (n, 3) and st.devices == tuple(devs)
    for s in st.shards:
        torch.testing.assert_close(s, x)
    ptrs = {s.data_ptr() for s in st.shards} | {x.data_ptr()}
    assert len(ptrs) == n + 1
    st.shards[0].add_(100)
    torch.testing.assert_close(x, torch.tensor([1.0, 2.0, 3.0]))
    if n > 1:
        torch.testing.assert_close(st.shards[1], x)


def test_device_put_replicated_pytrees_and_in_place_replicas():
    devs = _devices(4)
    tree = tp.device_put_replicated({"w": torch.zeros(2), "s": np.float64(1.5)}, devs)
    assert tree["w"].shape == (4, 2) and tree["s"].shape == (4,)
    assert tree["s"].dtype == torch.float64
    default = tp.device_put_replicated(torch.zeros(1))
    assert default.devices == tuple(tp.local_devices())

    def bump(w):
        w.add_(tp.axis_index("i"))  # each replica writes only its own copy
        return w

    out = tp.pmap(bump, "i", devices=devs)(tree["w"])
    torch.testing.assert_close(out.unshard(), torch.arange(4.0).unsqueeze(1).expand(4, 2))


def test_placing_a_leaf_that_is_no_tensor_names_it():
    devs = _devices(2)
    with pytest.raises(TypeError, match=r"device_put_replicated: x\['b'\] is a NoneType, not a tensor"):
        tp.device_put_replicated({"a": torch.ones(1), "b": None}, devs)
    with pytest.raises(TypeError, match=r"device_put_sharded: shards\[1\]\['a'\] is a str"):
        tp.device_put_sharded([{"a": torch.ones(1)}, {"a": "x"}], devs)
    with pytest.raises(TypeError, match=r"shard_batch: batch\[1\] is a str"):
        tp.shard_batch((torch.ones(4), "labels"), 2)


def test_unreplicate_takes_shard_zero():
    devs = _devices(4)
    rep = tp.device_put_replicated(torch.tensor([5.0, 6.0]), devs)
    tree = {"p": rep, "other": 3, "t": torch.ones(1)}
    out = tp.unreplicate(tree)
    assert out["p"] is rep.shards[0]
    assert out["other"] == 3 and out["t"] is tree["t"]
    st = tp.pmap(lambda r: r * 2, out_axes=1)(_rows(4, 3))
    torch.testing.assert_close(tp.unreplicate(st), st.unshard()[:, 0])
    # the usual use: parameters replicated, trained, then read back once
    params = tp.pmap(lambda p: p + tp.pmean(p, "i"), "i")(rep)
    torch.testing.assert_close(tp.unreplicate(params), torch.tensor([10.0, 12.0]))


@pytest.mark.cuda
def test_cuda_shards_live_on_their_devices():
    devs = tp.local_devices()
    n = len(devs)
    x = _rows(n, 3)
    st = tp.pmap(lambda r: r * 2)(x)
    assert [s.device for s in st.shards] == devs
    assert st.unshard().device == devs[0]
    torch.testing.assert_close(st.unshard(device="cpu"), 2 * x)
    np.testing.assert_allclose(np.asarray(st), (2 * x).numpy())
    rep = tp.device_put_replicated(x[0], devs)
    assert [s.device for s in rep.shards] == devs
    put = tp.device_put_sharded(list(x), devs)
    assert [s.device for s in put.shards] == devs


# -- in-place updates reach the shards, or raise ------------------------------------------------


def _sharded(n=4, *rest, axis=0):
    return tp.pmap(lambda r: r * 1, out_axes=axis)(_rows(n, *rest))


def test_in_place_elementwise_ops_apply_to_every_shard():
    st = _sharded(4, 3)
    expected = _rows(4, 3)
    ptrs = [s.data_ptr() for s in st.shards]
    st.add_(1)
    st.mul_(2)
    st += 1
    st -= torch.tensor([1.0, 2.0, 3.0])  # a full tensor broadcast over every shard
    expected = ((expected + 1) * 2 + 1) - torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(st.unshard(), expected)
    st.clamp_(min=0.0)
    torch.testing.assert_close(st.unshard(), expected.clamp(min=0.0))
    full = torch.arange(12.0).reshape(4, 3)
    st.copy_(full)  # the full tensor, split over the shards
    torch.testing.assert_close(st.unshard(), full)
    st.copy_(_sharded(4, 3))  # a ShardedTensor laid out the same way: shard by shard
    torch.testing.assert_close(st.unshard(), _rows(4, 3))
    with torch.no_grad():
        torch.nn.init.constant_(st, 3.0)
    torch.testing.assert_close(st.unshard(), torch.full((4, 3), 3.0))
    st.zero_()
    assert st.unshard().eq(0).all()
    assert [s.data_ptr() for s in st.shards] == ptrs  # updated in place, nothing replaced


def test_in_place_ops_follow_the_mapped_axis():
    st = _sharded(4, 3, axis=1)  # shape (3, 4): shard i is column i
    bias = torch.arange(4.0)  # broadcast along the last axis: one value per shard
    st.add_(bias)
    torch.testing.assert_close(st.unshard(), _rows(4, 3).T + bias)
    for i, s in enumerate(st.shards):
        torch.testing.assert_close(s, _rows(4, 3)[i] + i)


def test_setitem_on_the_mapped_axis_writes_that_shard():
    st = _sharded(4, 3)
    st[1] = 5.0
    st[2] = torch.tensor([7.0, 8.0, 9.0])
    assert st.shards[1].tolist() == [5.0] * 3 and st.shards[2].tolist() == [7.0, 8.0, 9.0]
    torch.testing.assert_close(st.shards[0], _rows(4, 3)[0])


def test_requires_grad_in_place_sets_it_on_every_shard():
    st = _sharded(2, 3)
    assert st.requires_grad_() is st
    assert st.requires_grad and all(s.requires_grad for s in st.shards)
    st.requires_grad_(False)
    assert not any(s.requires_grad for s in st.shards)


@pytest.mark.parametrize(
    "op",
    [
        lambda st: st.transpose_(0, 1),
        lambda st: st.unsqueeze_(0),
        lambda st: st.resize_(12),
        lambda st: st.as_strided_((4, 3), (1, 4)),
        lambda st: st.set_(torch.zeros(4, 3)),
        lambda st: torch.sum(torch.ones(4, 3), 0, out=st),  # out= resized to (3,)
        lambda st: setattr(st, "data", torch.zeros(4, 3)),
        lambda st: setattr(st, "grad", torch.zeros(4, 3)),
    ],
    ids=["transpose_", "unsqueeze_", "resize_", "as_strided_", "set_", "out= of another shape", "data=", "grad="],
)
@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
def test_in_place_ops_the_shards_cannot_follow_raise(op):
    st = _sharded(4, 3)
    before = st.unshard()
    ptrs = [s.data_ptr() for s in st.shards]
    with pytest.raises(TypeError, match=r"ShardedTensor.*in place.*\.shards"):
        op(st)
    torch.testing.assert_close(st.unshard(), before)  # nothing half-done
    assert [s.data_ptr() for s in st.shards] == ptrs and st.shape == (4, 3)


def _iadd(t, v):
    t += v
    return t


def _imul(t, v):
    t *= v
    return t


def _seeded(fill):
    def op(t):
        torch.manual_seed(0)
        return fill(t)

    return op


# Each op takes the tensor to update; other tensors in it are plain tensors.
IN_PLACE_OPS = {
    "add_ scalar": lambda t: t.add_(1),
    "add_ alpha": lambda t: t.add_(0.3, alpha=0.7),
    "add_ broadcast": lambda t: t.add_(torch.arange(t.shape[-1], dtype=t.dtype)),
    "sub_ full": lambda t: t.sub_(torch.linspace(-1, 1, t.numel()).reshape(t.shape)),
    "mul_ scalar": lambda t: t.mul_(0.1),
    "div_ scalar": lambda t: t.div_(3.0),
    "+= scalar": lambda t: _iadd(t, 0.25),
    "*= column": lambda t: _imul(t, torch.arange(t.shape[0], dtype=t.dtype)[:, None]),
    "clamp_": lambda t: t.clamp_(min=-0.5, max=0.75),
    "clamp_min_": lambda t: t.clamp_min_(0.0),
    "fill_": lambda t: t.fill_(2.5),
    "fill_ tensor": lambda t: t.fill_(torch.tensor(-1.5)),
    "zero_": lambda t: t.zero_(),
    "neg_": lambda t: t.neg_(),
    "exp_": lambda t: t.exp_(),
    "addcmul_": lambda t: t.addcmul_(t, torch.full(t.shape, 0.5), value=0.3),
    "lerp_": lambda t: t.lerp_(torch.ones(t.shape), 0.3),
    "copy_ full": lambda t: t.copy_(torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape)),
    "copy_ broadcast": lambda t: t.copy_(torch.arange(t.shape[-1])),
    "setitem int": lambda t: t.__setitem__(1, 5.0),
    "setitem -1 row": lambda t: t.__setitem__(-1, torch.arange(t.shape[1], dtype=t.dtype)),
    "setitem column": lambda t: t.__setitem__((slice(None), 0), 5.0),
    "setitem column 2": lambda t: t.__setitem__((slice(None), 2), torch.arange(t.shape[0], dtype=t.dtype)),
    "setitem element": lambda t: t.__setitem__((0, 1), 7.0),
    "setitem slice": lambda t: t.__setitem__(slice(1, 3), 0.0),
    "setitem ellipsis": lambda t: t.__setitem__((Ellipsis, 1), -2.0),
    "setitem int then slice": lambda t: t.__setitem__((2, slice(0, 2)), 9.0),
    "setitem mask": lambda t: t.__setitem__(t > 0, 0.0),
    "index_add_ dim 0": lambda t: t.index_add_(0, torch.tensor([0, 2]), torch.ones(2, t.shape[1])),
    "index_add_ dim 1": lambda t: t.index_add_(1, torch.tensor([0, 2]), torch.ones(t.shape[0], 2)),
    "masked_fill_": lambda t: t.masked_fill_(torch.eye(*t.shape, dtype=torch.bool), 4.0),
    "scatter_": lambda t: t.scatter_(1, torch.zeros(t.shape[0], 1, dtype=torch.long), -3.0),
    "out=": lambda t: torch.add(torch.ones(t.shape), 1, out=t),
    "out= mul": lambda t: torch.mul(torch.ones(t.shape), t, out=t),
    "_foreach_mul_": lambda t: torch._foreach_mul_([t], 0.5),
    "init.constant_": lambda t: torch.nn.init.constant_(t, 3.0),
    "init.uniform_": _seeded(lambda t: torch.nn.init.uniform_(t)),
    "normal_": _seeded(lambda t: t.normal_()),
}


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast paths", "write-back only"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", list(IN_PLACE_OPS))
def test_in_place_ops_match_the_same_op_on_a_plain_tensor(name, axis, fast_paths, monkeypatch):
    from torchpmap import _sharded as impl

    if not fast_paths:  # the cheaper paths must give exactly what the write-back gives
        monkeypatch.setattr(impl, "_update_shards_directly", lambda *a: (False, None))
    op = IN_PLACE_OPS[name]
    st = _sharded(4, 3, axis=axis)
    plain = st.unshard().clone()
    ptrs = [s.data_ptr() for s in st.shards]
    result, expected = op(st), op(plain)
    assert torch.equal(st.unshard(), plain), f"{name}: {st.unshard()} != {plain}"
    assert [s.data_ptr() for s in st.shards] == ptrs  # updated in place, nothing replaced
    if expected is plain:
        assert result is st


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("axis", [0, 1])
def test_elementwise_ops_with_scalars_are_exact_for_every_dtype(dtype, axis, monkeypatch):
    from torchpmap import _sharded as impl

    def apply(fast):
        if not fast:
            monkeypatch.setattr(impl, "_update_shards_directly", lambda *a: (False, None))
        n = tp.local_device_count()
        st = tp.pmap(lambda r: r * 1, out_axes=axis)(rows(n, 17, dtype=dtype, scale=0.37, offset=-20))
        plain = st.unshard().clone()
        for t in (st, plain):
            t.add_(3).mul_(7).sub_(2).clamp_(-50, 60).neg_()
        assert torch.equal(st.unshard(), plain)
        return st.unshard()

    assert torch.equal(apply(True), apply(False))


def test_copy_between_sharded_tensors():
    st = _sharded(4, 3)
    other = _sharded(4, 3, axis=1)  # shape (3, 4): its transpose, laid out differently
    st.copy_(other.T)
    torch.testing.assert_close(st.unshard(), _rows(4, 3))
    # a source whose shards are this tensor's shards, rotated: every shard reads the old values
    rotated = ShardedTensor(st.shards[1:] + st.shards[:1], st.devices, axis=0)
    st.copy_(rotated)
    torch.testing.assert_close(st.unshard(), _rows(4, 3).roll(-1, 0))
    with pytest.raises(RuntimeError, match=r"shape|size"):
        st.copy_(_sharded(2, 3))
    torch.testing.assert_close(st.unshard(), _rows(4, 3).roll(-1, 0))


def test_real_and_imag_setters_and_out_tuples_reach_the_shards():
    st = tp.pmap(lambda r: r * (1 + 2j))(_rows(4, 3).to(torch.complex64))
    st.real = torch.zeros(4, 3)
    st.imag += 1  # reads .imag (a full tensor), adds, sets .imag
    expected = torch.complex(torch.zeros(4, 3), 2 * _rows(4, 3) + 1)
    torch.testing.assert_close(st.unshard(), expected)
    values, indices = _sharded(4), tp.pmap(lambda r: r.long())(torch.zeros(4))
    torch.max(_rows(4, 3), 1, out=(values, indices))
    torch.testing.assert_close(values.unshard(), _rows(4, 3).max(1).values)
    assert indices.unshard().tolist() == [2] * 4


def test_in_place_on_a_view_of_the_mapped_axis_reaches_the_shard():
    st = _sharded(4, 3)
    st[2].add_(1)  # x[i] is shard i itself
    torch.testing.assert_close(st.shards[2], _rows(4, 3)[2] + 1)
    st.data.mul_(2)  # x.data is the shards' .data
    torch.testing.assert_close(st.unshard(), (_rows(4, 3) + torch.tensor([0, 0, 1, 0.0])[:, None]) * 2)
    assert isinstance(st.data, ShardedTensor)


def test_in_place_ops_that_autograd_would_record_raise():
    x = _rows(4, 3).requires_grad_()
    st = tp.pmap(lambda r: r * 2)(x)  # shards computed by autograd
    for op in (lambda t: t.add_(1), lambda t: t.__setitem__(1, 0.0), lambda t: t.mul_(torch.ones(3))):
        with pytest.raises(RuntimeError, match=r"ShardedTensor.*in place while autograd records.*no_grad"):
            op(st)
    plain = _sharded(4, 3)
    with pytest.raises(RuntimeError, match=r"in place while autograd records"):
        plain.copy_(x)  # would put the shards on x's graph
    torch.testing.assert_close(plain.unshard(), _rows(4, 3))
    torch.testing.assert_close(st.unshard(), 2 * _rows(4, 3))  # nothing half-done
    with pytest.raises(TypeError, match=r"ShardedTensor: detach_ changes its autograd state in place.*x\.shards"):
        st.detach_()
    assert st.requires_grad and all(s.grad_fn is not None for s in st.shards)
    with torch.no_grad():  # outside the graph, as for a plain tensor
        st.add_(1)
        st[1] = 0.0
    st.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4, 3), 2.0))


def test_init_of_shards_that_require_grad():
    st = _sharded(2, 3).requires_grad_()
    torch.nn.init.constant_(st, 0.5)  # init runs under no_grad itself, as for an nn.Parameter
    assert all(s.is_leaf and s.requires_grad for s in st.shards)
    torch.testing.assert_close(st.unshard().detach(), torch.full((2, 3), 0.5))
    with pytest.raises(RuntimeError, match=r"in place while autograd records"):
        st.mul_(2)


def test_replicas_returning_one_tensor_get_shards_of_their_own():
    """As in JAX, output shards never share memory: returning a broadcast input
    (the same tensor in every replica on virtual CPU devices) gives copies."""
    x, w = _rows(4, 3), torch.zeros(3)
    st = tp.pmap(lambda r, w: w, in_axes=(0, None))(x, w)
    assert len({s.data_ptr() for s in st.shards}) == 4  # (rows of one buffer on the stacked executor)
    st[1] = 5.0
    st.add_(1)
    assert st.shards[1].tolist() == [6.0] * 3 and st.shards[0].tolist() == [1.0] * 3
    # ... and a replica updating its shard in the next call updates only its own.
    out = tp.pmap(lambda s: s.add_(1), donate_argnums=0)(tp.pmap(lambda r, w: w, in_axes=(0, None))(x, w))
    assert out.unshard().eq(1).all() and w.eq(0).all()
    shared = tp.device_put_sharded([w, w], _devices(2))
    shared.shards[0].add_(1)  # one tensor given twice: each shard is memory of its own
    assert shared.shards[1].eq(0).all() and w.eq(0).all()
    # Disjoint slices of one input stay views of it.
    views = tp.pmap(lambda r: r)(x)
    assert all(s._base is x or s.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for s in views.shards)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_a_returned_input_reads_the_callers_later_writes_under_autograd(axis):
    # A returned input's shards are views of the caller's tensor, as a replica's own would be;
    # slices of a tensor mapped on another axis were unbind's views, which autograd refuses to
    # read once the tensor is written in place (stacked executor; fuzzing).
    base = torch.arange(12.0).reshape(3, 4).movedim(0, axis).contiguous().requires_grad_()
    f = tp.pmap(lambda a: (a, a * 2), "i", in_axes=axis, out_axes=axis, devices=_devices(3))
    for _ in range(2):  # the default executor's first call runs on the threads, its second stacked
        x = base * 1
        out, _twice = f(x)
    x.add_(100)
    torch.testing.assert_close(out.unshard(), base.detach() + 100)
    out.unshard().sum().backward()
    torch.testing.assert_close(base.grad, torch.ones_like(base))


def test_in_place_updates_of_shards_that_share_memory_raise():
    x, w = _rows(4, 3), torch.zeros(3)
    st = ShardedTensor([w] * 4, _devices(4))  # every shard is w itself
    for op in (lambda t: t.__setitem__(1, 5.0), lambda t: t.add_(1), lambda t: t.copy_(x)):
        with pytest.raises(RuntimeError, match=r"shards 0 and 1 share memory.*s\.clone\(\)"):
            op(st)
    assert w.eq(0).all()
    own = ShardedTensor([s.clone() for s in st.shards], st.devices, st.axis)  # the way the error names
    own[1] = 5.0
    assert own.shards[1].tolist() == [5.0] * 3 and own.shards[0].tolist() == [0.0] * 3
    expanded = ShardedTensor([torch.zeros(1).expand(3), torch.zeros(3)], _devices(2))
    with pytest.raises(RuntimeError, match=r"shard 0 overlaps itself"):
        expanded.fill_(1.0)
    buffer = np.zeros(4, dtype=np.float32)  # two storages over one buffer
    overlapping = ShardedTensor([torch.from_numpy(buffer[0:3]), torch.from_numpy(buffer[1:4])], _devices(2))
    with pytest.raises(RuntimeError, match=r"shards 0 and 1 share memory"):
        overlapping[0] = torch.tensor([1.0, 2.0, 3.0])
    assert not buffer.any()


def test_interleaved_shards_of_one_storage_update_in_place():
    x = _rows(4, 3)
    st = tp.pmap(lambda r: r, in_axes=1, out_axes=1)(x.clone())  # shards: the columns of one matrix
    assert len({s.untyped_storage().data_ptr() for s in st.shards}) == 1
    st.add_(torch.arange(3.0))
    st[:, 0] = -1.0
    expected = x + torch.arange(3.0)
    expected[:, 0] = -1.0
    torch.testing.assert_close(st.unshard(), expected)


def test_in_place_update_of_inference_shards_raises_outside_inference_mode():
    with torch.inference_mode():
        st = _sharded(4, 3)
        st.add_(1)  # inside inference mode, as for a plain inference tensor
    with pytest.raises(RuntimeError, match=r"shard 0 is an inference tensor"):
        st.add_(1)
    torch.testing.assert_close(st.unshard(), _rows(4, 3) + 1)


def test_requires_grad_attribute_sets_it_on_every_shard():
    st = _sharded(2, 3)
    st.requires_grad = True
    assert all(s.requires_grad for s in st.shards)
    computed = tp.pmap(lambda r: r * 2)(_rows(2, 3).requires_grad_())
    with pytest.raises(RuntimeError, match=r"shard 0 was computed by autograd"):
        computed.requires_grad_(False)
    assert all(s.requires_grad for s in computed.shards)


def test_deepcopy_is_a_sharded_tensor_with_its_own_storage():
    st = _sharded(4, 3)
    dup = copy.deepcopy(st)
    assert isinstance(dup, ShardedTensor)
    assert dup.devices == st.devices and dup.axis == st.axis
    torch.testing.assert_close(dup.unshard(), st.unshard())
    dup.add_(1)
    torch.testing.assert_close(st.unshard(), _rows(4, 3))
    assert {s.data_ptr() for s in dup.shards}.isdisjoint(s.data_ptr() for s in st.shards)
    also = copy.deepcopy({"x": st})["x"]
    assert isinstance(also, ShardedTensor)
    a, b = copy.deepcopy([st, st])  # the memo: one copy for one object
    assert a is b


@pytest.mark.parametrize("axis", [0, 1])
def test_save_and_load_round_trip_with_default_weights_only(tmp_path, axis):
    st = _sharded(4, 3, axis=axis)
    path = tmp_path / "st.pt"
    torch.save({"x": st, "step": 3}, path)
    loaded = torch.load(path)  # weights_only=True, PyTorch's default
    x = loaded["x"]
    assert isinstance(x, ShardedTensor) and loaded["step"] == 3
    assert x.devices == st.devices and x.axis == st.axis
    torch.testing.assert_close(x.unshard(), st.unshard())


# -- views of a temporary full tensor: reads work, writes raise -----------------------------------
# An op on a ShardedTensor runs on a temporary full tensor; a view of it (x.T, x[1:3],
# x.detach(), ...) reads like a plain tensor, and a write through it, which would reach only
# the temporary copy, raises.

_LOST = r"view of a temporary copy of a ShardedTensor.*lost.*x\.shards"
_ALL_AXES = (0, 1, 2)
_F = torch.nn.functional

# name -> (the write through a view, the mapped axes for which that view is not one shard).
# Each takes x of shape (4, 3, 2) with the mapped axis moved to `axis`, so the sizes vary.
VIEW_WRITES = {
    "x.mT.add_": (lambda x: x.mT.add_(1), _ALL_AXES),
    "x.transpose(0, 1).mul_": (lambda x: x.transpose(0, 1).mul_(2), _ALL_AXES),
    "x.permute(2, 0, 1).zero_": (lambda x: x.permute(2, 0, 1).zero_(), _ALL_AXES),
    "x[1:3].add_": (lambda x: x[1:3].add_(1), _ALL_AXES),
    "x[0].add_": (lambda x: x[0].add_(100), (1, 2)),
    "x[:, 0].zero_": (lambda x: x[:, 0].zero_(), (0, 2)),
    "x[:, :, 1].fill_": (lambda x: x[:, :, 1].fill_(7.0), (0, 1)),
    "x[1:3][0].zero_": (lambda x: x[1:3][0].zero_(), _ALL_AXES),
    "x.mT[0].add_": (lambda x: x.mT[0].add_(1), _ALL_AXES),
    "x.select.add_": (lambda x: x.select(-1, 1).add_(1), _ALL_AXES),
    "x.narrow.add_": (lambda x: x.narrow(1, 0, 2).add_(1), _ALL_AXES),
    "x.expand.zero_": (lambda x: x[:1].expand(3, -1, -1)[0].zero_(), _ALL_AXES),
    "x.unsqueeze.mul_": (lambda x: x.unsqueeze(0).mul_(2), _ALL_AXES),
    "x.view(-1).add_": (lambda x: x.view(-1).add_(1), _ALL_AXES),
    "x.reshape(-1).sub_": (lambda x: x.reshape(-1).sub_(1), _ALL_AXES),
    "x.flatten().neg_": (lambda x: x.flatten().neg_(), _ALL_AXES),
    "x.detach().add_": (lambda x: x.detach().add_(1), _ALL_AXES),
    "x.detach().clamp_": (lambda x: x.detach().clamp_(min=0.0), _ALL_AXES),
    "x.contiguous().add_": (lambda x: x.contiguous().add_(1), _ALL_AXES),
    "x.float().add_": (lambda x: x.float().add_(1), _ALL_AXES),
    "x.unbind(0)[1].add_": (lambda x: x.unbind(0)[1].add_(1), _ALL_AXES),
    "x.split(2)[0].zero_": (lambda x: x.split(2)[0].zero_(), _ALL_AXES),
    "x.chunk(2, 1)[0].zero_": (lambda x: x.chunk(2, 1)[0].zero_(), _ALL_AXES),
    "x.diagonal().zero_": (lambda x: x.diagonal().zero_(), _ALL_AXES),
    "x.mT.data.add_": (lambda x: x.mT.data.add_(1), _ALL_AXES),
    "copy.copy(view).add_": (lambda x: copy.copy(x[1:3]).add_(1), _ALL_AXES),
    "view[i] = v": (lambda x: x.mT.__setitem__(0, 5.0), _ALL_AXES),
    "view += 1": (lambda x: _iadd(x.mT, 1), _ALL_AXES),
    "view *= t": (lambda x: _imul(x[1:3], torch.full((2,), 3.0)), _ALL_AXES),
    "view.copy_": (lambda x: x.view(-1).copy_(torch.arange(24.0)), _ALL_AXES),
    "out=view": (lambda x: torch.add(torch.ones(24), 1, out=x.view(-1)), _ALL_AXES),
    "out=(view, t)": (
        lambda x: torch.max(torch.ones(24, 2), 1, out=(x.view(-1), torch.empty(24, dtype=torch.long))),
        _ALL_AXES,
    ),
    "view.index_put_": (lambda x: x.view(-1).index_put_((torch.tensor([0]),), torch.tensor(9.0)), _ALL_AXES),
    "view.masked_fill_": (lambda x: x.mT.masked_fill_(torch.ones(1, dtype=torch.bool), 0.0), _ALL_AXES),
    "init.zeros_(view)": (lambda x: torch.nn.init.zeros_(x.mT), _ALL_AXES),
    "relu(view, inplace=True)": (lambda x: _F.relu(x.mT, inplace=True), _ALL_AXES),
    "_foreach_add_([view])": (lambda x: torch._foreach_add_([x.mT], 1.0), _ALL_AXES),
    "batch_norm running_mean=view": (
        lambda x: _F.batch_norm(torch.ones(5, 3), x.flatten()[:3], torch.ones(3), training=True),
        _ALL_AXES,
    ),
    "embedding max_norm renorms view": (
        lambda x: _F.embedding(torch.tensor([0, 1]), x.view(-1, 2), max_norm=0.1),
        _ALL_AXES,
    ),
}
_VIEW_WRITE_CASES = [(name, axis) for name, (_, axes) in VIEW_WRITES.items() for axis in axes]


@pytest.mark.parametrize(("name", "axis"), _VIEW_WRITE_CASES, ids=[f"{n}-axis{a}" for n, a in _VIEW_WRITE_CASES])
def test_writes_through_a_view_of_a_temporary_copy_raise(name, axis):
    op, _ = VIEW_WRITES[name]
    st = _sharded(4, 3, 2, axis=axis)
    before = st.unshard()
    ptrs = [s.data_ptr() for s in st.shards]
    with pytest.raises(TypeError, match=_LOST):
        op(st)
    assert torch.equal(st.unshard(), before)  # nothing written, nothing lost
    assert [s.data_ptr() for s in st.shards] == ptrs


def test_writes_through_views_of_a_two_dimensional_sharded_tensor_raise():
    st = _sharded(4, 3)
    for op in (lambda x: x.T.add_(1), lambda x: x.T[0].zero_(), lambda x: x.T.T.mul_(2)):
        with pytest.raises(TypeError, match=_LOST):
            op(st)
    torch.testing.assert_close(st.unshard(), _rows(4, 3))


def test_writes_through_complex_views_raise():
    st = tp.pmap(lambda r: r * (1 + 2j))(_rows(4, 3).to(torch.complex64))
    before = st.unshard()
    for op in (
        lambda x: x.mH.mul_(2),
        lambda x: x.conj().zero_(),
        lambda x: x.T.real.zero_(),
        lambda x: setattr(x.T, "real", torch.zeros(3, 4)),
        lambda x: _iadd(x.T.imag, 1),
    ):
        with pytest.raises(TypeError, match=_LOST):
            op(st)
    assert torch.equal(st.unshard(), before)


def test_real_and_imag_are_the_shards_real_and_imaginary_parts():
    st = tp.pmap(lambda r: r * (1 + 2j))(_rows(4, 3).to(torch.complex64))
    assert isinstance(st.real, ShardedTensor) and st.real.axis == st.axis
    torch.testing.assert_close(st.imag, 2 * _rows(4, 3))
    st.real.zero_()  # views of the shards: writes reach them
    imag = st.imag
    imag += 1
    torch.testing.assert_close(st.unshard(), torch.complex(torch.zeros(4, 3), 2 * _rows(4, 3) + 1))
    real = _sharded(4, 3)
    assert real.real is real  # as for a plain tensor: x itself
    with pytest.raises(RuntimeError, match=r"imag is not implemented for tensors with non-complex dtypes"):
        _ = real.imag


def test_optimizer_step_on_a_detached_sharded_tensor_raises():
    st = _sharded(4, 3)
    p = st.detach().requires_grad_()  # x.detach() shares x's memory: here, a temporary copy's
    opt = torch.optim.SGD([p], lr=0.1)
    (p * p).sum().backward()
    with pytest.raises(TypeError, match=_LOST):
        opt.step()
    torch.testing.assert_close(st.unshard(), _rows(4, 3))
    mine = st.detach().clone().requires_grad_()  # what the message suggests: a tensor of one's own
    torch.optim.SGD([mine], lr=0.1).step()


# Views that are only read: each compared with the same op on the plain full tensor.
VIEW_READS = {
    "x.mT": lambda x: x.mT,
    "x[1:3]": lambda x: x[1:3],
    "x[0]": lambda x: x[0],
    "x[:, 1]": lambda x: x[:, 1],
    "x[..., 0]": lambda x: x[..., 0],
    "x.detach()": lambda x: x.detach(),
    "x.view(-1)": lambda x: x.view(-1),
    "x.unsqueeze(0)": lambda x: x.unsqueeze(0),
    "x.select": lambda x: x.select(1, 1),
    "x.narrow": lambda x: x.narrow(2, 1, 1),
    "x.expand": lambda x: x[:1].expand(3, -1, -1),
    "x.contiguous()": lambda x: x.contiguous(),
    "x.mT[0]": lambda x: x.mT[0],
    "x.unbind(1)[1]": lambda x: x.unbind(1)[1],
}


@pytest.mark.parametrize("axis", _ALL_AXES)
@pytest.mark.parametrize("name", list(VIEW_READS))
def test_views_read_like_the_same_view_of_a_plain_tensor(name, axis):
    import io

    make = VIEW_READS[name]
    st = _sharded(4, 3, 2, axis=axis)
    v, p = make(st), make(st.unshard())
    assert isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor)
    assert (v.shape, v.dtype, v.device) == (p.shape, p.dtype, p.device)
    if not any(v is s for s in st.shards):  # one position on the mapped axis is the shard, with its own strides
        assert v.stride() == p.stride()
    assert torch.equal(v, p) and repr(v) == repr(p) and str(v) == str(p) and v.tolist() == p.tolist()
    torch.testing.assert_close(v, p)
    np.testing.assert_array_equal(v.numpy(), p.numpy())
    np.testing.assert_array_equal(np.asarray(v), np.asarray(p))
    for read in (
        lambda t: t * 2 + 1,
        lambda t: t.sum(0),
        lambda t: t == p,
        lambda t: t.clone(),
        lambda t: torch.stack([t, p]),
        lambda t: t.double(),
        lambda t: torch.nn.functional.relu(t),
        lambda t: t @ t.mT if t.ndim >= 2 else t @ t,
    ):
        got, want = read(v), read(p)
        assert type(got) is torch.Tensor  # a new tensor is a plain one
        assert torch.equal(got, want)
    mine = v.clone()
    mine.add_(1)  # a copy is the caller's own
    torch.testing.assert_close(mine, p + 1)
    copied = copy.deepcopy(v)  # a plain tensor with its own memory
    assert type(copied) is torch.Tensor and torch.equal(copied, p) and copied.data_ptr() != v.data_ptr()
    buffer = io.BytesIO()
    torch.save(v, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only=True: saved as a plain tensor
    assert type(loaded) is torch.Tensor and torch.equal(loaded, p)


@pytest.mark.parametrize("axis", _ALL_AXES)
def test_gradients_flow_through_views_of_a_sharded_tensor(axis):
    w = torch.movedim(torch.linspace(-1, 1, 24).reshape(4, 3, 2), 0, axis).contiguous()
    xs = _rows(4, 3, 2).requires_grad_()
    st = tp.pmap(lambda r: r * 2, out_axes=axis)(xs)
    full = torch.movedim(xs * 2, 0, axis).contiguous()  # laid out as the assembled full tensor
    for make in (lambda t: t.mT, lambda t: t[1:], lambda t: t.view(-1)[:5], lambda t: t.unsqueeze(0).mT[0]):
        g_sharded = torch.autograd.grad((make(st) * make(w)).sum(), xs, retain_graph=True)[0]
        g_plain = torch.autograd.grad((make(full) * make(w)).sum(), xs, retain_graph=True)[0]
        torch.testing.assert_close(g_sharded, g_plain)


@pytest.mark.parametrize("axis", _ALL_AXES)
def test_one_position_on_the_mapped_axis_is_that_shard(axis):
    st = _sharded(4, 3, 2, axis=axis)
    picks = (slice(None),) * axis + (2,)  # x[2], x[:, 2], x[:, :, 2]
    assert st[picks] is st.shards[2]  # the shard itself: writes through it reach x
    st[picks].add_(1)
    st[picks][0].zero_()  # a view of shard 2
    shard = _rows(4, 3, 2)[2] + 1
    shard[0] = 0
    if axis < 2:
        st[(*picks, 1)].fill_(9.0)  # x[2, 1], x[:, 2, 1]: shard 2's [..., 1], a view of it
        shard[(*(slice(None),) * axis, 1)] = 9.0
    expected = _rows(4, 3, 2)
    expected[2] = shard
    torch.testing.assert_close(st.unshard(), torch.movedim(expected, 0, axis))
    assert tp.unreplicate(st) is st.shards[0]  # shard 0, on any mapped axis


def test_pmap_takes_a_view_and_fails_a_call_that_writes_it():
    st = _sharded(4, 3)
    out = tp.pmap(lambda r, w: r * 2 + w.sum(), in_axes=(0, None))(st.T, st[1:3])
    torch.testing.assert_close(out.unshard(), _rows(4, 3).T * 2 + _rows(4, 3)[1:3].sum())
    for f, in_axes, args in [
        (lambda r: r.add_(1), 0, (st.T,)),  # a replica's slice of a mapped view
        (lambda r, w: w.mul_(2), (0, None), (torch.ones(4), st.detach())),  # a broadcast view
    ]:
        with pytest.raises(TypeError, match=r"pmap: a replica wrote in place into args\[\d\], a " + _LOST):
            tp.pmap(f, in_axes=in_axes)(*args)
    torch.testing.assert_close(st.unshard(), _rows(4, 3))


@pytest.mark.slow
def test_compiled_code_takes_a_view_of_a_sharded_tensor():
    st = _sharded(4, 3)

    def f(t):
        return (t * 2).sin().sum(0)

    out = torch.compile(f, backend="eager", fullgraph=True)(st.T)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, f(_rows(4, 3).T))

    def write(t):
        t.add_(1)
        return t

    with pytest.raises(TypeError, match=_LOST):
        torch.compile(write, backend="eager")(st.T)
    torch.testing.assert_close(st.unshard(), _rows(4, 3))
    # pmap hands its replicas plain tensors: every backend takes them
    for backend in ("eager", "aot_eager", "inductor"):
        got = tp.pmap(lambda r: r @ r.T, compile=dict(backend=backend))(st.mT.unsqueeze(-1))
        torch.testing.assert_close(got.unshard(), torch.stack([r @ r.T for r in _rows(4, 3).T.unsqueeze(-1)]))


@pytest.mark.parametrize("mode", [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_batch_norm_updates_running_statistics_held_in_sharded_tensors(mode):
    """aten's batch_norm updates its running statistics without counting a version: they are
    written back by name (a functional call and a module's buffers), never lost."""
    ds = _devices(2)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with mode():
        mean, var = (
            tp.device_put_sharded([torch.tensor(0.0)] * 2, ds),
            tp.device_put_sharded([torch.tensor(1.0)] * 2, ds),
        )
        mean_want, var_want = torch.zeros(2), torch.ones(2)
        torch.nn.functional.batch_norm(x, mean, var, training=True, momentum=0.5)
        torch.nn.functional.batch_norm(x, mean_want, var_want, training=True, momentum=0.5)
        assert torch.equal(mean.unshard(), mean_want) and torch.equal(var.unshard(), var_want)
        bn, bn_want = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
        bn.running_mean = tp.device_put_sharded([torch.tensor(0.0)] * 2, ds)
        bn(x)
        bn_want(x)
        assert torch.equal(bn.running_mean.unshard(), bn_want.running_mean)


WRITES_WITHOUT_A_TELLING_NAME = {
    "nn.init by keyword": lambda x: torch.nn.init.constant_(x, 3.0),  # passes tensor=x
    "operator overload": lambda x: torch.ops.aten.add_.Tensor(x, torch.ones(3)),
    "embedding max_norm": lambda x: torch.nn.functional.embedding(torch.tensor([0, 1]), x, max_norm=1.0),
    "real setter": lambda x: setattr(x, "real", torch.full((2, 3), 9.0)),
}


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("write", sorted(WRITES_WITHOUT_A_TELLING_NAME))
def test_writes_found_by_name_reach_the_shards(mode, write):
    """Under inference mode no version counts a write: these are found by the op and its arguments."""
    fn = WRITES_WITHOUT_A_TELLING_NAME[write]
    with mode():
        plain = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        x = tp.device_put_sharded(list(plain.clone().unbind(0)), _devices(2))
        fn(plain)
        fn(x)
        assert torch.equal(x.unshard(), plain)


@pytest.mark.parametrize("made_in_inference_mode", [False, True])
def test_ops_under_inference_mode(made_in_inference_mode):
    """Evaluation code runs under torch.inference_mode(), where the temporary full
    tensor counts no versions: reads work and writes still reach the shards."""
    if made_in_inference_mode:
        with torch.inference_mode():
            st = _sharded(4, 3)
    else:
        st = _sharded(4, 3)
    plain = _rows(4, 3)
    with torch.inference_mode():
        torch.testing.assert_close(st.sum(), plain.sum())
        torch.testing.assert_close((st * 2).mean(dim=0), (plain * 2).mean(dim=0))
        for op in (
            lambda t: t.add_(1),
            lambda t: t.__setitem__(1, 7.0),
            lambda t: t.__setitem__((slice(None), 0), -1.0),
            lambda t: torch.add(torch.ones(4, 3), t, out=t),
            lambda t: t.copy_(torch.arange(12.0).reshape(4, 3)),
            lambda t: t.index_add_(1, torch.tensor([2]), torch.ones(4, 1)),
        ):
            op(st)
            op(plain)
            torch.testing.assert_close(st.unshard(), plain)


# -- autograd acts on the shards ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["register_hook", "retain_grad", "register_post_accumulate_grad_hook"])
def test_hooks_on_a_sharded_tensor_raise_instead_of_never_running(method):
    # The shards carry autograd, not the wrapper: a hook on it was accepted and never ran.
    x = torch.ones(4, 2, requires_grad=True)
    y = tp.pmap(lambda v: v * 3)(x)
    args = () if method == "retain_grad" else (lambda g: g * 10,)
    with pytest.raises(RuntimeError, match=f"ShardedTensor.{method}: its shards carry autograd"):
        getattr(y, method)(*args)


def test_a_sharded_tensor_returned_by_an_autograd_function_raises_when_read():
    # Autograd records a Function's output on the wrapper, whose shards know nothing of it:
    # checkpoint(pmapped, x, use_reentrant=True).sum() + (x ** 2).sum() gave the gradient 2x,
    # without pmap's term (found by a hunt).
    p = tp.pmap(lambda v: v * 3, devices=tp.devices()[:4])

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return p(v)

        @staticmethod
        def backward(ctx, g):
            return g * 3

    x = torch.randn(4, 3, requires_grad=True)
    for out in (torch.utils.checkpoint.checkpoint(p, x, use_reentrant=True), Scaled.apply(x)):
        for use in (lambda o: o.sum(), lambda o: o.shards, lambda o: o.unshard(), lambda o: p(o)):
            with pytest.raises(RuntimeError, match=r"returned by a torch.autograd.Function \(\w+Backward"):
                use(out)
    torch.utils.checkpoint.checkpoint(p, x, use_reentrant=False).sum().backward()  # records the shards
    torch.testing.assert_close(x.grad, torch.full((4, 3), 3.0))


def test_reading_grad_of_a_sharded_tensor_whose_shards_have_gradients_raises():
    # torch.optim.SGD([st]) read st.grad as None and silently skipped every step.
    devs = tp.devices()[:4]
    params = tp.device_put_sharded([torch.full((3,), float(i)) for i in range(4)], devs)
    params.requires_grad_()
    assert params.grad is None  # no gradient anywhere yet
    opt = torch.optim.SGD([params], lr=0.1)
    tp.pmap(lambda p: (p * p).sum(), devices=devs)(params).sum().backward()
    with pytest.raises(RuntimeError, match=r"ShardedTensor.grad: the gradients are on its shards"):
        opt.step()
    torch.testing.assert_close(params.shards[1].grad, torch.full((3,), 2.0))


def test_a_replica_writing_shards_that_share_memory_raises():
    # ShardedTensor([t] * n) is accepted (reading it is fine), but a write by one replica changes
    # every replica's shard and races: it raised outside pmap only (found by a hunt).
    devs = tp.devices()[:4]
    t = torch.zeros(3)
    shared = ShardedTensor([t] * 4, devs)
    torch.testing.assert_close(tp.pmap(lambda a: a + 1, devices=devs)(shared).unshard(), torch.ones(4, 3))
    with pytest.raises(RuntimeError, match=r"wrote args\[0\] in place, but its shards share memory"):
        tp.pmap(lambda a: a.add_(1) * 1, devices=devs)(shared)
    own = ShardedTensor([torch.zeros(3) for _ in range(4)], devs)  # distinct memory: fine
    tp.pmap(lambda a: a.add_(1) * 1, devices=devs)(own)
    assert all(s.eq(1).all() for s in own.shards)


@pytest.mark.parametrize("how", ["threads", "stacked", "lockstep", "auto"])
def test_autograd_grad_with_respect_to_a_sharded_tensor(how):
    # It said "appears to not have been used" (and None with allow_unused=True): autograd
    # records the shards, or for a pmap output the stacked buffers they are rows of.
    from helpers import executor

    devs = tp.devices()[:4]
    base = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(4, 3)
    dsin = 2 * base * (base * base).cos()
    with executor(how, allow_fallback=True):
        pf = tp.pmap(lambda a: (a * a).sin(), devices=devs)
        pg = tp.pmap(lambda a: tp.psum(a.exp(), "i"), "i", devices=devs)
        for _ in range(3):  # auto: threads, then captured; the fast path
            x = tp.device_put_sharded(list(base), devs).requires_grad_()
            (g,) = torch.autograd.grad(pf(x).sum(), x)
            assert isinstance(g, ShardedTensor) and g.devices == x.devices
            torch.testing.assert_close(g.unshard(), dsin)
            y = pf(x)  # a pmap output, then an input of the next call
            gy, gx = torch.autograd.grad(pg(y).sum(), [y, x])
            want_gy = 4 * (base * base).sin().exp()
            torch.testing.assert_close(gy.unshard(), want_gy)
            torch.testing.assert_close(gx.unshard(), want_gy * dsin)
            (g,) = torch.autograd.grad(pf(x), x, grad_outputs=torch.ones(4, 3, dtype=torch.float64), create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), x)  # second order through the call
            torch.testing.assert_close(h.unshard(), 2 * (base * base).cos() - 4 * base * base * (base * base).sin())
            unused = torch.zeros(1, requires_grad=True)
            with pytest.raises(RuntimeError, match="input 1 appears to not have been used"):
                torch.autograd.grad(pf(x).sum(), [x, unused])
            assert torch.autograd.grad(pf(x).sum(), [x, unused], allow_unused=True)[1] is None
            # backward(inputs=...) accumulates into the shards, as a backward without inputs does.
            w = torch.ones(3, dtype=torch.float64, requires_grad=True)
            (pf(x) * w).sum().backward(inputs=[x])
            torch.testing.assert_close(torch.stack([s.grad for s in x.shards]), dsin)
            assert w.grad is None
            with pytest.raises(RuntimeError, match="use torch.autograd.grad"):
                pf(y).sum().backward(inputs=[y])


def test_an_op_writing_two_sharded_tensors_over_the_same_memory_updates_it_twice_or_raises():
    # _foreach_add_([a, copy.copy(a)], 1) added 1, not 2: each got a full copy of its own and
    # the second write-back overwrote the first (found by a hunt).
    devs = tp.devices()[:4]
    a = tp.device_put_sharded([torch.zeros(3) for _ in range(4)], devs)
    torch._foreach_add_([a, copy.copy(a)], 1)
    assert a.unshard().eq(2).all()
    buf = torch.zeros(4, 3)
    torch._foreach_mul_([ShardedTensor.from_stacked(buf, devs), ShardedTensor.from_stacked(buf, devs)], 3)
    torch._foreach_add_([ShardedTensor.from_stacked(buf, devs), ShardedTensor.from_stacked(buf, devs)], 1)
    assert buf.eq(2).all()
    other_views = ShardedTensor([s.view(3) for s in a.shards], devs)  # the same memory, other tensors
    with pytest.raises(RuntimeError, match="whose shards share memory"):
        torch._foreach_add_([a, other_views], 1)
    assert a.unshard().eq(2).all()  # refused before any write
    b = tp.device_put_sharded([torch.zeros(3) for _ in range(4)], devs)
    torch._foreach_add_([a, b], 1)  # distinct memory
    assert a.unshard().eq(3).all() and b.unshard().eq(1).all()


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
def test_an_op_naming_a_stacked_result_twice_gets_one_full_tensor_for_it(executor):
    # A result whose row views were never asked for was keyed by its stacked buffer, until
    # the first full copy made the row views: a second mention of it in the same op got a
    # copy of its own, a stale read or a lost write (found by a hunt).
    x = torch.arange(4.0).reshape(4, 1)
    with helpers.executor(executor):
        f = tp.pmap(lambda r: r * 1, "i", devices=tp.devices()[:4])
        for _ in range(2):  # the default runs the first call on the threads
            a = f(x)
        b, plain_a, plain_b = torch.ones(4, 1), x.clone(), torch.ones(4, 1)
        torch._foreach_add_([a, b], [b, a])  # a += b, then b += the new a
        torch._foreach_add_([plain_a, plain_b], [plain_b, plain_a])
        assert torch.equal(a.unshard(), plain_a) and torch.equal(b, plain_b)
        a = f(x)
        torch._foreach_add_([a, a], 1)
        assert torch.equal(a.unshard(), x + 2)
        a, mask = f(x), torch.tensor([[True], [False], [True], [False]])
        plain = x.clone()
        a.masked_scatter_(mask, a)
        plain.masked_scatter_(mask, plain)
        assert torch.equal(a.unshard(), plain)
    replicated = tp.device_put_replicated(torch.tensor([2.0]), tp.devices()[:4])
    torch._foreach_add_([replicated, replicated], 1)
    assert replicated.unshard().eq(4).all()


def test_numpy_arrays_of_temporary_views_are_read_only():
    # x.detach().cpu().numpy() gave a writable array over the temporary full tensor: a write
    # meant for x was lost, where x.numpy() is read-only (found by a hunt).
    x = tp.pmap(lambda r: r * 1, devices=tp.devices()[:4])(torch.zeros(4, 3))
    for array in (x.detach().cpu().numpy(), x.cpu().numpy(), np.asarray(x.detach()), x.T.numpy()):
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 5.0
    assert x.unshard().eq(0).all()
    own = np.array(x.detach())  # a copy of one's own
    own[0, 0] = 5.0
    converted = np.asarray(x.detach(), dtype=np.float64)  # a copy already: stays writable
    converted[0, 0] = 1.0


def test_memory_of_a_sharded_tensor_is_not_handed_out_as_a_temporary():
    # x.untyped_storage(), x.storage() and torch.from_dlpack(x) gave the memory of a temporary
    # full tensor: a write through them was lost without a word (found by a hunt). They raise
    # (DLPack unless a copy is asked for); a shard's own memory is still one's to write.
    x = tp.pmap(lambda r: r * 1, devices=tp.devices()[:4])(torch.zeros(4, 3))
    for get in (lambda: x.untyped_storage(), lambda: x.storage()):
        with pytest.raises(TypeError, match=r"storage\(\) of a ShardedTensor: .*x.shards\[i\].untyped_storage\(\)"):
            get()
    for export in (lambda: torch.from_dlpack(x), lambda: np.from_dlpack(x), lambda: torch.from_dlpack(x.detach())):
        with pytest.raises(BufferError, match=r"DLPack export of a .*ShardedTensor.*pass copy=True"):
            export()
    own = torch.from_dlpack(x.T, copy=True)
    torch.testing.assert_close(own, x.unshard().T)
    own.fill_(5.0)  # a copy of one's own
    torch.from_dlpack(x.shards[1]).fill_(2.0)  # a shard's memory: shared
    assert x.unshard()[1].eq(2).all() and x.unshard()[[0, 2, 3]].eq(0).all()
    assert x.shards[2].untyped_storage().nbytes() > 0


def test_torch_func_transforms_of_functions_of_a_sharded_tensor():
    # The view guard asked functorch's wrappers for their storage: grad/vmap of a function
    # closing over a ShardedTensor raised (found by a hunt), as jvp/jacfwd of one did.
    x = torch.arange(8.0).reshape(4, 2)
    st = tp.pmap(lambda r: r * 1, devices=tp.devices()[:4])(x)
    w = torch.tensor([1.0, 2.0])
    plain, sharded = (lambda v: (x * v * v).sum()), (lambda v: (st * v * v).sum())
    torch.testing.assert_close(torch.func.grad(sharded)(w), torch.func.grad(plain)(w))
    torch.testing.assert_close(torch.func.hessian(sharded)(w), torch.func.hessian(plain)(w))
    batch = torch.ones(3, 2)
    torch.testing.assert_close(torch.func.vmap(sharded)(batch), torch.func.vmap(plain)(batch))
    torch.testing.assert_close(torch.func.jacrev(lambda v: st * v)(w), torch.func.jacrev(lambda v: x * v)(w))
    tangent = torch.ones(4, 2)
    got = torch.func.jvp(lambda s: (s.sin() * 2).sum(), (st,), (tangent,))
    want = torch.func.jvp(lambda s: (s.sin() * 2).sum(), (x,), (tangent,))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.func.jacfwd(lambda s: (s * 2).sum())(st), torch.full((4, 2), 2.0))


def test_writes_through_temporary_views_raise_under_torch_func_too():
    x = tp.pmap(lambda r: r * 1, devices=tp.devices()[:2])(torch.ones(2, 3))

    def g(a):
        v = x.T  # a view of a temporary full tensor
        v.mul_(a[0])  # would be lost
        return (v * a).sum()

    for fn, arg in ((g, torch.full((3, 2), 2.0)), (torch.func.grad(g), torch.full((3, 2), 2.0))):
        with pytest.raises(TypeError, match="would write into a view of a temporary copy"):
            fn(arg)
    with pytest.raises(TypeError, match="would write into a view of a temporary copy"):
        torch.func.vmap(g)(torch.full((4, 3, 2), 2.0))
    assert x.unshard().eq(1).all()
