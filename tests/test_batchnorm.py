"""SyncBatchNorm and buffer helpers: replicas trained on shards match one
BatchNorm trained on the whole batch, and keep identical buffers."""

import pytest
import torch
import torch.nn.functional as F
from helpers import devices

import torchpmap as tp

N = 4  # devices
PER = 3  # rows per device


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 8),
        torch.nn.BatchNorm1d(8, momentum=None),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).double()


def make_batches(steps, rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, rows, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
    ys = torch.randint(0, 3, (steps, rows), generator=g)
    return xs, ys


def reference(xs, ys, masks=None):
    """One model, one device, trained on the whole (unpadded) batch."""
    model = make_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        opt.step()
        outs.append(out.detach())
    return model, outs


def sync_step(model, opt, x, y):
    opt.zero_grad()
    out = model(x)
    F.cross_entropy(out, y).backward()
    tp.pmean_grads(model, "i")
    opt.step()
    return out.detach()


def sync_models():
    model = tp.convert_sync_batchnorm(make_cnn(), "i")
    return tp.replicate(model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), devices(N))


def assert_models_close(model, expected):
    for (k, v), (k2, e) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, e, rtol=1e-10, atol=1e-12, msg=k)


def test_sync_batchnorm_training_matches_whole_batch_batchnorm():
    xs, ys = make_batches(3, N * PER)
    models, opts = sync_models()
    step = tp.pmap(sync_step, "i")
    outs = [step(models, opts, x.reshape(N, PER, 2, 5, 5), y.reshape(N, PER)) for x, y in zip(xs, ys)]
    expected, expected_outs = reference(xs, ys)
    for out, e in zip(outs, expected_outs):
        torch.testing.assert_close(torch.as_tensor(out).reshape(N * PER, 3), e, rtol=1e-10, atol=1e-12)
    assert_models_close(models[0], expected)
    tp.assert_replicas_identical(models, opts)  # parameters, gradients and running statistics
    assert int(models[0][1].num_batches_tracked) == 3


def test_plain_batchnorm_drifts_apart_and_pmean_buffers_reunites_it():
    xs, ys = make_batches(1, N * PER)
    models, opts = tp.replicate(make_cnn(), lambda p: torch.optim.SGD(p, lr=0.1), devices(N))
    step = tp.pmap(sync_step, "i")
    step(models, opts, xs[0].reshape(N, PER, 2, 5, 5), ys[0].reshape(N, PER))
    with pytest.raises(AssertionError, match="running_mean"):
        tp.assert_replicas_identical(models)
    before = [m[1].running_mean.clone() for m in models]

    def reunite(model):
        tp.pmean_buffers(model, "i")
        return torch.zeros(())

    tp.pmap(reunite, "i")(models)
    tp.assert_replicas_identical(models)
    torch.testing.assert_close(models[0][1].running_mean, torch.stack(before).mean(0))


def test_broadcast_buffers_copies_the_source_replica():
    models = tp.replicate(make_cnn(), devices=devices(N))
    for i, m in enumerate(models):
        m[1].running_mean.fill_(float(i))
        m[1].running_var.fill_(float("nan") if i == 2 else 1.0 + i)
        m[1].num_batches_tracked.fill_(10 * i)

    def copy_from_2(model):
        tp.broadcast_buffers(model, "i", source=2)
        return torch.zeros(())

    tp.pmap(copy_from_2, "i")(models)
    tp.assert_replicas_identical(models)
    assert models[0][1].running_mean.eq(2.0).all() and models[0][1].running_var.isnan().all()
    assert int(models[3][1].num_batches_tracked) == 20
    with pytest.raises(ValueError, match="source"):
        tp.pmap(lambda m: tp.broadcast_buffers(m, "i", source=N) or torch.zeros(()), "i")(models)


def test_broadcast_buffers_copies_every_bit():
    # psum(where(source, b, 0)) made -0.0 +0.0 on every replica, the source's included
    models = tp.replicate(torch.nn.BatchNorm1d(3).double(), devices=devices(N))
    odd = torch.tensor([-0.0, float("nan"), float("-inf")], dtype=torch.float64)
    odd[1] = torch.tensor(0x7FF8_0000_0000_1234, dtype=torch.int64).view(torch.float64)  # a NaN payload
    for i, m in enumerate(models):
        m.running_mean.copy_(odd if i == 1 else torch.full((3,), float(i)))
    tp.pmap(lambda m: tp.broadcast_buffers(m, "i", source=1) or torch.zeros(()), "i")(models)
    for m in models:
        assert torch.equal(m.running_mean.view(torch.int64), odd.view(torch.int64))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.int8])
def test_broadcast_buffers_copies_integer_buffers(dtype):
    # uint16/32/64 have no add: their psum failed ("not implemented")
    models = tp.replicate(torch.nn.Linear(1, 1), devices=devices(N))
    for i, m in enumerate(models):
        m.register_buffer("count", torch.tensor([i % 2, 1, 0], dtype=torch.int64).to(dtype))
    tp.pmap(lambda m: tp.broadcast_buffers(m, "i", source=1) or torch.zeros(()), "i")(models)
    for m in models:
        assert torch.equal(m.count, torch.tensor([1, 1, 0], dtype=torch.int64).to(dtype))


def test_padding_rows_are_left_out_of_the_statistics_with_a_mask():
    rows = N * PER - 2  # padded to N * PER
    xs, ys = make_batches(2, rows)
    models, opts = sync_models()

    def step(model, opt, x, y, mask):
        opt.zero_grad()
        out = x
        for layer in model:  # pass the mask to every SyncBatchNorm
            out = layer(out, mask) if isinstance(layer, tp.SyncBatchNorm) else layer(out)
        per_row = F.cross_entropy(out, y, reduction="none") * mask
        loss = per_row.sum() * tp.axis_size("i") / tp.psum(mask.sum(), "i")
        loss.backward()
        tp.pmean_grads(model, "i")
        opt.step()
        return out.detach()

    pstep = tp.pmap(step, "i")
    for x, y in zip(xs, ys):
        (xb, yb), mask = tp.shard_batch((x, y), N, pad=True)
        out = pstep(models, opts, xb, yb, mask)
    expected, expected_outs = reference(xs, ys)
    real = torch.as_tensor(out).reshape(N * PER, 3)[:rows]
    torch.testing.assert_close(real, expected_outs[-1], rtol=1e-10, atol=1e-12)
    assert_models_close(models[0], expected)
    tp.assert_replicas_identical(models, opts)


@pytest.mark.parametrize("flag", [2.0, -1.0, 0.5])
def test_a_mask_is_a_flag_per_row_not_a_weight(flag):
    # A float mask of -1 gave NaN outputs and one of 2 a wrong running variance, silently: it was
    # used as a weight (found by a hunt). Any nonzero entry keeps its row, as True does.
    x = torch.randn(N, 6, 3, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool).expand(N, 6)

    def run(mask):
        bn = tp.replicate(tp.SyncBatchNorm(3, "i").double(), devices=devices(N))
        out = tp.pmap(lambda m, v, k: m(v, k), "i")(bn, x, mask)
        return out.unshard(), bn[0].running_mean, bn[0].running_var

    expected = run(keep)
    for got, want in zip(run(torch.where(keep, flag, 0.0).double()), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eval_mode_uses_running_stats_without_collectives(monkeypatch):
    model = tp.convert_sync_batchnorm(make_cnn(), "i")
    model[1].running_mean.uniform_()
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    models = tp.replicate(model, devices=devices(N))
    x = make_batches(1, N * PER)[0][0]
    import torchpmap.batchnorm as bn

    def no_psum(*args, **kwargs):
        raise AssertionError("eval mode communicated")

    monkeypatch.setattr(bn, "psum", no_psum)
    out = tp.pmap(lambda m, x: m(x), "i")(models, x.reshape(N, PER, 2, 5, 5))
    plain = make_cnn().eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(torch.as_tensor(out).reshape(N * PER, 3), plain(x).detach())


def test_convert_sync_batchnorm_refuses_what_is_no_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got int"):
        tp.convert_sync_batchnorm(3, "i")


def test_convert_sync_batchnorm_keeps_weights_buffers_and_mode():
    model = make_cnn()
    model[1].running_mean.fill_(0.5)
    model[5].eval()
    bn2 = model[1]
    converted = tp.convert_sync_batchnorm(model, "i")
    assert converted is model
    sync = model[1]
    assert type(sync) is tp.SyncBatchNorm and sync.axis_name == "i"
    assert sync.weight is bn2.weight and sync.running_mean is bn2.running_mean
    assert sync.training and not model[5].training and model[5].momentum is None
    lone = torch.nn.BatchNorm3d(5, eps=1e-3, affine=False, track_running_stats=False)
    out = tp.convert_sync_batchnorm(lone, ("i",))
    assert isinstance(out, tp.SyncBatchNorm) and out.eps == 1e-3 and out.weight is None and out.running_mean is None
    assert "axis_name=('i',)" in repr(out)
    with pytest.raises(ValueError, match="forward"):
        tp.convert_sync_batchnorm(torch.nn.LazyBatchNorm1d(), "i")


@pytest.mark.parametrize("shape", [(PER, 5), (PER, 5, 7), (PER, 5, 2, 3, 2)])
def test_sync_batchnorm_1d_2d_3d_inputs_and_no_running_stats(shape):
    torch.manual_seed(0)
    x = torch.randn(N, *shape, dtype=torch.float64)
    for track in (True, False):
        bn = tp.SyncBatchNorm(5, "i", track_running_stats=track).double()
        models = tp.replicate(bn, devices=devices(N))
        models.eval()  # without running statistics, eval mode uses (synchronised) batch statistics too
        out = tp.pmap(lambda m, x: m(x), "i")(models, x)
        plain = torch.nn.BatchNorm1d if len(shape) <= 3 else torch.nn.BatchNorm3d
        ref = plain(5, track_running_stats=track).double().eval()
        flat = x.reshape(N * PER, *shape[1:])
        torch.testing.assert_close(torch.as_tensor(out).reshape(flat.shape), ref(flat).detach())


def test_sync_batchnorm_errors():
    for bad in (5, "", ("i", 3)):
        with pytest.raises(TypeError, match="SyncBatchNorm: axis_name must be a non-empty string"):
            tp.SyncBatchNorm(5, bad)
    for bad in ("3", 0, True, 2.0):
        with pytest.raises(ValueError, match="SyncBatchNorm: num_features must be a positive int"):
            tp.SyncBatchNorm(bad, "i")
    bn = tp.SyncBatchNorm(5, "i")
    with pytest.raises(NameError, match="pmap"):
        bn(torch.randn(4, 5))
    models = tp.replicate(bn, devices=devices(N))
    with pytest.raises(ValueError, match="more than 1 value"):  # one row on one device
        tp.pmap(lambda m, x: m(x), "i")(tp.replicate(bn, devices=devices(1)), torch.randn(1, 1, 5))
    with pytest.raises(ValueError, match="channels"):
        tp.pmap(lambda m, x: m(x), "i")(models, torch.randn(N, 2, 4))
    with pytest.raises(ValueError, match="mask"):
        tp.pmap(lambda m, x: m(x, torch.ones(3)), "i")(models, torch.randn(N, 2, 5))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_mask_leaving_fewer_than_two_values_keeps_the_running_statistics(momentum):
    # The last batch of an epoch may hold one sample (or none on this axis): the unbiased
    # variance is undefined, and the running statistics must stay as they were (finite), not
    # turn NaN for good; unmasked, the same count raises (test_sync_batchnorm_errors).
    g = torch.Generator().manual_seed(0)
    bn = tp.SyncBatchNorm(3, "i", momentum=momentum).double()
    models = tp.replicate(bn, devices=devices(2))
    step = tp.pmap(lambda m, x, k: m(x, k), "i")
    x = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
    full = torch.ones(2, 2, dtype=torch.bool)
    step(models, x, full)  # one ordinary step first
    mean, var = models[0].running_mean.clone(), models[0].running_var.clone()
    for mask in ([[True, False], [False, False]], [[False, False], [False, False]]):
        out = step(models, x, torch.tensor(mask))
        assert torch.isfinite(out.unshard()).all()
        for m in models:
            torch.testing.assert_close(m.running_mean, mean, rtol=0, atol=0)
            torch.testing.assert_close(m.running_var, var, rtol=0, atol=0)
            assert int(m.num_batches_tracked) == 1
    # Two values again: the update is BatchNorm's over those rows.
    step(models, x, torch.tensor([[True, False], [True, False]]))
    ref = torch.nn.BatchNorm1d(3, momentum=momentum).double()
    ref(x.reshape(4, 3))
    ref(x[:, 0])
    torch.testing.assert_close(models[1].running_mean, ref.running_mean)
    torch.testing.assert_close(models[1].running_var, ref.running_var)


@pytest.mark.slow
def test_sync_batchnorm_compiles_fullgraph():
    xs, _ = make_batches(2, N * PER)
    models = tp.replicate(tp.convert_sync_batchnorm(make_cnn(), "i"), devices=devices(N))
    step = tp.pmap(lambda m, x: m(x), "i", compile={"backend": "aot_eager", "fullgraph": True})
    expected = make_cnn()
    for x in xs:
        xg = x.clone().requires_grad_()
        out = step(models, xg.reshape(N, PER, 2, 5, 5))
        out.unshard().square().sum().backward()
        xe = x.clone().requires_grad_()
        out_e = expected(xe)
        out_e.square().sum().backward()
        torch.testing.assert_close(out.unshard().detach().reshape(N * PER, 3), out_e.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-10, atol=1e-12)
    for k, buf in expected.named_buffers():
        torch.testing.assert_close(models[0].get_buffer(k), buf, rtol=1e-10, atol=1e-12, msg=k)
    # The caller's loss sums every replica's outputs: the replicas' gradients add up to the whole's.
    for k, p in expected.named_parameters():
        summed = sum(m.get_parameter(k).grad for m in models)
        torch.testing.assert_close(summed, p.grad, rtol=1e-10, atol=1e-12, msg=k)
    for m in models:
        m.zero_grad()
    tp.assert_replicas_identical(models)


def test_low_precision_input_keeps_float32_statistics():
    torch.manual_seed(0)
    x = (torch.randn(N, PER * 2, 5, 3) * 3 + 2).bfloat16()
    models = tp.replicate(tp.SyncBatchNorm(5, "i"), devices=devices(N))
    out = tp.pmap(lambda m, x: m(x), "i")(models, x)
    ref = torch.nn.BatchNorm1d(5)
    expected = ref(x.reshape(N * PER * 2, 5, 3).float())  # statistics in float32, as torch does for bfloat16
    assert out.dtype == torch.bfloat16
    got = torch.as_tensor(out).reshape(expected.shape).float()
    torch.testing.assert_close(got, expected.detach(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(models[0].running_var, ref.running_var)
    tp.assert_replicas_identical(models)


def test_a_shared_sync_batchnorm_written_by_the_replicas_is_not_told_to_use_one():
    # The error for a closed-over module the replicas train said "tp.SyncBatchNorm for BatchNorm
    # statistics", about a module that was one (found by a hunt).
    bn = tp.SyncBatchNorm(3, "i")
    with pytest.raises(RuntimeError, match="a SyncBatchNorm too: its collectives keep each replica's own copy equal"):
        tp.pmap(lambda x: bn(x), "i", devices=devices(2))(torch.randn(2, 4, 3))
