"""Random numbers on the stacked executor: the threads executor's per-replica
streams, bit for bit, or a warned fallback where they cannot be matched."""

import gc
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import devices, executor

import torchpmap as tp

N = 4


def pm(f, n=N, **kwargs):
    return tp.pmap(f, "i", devices=devices(n), **kwargs)


def seeded_calls(name, pf, *args, seed=0, calls=2):
    """``calls`` calls of pf after torch.manual_seed(seed) on executor ``name``,
    and the caller's generator state after them."""
    with executor(name):
        torch.manual_seed(seed)
        outs = [pf(*args) for _ in range(calls)]
    return outs, torch.get_rng_state()


def assert_same_streams(pf, *args, seed=0, calls=2, close=()):
    """Threads and stacked draw the same bits, and leave the caller's
    generator in the same state. ``close``: the indices of output leaves that
    went through a matmul, compared to float32 rounding (a batched matmul may
    round otherwise than one per replica: it does on AVX-512 CPUs)."""
    expected, expected_state = seeded_calls("threads", pf, *args, seed=seed, calls=calls)
    got, state = seeded_calls("stacked", pf, *args, seed=seed, calls=calls)
    for e, g in zip(expected, got):
        for i, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(e), torch.utils._pytree.tree_leaves(g))):
            if i in close:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(a, b), (a, b)
    assert torch.equal(expected_state, state), "the caller's generator moved differently"
    return got


def every_draw(x):
    return torch.cat([draws(x), torch.rand_like(x) * tp.psum(x, "i")])


def draws(x):
    return torch.cat(
        [
            F.dropout(x, 0.5),
            torch.nn.Dropout(0.3)(x),
            torch.rand(x.shape),
            torch.randn(x.shape),
            torch.randint(0, 100, x.shape).float(),
            torch.empty_like(x).uniform_(),
            torch.empty_like(x).normal_(2.0, 3.0),
            torch.bernoulli(torch.full_like(x, 0.5)),
            torch.ops.aten.bernoulli_.float(torch.empty_like(x), 0.5),
            torch.rand(3).sum(0, keepdim=True),  # a second draw continues the stream
            torch.nn.init.kaiming_uniform_(torch.empty(1, x.shape[0])).flatten(),  # a fresh tensor filled
            torch.zeros(2).normal_(),
        ]
    )


def test_every_kind_of_draw_matches_threads():
    out = assert_same_streams(pm(every_draw), torch.ones(N, 6))[0]
    assert not torch.equal(out[0], out[1]), "replicas drew the same numbers"


def more_draws(x):
    q = x.reshape(2, 3, 4)
    return [
        torch.randperm(7).float(),
        torch.multinomial(x.abs().flatten() + 0.1, 3).float(),
        torch.normal(x, x.abs() + 1),
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.3),
        F.rrelu(x, training=True),
        F.alpha_dropout(x, 0.2, training=True),
        F.dropout1d(x.reshape(1, 3, 8), 0.5),
        torch.poisson(x.abs()),
        F.gumbel_softmax(x, tau=0.5),
        torch.rand(3, dtype=torch.float64),
        F.dropout(x.clone(), 0.4, inplace=True),
    ]


def test_more_kinds_of_draw_match_threads():
    assert_same_streams(pm(more_draws), torch.randn(N, 3, 8))


def test_draws_under_grad_differentiate_as_on_threads():
    def f(x):
        def loss(v):
            noisy = torch.normal(v, 1.0) * F.rrelu(v, training=True) + F.alpha_dropout(v, 0.2, True)
            return noisy.sum() + F.scaled_dot_product_attention(v[None], v[None], v[None], dropout_p=0.3).sum()

        return torch.func.grad(loss)(x)

    assert_same_streams(pm(f), torch.randn(N, 3, 8))


def test_draws_that_draw_nothing_leave_the_callers_generator_alone():
    def f(x):
        return F.dropout(x, 0.0) + F.dropout(x, 0.5, training=False) + torch.nn.Dropout(0.5).eval()(x)

    assert_same_streams(pm(f), torch.ones(N, 6))
    with executor("stacked"):
        torch.manual_seed(0)
        pm(f)(torch.ones(N, 6))
        after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def mlp(params, x):
    # Functional, not torch.func.functional_call on a shared module: the threads
    # executor's replicas would swap each other's parameters into it.
    h = F.relu(F.linear(F.dropout(x, 0.1), params["a.weight"], params["a.bias"]))
    return F.linear(torch.nn.Dropout(0.25)(h), params["b.weight"], params["b.bias"])


def test_a_training_step_with_dropout_under_grad_matches_threads():
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Linear(16, 3))
    params = {k.replace("0.", "a.").replace("1.", "b."): v.detach() for k, v in model.named_parameters()}

    def step(params, x, y):
        def loss(p):
            return F.cross_entropy(mlp(p, x), y) + 1e-3 * torch.randn(()) ** 2

        grads = torch.func.grad(loss)(params)
        return tp.pmean(grads, "i"), torch.bernoulli(torch.full((2,), 0.5)), torch.randint(0, 9, (3,))

    x, y = torch.randn(N, 5, 6), torch.randint(0, 3, (N, 5))
    f = pm(step, in_axes=(None, 0, 0))
    assert_same_streams(f, params, x, y, close=range(4))  # the gradients: matmuls


def test_nested_grads_through_a_draw_match_threads():
    def f(x, w):
        def outer(x):
            return torch.func.grad(lambda w: (F.dropout(x, 0.5) * w).sum())(w).pow(2).sum()

        return torch.func.grad(outer)(x)

    assert_same_streams(pm(f), torch.randn(N, 5), torch.randn(N, 5))


def test_dropout_backward_uses_the_forward_mask():
    def f(x):
        y, vjp = torch.func.vjp(lambda v: F.dropout(v, 0.5), x)
        return y, vjp(torch.ones_like(y))[0]

    y, g = assert_same_streams(pm(f), torch.ones(N, 8))[0]
    assert torch.equal(g, y)  # x is ones: the gradient is the scaled mask


def test_a_draw_whose_result_is_unused_still_advances_the_stream():
    def f(x):
        torch.rand(5)
        return x + torch.rand(x.shape)

    assert_same_streams(pm(f), torch.ones(N, 3))


def test_replica_i_of_2_equals_replica_i_of_4():
    x = torch.ones(N, 6)
    two, _ = seeded_calls("stacked", pm(draws, 2), x[:2], seed=3, calls=1)
    four, _ = seeded_calls("stacked", pm(draws, 4), x, seed=3, calls=1)
    assert torch.equal(two[0], four[0][:2])


def test_the_same_seed_gives_the_same_bits_and_another_seed_others():
    f = pm(every_draw)
    a, _ = seeded_calls("stacked", f, torch.ones(N, 6), seed=1)
    b, _ = seeded_calls("stacked", f, torch.ones(N, 6), seed=1)
    c, _ = seeded_calls("stacked", f, torch.ones(N, 6), seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_a_draw_into_a_transposed_input_matches_threads():
    # Dropout fills a mask laid out like its input: the replica's own strides.
    assert_same_streams(pm(lambda x: F.dropout(x.t(), 0.5) * 2), torch.ones(N, 3, 5))
    assert_same_streams(
        pm(lambda x: torch.rand_like(x[:, ::2]).sum() + F.dropout(x[0].expand(4, 5), 0.5)), torch.ones(N, 3, 5)
    )


def fallback_reason(f, *args):
    tp.set_executor("stacked")
    with pytest.warns(RuntimeWarning, match="runs on the threads executor") as record:
        f(*args)
    return str(record[0].message)


def test_a_fresh_tensor_filled_in_place_is_read_through_its_name():
    def f(x):
        t = torch.empty(x.shape[1:])
        t.uniform_()  # the result is not used: t is
        noise = torch.ones(2)
        F.dropout(noise, 0.5, inplace=True)
        return x + t, noise

    assert_same_streams(pm(f), torch.ones(N, 5))


def used_then_filled(x):
    t = torch.zeros(x.shape[1:])
    before = t * 2  # t was read before the draw: it cannot become the draw's result
    return x + before + t.uniform_()


@pytest.mark.parametrize(
    "fn, reason",
    [
        (
            lambda x: torch.func.vmap(lambda v: F.dropout(v, 0.5), randomness="different")(x),
            "inside torch.func.vmap",  # a draw per replica and vmapped row would need stacking there
        ),
        (used_then_filled, "without the replica dimension"),
        (
            lambda x: torch.func.grad(lambda v: torch.func.grad(lambda u: (F.dropout(u, 0.5) ** 2).sum())(v).sum())(x),
            "a second derivative through a random op",
        ),
    ],
    ids=["inside_vmap", "into_an_unstacked_tensor", "second_derivative"],
)
def test_what_cannot_match_threads_falls_back_with_a_reason(fn, reason):
    f = pm(fn)
    x = torch.ones(N, 3, 4)
    assert reason in fallback_reason(f, x)
    # The threads executor then runs it, with the threads' numbers.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stacked, _ = seeded_calls_quiet("stacked", f, x)
    threads, _ = seeded_calls("threads", f, x)
    assert torch.equal(stacked[0], threads[0])
    with torch.autograd.graph.save_on_cpu():  # a failed capture leaves saved-tensor hooks allowed
        pass


def seeded_calls_quiet(name, pf, *args):
    tp.set_executor(name)
    torch.manual_seed(0)
    outs = [pf(*args) for _ in range(2)]
    return outs, torch.get_rng_state()


def test_a_stacked_call_teaches_the_function_whether_it_draws():
    # As a threads call would: a later fallback runs with or without the streams alike.
    draws, plain = pm(lambda x: F.dropout(x, 0.5)), pm(lambda x: x * 2)
    with executor("stacked"):
        draws(torch.ones(N, 4))
        plain(torch.ones(N, 4))
    assert draws._random.needed is True
    assert plain._random.needed is False


DRAWING = [False]


def test_a_function_that_starts_drawing_later_learns_it_on_stacked_too():
    f = pm(lambda x: F.dropout(x, 0.5) if DRAWING[0] else x * 1)
    with executor("stacked"):
        f(torch.ones(N, 4))
    assert f._random.needed is False
    DRAWING[0] = True
    try:
        # Recaptured (Dynamo guards on the flag): the stacked draws are per replica, no
        # warning, and from now on a threads call runs under the streams too.
        stacked, _ = seeded_calls("stacked", f, torch.ones(N, 4), calls=1)
        assert f._random.needed is True
        threads, _ = seeded_calls("threads", f, torch.ones(N, 4), calls=1)
        assert torch.equal(stacked[0], threads[0])
    finally:
        DRAWING[0] = False


def grads_after_seed(name, pf, x, steps=3, backward=lambda out: out.unshard().sum().backward()):
    """Per call of ``pf`` on ``x`` (requiring grad) under executor ``name``
    after torch.manual_seed(0): its output and x's gradient; and the caller's
    generator state after them. The stacked executor's first backward
    recomputes the forward, later ones read the residuals it kept."""
    results = []
    with executor(name):
        torch.manual_seed(0)
        for _ in range(steps):
            leaf = x.detach().clone().requires_grad_()
            out = pf(leaf)
            backward(out)
            results.append((out.unshard(), leaf.grad))
    return results, torch.get_rng_state()


def assert_same_draws_and_grads(pf, x, **kwargs):
    expected, expected_state = grads_after_seed("threads", pf, x, **kwargs)
    got, state = grads_after_seed("stacked", pf, x, **kwargs)
    for (eo, eg), (go, gg) in zip(expected, got, strict=True):
        assert torch.equal(eo, go) and torch.equal(eg, gg), ((eo - go).abs().max(), (eg - gg).abs().max())
    assert torch.equal(expected_state, state), "the caller's generator moved differently"
    return got


def drop_twice(x):
    h = F.dropout(x.sin(), 0.5) * tp.psum(x, "i")
    return torch.nn.Dropout(0.25)(h).exp() + torch.rand_like(x)


def test_autograd_through_a_drawing_call_runs_stacked_with_the_threads_numbers():
    # The forward draws once; the first backward recomputes it with the call's
    # streams replayed, later ones read the per-replica graphs (the masks) it kept.
    got = assert_same_draws_and_grads(pm(drop_twice), torch.randn(N, 8))
    assert not torch.equal(got[0][0], got[1][0])  # each call draws new numbers


def test_a_retained_drawing_call_backpropagates_twice_as_on_threads():
    def twice(out):
        loss = out.unshard().sum()
        loss.backward(retain_graph=True)
        loss.backward()

    assert_same_draws_and_grads(pm(drop_twice), torch.randn(N, 8), backward=twice)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_first_order_create_graph_through_a_drawing_call_matches_threads():
    def with_create_graph(out):
        out.unshard().pow(2).sum().backward(create_graph=True)

    # The backward recomputes the forward under autograd (as with create_graph every time), drawing again.
    got = assert_same_draws_and_grads(pm(drop_twice), torch.randn(N, 8), backward=with_create_graph)
    assert all(grad.requires_grad for _, grad in got)


def test_a_second_derivative_through_a_stacked_draw_raises_promptly():
    pf = pm(lambda x: F.dropout(x, 0.5).pow(2))
    with executor("threads"):
        x = torch.randn(N, 3, requires_grad=True)
        (g,) = torch.autograd.grad(pf(x).unshard().sum(), x, create_graph=True)
        g.sum().backward()  # the threads executor differentiates eager autograd's graph
    with executor("stacked"):
        x = torch.randn(N, 3, requires_grad=True)
        (g,) = torch.autograd.grad(pf(x).unshard().sum(), x, create_graph=True)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"second derivative through a random op.*threads executor"):
            g.sum().backward()
        assert time.monotonic() - start < 10


def test_a_training_loop_with_dropout_and_backward_outside_matches_threads():
    def train(name):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.ReLU(), torch.nn.Linear(16, 2)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = pm(lambda x: model(F.dropout(x, 0.1)).pow(2).mean())
        x = torch.randn(N, 5, 8)
        with executor(name):
            for _ in range(4):
                opt.zero_grad()
                loss(x).unshard().sum().backward()
                opt.step()
        return [p.detach() for p in model.parameters()], torch.get_rng_state()

    (expected, expected_state), (got, state) = train("threads"), train("stacked")
    for e, g in zip(expected, got, strict=True):  # batched matmuls: close, not always the same bits
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert torch.equal(expected_state, state)  # the same draws, by the same streams


def test_a_drawing_call_keeps_its_graphs_through_saved_tensor_hooks():
    # The per-replica graphs are saved tensors: they come back from the hooks with their autograd graph.
    def under_hooks(out):
        out.unshard().sum().backward()

    pf = pm(drop_twice)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach().clone(), lambda t: t):
        assert_same_draws_and_grads(pf, torch.randn(N, 8), backward=under_hooks)


def live_graphs_of_shape(shape):
    """Real tensors of ``shape`` alive in this process that autograd recorded."""
    gc.collect()
    fake = torch._subclasses.fake_tensor.FakeTensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # isinstance on torch.distributed.reduce_op warns
        return [
            o
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and not isinstance(o, fake) and o.grad_fn is not None and o.shape == shape
        ]


def test_a_drawing_calls_per_replica_graphs_are_freed_by_its_backward():
    pf = pm(lambda x: F.dropout(x, 0.5) * 3)
    with executor("stacked"):
        pf(torch.randn(N, 64, requires_grad=True)).unshard().sum().backward()  # the first call recomputes
        out = pf(torch.randn(N, 64, requires_grad=True)).unshard()  # a later one keeps the graphs
        assert len(live_graphs_of_shape((64,))) == N  # each replica's draw and its mask
        out.sum().backward()
        assert not live_graphs_of_shape((64,))  # freed with the node's saved tensors, though out lives


def test_a_backward_after_the_pmapped_function_is_gone_replays_its_draws():
    # tp.pmap(f)(x) then backward: the capture was collected with the pmap object, its random
    # sites forgotten, and the backward raised KeyError (found by a hunt).
    x = torch.linspace(-1, 1, 12).reshape(4, 3).requires_grad_()
    grads = {}
    for how in ("threads", "stacked"):
        with executor(how):
            torch.manual_seed(5)
            y = tp.pmap(lambda r: torch.nn.functional.dropout(r, 0.3), "i", devices=devices(4))(x)
            gc.collect()
            x.grad = None
            y.unshard().sum().backward()
            grads[how] = x.grad.clone()
    assert torch.equal(grads["threads"], grads["stacked"])
