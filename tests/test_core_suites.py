"""Core test files with pmap's default executor switched to each captured
executor: calls it captures must behave as on the threads, the others fall
back. The two runs are subprocesses started together (each is mostly one
thread: together they take little more than one). The whole quick suite passes
this way too, in about 5 minutes per executor: too long for CI, see
docs/development.md."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("pmap_args", "sharded", "training", "compile", "batchnorm", "checkpoint")
SUITES = {
    "stacked": (*CORE, "random"),  # the stacked executor draws each replica's random stream
    "lockstep": CORE,
}


@pytest.mark.subprocess
def test_the_core_suites_pass_under_the_stacked_and_lockstep_executors():
    runs = {}
    for executor, names in SUITES.items():
        env = {**os.environ, "TORCHPMAP_EXECUTOR": executor, "PYTHONWARNINGS": "ignore::RuntimeWarning"}
        files = [str(ROOT / "tests" / f"test_{name}.py") for name in names]
        # -n 0: each run is one process (the suite's own workers are pyproject's addopts).
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-n", "0", "-p", "no:cacheprovider"]
        cmd += files
        runs[executor] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    failures = []
    for executor, run in runs.items():
        try:
            output, _ = run.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in runs.values():
                other.kill()
            raise
        if run.returncode != 0:
            failures.append(f"--- under {executor}:\n{output[-4000:]}")
    assert not failures, "\n".join(failures)
