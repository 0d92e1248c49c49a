"""examples/train_cnn.py: reproducible, resumable, and the same in every process layout.

Most runs call the example's main() in this process (a second each); the layout
comparison needs its own processes.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port

import torchpmap as tp

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_cnn.py"
# Two epochs of 11 steps (1437 training rows, global batches of 128) stopped at step 14: one
# epoch boundary (set_epoch, evaluation, checkpoint), then part of the next epoch.
STEPS = ["--epochs", "2", "--max-steps", "14", "--quiet"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_cnn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(example, tmp_path, name, *args):
    """Run the example here; its losses, and the training state it saved at the end."""
    losses, ckpt = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
    batch = str(16 * tp.device_count())  # a multiple of the device count, whatever it is
    with torch.random.fork_rng():  # the example seeds the global generator
        example.main([*STEPS, "--batch", batch, "--losses-out", str(losses), "--checkpoint", str(ckpt), *args])
    return json.loads(losses.read_text()), tp.load_checkpoint(ckpt, rng=False)


@pytest.fixture(scope="module")
def reference(example, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    plot = tmp / "loss.png"
    losses, state = train(example, tmp, "reference", "--plot", str(plot))
    assert plot.stat().st_size > 1000
    return losses, state


def assert_bitwise_equal(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    else:
        assert a == b, path


def test_training_learns(reference):
    losses, state = reference
    assert len(losses) == 14 and state["step"] == 14
    assert sum(losses[-3:]) < sum(losses[:3]) / 2


def test_the_same_seed_gives_bit_identical_losses(example, reference, tmp_path):
    losses, state = train(example, tmp_path, "again")
    assert losses == reference[0]  # floats: bit for bit
    assert_bitwise_equal(state, reference[1])
    other, _ = train(example, tmp_path, "seed1", "--seed", "1", "--max-steps", "3")
    assert other != reference[0][:3]


@pytest.mark.parametrize("stop", [5, 11], ids=["mid_epoch", "epoch_end"])
def test_a_resumed_run_matches_the_run_that_never_stopped(example, reference, tmp_path, stop):
    first, _ = train(example, tmp_path, "run", "--max-steps", str(stop))
    assert first == reference[0][:stop]
    losses, state = train(example, tmp_path, "run", "--resume")  # the same checkpoint file
    assert losses == reference[0]
    # parameters, buffers, optimizer and scheduler state, step and losses, bit for bit
    assert_bitwise_equal(state, reference[1])


def run_in_processes(tmp_path, name, nproc, devices_per_proc, *args):
    losses = tmp_path / f"{name}.json"
    env = {**os.environ, "TORCHPMAP_CPU_DEVICES": str(devices_per_proc), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
        launcher += [f"--master_port={free_port()}"]
    cmd = [*launcher, str(EXAMPLE), *STEPS, "--losses-out", str(losses), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(losses.read_text())


@pytest.mark.subprocess
def test_two_processes_of_two_devices_match_one_process_of_four(tmp_path):
    # float32: the gradient average adds the replicas' gradients as (0 + 1) + (2 + 3) across
    # two processes and as ((0 + 1) + 2) + 3 in one, so the losses differ by rounding; bf16
    # autocast would amplify that. The dropout masks are the same: different ones would
    # change the losses by far more.
    one = run_in_processes(tmp_path, "one", 1, 4, "--no-amp")
    two = run_in_processes(tmp_path, "two", 2, 2, "--no-amp")
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
