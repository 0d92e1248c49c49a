"""Data-parallel training: both idioms match single-device training."""

import functools
import gc
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import devices, module_train_step
from torch.func import grad_and_value
from torch.optim.optimizer import register_optimizer_step_pre_hook

import torchpmap as tp
from torchpmap import _pmap, _shared_state

ROOT = Path(__file__).resolve().parent.parent


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_data(steps, n, per_device, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, n * per_device, 6, generator=g)
    ys = torch.randint(0, 3, (steps, n * per_device), generator=g)
    return xs, ys


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def single_device(opt_name, xs, ys):
    model = make_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("n", [1, 2, 4])
def test_module_idiom_matches_single_device(opt_name, n):
    steps, per = 4, 5
    xs, ys = make_data(steps, n, per)
    devices = helpers.devices(n)
    models, opts = tp.replicate(make_model(), OPTIMIZERS[opt_name], devices)
    step = tp.pmap(module_train_step, "i")
    for x, y in zip(xs, ys):
        step(models, opts, x.reshape(n, per, 6), y.reshape(n, per))
        # Replicas stay bit-identical, step after step.
        for m in models:
            for p, p0 in zip(m.parameters(), models[0].parameters()):
                assert torch.equal(p, p0)
    expected = single_device(opt_name, xs, ys)
    for k, v in models[0].named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=1e-5, atol=1e-6)


def sgd_momentum_update(p, g, state, lr=0.1, beta=0.9):
    # torch.optim.SGD starts its buffer at the first gradient: beta * 0 + g.
    buf = {k: beta * state["buf"][k] + g[k] for k in p}
    return {k: p[k] - lr * buf[k] for k in p}, {"buf": buf}


def adamw_update(p, g, state, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    t = state["t"] + 1
    m = {k: b1 * state["m"][k] + (1 - b1) * g[k] for k in p}
    v = {k: b2 * state["v"][k] + (1 - b2) * g[k] ** 2 for k in p}
    new = {}
    for k in p:
        decayed = p[k] * (1 - lr * wd)
        m_hat = m[k] / (1 - b1**t)
        v_hat = v[k] / (1 - b2**t)
        new[k] = decayed - lr * m_hat / (v_hat.sqrt() + eps)
    return new, {"m": m, "v": v, "t": t}


UPDATES = {"sgd_momentum": sgd_momentum_update, "adamw": adamw_update}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("n", [2, 4])
def test_functional_idiom_matches_single_device(opt_name, n):
    steps, per = 4, 5
    xs, ys = make_data(steps, n, per)
    model = make_model()
    update = UPDATES[opt_name]

    def train_step(params, state, x, y):
        def loss_fn(p):
            return F.cross_entropy(tp.functional_call(model, p, (x,)), y)

        grads, loss = grad_and_value(loss_fn)(params)
        grads = tp.pmean(grads, "i")
        params, state = update(params, grads, state)
        return params, state, tp.pmean(loss, "i")

    params = tp.params_of(model)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    if opt_name == "sgd_momentum":
        state = {"buf": zeros}
    else:
        state = {"m": zeros, "v": zeros, "t": torch.tensor(0.0)}
    devices = helpers.devices(n)
    rp = tp.device_put_replicated(params, devices)
    rs = tp.device_put_replicated(state, devices)
    step = tp.pmap(train_step, "i")
    for x, y in zip(xs, ys):
        rp, rs, loss = step(rp, rs, x.reshape(n, per, 6), y.reshape(n, per))
    expected = single_device(opt_name, xs, ys)
    for k in expected:
        for shard in rp[k].shards:
            torch.testing.assert_close(shard, expected[k], rtol=1e-5, atol=1e-6)


def test_functional_call_is_safe_across_replicas():
    # torch.func.functional_call on one shared module races between replica
    # threads; tp.functional_call gives every replica the right parameters.
    model = make_model()
    params = tp.params_of(model)
    x = torch.randn(4, 5, 6)

    def grads(p, x):
        return torch.func.grad(lambda p: tp.functional_call(model, p, (x,)).square().sum())(p)

    out = tp.pmap(grads)(tp.device_put_replicated(params, devices(4)), x)
    for r in range(4):
        ref = torch.func.grad(lambda p, r=r: torch.func.functional_call(model, p, (x[r],)).square().sum())(params)
        for k in ref:
            torch.testing.assert_close(out[k].shards[r], ref[k])


class _Scaled(torch.nn.Module):
    """A module whose forward reads a Python attribute, a buffer that is not
    passed, and dropout's training flag."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 6)
        self.drop = torch.nn.Dropout(0.5)
        self.register_buffer("offset", torch.zeros(6))
        self.factor = 2.0

    def forward(self, x):
        return self.drop(self.linear(x)) * self.factor + self.offset


# How close a replica's matmul comes to eager's: the same bits on the threads; a batched
# matmul may round otherwise (it does on AVX-512 CPUs), so float32 rounding on "stacked".
_MATMUL_BITS = {"threads": dict(rtol=0, atol=0), "stacked": dict(rtol=1.3e-6, atol=1e-6)}


@pytest.mark.parametrize("name", ["threads", "stacked"])
def test_functional_call_sees_the_module_as_it_is_at_each_call(name):
    """Each call reads the module as it is then: a later eval(), a changed
    attribute, a buffer or parameter changed and not passed (replicas once
    used a copy of the module made at their first call)."""
    torch.manual_seed(0)
    model = _Scaled()
    weights = {"linear.weight": model.linear.weight.detach()}  # the bias is not passed
    x = torch.randn(4, 3, 6)
    pf = tp.pmap(lambda p, x: tp.functional_call(model, p, (x,)), in_axes=(None, 0), devices=devices(4))
    with helpers.executor(name):
        pf(weights, x)  # dropout on: a first call under training mode
        pf(weights, x)
        model.eval()
        model.factor = 3.0
        with torch.no_grad():
            model.offset.fill_(0.5)
            model.linear.bias.add_(1.0)
        got = pf(weights, x)
        got = pf(weights, x)  # under "stacked", a recapture at the changed guards
    with torch.no_grad():
        expected = torch.stack([model(x[i]) for i in range(4)])  # per replica: a matmul of its rows
    torch.testing.assert_close(got.unshard(), expected, **_MATMUL_BITS[name])


class _BoundMethods(torch.nn.Module):
    """A method chosen at construction and a forward hook that is a bound
    method: both must see the tensors passed, as with torch.func."""

    __slots__ = ("label",)

    def __init__(self):
        super().__init__()
        self.label = "slot"  # a __slots__ attribute the forward reads
        self.linear = torch.nn.Linear(3, 3)
        self._impl = self._through_linear
        self.linear.register_forward_hook(self._penalty)

    def _through_linear(self, x):
        return self.linear(x)

    def _penalty(self, module, inputs, out):
        return out + self.linear.weight.sum()

    def forward(self, x):
        assert self.label == "slot"
        return self._impl(x)


@pytest.mark.parametrize("name", ["threads", "stacked"])
def test_functional_call_binds_the_modules_methods_and_hooks_to_what_it_swaps_into(name):
    torch.manual_seed(0)
    model = _BoundMethods()
    params = {k: torch.randn(4, *v.shape) for k, v in tp.params_of(model).items()}
    x = torch.randn(4, 2, 3)
    expected = torch.stack(
        [torch.func.functional_call(model, {k: v[i] for k, v in params.items()}, (x[i],)) for i in range(4)]
    )
    pf = tp.pmap(lambda p, x: tp.functional_call(model, p, (x,)), devices=devices(4))
    with helpers.executor(name):
        pf(params, x)
        got = pf(params, x)
    torch.testing.assert_close(got.unshard(), expected, **_MATMUL_BITS[name])


def test_functional_call_takes_torch_funcs_strict_and_tie_weights():
    model = make_model()
    params = tp.params_of(model)
    partial = dict(list(params.items())[1:])
    x = torch.randn(4, 2, params[next(iter(params))].shape[1])
    with pytest.raises(RuntimeError, match="Missing key"):
        tp.pmap(lambda p, x: tp.functional_call(model, p, (x,), strict=True), in_axes=(None, 0))(partial, x)
    got = tp.pmap(lambda p, x: tp.functional_call(model, p, (x,), tie_weights=False), in_axes=(None, 0))(params, x)
    torch.testing.assert_close(got.shards[1], torch.func.functional_call(model, params, (x[1],)))


def test_pmean_grads_buckets(monkeypatch):
    helpers.devices(2)  # maps 2 replicas on the default devices
    calls = []
    real = tp.training.pmean
    monkeypatch.setattr(tp.training, "pmean", lambda x, name: calls.append(x.numel()) or real(x, name))
    model = make_model()
    # The parameters' gradients and one flag per parameter (whether the replica has its gradient).
    n_params = sum(p.numel() + 1 for p in model.parameters())

    def step(m, x):
        m(x).sum().backward()
        tp.pmean_grads(m, "i")
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    models = tp.replicate(make_model(), devices=tp.local_devices()[:2])
    x = torch.randn(2, 3, 6)
    out = tp.pmap(step, "i")(models, x)
    assert calls == [n_params, n_params]  # one flat collective per replica
    expected = []
    for r in range(2):
        m = make_model()
        m(x[r]).sum().backward()
        expected.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    torch.testing.assert_close(out.shards[0], (expected[0] + expected[1]) / 2)
    calls.clear()
    models = tp.replicate(make_model(), devices=tp.local_devices()[:2])
    tp.pmap(lambda m, x: step_small(m, x), "i")(models, x)
    assert len(calls) > 2 and sum(calls) == 2 * n_params  # several small buckets


def test_pmean_grads_counts_a_gradient_only_some_replicas_have_as_zero_elsewhere():
    # Replica 0 takes branch a, replica 1 branch b (mixture-of-experts routing): the flat
    # buffers must not pair a's gradient with b's, and both replicas end with both averages.
    class TwoBranches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2, bias=False)
            self.b = torch.nn.Linear(2, 2, bias=False)
            self.unused = torch.nn.Linear(2, 2, bias=False)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.b(x)

    torch.manual_seed(0)
    model = TwoBranches()
    devs = devices(2)
    models = tp.replicate(model, devices=devs)

    def step(m, x):
        m(x).sum().backward()
        tp.pmean_grads(m, "i")
        return torch.zeros(())

    x = torch.stack([torch.ones(1, 2), -torch.ones(1, 2)])
    with helpers.executor("threads"):
        tp.pmap(step, "i", devices=devs)(models, x)
    ref = TwoBranches()
    ref.load_state_dict(model.state_dict())
    (ref.a(x[0]).sum() / 2 + ref.b(x[1]).sum() / 2).backward()
    for m in models:
        torch.testing.assert_close(m.a.weight.grad, ref.a.weight.grad)
        torch.testing.assert_close(m.b.weight.grad, ref.b.weight.grad)
        assert m.unused.weight.grad is None  # no replica has it: left alone


def test_pmean_grads_names_a_sparse_gradient():
    models = tp.replicate(torch.nn.Embedding(5, 2, sparse=True), devices=devices(2))

    def step(m, idx):
        m(idx).sum().backward()
        tp.pmean_grads(m, "i")
        return torch.zeros(())

    with pytest.raises(TypeError, match="pmean_grads: parameter 'weight' has a torch.sparse_coo gradient"):
        tp.pmap(step, "i", devices=devices(2))(models, torch.tensor([[0, 1], [1, 2]]))


@pytest.mark.parametrize("params, match", [(torch.ones(2), "got one tensor"), ([torch.ones(2), 3], "entry 1 is a int")])
def test_pmean_grads_names_what_is_not_parameters(params, match):
    with pytest.raises(TypeError, match=match):
        tp.pmap(lambda x: tp.pmean_grads(params, "i") or x, "i", devices=devices(2))(torch.ones(2))


def step_small(m, x):
    m(x).sum().backward()
    tp.pmean_grads(m, "i", bucket_mb=100 / 2**20)  # ~100 bytes a bucket
    return torch.zeros(())


def test_per_replica_errors():
    models = tp.replicate(make_model(), devices=devices(4)[:2])
    with pytest.raises(ValueError, match="PerReplica made for devices"):
        tp.pmap(lambda m, x: x, devices=devices(4)[2:4])(models, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="in_axes must be 0"):
        tp.pmap(lambda m, x: x, in_axes=(None, 0))(models, torch.zeros(2, 1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        tp.replicate(make_model(), lambda p: "sgd", tp.local_devices()[:2])
    with pytest.raises(ValueError, match="replicate: devices must not be empty"):
        tp.replicate(make_model(), devices=[])
    twice = tp.replicate(make_model(), devices=[tp.local_devices()[0]] * 2)  # two replicas on one device: two copies
    assert twice[0] is not twice[1] and twice[0][0].weight.data_ptr() != twice[1][0].weight.data_ptr()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: tp.PerReplica(3, devices(2)), "PerReplica: values must be a sequence of one value per device"),
        (lambda: tp.params_of(3), "params_of: module must be an nn.Module, got int"),
        (lambda: tp.functional_call(3, {}, (torch.ones(1),)), "functional_call: module must be an nn.Module"),
        (lambda: tp.pmean_grads(3, "i"), "pmean_grads: params must be a module or an iterable of parameters, got int"),
        (lambda: tp.shard_batch(torch.ones(10, 2), 4, pad="yes"), "shard_batch: pad must be True or False, got 'yes'"),
    ],
)
def test_a_wrong_type_is_named_at_once(call, message):
    """A hunt found these failing deep inside (\"'int' object is not iterable\") or accepted."""
    with pytest.raises(TypeError, match=message):
        call()


def test_what_the_argument_checks_still_take():
    """A tensor's elements as PerReplica values, numpy and int flags."""
    import numpy as np

    per = tp.PerReplica(torch.arange(2.0) * 10, devices(2))
    assert [v.item() for v in per] == [0.0, 10.0]
    (x,), mask = tp.shard_batch((torch.ones(6, 2),), 4, pad=np.True_)
    assert x.shape == (4, 2, 2) and mask.sum() == 6


def test_replicas_that_would_change_one_object_are_refused():
    # Each replica steps its module and optimizer in place: one object for several replicas
    # raced, and the training came out silently wrong (found by a hunt).
    ds = devices(4)[:2]
    model = make_model()
    with pytest.raises(ValueError, match=r"replicas 0 and 1 share one trainable parameter \(0.weight\)"):
        tp.PerReplica([model.to("cpu") for _ in ds], ds)  # .to returns the module itself
    shared = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"share one trainable parameter \(0.weight\)"):
        tp.PerReplica([torch.nn.Sequential(shared, torch.nn.ReLU()) for _ in ds], ds)
    models = tp.replicate(make_model(), devices=ds)
    opt = torch.optim.SGD(models[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"share one SGD"):
        tp.PerReplica([opt, opt], ds)
    with pytest.raises(ValueError, match=r"share one optimizer \(SGD\)"):
        tp.PerReplica([torch.optim.lr_scheduler.StepLR(opt, 1) for _ in ds], ds)
    with pytest.raises(ValueError, match="over the parameters it is given"):
        tp.replicate(model, lambda params: torch.optim.SGD(model.parameters(), lr=0.1), ds)
    # A tensor learning rate closed over by the factory: every replica's LR scheduler decayed
    # the one tensor in place, n times per step (found by a hunt).
    lr = torch.tensor(0.1)
    with pytest.raises(ValueError, match=r"share one tensor hyperparameter 'lr' of its SGD.*lr=lr.clone\(\)"):
        tp.replicate(make_model(), lambda params: torch.optim.SGD(params, lr=lr), ds)
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    with pytest.raises(ValueError, match=r"share one tensor hyperparameter 'betas' of its Adam"):
        tp.replicate(make_model(), lambda params: torch.optim.Adam(params, betas=betas), ds)
    _, opts = tp.replicate(make_model(), lambda params: torch.optim.SGD(params, lr=lr.clone()), ds)
    scheds = tp.PerReplica([torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5) for o in opts], ds)
    scheds.step()
    assert [float(o.param_groups[0]["lr"]) for o in opts] == [float(torch.tensor(0.1) * 0.5)] * 2
    norm = torch.nn.BatchNorm1d(3, affine=False)
    with pytest.raises(ValueError, match=r"share one buffer of a module in training mode \(1.running_mean\)"):
        tp.PerReplica([torch.nn.Sequential(torch.nn.Linear(3, 3), norm) for _ in ds], ds)
    # What the replicas only read may be shared: a frozen embedding, buffers in eval mode, tensors.
    frozen = torch.nn.Embedding(5, 3).requires_grad_(False)
    tp.PerReplica([torch.nn.Sequential(frozen, torch.nn.Linear(3, 3)) for _ in ds], ds)
    tp.PerReplica([torch.nn.Sequential(torch.nn.Linear(3, 3), norm.eval()) for _ in ds], ds)
    tp.PerReplica([torch.zeros(3)] * 2, ds)
    tp.PerReplica([0.5, 0.5], ds)


@pytest.mark.parametrize("bucket_mb", [float("nan"), -1, 0, float("inf"), "25", True])
def test_a_bucket_size_that_is_not_a_positive_number_is_named(bucket_mb):
    model = torch.nn.Linear(2, 2)
    for fn in (tp.pmean_grads, tp.pmean_buffers):
        with pytest.raises(ValueError, match="bucket_mb must be a positive number"):
            fn(model, "i", bucket_mb=bucket_mb)


def test_shard_batch_errors_and_padding():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    with pytest.raises(ValueError, match="batch size 10 is not a multiple of the 4 devices"):
        tp.shard_batch((x, y), 4)
    (xs, ys), mask = tp.shard_batch((x, y), 4, pad=True)
    assert xs.shape == (4, 3, 1) and ys.shape == (4, 3) and mask.shape == (4, 3)
    assert mask.sum() == 10 and not mask[-1, -1] and mask[0, 0]
    torch.testing.assert_close(xs.reshape(-1, 1)[mask.reshape(-1)], x)
    even = tp.shard_batch({"x": x}, 5)
    assert even["x"].shape == (5, 2, 1)


def test_masked_training_on_uneven_batch_matches_single_device():
    n, b = 4, 10  # 10 rows over 4 devices: padded to 12 with a mask
    xs, ys = make_data(3, 1, b)
    models, opts = tp.replicate(make_model(), OPTIMIZERS["sgd_momentum"], helpers.devices(n))

    def step(model, opt, x, y, mask):
        opt.zero_grad()
        per_row = F.cross_entropy(model(x), y, reduction="none") * mask
        loss = per_row.sum() * tp.axis_size("i") / tp.psum(mask.sum(), "i")
        loss.backward()
        tp.pmean_grads(model, "i")
        opt.step()
        return loss.detach()

    pstep = tp.pmap(step, "i")
    for x, y in zip(xs, ys):
        (xb, yb), mask = tp.shard_batch((x, y), n, pad=True)
        pstep(models, opts, xb, yb, mask.float())
    expected = single_device("sgd_momentum", xs, ys)
    for k, v in models[0].named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.subprocess
@pytest.mark.parametrize("idiom", ["module", "functional"])
def test_train_digits_example_reaches_95_percent(idiom, tmp_path):
    plot = tmp_path / "loss.png"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--idiom", idiom, "--quiet", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "TORCHPMAP_CPU_DEVICES": "4"},
    )
    assert out.returncode == 0, out.stderr
    acc = float(out.stdout.split("test accuracy:")[1].split()[0])
    assert acc > 0.95
    assert plot.stat().st_size > 1000


# -- one module or optimizer shared by every replica ---------------------------------------
def shared_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return torch.zeros(())


def test_shared_optimizer_is_refused_before_any_replica_runs():
    helpers.devices(2)  # maps 2 replicas on the default devices
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(2, 3, 6), torch.randint(0, 3, (2, 3))
    step = tp.pmap(shared_step, "i", in_axes=(None, None, 0, 0))
    with pytest.raises(ValueError, match=r"args\[1\] is an optimizer \(SGD\) passed broadcast \(in_axes=None\)") as e:
        step(model, opt, x, y)
    assert "torchpmap.replicate(" in str(e.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing ran
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(ValueError, match=r"args\[0\]\['s'\] is an LR scheduler \(StepLR\)"):
        tp.pmap(lambda s, x: x, in_axes=(None, 0))({"s": sched}, x)
    with pytest.raises(ValueError, match=r"args\[0\] is an optimizer .* passed static"):
        tp.pmap(lambda o, x: x, static_broadcasted_argnums=0)(opt, x)
    # One replica sharing with the caller is plain single-device training.
    tp.pmap(shared_step, "i", in_axes=(None, None, 0, 0))(model, opt, x[:1], y[:1])


def test_each_call_watches_the_modules_it_passes_not_the_first_calls():
    # A plan is per signature: a later call of the same signature may pass another module
    # of the same type. The plan kept the first call's module, watched it instead of this
    # call's, and the replicas raced on the second module's running statistics silently.
    import gc
    import weakref

    helpers.devices(4)
    f = tp.pmap(lambda m, x: m(x), in_axes=(None, 0), devices=devices(4))
    x = torch.randn(4, 8, 3)
    first = torch.nn.BatchNorm1d(3).eval()  # reads its statistics only: fine shared
    f(first, x)
    second = torch.nn.BatchNorm1d(3).train()  # writes them: four replicas would race
    with pytest.raises(RuntimeError, match=r"wrote args\[0\]\.num_batches_tracked in place"):
        f(second, x)
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None  # the plan keeps no module alive
    g = tp.pmap(lambda o, x: x, in_axes=(None, 0), devices=devices(4))
    g(make_model(), x)
    with pytest.raises(ValueError, match=r"args\[0\] is an optimizer \(SGD\) passed broadcast"):
        g(opt, x)  # (another type: another plan, refused as the first call would be)


def test_shared_module_written_by_replicas_raises():
    model = make_model()
    x, y = torch.randn(2, 3, 6), torch.randint(0, 3, (2, 3))

    def sgd_step(model, x, y):
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        return torch.zeros(())

    with pytest.raises(RuntimeError, match=r"args\[0\]\.0\.weight in place, but args\[0\] is an nn.Module") as e:
        tp.pmap(sgd_step, "i", in_axes=(None, 0, 0))(model, x, y)
    assert "torchpmap.replicate(" in str(e.value) and "all 2 replicas" in str(e.value)

    def backward_only(model, x, y):
        F.cross_entropy(model(x), y).backward()
        return torch.zeros(())

    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"wrote args\[0\]\.0\.weight\.grad"):
        tp.pmap(backward_only, "i", in_axes=(None, 0, 0))(model, x, y)

    bn = torch.nn.BatchNorm1d(6)  # training mode: forward updates the running stats and count
    with pytest.raises(RuntimeError, match=r"wrote args\[0\]\.(running_mean|num_batches_tracked) in place"):
        tp.pmap(lambda m, x: m(x), in_axes=(None, 0))(bn, x)


def test_shared_module_read_only_works():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6)).eval()
    x = torch.randn(4, 3, 6)
    out = tp.pmap(lambda m, x: m(x), in_axes=(None, 0))(model, x)
    for r in range(4):
        torch.testing.assert_close(out.shards[r], model(x[r]))
    # In training mode too, as long as no replica writes it (no BatchNorm, no backward into it).
    mlp = make_model()
    out = tp.pmap(lambda m, x: m(x).detach(), static_broadcasted_argnums=0)(mlp, x)
    torch.testing.assert_close(out.shards[1], mlp(x[1]).detach())


# A module and a tensor at module level: what a pmapped function may reach as globals.
GLOBAL_BN = torch.nn.BatchNorm1d(6)
GLOBAL_COUNT = torch.zeros(())


def uses_the_global_batchnorm(x):
    return GLOBAL_BN(x)


def counts_calls(x):
    GLOBAL_COUNT.add_(1)
    return x * 2


GLOBAL_OPT = torch.optim.SGD([torch.zeros(6, requires_grad=True)], lr=0.1)


def steps_the_global_optimizer(x):
    p = GLOBAL_OPT.param_groups[0]["params"][0]
    p.grad = x.mean(0).detach()
    GLOBAL_OPT.step()
    return x * 1


def loss_of_the_global_batchnorm(x):
    return uses_the_global_batchnorm(x).sum()  # a helper of the same module reaches it


def closing_over(bn):
    return lambda x: bn(x)


class Trainer:
    def __init__(self):
        self.bn = torch.nn.BatchNorm1d(6)

    def step(self, x):
        return self.bn(x)


@pytest.mark.parametrize("executor", ["threads", "stacked"])
@pytest.mark.parametrize(
    "make, written",
    [
        (lambda: closing_over(torch.nn.BatchNorm1d(6)), r"bn\.(running_mean|num_batches_tracked) in place, but bn "),
        (lambda: uses_the_global_batchnorm, r"GLOBAL_BN\.(running_mean|num_batches_tracked)"),
        (lambda: loss_of_the_global_batchnorm, r"GLOBAL_BN\.(running_mean|num_batches_tracked)"),
        (lambda: Trainer().step, r"Trainer\.bn\.(running_mean|num_batches_tracked)|Trainer whose method"),
        (lambda: torch.nn.BatchNorm1d(6), r"BatchNorm1d\.(running_mean|num_batches_tracked)"),
        (lambda: counts_calls, r"GLOBAL_COUNT in place, but GLOBAL_COUNT is a tensor"),
        (
            lambda: functools.partial(lambda bn, x: bn(x), torch.nn.BatchNorm1d(6)),
            r"functools.partial argument 0\.(running_mean|num_batches_tracked)",
        ),
        (
            lambda: functools.partial(loss_of_the_global_batchnorm),
            r"GLOBAL_BN\.(running_mean|num_batches_tracked)",
        ),
        (
            lambda: steps_the_global_optimizer,
            r"GLOBAL_OPT\.param_groups\[0\]\['params'\]\[0\].* is an optimizer \(SGD\)",
        ),
    ],
    ids=["closure", "global", "helper", "method", "module", "tensor", "partial", "partial_helper", "optimizer"],
)
def test_state_the_replicas_share_without_being_passed_it_raises_when_written(executor, make, written):
    # BatchNorm's running statistics in training mode, written by every replica of
    # one shared module: a race (a result that changes from run to run) without the check.
    fun = make()
    x = torch.randn(4, 3, 6)
    with helpers.executor(executor, allow_fallback=True):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=written) as e:
            tp.pmap(fun, "i")(x)
        assert time.monotonic() - start < 30
    assert "all 4 replicas" in str(e.value)
    # One replica sharing with the caller is plain single-device work.
    tp.pmap(fun, "i")(x[:1])


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
def test_a_closed_over_tensor_written_from_a_later_call_on_raises_on_that_call(executor):
    # The closed-over state was checked on the first call, when it changed, and every 32nd
    # call: a write behind a Python flag turned on later raced (threads) or ran once per
    # call (stacked) for up to 31 calls (found by a hunt). Tensors are checked every call.
    acc = torch.zeros(3)
    update = [False]

    def f(x):
        if update[0]:
            acc.add_(1)
        return x * 2

    pf = tp.pmap(f, "i", devices=helpers.devices(4))
    with helpers.executor(executor, allow_fallback=True):
        for _ in range(3):  # the stacked fast path from the second call on
            pf(torch.zeros(4, 3))
        update[0] = True
        with pytest.raises(RuntimeError, match=r"wrote acc in place, but acc is a tensor"):
            pf(torch.zeros(4, 3))


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
def test_closed_over_statistics_that_batch_norm_updates_raise(executor):
    # aten's batch_norm writes the running statistics without counting a version, so the
    # version check saw nothing: the replicas raced, never reported (found by a hunt).
    # The same tensors passed broadcast raised already.
    rm, rv = torch.zeros(3), torch.ones(3)
    pf = tp.pmap(lambda x: F.batch_norm(x, rm, rv, training=True), "i", devices=helpers.devices(4))
    with helpers.executor(executor, allow_fallback=True):
        with pytest.raises(RuntimeError, match=r"wrote (rm|rv) in place, but (rm|rv) is a tensor"):
            pf(torch.randn(4, 5, 3))


class CountsInTraining(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        if self.training:
            self.count.add_(1)
        return self.lin(x)


@pytest.mark.parametrize("executor", ["threads", "stacked", "lockstep"])
@pytest.mark.parametrize("switch", ["submodule_mode", "flag"])
def test_a_closed_over_module_written_from_a_later_call_on_raises_on_that_call(executor, switch):
    # Modules were checked on the first call, when the top module or its mode changed, and
    # every 32nd call: a submodule switched to training (or a write behind a flag) raced on
    # the threads or counted once per call stacked for up to 31 calls. Their tensors'
    # versions are read on every call now.
    model = torch.nn.Sequential(CountsInTraining()).eval()
    write = [False]

    def f(x):
        y = model(x)
        if write[0]:
            model[0].lin.bias.add_(1)  # (the call runs under no_grad)
        return y

    pf = tp.pmap(f, "i", devices=helpers.devices(4))
    with helpers.executor(executor, allow_fallback=True), torch.no_grad():
        for _ in range(3):  # the stacked fast path from the second call on
            pf(torch.zeros(4, 3))
        if switch == "submodule_mode":
            model[0].train()  # the top module stays in eval mode
            written = r"model\.0\.count in place"
        else:
            write[0] = True
            written = r"model\.0\.lin\.bias in place"
        with pytest.raises(RuntimeError, match=written + r".*nn\.Module that the function reaches"):
            pf(torch.zeros(4, 3))


def test_the_fast_path_does_not_keep_a_module_the_function_stopped_reaching():
    model = torch.nn.Linear(3, 3)
    model_ref = weakref.ref(model)

    def f(x):
        return model(x)

    pf = tp.pmap(f, "i", devices=helpers.devices(2))
    with helpers.executor("stacked"), torch.no_grad():
        for _ in range(3):  # the fast path watches the model's tensors
            pf(torch.zeros(2, 3))
        assert [path for path, _ in _shared_state.reached_by(f)] == ["model"]
        model = torch.nn.Linear(3, 3)  # the closure's cell now holds another model
        gc.collect()
        assert model_ref() is None
        assert torch.equal(pf(torch.ones(2, 3)).unshard(), model(torch.ones(2, 3)).expand(2, 3))


class Simulation:
    def __init__(self):
        self.state = torch.zeros(4, 3)

    def step(self, s):  # each replica advances its own row of self.state, passed mapped
        s.add_(0.5)
        return s.sum()


class cfg:
    shared_offset = 0.5


shared_offset = torch.zeros(4, 3)  # a global of that name, mapped over the replicas below


def adds_cfg_offset(v):
    v.add_(cfg.shared_offset)  # an attribute load, not the global
    return v.sum()


def test_writes_through_the_calls_own_arguments_are_not_shared_state():
    sim = Simulation()
    tp.pmap(sim.step, "i")(sim.state)  # self.state is the mapped argument: each replica its row
    assert torch.equal(sim.state, torch.full((4, 3), 0.5))
    shared_offset.zero_()  # (the test runs once per executor in one process)
    tp.pmap(adds_cfg_offset, "i")(shared_offset)
    assert torch.equal(shared_offset, torch.full((4, 3), 0.5))
    # An attribute load (cfg.shared_offset) is no use of the global of that name.
    assert "shared_offset" not in [path for path, _ in _shared_state.reached_by(adds_cfg_offset)]


@torch.no_grad()
def decorated_batchnorm(x):
    return GLOBAL_BN(x)


def test_a_decorated_function_is_looked_into():
    with pytest.raises(RuntimeError, match=r"GLOBAL_BN\.(running_mean|num_batches_tracked) in place"):
        tp.pmap(decorated_batchnorm, "i")(torch.randn(4, 3, 6))


WRITE_NOW = [False]
COUNTER = torch.zeros(())


def counts_sometimes(x):
    if WRITE_NOW[0]:
        COUNTER.add_(1)
    return x * 2


def test_state_the_function_reaches_is_checked_when_its_mode_changes_and_every_few_calls():
    # The check runs on the first call, after a module's train/eval mode changes, and every
    # _RECHECK_EVERY calls: a write that starts later is still caught, within that many calls.
    bn = torch.nn.BatchNorm1d(6).eval()
    pf = tp.pmap(lambda x: bn(x), "i")
    x = torch.randn(4, 3, 6)
    for _ in range(3):
        pf(x)
    bn.train()
    with pytest.raises(RuntimeError, match=r"bn\.(running_mean|num_batches_tracked) in place"):
        pf(x)
    pf = tp.pmap(counts_sometimes, "i")
    pf(x)
    WRITE_NOW[0] = True
    try:
        with pytest.raises(RuntimeError, match="COUNTER in place"):
            for _ in range(_pmap._RECHECK_EVERY + 1):
                pf(x)
    finally:
        WRITE_NOW[0] = False


def test_a_write_to_reached_state_raises_again_on_the_next_call():
    """A caller that catches the error and calls again is told again (the
    check once ran only on the first call of an unchanged mode)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6))
    params = {k: v.detach() for k, v in model.named_parameters()}  # the buffers not passed
    pf = tp.pmap(lambda p, x: tp.functional_call(model, p, (x,)), in_axes=(None, 0))
    x = torch.randn(4, 3, 6)
    for _ in range(3):
        with pytest.raises(RuntimeError, match=r"model\.1\.(running_mean|num_batches_tracked) in place"):
            pf(params, x)


def test_a_call_that_fails_before_the_replicas_run_leaves_reached_state_checked():
    bn = torch.nn.BatchNorm1d(3)  # training mode: the forward writes its statistics
    all_devices = devices(8)
    pf = tp.pmap(lambda x, extra: bn(x) + extra, devices=all_devices[:4])
    x = torch.randn(4, 5, 3)
    good = tp.PerReplica([torch.zeros(3)] * 4, all_devices[:4])
    wrong_devices = tp.PerReplica([torch.zeros(3)] * 4, all_devices[4:8])
    with pytest.raises(RuntimeError, match=r"bn\.(running_mean|num_batches_tracked) in place"):
        pf(x, good)
    with pytest.raises(ValueError, match="PerReplica made for devices"):
        pf(x, wrong_devices)  # fails while placing, after the state was taken as checked
    with pytest.raises(RuntimeError, match=r"bn\.(running_mean|num_batches_tracked) in place"):
        pf(x, good)


def test_state_the_replicas_only_read_without_being_passed_it_is_fine():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6))
    scale = torch.ones(6)
    x = torch.randn(4, 3, 6)
    model.eval()
    out = tp.pmap(lambda x: model(x) * scale)(x)
    torch.testing.assert_close(out.shards[2], model(x[2]))
    # The module idiom with the backward outside: the gradients accumulate after the call.
    model.train()
    model[1].eval()  # no running statistics written in the forward
    out = tp.pmap(lambda x: model(x).sum())(x)
    out.unshard().sum().backward()
    assert model[0].weight.grad is not None


def test_mapping_a_module_or_optimizer_suggests_replicate():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for obj, name in [(model, "Sequential"), (opt, "SGD")]:
        with pytest.raises(ValueError, match=rf"cannot map over args\[0\], a {name} \(in_axes=0\)") as e:
            tp.pmap(lambda m, x: x)(obj, torch.zeros(2, 1))
        assert "torchpmap.replicate(" in str(e.value)
        # Sharing is offered only for reading a module, never for an optimizer.
        assert ("only read, never train" in str(e.value)) == (obj is model)
        assert ("in_axes=None" in str(e.value)) == (obj is model)


# -- PerReplica as a module / optimizer: checkpoints, modes, sync --------------------------
def train_steps(models, opts, xs, ys, n, per):
    step = tp.pmap(module_train_step, "i")
    for x, y in zip(xs, ys):
        step(models, opts, x.reshape(n, per, 6), y.reshape(n, per))


def test_resume_from_checkpoint_matches_uninterrupted_run():
    import io

    n, per, k = 4, 5, 3
    xs, ys = make_data(6, n, per)
    devices = helpers.devices(n)
    full_models, full_opts = tp.replicate(make_model(), OPTIMIZERS["adamw"], devices)
    train_steps(full_models, full_opts, xs, ys, n, per)

    models, opts = tp.replicate(make_model(), OPTIMIZERS["adamw"], devices)
    train_steps(models, opts, xs[:k], ys[:k], n, per)
    buffer = io.BytesIO()
    torch.save({"model": models.state_dict(), "opt": opts.state_dict()}, buffer)
    buffer.seek(0)
    ck = torch.load(buffer)
    models, opts = tp.replicate(make_model(seed=7), OPTIMIZERS["adamw"], devices)  # fresh, other weights
    models.load_state_dict(ck["model"])
    opts.load_state_dict(ck["opt"])
    # Every replica has its own moment tensors.
    ptrs = {o.state[p]["exp_avg"].data_ptr() for o, m in zip(opts, models) for p in m.parameters()}
    assert len(ptrs) == n * len(list(models[0].parameters()))
    train_steps(models, opts, xs[k:], ys[k:], n, per)
    tp.assert_replicas_identical(models, opts)
    for (name, p), q in zip(models[0].named_parameters(), full_models[0].parameters()):
        assert torch.equal(p, q), name
    for key in ("exp_avg", "exp_avg_sq", "step"):
        for p, q in zip(models[0].parameters(), full_models[0].parameters()):
            assert torch.equal(opts[0].state[p][key], full_opts[0].state[q][key])


def test_loading_one_optimizer_state_into_each_replica_is_caught():
    n, per = 2, 5
    xs, ys = make_data(4, n, per)
    devices = helpers.devices(n)
    models, opts = tp.replicate(make_model(), OPTIMIZERS["adamw"], devices)
    train_steps(models, opts, xs[:2], ys[:2], n, per)
    ck = opts.state_dict()
    for o in opts:  # the DDP habit: one dict into each replica's optimizer
        o.load_state_dict(ck)
    with pytest.raises(
        AssertionError, match=r"AdamW replica 1 shares \['state'\]\[0\]\['(step|exp_avg)'\] with replica 0"
    ):
        tp.assert_replicas_identical(opts)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_state_dict_round_trip_and_modes():
    devices = helpers.devices(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    models, opts = tp.replicate(model, OPTIMIZERS["sgd_momentum"], devices)
    sd = models.state_dict()
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    other = tp.replicate(torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4)), devices=devices)
    assert other.load_state_dict(sd).missing_keys == []
    tp.assert_replicas_identical(other)
    assert all(torch.equal(a, b) for a, b in zip(other[2].state_dict().values(), sd.values()))
    assert other.eval() is other and not any(m.training for r in other for m in r.modules())
    assert other.train() is other and all(m.training for r in other for m in r.modules())
    assert other.to(torch.float64) is other and all(p.dtype == torch.float64 for r in other for p in r.parameters())
    with pytest.raises(ValueError, match="each replica stays on its own device"):
        other.to("cpu")
    with pytest.raises(TypeError, match="PerReplica.train: the replicas must be nn.Modules, got SGD"):
        opts.train()
    # Optimizer and LR scheduler state round trip, each replica with its own copy.
    scheds = tp.PerReplica([torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in opts], devices)
    for s in scheds:
        s.step()
    state = scheds.state_dict()
    fresh = tp.PerReplica([torch.optim.lr_scheduler.StepLR(o, 2) for o in opts], devices)
    fresh.load_state_dict(state)
    assert all(s.last_epoch == 1 and s.gamma == 0.5 for s in fresh)
    tp.assert_replicas_identical(fresh, opts)


def test_assert_replicas_identical_names_the_drift():
    devices = helpers.devices(3)
    models, opts = tp.replicate(make_model(), OPTIMIZERS["sgd_momentum"], devices)
    tp.assert_replicas_identical(models, opts)
    with torch.no_grad():
        models[2][2].bias[1] += 1e-7
    with pytest.raises(AssertionError, match=r"Sequential replica 2 differs from replica 0 at 2\.bias"):
        tp.assert_replicas_identical(models)
    with pytest.raises(AssertionError, match=r"replica 2 differs .* at 2\.bias"):
        models.state_dict()  # saving checks first
    opts[1].param_groups[0]["lr"] = 0.2
    with pytest.raises(
        AssertionError, match=r"SGD replica 1 differs from replica 0 at \['param_groups'\]\[0\]\['lr'\]"
    ):
        tp.assert_replicas_identical(opts)
    with pytest.raises(TypeError, match="expected PerReplica arguments"):
        tp.assert_replicas_identical(make_model())
    with pytest.raises(TypeError, match="pass the PerReplica values to check"):  # it passed (found by a hunt)
        tp.assert_replicas_identical()
    # Bit for bit: -0.0 is not 0.0.
    with torch.no_grad():
        models[2][2].bias.copy_(models[0][2].bias)
        models[0][0].bias[0], models[1][0].bias[0], models[2][0].bias[0] = 0.0, -0.0, 0.0
    with pytest.raises(AssertionError, match=r"replica 1 differs from replica 0 at 0\.bias"):
        tp.assert_replicas_identical(models)


def test_per_replica_step_steps_every_scheduler_and_optimizer():
    devices = helpers.devices(3)
    models, opts = tp.replicate(make_model(), OPTIMIZERS["adamw"], devices)
    scheds = tp.PerReplica([torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in opts], devices)
    reference = torch.optim.lr_scheduler.StepLR(OPTIMIZERS["adamw"](make_model().parameters()), 2, gamma=0.5)
    xs, ys = make_data(1, 3, 4)
    x, y = xs[0], ys[0]
    for _ in range(5):
        opts.zero_grad()
        assert all(p.grad is None for m in models for p in m.parameters())
        for m in models:
            F.cross_entropy(m(x), y).backward()
        opts.step()
        assert scheds.step() is None
        reference.optimizer.step()
        reference.step()
        assert [s.get_last_lr() for s in scheds] == [reference.get_last_lr()] * 3
    assert reference.get_last_lr() == [0.01 * 0.5**2]
    assert all(g["lr"] == 0.01 * 0.5**2 for o in opts for g in o.param_groups)
    tp.assert_replicas_identical(models, opts, scheds)
    models.zero_grad()
    assert all(p.grad is None for m in models for p in m.parameters())
    with pytest.raises(TypeError, match=r"PerReplica\.step: the replicas are Sequentials, which have no step\(\)"):
        models.step()
    with pytest.raises(TypeError, match=r"PerReplica\.zero_grad: the replicas are StepLRs, which have no zero_grad"):
        scheds.zero_grad()


FUNCTIONAL_OPTIMIZERS = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "adam": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
}


@pytest.mark.parametrize("opt_name", sorted(FUNCTIONAL_OPTIMIZERS))
def test_functional_optimizer_in_pmap_matches_torch_optim_on_one_device(opt_name):
    n, steps, per = 4, 4, 5
    optimizer_class, hyperparams = FUNCTIONAL_OPTIMIZERS[opt_name]
    xs, ys = make_data(steps, n, per)
    xs = xs.double()
    model = make_model().double()
    opt = tp.functional_optimizer(optimizer_class, **hyperparams)

    def train_step(params, state, x, y):
        def loss_fn(p):
            return F.cross_entropy(tp.functional_call(model, p, (x,)), y)

        grads = tp.pmean(torch.func.grad(loss_fn)(params), "i")
        return opt.step(params, grads, state)

    params = tp.params_of(model)
    devices = helpers.devices(n)
    rp, rs = tp.device_put_replicated((params, opt.init(params)), devices)
    step = tp.pmap(train_step, "i", devices=devices)
    for x, y in zip(xs, ys):
        rp, rs = step(rp, rs, x.reshape(n, per, 6), y.reshape(n, per))

    reference = make_model().double()
    torch_opt = optimizer_class(reference.parameters(), **hyperparams)
    for x, y in zip(xs, ys):
        torch_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        torch_opt.step()
    for name, p in reference.named_parameters():
        for shard in rp[name].shards:
            torch.testing.assert_close(shard, p.detach(), rtol=1e-12, atol=1e-14)
        for key, value in torch_opt.state[p].items():
            for shard in rs[name][key].shards:
                torch.testing.assert_close(shard, value, rtol=1e-12, atol=1e-14)
    assert params["0.weight"].equal(make_model().double()[0].weight)  # the step left its input alone


@pytest.mark.threads_only
def test_a_compiled_functional_adam_step_compiles_once_not_at_every_step():
    # Under compile= an Adam step goes through an optimizer object built per step: traced, each
    # step's new object failed Dynamo's identity guard and compiled again (11-25 s per step with
    # Inductor) until the recompile limit ran the function eagerly.
    from torch._dynamo.utils import counters

    n, steps, per = 2, 6, 5
    xs, ys = make_data(steps, n, per)
    model = make_model().double()
    opt = tp.functional_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)

    def train_step(params, state, x, y):
        grads = torch.func.grad(lambda p: F.cross_entropy(tp.functional_call(model, p, (x,)), y))(params)
        return opt.step(params, tp.pmean(grads, "i"), state)

    devs = helpers.devices(n)
    compiled = tp.pmap(train_step, "i", devices=devs, compile=dict(backend="eager"))
    eager = tp.pmap(train_step, "i", devices=devs)
    params = tp.params_of(model)
    rp, rs = tp.device_put_replicated((params, opt.init(params)), devs)
    ep, es = rp, rs
    graphs = []
    for x, y in zip(xs.double(), ys):
        args = (x.reshape(n, per, 6), y.reshape(n, per))
        rp, rs = compiled(rp, rs, *args)
        ep, es = eager(ep, es, *args)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2:] == [graphs[2]] * (steps - 2), graphs  # the first step's state differs from the rest
    for name in params:
        torch.testing.assert_close(rp[name].unshard(), ep[name].unshard(), rtol=0, atol=0)


def test_functional_optimizer_is_pure_and_skips_params_without_grads():
    opt = tp.functional_optimizer(torch.optim.AdamW, lr=0.1, weight_decay=0.5)
    params = {"w": torch.ones(3), "running_mean": torch.ones(2)}
    state = opt.init(params)
    assert state == {"w": {}, "running_mean": {}}
    new, new_state = opt.step(params, {"w": torch.full((3,), 2.0)}, state)
    assert params["w"].equal(torch.ones(3)) and state == {"w": {}, "running_mean": {}}
    assert not new["w"].equal(params["w"]) and new["running_mean"].equal(params["running_mean"])
    assert new["running_mean"] is not params["running_mean"]
    assert new_state["running_mean"] == {} and set(new_state["w"]) == {"step", "exp_avg", "exp_avg_sq"}
    again, _ = opt.step(new, {"w": torch.full((3,), 2.0), "running_mean": None}, new_state)
    assert new_state["w"]["step"].item() == 1.0 and not again["w"].equal(new["w"])
    assert "AdamW" in repr(opt) and "weight_decay=0.5" in repr(opt)


@pytest.mark.parametrize(
    "name", ["ASGD", "Adadelta", "Adafactor", "Adagrad", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop"]
)
def test_functional_optimizer_matches_other_torch_optimizers(name):
    optimizer_class = getattr(torch.optim, name)
    model = make_model().double()
    xs, ys = make_data(3, 1, 8)
    opt = tp.functional_optimizer(optimizer_class, lr=0.01)
    params = tp.params_of(model)
    state = opt.init(params)
    torch_opt = optimizer_class(model.parameters(), lr=0.01)

    def loss_fn(p, x, y):
        return F.cross_entropy(tp.functional_call(model, p, (x,)), y)

    for x, y in zip(xs.double(), ys):
        grads = torch.func.grad(loss_fn)(params, x, y)
        params, state = opt.step(params, grads, state)
        torch_opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch_opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=0)


def test_functional_optimizer_builds_optimizers_that_take_only_matrices():
    # It validates the hyperparameters on a template optimizer, whose one-element vector
    # Muon (matrices only) refused, blaming the user's parameters (found by a hunt).
    opt = tp.functional_optimizer(torch.optim.Muon, lr=0.01)
    w = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params, state = {"w": w.clone()}, opt.init({"w": w})
    reference = torch.nn.Parameter(w.clone())
    torch_opt = torch.optim.Muon([reference], lr=0.01)
    for k in range(3):
        g = torch.full_like(w, 0.5) + k * w
        params, state = opt.step(params, {"w": g}, state)
        reference.grad = g.clone()
        torch_opt.step()
    torch.testing.assert_close(params["w"], reference.detach(), rtol=0, atol=0)


DIRECT_STEPS = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, foreach=True)),
    (torch.optim.Adam, dict(lr=0.01)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    (torch.optim.Adam, dict(lr=torch.tensor(0.01), betas=(0.8, 0.9), foreach=False)),
    (torch.optim.AdamW, dict(lr=0.01, foreach=True)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.5, amsgrad=True)),
]


@pytest.mark.parametrize("optimizer_class, hyperparams", DIRECT_STEPS, ids=lambda v: getattr(v, "__name__", None))
def test_functional_optimizer_calls_sgd_and_adam_directly_bit_for_bit(optimizer_class, hyperparams):
    """SGD, Adam and AdamW step without an optimizer object (so that a captured executor can
    trace them): the same parameters and state as torch.optim's, bit for bit, step by step."""
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    opt = tp.functional_optimizer(optimizer_class, **hyperparams)
    assert opt._direct_group is not None  # the path under test
    reference = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_opt = optimizer_class(list(reference.values()), **hyperparams)
    state = opt.init(params)
    for step in range(4):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        if step == 1:
            grads["b"] = None  # skipped, as torch.optim skips a parameter without .grad
        given = {k: None if v is None else v.clone() for k, v in grads.items()}
        params, state = opt.step(params, grads, state)
        for k, v in grads.items():  # left alone (foreach Nesterov SGD writes its .grad)
            assert (v is None and given[k] is None) or torch.equal(v, given[k])
        for k, p in reference.items():
            p.grad = grads[k]
        torch_opt.step()
        for k, p in reference.items():
            assert torch.equal(params[k], p.detach()), (step, k)
            assert state[k].keys() == torch_opt.state[p].keys()
            for key, value in torch_opt.state[p].items():
                assert torch.equal(state[k][key], value), (step, k, key)
    # Fused kernels and differentiable steps drive the optimizer object.
    assert tp.functional_optimizer(optimizer_class, lr=0.1, differentiable=True)._direct_group is None


@pytest.mark.skipif(helpers.ON_CUDA, reason="the captured executors run replicas that share one CPU device")
@pytest.mark.parametrize("captured", ["stacked", "lockstep"])
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_functional_steps_give_the_threads_bits_on_the_captured_executors(captured, optimizer_class):
    """A functional SGD step is captured (no optimizer object in it); an Adam step, whose
    traced bias corrections would round otherwise, runs on the threads with the warning.
    Both give the threads' bits, every call (the first one included)."""
    hyperparams = dict(lr=0.1, momentum=0.9) if optimizer_class is torch.optim.SGD else dict(lr=0.1)
    opt = tp.functional_optimizer(optimizer_class, **hyperparams)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    params = {"w": torch.ones(4, 3) / 4, "b": torch.zeros(3)}

    def train_step(p, s, x):
        grads = torch.func.grad(lambda p: ((x @ p["w"] + p["b"]) ** 2).mean())(p)
        return opt.step(p, tp.pmean(grads, "i"), s)

    def train(executor):
        tp.set_executor(executor)
        p, s = tp.device_put_replicated((params, opt.init(params)), helpers.devices(2))
        step = tp.pmap(train_step, "i", devices=helpers.devices(2))
        steps = []
        for _ in range(3):
            p, s = step(p, s, x)
            steps.append((p, s))
        return steps

    expected = train("threads")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train(captured)
    fell_back = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert bool(fell_back) == (optimizer_class is not torch.optim.SGD), [str(w.message) for w in fell_back]
    assert all("functional_optimizer steps only SGD in a capture" in str(w.message) for w in fell_back)
    for (p, s), (p_want, s_want) in zip(got, expected):
        # The same bits where the step ran on the threads; a stacked step's batched matmul
        # may round otherwise (it does on AVX-512 CPUs).
        helpers.assert_same_bits((p, s), (p_want, s_want), close=captured == "stacked" and bool(not fell_back))


def test_functional_optimizer_follows_its_hyperparams_and_global_hooks():
    opt = tp.functional_optimizer(torch.optim.SGD, lr=0.1)
    params, grads = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    opt.hyperparams["lr"] = 1.0  # read at every step, as by the optimizer object
    new, _ = opt.step(params, grads, opt.init(params))
    assert new["w"].tolist() == [0.0, 0.0]
    calls = []
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(type(o).__name__))
    try:
        opt.step(params, grads, opt.init(params))
    finally:
        handle.remove()
    assert calls == ["SGD"]  # a global step hook runs, as around torch.optim's step
    # Sparse gradients: SGD takes them, Adam refuses them in its own words.
    sparse = {"w": torch.ones(2).to_sparse()}
    new, _ = opt.step(params, sparse, opt.init(params))
    assert new["w"].tolist() == [0.0, 0.0]
    adam = tp.functional_optimizer(torch.optim.Adam, lr=0.1)
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        adam.step(params, sparse, adam.init(params))


def test_functional_optimizer_errors():
    with pytest.raises(TypeError, match="the class, not an instance"):
        tp.functional_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(TypeError, match="LBFGS is not supported: its step needs a closure"):
        tp.functional_optimizer(torch.optim.LBFGS)

    class MyOptimizer(torch.optim.SGD):
        pass

    with pytest.raises(TypeError, match="only torch.optim's own optimizers are supported"):
        tp.functional_optimizer(MyOptimizer, lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # PyTorch's own check
        tp.functional_optimizer(torch.optim.Adam, lr=-1.0)
    opt = tp.functional_optimizer(torch.optim.SGD, lr=0.1)
    params = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match="params must be a dict of tensors"):
        opt.init([torch.ones(2)])
    with pytest.raises(ValueError, match="grads has 'v', which params lacks"):
        opt.step(params, {"v": torch.ones(2)}, opt.init(params))
    with pytest.raises(ValueError, match="state must hold one entry per parameter"):
        opt.step(params, {"w": torch.ones(2)}, {})
    with pytest.raises(ValueError, match=r"grads\['w'\] must be a tensor of the parameter's shape, dtype and device"):
        opt.step(params, {"w": torch.ones(3)}, opt.init(params))
    with pytest.raises(ValueError, match=r"got \(2,\) torch.float64 on cpu"):
        opt.step(params, {"w": torch.ones(2, dtype=torch.float64)}, opt.init(params))


def test_clipping_after_accumulated_pmean_matches_one_device():
    """The README's recipe: accumulate micro-batches into .grad, pmean once,
    clip_grad_norm_ on each replica == clip_grad_norm_ on one device on the
    whole batch (the norm is global because the averaged grads are)."""
    n, micro, per, steps, max_norm = 4, 3, 2, 3, 0.05
    xs, ys = make_data(steps, n, micro * per)
    xs = xs.double()
    devices = helpers.devices(n)
    models, opts = tp.replicate(make_model().double(), OPTIMIZERS["sgd_momentum"], devices)

    @tp.pmap(axis_name="i", devices=devices)
    def train_step(model, opt, xs, ys):
        opt.zero_grad()
        for x, y in zip(xs, ys):
            (F.cross_entropy(model(x), y) / len(xs)).backward()
        tp.pmean_grads(model, "i")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
        opt.step()
        return norm

    reference = make_model().double()
    torch_opt = OPTIMIZERS["sgd_momentum"](reference.parameters())
    for x, y in zip(xs, ys):
        # replica r gets rows [r*micro*per, (r+1)*micro*per), split into `micro` micro-batches
        norms = train_step(models, opts, x.reshape(n, micro, per, 6), y.reshape(n, micro, per))
        torch_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=max_norm)
        assert expected_norm > max_norm  # clipping is active
        for shard in norms.shards:
            torch.testing.assert_close(shard, expected_norm, rtol=1e-12, atol=0)
        torch_opt.step()
    tp.assert_replicas_identical(models, opts)
    for got, p in zip(models[0].parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), p.detach(), rtol=1e-12, atol=1e-14)


def test_functional_clipping_of_pmeaned_grads_matches_clip_grad_norm():
    n, per, max_norm = 4, 5, 0.05
    xs, ys = make_data(1, n, per)
    x, y = xs[0].double(), ys[0]
    model = make_model().double()

    def clipped_grads(params, x, y):
        def loss_fn(p):
            return F.cross_entropy(tp.functional_call(model, p, (x,)), y)

        grads = tp.pmean(torch.func.grad(loss_fn)(params), "i")
        norm = torch.nn.utils.get_total_norm(list(grads.values()))
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return {k: g * scale for k, g in grads.items()}

    params = tp.device_put_replicated(tp.params_of(model), helpers.devices(n))
    got = tp.pmap(clipped_grads, "i")(params, x.reshape(n, per, 6), y.reshape(n, per))
    F.cross_entropy(model(x), y).backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) > max_norm
    for name, p in model.named_parameters():
        for shard in got[name].shards:
            torch.testing.assert_close(shard, p.grad, rtol=1e-12, atol=1e-15)


class _EqualByValue(torch.nn.Linear):
    """A module whose == compares by value (some libraries' modules do): two are one key of
    a dict keyed by the module itself."""

    def __eq__(self, other):
        return isinstance(other, _EqualByValue) and self.in_features == other.in_features

    def __hash__(self):
        return hash(self.in_features)


def test_reached_modules_are_kept_apart_by_identity_and_never_kept_alive():
    # The walked tensors were cached by the module as a weak key (its own == and hash) and held
    # strongly: two modules equal by value shared an entry (a write to one went unseen until the
    # periodic check), and replaced weights lived on with their module (review).
    m1, m2 = _EqualByValue(3, 3), _EqualByValue(3, 3)
    write = [False]

    def f(x):
        if write[0]:
            with torch.no_grad():
                m1.weight.add_(1)
        return m2(x) + m1(x)

    pf = tp.pmap(f, "i", devices=helpers.devices(2))
    with torch.no_grad():
        for _ in range(3):
            pf(torch.zeros(2, 3))
        write[0] = True
        with pytest.raises(RuntimeError, match=r"wrote m1\.weight in place"):
            pf(torch.zeros(2, 3))
    model = torch.nn.Linear(3, 3)
    g = tp.pmap(lambda x: model(x), "i", devices=helpers.devices(2))
    with torch.no_grad():
        g(torch.zeros(2, 3))
        old = weakref.ref(model.weight)
        model.load_state_dict({"weight": torch.ones(3, 3), "bias": torch.zeros(3)}, assign=True)
        gc.collect()
        assert old() is None
        assert torch.equal(g(torch.ones(2, 3)).unshard(), torch.full((2, 3), 3.0))
    before = len(_shared_state._walked)

    def call_with_a_module_its_tensor_refers_to():
        held = torch.nn.Linear(3, 3)
        held.weight.register_hook(lambda grad, held=held: grad)  # a tensor that refers to its module
        with torch.no_grad():
            tp.pmap(lambda x: held(x), "i", devices=helpers.devices(2))(torch.zeros(2, 3))

    for _ in range(3):
        call_with_a_module_its_tensor_refers_to()
    gc.collect()
    assert len(_shared_state._walked) <= before
