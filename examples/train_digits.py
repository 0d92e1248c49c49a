"""Data-parallel training of a small MLP on scikit-learn's digits, over every device.

    python examples/train_digits.py                      # module idiom (torch.optim)
    python examples/train_digits.py --idiom functional   # JAX idiom (torch.func + pytrees)
    python examples/train_digits.py --plot loss.png      # also save the loss curve

Each step splits the global batch across the devices with torchpmap.shard_batch
(the last, smaller batch is padded and masked), every replica computes its
gradients, and pmean averages them so that all replicas take the same step.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import torchpmap as tp


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )


def masked_loss(logits, y, mask, axis_name):
    """This replica's share of the global mean loss over the real (unmasked) rows,
    scaled so that averaging gradients with pmean gives the global gradient."""
    per_row = F.cross_entropy(logits, y, reduction="none") * mask
    n_real = tp.psum(mask.sum(), axis_name)
    return per_row.sum() * tp.axis_size(axis_name) / n_real


# -- the module (PyTorch) idiom ---------------------------------------------------------
def module_train_step(model, opt, x, y, mask):
    opt.zero_grad()
    loss = masked_loss(model(x), y, mask, "batch")
    loss.backward()
    tp.pmean_grads(model, "batch")  # one bucketed all-reduce for every gradient
    opt.step()
    return tp.pmean(loss.detach(), "batch")


# -- the functional (JAX) idiom ---------------------------------------------------------
def functional_train_step(model, params, momentum, x, y, mask, lr=0.05, beta=0.9):
    def loss_fn(p):
        return masked_loss(tp.functional_call(model, p, (x,)), y, mask, "batch")

    grads, loss = torch.func.grad_and_value(loss_fn)(params)
    grads = tp.pmean(grads, "batch")
    momentum = {k: beta * momentum[k] + grads[k] for k in params}
    params = {k: params[k] - lr * momentum[k] for k in params}
    return params, momentum, tp.pmean(loss, "batch")


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description="Train an MLP on the digits data set with torchpmap.")
    ap.add_argument("--idiom", choices=["module", "functional"], default="module")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128, help="global batch size")
    ap.add_argument("--plot", metavar="PNG", help="save the loss curve to this file")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = (
        torch.as_tensor(a) for a in train_test_split(x, y, test_size=0.2, random_state=0)
    )

    devices = tp.local_devices()
    n = len(devices)
    model = make_model()
    if args.idiom == "module":
        models, opts = tp.replicate(model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), devices)
        step = tp.pmap(module_train_step, axis_name="batch")
    else:
        params = tp.device_put_replicated(tp.params_of(model), devices)
        momentum = tp.device_put_replicated({k: torch.zeros_like(v) for k, v in tp.params_of(model).items()}, devices)
        step = tp.pmap(functional_train_step, axis_name="batch", in_axes=(None, 0, 0, 0, 0, 0))

    print(f"training on {n} devices ({', '.join(map(str, devices))}), {args.idiom} idiom")
    losses = []
    g = torch.Generator().manual_seed(0)
    bar = tqdm(range(args.epochs), desc="epochs", disable=args.quiet)
    for _ in bar:
        order = torch.randperm(len(x_train), generator=g)
        for start in range(0, len(order), args.batch):
            idx = order[start : start + args.batch]
            (xb, yb), mask = tp.shard_batch((x_train[idx], y_train[idx]), n, pad=True)
            if args.idiom == "module":
                loss = step(models, opts, xb, yb, mask.float())
            else:
                params, momentum, loss = step(model, params, momentum, xb, yb, mask.float())
            losses.append(loss.shards[0].item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")

    if args.idiom == "module":
        trained = models[0]
    else:
        trained = make_model()
        trained.load_state_dict(tp.unreplicate(params))
    acc = accuracy(trained, x_test, y_test)
    print(f"test accuracy: {acc:.4f} after {len(losses)} steps (final loss {losses[-1]:.4f})")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(losses)
        ax.set(xlabel="step", ylabel="training loss", yscale="log", title=f"digits, {n} devices, {args.idiom} idiom")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"loss curve saved to {args.plot}")
    return acc


if __name__ == "__main__":
    main()
