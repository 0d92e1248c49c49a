"""torchpmap's side of the benchmark cases, for one device count.

    python benchmarks/cases_torchpmap.py --devices N [--quick]

Prints one JSON list of results (run.py starts this in a fresh process per N).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from _timing import calls_for, per_call
from torch.func import grad_and_value

import torchpmap as tp

WIDTH, ROWS, CLASSES, LR = 256, 64, 10, 0.1
TREE_LEAVES = 100


def mlp_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = {}
    for i, (a, b) in enumerate([(WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, CLASSES)]):
        p[f"w{i}"] = torch.randn(a, b, generator=g) / a**0.5
        p[f"b{i}"] = torch.zeros(b)
    return p


def grad_dict() -> dict:
    """A model's gradients as pmean sees them: 100 leaves, (16,) float32 each."""
    return {f"layer{i}.weight": torch.ones(16) for i in range(TREE_LEAVES)}


def mlp(p, x):
    h = torch.relu(x @ p["w0"] + p["b0"])
    h = torch.relu(h @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def loss_fn(p, x, y):
    return torch.nn.functional.cross_entropy(mlp(p, x), y)


def train_step(p, x, y):
    grads, loss = grad_and_value(loss_fn)(p, x, y)
    grads = tp.pmean(grads, "i")
    return {k: p[k] - LR * grads[k] for k in p}, tp.pmean(loss, "i")


def _eager_cases(n: int, devs: list, impl: str, quick: bool, trials: int, budget: float) -> list[dict]:
    """Dispatch, psum, pmean of a tree and bandwidth, on the executor set for ``impl``."""
    out = []

    def record(case, fn, guess, **extra):
        sec = per_call(fn, calls=calls_for(guess, budget), trials=trials)
        out.append({"case": case, "impl": impl, "devices": n, "sec_per_call": sec, **extra})

    x = tp.device_put_sharded(list(torch.ones(n, 16)), devs)
    double = tp.pmap(lambda v: v * 2, devices=devs)
    record("dispatch", lambda: double(x), 2e-4)

    x = tp.device_put_sharded(list(torch.ones(n, 1024)), devs)
    psum = tp.pmap(lambda v: tp.psum(v, "i"), "i", devices=devs)
    record("psum", lambda: psum(x), 5e-4)

    grads = tp.device_put_sharded([grad_dict() for _ in range(n)], devs)
    pmean_tree = tp.pmap(lambda g: tp.pmean(g, "i"), "i", devices=devs)
    record("pmean_tree", lambda: pmean_tree(grads), 2e-3)

    sizes = [1_000_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    affine = tp.pmap(lambda v: v * 2 + 1, devices=devs)
    for size in sizes:
        x = tp.device_put_sharded(list(torch.ones(n, size)), devs)
        record(
            "bandwidth" if size == 1_000_000 else f"bandwidth_{size}",
            lambda x=x: affine(x),
            size * 4e-9 + 2e-4,
            size=size,
        )

    return out


# Each eager column and the executor it runs on.
EXECUTORS = {"torchpmap": "threads", "torchpmap_stacked": "stacked", "torchpmap_lockstep": "lockstep"}


def run(n: int, quick: bool, compile_backend: str | None) -> list[dict]:
    devs = tp.local_devices()[:n]
    trials = 3 if quick else 7
    budget = 0.05 if quick else 0.3
    out = []

    for impl, executor in EXECUTORS.items():
        tp.set_executor(executor)
        out += _eager_cases(n, devs, impl, quick, trials, budget)
    tp.set_executor("threads")

    g = torch.Generator().manual_seed(1)
    xb = tp.device_put_sharded(list(torch.randn(n, ROWS, WIDTH, generator=g)), devs)
    yb = tp.device_put_sharded(list(torch.randint(0, CLASSES, (n, ROWS), generator=g)), devs)
    compiled = dict(backend=compile_backend)
    variants = [(impl, False, executor) for impl, executor in EXECUTORS.items()] + (
        # The stacked one first: its first call pays for importing Inductor, not flattered by the other's.
        [
            ("torchpmap_compiled_stacked", compiled, "stacked"),
            ("torchpmap_compiled_lockstep", compiled, "lockstep"),
            ("torchpmap_compiled", compiled, "threads"),
        ]
        if compile_backend
        else []
    )
    for impl, compile, executor in variants:
        tp.set_executor(executor)
        params = tp.device_put_replicated(mlp_params(), devs)
        step = tp.pmap(train_step, "i", devices=devs, compile=compile)
        t0 = time.perf_counter()
        state = {"p": step(params, xb, yb)[0]}
        out.append({"case": "train_first_call", "impl": impl, "devices": n, "sec_per_call": time.perf_counter() - t0})

        def one_step(step=step, state=state):
            state["p"], _ = step(state["p"], xb, yb)

        sec = per_call(one_step, calls=calls_for(5e-3, budget), trials=trials)
        out.append({"case": "train_step", "impl": impl, "devices": n, "sec_per_call": sec})
        if compile:
            x = tp.device_put_sharded(list(torch.ones(n, 1_000_000)), devs)
            affine_c = tp.pmap(lambda v: v * 2 + 1, devices=devs, compile=compile)
            affine_c(x)
            sec = per_call(lambda x=x, affine_c=affine_c: affine_c(x), calls=calls_for(2e-3, budget), trials=trials)
            out.append({"case": "bandwidth", "impl": impl, "devices": n, "sec_per_call": sec, "size": 1_000_000})
    tp.set_executor("threads")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="also time compiled pmap with this torch.compile backend ('none' to skip)",
    )
    args = ap.parse_args()
    backend = None if args.compile_backend == "none" else args.compile_backend
    print(json.dumps(run(args.devices, args.quick, backend)))


if __name__ == "__main__":
    main()
