"""Bad input and failures in collectives: clear errors, never a hang.

Every pmap call here runs in a helper thread with a deadline, so a regression
that hangs fails the test instead of the whole run, and every test in this
file runs with a 5 s collective timeout (restored afterwards) as a backstop.
The cases that must not wait for the timeout assert that they finish in well
under a second; after each failure the worker pool must still work.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch
from helpers import call_with_deadline, devices, expect_error, notes, pmap_k

import torchpmap as tp
from torchpmap import _config, _runtime

pytestmark = pytest.mark.timing  # every test here asserts how soon its error came

GUARD_TIMEOUT = 5.0
# seconds: "at once" (a run under a captured executor adds the first capture's Dynamo time)
FAST = 0.5 if os.environ.get("TORCHPMAP_EXECUTOR", "") in ("", "threads", "auto") else 3.0


@pytest.fixture(autouse=True)
def guard_timeout(monkeypatch):
    monkeypatch.setattr(_config, "_timeout", _config._timeout)  # restored after the test
    tp.set_collective_timeout(GUARD_TIMEOUT)
    threads = assert_pool_usable()
    yield
    # Replicas a failed call abandoned return in their own time (sleeps of a second at most here).
    assert _runtime.pool().wait_idle(10.0), "a replica of this test is still running after 10 s"
    tp.set_collective_timeout(GUARD_TIMEOUT)
    assert assert_pool_usable() == threads, "a failure left the pool with extra worker threads"


def assert_pool_usable():
    """A normal call on all devices works on the threads executor; returns the
    pool's thread count. On threads whatever the suite runs under: the pool is
    what this file checks, and a call another executor cannot run falls back to it."""
    n = tp.local_device_count()
    x = torch.arange(float(n))
    before = _config._executor
    tp.set_executor("threads")
    try:
        out, err, _ = call_with_deadline(lambda: pmap_k(lambda v: tp.psum(v, "i"), n)(x), deadline=10)
    finally:
        _config._executor = before
    assert err is None, f"the pool is broken after the failure: {err!r}"
    assert out.unshard().tolist() == [x.sum().item()] * n
    return _runtime.pool().thread_count()


def on(rank, then, otherwise):
    """Per replica: ``then`` on replica ``rank``, ``otherwise`` elsewhere."""
    return lambda v: then(v) if int(tp.axis_index("i")) == rank else otherwise(v)


# -- unbound axis names ---------------------------------------------------------------------
ALL_COLLECTIVES = {
    "psum": lambda x, a: tp.psum(x, a),
    "pmean": lambda x, a: tp.pmean(x, a),
    "pmax": lambda x, a: tp.pmax(x, a),
    "pmin": lambda x, a: tp.pmin(x, a),
    "all_gather": lambda x, a: tp.all_gather(x, a),
    "psum_scatter": lambda x, a: tp.psum_scatter(x, a, tiled=True),
    "ppermute": lambda x, a: tp.ppermute(x, a, [(0, 1), (1, 0)]),
    "pshuffle": lambda x, a: tp.pshuffle(x, a, [1, 0]),
    "all_to_all": lambda x, a: tp.all_to_all(x, a, 0, 0, tiled=True),
    "pswapaxes": lambda x, a: tp.pswapaxes(x, a, 0),
    "axis_index": lambda x, a: tp.axis_index(a),
    "axis_size": lambda x, a: tp.axis_size(a),
}


@pytest.mark.parametrize("name", ALL_COLLECTIVES)
def test_collective_outside_pmap_raises_name_error(name):
    with pytest.raises(NameError, match="unbound axis name: 'batch'"):
        ALL_COLLECTIVES[name](torch.ones(2, 2), "batch")


@pytest.mark.parametrize("name", ALL_COLLECTIVES)
def test_collective_with_unbound_axis_inside_pmap_raises_name_error(name):
    err, seconds = expect_error(pmap_k(lambda v: ALL_COLLECTIVES[name](v, "j"), 2), torch.ones(2, 2, 2), kind=NameError)
    assert "unbound axis name: 'j'" in str(err) and "'i'" in str(err)
    assert "replica" in notes(err)
    assert seconds < FAST


@pytest.mark.parametrize("axes", [("i", "j"), ("j",), ["k"]])
def test_tuple_of_axis_names_with_an_unbound_one(axes):
    missing = [a for a in axes if a != "i"][0]
    err, _ = expect_error(pmap_k(lambda v: tp.psum(v, axes), 2), torch.ones(2, 3), kind=NameError)
    assert repr(missing) in str(err)


def test_pmap_without_axis_name_binds_no_user_name():
    devices(2)  # maps 2 replicas on the default devices
    err, _ = expect_error(tp.pmap(lambda v: tp.psum(v, "i")), torch.ones(2, 3), kind=NameError)
    assert "unbound axis name: 'i'" in str(err)
    # The message names the fix, not the placeholder the unnamed axis has inside.
    assert "was given no axis_name: pass axis_name='i' to pmap" in str(err) and "unnamed" not in str(err)


def test_axis_is_unbound_again_after_the_call():
    pmap_k(lambda v: tp.psum(v, "i"), 2)(torch.ones(2))
    with pytest.raises(NameError, match="'i'"):
        tp.psum(torch.ones(1), "i")


# -- invalid arguments: ValueError before any communication ----------------------------------
BAD_ARGUMENTS = {
    # name: (function of the replica's (4, 3) block x, on 4 devices; message)
    "ppermute repeated source": (lambda x: tp.ppermute(x, "i", [(0, 1), (0, 2)]), "repeated source or destination"),
    "ppermute repeated destination": (
        lambda x: tp.ppermute(x, "i", [(0, 1), (2, 1)]),
        "repeated source or destination",
    ),
    "ppermute out of range": (lambda x: tp.ppermute(x, "i", [(0, 4)]), r"out of range for axis size 4"),
    "ppermute negative index": (lambda x: tp.ppermute(x, "i", [(-1, 0)]), r"out of range for axis size 4"),
    "ppermute not pairs": (lambda x: tp.ppermute(x, "i", [0, 1, 2, 3]), "pairs"),
    "ppermute triples": (lambda x: tp.ppermute(x, "i", [(0, 1, 2)]), "pairs"),
    "pshuffle not a permutation": (lambda x: tp.pshuffle(x, "i", [0, 1, 1, 3]), "permutation"),
    "pshuffle wrong length": (lambda x: tp.pshuffle(x, "i", [1, 0]), "permutation"),
    "psum_scatter size": (lambda x: tp.psum_scatter(x, "i", scatter_dimension=1), r"has size 3 but the axis size is 4"),
    "psum_scatter tiled size": (lambda x: tp.psum_scatter(x, "i", scatter_dimension=-1, tiled=True), "not divisible"),
    "psum_scatter scalar": (lambda x: tp.psum_scatter(x.sum(), "i"), "at least one dimension"),
    "psum_scatter dimension out of range": (lambda x: tp.psum_scatter(x, "i", scatter_dimension=2), "out of range"),
    "psum_scatter group size": (
        lambda x: tp.psum_scatter(x, "i", axis_index_groups=[[0, 1], [2, 3]]),
        r"has size 4 but the axis size is 2",
    ),
    "all_to_all size": (lambda x: tp.all_to_all(x, "i", 1, 0), r"has size 3 but the axis size is 4"),
    "all_to_all tiled size": (lambda x: tp.all_to_all(x, "i", -1, 0, tiled=True), "not divisible"),
    "all_to_all scalar": (lambda x: tp.all_to_all(x.sum(), "i", 0, 0), "at least one dimension"),
    "all_to_all concat axis out of range": (lambda x: tp.all_to_all(x, "i", 0, -3), "out of range"),
    "pswapaxes size": (lambda x: tp.pswapaxes(x, "i", 1), r"has size 3 but the axis size is 4"),
    "all_gather axis out of range": (lambda x: tp.all_gather(x, "i", axis=3), "out of range"),
    "all_gather tiled axis out of range": (lambda x: tp.all_gather(x, "i", axis=2, tiled=True), "out of range"),
    "all_gather tiled scalar": (lambda x: tp.all_gather(x.sum(), "i", tiled=True), "at least one dimension"),
    "groups overlap": (lambda x: tp.psum(x, "i", axis_index_groups=[[0, 1], [1, 2]]), "exactly once"),
    "groups miss an index": (lambda x: tp.pmax(x, "i", axis_index_groups=[[0, 1], [2]]), "exactly once"),
    "groups out of range": (lambda x: tp.pmin(x, "i", axis_index_groups=[[0, 1], [2, 4]]), "exactly once"),
    "groups empty group": (lambda x: tp.pmean(x, "i", axis_index_groups=[[0, 1, 2, 3], []]), "exactly once"),
    "groups no groups": (lambda x: tp.psum(x, "i", axis_index_groups=[]), "exactly once"),
    "groups not nested": (lambda x: tp.psum(x, "i", axis_index_groups=[0, 1, 2, 3]), "list of lists"),
    "groups a string": (lambda x: tp.psum(x, "i", axis_index_groups="ab"), "list of lists of ints"),
    "groups of floats": (lambda x: tp.psum(x, "i", axis_index_groups=[[0, 1.5], [2, 3]]), "list of lists of ints"),
    "groups unequal all_gather": (lambda x: tp.all_gather(x, "i", axis_index_groups=[[0, 1, 2], [3]]), "same size"),
    "groups unequal all_to_all": (
        lambda x: tp.all_to_all(x, "i", 0, 0, tiled=True, axis_index_groups=[[0], [1, 2, 3]]),
        "same size",
    ),
    "groups unequal psum_scatter": (
        lambda x: tp.psum_scatter(x, "i", tiled=True, axis_index_groups=[[0, 3, 2], [1]]),
        "same size",
    ),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_raise_clear_value_errors(case):
    fn, message = BAD_ARGUMENTS[case]
    err, seconds = expect_error(pmap_k(fn, 4), torch.ones(4, 4, 3), kind=ValueError)
    assert re.search(message, str(err)), str(err)
    assert "replica" in notes(err)
    assert seconds < FAST


@pytest.mark.parametrize("devices", ["cpu:0", torch.device("cpu", 0), 0])
def test_devices_that_are_not_a_list_are_named(devices):
    with pytest.raises(TypeError, match=r"pmap: devices must be a list of devices, got .*for one device pass \["):
        tp.pmap(lambda x: x, devices=devices)(torch.ones(1, 2))


@pytest.mark.parametrize("which", [0, 1])
def test_a_replica_returning_none_where_the_others_return_a_tensor(which):
    f = pmap_k(lambda x: None if int(tp.axis_index("i")) == which else x, 2)
    with pytest.raises(ValueError, match="replicas returned different output structures: at out replica 0 returned"):
        f(torch.ones(2, 3))


@pytest.mark.threads_only  # (a captured executor falls back to them for this function)
def test_different_output_structures_are_written_as_python_writes_them():
    # The message printed torch's TreeSpec(tuple, None, [*, ...]) text over several lines (found by a hunt).
    f = pmap_k(lambda v: (v, v) if int(tp.axis_index("i")) == 0 else (v, {"a": v, "b": [v]}), 2)
    with pytest.raises(
        ValueError, match=r"replica 0 returned \(\*, \*\) but replica 1 returned \(\*, \{'a': \*, 'b': \[\*\]\}\)"
    ):
        f(torch.ones(2, 3))


def test_non_tensor_leaves_raise_type_error():
    err, _ = expect_error(
        pmap_k(lambda v: tp.all_gather({"a": v, "b": "text"}, "i"), 2), torch.ones(2, 3), kind=TypeError
    )
    assert "str" in str(err)
    err, _ = expect_error(pmap_k(lambda v: tp.ppermute(3.0, "i", [(0, 1)]), 2), torch.ones(2, 3), kind=TypeError)
    assert "float" in str(err)


# -- a replica raises: the others are released at once --------------------------------------
class CustomError(Exception):
    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")
        self.code = code


def test_replica_raises_before_a_collective():
    raised = []

    def fail(v):
        e = CustomError(7, "replica 2 gives up")
        raised.append(e)
        raise e

    f = on(2, fail, lambda v: tp.psum(tp.psum(v, "i"), "i"))
    err, seconds = expect_error(pmap_k(f, 8), torch.ones(8, 3), kind=CustomError)
    assert err is raised[0]  # the very exception, type and attributes intact
    assert err.code == 7 and str(err) == "code 7: replica 2 gives up"
    assert not isinstance(err, tp.ReplicaAbortedError)
    assert "replica 2" in notes(err) and "cpu:2" in notes(err)
    assert seconds < FAST  # not released by the 5 s timeout


def test_replica_raises_between_collectives_while_others_wait():
    def f(v):
        v = tp.psum(v, "i")
        if int(tp.axis_index("i")) == 5:
            raise KeyError("lost key")
        return tp.all_gather(v, "i")

    err, seconds = expect_error(pmap_k(f, 8), torch.ones(8, 3), kind=KeyError)
    assert err.args == ("lost key",)
    assert "replica 5" in notes(err)
    assert seconds < FAST


def test_replica_raises_inside_a_collective_argument_check():
    """One replica's own call of the collective fails while the others are
    already waiting in it."""
    f = on(3, lambda v: tp.psum_scatter(v.sum(), "i"), lambda v: tp.psum_scatter(v, "i", tiled=True))
    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 4), kind=ValueError)
    assert "at least one dimension" in str(err) and "replica 3" in notes(err)
    assert seconds < FAST


def test_replica_raises_late_after_others_already_waited():
    """The others were waiting for a while when the failure comes: they wake at once."""

    def f(v):
        if int(tp.axis_index("i")) == 0:
            time.sleep(0.2)
            raise RuntimeError("slow failure")
        return tp.psum(v, "i")

    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 3), kind=RuntimeError)
    assert str(err) == "slow failure" and "replica 0" in notes(err)
    assert 0.2 <= seconds < 0.2 + FAST


def test_first_failing_replica_wins_over_cancellations():
    def f(v):
        r = int(tp.axis_index("i"))
        if r == 6:
            raise IndexError("six")
        v = tp.psum(v, "i")
        if r == 1:
            raise AssertionError("one")  # never reached: psum was cancelled
        return v

    err, _ = expect_error(pmap_k(f, 8), torch.ones(8, 2), kind=IndexError)
    assert str(err) == "six" and "replica 6" in notes(err)


def test_a_replica_wrapping_its_cancellation_does_not_hide_the_failure():
    # Replica 0 catches the ReplicaAbortedError (a retry or logging wrapper) and raises its
    # own error from it: the caller must still get replica 2's original exception.
    class StepFailed(RuntimeError):
        pass

    def f(v):
        try:
            if int(tp.axis_index("i")) == 2:
                raise ValueError("the real failure")
            return tp.psum(v, "i")
        except tp.errors.ReplicaAbortedError as e:
            raise StepFailed("step failed") from e

    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 2), kind=ValueError)
    assert str(err) == "the real failure" and "replica 2" in notes(err)
    assert seconds < FAST


def test_a_failure_whose_message_cannot_be_formatted_still_reaches_the_caller():
    class BadStr(Exception):
        def __str__(self):
            raise RuntimeError("str fails")

    def f(v):
        if int(tp.axis_index("i")) == 1:
            raise BadStr()
        return tp.psum(v, "i")

    err, _ = expect_error(pmap_k(f, 4), torch.ones(4, 2), kind=BadStr)
    assert "replica 1" in notes(err)


def test_replica_raises_in_backward_through_pmap():
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if int(tp.axis_index("i")) == 1:
                raise FloatingPointError("backward of replica 1")
            return g

    def f(v):
        return tp.psum(Boom.apply(v) * 2, "i")

    x = torch.ones(4, 3, requires_grad=True)
    y = pmap_k(f, 4)(x).unshard().sum()
    err, seconds = expect_error(y.backward, kind=FloatingPointError)
    assert str(err) == "backward of replica 1" and "replica 1" in notes(err)
    assert seconds < FAST


def test_replica_raises_in_backward_inside_replica():
    def f(v):
        v = v.detach().requires_grad_()
        loss = tp.psum(torch.sqrt(v).sum(), "i")
        if int(tp.axis_index("i")) == 2:
            raise ArithmeticError("no backward for me")
        return torch.autograd.grad(loss, v)[0]

    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 3), kind=ArithmeticError)
    assert "replica 2" in notes(err)
    assert seconds < FAST


# -- replicas disagree: CollectiveMismatchError ----------------------------------------------
MISMATCHES = {
    "different collectives": on(0, lambda v: tp.psum(v, "i"), lambda v: tp.all_gather(v, "i")),
    "psum vs pmax": on(1, lambda v: tp.psum(v, "i"), lambda v: tp.pmax(v, "i")),
    "different shapes": on(2, lambda v: tp.psum(v[:2], "i"), lambda v: tp.psum(v, "i")),
    "different dtypes": on(3, lambda v: tp.psum(v.double(), "i"), lambda v: tp.psum(v, "i")),
    "different groups": on(0, lambda v: tp.psum(v, "i", axis_index_groups=[[0, 1], [2, 3]]), lambda v: tp.psum(v, "i")),
    "different perms": on(
        1, lambda v: tp.ppermute(v, "i", [(0, 1), (1, 0)]), lambda v: tp.ppermute(v, "i", [(0, 1), (1, 2)])
    ),
    "gather vs all_to_all": on(0, lambda v: tp.all_gather(v, "i"), lambda v: tp.all_to_all(v, "i", 0, 0, tiled=True)),
    "pytree of a different size": on(2, lambda v: tp.psum((v, v), "i")[0], lambda v: tp.psum([v, v, v], "i")[0]),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_replicas_calling_different_collectives_get_mismatch_error(case):
    err, seconds = expect_error(pmap_k(MISMATCHES[case], 4), torch.ones(4, 4), kind=tp.CollectiveMismatchError)
    assert isinstance(err, tp.CollectiveError)
    assert "replica" in str(err)
    assert seconds < FAST


def test_mismatch_message_lists_every_replica():
    f = on(1, lambda v: tp.psum(v.double(), "i"), lambda v: tp.psum(v, "i"))
    err, _ = expect_error(pmap_k(f, 3), torch.ones(3, 2), kind=tp.CollectiveMismatchError)
    msg = str(err)
    for r in range(3):
        assert f"replica {r}" in msg
    assert "float64" in msg and "float32" in msg


def test_replica_returning_while_others_wait_gets_mismatch_error():
    f = on(3, lambda v: v, lambda v: tp.psum(v, "i"))
    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 2), kind=tp.CollectiveMismatchError)
    # replica 3 returns either while the others wait or before they arrive
    assert re.search(r"replica 3 returned|replicas \[3\] had already returned", str(err)), str(err)
    assert seconds < FAST


def test_replica_returning_after_the_others_started_waiting():
    def leave(v):
        time.sleep(0.1)  # the others are surely waiting in the psum by now
        return v

    f = on(1, leave, lambda v: tp.psum(v, "i"))
    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 2), kind=tp.CollectiveMismatchError)
    assert "replica 1 returned while replicas [0, 2, 3] wait in all_reduce" in str(err)
    assert seconds < 0.1 + FAST


def test_replica_calling_a_collective_after_the_others_returned():
    def late(v):
        time.sleep(0.1)  # the others have surely returned
        return tp.psum(v, "i")

    f = on(2, late, lambda v: v)
    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 2), kind=tp.CollectiveMismatchError)
    assert "replica 2" in str(err) and "already returned" in str(err)
    assert seconds < 0.1 + FAST


def test_fewer_collectives_on_one_replica_in_a_loop():
    def f(v):
        steps = 3 if int(tp.axis_index("i")) == 0 else 5
        for _ in range(steps):
            v = tp.pmean(v, "i")
        return v

    _, seconds = expect_error(pmap_k(f, 8), torch.ones(8, 2), kind=tp.CollectiveMismatchError)
    assert seconds < FAST


# -- timeouts -------------------------------------------------------------------------------
def test_timeout_guards_a_collective(monkeypatch):
    tp.set_collective_timeout(0.2)

    def f(v):
        if int(tp.axis_index("i")) == 1:
            time.sleep(0.6)  # longer than the timeout
        return tp.psum(v, "i")

    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 2), kind=tp.CollectiveTimeoutError)
    assert isinstance(err, TimeoutError) and isinstance(err, tp.CollectiveError)
    assert "timed out after 0.2 s" in str(err) and "[1]" in str(err)
    assert 0.2 <= seconds < 0.2 + FAST  # the call does not wait for the sleeper
    assert _runtime.pool().wait_idle(5.0)  # the sleeper returns in its own time


def test_timeout_applies_to_every_wait_not_just_the_first(monkeypatch):
    tp.set_collective_timeout(0.2)

    def f(v):
        v = tp.psum(v, "i")
        v = tp.all_gather(v, "i")
        if int(tp.axis_index("i")) == 0:
            time.sleep(0.5)
        return tp.ppermute(v, "i", [(0, 1), (1, 0)])

    err, _ = expect_error(pmap_k(f, 2), torch.ones(2, 2), kind=tp.CollectiveTimeoutError)
    assert "ppermute" in str(err) and "[0]" in str(err)


def test_set_collective_timeout_rejects_nonsense():
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(ValueError):
            tp.set_collective_timeout(bad)
    assert tp.collective_timeout() == GUARD_TIMEOUT


# -- failures under torch.compile -----------------------------------------------------------
def test_failure_in_compiled_replica_releases_the_others():
    def f(v):
        if v.sum() > 100:  # data-dependent: only replica 2's data is large
            raise OverflowError("too hot")
        return tp.psum(v, "i")

    pf = pmap_k(f, 4, compile=dict(backend="eager"))
    x = torch.ones(4, 3)
    x[2] = 1000
    err, seconds = expect_error(pf, x, kind=OverflowError)
    assert "replica 2" in notes(err)
    out, err, _ = call_with_deadline(pf, torch.ones(4, 3))
    assert err is None and out.unshard().eq(4).all()


def test_unbound_axis_under_compile_is_a_name_error():
    f = pmap_k(lambda v: tp.psum(v, "j") * tp.axis_index("j"), 2, compile=dict(backend="eager"))
    err, _ = expect_error(f, torch.ones(2, 3), kind=NameError)
    assert "unbound axis name: 'j'" in str(err)


@pytest.mark.parametrize("case", ["unbound axis", "bad perm"])
def test_user_errors_under_fullgraph_compile_keep_their_type(case):
    if case == "unbound axis":
        fn, kind = (lambda v: tp.psum(v, "j")), NameError
    else:
        fn, kind = (lambda v: tp.ppermute(v, "i", [(0, 1), (1, 1)])), ValueError
    f = pmap_k(fn, 2, compile=dict(backend="eager", fullgraph=True))
    expect_error(f, torch.ones(2, 3), kind=kind)


# -- no lock held while a thread sleeps --------------------------------------------------------
def test_timeout_while_the_last_replica_computes_a_large_result_does_not_deadlock():
    """A waiter times out while the last arrival is still computing everybody's
    results: the waiter must not hold the communicator's lock while it sleeps."""
    tp.set_collective_timeout(0.02)
    x = torch.ones(4, 4_000_000)  # a sum that takes longer than the timeout
    p = pmap_k(lambda v: tp.psum(v, "i"), 4)

    def calls():
        for _ in range(3):
            try:
                p(x)
            except tp.CollectiveTimeoutError:
                pass

    _, err, seconds = call_with_deadline(calls, deadline=20)
    assert err is None, err


def test_replica_arriving_right_at_the_timeout_never_hangs():
    """Many calls with one replica arriving around the timeout: each call
    returns the right result or a timeout error, never hangs."""
    tp.set_collective_timeout(0.01)

    def f(v):
        if int(tp.axis_index("i")) == 1:
            time.sleep(0.009 + 0.002 * float(v[0]))
        return tp.psum(v, "i")

    p = pmap_k(f, 2)
    outcomes = {"ok": 0, "timeout": 0}

    def calls():
        for k in range(200):
            x = torch.full((2, 1), float(k % 3))
            try:
                out = p(x)
                assert out.unshard().tolist() == [[2.0 * (k % 3)]] * 2
                outcomes["ok"] += 1
            except tp.CollectiveTimeoutError:
                outcomes["timeout"] += 1
            time.sleep(0.005)  # let a late replica finish before the next call

    _, err, _ = call_with_deadline(calls, deadline=60)
    assert err is None, err
    assert sum(outcomes.values()) == 200


def test_a_replica_that_never_returns_fails_the_call_within_the_timeout():
    tp.set_collective_timeout(0.3)
    release = threading.Event()

    def f(v):
        if int(tp.axis_index("i")) == 2:
            release.wait(30)  # stuck, outside any collective
        return tp.psum(v, "i")

    try:
        err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 2), kind=tp.CollectiveTimeoutError)
        assert seconds < 0.3 + FAST  # not when the stuck replica returns
        assert "[2]" in str(err)  # the replica the others waited for
        assert "replica 2" in notes(err) and "still running" in notes(err)
        # A later call that needs the stuck replica's device fails within the
        # timeout too, naming the device and what keeps it busy.
        err, seconds = expect_error(pmap_k(lambda v: v + 1, 4), torch.ones(4, 2), kind=tp.CollectiveTimeoutError)
        assert seconds < 0.3 + FAST
        assert "cpu:2" in str(err) and "could not start" in str(err) and "f" in str(err)
        # Calls on the other devices work meanwhile.
        out, err, _ = call_with_deadline(pmap_k(lambda v: tp.psum(v, "i"), 2), torch.ones(2, 2))
        assert err is None and out.unshard().eq(2).all()
    finally:
        release.set()
    # Once the stuck replica returns, its device works again (the fixture checks every device).
    assert _runtime.pool().wait_idle(5.0)


def test_a_slow_replica_does_not_delay_the_timeout_error():
    tp.set_collective_timeout(0.2)

    def f(v):
        if int(tp.axis_index("i")) == 1:
            time.sleep(1.0)
        return tp.psum(v, "i")

    err, seconds = expect_error(pmap_k(f, 4), torch.ones(4, 2), kind=tp.CollectiveTimeoutError)
    assert seconds < 0.2 + FAST
    assert "[1]" in str(err)
    assert _runtime.pool().wait_idle(5.0)


def test_a_replica_still_running_long_after_the_others_returned_fails_the_call():
    """No collective at all: the others returned, one replica never does."""
    tp.set_collective_timeout(0.3)
    release = threading.Event()

    def f(v):
        if int(tp.axis_index("i")) == 1:
            release.wait(30)
        return v * 2

    try:
        err, seconds = expect_error(pmap_k(f, 2), torch.ones(2, 2), kind=tp.CollectiveTimeoutError)
        assert seconds < 0.3 + FAST
        assert "replica 1" in str(err) and "still running" in str(err)
    finally:
        release.set()
    assert _runtime.pool().wait_idle(5.0)


def test_a_stuck_compiled_replica_holding_the_compile_gate_fails_later_compiled_calls_in_time():
    """Replicas take turns inside Dynamo (a process-wide gate). An abandoned
    replica stuck in eager code between graphs keeps the gate: later compiled
    calls, on any devices, raise after the timeout instead of waiting for it."""
    others = devices(4)[2:4]
    tp.set_collective_timeout(1.0)
    release = threading.Event()

    def f(v):
        y = v * 2
        if int(tp.axis_index("i")) == 0:
            raise ValueError("replica 0 fails")
        release.wait(30)  # a graph break: eager code, with the gate held
        return y + 1

    eager = dict(backend="eager")
    try:
        # Replica 0 raises, unless replica 1 took the gate first: then replica 0
        # waits for it and gives up after the timeout.
        err, seconds = expect_error(pmap_k(f, 2, compile=eager), torch.ones(2, 2), kind=Exception)
        assert isinstance(err, (ValueError, tp.CollectiveTimeoutError)), err
        assert seconds < 1.0 + 1.0  # the timeout counts from the end of replica 1's compile, plus the grace
        assert "replica 1" in notes(err) and "still running" in notes(err)
        other = tp.pmap(lambda v: tp.psum(v * 3, "i"), "i", devices=others, compile=eager)
        err, seconds = expect_error(other, torch.ones(2, 2), kind=tp.CollectiveTimeoutError)
        assert seconds < 1.0 + FAST
        assert "compile gate" in str(err) and "abandoned" in str(err) and "replica 1" in str(err)
    finally:
        release.set()
    assert _runtime.pool().wait_idle(5.0)
    out, err, _ = call_with_deadline(other, torch.ones(2, 2))
    assert err is None and out.unshard().eq(6).all()


def test_pmap_from_a_thread_that_a_replica_started_raises_instead_of_deadlocking():
    from concurrent.futures import ThreadPoolExecutor

    tp.set_collective_timeout(0.3)

    def f(v):
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: pmap_k(lambda w: w * 2, 2)(torch.ones(2, 1))).result()

    err, seconds = expect_error(pmap_k(f, 2), torch.ones(2, 2), kind=tp.CollectiveTimeoutError)
    assert seconds < 0.3 + FAST
    assert "nested pmap" in str(err) and "thread" in str(err)


def test_collective_from_a_thread_that_a_replica_started_says_so():
    from concurrent.futures import ThreadPoolExecutor

    def f(v):
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: tp.psum(v, "i")).result()

    err, _ = expect_error(pmap_k(f, 2), torch.ones(2, 2), kind=NameError)
    assert "another thread" in str(err) and "replica's own thread" in str(err)


@pytest.mark.parametrize("seconds", [float("inf"), 1e10])
def test_an_infinite_timeout_means_no_timeout(seconds):
    tp.set_collective_timeout(seconds)
    assert tp.collective_timeout() == seconds

    def f(v):
        if int(tp.axis_index("i")) == 0:
            time.sleep(0.1)
        return tp.psum(v, "i")

    out, err, _ = call_with_deadline(pmap_k(f, 2), torch.ones(2, 2))
    assert err is None, err
    assert out.unshard().eq(2).all()
