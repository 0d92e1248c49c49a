"""Random numbers inside replicas: one stream per replica, reproducible from the
caller's seed, independent of thread timing and of how replicas are laid out."""

import contextlib
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import devices, executor, pmap_k

import torchpmap as tp


def draws(x):
    """Every kind of draw the streams must cover, in one replica."""
    return torch.cat(
        [
            F.dropout(x, 0.5),
            torch.nn.Dropout(0.3)(x),
            torch.rand(x.shape),
            torch.randn(x.shape),
            torch.randint(0, 100, x.shape).float(),
            torch.empty_like(x).uniform_(),
            torch.bernoulli(torch.full_like(x, 0.5)),
            torch.nn.init.kaiming_uniform_(torch.empty(1, x.shape[0])).flatten(),
            torch.ops.aten.bernoulli_.float(torch.empty_like(x), 0.5),
        ]
    )


def run(seed, n=4, fn=draws, x=None):
    torch.manual_seed(seed)
    x = torch.ones(n, 6) if x is None else x
    return pmap_k(fn, n)(x).numpy()


def test_same_seed_same_numbers_and_replicas_differ():
    a, b = run(0), run(0)
    np.testing.assert_array_equal(a, b)
    for i in range(1, 4):
        assert not np.array_equal(a[0], a[i]), f"replica {i} drew replica 0's numbers"
    assert not np.array_equal(a, run(1))


def test_numbers_do_not_depend_on_thread_timing():
    def late_first(x):
        # Replica 0 draws last, replica 3 first: thread order must not matter.
        time.sleep(0.02 * (3 - int(tp.axis_index("i"))))
        return draws(x)

    np.testing.assert_array_equal(run(5, fn=late_first), run(5))


def test_a_replica_draws_the_same_numbers_whatever_the_number_of_replicas():
    # The streams depend on (seed, global replica index) only: replica 1 of
    # 2 equals replica 1 of 4 (as 2 processes x 2 devices equal 1 x 4).
    np.testing.assert_array_equal(run(3, n=2), run(3, n=4)[:2])


def test_a_call_without_randomness_leaves_the_callers_generator_alone():
    torch.manual_seed(0)
    pmap_k(lambda x: x * 2, 4)(torch.ones(4, 3))
    after_call = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_call, torch.rand(3))


NO_DRAW = {
    "alpha_dropout, training by default False": lambda x: F.alpha_dropout(x, 0.5),
    "feature_alpha_dropout, training by default False": lambda x: F.feature_alpha_dropout(x.view(2, 3), 0.5),
    "dropout at p=1": lambda x: F.dropout(x, 1.0),
    "dropout2d at p=1": lambda x: F.dropout2d(x.view(1, 2, 3), 1.0),
    "alpha_dropout at p=1": lambda x: F.alpha_dropout(x, 1.0, True),
    "dropout of an empty tensor": lambda x: F.dropout(x[:0], 0.5).sum() + x,
    "a draw on the meta device": lambda x: x + torch.rand(3, device="meta").shape[0],
    "dropout on the meta device": lambda x: x + F.dropout(torch.ones(3, device="meta")).shape[0],
}


@pytest.mark.parametrize("case", sorted(NO_DRAW))
@pytest.mark.parametrize("name", ["threads", "stacked", "lockstep"])
def test_what_eager_draws_nothing_for_leaves_the_callers_generator_alone(case, name):
    # As eager PyTorch: dropout at p=1 returns zeros, an empty tensor has nothing to draw.
    fn = NO_DRAW[case]
    torch.manual_seed(0)
    expected = fn(torch.ones(6))
    expected_next = torch.rand(3)
    with executor(name, allow_fallback=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(0)
        f = pmap_k(fn, 2)
        for _ in range(2):
            out = f(torch.ones(2, 6))
            assert torch.equal(out.unshard()[1], expected)
        assert torch.equal(torch.rand(3), expected_next)


def test_draws_on_cpu_and_on_cpu_k_come_from_one_stream():
    # Eager PyTorch has one CPU generator whatever the index: two draws spelled
    # cpu and cpu:1 follow each other in a replica's stream, they do not repeat it.
    def two(x):
        return x + torch.cat([torch.rand(4), torch.rand(4, device="cpu:1")])

    def one(x):
        return x + torch.rand(8)

    torch.manual_seed(5)
    got = pmap_k(two, 2)(torch.zeros(2, 8)).unshard()
    torch.manual_seed(5)
    assert torch.equal(got, pmap_k(one, 2)(torch.zeros(2, 8)).unshard())


def test_dropout_backward_uses_the_forward_mask():
    def f(x):
        y = F.dropout(x, 0.5)
        (g,) = torch.autograd.grad(y.sum(), x)
        return y, g

    x = torch.ones(4, 8, requires_grad=True)
    torch.manual_seed(0)
    y, g = pmap_k(f, 4)(x)
    y, g = y.numpy(force=True), g.numpy(force=True)
    np.testing.assert_array_equal(g, y)  # x is ones: the gradient is the scaled mask


def test_a_generator_made_in_the_replica_is_its_own():
    def f(x):
        g = torch.Generator().manual_seed(11)  # the same seed everywhere: the same numbers
        a = torch.rand(x.shape, generator=g)
        g.manual_seed(11)
        return torch.stack([a, torch.rand(x.shape, generator=g)])

    out = pmap_k(f, 4)(torch.ones(4, 3)).numpy()
    want = torch.rand(3, generator=torch.Generator().manual_seed(11)).numpy()
    for r in range(4):
        np.testing.assert_array_equal(out[r], np.stack([want, want]))


def test_a_generator_two_replicas_draw_from_is_refused():
    g = torch.Generator().manual_seed(7)
    with pytest.raises(RuntimeError, match="both drew random numbers from one torch.Generator"):
        pmap_k(lambda x: torch.rand(x.shape, generator=g), 4)(torch.ones(4, 5))
    # One replica alone may use it.
    out = pmap_k(lambda x: torch.rand(x.shape, generator=g) if int(tp.axis_index("i")) == 2 else x, 4)(torch.ones(4, 5))
    assert out.shape == (4, 5)


def test_a_function_that_starts_drawing_later_warns_once_then_gets_streams():
    model = tp.replicate(torch.nn.Dropout(0.5), devices=devices(4))
    f = pmap_k(lambda m, x: m(x), 4)
    x = torch.ones(4, 16)
    model.eval()
    f(model, x)  # no draws: later calls run without the streams
    model.train()
    with pytest.warns(RuntimeWarning, match="not on its first"):
        f(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(2)
        a = f(model, x).numpy()
        torch.manual_seed(2)
        b = f(model, x).numpy()
    np.testing.assert_array_equal(a, b)


def test_a_draw_behind_the_streams_back_warns():
    def f(x):
        torch.manual_seed(int(tp.axis_index("i")))  # sets the process-wide generator
        return x

    # A state no replica sets: left as an earlier run of this test left it, the state after the
    # call may equal the state before (the check compares them), and there is nothing to tell.
    torch.manual_seed(12345)
    with pytest.warns(RuntimeWarning, match="does not intercept"):
        pmap_k(f, 4)(torch.ones(4, 2))


def test_dropout_not_drawing_does_not_take_the_lock():
    from torchpmap import _random

    assert not _random._draws(_random._SWAP_WHEN["dropout"], (torch.ones(2), 0.0), {})
    assert not _random._draws(_random._SWAP_WHEN["dropout"], (torch.ones(2),), {"training": False})
    assert not _random._draws(_random._SWAP_WHEN["dropout"], (torch.ones(2), 0.5, False), {})
    assert _random._draws(_random._SWAP_WHEN["dropout"], (torch.ones(2),), {})
    assert not _random._draws(_random._SWAP_WHEN["rrelu"], (torch.ones(2),), {})
    assert not _random._draws(_random._SWAP_WHEN["dropout"], (torch.ones(2), 1.0), {})
    assert _random._draws(_random._SWAP_WHEN["native_dropout"], (torch.ones(2), 1.0, True), {})  # as eager
    assert _random._draws(_random._SWAP_WHEN["native_dropout"], (torch.ones(2), 0.0, True), {})  # as eager
    assert not _random._draws(_random._SWAP_WHEN["alpha_dropout"], (torch.ones(2), 0.5), {})


def test_every_aten_op_with_a_generator_is_covered():
    """New random ops in a later PyTorch must not slip past the streams."""
    from torchpmap import _random

    not_draws = {"manual_seed", "initial_seed", "seed", "_no_grad_normal_", "_no_grad_uniform_"}
    not_draws |= {"inductor_reserve_rng_state"}  # reserves an offset for Inductor's seeds op (listed)
    missing = set()
    for schema in torch._C._jit_get_all_schemas():
        if any("Generator" in str(a.type) for a in schema.arguments):
            name = schema.name.split("::")[1]
            routed = name in _random._TAKE_GENERATOR or name in _random._SWAP_WHEN
            if not routed and name not in not_draws:
                missing.add(name)
    assert not missing, f"random ops the streams do not route: {sorted(missing)}"


@pytest.mark.slow
def test_compiled_replicas_draw_from_their_streams():
    x = torch.ones(4, 6)

    def f(x):
        return F.dropout(x, 0.5) * tp.psum(x, "i") + torch.rand(x.shape)

    eager = run(0, fn=f, x=x)
    compiled = pmap_k(f, 4, compile=dict(backend="aot_eager"))
    torch.manual_seed(0)
    a = compiled(x).numpy()
    torch.manual_seed(0)
    b = compiled(x).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, eager)  # the same ops, the same streams


def test_draws_inside_torch_func_vmap_are_reproducible():
    def f(x):
        per_row = torch.func.vmap(lambda v: F.dropout(v, 0.5) + torch.rand(v.shape), randomness="different")
        return per_row(x)

    a, b = run(4, fn=f, x=torch.ones(4, 3, 5)), run(4, fn=f, x=torch.ones(4, 3, 5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0, 0], a[0, 1])  # vmap's rows differ, as randomness="different" asks


def test_a_first_draw_inside_torch_func_grad():
    # The call seed is drawn (and the caller's generator read) outside the transform.
    def f(x):
        return torch.func.grad(lambda v: F.dropout(v, 0.5).sum())(x)

    torch.manual_seed(0)
    a = pmap_k(f, 4)(torch.ones(4, 8)).numpy()
    torch.manual_seed(0)
    np.testing.assert_array_equal(a, pmap_k(f, 4)(torch.ones(4, 8)).numpy())
    assert set(np.unique(a)) <= {0.0, 2.0}


def test_after_a_late_first_draw_later_calls_get_streams():
    # The late call's replicas drew straight from the caller's generator, in thread order (it
    # warns). The generator is left as they left it (another thread may have drawn too); the
    # calls after it give every replica its own stream: reproducible from a seed, and as the
    # stacked executor, which always has streams, draws them.
    def late(x, flag):
        return torch.nn.functional.dropout(x, 0.5, training=flag)

    runs = {}
    for how in ("threads", "stacked"):
        with executor(how), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f = tp.pmap(late, "i", static_broadcasted_argnums=1, devices=devices(2))
            torch.manual_seed(0)
            for flag in (False, True):
                f(torch.ones(2, 64), flag)
        with executor(how):  # no warning from now on
            torch.manual_seed(1)
            runs[how] = [f(torch.ones(2, 64), True).unshard() for _ in range(2)]
    for a, b in zip(runs["threads"], runs["stacked"]):
        assert torch.equal(a, b)
    assert not torch.equal(runs["threads"][0][0], runs["threads"][0][1])  # a stream per replica


def test_another_threads_draws_during_a_call_are_never_drawn_again():
    # A function that does not draw runs without the streams; a call during which another
    # thread drew (a data loader) used to set the generator back to its state at the start
    # of the call, so that thread got the same numbers again (found by a hunt).
    inside, go = threading.Event(), threading.Event()
    block = [False]

    def f(x):
        if block[0] and int(tp.axis_index("i")) == 0:
            inside.set()
            go.wait(10)
        return x * 2

    p = pmap_k(f, 2)
    x = torch.ones(2, 3)
    p(x)  # learns that f draws nothing
    block[0] = True
    torch.manual_seed(0)
    want = torch.rand(8)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # it cannot tell who drew
        call = threading.Thread(target=p, args=(x,))
        call.start()
        assert inside.wait(10)
        first = torch.rand(4)
        go.set()
        call.join()
    assert torch.equal(torch.cat([first, torch.rand(4)]), want)


def _checkpointed_step(reentrant, backward_inside, drop, mask_under_no_grad=False):
    """A step whose checkpointed part may draw (dropout, or a mask drawn under
    no_grad), with the backward inside the replica (module idiom) or through the call."""
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def body(x):
        h = (x @ w).tanh()
        if not drop:
            return h
        if mask_under_no_grad:
            with torch.no_grad():
                return h * (torch.rand_like(h) > 0.5)
        return F.dropout(h, 0.5)

    def step(x):
        y = torch.utils.checkpoint.checkpoint(body, x, use_reentrant=reentrant)
        if backward_inside:
            y.sum().backward()
            return w.grad.clone()
        return y

    return w, tp.pmap(step, "i", devices=devices(4))


@pytest.mark.parametrize("reentrant, mask_under_no_grad", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("name", ["threads", "stacked", "lockstep"])
def test_a_draw_inside_torch_utils_checkpoint_is_refused(name, reentrant, mask_under_no_grad, backward_inside):
    """The backward's recomputation drew another dropout mask (from PyTorch's
    shared generator, in thread order): wrong gradients, silently."""
    _, pf = _checkpointed_step(reentrant, backward_inside, drop=True, mask_under_no_grad=mask_under_no_grad)
    x = torch.randn(4, 2, 3, requires_grad=True)
    with executor(name, allow_fallback=True):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="draws random numbers inside torch.utils.checkpoint"):
            pf(x)
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("how", ["no_grad outside", "no input needs grad"])
def test_a_draw_inside_a_checkpoint_that_no_backward_recomputes_is_fine(reentrant, how):
    w, pf = _checkpointed_step(reentrant, backward_inside=False, drop=True)
    x = torch.randn(4, 2, 3)
    if how == "no input needs grad" and not reentrant:
        pytest.skip("non-reentrant: w, closed over, needs grad: a backward can come")
    grad = torch.no_grad() if how == "no_grad outside" else contextlib.nullcontext()
    with executor("threads"), grad, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch's: none of the inputs requires grad
        torch.manual_seed(0)
        y = pf(x).unshard()
    assert (y == 0).any()  # the dropout dropped


@pytest.mark.threads_only
def test_a_checkpoint_around_a_collective_that_preserves_the_rng_state_is_named_in_the_warning():
    # Each replica's recomputation saves, sets and restores PyTorch's one CPU generator around a
    # collective that waits for the others, so the caller's state after the backward depended on
    # thread order; the warning blamed a draw the replicas never made. It now says what to pass.
    def step(x, preserve):
        block = lambda v: (tp.psum(v, "i").tanh() * v).sum()  # noqa: E731
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, preserve_rng_state=preserve)

    pf = tp.pmap(step, "i", devices=devices(4), static_broadcasted_argnums=1)
    for preserve in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            for _ in range(8):  # (with preserve, the state is left alone only when the right replica restores last)
                out = pf(torch.randn(4, 8, requires_grad=True), preserve)
                torch.rand(3)  # the caller draws between the forward and the backward
                state = torch.get_rng_state()
                out.sum().backward()
                if not preserve:
                    assert torch.equal(torch.get_rng_state(), state)
        messages = [str(c.message) for c in caught if "random" in str(c.message)]
        if preserve:
            assert messages and all("pass preserve_rng_state=False to a checkpoint" in m for m in messages)
        else:
            assert not messages


@pytest.mark.parametrize("name", ["threads", "stacked"])
def test_a_checkpointed_function_that_draws_nothing_gives_the_plain_gradients(name):
    # Non-reentrant only: autograd through the call differentiates each replica with
    # torch.autograd.grad, which reentrant checkpoint refuses (PyTorch's error says so).
    w, pf = _checkpointed_step(False, backward_inside=False, drop=False)
    x = torch.randn(4, 2, 3, requires_grad=True)
    with executor(name, allow_fallback=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for _ in range(2):  # the stacked executor's capture, then its replay
            w.grad = x.grad = None
            pf(x).sum().backward()
    if name == "stacked":  # functorch refuses checkpoint's hooks: the threads run it
        assert any("autograd through torch.utils.checkpoint" in str(c.message) for c in caught)
    expected_w = torch.randn(3, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()
    xe = x.detach().clone().requires_grad_()
    (xe @ expected_w).tanh().sum().backward()
    torch.testing.assert_close(w.grad, expected_w.grad)
    torch.testing.assert_close(x.grad, xe.grad)
