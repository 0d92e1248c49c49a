"""PyTorch's own options for the same MLP training step (case e).

* single: plain PyTorch on one device over the whole batch (devices x 64 rows),
  nn.Module + loss.backward() + torch.optim.SGD.
* ddp: DistributedDataParallel over 2 Gloo processes on this machine, each
  with half of that batch.

    python benchmarks/cases_pytorch.py --devices N [--quick] [--no-ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import calls_for, per_call

WIDTH, ROWS, CLASSES, LR = 256, 64, 10, 0.1


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, CLASSES),
    )


def make_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def batch(rows: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, WIDTH, generator=g), torch.randint(0, CLASSES, (rows,), generator=g)


def single(n: int, quick: bool) -> dict:
    step = make_step(make_model(), *batch(n * ROWS))
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    sec = per_call(step, calls=calls_for(2e-3, 0.05 if quick else 0.3), trials=3 if quick else 7)
    return [
        {"case": "train_first_call", "impl": "pytorch_single", "devices": n, "sec_per_call": first},
        {"case": "train_step", "impl": "pytorch_single", "devices": n, "sec_per_call": sec},
    ]


def _ddp_worker(rank: int, world: int, port: int, n: int, quick: bool, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    x, y = batch(n * ROWS)
    per = n * ROWS // world
    step = make_step(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])

    def synced():
        step()
        dist.barrier()  # every rank's step is done

    t0 = time.perf_counter()
    synced()
    first = time.perf_counter() - t0
    sec = per_call(synced, calls=calls_for(5e-3, 0.05 if quick else 0.3), trials=3 if quick else 7)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                [
                    {"case": "train_first_call", "impl": "pytorch_ddp_2proc", "devices": n, "sec_per_call": first},
                    {"case": "train_step", "impl": "pytorch_ddp_2proc", "devices": n, "sec_per_call": sec},
                ],
                f,
            )
    dist.destroy_process_group()


def ddp(n: int, quick: bool) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ddp.json")
        mp.spawn(_ddp_worker, args=(2, port, n, quick, path), nprocs=2, join=True)
        with open(path) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ddp", action="store_true")
    args = ap.parse_args()
    rows = single(args.devices, args.quick)
    if not args.no_ddp and args.devices * ROWS % 2 == 0:
        rows += ddp(args.devices, args.quick)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
