"""torch.func.functional_call on a module the replicas share: a clear error on
the threads executor (it would swap every replica's tensors into one module
object), never a wrong answer; the safe spellings keep working."""

import warnings

import pytest
import torch
from helpers import call_with_deadline, devices, executor, pmap_k, rows

import torchpmap as tp

N = 4


class Mixing(torch.nn.Module):
    """A forward whose collective makes every replica wait inside the swap
    (elementwise: the stacked executor gives the threads' bits)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(4))
        self.shift = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return tp.psum(x, "i") * self.scale + self.shift


def weights_and_inputs():
    return rows(N, 4, scale=0.01), rows(N, 2, 4, scale=0.1)


def expected(module, ws, x):
    return torch.stack([x.sum(0) * ws[i] + module.shift.detach() for i in range(N)])


def params(module, w):
    return {"scale": w, "shift": module.shift.detach()}


@pytest.mark.threads_only
@pytest.mark.parametrize(
    "call",
    [
        torch.func.functional_call,
        lambda m, p, a: torch.nn.utils.stateless.functional_call(m, p, a),
    ],
    ids=["torch.func", "stateless"],
)
@pytest.mark.timing
def test_shared_module_raises_promptly(call):
    module = Mixing()
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    ws, x = weights_and_inputs()
    pf = pmap_k(lambda w, x: call(module, params(module, w), (x,)), N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stateless.functional_call is deprecated
        _, error, seconds = call_with_deadline(pf, ws, x)
    assert isinstance(error, RuntimeError), error
    assert "torchpmap.functional_call(module, params, args)" in str(error)
    assert "torchpmap.replicate" in str(error)
    assert seconds < 5.0
    # The module is left as it was.
    assert all(isinstance(p, torch.nn.Parameter) for p in module.parameters())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_torchpmap_functional_call_is_right():
    module = Mixing()
    ws, x = weights_and_inputs()
    out = pmap_k(lambda w, x: tp.functional_call(module, params(module, w), (x,)), N)(ws, x)
    torch.testing.assert_close(out.unshard(), expected(module, ws, x))


@pytest.mark.threads_only
def test_module_made_inside_the_replica_works():
    ws, x = weights_and_inputs()
    torch.manual_seed(0)
    bias = torch.randn(4)

    def f(w, x):
        module = Mixing()
        return torch.func.functional_call(module, {"scale": w, "shift": bias}, (x,))

    out = pmap_k(f, N)(ws, x)
    torch.testing.assert_close(out.unshard(), torch.stack([x.sum(0) * ws[i] + bias for i in range(N)]))


@pytest.mark.threads_only
def test_per_replica_modules_work():
    module = Mixing()
    replicas = tp.replicate_module(module, devices(N))
    ws, x = weights_and_inputs()
    out = pmap_k(lambda m, w, x: torch.func.functional_call(m, params(m, w), (x,)), N)(replicas, ws, x)
    torch.testing.assert_close(out.unshard(), expected(module, ws, x))


def test_one_replica_and_repeated_calls_work():
    module = torch.nn.Linear(4, 4).to(devices(1)[0])  # its bias is closed over: on the replica's device
    w, x = torch.randn(1, 4, 4), torch.randn(1, 2, 4)
    pf = pmap_k(lambda w, x: torch.func.functional_call(module, {"weight": w}, (x,)), 1)
    for _ in range(2):  # a claim lasts one call: the next call may use the module again
        out = pf(w, x)
        torch.testing.assert_close(out.unshard()[0].cpu(), x[0] @ w[0].T + module.bias.detach().cpu())


def test_outside_pmap_untouched():
    module = torch.nn.Linear(4, 4)
    w, x = torch.randn(4, 4), torch.randn(2, 4)
    torch.testing.assert_close(torch.func.functional_call(module, {"weight": w}, (x,)), x @ w.T + module.bias)


@pytest.mark.parametrize("name", ["stacked", "lockstep"])
def test_captured_executors_trace_it_bit_identical(name):
    # The stacked and lockstep executors trace the function once with Dynamo:
    # no module is swapped at run time, so the shared module is fine there.
    module = Mixing().requires_grad_(False)  # lockstep leaves autograd to threads
    ws, x = weights_and_inputs()
    with executor("threads"):
        reference = pmap_k(lambda w, x: tp.functional_call(module, params(module, w), (x,)), N)(ws, x)
    with executor(name):
        got = pmap_k(lambda w, x: torch.func.functional_call(module, params(module, w), (x,)), N)(ws, x)
    assert torch.equal(got.unshard(), reference.unshard())


@pytest.mark.parametrize("name", ["stacked", "lockstep"])
def test_torchpmap_functional_call_is_captured_too(name):
    """It used to fall back to the threads ("reads the replica index"): captured,
    the module itself serves, as the graph takes the parameters as inputs."""
    module = Mixing().requires_grad_(False)
    ws, x = weights_and_inputs()
    f = lambda w, x: tp.functional_call(module, params(module, w), (x,))  # noqa: E731
    with executor("threads"):
        reference = pmap_k(f, N)(ws, x)
    with executor(name):  # a fallback warning fails the test
        got = pmap_k(f, N)(ws, x)
    assert torch.equal(got.unshard(), reference.unshard())


@pytest.mark.threads_only
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torchpmap_functional_call_under_compile_on_the_threads(backend):
    """compile= traces each replica under the process's Dynamo gate, one at a time,
    and the compiled program takes the tensors as inputs: the shared module serves."""
    module = Mixing().requires_grad_(False)
    ws, x = weights_and_inputs()
    f = lambda w, x: tp.functional_call(module, params(module, w), (x,))  # noqa: E731
    reference = pmap_k(f, N)(ws, x)
    for _ in range(2):
        got = tp.pmap(f, "i", devices=devices(N), compile={"backend": backend})(ws, x)
        assert torch.equal(got.unshard(), reference.unshard())
    assert all(isinstance(p, torch.nn.Parameter) for p in module.parameters())
