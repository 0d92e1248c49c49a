"""Instructions per call of a benchmark case, counted by valgrind's callgrind.

    python benchmarks/count_instructions.py dispatch [--devices 2] [--calls 500]
        [--executor stacked] [--against DIR]

Wall-clock times on a shared machine move by 1.5x and more from one hour to the
next (benchmarks/README.md); the number of instructions a call executes does
not. Callgrind counts them for the measured calls only: the case is built and
warmed up with instrumentation off, then ``callgrind_control`` turns it on
around ``--calls`` calls. Counts repeat within about 0.5%, so a change of a few
percent in a call's own Python cost shows, where timing it would need a quiet
machine. They weigh every instruction alike (a cache miss or a page fault costs
nothing here): use them to compare two versions of the code, and
``benchmarks/run.py`` for what a call costs.

``--against DIR`` counts the same case with the torchpmap package found in DIR
as well (a ``git worktree`` of another commit), and prints both and their ratio.
Needs valgrind (``callgrind_control`` with it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES = ("dispatch", "feedback", "psum", "pmean_tree", "mlp")
# Set in the child that runs under valgrind.
_CHILD = "TORCHPMAP_COUNT_INSTRUCTIONS_CHILD"


def build(case: str, n: int, executor: str) -> Any:
    """A function of no arguments running one call of ``case`` on ``n`` virtual devices."""
    sys.path.insert(0, str(HERE))
    import torch
    from cases_torchpmap import grad_dict, mlp_params, train_step

    import torchpmap as tp

    tp.set_executor(executor)
    devs = tp.local_devices()[:n]
    if case == "dispatch":  # as benchmarks/run.py: a ShardedTensor made from the rows of one tensor
        x = tp.device_put_sharded(list(torch.ones(n, 16)), devs)
        double = tp.pmap(lambda v: v * 2, devices=devs)
        return lambda: double(x)
    if case == "feedback":  # a call's own output fed back, as a training loop's parameters are
        double = tp.pmap(lambda v: v * 2, devices=devs)
        state = {"x": double(tp.device_put_sharded(list(torch.ones(n, 16)), devs))}

        def again() -> None:
            state["x"] = double(state["x"])  # inf after a while: the same work

        return again
    if case == "psum":
        x = tp.device_put_sharded(list(torch.ones(n, 1024)), devs)
        psum = tp.pmap(lambda v: tp.psum(v, "i"), "i", devices=devs)
        return lambda: psum(x)
    if case == "pmean_tree":
        grads = tp.device_put_sharded([grad_dict() for _ in range(n)], devs)
        pmean = tp.pmap(lambda g: tp.pmean(g, "i"), "i", devices=devs)
        return lambda: pmean(grads)
    assert case == "mlp", case
    g = torch.Generator().manual_seed(1)
    xb = tp.device_put_sharded(list(torch.randn(n, 64, 256, generator=g)), devs)
    yb = tp.device_put_sharded(list(torch.randint(0, 10, (n, 64), generator=g)), devs)
    step = tp.pmap(train_step, "i", devices=devs)
    params = {"p": tp.device_put_replicated(mlp_params(), devs)}

    def one_step() -> None:
        params["p"], _ = step(params["p"], xb, yb)

    return one_step


def child(case: str, n: int, executor: str, calls: int, warmup: int) -> None:
    """Under valgrind: build and warm up, then count ``calls`` calls."""
    import torch

    torch.set_num_threads(1)  # one thread: the count does not depend on how OpenMP splits the work
    call = build(case, n, executor)
    import torchpmap

    print(f"torchpmap: {Path(torchpmap.__file__).parent}", file=sys.stderr)
    for _ in range(warmup):
        call()
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True)
    for _ in range(calls):
        call()
    subprocess.run(["callgrind_control", "--instr=off", pid], check=True, capture_output=True)


def count(case: str, n: int, executor: str, calls: int, warmup: int, pythonpath: str | None) -> tuple[int, str]:
    """Instructions per call, counted in a fresh process under callgrind, and
    the torchpmap package that process imported."""
    env = dict(os.environ, PYTHONHASHSEED="0", **{_CHILD: "1"})
    env.setdefault("TORCHPMAP_CPU_DEVICES", str(max(n, 8)))
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    args = [case, "--devices", str(n), "--executor", executor, "--calls", str(calls), "--warmup", str(warmup)]
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(Path(__file__).resolve()),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    collected = re.search(r"Collected : (\d+)", done.stderr)
    package = re.search(r"^torchpmap: (.*)$", done.stderr, re.MULTILINE)
    if collected is None or package is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-3000:]}")
    return int(collected.group(1)) // calls, package.group(1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--executor", default="stacked", choices=("threads", "stacked", "lockstep", "auto"))
    parser.add_argument("--calls", type=int, default=None, help="calls counted (default: 500, 40 for mlp)")
    parser.add_argument("--warmup", type=int, default=30, help="calls before counting (captures, caches)")
    parser.add_argument("--against", metavar="DIR", help="also count with the torchpmap package in DIR")
    parser.add_argument("--no-valgrind", action="store_true", help="run the calls without counting (a check)")
    opts = parser.parse_args(argv)
    calls = opts.calls or (40 if opts.case == "mlp" else 500)
    if os.environ.get(_CHILD):
        child(opts.case, opts.devices, opts.executor, calls, opts.warmup)
        return {}
    if opts.no_valgrind:
        call = build(opts.case, opts.devices, opts.executor)
        for _ in range(opts.warmup + calls):
            call()
        return {"case": opts.case, "calls": opts.warmup + calls}
    result: dict[str, Any] = {"case": opts.case, "devices": opts.devices, "executor": opts.executor}
    ours, package = count(opts.case, opts.devices, opts.executor, calls, opts.warmup, None)
    result.update(instructions_per_call=ours, package=package)
    if opts.against:
        theirs, their_package = count(opts.case, opts.devices, opts.executor, calls, opts.warmup, opts.against)
        result["against"] = {"package": their_package, "instructions_per_call": theirs}
        result["ratio"] = round(ours / theirs, 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
