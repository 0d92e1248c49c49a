"""Device discovery: devices(), local_devices(), counts, process index/count,
and the number of virtual CPU devices (TORCHPMAP_CPU_DEVICES,
set_cpu_device_count, default 8).

Anything that needs a different device count runs in a fresh interpreter: the
count is fixed at the first use of the devices, and this test process has
already used them.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchpmap as tp
from torchpmap import _config, _devices

HAS_CUDA = _devices.platform() == "cuda"  # what pmap runs on, not whether a GPU exists
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="virtual CPU devices are only used when there is no GPU")

# -- in this process ---------------------------------------------------------------------


def test_device_functions_return_torch_devices():
    devs = tp.devices()
    local = tp.local_devices()
    assert isinstance(devs, list) and devs
    assert all(type(d) is torch.device for d in devs)
    assert all(type(d) is torch.device for d in local)
    # A single-process job: the global devices are this process's devices.
    assert devs == local
    assert tp.device_count() == len(devs)
    assert tp.local_device_count() == len(local)
    assert tp.process_index() == 0
    assert tp.process_count() == 1
    assert isinstance(tp.device_count(), int) and isinstance(tp.process_index(), int)


def test_devices_are_distinct_and_numbered_in_order():
    devs = tp.local_devices()
    assert len(set(devs)) == len(devs)
    assert [d.index for d in devs] == list(range(len(devs)))
    kinds = {d.type for d in devs}
    assert kinds == ({"cuda"} if HAS_CUDA else {"cpu"})


@cpu_only
def test_virtual_cpu_devices_by_default():
    # This process was started without a GPU; unless the environment asks for
    # another count, torchpmap exposes 8 virtual CPU devices.
    expected = int(os.environ.get("TORCHPMAP_CPU_DEVICES") or 8)
    assert tp.local_devices() == [torch.device("cpu", i) for i in range(expected)]


@pytest.mark.cuda
def test_cuda_devices_are_every_gpu():
    assert tp.local_devices() == [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def test_returned_lists_are_copies():
    devs = tp.devices()
    devs.clear()
    local = tp.local_devices()
    local.append(torch.device("cpu", 99))
    assert len(tp.devices()) == tp.device_count() > 0
    assert torch.device("cpu", 99) not in tp.local_devices()


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2", None])
def test_set_cpu_device_count_rejects_non_positive_ints(bad):
    with pytest.raises(ValueError, match=r"set_cpu_device_count: n must be a positive int"):
        tp.set_cpu_device_count(bad)
    assert tp.local_device_count() >= 1  # nothing changed


@cpu_only
def test_set_cpu_device_count_after_first_use_is_an_error():
    n = tp.local_device_count()  # the devices are now initialised
    with pytest.raises(
        RuntimeError,
        match=rf"set_cpu_device_count\({n + 1}\) called after.*initialised with {n} virtual CPU devices"
        rf".*TORCHPMAP_CPU_DEVICES={n + 1}",
    ):
        tp.set_cpu_device_count(n + 1)
    assert tp.local_device_count() == n


# -- in fresh interpreters -----------------------------------------------------------------
# Each script prints one JSON line as its last line. They are started together
# (module fixture) so that their imports overlap.

_REPORT = """
import json, sys, threading
import torch, torchpmap as tp
def report(**kw):
    print(json.dumps(kw))
def devs():
    return [str(d) for d in tp.devices()]
"""

SCRIPTS = {
    # No environment variable, no call: 8 virtual devices.
    "default": (
        None,
        """
        n = tp.local_device_count()
        ids = tp.pmap(lambda x: tp.axis_index("i") + 0 * x, "i")(torch.zeros(8)).unshard().tolist()
        try:
            tp.pmap(lambda x: x)(torch.zeros(9))
            err = None
        except ValueError as e:
            err = str(e)
        report(devices=devs(), count=tp.device_count(), local=n, ids=ids, err=err,
               pidx=tp.process_index(), pcount=tp.process_count())
    """,
    ),
    # TORCHPMAP_CPU_DEVICES=3; then (forgetting the device list, as a new
    # process would) invalid values of the variable.
    "env3": (
        "3",
        """
        import os
        from torchpmap import _devices
        first, count = devs(), tp.device_count()
        x = torch.arange(6.).reshape(3, 2)
        s = tp.pmap(lambda x: tp.psum(x, "i"), "i")(x).unshard().tolist()
        try:
            tp.pmap(lambda x: x)(torch.zeros(4, 2))
            err = None
        except ValueError as e:
            err = str(e)
        bad = {}
        for raw in ["abc", "0", "-2"]:
            os.environ["TORCHPMAP_CPU_DEVICES"] = raw
            _devices._reset_for_tests()
            try:
                tp.devices()
                bad[raw] = None
            except ValueError as e:
                bad[raw] = str(e)
        report(devices=first, count=count, psum=s, err=err, bad=bad)
    """,
    ),
    # set_cpu_device_count before the first use wins over the environment; a
    # different count afterwards is refused, the same count is accepted.
    # Workers are started only for the devices a pmap uses.
    "call16": (
        "3",
        """
        tp.set_cpu_device_count(16)
        tp.set_executor("threads")  # the workers counted below are the threads executor's
        before = threading.active_count()
        first = devs()
        tp.pmap(lambda x: x + 1)(torch.zeros(2, 3))
        after_two = threading.active_count()
        s = tp.pmap(lambda x: tp.psum(x, "i"), "i")(torch.arange(16.)).unshard().tolist()
        try:
            tp.set_cpu_device_count(17)
            late = None
        except RuntimeError as e:
            late = str(e)
        tp.set_cpu_device_count(16)
        report(devices=first, after=devs(), psum=s, late=late, started_for_two=after_two - before,
               started_total=threading.active_count() - before)
    """,
    ),
}


@pytest.fixture(scope="module")
def launched():
    procs = {}
    for name, (env_value, body) in SCRIPTS.items():
        env = dict(os.environ)
        env.pop("TORCHPMAP_CPU_DEVICES", None)
        if env_value is not None:
            env["TORCHPMAP_CPU_DEVICES"] = env_value
        code = _REPORT + textwrap.dedent(body)
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    yield procs, {}
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _result(launched, name):
    procs, results = launched
    if name not in results:
        proc = procs[name]
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"script {name!r} timed out\n{err}")
        assert proc.returncode == 0, f"script {name!r} failed:\n{err}"
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results[name]


@cpu_only
@pytest.mark.subprocess
def test_default_is_eight_virtual_cpu_devices(launched):
    r = _result(launched, "default")
    assert r["devices"] == [f"cpu:{i}" for i in range(8)]
    assert r["count"] == r["local"] == 8
    assert (r["pidx"], r["pcount"]) == (0, 1)
    assert r["ids"] == list(range(8))


@cpu_only
@pytest.mark.subprocess
def test_more_replicas_than_devices_hints_at_the_env_var(launched):
    r = _result(launched, "default")
    assert r["err"] is not None
    assert "mapped axis has size 9" in r["err"]
    assert "only 8 local devices" in r["err"]
    assert "TORCHPMAP_CPU_DEVICES=9" in r["err"]
    assert "set_cpu_device_count(9)" in r["err"]


@cpu_only
@pytest.mark.subprocess
def test_env_var_sets_the_device_count(launched):
    r = _result(launched, "env3")
    assert r["devices"] == ["cpu:0", "cpu:1", "cpu:2"]
    assert r["count"] == 3
    assert r["psum"] == [[6.0, 9.0]] * 3
    assert "only 3 local devices" in r["err"] and "TORCHPMAP_CPU_DEVICES=4" in r["err"]


@cpu_only
@pytest.mark.subprocess
def test_invalid_env_var_is_a_clear_error(launched):
    r = _result(launched, "env3")
    assert r["bad"] == {
        raw: f"TORCHPMAP_CPU_DEVICES must be a positive integer, got {raw!r}" for raw in ["abc", "0", "-2"]
    }


@cpu_only
@pytest.mark.subprocess
def test_set_cpu_device_count_before_first_use(launched):
    r = _result(launched, "call16")
    assert r["devices"] == r["after"] == [f"cpu:{i}" for i in range(16)]  # the call beat the env var (3)
    assert r["psum"] == [120.0] * 16
    assert r["late"] is not None and "set_cpu_device_count(17) called after" in r["late"]


@cpu_only
@pytest.mark.subprocess
def test_workers_start_only_for_used_devices(launched):
    r = _result(launched, "call16")
    assert r["started_for_two"] == 2  # one worker per device used, no more
    assert r["started_total"] == 16


# -- TORCHPMAP_PLATFORM ----------------------------------------------------------------------


@pytest.fixture
def gpu_machine(monkeypatch):
    """torch.cuda as a machine with two GPUs shows it; the device list is computed afresh
    and forgotten again afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("TORCHPMAP_PLATFORM", raising=False)
    _devices._reset_for_tests()
    yield
    _devices._reset_for_tests()


def test_platform_defaults_to_cuda_where_there_is_a_gpu(gpu_machine):
    assert _devices.platform() == "cuda"
    assert tp.local_devices() == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.parametrize("value", ["cpu", "CPU", " cpu "])
def test_platform_cpu_runs_virtual_devices_on_a_gpu_machine(gpu_machine, monkeypatch, value):
    monkeypatch.setenv("TORCHPMAP_PLATFORM", value)
    monkeypatch.setenv("TORCHPMAP_CPU_DEVICES", "3")
    assert _devices.platform() == "cpu"
    assert tp.local_devices() == [torch.device("cpu", i) for i in range(3)]


def test_platform_cuda_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TORCHPMAP_PLATFORM", "cuda")
    with pytest.raises(ValueError, match="TORCHPMAP_PLATFORM=cuda, but PyTorch sees no CUDA GPU"):
        _devices.platform()


@pytest.mark.parametrize("value", ["gpu", "tpu", "cuda,cpu"])
def test_an_unknown_platform_is_an_error(monkeypatch, value):
    monkeypatch.setenv("TORCHPMAP_PLATFORM", value)
    with pytest.raises(ValueError, match=r"TORCHPMAP_PLATFORM must be one of cpu, cuda \(or unset\)"):
        _devices.platform()


def test_platform_unset_or_empty_follows_the_machine(monkeypatch):
    monkeypatch.setenv("TORCHPMAP_PLATFORM", "")
    assert _devices.platform() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_executor_variable_reads_as_the_platform_variable(monkeypatch):
    # TORCHPMAP_PLATFORM=CPU was accepted, TORCHPMAP_EXECUTOR=STACKED refused (found by a hunt).
    monkeypatch.setattr(_config, "_executor", None)
    monkeypatch.setenv("TORCHPMAP_EXECUTOR", " Stacked ")
    assert _config.executor_name() == "stacked"
    monkeypatch.setenv("TORCHPMAP_EXECUTOR", "stack")
    with pytest.raises(ValueError, match=r"TORCHPMAP_EXECUTOR must be one of .*got 'stack'"):
        _config.executor_name()


def test_the_executor_variable_is_read_as_os_environ_has_it(monkeypatch):
    # Read from os.environ's own mapping (not os.environ.get, whose miss raises inside):
    # an assignment, a deletion and a non-ASCII value are seen as os.environ sees them.
    monkeypatch.setattr(_config, "_executor", None)
    monkeypatch.delenv("TORCHPMAP_EXECUTOR", raising=False)
    assert _config._executor_variable() is None and _config.executor_name() == "auto"
    os.environ["TORCHPMAP_EXECUTOR"] = "threads"
    try:
        assert _config.executor_name() == "threads"
        os.environ["TORCHPMAP_EXECUTOR"] = "st\u00e4cked"
        assert _config._executor_variable() == os.environ.get("TORCHPMAP_EXECUTOR") == "st\u00e4cked"
    finally:
        del os.environ["TORCHPMAP_EXECUTOR"]
    assert _config._executor_variable() is None
