"""jax.pmap's side of the benchmark cases, for one device count.

    XLA_FLAGS=--xla_force_host_platform_device_count=N python benchmarks/cases_jax.py --devices N

Same cases and sizes as cases_torchpmap.py. Every call is waited for
(block_until_ready), as a torchpmap call returns when its work is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from _timing import calls_for, per_call

WIDTH, ROWS, CLASSES, LR = 256, 64, 10, 0.1
TREE_LEAVES = 100  # pmean_tree: a gradient dict of 100 (16,) leaves, as in cases_torchpmap.py


def mlp_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p = {}
    for i, (a, b) in enumerate([(WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, CLASSES)]):
        p[f"w{i}"] = (rng.standard_normal((a, b)) / a**0.5).astype(np.float32)
        p[f"b{i}"] = np.zeros(b, np.float32)
    return p


def mlp(p, x):
    h = jax.nn.relu(x @ p["w0"] + p["b0"])
    h = jax.nn.relu(h @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def loss_fn(p, x, y):
    logits = mlp(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def train_step(p, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    grads = jax.lax.pmean(grads, "i")
    return jax.tree_util.tree_map(lambda a, g: a - LR * g, p, grads), jax.lax.pmean(loss, "i")


def run(n: int, quick: bool) -> list[dict]:
    devs = jax.devices()[:n]
    trials = 3 if quick else 7
    budget = 0.05 if quick else 0.3
    out = []
    shard = jax.pmap(lambda v: v, devices=devs)  # places row i on device i

    def record(case, fn, guess, **extra):
        sec = per_call(fn, calls=calls_for(guess, budget), trials=trials)
        out.append({"case": case, "impl": "jax", "devices": n, "sec_per_call": sec, **extra})

    x = shard(np.ones((n, 16), np.float32))
    double = jax.pmap(lambda v: v * 2, devices=devs)
    record("dispatch", lambda: double(x).block_until_ready(), 1e-4)

    x = shard(np.ones((n, 1024), np.float32))
    psum = jax.pmap(lambda v: jax.lax.psum(v, "i"), "i", devices=devs)
    record("psum", lambda: psum(x).block_until_ready(), 3e-4)

    grads = {f"layer{i}.weight": shard(np.ones((n, 16), np.float32)) for i in range(TREE_LEAVES)}
    pmean_tree = jax.pmap(lambda g: jax.lax.pmean(g, "i"), "i", devices=devs)
    record("pmean_tree", lambda: jax.block_until_ready(pmean_tree(grads)), 1e-3)

    sizes = [1_000_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    affine = jax.pmap(lambda v: v * 2 + 1, devices=devs)
    for size in sizes:
        x = shard(np.ones((n, size), np.float32))
        record(
            "bandwidth" if size == 1_000_000 else f"bandwidth_{size}",
            lambda x=x: affine(x).block_until_ready(),
            size * 4e-9 + 1e-4,
            size=size,
        )

    rng = np.random.default_rng(1)
    params = (
        jax.device_put_replicated(mlp_params(), devs)
        if hasattr(jax, "device_put_replicated")
        else jax.pmap(lambda _: mlp_params(), devices=devs)(np.zeros(n))
    )
    xb = shard(rng.standard_normal((n, ROWS, WIDTH)).astype(np.float32))
    yb = shard(rng.integers(0, CLASSES, (n, ROWS)).astype(np.int32))
    step = jax.pmap(train_step, "i", devices=devs)
    t0 = time.perf_counter()
    p, loss = step(params, xb, yb)
    loss.block_until_ready()
    out.append({"case": "train_first_call", "impl": "jax", "devices": n, "sec_per_call": time.perf_counter() - t0})
    state = {"p": p}

    def one_step():
        state["p"], loss = step(state["p"], xb, yb)
        loss.block_until_ready()

    record("train_step", one_step, 3e-3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(json.dumps(run(args.devices, args.quick)))


if __name__ == "__main__":
    main()
