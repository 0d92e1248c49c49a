"""The batched graph's simplification: fewer nodes, the same values and aliasing."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from torchpmap._graph_passes import _STRIDED_INPUT_CHANGES_BITS, simplify
from torchpmap._stacked_collectives import replica_copies

aten = torch.ops.aten


def traced(f, *examples):
    gm = make_fx(f, tracing_mode="fake")(*examples)
    before = [node.target for node in gm.graph.nodes]
    simplify(gm)
    return gm, before, [node.target for node in gm.graph.nodes]


def test_a_constant_only_read_is_not_copied_and_identity_permutes_go():
    def f(x):
        index = torch.tensor([1, 0])  # only read: the graph's constant serves
        written = torch.tensor([0.0, 2.0])
        written.mul_(x[0, 0])  # written: a fresh copy on every run
        return x.permute(0, 1).index_select(0, index) + written

    gm = make_fx(f)(torch.ones(2, 2))
    simplify(gm)
    targets = [node.target for node in gm.graph.nodes]
    assert targets.count(aten.lift_fresh_copy.default) == 1
    assert aten.permute.default not in targets
    x = torch.arange(4.0).reshape(2, 2) + 3
    assert torch.equal(gm(x), f(x)) and torch.equal(gm(x), f(x))


def test_views_and_expands_to_the_same_shape_go_and_real_ones_stay():
    def f(x, w):
        same = x.view(2, 3).expand(2, 3).reshape(2, 3)
        return (same @ w.expand(3, 4)).view(8)

    x, w = torch.randn(2, 3), torch.randn(3, 4)
    gm, before, after = traced(f, x, w)
    assert before.count(aten.expand.default) >= 2 and aten.expand.default not in after
    assert after.count(aten.view.default) == 1  # the (2, 4) -> (8,) one
    assert torch.equal(gm(x, w), f(x, w))


def test_the_same_pure_computation_runs_once():
    def f(x, y):
        a = torch.where(y != -100, x, 0.0).sum()
        b = torch.where(y != -100, x * 2, 0.0).sum()
        return a + b

    x, y = torch.randn(5), torch.tensor([1, -100, 3, -100, 5])
    gm, before, after = traced(f, x, y)
    assert before.count(aten.ne.Scalar) == 2 and after.count(aten.ne.Scalar) == 1
    assert torch.equal(gm(x, y), f(x, y))


def test_no_merging_across_an_in_place_write():
    def f(x):
        a = x.sum()
        x.add_(1)
        return a, x.sum()

    gm, _, after = traced(f, torch.zeros(3))
    assert after.count(aten.sum.default) == 2
    assert [v.item() for v in gm(torch.zeros(3))] == [0.0, 3.0]


def test_equal_outputs_stay_two_tensors():
    def f(x):
        return x * 2, x * 2, x.view(3)

    x = torch.ones(3)
    a, b, c = traced(f, x)[0](x)
    assert a is not b and a.data_ptr() != b.data_ptr()
    assert c is not x and c.data_ptr() == x.data_ptr()  # a view stays a view


def test_signed_zero_and_nan_constants_are_not_confused():
    def f(x):
        pos, neg = x * 0.0, x * -0.0
        nan1, nan2 = x + float("nan"), x + float("nan")
        return torch.copysign(torch.ones_like(x), pos) + torch.copysign(torch.ones_like(x), neg), nan1 + nan2

    x = torch.ones(2)
    gm, _, after = traced(f, x)
    assert after.count(aten.mul.Tensor) == 2  # 0.0 and -0.0: two products
    # The two equal nan sums merge, the outputs' sums stay (one of them written into a temporary).
    assert after.count(aten.add.Tensor) + after.count(aten.add_.Tensor) == 3
    signs, nans = gm(x)
    assert torch.equal(signs, torch.zeros(2)) and bool(nans.isnan().all())


def test_a_chain_of_pointwise_ops_reuses_its_temporaries():
    def f(x, y):
        return torch.relu(x * 2 + 1) - y, x * 3

    x, y = torch.randn(4, 5).t(), torch.randn(5, 4)  # a transposed input: layouts must match
    gm, _, after = traced(f, x, y)
    assert after.count(aten.mul.Tensor) == 2  # each product is a fresh tensor
    assert aten.add_.Tensor in after and aten.relu_.default in after and aten.sub_.Tensor in after
    x0, y0 = x.clone(), y.clone()
    got, want = gm(x, y), f(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the inputs are never written
    for g, w in zip(got, want):
        assert torch.equal(g, w) and g.stride() == w.stride()


def test_no_reuse_of_a_temporary_used_twice_a_view_or_another_layout():
    def f(x, y):
        t = x * 2
        u = x * 3
        return t + 1, t * 5, u.t() + 1, (x * 4) + y  # (x * 4) broadcasts to a larger result

    x, y = torch.randn(3, 3), torch.randn(2, 3, 3)
    gm, _, after = traced(f, x, y)
    assert not any(isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable for t in after)
    assert all(torch.equal(g, w) for g, w in zip(gm(x, y), f(x, y)))


def test_an_unsafe_view_of_an_input_is_not_a_temporary_to_write_into():
    def f(x):
        return torch.ops.aten._unsafe_view(x, (6,)) + 1  # the schema says fresh; it is x's memory

    x = torch.zeros(2, 3)
    gm, _, after = traced(f, x)
    assert aten.add_.Tensor not in after
    assert torch.equal(gm(x), torch.ones(6)) and torch.equal(x, torch.zeros(2, 3))


def test_dead_views_go_and_an_unused_draw_stays():
    def f(x):
        x.view(-1)
        x.t()
        torch.rand_like(x)  # advances the generator even if unused
        return x + 1

    gm, _, after = traced(f, torch.ones(2, 2))
    assert aten.view.default not in after and aten.t.default not in after
    assert aten.rand_like.default in after


def test_checks_that_return_nothing_stay():
    # cholesky's error check and an assert return nothing: dropped, a bad value gave no error.
    def f(a, x):
        torch.linalg.cholesky(a)
        torch._assert_async((x > 0).all(), "x must be positive")
        return x + 1

    gm, before, after = traced(f, torch.eye(2), torch.ones(2))
    assert aten._linalg_check_errors.default in before
    for check in (aten._linalg_check_errors.default, aten._assert_async.msg):
        assert check in after
    with pytest.raises(RuntimeError, match="positive"):
        gm(torch.eye(2), -torch.ones(2))
    with pytest.raises(torch.linalg.LinAlgError):
        gm(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), torch.ones(2))


def _shapes_of(gm, target):
    return [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.target == target]


def test_arithmetic_on_copies_of_one_row_runs_once():
    def f(x, p):
        total = x[0] + x[1]  # fresh, only read: an all-reduce's total
        every = replica_copies(total, 4)
        update = every / 4 * 0.1
        return p - update, every, every.sum(1), update + p

    x, p = torch.randn(2, 5), torch.randn(4, 5)
    gm, before, after = traced(f, x, p)
    assert _shapes_of(gm, aten.div.Tensor) + _shapes_of(gm, aten.div_.Tensor) == [(5,)]
    assert (5,) in _shapes_of(gm, aten.mul.Tensor) + _shapes_of(gm, aten.mul_.Tensor)
    got, expected = gm(x, p), f(x, p)
    for g, e in zip(got, expected):
        assert torch.equal(g, e) and g.stride() == e.stride()
    every = got[1]  # an output is a tensor of its own rows
    assert every.stride(0) != 0
    every[0].fill_(7.0)
    assert torch.equal(every[1], expected[1][1])


def test_no_once_when_the_row_may_change_or_is_an_input():
    def written(x):
        total = x[0] + x[1]
        every = replica_copies(total, 3)
        total.add_(1)  # the stack holds the values from before
        return every * 2

    def viewed(x):
        total = x[0] + x[1]
        every = replica_copies(total, 3)
        total.view(-1).mul_(3)
        return every - 1

    def a_view(x):
        row = x[0]  # only read, but x, which it views, is written
        every = replica_copies(row, 3)
        x.add_(1)
        return every * 2

    def an_input(x):
        every = replica_copies(x, 3)
        x.add_(1)
        return every * 2

    for f in (written, viewed, a_view, an_input):
        x = torch.randn(2, 4)
        gm, _, after = traced(f, x.clone())
        assert aten.expand.default not in after, f.__name__
        assert torch.equal(gm(x.clone()), f(x.clone())), f.__name__


def test_a_pointwise_user_whose_layout_would_change_gets_a_copy():
    def f(x, y):
        every = replica_copies(x[0] * 2, 3)  # (3, 4, 5)
        other = y.permute(1, 0, 2)  # (3, 4, 5) laid out as (4, 3, 5): the kernel follows the first input's
        return torch.add(every, other), torch.add(other, every), every * y.permute(1, 0, 2)

    x, y = torch.randn(2, 4, 5), torch.randn(4, 3, 5)
    gm, _, _ = traced(f, x, y)
    for g, e in zip(gm(x, y), f(x, y)):
        assert torch.equal(g, e) and g.stride() == e.stride()


def test_no_once_when_the_copies_or_a_result_of_them_are_written_through_a_view():
    def stack_written(x):
        every = replica_copies(x[0] + x[1], 3)
        every.view(-1).add_(100)  # the (3, ...) value changes; one row would not see it
        return every * x[0]

    def some_rows_written(x):
        every = replica_copies(x[0] + x[1], 3)
        every[1:].mul_(0)
        return every / 4

    def once_result_written(x):
        every = replica_copies(x[0] + x[1], 3)
        half = every * 0.5
        half.view(-1).add_(1)
        return half + x[0]

    for f in (stack_written, some_rows_written, once_result_written):
        x = torch.arange(8.0).reshape(2, 4)
        gm, _, after = traced(f, x.clone())
        assert aten.expand.default not in after, f.__name__
        assert torch.equal(gm(x.clone()), f(x.clone())), f.__name__


def test_any_pointwise_op_runs_once_and_pointwise_readers_read_the_view():
    # Complex, half precision, alpha, transcendental: all run once, on a row
    # like the threads' per-replica tensor; readers get the broadcast view
    # except gelu_backward, whose strided path rounds differently.
    def f(x, p):
        every = replica_copies(x[0] + x[1], 4)
        once = every * every, torch.add(every, every, alpha=0.3), torch.sigmoid(every)
        readers = torch.add(p, every, alpha=0.3), every.exp() + p
        if x.is_complex():  # no complex gelu
            return *once, *readers
        return *once, *readers, torch.ops.aten.gelu_backward(p, every)

    for dtype in (torch.float32, torch.complex64, torch.float16, torch.bfloat16):
        x, p = torch.randn(2, 33, dtype=dtype), torch.randn(4, 33, dtype=dtype)
        gm, _, after = traced(f, x, p)
        assert _shapes_of(gm, aten.mul.Tensor) == [(33,)], dtype
        assert _shapes_of(gm, aten.sigmoid.default) == [(33,)], dtype
        assert (33,) in _shapes_of(gm, aten.add.Tensor), dtype
        assert aten.expand.default in after, dtype
        for node in gm.graph.nodes:
            if node.target is aten.gelu_backward.default:
                assert node.args[1].target is aten.stack.default  # the stacked copy, not the view


def _pointwise_ops_of_several_tensors():
    """Every deterministic pointwise aten overload that a traced graph can hold,
    taking two or more tensors and scalars, and returning one fresh tensor."""
    found = []
    for name in dir(aten):
        packet = getattr(aten, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            schema = op._schema
            if torch.Tag.pointwise not in op.tags or torch.Tag.nondeterministic_seeded in op.tags:
                continue
            if schema.is_mutable or any(a.alias_info for a in (*schema.arguments, *schema.returns)):
                continue
            if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
                continue  # decomposed when traced: never in a graph (ldexp is a mul and a pow)
            required = [a for a in schema.arguments if not a.has_default_value()]
            kinds = [str(a.type) for a in required]
            if len(schema.returns) == 1 and kinds.count("Tensor") >= 2 and set(kinds) <= {"Tensor", "Scalar"}:
                found.append((op, kinds))
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.float16, torch.bfloat16])
def test_the_broadcast_view_gives_every_pointwise_reader_the_rows_own_bits(dtype):
    """What justifies the readers' view: a pointwise op given (n, ...) tensors
    and a broadcast view of one row computes each row as it computes that row
    alone (the threads), for every op but those set apart."""
    ops = _pointwise_ops_of_several_tensors()
    assert len(ops) > 30  # the scan finds the ops (add, mul, lerp, addcmul, the activations' backwards...)
    compared = 0
    for op, kinds in ops:
        if op in _STRIDED_INPUT_CHANGES_BITS:
            continue
        tensors = [k for k, kind in enumerate(kinds) if kind == "Tensor"]
        for shared in tensors:  # which argument is the all-reduce's row
            for size in (33, 1027):
                torch.manual_seed(size + shared)
                row = torch.randn(size, dtype=dtype) * 2 + 0.5
                own = {k: torch.randn(4, size, dtype=dtype) * 2 + 0.5 for k in tensors if k != shared}

                def args(i, row=row, own=own, shared=shared, kinds=kinds, size=size):
                    """The arguments of replica i (``i=None``: all replicas, the row a view)."""
                    out = []
                    for k, kind in enumerate(kinds):
                        if kind == "Scalar":
                            out.append(0.7)
                        elif k == shared:
                            out.append(row.clone() if i is not None else row.unsqueeze(0).expand(4, size))
                        else:
                            out.append(own[k][i].clone() if i is not None else own[k])
                    return out

                try:
                    expected = torch.stack([op(*args(i)) for i in range(4)])
                except (RuntimeError, NotImplementedError, TypeError):
                    continue  # not defined for this dtype
                got = op(*args(None))
                same = (got == expected) | (got.isnan() & expected.isnan())
                assert bool(same.all()), (op, shared, size, int((~same).sum()))
                compared += 1
    assert compared > 20


def test_a_write_through_a_tensor_set_to_the_copies_keeps_them_stacked():
    def f(x):
        total = x[0] + x[1]
        every = replica_copies(total, 3)
        b = torch.zeros(3, 4)
        b.set_(every)  # b aliases every from here on: set_ returns it
        b.add_(1)
        return every * 2

    x = torch.randn(2, 4)
    gm, _, after = traced(f, x)
    assert aten.expand.default not in after and _shapes_of(gm, aten.mul.Tensor) == [(3, 4)]
    assert torch.equal(gm(x), f(x))


def test_true_and_1_are_not_one_argument():
    # bool + True is a logical or, bool + 1 an integer add: equal by ==, not one computation.
    def f(x):
        b = x > 0
        return (b + True) * 3, (b + 1) * 3, x * 0.0, x * complex(0.0, -0.0)

    x = torch.tensor([-1.0, 1.0, 2.0])
    gm, _, _ = traced(f, x)
    for got, expected in zip(gm(x), f(x)):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_a_replicas_own_stack_of_copies_is_computed_over_all_its_rows():
    # Only a collective's stack (replica_copies) stands for one row per replica: a replica's
    # own stack is computed in one loop over its rows, whose vectorised and scalar parts
    # split them elsewhere than a loop over one row (cosh's last bit differs here).
    def f(c):
        c2 = c * 2
        return torch.cosh(torch.stack([c2, c2]))

    torch.manual_seed(0)
    c = torch.randn(20)
    gm, _, _ = traced(f, c)
    assert _shapes_of(gm, aten.cosh.default) + _shapes_of(gm, aten.cosh_.default) == [(2, 20)]
    assert torch.equal(gm(c), f(c))


@pytest.mark.parametrize("name", ["stacked", "lockstep"])
def test_a_replicas_own_stack_and_equal_constants_give_the_threads_bits(name):
    from helpers import devices, executor

    import torchpmap as tp

    def f(x, c):
        b = x > 0
        c2 = c * 2
        return (b + True) * 3, (b + 1) * 3, torch.cosh(torch.stack([c2, c2])) + x[:1, :1]

    torch.manual_seed(0)
    x, c = torch.randn(4, 2, 20), torch.randn(20)
    results = {}
    for ex in ("threads", name):
        pf = tp.pmap(f, "i", in_axes=(0, None), devices=devices(4))
        with executor(ex):
            results[ex] = [pf(x, c) for _ in range(3)]
    for got, expected in zip(results[name], results["threads"]):
        for g, e in zip(got, expected):
            assert torch.equal(g.unshard(), e.unshard())


def test_a_collectives_copies_are_marked_in_the_stacked_graph():
    # The pass needs the mark on the collectives' stacks of the real batched graph
    # (traced under the replica vmap level), not only on a stack traced directly.
    from helpers import devices, executor

    import torchpmap as tp
    from torchpmap import _stacked

    pf = tp.pmap(lambda x: tp.psum(x, "i") * 0.5, "i", devices=devices(4))
    with executor("stacked"):
        for _ in range(2):
            pf(torch.ones(4, 3))
    (plan,) = pf._in_plans._plans.values()
    capture = plan.fast.capture
    (entry,) = _stacked._cache_entries(capture.entry.__code__)
    transformed, _ = capture._transformed(entry.code)
    # (the module holds every capture's compiled function: take the one this code calls)
    (name,) = [n for n in entry.code.co_names if n.startswith("__compiled_fn")]
    batched = transformed.__globals__[name]
    # psum's total times 0.5 runs once, on one row (3,), then every replica's copy is made.
    assert (3,) in _shapes_of(batched.graph, aten.mul.Tensor) + _shapes_of(batched.graph, aten.mul_.Tensor)
