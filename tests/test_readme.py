"""The README's instructions are what CI runs, and its examples run."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ON_CUDA

import torchpmap as tp

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _fenced_blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _commands(lines):
    """Shell lines -> list of commands (split on &&), each a token list.

    pip's -q/--quiet only changes how much pip prints, so it is ignored: CI
    may keep its log short without the README showing the flag.
    """
    out = []
    for line in lines:
        for cmd in line.split("&&"):
            tokens = shlex.split(cmd)
            if tokens[:1] and tokens[0].endswith("pip"):
                tokens = [t for t in tokens if t not in ("-q", "--quiet")]
            if tokens:
                out.append(tokens)
    return out


def _ci_commands():
    """What .ci/run runs after its preamble (shell options, cd to the repo,
    removing an old .venv): the README's commands."""
    lines = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("set ") or line.startswith("cd ") or line == "rm -rf .venv":
            continue
        lines.append(line)
    return _commands(lines)


def test_readme_setup_commands_are_what_ci_runs():
    blocks = _fenced_blocks("bash")
    assert blocks, "README has no ```bash block"
    lines = [ln for ln in blocks[0].splitlines() if ln.strip()]
    assert len(lines) == 2, f"the README's bash block should be two lines, got {lines}"
    readme = _commands(lines)
    ci = _ci_commands()
    assert readme == ci, f"README runs\n  {readme}\nbut .ci/run runs\n  {ci}"
    # and they are what the README says they are
    assert readme[0] == ["python3", "-m", "venv", ".venv"]
    assert readme[-1] == [".venv/bin/python", "-m", "pytest"]
    # lint, format and types are checked before the tests, and fail CI
    assert readme[-4:-1] == [
        [".venv/bin/ruff", "check", "."],
        [".venv/bin/ruff", "format", "--check", "."],
        [".venv/bin/mypy"],
    ]
    assert [".venv/bin/python", "examples/seed.py"] in readme


@pytest.mark.subprocess
def test_seed_example_runs():
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "examples/seed.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "ShardedTensor" in proc.stdout
    n = torch.cuda.device_count() if ON_CUDA else int(env.get("TORCHPMAP_CPU_DEVICES") or 8)
    assert f"{n} devices:" in proc.stdout


def test_readme_python_example_runs():
    if tp.local_device_count() < 4:
        pytest.skip("the example maps over 4 devices")
    (block,) = [b for b in _fenced_blocks("python") if "normalize" in b]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    y, x = namespace["y"], namespace["x"]
    torch.testing.assert_close(y.unshard(), x / x.sum())
    assert y.shards[2] is y[2]
