"""save_checkpoint / load_checkpoint: a resumed run continues exactly as the uninterrupted one."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import devices, module_train_step, pmap_k

import torchpmap as tp

N, PER, STEPS = 4, 3, 6


def make_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)
    )
    return tp.convert_sync_batchnorm(model, "i")


def make_training(seed):
    models, opts = tp.replicate(make_model(seed), lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1), devices(N))
    scheds = tp.PerReplica(
        [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS) for o in opts], opts.devices
    )
    return models, opts, scheds


def batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(N, PER, 5, generator=g), torch.randint(0, 3, (N, PER), generator=g)) for _ in range(STEPS)]


def run(models, opts, scheds, data):
    step = pmap_k(module_train_step, N)
    losses = []
    for x, y in data:
        losses.append(step(models, opts, x, y)[0])
        scheds.step()
    return losses


def same_bits(a, b):
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def assert_same_state(a, b):
    flat_a, _ = torch.utils._pytree.tree_flatten(a)
    flat_b, _ = torch.utils._pytree.tree_flatten(b)
    assert len(flat_a) == len(flat_b)
    for u, v in zip(flat_a, flat_b):
        if isinstance(u, torch.Tensor):
            assert same_bits(u.reshape(-1), v.reshape(-1))
        else:
            assert u == v


def test_a_resumed_run_matches_the_uninterrupted_one(tmp_path):
    data = batches()
    models, opts, scheds = make_training(0)
    torch.manual_seed(100)  # the dropout masks: each replica's stream derives from it
    uninterrupted = run(models, opts, scheds, data)

    first = make_training(0)
    torch.manual_seed(100)
    losses = run(*first, data[:3])
    path = tmp_path / "ckpt.pt"
    tp.save_checkpoint(path, model=first[0], opt=first[1], sched=first[2], step=3)
    del first

    resumed = make_training(7)  # a different initialisation and random state, all overwritten by the load
    rest = tp.load_checkpoint(path, model=resumed[0], opt=resumed[1], sched=resumed[2])
    assert rest == {"step": 3}
    tp.assert_replicas_identical(*resumed)
    losses += run(*resumed, data[rest["step"] :])

    assert all(same_bits(a, b) for a, b in zip(losses, uninterrupted)), (losses, uninterrupted)
    for got, want in zip(resumed, (models, opts, scheds)):
        for r in range(N):
            assert_same_state(got[r].state_dict(), want[r].state_dict())


def test_one_copy_of_each_replicated_entry_is_written(tmp_path):
    models, opts, _ = make_training(0)
    tp.save_checkpoint(tmp_path / "c.pt", model=models, opt=opts, rng=False)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(saved["entries"]) == {"model", "opt"}
    assert_same_state(saved["entries"]["model"]["state"], models[0].state_dict())
    assert_same_state(saved["entries"]["opt"]["state"], opts[0].state_dict())
    assert saved["rng"] is None
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_drifted_replicas_are_refused_naming_the_entry(tmp_path):
    models = tp.replicate(torch.nn.BatchNorm1d(4), devices=devices(N))
    with torch.no_grad():
        models[2].running_mean.add_(1.0)  # statistics that drifted without synchronisation
    with pytest.raises(ValueError, match=r"replicas of net differ.*replica 2 .*running_mean"):
        tp.save_checkpoint(tmp_path / "c.pt", net=models)
    assert not os.listdir(tmp_path)


def test_replicas_that_differ_only_in_what_is_not_saved_are_saved(tmp_path):
    # A non-persistent buffer is not in the state_dict: replicas may differ there.
    models = tp.replicate(torch.nn.Linear(2, 2), devices=devices(N))
    for i, m in enumerate(models):
        m.register_buffer("last_batch_max", torch.tensor(float(i)), persistent=False)
    tp.save_checkpoint(tmp_path / "c.pt", net=models)
    assert set(models.state_dict()) == {"weight", "bias"}
    with pytest.raises(AssertionError, match="last_batch_max"):
        tp.assert_replicas_identical(models)  # which still compares every buffer


class WithExtraState(torch.nn.Linear):
    def get_extra_state(self):
        return {"table": np.ones(2), "handle": object()}  # neither compares with == to a bool

    def set_extra_state(self, state):
        pass


def test_a_module_with_extra_state_is_saved(tmp_path):
    # The replicas' comparison read the state_dict's extra state with == (review)
    models = tp.replicate(WithExtraState(2, 2), devices=devices(N))
    assert "_extra_state" in models.state_dict()
    tp.save_checkpoint(tmp_path / "c.pt", net=models)


def test_optimizer_state_that_drifted_is_refused(tmp_path):
    models, opts = tp.replicate(torch.nn.Linear(2, 2), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), devices(2))
    for i, m in enumerate(models):
        m(torch.full((1, 2), float(i))).sum().backward()  # different gradients: unsynchronised steps
    opts.step()
    with pytest.raises(ValueError, match=r"replicas of opt differ"):
        tp.save_checkpoint(tmp_path / "c.pt", opt=opts)


def test_a_missing_entry_names_the_key_and_the_keys_present(tmp_path):
    tp.save_checkpoint(tmp_path / "c.pt", step=1, epoch=2)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match=r"no entry 'model'.*\['epoch', 'step'\]"):
        tp.load_checkpoint(tmp_path / "c.pt", model=model)


def test_an_entry_that_cannot_be_pickled_is_named(tmp_path):
    # Pickle's "Can't pickle <function <lambda>>" named no entry (found by a hunt); nothing is written.
    path = tmp_path / "ck.pt"
    with pytest.raises(TypeError, match=r"save_checkpoint: entry 'f' cannot be saved: Can't pickle"):
        tp.save_checkpoint(path, x=torch.ones(2), f=lambda: 1)
    assert list(tmp_path.iterdir()) == []


def test_wrong_path_types_name_the_argument(tmp_path):
    with pytest.raises(TypeError, match="save_checkpoint: path must be a str or os.PathLike, got int"):
        tp.save_checkpoint(3, step=1)
    with pytest.raises(TypeError, match="load_checkpoint: path must be a str or os.PathLike, got NoneType"):
        tp.load_checkpoint(None)


def test_state_of_one_kind_does_not_load_into_another(tmp_path):
    models, opts = tp.replicate(torch.nn.Linear(2, 2), lambda p: torch.optim.SGD(p, lr=0.1), devices(2))
    tp.save_checkpoint(tmp_path / "c.pt", model=models, step=4)
    before = [p.clone() for p in models[0].parameters()]
    with pytest.raises(TypeError, match="model holds the state of a module in the checkpoint, but a optimizer"):
        tp.load_checkpoint(tmp_path / "c.pt", model=opts)
    with pytest.raises(TypeError, match=r"step is a plain value \(int\)"):
        tp.load_checkpoint(tmp_path / "c.pt", step=models)
    with pytest.raises(TypeError, match="not a tensor"):
        tp.load_checkpoint(tmp_path / "c.pt", model=torch.zeros(2))
    assert all(torch.equal(a, b) for a, b in zip(before, models[0].parameters()))


def test_the_random_state_is_restored(tmp_path):
    torch.manual_seed(11)
    torch.rand(3)
    tp.save_checkpoint(tmp_path / "c.pt")
    after_save = torch.rand(5)
    torch.manual_seed(99)
    assert tp.load_checkpoint(tmp_path / "c.pt") == {}
    assert torch.equal(torch.rand(5), after_save)
    # rng=False leaves the caller's generator alone
    torch.manual_seed(99)
    tp.load_checkpoint(tmp_path / "c.pt", rng=False)
    assert not torch.equal(torch.rand(5), after_save)


def test_loading_rng_from_a_checkpoint_without_it_is_an_error(tmp_path):
    tp.save_checkpoint(tmp_path / "c.pt", rng=False, step=1)
    with pytest.raises(ValueError, match="saved without random state; pass rng=False"):
        tp.load_checkpoint(tmp_path / "c.pt")
    assert tp.load_checkpoint(tmp_path / "c.pt", rng=False) == {"step": 1}


def test_tensors_and_sharded_tensors_round_trip(tmp_path):
    x = tp.pmap(lambda r: r * 2, "i", devices=devices(N))(torch.arange(12.0).reshape(N, 3))
    w = torch.randn(3, requires_grad=True)
    tp.save_checkpoint(str(tmp_path / "c.pt"), x=x, w=w)
    rest = tp.load_checkpoint(tmp_path / "c.pt")
    assert type(rest["x"]) is torch.Tensor and torch.equal(rest["x"], x.unshard())
    assert torch.equal(rest["w"], w.detach()) and not rest["w"].requires_grad
    # into a ShardedTensor and a parameter, in place
    target = tp.device_put_replicated(torch.zeros(3), devices(N))
    storages = [s.data_ptr() for s in target.shards]
    w2 = torch.zeros(3, requires_grad=True)
    assert tp.load_checkpoint(tmp_path / "c.pt", x=target, w=w2) == {}
    assert [s.data_ptr() for s in target.shards] == storages
    assert torch.equal(target.unshard(), x.unshard()) and torch.equal(w2.detach(), w.detach())
    with pytest.raises(ValueError, match=r"x was saved with shape \(4, 3\).*\(2, 3\)"):
        tp.load_checkpoint(tmp_path / "c.pt", x=torch.zeros(2, 3))


def test_plain_values_and_unpassed_objects_are_returned(tmp_path):
    model = torch.nn.Linear(2, 2)
    scaler = torch.amp.GradScaler("cpu")
    tp.save_checkpoint(
        tmp_path / "c.pt", step=7, history=[0.5, 0.25], cfg={"lr": 0.1, "name": "run"}, model=model, scaler=scaler
    )
    rest = tp.load_checkpoint(Path(tmp_path / "c.pt"), scaler=torch.amp.GradScaler("cpu", init_scale=2.0))
    assert rest.keys() == {"step", "history", "cfg", "model"}
    assert rest["step"] == 7 and rest["history"] == [0.5, 0.25] and rest["cfg"] == {"lr": 0.1, "name": "run"}
    assert_same_state(rest["model"], model.state_dict())


def test_a_grad_scaler_per_replica_round_trips(tmp_path):
    scalers = tp.PerReplica([torch.amp.GradScaler("cpu", init_scale=8.0) for _ in range(2)], devices(2))
    tp.save_checkpoint(tmp_path / "c.pt", scaler=scalers)
    fresh = tp.PerReplica([torch.amp.GradScaler("cpu") for _ in range(2)], devices(2))
    tp.load_checkpoint(tmp_path / "c.pt", scaler=fresh)
    assert [s.get_scale() for s in fresh] == [8.0, 8.0]


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a torchpmap checkpoint"):
        tp.load_checkpoint(tmp_path / "other.pt")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    tp.save_checkpoint(path, step=1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        tp.save_checkpoint(path, step=2, bad=Unpicklable())
    assert tp.load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


def mlp(hidden):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))


def adam(models, groups=lambda m: m.parameters()):
    return tp.PerReplica([torch.optim.Adam(groups(m), lr=0.1) for m in models], models.devices)


def save_trained(path, **kwargs):
    """Replicas of mlp(3) and their Adam after a step."""
    models = tp.replicate(mlp(3), devices=devices(2))
    opts = adam(models)
    for m, o in zip(models, opts):
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    tp.save_checkpoint(path, opt=opts, model=models, **kwargs)


def unchanged(models, opts):
    """Still as made: mlp()'s initial parameters and no optimizer state."""
    initial = mlp(models[0][0].out_features).parameters()
    return all(torch.equal(a, b) for a, b in zip(models[0].parameters(), initial)) and not any(o.state for o in opts)


@pytest.mark.parametrize(
    "model, error",
    [
        (
            lambda: mlp(5),
            r"model\.0\.weight was saved with shape \(3, 4\) and dtype torch.float32, but model has \(5, 4\)",
        ),
        (
            lambda: mlp(3).double(),
            r"model\.0\.weight was saved .* torch.float32, but model has \(3, 4\) and torch.float64",
        ),
        (lambda: mlp(3)[:1], r"model does not match its state in the checkpoint: model lacks 2\.bias, 2\.weight"),
    ],
)
def test_a_module_that_does_not_match_is_refused_before_any_entry_loads(tmp_path, model, error):
    save_trained(tmp_path / "c.pt")
    models = tp.replicate(model(), devices=devices(2))
    opts = adam(tp.replicate(mlp(3), devices=devices(2)))  # matches, and comes first
    with pytest.raises(ValueError, match=error):
        tp.load_checkpoint(tmp_path / "c.pt", opt=opts, model=models)
    assert not any(o.state for o in opts)


def test_optimizer_state_of_other_shapes_is_refused_naming_the_parameter(tmp_path):
    save_trained(tmp_path / "c.pt")
    models = tp.replicate(mlp(5), devices=devices(2))
    opts = adam(models)
    error = r"opt's 'exp_avg' of parameter 0 \(model\.0\.weight\) has shape \(3, 4\) in the checkpoint, but the"
    with pytest.raises(ValueError, match=error + r" parameter has shape \(5, 4\)"):
        tp.load_checkpoint(tmp_path / "c.pt", opt=opts, model=models)
    with pytest.raises(ValueError, match=r"opt's 'exp_avg' of parameter 0 has shape"):  # no module to name it
        tp.load_checkpoint(tmp_path / "c.pt", opt=opts)
    assert unchanged(models, opts)


def test_optimizer_groups_that_do_not_match_are_refused(tmp_path):
    save_trained(tmp_path / "c.pt", rng=False)
    models = tp.replicate(mlp(3), devices=devices(2))
    opts = adam(models, lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters()}])
    with pytest.raises(ValueError, match="opt has 2 parameter groups, but the checkpoint holds 1"):
        tp.load_checkpoint(tmp_path / "c.pt", rng=False, model=models, opt=opts)
    opts = adam(models, lambda m: m[0].parameters())
    with pytest.raises(ValueError, match="parameter group 0 of opt has 2 parameters, but the checkpoint's has 4"):
        tp.load_checkpoint(tmp_path / "c.pt", rng=False, model=models, opt=opts)
    assert unchanged(models, opts)


def test_a_missing_random_state_is_refused_before_any_entry_loads(tmp_path):
    save_trained(tmp_path / "c.pt", rng=False)
    models = tp.replicate(mlp(3), devices=devices(2))
    opts = adam(models)
    with pytest.raises(ValueError, match="saved without random state"):
        tp.load_checkpoint(tmp_path / "c.pt", opt=opts, model=models)
    assert unchanged(models, opts)


def test_saving_into_a_missing_directory_names_the_path(tmp_path):
    path = tmp_path / "missing" / "ckpt.pt"
    with pytest.raises(FileNotFoundError, match="the directory of .*missing/ckpt.pt' does not exist"):
        tp.save_checkpoint(path, step=1)


class _HistogramState:
    """Anything with state_dict/load_state_dict: here one holding a numpy array."""

    def __init__(self):
        self.hist = np.zeros(3)

    def state_dict(self):
        return {"hist": self.hist.copy()}

    def load_state_dict(self, state):
        self.hist = state["hist"].copy()


def test_replicas_whose_state_holds_numpy_arrays_are_compared_element_by_element(tmp_path):
    # numpy's == is an array: "truth value of an array is ambiguous" (found by a hunt).
    per = tp.PerReplica([_HistogramState(), _HistogramState()], devices(2))
    tp.assert_replicas_identical(per)
    tp.save_checkpoint(tmp_path / "ok.pt", stats=per, rng=False)
    per[1].hist[0] = np.nan
    with pytest.raises(AssertionError, match=r"replica 1 differs from replica 0 at \['hist'\]"):
        tp.assert_replicas_identical(per)
    per[0].hist[0] = np.nan  # NaNs in the same places are equal
    tp.assert_replicas_identical(per)
