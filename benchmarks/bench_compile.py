"""What torch.compile buys a pmapped training step.

A 3-layer MLP (width 256, 64 rows per device), value-and-grad with torch.func,
gradients averaged with pmean, an SGD update; over 4 virtual CPU devices.
Reports the first call (which includes compilation) and the steady-state time
per call for eager and compiled pmap, measured side by side in one run.

    python benchmarks/bench_compile.py [--devices 4] [--steps 50] [--backend inductor]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import grad_and_value

import torchpmap as tp


def init_params(width: int, features: int, classes: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sizes = [(features, width), (width, width), (width, classes)]
    params = {}
    for i, (a, b) in enumerate(sizes):
        params[f"w{i}"] = torch.randn(a, b, generator=g) / a**0.5
        params[f"b{i}"] = torch.zeros(b)
    return params


def mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ p["w0"] + p["b0"])
    h = torch.relu(h @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def loss_fn(p, x, y):
    return torch.nn.functional.cross_entropy(mlp(p, x), y)


def train_step(p, x, y, lr=0.1):
    loss, g = grad_and_value(loss_fn)(p, x, y)[::-1]
    g = tp.pmean(g, "i")
    return {k: p[k] - lr * g[k] for k in p}, tp.pmean(loss, "i")


def measure(compile, n: int, steps: int, width: int = 256, rows: int = 64) -> dict:
    devices = tp.local_devices()[:n]
    params = tp.device_put_replicated(init_params(width, 32, 10), devices)
    g = torch.Generator().manual_seed(1)  # same data for every mode
    x = tp.device_put_sharded(list(torch.randn(n, rows, 32, generator=g)), devices)
    y = tp.device_put_sharded(list(torch.randint(0, 10, (n, rows), generator=g)), devices)
    step = tp.pmap(train_step, "i", compile=compile)
    t0 = time.perf_counter()
    params, loss = step(params, x, y)
    first = time.perf_counter() - t0
    for _ in range(3):
        params, loss = step(params, x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        params, loss = step(params, x, y)
    steady = (time.perf_counter() - t0) / steps
    return {"first_call_s": first, "steady_ms": steady * 1e3, "final_loss": float(loss.shards[0])}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args(argv)
    rows = []
    for label, compile in (("eager", False), (f"compiled ({args.backend})", dict(backend=args.backend))):
        r = measure(compile, args.devices, args.steps)
        r["mode"] = label
        rows.append(r)
    eager = rows[0]["steady_ms"]
    print(f"MLP training step, {args.devices} virtual devices, torch {torch.__version__}")
    print(f"{'mode':<22}{'first call (s)':>16}{'steady (ms/step)':>18}{'vs eager':>10}")
    for r in rows:
        print(f"{r['mode']:<22}{r['first_call_s']:>16.3f}{r['steady_ms']:>18.3f}{eager / r['steady_ms']:>9.2f}x")
    return rows


if __name__ == "__main__":
    main()
