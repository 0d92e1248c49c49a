"""Small helpers shared by the test files."""

import contextlib
import socket
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torchpmap as tp
from torchpmap import _devices

# pmap runs on GPUs here (TORCHPMAP_PLATFORM=cpu runs the virtual CPU devices even on a GPU machine).
ON_CUDA = _devices.platform() == "cuda"


def devices(k):
    """The first k local devices, or skip the test when there are fewer."""
    local = tp.local_devices()
    if len(local) < k:
        pytest.skip(f"needs {k} devices, this process has {len(local)}")
    return local[:k]


def pmap_k(f, k, **kwargs):
    """pmap f over the first k local devices on axis 'i' (skips the test with fewer)."""
    return tp.pmap(f, "i", devices=devices(k), **kwargs)


def rows(n, *rest, dtype=torch.float32, scale=0.5, offset=-3.0):
    """A deterministic (n, *rest) tensor whose rows all differ."""
    numel = n * int(np.prod(rest, dtype=np.int64))
    return (torch.arange(numel, dtype=torch.float64).reshape(n, *rest) * scale + offset).to(dtype)


def call_with_deadline(fn, *args, deadline=10.0):
    """Run fn(*args) in a helper thread; return (result, error, seconds).
    Fails the test if it has not finished after ``deadline`` seconds."""
    box = {}

    def target():
        t = time.perf_counter()
        try:
            box["result"] = fn(*args)
        except BaseException as e:
            box["error"] = e
        box["seconds"] = time.perf_counter() - t

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(deadline)
    if th.is_alive():
        pytest.fail(f"pmap call still running after {deadline} s: it hangs")
    return box.get("result"), box.get("error"), box["seconds"]


def expect_error(fn, *args, kind=Exception, deadline=10.0):
    """The error fn(*args) raises (it must raise ``kind``), and how long it took."""
    result, err, seconds = call_with_deadline(fn, *args, deadline=deadline)
    assert err is not None, f"expected {kind.__name__}, got the result {result!r}"
    assert isinstance(err, kind), f"expected {kind.__name__}, got {type(err).__name__}: {err}"
    return err, seconds


def notes(err) -> str:
    return "\n".join(getattr(err, "__notes__", []))


def module_train_step(model, opt, x, y):
    """One replica's step of the module idiom on axis 'i': its loss, averaged gradients, the
    optimizer's step; returns the mean loss."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    tp.pmean_grads(model, "i")
    opt.step()
    return tp.pmean(loss.detach(), "i")


class NewBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the fresh tensors (not views of an input) that ops build."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        seen = {a.untyped_storage().data_ptr() for a in leaves((args, kwargs)) if torch.is_tensor(a)}
        for t in leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                self.bytes += t.untyped_storage().nbytes()
        return out


# -- comparing executors ---------------------------------------------------------------------
@contextlib.contextmanager
def executor(name, allow_fallback=False):
    """Run under executor ``name``; a fallback warning fails the test unless allowed."""
    tp.set_executor(name)
    with warnings.catch_warnings():
        if not allow_fallback:
            warnings.simplefilter("error", RuntimeWarning)
        yield


def as_plain(v):
    return v.unshard() if isinstance(v, tp.ShardedTensor) else v


def assert_same_bits(a, b, close=False, rtol=1e-6, atol=1e-7):
    """Two results with the same tree, types, dtypes and shapes, and equal values
    (``close``: to ``rtol``/``atol``, float32 rounding by default)."""
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert type(x) is type(y)
        if isinstance(x, torch.Tensor):
            x, y = as_plain(x), as_plain(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            if close:
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
            else:
                assert torch.equal(x, y) or _equal_with_nans(x, y), (x, y)
        else:
            assert x == y


def _equal_with_nans(x, y):
    """Equal values, NaNs in the same places counting as equal."""
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        return False
    x, y = torch.view_as_real(x) if x.is_complex() else x, torch.view_as_real(y) if y.is_complex() else y
    nans = x.isnan()
    return torch.equal(nans, y.isnan()) and torch.equal(x[~nans], y[~nans])


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun job's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script, nproc, *args):
    """The command that runs ``script`` under torchrun with ``nproc`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
