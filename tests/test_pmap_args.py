"""The pmap transform's argument handling: call forms, pytrees, in_axes and
out_axes, static and donated arguments, devices and axis_size, the errors for
every mistake, and the per-signature plan cache."""

import dataclasses
import functools
import math
import threading
import time
import warnings
import weakref
from collections import namedtuple
from functools import partial

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from helpers import ON_CUDA, executor, rows
from helpers import devices as _devices

import torchpmap as tp
from torchpmap import DeletedShardedTensorError, ShardedTensor

COUNTS = [1, 2, 4, 8]


def _rows(n, *rest, dtype=torch.float32):
    return rows(n, *rest, dtype=dtype, scale=0.5, offset=-3)


Point = namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Params:
    w: torch.Tensor
    b: torch.Tensor


pytree.register_dataclass(Params)


class Pair:
    """A class registered without key paths (no flatten_with_keys_fn)."""

    def __init__(self, a, b):
        self.a, self.b = a, b


pytree.register_pytree_node(Pair, lambda p: ([p.a, p.b], None), lambda c, _ctx: Pair(*c))


# -- call forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", COUNTS)
def test_maps_rows_to_replicas(n):
    _devices(n)
    x = _rows(n, 3)
    y = tp.pmap(lambda r: r.sin() * 2 + r.sum())(x)
    assert isinstance(y, ShardedTensor)
    assert y.devices == tuple(tp.local_devices()[:n])
    expected = x.sin() * 2 + x.sum(dim=1, keepdim=True)
    torch.testing.assert_close(y.unshard(), expected)
    for i in range(n):
        torch.testing.assert_close(y.shards[i], expected[i])


def test_decorator_forms():
    x = _rows(4, 3)

    @tp.pmap
    def plain(r):
        return r * 3

    @tp.pmap(axis_name="i")
    def named(r):
        return tp.psum(r, "i")

    def f(r):
        return tp.psum(r, "j") - r

    positional_name = tp.pmap(f, "j")
    keyword = tp.pmap(f, axis_name="j", in_axes=0, out_axes=0)

    assert isinstance(plain, tp.Pmapped) and plain.__name__ == "plain"
    torch.testing.assert_close(plain(x).unshard(), x * 3)
    torch.testing.assert_close(named(x).unshard(), x.sum(0).expand(4, 3))
    torch.testing.assert_close(positional_name(x).unshard(), x.sum(0) - x)
    torch.testing.assert_close(keyword(x).unshard(), x.sum(0) - x)


def test_pmap_of_a_pmap_or_of_its_wrapper_is_nested_pmap():
    # pmap copied its function's __dict__ over its own attributes: pmap(pmap(f, "j"), "i") became
    # pmap(f, "j"), summing over the outer axis with the outer options lost, silently (found by a hunt).
    inner = tp.pmap(lambda y: tp.psum(y, "j"), "j")
    with pytest.raises(NotImplementedError, match="nested pmap is not supported: pmap of a pmapped function"):
        tp.pmap(inner, "i")

    @functools.wraps(inner)
    def wrapper(y):
        return inner(y)

    wrapper.note = "kept"
    outer = tp.pmap(wrapper, "i", in_axes=1)
    assert outer._axis_name == "i" and outer._in_axes == 1 and outer.note == "kept"
    with pytest.raises(NotImplementedError, match="nested pmap is not supported"):
        outer(torch.ones(2, 2, 3))


def test_axis_name_as_first_argument_is_a_clear_error():
    with pytest.raises(TypeError, match=r"first argument must be the function.*pmap\(axis_name='i'\)"):
        tp.pmap("i")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(axis_name=3), r"axis_name must be a non-empty string or None, got 3"),
        (dict(axis_name=""), r"axis_name must be a non-empty string or None, got ''"),
        (dict(in_axes="0"), r"in_axes must be an int, None, or a tuple"),
        (dict(axis_size=0), r"axis_size must be a positive int, got 0"),
        (dict(axis_size=True), r"axis_size must be a positive int, got True"),
        (dict(devices=[]), r"devices must not be empty"),
        (dict(static_broadcasted_argnums="1"), r"static_broadcasted_argnums must be an int or a sequence of ints"),
        (dict(donate_argnums=[0.5]), r"donate_argnums must be an int or a sequence of ints"),
        # (found by a hunt: these were accepted, and out_axes raised only after the replicas ran)
        (dict(out_axes="a"), r"out_axes must be ints or None \(or a pytree of them\), got 'a'"),
        (dict(out_axes=(0, 1.5)), r"out_axes must be ints or None \(or a pytree of them\), got \(0, 1.5\)"),
        (dict(out_axes={"k": True}), r"out_axes must be ints or None"),
        (dict(static_broadcasted_argnums=1), r"static_broadcasted_argnums entry 1 is out of range.*1 positional"),
        (dict(compile=dict(mode="max-autotune", options={})), r"compile= takes mode or options, not both"),
    ],
)
def test_bad_options_are_reported_at_pmap_time(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        tp.pmap(lambda x: x, **kwargs)


def test_non_callable_is_rejected():
    with pytest.raises(TypeError, match=r"fun must be callable, got int"):
        tp.pmap(3)


# -- pytrees ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_pytree_arguments_and_results(n):
    _devices(n)
    a, b, c = _rows(n, 3), _rows(n, 2) + 10, _rows(n, 2, 2) - 7

    def f(tup, lst, dct, pt, params):
        return {
            "tuple": (tup[0] + tup[1],),
            "list": [lst[0] * 2],
            "point": Point(pt.x + 1, pt.y * pt.y),
            "params": Params(w=params.w @ params.w, b=params.b.sum()),
            "nested": dct["inner"]["deep"] - 1,
        }

    out = tp.pmap(f)((a, a), [b], {"inner": {"deep": c}}, Point(b, a), Params(w=c, b=b))
    assert isinstance(out["tuple"], tuple) and isinstance(out["list"], list)
    assert type(out["point"]) is Point and type(out["params"]) is Params
    torch.testing.assert_close(out["tuple"][0].unshard(), 2 * a)
    torch.testing.assert_close(out["list"][0].unshard(), 2 * b)
    torch.testing.assert_close(out["point"].x.unshard(), b + 1)
    torch.testing.assert_close(out["point"].y.unshard(), a * a)
    torch.testing.assert_close(out["params"].w.unshard(), c @ c)
    torch.testing.assert_close(out["params"].b.unshard(), b.sum(1))
    torch.testing.assert_close(out["nested"].unshard(), c - 1)


def test_class_registered_without_key_paths():
    x = _rows(4, 3)
    out = tp.pmap(lambda p: Pair(p.a + p.b, p.b * 2))(Pair(x, x + 1))
    assert type(out) is Pair
    torch.testing.assert_close(out.a.unshard(), 2 * x + 1)
    torch.testing.assert_close(out.b.unshard(), 2 * x + 2)
    out = tp.pmap(lambda p: p.a + p.b, in_axes=(Pair(0, None),))(Pair(x, torch.ones(3)))
    torch.testing.assert_close(out.unshard(), x + 1)
    with pytest.raises(ValueError, match=r"args\[0\]\[1\] is a rank-0 tensor"):
        tp.pmap(lambda p: p.a)(Pair(x, torch.tensor(1.0)))


def test_none_leaves_pass_through():
    x = _rows(2, 3)
    out = tp.pmap(lambda d: (d["a"] * 2, None))({"a": x, "b": None})
    assert out[1] is None
    torch.testing.assert_close(out[0].unshard(), 2 * x)
    assert tp.pmap(lambda r: None)(x) is None


# -- in_axes ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
def test_in_axes_int_and_negative(n, axis):
    _devices(n)
    shape = [3, 5, 2]
    shape[axis] = n
    x = _rows(*shape)
    y = tp.pmap(lambda r: r * 10 + 1, in_axes=axis)(x)
    assert y.shape == (n, *torch.movedim(x, axis, 0).shape[1:])
    torch.testing.assert_close(y.unshard(), torch.movedim(x, axis, 0) * 10 + 1)


@pytest.mark.threads_only
def test_in_axes_none_broadcasts():
    x, w = _rows(4, 3), torch.tensor([1.0, -2.0, 0.5])
    seen = []

    def f(r, full):
        seen.append(full)
        return r * full

    y = tp.pmap(f, in_axes=(0, None))(x, w)
    torch.testing.assert_close(y.unshard(), x * w)
    assert len(seen) == 4 and all(torch.equal(s, w) for s in seen)
    # A broadcast argument may have any size along axis 0.
    y = tp.pmap(lambda r, m: m @ r, in_axes=[0, None])(x, torch.eye(3)[:2])
    torch.testing.assert_close(y.unshard(), x[:, :2])


def test_in_axes_pytree_prefix():
    x = _rows(4, 3)
    t = _rows(3, 4)
    bias = torch.tensor([0.5, 1.5, 2.5])

    def f(d, p):
        return d["m"] + d["b"] + p.w + p.b

    # dict prefix with a None leaf; dataclass prefix with a None field; in_axes=1
    out = tp.pmap(f, in_axes=({"m": 0, "b": None}, Params(w=1, b=None)))({"m": x, "b": bias}, Params(w=t, b=bias))
    torch.testing.assert_close(out.unshard(), x + bias + t.T + bias)
    # a prefix that stops early maps a whole subtree the same way
    out = tp.pmap(lambda d: d["p"][0] * d["p"][1], in_axes=({"p": -1},))({"p": (t, t + 1)})
    torch.testing.assert_close(out.unshard(), (t * (t + 1)).T)


@pytest.mark.threads_only
def test_keyword_arguments_are_mapped_on_axis_0():
    x, k = _rows(4, 3), _rows(4, 2) * 3
    seen_shapes = []

    def f(a, *, key):
        seen_shapes.append(tuple(key["v"].shape))
        return a.sum() + key["v"]

    y = tp.pmap(f, in_axes=None, axis_size=4)(torch.ones(3), key={"v": k})
    torch.testing.assert_close(y.unshard(), 3 + k)
    assert seen_shapes == [(2,)] * 4
    with pytest.raises(ValueError, match=r"args\[0\] has 4, kwargs\['key'\]\['v'\] has 3"):
        tp.pmap(f)(x, key={"v": _rows(3, 4)})


@pytest.mark.threads_only
def test_numpy_arrays_and_python_scalars():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = tp.pmap(lambda r: r * 2)(x)
    assert isinstance(y, ShardedTensor) and y.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(y), x * 2)

    f = tp.pmap(lambda r, s, v: r * s + v, in_axes=(0, None, None))
    y = f(torch.from_numpy(x), 3, np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(np.asarray(y), x * 3 + np.array([1.0, 2.0, 3.0]))
    y = f(x, 2.5, np.float32(-1))  # numpy scalar, Python float
    np.testing.assert_allclose(np.asarray(y), x * 2.5 - 1)
    seen = []
    tp.pmap(lambda r, s: seen.append(s) or r, in_axes=(0, None))(x, 7)
    assert seen == [7] * 4 and all(type(s) is int for s in seen)


# -- out_axes -----------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, 2, -1, -3])
def test_out_axes_places_the_mapped_axis(axis):
    x = _rows(4, 3, 5)
    y = tp.pmap(lambda r: r + 1, out_axes=axis)(x)
    assert y.axis == axis % 3
    torch.testing.assert_close(y.unshard(), torch.movedim(x + 1, 0, axis))


def test_out_axes_pytree_prefix():
    x = _rows(4, 3)
    out = tp.pmap(lambda r: {"a": r, "b": (r * 2, r.sum())}, out_axes={"a": 1, "b": 0})(x)
    torch.testing.assert_close(out["a"].unshard(), x.T)
    torch.testing.assert_close(out["b"][0].unshard(), 2 * x)
    torch.testing.assert_close(out["b"][1].unshard(), x.sum(1))
    out = tp.pmap(lambda r: Params(w=r * 3, b=r.sum() * 0 + 1), out_axes=Params(w=-1, b=None))(x)
    torch.testing.assert_close(out.w.unshard(), (3 * x).T)
    assert not isinstance(out.b, ShardedTensor)
    torch.testing.assert_close(out.b, torch.tensor(1.0))


@pytest.mark.parametrize("n", [1, 2, 8])
def test_out_axes_none_returns_one_tensor(n):
    _devices(n)
    x = _rows(n, 3)
    y = tp.pmap(lambda r: tp.psum(r, "i"), "i", out_axes=None)(x)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, x.sum(0))


def test_out_axes_none_checks_replicas_agree():
    _devices(4)  # pmaps the default devices over 4 rows
    x = _rows(4, 3)
    with pytest.raises(
        ValueError, match=r"out_axes=None for output out\['b'\], but replica 1 returned a different value"
    ):
        tp.pmap(lambda r: {"a": r.sum() * 0, "b": r}, out_axes=None)(x)
    # equal values, NaNs in the same places: fine
    y = tp.pmap(lambda r: torch.tensor([float("nan"), 1.0]), out_axes=None)(x)
    assert torch.isnan(y[0]) and y[1] == 1
    # a replica that differs only in dtype or shape differs
    with pytest.raises(ValueError, match=r"replica 3 returned a different value"):
        tp.pmap(lambda r: torch.zeros(3 if tp.axis_index("i") < 3 else 2), "i", out_axes=None)(x)


def test_out_axes_none_compares_python_and_numpy_values_as_tensors():
    _devices(4)
    x = _rows(4, 3)
    assert math.isnan(tp.pmap(lambda r: float("nan"), out_axes=None)(x))  # NaN equals NaN, as in tensors
    np.testing.assert_array_equal(tp.pmap(lambda r: np.ones(2), out_axes=None)(x), np.ones(2))
    with pytest.raises(ValueError, match=r"replica 1 returned a different value"):
        tp.pmap(lambda r: np.ones(2) * float(r[0]), out_axes=None)(x)
    assert np.isnan(tp.pmap(lambda r: np.float32("nan"), out_axes=None)(x))
    assert np.isnan(tp.pmap(lambda r: complex(float("nan"), 1.0), out_axes=None)(x).real)


def test_a_read_only_array_is_read_and_a_write_into_it_raises():
    """np.asarray of a ShardedTensor is read-only: torch.from_numpy shared it
    (with PyTorch's warning), and a replica's write went into it."""
    a = np.asarray(tp.device_put_replicated(torch.zeros(3), _devices(4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        torch.testing.assert_close(tp.pmap(lambda v: v + 1)(a).unshard(), torch.ones(4, 3))
        with pytest.raises(TypeError, match=r"args\[0\], a read-only numpy array"):
            tp.pmap(lambda v: v.add_(1))(a)
        assert not a.any()
        torch.testing.assert_close(tp.shard_batch(a.reshape(-1), 2), torch.zeros(2, 6))


def test_mapped_outputs_of_different_shapes_name_the_output():
    _devices(4)  # pmaps the default devices over 4 rows
    x = _rows(4, 3)
    with pytest.raises(ValueError, match=r"cannot stack output out\['v'\] of the replicas.*shard 1 has shape"):
        tp.pmap(lambda r: {"v": r[: 1 + int(tp.axis_index("i") > 0)]}, "i")(x)


def test_mapped_output_must_be_a_tensor_or_number():
    x = _rows(2, 3)
    numbers = tp.pmap(lambda r: 1.5)(x)
    torch.testing.assert_close(numbers.unshard(), torch.tensor([1.5, 1.5]))
    with pytest.raises(TypeError, match=r"output out\[1\] is a str; mapped outputs must be tensors or numbers"):
        tp.pmap(lambda r: (r, "label"))(x)
    assert tp.pmap(lambda r: (r, "label"), out_axes=(0, None))(x)[1] == "label"


# -- static_broadcasted_argnums -----------------------------------------------------------


@pytest.mark.threads_only
def test_static_arguments_are_passed_as_python_values():
    x = _rows(4, 3)
    seen = []

    def f(r, op, scale):
        seen.append((op, scale))
        return getattr(torch, op)(r) * scale

    p = tp.pmap(f, static_broadcasted_argnums=(1, 2))
    torch.testing.assert_close(p(x, "sin", 2).unshard(), x.sin() * 2)
    torch.testing.assert_close(p(x, "cos", 3).unshard(), x.cos() * 3)  # a new value, a new result
    assert seen == [("sin", 2)] * 4 + [("cos", 3)] * 4
    assert all(type(s) is int for _, s in seen)
    neg = tp.pmap(lambda r, k: r**k, static_broadcasted_argnums=-1)
    torch.testing.assert_close(neg(x, 3).unshard(), x**3)


def test_static_arguments_are_part_of_the_plan_cache_key():
    x = _rows(4, 3)
    p = tp.pmap(lambda r, k: r * k, static_broadcasted_argnums=1)
    for _ in range(5):
        p(x, 2)
    assert len(p._in_plans) == 1
    p(x, 3)
    assert len(p._in_plans) == 2
    torch.testing.assert_close(p(x, 5).unshard(), x * 5)
    # in_axes given for every positional argument, the static one included
    q = tp.pmap(lambda k, r: r + k, in_axes=(None, 1), static_broadcasted_argnums=0)
    torch.testing.assert_close(q(4, x.T).unshard(), x + 4)


@pytest.mark.parametrize("value, name", [([1, 2], "list"), ({"a": 1}, "dict"), (torch.ones(2).numpy(), "ndarray")])
def test_non_hashable_static_argument(value, name):
    with pytest.raises(ValueError, match=rf"static_broadcasted_argnums argument 1 must be hashable, got {name}"):
        tp.pmap(lambda r, s: r, static_broadcasted_argnums=1)(_rows(2, 3), value)


def test_static_argnum_out_of_range():
    with pytest.raises(ValueError, match=r"static_broadcasted_argnums entry 2 is out of range.*2 positional"):
        tp.pmap(lambda r, s: r, static_broadcasted_argnums=2)
    tp.pmap(lambda r, *s: r, static_broadcasted_argnums=(1, 2))(_rows(2, 3), 1, 2)  # *args: any position


def test_argument_numbers_are_checked_against_a_wrappers_own_signature():
    # inspect.signature followed __wrapped__ to the inner function, which takes fewer (found by a review).
    def inner(r, scale):
        return r * scale

    @functools.wraps(inner)
    def wrapper(r, scale, bias):
        return inner(r, scale) + bias

    x = _rows(2, 3)
    torch.testing.assert_close(tp.pmap(wrapper, static_broadcasted_argnums=(1, 2))(x, 2.0, 1.0).unshard(), x * 2 + 1)


def test_only_a_compiled_function_gets_the_compile_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tp.pmap(torch.compiler.disable(lambda r: r * 2))  # carries Dynamo's attribute too (found by a review)


def test_a_static_tensor_is_refused():
    # A tensor hashes by identity: every new one was another cache entry and capture (JAX
    # refuses arrays there; found by a hunt).
    with pytest.raises(ValueError, match=r"argnums argument 1 is a tensor, which hashes by identity"):
        tp.pmap(lambda r, s: r * s, static_broadcasted_argnums=1)(_rows(2, 3), torch.tensor(2.0))


def test_donate_argnum_out_of_the_signature_is_refused_by_pmap():
    with pytest.raises(ValueError, match=r"donate_argnums entry 2 is out of range.*takes 2 positional"):
        tp.pmap(lambda r, s: r, donate_argnums=2)
    with pytest.raises(ValueError, match=r"donate_argnums entry -3 is out of range"):
        tp.pmap(lambda r, s: r, donate_argnums=-3)
    # An optional parameter not passed donates nothing; *args takes any number.
    pf = tp.pmap(lambda r, s=None: r * 1, donate_argnums=1)
    torch.testing.assert_close(pf(_rows(2, 3)).unshard(), _rows(2, 3))
    tp.pmap(lambda *a: a[0] * 1, donate_argnums=5)(_rows(2, 3))


# -- devices and axis_size --------------------------------------------------------------------


@pytest.mark.parametrize("order", [[3, 1, 0, 2], [7, 5], [6]])
def test_devices_select_and_order(order):
    local = _devices(max(order) + 1)
    chosen = [local[i] for i in order]
    ran_on = {}

    def f(r):
        ran_on[int(tp.axis_index("i"))] = threading.current_thread().name
        return r * 0 + tp.axis_index("i")

    y = tp.pmap(f, "i", devices=chosen)(_rows(len(order), 2))
    assert y.devices == tuple(chosen)
    torch.testing.assert_close(y.unshard(), torch.arange(len(order)).unsqueeze(1).expand(-1, 2).float())
    # replica i ran on the worker of devices[i]
    assert ran_on == {i: f"torchpmap-worker-{d.type}:{d.index}" for i, d in enumerate(chosen)}
    if chosen[0].type == "cuda":
        assert [s.device for s in y.shards] == chosen


def test_devices_accepts_strings_and_checks_the_count():
    devs = _devices(2)
    names = [str(d) for d in reversed(devs)]  # e.g. ["cpu:1", "cpu:0"]
    y = tp.pmap(lambda r: r + 1, devices=names)(_rows(2, 2))
    assert y.devices == (devs[1], devs[0])
    torch.testing.assert_close(y.unshard(), _rows(2, 2) + 1)
    with pytest.raises(ValueError, match=r"mapped axis has size 3 but devices= lists 2 devices"):
        tp.pmap(lambda r: r, devices=devs)(_rows(3, 2))
    # A device listed twice runs two replicas (more replicas than devices).
    y = tp.pmap(lambda r: r + 1, devices=[devs[0]] * 2)(_rows(2, 2))
    assert y.devices == (devs[0], devs[0])
    torch.testing.assert_close(y.unshard(), _rows(2, 2) + 1)


def test_axis_size():
    x = _rows(4, 3)
    torch.testing.assert_close(tp.pmap(lambda r: r * 2, axis_size=4)(x).unshard(), x * 2)
    with pytest.raises(ValueError, match=r"axis_size=2 but args\[0\] has size 4 along its mapped axis"):
        tp.pmap(lambda r: r, axis_size=2)(x)
    # no mapped argument: axis_size gives the number of replicas
    y = tp.pmap(lambda w: w * tp.axis_index("i"), "i", in_axes=None, axis_size=3)(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(y.unshard(), torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]))


# -- donate_argnums ------------------------------------------------------------------------


def test_donated_sharded_tensor_is_deleted():
    x = _rows(4, 3)
    st = tp.pmap(lambda r: r * 2)(x)
    keep = tp.pmap(lambda r: r * 2)(x)
    out = tp.pmap(lambda a, b: a + b, donate_argnums=0)(st, keep)
    torch.testing.assert_close(out.unshard(), x * 4)
    assert st.is_deleted and not keep.is_deleted
    assert "deleted" in repr(st)
    match = r"donated to a pmap call \(donate_argnums\)"
    for use in (
        lambda: st.shards,
        lambda: st.unshard(),
        lambda: st + 1,
        lambda: np.asarray(st),
        lambda: st.shape,
        lambda: len(st),
        lambda: st[0],
        lambda: torch.add(st, 1),
        lambda: tp.pmap(lambda r: r)(st),
    ):
        with pytest.raises(DeletedShardedTensorError, match=match):
            use()


@pytest.mark.threads_only  # the stacked executors run the function once, on the stacked buffer
def test_a_donated_shard_is_freed_when_its_replica_returns_not_when_the_call_does():
    # Replica 0 returns at once; replica 1 waits until replica 0's donated shard is gone. Python
    # keeps a function's arguments until it returns: nothing of torchpmap's may hold them longer.
    x = tp.device_put_sharded([torch.ones(3), torch.ones(3)], _devices(2))
    first = weakref.ref(x.shards[0])
    freed = []

    def f(a):
        if tp.axis_index("i") == 1:
            deadline = time.monotonic() + 5.0
            while first() is not None and time.monotonic() < deadline:
                time.sleep(0.005)
            freed.append(first() is None)
        return a.sum()

    tp.pmap(f, "i", donate_argnums=0)(x)
    assert freed == [True] and x.is_deleted


def test_donating_a_plain_tensor_leaves_it_usable():
    x = _rows(2, 3)
    out = tp.pmap(lambda r: r + 1, donate_argnums=(0,))(x)
    torch.testing.assert_close(out.unshard(), x + 1)
    torch.testing.assert_close(x, _rows(2, 3))


def test_donated_pytree_argument_and_in_place_update():
    x = _rows(4, 3)
    state = {"w": tp.device_put_replicated(torch.zeros(3), _devices(4))}

    def step(s, r):
        s["w"].add_(r)  # donated: the function may update it in place
        return s

    old = state["w"]
    new = tp.pmap(step, donate_argnums=0)(state, x)
    assert old.is_deleted
    torch.testing.assert_close(new["w"].unshard(), x)


def test_static_and_donated_at_once_is_an_error():
    _devices(2)  # maps 2 replicas on the default devices
    with pytest.raises(ValueError, match=r"cannot be both static and donated"):
        tp.pmap(lambda r, s: r, static_broadcasted_argnums=1, donate_argnums=1)(_rows(2, 3), 1)


# -- errors name the argument and its path, before anything runs ----------------------------


def _never_runs():
    calls = []

    def f(*args, **kwargs):
        calls.append(1)
        return args[0] if args else 0

    return f, calls


@pytest.mark.parametrize(
    "make_call, error, match",
    [
        # mismatched mapped sizes
        (
            lambda f: tp.pmap(f)({"w": _rows(4, 2)}, _rows(3)),
            ValueError,
            r"different sizes along their mapped axes \(args\[0\]\['w'\] has 4, args\[1\] has 3\)",
        ),
        (
            lambda f: tp.pmap(f, in_axes=(1, 0))(_rows(2, 5), _rows(4)),
            ValueError,
            r"args\[0\]: axis 1 of shape \(2, 5\) has size 5",
        ),
        # rank-0 input with a mapped axis
        (
            lambda f: tp.pmap(f)(_rows(2), {"s": torch.tensor(1.0)}),
            ValueError,
            r"args\[1\]\['s'\] is a rank-0 tensor but in_axes=0 maps it",
        ),
        # a Python scalar cannot be mapped
        (lambda f: tp.pmap(f)(_rows(2), 3.0), ValueError, r"cannot map over args\[1\], a float"),
        # in_axes not a prefix of the arguments
        (
            lambda f: tp.pmap(f, in_axes=({"a": 0},))((_rows(2),)),
            ValueError,
            r"in_axes\[0\] must be a pytree prefix of args\[0\], but in_axes\[0\] is a dict with keys \['a'\] "
            r"while args\[0\] is a tuple",
        ),
        (
            lambda f: tp.pmap(f, in_axes=(0, {"a": {"b": 0}}))(_rows(2), {"a": {"c": _rows(2)}}),
            ValueError,
            r"in_axes\[1\]\['a'\] is a dict with keys \['b'\] while args\[1\]\['a'\] is a dict with keys \['c'\]",
        ),
        (
            lambda f: tp.pmap(f, in_axes=((0, None, 0),))((_rows(2), _rows(2))),
            ValueError,
            r"in_axes\[0\] is a tuple of length 3 while args\[0\] is a tuple of length 2",
        ),
        (
            lambda f: tp.pmap(f, in_axes=(0,))(_rows(2), _rows(2)),
            ValueError,
            r"in_axes has 1 entries but .* was called with 2 positional argument",
        ),
        (
            lambda f: tp.pmap(f, in_axes=({"a": "x"},))({"a": _rows(2)}),
            TypeError,
            r"in_axes\[0\] must be ints or None .* got 'x' at in_axes\[0\]\['a'\]",
        ),
        # no mapped argument at all
        (
            lambda f: tp.pmap(f, in_axes=None)(_rows(2)),
            ValueError,
            r"called with no mapped argument, so the axis size is unknown.*axis_size",
        ),
        (lambda f: tp.pmap(f)(), ValueError, r"no mapped argument"),
        # out-of-range in_axes
        (
            lambda f: tp.pmap(f, in_axes=2)(_rows(2, 3)),
            ValueError,
            r"in_axes=2 is out of range for args\[0\], which has 2 dimension\(s\) \(shape \(2, 3\)\)",
        ),
        (
            lambda f: tp.pmap(f, in_axes=(0, -3))(_rows(2), _rows(2, 3)),
            ValueError,
            r"in_axes=-3 is out of range for args\[1\]",
        ),
        # more replicas than devices
        (lambda f: tp.pmap(f)(_rows(tp.local_device_count() + 1)), ValueError, r"only \d+ local devices are available"),
    ],
)
def test_mistakes_are_reported_before_anything_runs(make_call, error, match):
    f, calls = _never_runs()
    with pytest.raises(error, match=match):
        make_call(f)
    assert calls == []


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: torch.eye(4).to_sparse(), "a sparse_coo tensor"),
        (lambda: torch.eye(4).to_sparse_csr(), "a sparse_csr tensor"),
        (lambda: torch.nested.nested_tensor([torch.ones(k + 1) for k in range(4)]), "a nested tensor"),
        (lambda: torch.ones(4, 4, device="meta"), "a meta tensor"),
    ],
)
def test_a_mapped_tensor_without_slices_is_refused_naming_it(make, kind):
    # A sparse COO input ran once on the threads and then failed inside the stacked executor
    # ("copy_() between dense and sparse"); CSR, nested and meta ones failed deep inside the call
    # (found by a hunt). Checked on every call: a dense call first makes the plan they share.
    f = tp.pmap(lambda v, w: w * 2, devices=_devices(4))
    for _ in range(3):
        f(torch.zeros(4, 4), torch.ones(4, 4))
    for x in (make(), {"a": make()}):
        start = time.monotonic()
        with pytest.raises(ValueError, match=rf"cannot map over args\[1\](\['a'\])?, {kind}: a mapped argument must"):
            f(torch.zeros(4, 4), x)
        assert time.monotonic() - start < 1
    sparse = torch.eye(4).to_sparse()  # broadcast as it is: fine
    g = tp.pmap(lambda v, w: w * v.to_dense()[0], in_axes=(None, 0), devices=_devices(4))
    torch.testing.assert_close(g(sparse, torch.ones(4, 4)).unshard(), torch.eye(4)[0].expand(4, 4))


@pytest.mark.skipif(ON_CUDA, reason="the hint is for virtual CPU devices")
def test_too_many_replicas_hint_names_the_env_var():
    n = tp.local_device_count() + 1
    with pytest.raises(
        ValueError, match=rf"Set TORCHPMAP_CPU_DEVICES={n} \(or call torchpmap.set_cpu_device_count\({n}\)"
    ):
        tp.pmap(lambda r: r)(_rows(n))


@pytest.mark.parametrize(
    "out_axes, out, match",
    [
        (2, lambda r: r, r"out_axes=2 is out of range for output out, which gets 2 dimension\(s\)"),
        (-3, lambda r: {"k": r}, r"out_axes=-3 is out of range for output out\['k'\]"),
        (
            (0, 0, 0),
            lambda r: (r, r),
            r"out_axes must be a pytree prefix of out, but out_axes is a tuple of length 3 "
            r"while out is a tuple of length 2",
        ),
        ({"b": 0}, lambda r: {"a": r}, r"out_axes is a dict with keys \['b'\] while out is a dict with keys \['a'\]"),
    ],
)
def test_bad_out_axes(out_axes, out, match):
    _devices(2)  # maps 2 replicas on the default devices
    with pytest.raises(ValueError, match=match):
        tp.pmap(out, out_axes=out_axes)(_rows(2, 3))


# -- the plan cache ----------------------------------------------------------------------------


def test_plan_cache_is_per_call_signature():
    p = tp.pmap(lambda a, b=None: a * 2 if b is None else a + b)
    x = _rows(4, 3)
    for _ in range(20):
        p(x)
    assert len(p._in_plans) == 1
    p(_rows(4, 5))  # same structure and ranks: same plan
    p(_rows(4, 5).double())
    assert len(p._in_plans) == 1
    p(_rows(4, 3, 2))  # another rank
    assert len(p._in_plans) == 2
    p(x, b=x)  # another structure
    assert len(p._in_plans) == 3
    p(x, b=x + 1)
    assert len(p._in_plans) == 3
    torch.testing.assert_close(p(x, b=x).unshard(), 2 * x)
    # outputs: one plan per output structure and replica's rank (rank 2 and rank 3 outputs,
    # rank 1 and 2 in a replica); the threads' TreeSpec and the stacked executor's _fast_tree
    # key for one structure each make their own
    assert {ranks for _, ranks in p._out_plans._plans} == {(1,), (2,)}


def test_plan_cache_keeps_the_most_recently_used_plans():
    """A static argument that changes every call (a step count) makes a new plan each time:
    the cache keeps the most recently used ones, not every plan for ever."""
    p = tp.pmap(lambda x, k: x * k, static_broadcasted_argnums=1)
    p._in_plans._limit = 3
    x = _rows(2, 3)
    p(x, 0)  # used again below: stays
    for k in range(1, 10):
        p(x, k)
        torch.testing.assert_close(p(x, 0).unshard(), x * 0)
        assert len(p._in_plans) <= 3
    assert len(p._in_plans) == 3
    assert sorted(key[1][0] for key in p._in_plans._plans) == [(int, 0), (int, 8), (int, 9)]
    torch.testing.assert_close(p(x, 1).unshard(), x)  # an evicted signature is planned again


# -- shared inputs written in place --------------------------------------------------------


def _host(n):
    """n virtual CPU devices, whose replicas share host memory with the caller
    (allowed beside GPUs too, so these tests mean the same on a GPU machine)."""
    if tp.local_devices()[0].type == "cpu":
        return _devices(n)  # skips with fewer
    return [torch.device("cpu", i) for i in range(n)]


def test_replica_writing_a_broadcast_input_in_place_raises():
    w = torch.zeros(3)

    def f(x, w):
        w.add_(x)  # every replica shares w: the writes race
        return x

    with pytest.raises(RuntimeError, match=r"args\[1\].*in place.*shared by every replica.*clone"):
        tp.pmap(f, in_axes=(0, None), devices=_host(4))(_rows(4, 3), w)


def test_a_prefix_of_another_container_type_says_so():
    message = r"out_axes is a list of length 2 while out is a tuple of length 2 \(containers"
    with pytest.raises(ValueError, match=message):
        tp.pmap(lambda x: (x, x), out_axes=[0, 1], devices=_host(2))(_rows(2, 3))


def test_a_write_through_a_mapped_view_of_a_broadcast_input_names_both():
    # x mapped and x whole: a replica's write into its row is a write into the shared whole.
    x = _rows(4, 3)
    f = tp.pmap(lambda a, b: (a.mul_(2), b + 0)[1], in_axes=(0, None), devices=_host(4))
    with pytest.raises(RuntimeError, match=r"wrote args\[1\] \(or args\[0\], which shares its memory\) in place"):
        f(x, x)


def test_batch_norm_updating_broadcast_running_statistics_raises():
    """aten's batch_norm updates its running statistics without counting a version: the
    replicas' updates of statistics they share are found all the same."""
    x = _rows(2, 4, 3)

    def f(a, mean, var):
        return torch.nn.functional.batch_norm(a, mean, var, training=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a captured executor falls back to the threads
        with pytest.raises(RuntimeError, match=r"args\[1\] in place.*shared by every replica"):
            tp.pmap(f, in_axes=(0, None, None), devices=_host(2))(x, torch.zeros(3), torch.ones(3))
        mean, var = torch.zeros(2, 3), torch.ones(2, 3)  # each replica its own: fine
        tp.pmap(f, devices=_host(2))(x, mean, var)
    for r in range(2):
        want_mean, want_var = torch.zeros(3), torch.ones(3)
        f(x[r], want_mean, want_var)
        assert torch.equal(mean[r], want_mean) and torch.equal(var[r], want_var)


def test_replica_writing_an_expanded_mapped_input_raises():
    x = torch.zeros(1, 3).expand(4, 3)  # every row is the same memory

    def f(r):
        r.add_(1)
        return r

    with pytest.raises(RuntimeError, match=r"args\[0\].*in place.*same memory"):
        tp.pmap(f, devices=_host(4))(x)


@pytest.mark.timing
def test_a_write_into_another_replicas_slice_of_another_argument_raises():
    # x[:4] and x[1:]: replica i's a is replica i-1's b. Writing a raced with the reads of b
    # (7-8 results in 40 calls on the threads, found by a hunt); every executor raises now.
    def f(a, b):
        a.add_(1)
        return a + b

    message = r"wrote args\[0\] or args\[1\] in place.*slice of args\[0\] is the same memory as another"
    for name in ("threads", "stacked", "lockstep"):
        with executor(name, allow_fallback=True):
            x = _rows(5, 3)
            start = time.monotonic()
            with pytest.raises(RuntimeError, match=message):
                tp.pmap(f, devices=_host(4))(x[:4], x[1:])
            assert time.monotonic() - start < 5


def test_a_write_among_views_some_of_which_overlap_names_every_view():
    # Views of one tensor share a version counter: which one a replica wrote cannot be told,
    # so the error names them all rather than blaming one (here only c was written).
    buf = _rows(9, 3).clone()
    f = tp.pmap(lambda a, b, c: a + b + c.add_(1), devices=_host(4))
    with pytest.raises(RuntimeError, match=r"wrote args\[0\] or args\[1\] or args\[2\] in place"):
        f(buf[:4], buf[1:5], buf[5:9])


def test_overlapping_arguments_the_replicas_only_read_or_write_alike_are_fine():
    x = _rows(5, 3)
    stencil = tp.pmap(lambda a, b: b - a, devices=_host(4))(x[:4], x[1:])  # reads only
    torch.testing.assert_close(stencil.unshard(), x[1:] - x[:4])
    y = _rows(4, 3).clone()
    twice = tp.pmap(lambda a, b: a.add_(1) + b, devices=_host(4))(y, y)  # each replica its own row, twice
    torch.testing.assert_close(twice.unshard(), (_rows(4, 3) + 1) * 2)


def test_replica_writing_a_sharded_tensor_mapped_along_another_axis_raises():
    """The call maps a copy of it: the write would be lost, while a plain tensor's lands."""
    ds = _devices(2)
    x = tp.device_put_sharded(list(_rows(2, 2).unbind(0)), ds)  # mapped along axis 0
    add_one = tp.pmap(lambda v: v.add_(1), in_axes=1, devices=ds)
    with pytest.raises(TypeError, match=r"args\[0\], a ShardedTensor mapped along another axis.*would be lost"):
        add_one(x)
    assert torch.equal(x.unshard(), _rows(2, 2))
    reads = tp.pmap(lambda v: v * 2, in_axes=1, devices=ds)(x)  # reading it is fine
    torch.testing.assert_close(reads.unshard(), _rows(2, 2).T * 2)


def test_reading_shared_inputs_and_writing_own_slices_is_fine():
    w = torch.ones(3)
    x = _rows(4, 3).clone()

    def f(r, w):
        r.mul_(2)  # each replica's own slice of x
        return r + w

    out = tp.pmap(f, in_axes=(0, None), devices=_host(4))(x, w)
    torch.testing.assert_close(out.unshard(), _rows(4, 3) * 2 + 1)
    torch.testing.assert_close(x, _rows(4, 3) * 2)


def test_shared_write_is_found_in_pytrees_views_and_numpy_arrays():
    def write_view(x, p):
        p["w"][0] = 1.0  # through a view of the shared tensor
        return x

    write = tp.pmap(write_view, in_axes=(0, None), devices=_host(2))

    with pytest.raises(RuntimeError, match=r"args\[1\]\['w'\].*in place.*shared by every replica"):
        write(_rows(2, 3), {"w": torch.zeros(3)})
    with pytest.raises(RuntimeError, match=r"args\[1\]\['w'\].*in place.*shared by every replica"):
        write(_rows(2, 3), {"w": np.zeros(3)})  # from_numpy shares it too
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"args\[1\]\['w'\].*shared by every replica"):
        write(_rows(2, 3), {"w": torch.zeros(3)})


@pytest.mark.parametrize(
    "make, axis",
    [
        (lambda: _rows(3, 4).t(), 0),  # transposed
        (lambda: _rows(4, 6)[:, :3], 0),  # columns of a wider tensor
        (lambda: _rows(4, 3), 1),  # interleaved columns
        (lambda: _rows(4, 1).expand(4, 3), 0),  # broadcast inside each slice, distinct rows
    ],
)
def test_writing_own_slices_of_strided_layouts_is_fine(make, axis):
    x = make()
    before = x.clone()

    def f(r):
        r[0] += 1  # own slice only
        return r

    tp.pmap(f, in_axes=axis, devices=_host(x.shape[axis]))(x)
    assert torch.equal(x.select(1 - axis, 0), before.select(1 - axis, 0) + 1)


def test_inference_tensors_are_not_watched():
    with torch.inference_mode():
        w = torch.ones(3)
        out = tp.pmap(lambda r, w: r + w, in_axes=(0, None), devices=_host(2))(_rows(2, 3), w)
    torch.testing.assert_close(out.unshard(), _rows(2, 3) + 1)


@pytest.mark.threads_only
def test_zero_dim_numpy_broadcast_keeps_its_shape():
    seen = []

    def f(x, s):
        seen.append(tuple(s.shape))
        return x * s

    out = tp.pmap(f, in_axes=(0, None))(_rows(2, 3), np.array(2.0))
    assert seen == [(), ()]
    torch.testing.assert_close(out.unshard(), _rows(2, 3) * 2)  # a 0-d tensor does not promote x


class _Model:
    def __init__(self, scale):
        self.scale = scale

    @tp.pmap
    def forward(self, x):
        return x * self.scale

    @partial(tp.pmap, static_broadcasted_argnums=(0,))
    def forward_static(self, x):
        return x * self.scale

    @partial(tp.pmap, in_axes=(None, 0))
    def forward_broadcast(self, x):
        return x * self.scale

    def __hash__(self):
        return hash(self.scale)

    def __eq__(self, other):
        return isinstance(other, _Model) and other.scale == self.scale


def test_pmap_on_a_method_binds_self():
    m = _Model(3.0)
    x = _rows(2, 3)
    torch.testing.assert_close(m.forward_static(x).unshard(), x * 3)
    torch.testing.assert_close(m.forward_broadcast(x).unshard(), x * 3)
    assert _Model.forward_static(m, x).shape == (2, 3)  # through the class, self explicit
    with pytest.raises(ValueError, match=r"cannot map over args\[0\], a _Model.*static_broadcasted_argnums"):
        m.forward(x)  # self mapped on axis 0 like any argument, as in JAX


# -- devices are validated ---------------------------------------------------------------


@pytest.mark.parametrize(
    "devices, match",
    [
        (["cpu:99", "cpu:0"], r"devices\[0\] is cpu:99, which is not one of this process's devices"),
        (["meta", "cpu:0"], r"devices\[0\] is meta"),
        (["cuda:0", "cpu:1"] if not torch.cuda.is_available() else ["cuda:99", "cuda:0"], r"devices\[0\] is cuda"),
    ],
)
def test_devices_must_be_this_processes_devices(devices, match):
    # A device of a kind pmap cannot use fails at decoration; one that is not among
    # this process's devices at the first call (the list may change until then:
    # set_cpu_device_count, torchpmap.distributed.initialize).
    with pytest.raises(ValueError, match=match):
        tp.pmap(lambda r: r, devices=devices)(torch.zeros(2, 1))
    with pytest.raises(ValueError, match=match.replace("devices", "device_put_sharded: devices", 1)):
        tp.device_put_sharded([torch.zeros(1)] * 2, devices)


def test_device_kinds_fail_at_decoration_and_membership_at_the_first_call():
    for bad in (["meta"], ["cuda:99"], ["cuda"] if torch.cuda.is_available() else ["cuda:0"], ["nonsense"]):
        with pytest.raises(ValueError, match=r"pmap: devices\[0\] is"):
            tp.pmap(lambda r: r, devices=bad)  # no call needed
    # Decorating with a device the list may still gain (set_cpu_device_count,
    # distributed.initialize) is fine; the first call checks it.
    late = tp.pmap(lambda r: r, devices=["cpu:99"])
    with pytest.raises(ValueError, match=r"devices\[0\] is cpu:99, which is not one of this process's devices"):
        late(torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"device_put_replicated: devices\[1\] is meta"):
        tp.device_put_replicated(torch.zeros(1), ["cpu:0", "meta"])
    with pytest.raises(ValueError, match=r"replicate: devices\[0\] is cpu:99"):
        tp.replicate(torch.nn.Linear(1, 1), devices=["cpu:99"])


def test_cpu_and_cpu_0_are_the_same_device():
    _devices(2)  # maps 2 replicas on the default devices
    if ON_CUDA:
        pytest.skip("virtual CPU devices")
    twice = tp.pmap(lambda r: r + 1, devices=["cpu", "cpu:0"])(torch.zeros(2, 1))  # one device, two replicas
    assert twice.devices == (torch.device("cpu", 0),) * 2
    out = tp.pmap(lambda r: r + 1, devices=["cpu", "cpu:1"])(torch.zeros(2, 1))
    assert out.devices == (torch.device("cpu", 0), torch.device("cpu", 1))


def test_a_batch_that_is_a_multiple_of_the_devices_points_to_shard_batch():
    n = tp.local_device_count()
    with pytest.raises(ValueError, match=rf"axis has size {32 * n}.*shard_batch"):
        tp.pmap(lambda r: r)(torch.zeros(32 * n, 2))


# -- function transforms from outside ------------------------------------------------------


def test_torch_func_grad_of_a_pmap_call_is_a_clear_error():
    f = tp.pmap(lambda x: x.sin(), out_axes=None, in_axes=None)
    with pytest.raises(RuntimeError, match=r"torch\.func.*pmap.*torch\.autograd"):
        torch.func.grad(lambda x: f(x).sum())(torch.ones(3))
    with pytest.raises(RuntimeError, match=r"torch\.func.*pmap"):
        torch.vmap(tp.pmap(lambda x: x * 2))(torch.ones(3, 2, 1))


# -- donation ------------------------------------------------------------------------------


def test_donated_input_survives_a_call_that_fails_before_the_replicas_start():
    st = tp.device_put_replicated(torch.ones(3), _devices(4))
    f = tp.pmap(lambda a, b: a + b, donate_argnums=0)
    with pytest.raises(ValueError, match="different sizes"):
        f(st, torch.ones(2, 3))  # the sizes disagree: nothing ran
    assert not st.is_deleted
    torch.testing.assert_close(f(st, torch.ones(4, 3)).unshard(), torch.full((4, 3), 2.0))
    assert st.is_deleted  # the call ran: donated


def test_donated_input_survives_a_pmap_that_cannot_start():
    st = tp.device_put_replicated(torch.ones(3), tp.local_devices()[:2])
    inner = tp.pmap(lambda a: a + 1, donate_argnums=0)
    errors = []

    def outer(r):
        try:
            inner(st)  # nested pmap: refused before any replica starts
        except NotImplementedError as e:
            errors.append(e)
        return r

    tp.pmap(outer)(torch.zeros(1, 1))
    assert errors and not st.is_deleted


def test_donated_input_is_deleted_when_a_replica_fails():
    st = tp.device_put_replicated(torch.ones(3), tp.local_devices()[:2])

    def f(a):
        a.add_(1)  # donated: may be written before the failure
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        tp.pmap(f, donate_argnums=0)(st)
    assert st.is_deleted


def test_a_sharded_tensor_being_donated_cannot_be_donated_by_another_threads_call(monkeypatch):
    # Both calls passed the "not deleted" check before either deleted it (at its replicas'
    # start), and both ran on one buffer, each seeing the other's write (found by a hunt).
    # The first call is held between its check and its replicas' start.
    from torchpmap import _pmap

    inside, go = threading.Event(), threading.Event()
    place = _pmap.Pmapped._place
    holder = []

    def held_place(self, *args):
        if not holder:
            holder.append(threading.get_ident())
        if threading.get_ident() == holder[0]:
            inside.set()
            go.wait(10)
        return place(self, *args)

    monkeypatch.setattr(_pmap.Pmapped, "_place", held_place)
    p = tp.pmap(lambda x: x.add_(1), "i", donate_argnums=0, devices=tp.devices()[:2])
    x = tp.device_put_sharded([torch.zeros(3), torch.zeros(3)], tp.devices()[:2])
    first = []
    call = threading.Thread(target=lambda: first.append(p(x)))
    call.start()
    assert inside.wait(10)
    start = time.monotonic()
    try:
        with pytest.raises(tp.DeletedShardedTensorError, match="being donated to another pmap call"):
            p(x)
        assert time.monotonic() - start < 5
    finally:
        go.set()
        call.join()
    assert torch.equal(first[0].unshard(), torch.ones(2, 3))


@pytest.mark.skipif(ON_CUDA, reason="an int names a GPU there")
def test_device_and_array_mistakes_name_the_argument():
    # Each gave PyTorch's message alone (an accelerator error, an overload list, numpy's dtype
    # list) (found by a hunt).
    with pytest.raises(ValueError, match=r"pmap: devices\[0\] is 0, a GPU's index, but PyTorch sees no GPU here"):
        tp.pmap(lambda v: v, devices=[0, 1])
    with pytest.raises(ValueError, match=r"pmap: devices\[1\] is None, which is not a device \(a torch.device"):
        tp.pmap(lambda v: v, devices=["cpu:0", None])
    with pytest.raises(TypeError, match=r"pmap: args\[0\]\['a'\] is a numpy array of dtype object"):
        tp.pmap(lambda t: t)({"a": np.array([object()] * 2)})
    y = tp.pmap(lambda v: v * 2, devices=_devices(2))(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"unshard: device is 3, a GPU's index"):
        y.unshard(3)
    with pytest.raises(ValueError, match=r"unshard: device is 'bogus', which is not a device"):
        y.unshard("bogus")
    with pytest.raises(ValueError, match=r"pmap: devices\[0\] is 0, a GPU's index"):  # numpy ints read as ints
        tp.pmap(lambda v: v, devices=list(np.arange(2)))
    # Any CPU device is the host (a multi-process job numbers the virtual ones globally).
    for host in ("cpu", "cpu:99", torch.device("cpu", 1)):
        torch.testing.assert_close(y.unshard(host), torch.full((2, 3), 2.0))
