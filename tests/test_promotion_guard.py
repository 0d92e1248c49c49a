"""A per-replica 0-dim tensor (a loss, a norm) is a batched (n,) tensor when
the stacked executor traces, and functorch's batching rules do not all promote
it as one replica does. Where they may not, the capture stops and the call runs
on the threads with a warning naming the op (``_promotion_guard``); where they
do (an integer such as ``axis_index`` with a float tensor), it stays stacked."""

import warnings

import pytest
import torch
from helpers import devices, executor

import torchpmap as tp

CASES = {
    # a float64 scalar in torch.where with float32 tensors: batched, float64 wins
    "where": (
        lambda s, y: torch.where(y > 0, s, y),
        torch.tensor([0.5, -0.25, 0.125, 1 / 3], dtype=torch.float64),
        torch.tensor([1 / 3, -2 / 7, 3 / 11]),
        "where",
    ),
    # uint8 compared with an int32 scalar: one replica compares as uint8
    "compare": (
        lambda s, y: y < s,
        torch.tensor([-3, 2, 300, 5], dtype=torch.int32),
        torch.tensor([1, 2, 3, 250], dtype=torch.uint8),
        "lt",
    ),
    # bfloat16 over a float32 norm: one replica divides by the norm at full precision
    "bf16_over_f32_norm": (
        lambda s, y: y / s,
        torch.tensor([0.7, 1.3, 2.9, 0.11]),
        torch.randn(64, generator=torch.Generator().manual_seed(0)).bfloat16(),
        "div",
    ),
    # the same through aliases whose aten packets carry no pointwise tag
    "multiply": (
        lambda s, y: torch.multiply(y, s),
        torch.tensor([0.7, 1.3, 2.9, 0.11]),
        torch.randn(64, generator=torch.Generator().manual_seed(0)).bfloat16(),
        "multiply",
    ),
    "divide_": (
        lambda s, y: y.clone().divide_(s),
        torch.tensor([0.7, 1.3, 2.9, 0.11]),
        torch.randn(64, generator=torch.Generator().manual_seed(0)).bfloat16(),
        "divide_",
    ),
    "greater": (
        lambda s, y: torch.greater(y, s),
        torch.tensor([-3, 2, 300, 5], dtype=torch.int32),
        torch.tensor([1, 2, 3, 250], dtype=torch.uint8),
        "greater",
    ),
    # an integer 0-dim with bfloat16: one replica multiplies by 257 in float32, batching by 256
    "int_times_bf16": (
        lambda s, y: y * s,
        torch.tensor([257, 3, 1025, 2049]),
        torch.full((3,), 3.0, dtype=torch.bfloat16),
        "mul",
    ),
    # a bfloat16 loss times a Python float: batching rounds 0.1 to bfloat16 first
    "bf16_scalar_times_python_float": (
        lambda s, y: s * 0.1 + y,
        torch.tensor([1.1640625, 2.5, 7.0, 1000.0], dtype=torch.bfloat16),
        torch.zeros(3, dtype=torch.bfloat16),
        "mul",
    ),
    # a rounding division in bfloat16: batching rounds the quotient before truncating it
    "bf16_trunc_division": (
        lambda s, y: torch.div(y, s, rounding_mode="trunc"),
        torch.tensor([3.0, 7.0, 3.0, 11.0], dtype=torch.bfloat16),
        torch.tensor([-1528.0, -752.0, -608.0], dtype=torch.bfloat16),
        "div",
    ),
    # ldexp by a 0-dim exponent: batching multiplies by 2**e (0 * inf = nan)
    "ldexp": (
        lambda s, y: torch.ldexp(y, s),
        torch.tensor([200, -2000, 3, 0]),
        torch.tensor([0.0, 1.0, float("inf")]),
        "ldexp",
    ),
}

# What one replica refuses and batching would let through: the threads raise as eager does.
REFUSED = {
    "bool_sub": (lambda s, y: y - (s > 0), torch.tensor([1, -2, 3, 4]), torch.arange(3), "Subtraction"),
    "heaviside": (
        lambda s, y: torch.heaviside(y, s > 0),
        torch.tensor([1, -2, 3, 4]),
        torch.ones(3),
        "heaviside is not yet implemented for tensors with different dtypes",
    ),
    "index_fill_overflow": (
        lambda s, y: y.index_fill(0, torch.tensor([0]), s * 100),
        torch.tensor([2, 3, 4, 5]),
        torch.ones(3, dtype=torch.int8),
        "without overflow",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_one_replica_refuses_raises_on_every_executor(case):
    fn, s, y, error = REFUSED[case]
    for name in ("threads", "stacked"):
        with executor(name, allow_fallback=True), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the stacked executor's fallback
            with pytest.raises(RuntimeError, match=error):
                run(fn, s, y)


def run(fn, s, y):
    return tp.pmap(fn, "i", in_axes=(0, None), devices=devices(4))(s, y).unshard()


@pytest.mark.parametrize("case", sorted(CASES))
def test_promotion_batching_would_change_runs_on_the_threads_with_a_warning(case):
    fn, s, y, op = CASES[case]
    with executor("threads"):
        expected = run(fn, s, y)
    assert torch.equal(expected, torch.stack([fn(v, y) for v in s]))
    with executor("stacked", allow_fallback=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(fn, s, y)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(f"{op} of a per-replica 0-dim" in m and "threads executor" in m for m in messages), messages


ALIKE = {
    # a per-replica bfloat16 0-dim with a Python number, where the kernels compute as batching does
    "bf16 + 0.1": lambda s, i, y: s + 0.1,
    "bf16 - 0.1": lambda s, i, y: 0.1 - s,
    "bf16 ** 2": lambda s, i, y: s**2,
    "bf16 clamp": lambda s, i, y: s.clamp(min=0.1),
    "bf16 where": lambda s, i, y: torch.where(s > 0, s, 0.1),
    "bf16 fmod": lambda s, i, y: torch.fmod(s, 0.3),
    # an integer 0-dim with a bfloat16 tensor, outside products and quotients
    "bf16 tensor + int": lambda s, i, y: y + i,
    "bf16 tensor clamp int": lambda s, i, y: y.clamp(min=i),
    "bf16 tensor + axis_index": lambda s, i, y: y + tp.axis_index("i"),
}


@pytest.mark.parametrize("case", sorted(ALIKE))
def test_what_batching_computes_alike_stays_stacked(case):
    fn = ALIKE[case]
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(8, generator=g) * 100).bfloat16()
    i = torch.randint(-3000, 3000, (8,), generator=g)
    y = (torch.randn(5, generator=g) * 10).bfloat16()
    pf = tp.pmap(fn, "i", in_axes=(0, 0, None), devices=devices(8))
    with executor("threads"):
        expected = pf(s, i, y).unshard()
    with executor("stacked"):  # a fallback warning would fail the test
        for _ in range(2):
            got = pf(s, i, y).unshard()
            assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_an_integer_scalar_with_float_tensors_stays_stacked():
    """x + axis_index: batching casts the integer to the tensor's dtype, as one replica does."""
    f = tp.pmap(lambda x: x * tp.axis_index("i") + x.sum().long(), "i", devices=devices(4))
    x = torch.arange(12.0).reshape(4, 3)
    with executor("threads"):
        expected = f(x).unshard()
    with executor("stacked"):  # a fallback warning would fail the test
        for _ in range(2):
            assert torch.equal(f(x).unshard(), expected)


def _functions_of_one_pointwise_op():
    """(name as __torch_function__ sees it, the aten op) for every function the
    guard can see (torch.overrides' list: no global setter such as
    torch.set_printoptions, which the search would call) that runs exactly one
    pointwise aten op on two float tensors: an alias the guard must know as well
    as the op itself."""
    import inspect

    from torch.overrides import TorchFunctionMode, get_overridable_functions
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    class Name(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    found = []
    for fn in (fn for functions in get_overridable_functions().values() for fn in functions):
        name = getattr(fn, "__name__", "")
        if name.startswith("_") and not name.startswith("__") or not callable(fn) or inspect.isclass(fn):
            continue
        ops, names = Ops(), Name()
        ops.ops, names.names = [], []
        a, b = torch.rand(3) + 0.5, torch.rand(3) + 0.5
        try:
            with warnings.catch_warnings(), names, ops:
                warnings.simplefilter("ignore")
                fn(a, b)
        except Exception:
            continue
        if len(ops.ops) == 1 and torch.Tag.pointwise in ops.ops[0].tags and names.names:
            found.append((names.names[0], ops.ops[0]))
    return found


def test_every_function_of_one_pointwise_op_is_guarded():
    from torchpmap._promotion_guard import _promotes

    found = _functions_of_one_pointwise_op()
    assert len(found) > 100  # the search itself works
    missed = sorted({(name, str(op)) for name, op in found if not _promotes(name)})
    assert not missed, missed
