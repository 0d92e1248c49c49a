"""Value checks of eager kernels that a captured graph keeps (``_value_checks``).

The threads executor raises for a one_hot label out of range and an embedding
index out of the table. Traced, one_hot gave an all-zero row (stacked and
lockstep) and an embedding into per-replica tables read another replica's row
(stacked): silent wrong results. Now the captured executors raise too, and in
range they still run captured, with the threads executor's bits."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_bits, devices, executor, expect_error

import torchpmap as tp

CAPTURED = ["stacked", "lockstep"]


def run(name, f, *args, allow_fallback=False):
    with executor(name, allow_fallback=allow_fallback):
        return tp.pmap(f, "i", devices=devices(4))(*args)


def raises(name, f, *args):
    # The stacked executor reruns a call whose batched graph raised on the threads (with a warning).
    err, _ = expect_error(lambda: run(name, f, *args, allow_fallback=True), kind=Exception)
    return err


def tables():
    return tp.device_put_sharded(list(torch.arange(60.0).reshape(4, 5, 3)), devices(4))  # one per replica


@pytest.mark.parametrize("name", CAPTURED)
def test_one_hot_in_range_runs_captured_with_the_threads_bits(name):
    labels = torch.tensor([[0, 4, 2], [1, 1, 3], [4, 0, 0], [2, 3, 1]])
    f = lambda y: F.one_hot(y, 5) * 2 + y.unsqueeze(-1)  # noqa: E731
    want = run("threads", f, labels)
    for _ in range(2):  # the auto executor captures from the second call
        assert_same_bits(run(name, f, labels), want)


@pytest.mark.parametrize("name", CAPTURED)
@pytest.mark.parametrize("label", [5, -1])
def test_one_hot_out_of_range_raises_on_every_call(name, label):
    labels = torch.tensor([[0], [1], [label], [2]])
    f = lambda y: F.one_hot(y, 5)  # noqa: E731
    for _ in range(2):
        err = raises(name, f, labels)
        assert isinstance(err, RuntimeError) and any(
            word in str(err) for word in ("Class values must be", "out of bounds")
        ), err
    # The function still runs captured on values in range.
    assert_same_bits(run(name, f, labels.clamp(0, 4)), run("threads", f, labels.clamp(0, 4)))


@pytest.mark.parametrize("name", CAPTURED)
def test_lookups_in_per_replica_tables_run_captured_with_the_threads_bits(name):
    idx = torch.tensor([[0, 4, 4, 1], [3, 3, 3, 0], [2, 1, 0, 4], [4, 4, 4, 4]])
    f = lambda w, i: (F.embedding(i, w), torch.embedding(w, i.flip(0)))  # noqa: E731
    want = run("threads", f, tables(), idx)
    for _ in range(2):
        assert_same_bits(run(name, f, tables(), idx), want)


@pytest.mark.parametrize("name", CAPTURED)
@pytest.mark.parametrize("index", [5, -1])
def test_an_index_out_of_a_per_replica_table_raises(name, index):
    # Batched, row 0's index 5 was row 0 of replica 1's table.
    idx = torch.tensor([[1, index], [3, 0], [0, 2], [4, 4]])
    for _ in range(2):
        err = raises(name, lambda w, i: F.embedding(i, w), tables(), idx)
        assert isinstance(err, (IndexError, RuntimeError)) and any(
            word in str(err) for word in ("index out of range", "out of bounds")
        ), err


@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_gradients_of_lookups_in_per_replica_tables_equal_the_threads(padding_idx):
    # A functional step: repeated indices sum their rows' gradients, the padding row gets none.
    idx = torch.tensor([[0, 4, 4, 1, 0], [3, 3, 3, 0, 2], [2, 1, 0, 4, 4], [4, 4, 4, 4, 0]])

    def grads(w, i):
        def loss(w):
            return (F.embedding(i, w, padding_idx=padding_idx) * torch.linspace(-1, 2, 3)).square().sum()

        return torch.func.grad(loss)(w)

    want = run("threads", grads, tables(), idx)
    for _ in range(2):
        assert_same_bits(run("stacked", grads, tables(), idx), want)


def test_a_lookup_with_options_the_check_cannot_keep_runs_on_the_threads():
    idx = torch.tensor([[0, 4], [3, 3], [2, 1], [4, 4]])
    f = lambda w, i: F.embedding(i, w, scale_grad_by_freq=True)  # noqa: E731
    want = run("threads", f, tables(), idx)
    with pytest.warns(RuntimeWarning, match="scale_grad_by_freq"):
        with executor("stacked", allow_fallback=True):
            got = tp.pmap(f, "i", devices=devices(4))(tables(), idx)
    assert_same_bits(got, want)


INDEX_FILLS = {
    "negative_and_repeated": lambda w, i, v: w.index_fill(0, torch.cat([i, i.new_tensor([-1]), i]), 2.5),
    "int_tensor_float_value": lambda w, i, v: w.long().index_fill(1, i[:1] % 3, 2.7),
    "per_replica_value": lambda w, i, v: w.index_fill(-1, i[1:] % 3, v),
    "in_place": lambda w, i, v: w.clone().index_fill_(0, i, v * 2),
    "function": lambda w, i, v: torch.index_fill(w, 0, i, -0.0),
}


@pytest.mark.parametrize("case", sorted(INDEX_FILLS))
def test_index_fill_runs_stacked_with_the_threads_bits(case):
    idx = torch.tensor([[0, 4], [3, 3], [2, 1], [4, 0]])
    value = torch.tensor([1.5, -2.0, 3.0, 7.0])
    f = INDEX_FILLS[case]
    want = run("threads", f, tables(), idx, value)
    for _ in range(2):
        assert_same_bits(run("stacked", f, tables(), idx, value), want)


def test_a_per_replica_value_fills_a_broadcast_tensor_per_replica():
    # Batched, index_fill filled every replica with the last replica's value.
    v = torch.tensor([1.5, -2.0, 3.0, 7.0])
    base = torch.zeros(4)
    f = lambda v, base: base.index_fill(0, torch.tensor([0, 2]), v)  # noqa: E731
    with executor("stacked"):
        got = tp.pmap(f, "i", in_axes=(0, None), devices=devices(4))(v, base)
    assert_same_bits(got, tp.pmap(f, "i", in_axes=(0, None), devices=devices(4))(v, base))


@pytest.mark.parametrize("index", [5, -6])
def test_index_fill_out_of_range_raises_on_the_stacked_executor(index):
    idx = torch.tensor([[1, index], [3, 0], [0, 2], [4, 4]])  # row 0's 5 was row 0 of replica 1's table
    err = raises("stacked", lambda w, i: w.index_fill(0, i, 1.0), tables(), idx)
    assert isinstance(err, (IndexError, RuntimeError)) and "out of" in str(err), err


@pytest.mark.parametrize("name", CAPTURED)
def test_a_failed_factorization_in_one_replica_raises(name):
    # The graph passes dropped the error check (an op that returns nothing): a garbage factor.
    a = torch.eye(2).repeat(4, 1, 1)
    a[0] = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # replica 0's is not positive-definite
    for _ in range(2):
        err = raises(name, torch.linalg.cholesky, a)
        assert isinstance(err, torch.linalg.LinAlgError), err
    assert torch.equal(
        run(name, torch.linalg.cholesky, torch.eye(2).repeat(4, 1, 1)).unshard(), torch.eye(2).repeat(4, 1, 1)
    )
