"""Test-suite wiring: markers and what they imply.

* ``slow``: seconds each (inductor compiles, soak loops, examples); left out
  of the quick loop ``pytest -m "not slow"``.
* ``subprocess``: starts Python processes (torchrun jobs, examples, fresh
  interpreters); always slow too.
* ``cuda``: needs pmap to run on GPUs; skipped without one, or with
  ``TORCHPMAP_PLATFORM=cpu`` (which runs the virtual-device suite on a GPU machine).
* ``threads_only``: checks what only the threads executor does (a replica's
  Python runs once per replica): runs with the threads executor set, and is
  skipped when ``TORCHPMAP_EXECUTOR`` picks another (``test_stacked.py`` runs
  the quick suite under the stacked executor that way).

The suite is written for 8 devices (the default virtual CPU devices). With
fewer (a machine with 1 to 4 GPUs, or TORCHPMAP_CPU_DEVICES=2), a test that
maps more replicas than there are devices, without naming them through
``helpers.devices(k)``, is skipped rather than failed: pmap's own "only N local
devices are available" error, uncaught by the test, says it needs more.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import torchpmap as tp
from torchpmap import _devices

_SUITE_DEVICES = 8
_TOO_FEW = re.compile(r"the mapped axis has size (\d+) .*but only (\d+) local devices are available")


# Core test files run again under each captured executor, in the same run (as
# ``TORCHPMAP_EXECUTOR=stacked pytest tests/test_sharded.py`` would): calls it captures
# must behave as on the threads, the others fall back (their warnings are expected).
# Quick tests only; the whole quick suite this way takes minutes per executor (development.md).
_CORE = ("test_pmap_args", "test_sharded", "test_training", "test_compile", "test_batchnorm", "test_checkpoint")
_CORE_UNDER = {"stacked": (*_CORE, "test_random"), "lockstep": _CORE}  # stacked draws each replica's stream


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if os.environ.get("TORCHPMAP_EXECUTOR", "") not in ("", "threads"):
        return  # the whole run is under one executor already
    module = metafunc.module.__name__.rpartition(".")[2]
    under = [name for name, files in _CORE_UNDER.items() if module in files]
    definition = metafunc.definition
    if not under or any(definition.get_closest_marker(m) for m in ("slow", "subprocess", "threads_only")):
        return
    metafunc.fixturenames.append("_core_executor")
    metafunc.parametrize("_core_executor", ["default", *under], indirect=True)


@pytest.fixture
def _core_executor(request):
    """The executor a core test runs under (``pytest_generate_tests``)."""
    if request.param == "default":
        yield
        return
    from torchpmap import _config

    _config._executor = request.param  # _restore_executor puts it back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback's warning
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _devices.platform() == "cuda"
    threads = os.environ.get("TORCHPMAP_EXECUTOR", "threads") in ("threads", "")
    for item in items:
        if item.get_closest_marker("subprocess") is not None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("cuda") is not None and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (and TORCHPMAP_PLATFORM unset or cuda)"))
        if item.get_closest_marker("threads_only") is not None and not threads:
            item.add_marker(pytest.mark.skip(reason="what only the threads executor does"))


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    try:
        return (yield)
    except ValueError as e:
        needed = _TOO_FEW.search(str(e))
        have = tp.local_device_count()
        if needed and have < _SUITE_DEVICES and int(needed[2]) == have and int(needed[1]) <= _SUITE_DEVICES:
            pytest.skip(f"maps {needed[1]} replicas, this machine has {have} devices")
        raise


@pytest.fixture(autouse=True)
def _restore_executor(request):
    """Tests that switch the executor leave it as they found it; a
    ``threads_only`` test starts on the threads executor."""
    from torchpmap import _config

    before = _config._executor
    if request.node.get_closest_marker("threads_only") is not None:
        _config._executor = "threads"
    yield
    _config._executor = before


@pytest.fixture(autouse=True)
def _compare_across_devices_on_gpus(monkeypatch):
    """On the GPUs (platform cuda), results live there while most tests, written
    for virtual CPU devices, build what they expect on the CPU: compare values,
    as torch.testing.assert_close does with check_device=False. Placement has
    tests of its own (``devices``, ``shards[i].device``)."""
    if _devices.platform() != "cuda":
        yield
        return
    original = torch.testing.assert_close

    def assert_close(actual, expected, *args, **kwargs):
        kwargs.setdefault("check_device", False)
        return original(actual, expected, *args, **kwargs)

    monkeypatch.setattr(torch.testing, "assert_close", assert_close)
    yield


try:
    import fcntl
except ImportError:  # Windows: no flock, and no ordering between workers
    fcntl = None  # type: ignore[assignment]


def _locked(path: Path, mode: int) -> Any:
    f = open(path, "a")  # held across tests: _unlock closes it
    fcntl.flock(f, mode)
    return f


def _unlock(f: Any) -> None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # Whether this worker's next test runs alone too: then it keeps the exclusive lock.
    item.stash[_NEXT_ALONE] = nextitem is not None and nextitem.get_closest_marker("timing") is not None


_NEXT_ALONE = pytest.StashKey[bool]()
_kept: list[Any] = []  # the exclusive lock this worker keeps between consecutive ``timing`` tests


@pytest.fixture(autouse=True)
def _timing_tests_run_alone(request, tmp_path_factory):
    """Under pytest-xdist, every test holds a shared lock on one file and a
    ``timing`` test an exclusive one, so it runs alone. The turnstile makes a
    waiting ``timing`` test go next: other workers queue behind it instead of
    taking the shared lock again and again. A worker whose next test is a
    ``timing`` test too keeps the exclusive lock: the others drain once for
    the run of them, not once per test."""
    if fcntl is None or "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of one run
    alone = request.node.get_closest_marker("timing") is not None
    if alone and _kept:
        held = _kept.pop()
    else:
        while _kept:  # (a timing test that was to come next did not run: let go)
            _unlock(_kept.pop())
        turnstile = _locked(root / "turnstile.lock", fcntl.LOCK_EX)
        try:
            held = _locked(root / "tests.lock", fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            _unlock(turnstile)
    try:
        yield
    finally:
        if alone and request.node.stash.get(_NEXT_ALONE, False):
            _kept.append(held)
        else:
            _unlock(held)
