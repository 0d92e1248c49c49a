"""Data-parallel training of a small CNN on scikit-learn's digits, written the DDP way.

    python examples/train_cnn.py                                   # every local device
    python examples/train_cnn.py --plot loss.png                   # also save the loss curve
    TORCHPMAP_CPU_DEVICES=2 torchrun --nproc_per_node=2 examples/train_cnn.py   # 2 processes x 2 devices
    python examples/train_cnn.py --checkpoint ckpt.pt --max-steps 30   # stop early (saves ckpt.pt)
    python examples/train_cnn.py --checkpoint ckpt.pt --resume         # go on from it

What it shows: BatchNorm with statistics over every replica (convert_sync_batchnorm), dropout,
AdamW with a OneCycleLR schedule per replica, gradient clipping after averaging, bf16 autocast
(--no-amp turns it off), a DataLoader that gives each process its part of every global batch
(ProcessBatchSampler), evaluation after every epoch, and a checkpoint after every epoch (and
when --max-steps stops the run) that --resume continues from, even mid-epoch.

The same --seed gives the same losses bit for bit: every replica draws its dropout masks from
its own stream, derived from the caller's generator (seeded here with torch.manual_seed) and the
replica's global index; the checkpoint saves that generator's state. 2 processes x 2 devices
draw the same masks as 1 process x 4 devices; their losses agree up to rounding, since the
gradient average adds the replicas' gradients in another order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import torchpmap as tp
import torchpmap.distributed as tpd


def make_model() -> nn.Module:
    """8x8 images -> 10 classes; the BatchNorms become SyncBatchNorms."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10),
    )  # fmt: skip
    # Every replica normalises with the whole global batch's statistics, so the replicas'
    # running statistics stay identical (plain BatchNorm would use each replica's shard).
    return tp.convert_sync_batchnorm(model, "batch")


def digits() -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()  # ships with scikit-learn: no download
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def autocast(x: torch.Tensor, amp: bool) -> torch.autocast:
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)


def train_step(model, opt, x, y, amp: bool, max_norm: float):
    """One replica's step on its shard of the global batch."""
    opt.zero_grad()
    with autocast(x, amp):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    tp.pmean_grads(model, "batch")  # every replica now holds the whole batch's gradient
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # so this is the global norm
    opt.step()
    return tp.pmean(loss.detach(), "batch")


def eval_step(model, x, y, mask, amp: bool):
    """How many of the real (unpadded) rows of the global batch the model gets right."""
    with torch.no_grad(), autocast(x, amp):
        correct = (model(x).argmax(1) == y) & mask
    return tp.psum(correct.sum(), "batch"), tp.psum(mask.sum(), "batch")


def evaluate(models, test_set, batch_size: int, amp: bool) -> float:
    step = tp.pmap(lambda m, x, y, mask: eval_step(m, x, y, mask, amp), axis_name="batch")
    # No drop_last: the last global batch is completed with repeated rows, which mask leaves out.
    sampler = tp.ProcessBatchSampler(test_set, batch_size)
    correct = total = 0
    models.eval()  # dropout off, BatchNorm uses its running statistics
    for i, (x, y) in enumerate(DataLoader(test_set, batch_sampler=sampler)):
        c, n = step(models, *tp.shard_batch((x, y, sampler.mask(i))))
        correct, total = correct + c.shards[0].item(), total + n.shards[0].item()
    models.train()
    return correct / total


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train a CNN on the digits data set with torchpmap.")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128, help="global batch size, a multiple of the device count")
    ap.add_argument("--lr", type=float, default=1e-2, help="OneCycleLR's peak learning rate")
    ap.add_argument("--max-norm", type=float, default=1.0, help="clip gradients to this global norm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="train in float32, not bf16 autocast")
    ap.add_argument("--max-steps", type=int, help="stop after this many steps in all (with a checkpoint)")
    ap.add_argument("--checkpoint", metavar="PATH", help="save the training state here after every epoch")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    ap.add_argument("--plot", metavar="PNG", help="save the loss curve to this file")
    ap.add_argument("--losses-out", metavar="JSON", help="write every step's loss to this file")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.resume and not args.checkpoint:
        ap.error("--resume needs --checkpoint PATH")
    if args.batch % tp.device_count():
        ap.error(f"--batch {args.batch} must be a multiple of the {tp.device_count()} devices")
    return args


def main(argv=None) -> None:
    if "RANK" in os.environ:  # launched by torchrun: join the other processes
        tpd.initialize()
    args = parse_args(argv)
    first = tp.process_index() == 0  # prints, plots and writes files

    def log(message: str) -> None:
        if first:
            tqdm.write(message)  # above the progress bar

    torch.manual_seed(args.seed)  # the model's initial weights and every replica's dropout stream
    train_set, test_set = digits()
    # Each process loads only its contiguous block of every global batch (DistributedSampler's job
    # under DDP). drop_last: full batches only, so no padding rows enter BatchNorm's statistics.
    sampler = tp.ProcessBatchSampler(train_set, args.batch, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler)

    models, opts = tp.replicate(make_model(), lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=1e-4))
    scheds = tp.PerReplica(
        [torch.optim.lr_scheduler.OneCycleLR(o, args.lr, total_steps=args.epochs * steps_per_epoch) for o in opts],
        opts.devices,
    )
    step, losses = 0, []
    if args.resume:  # also restores the random state, so dropout goes on as if never stopped
        rest = tp.load_checkpoint(args.checkpoint, model=models, opt=opts, sched=scheds)
        step, losses = rest["step"], rest["losses"]
        log(f"resumed from {args.checkpoint} at step {step}")

    def save() -> None:
        if args.checkpoint:
            tp.save_checkpoint(args.checkpoint, model=models, opt=opts, sched=scheds, step=step, losses=losses)

    pstep = tp.pmap(lambda m, o, x, y: train_step(m, o, x, y, args.amp, args.max_norm), axis_name="batch")
    log(f"training on {tp.device_count()} devices in {tp.process_count()} process(es), bf16 autocast: {args.amp}")
    last_step = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        last_step = min(last_step, args.max_steps)
    bar = tqdm(total=last_step, initial=step, disable=args.quiet or not first or not sys.stderr.isatty())
    while step < last_step:
        epoch, skip = divmod(step, steps_per_epoch)  # skip > 0: resuming mid-epoch
        sampler.set_epoch(epoch)
        # Its own generator: a DataLoader draws a seed from the global one for every epoch,
        # which would shift the dropout streams of a run resumed mid-epoch.
        # This process's batches of the epoch, less those done before a mid-epoch resume.
        loader = DataLoader(train_set, batch_sampler=list(sampler)[skip:], generator=torch.Generator())
        for x, y in loader:
            loss = pstep(models, opts, *tp.shard_batch((x, y)))
            scheds.step()  # every replica's scheduler, so they keep the same learning rate
            losses.append(loss.shards[0].item())
            step += 1
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
            if step == last_step:
                break
        if step % steps_per_epoch == 0:
            acc = evaluate(models, test_set, args.batch, args.amp)
            log(f"epoch {epoch}: loss {losses[-1]:.4f}, test accuracy {acc:.4f}")
        save()
    bar.close()

    tp.assert_replicas_identical(models, opts, scheds)  # parameters, gradients, buffers, optimizer state
    log(f"final test accuracy: {evaluate(models, test_set, args.batch, args.amp):.4f} after {step} steps")
    if first and args.losses_out:
        with open(args.losses_out, "w") as f:
            json.dump(losses, f)
    if first and args.plot:
        plot(losses, args.plot, f"digits CNN, {tp.device_count()} devices")
    if tpd.is_initialized():
        tpd.shutdown()


def plot(losses: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses)
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    fig.tight_layout()
    fig.savefig(path)
    print(f"loss curve saved to {path}")


if __name__ == "__main__":
    main()
