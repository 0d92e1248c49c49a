"""threads vs stacked vs lockstep executor, side by side in one process (virtual CPU devices)."""

import sys
import time
import warnings

import torch

import torchpmap as tp

warnings.simplefilter("error", RuntimeWarning)  # a fallback would make the numbers meaningless
torch.manual_seed(0)


def per_call_us(f, *args, iters):
    for _ in range(10):
        f(*args)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            f(*args)
        best = min(best, (time.perf_counter() - t) / iters * 1e6)
    return best


def mlp_step_fn():
    def loss(p, x, y):
        h = torch.relu(x @ p["w0"])
        h = torch.relu(h @ p["w1"])
        return ((h @ p["w2"] - y) ** 2).mean()

    def step(p, x, y):
        g, v = torch.func.grad_and_value(loss)(p, x, y)
        g = tp.pmean(g, "i")
        return {k: p[k] - 0.01 * g[k] for k in p}, tp.pmean(v, "i")

    return step


def outer_autograd_step(devs, dropout=0.0):
    """The nn.Module idiom: a module closed over, loss.backward() and the optimizer outside the call."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU()]
    if dropout:
        layers = [*layers[:2], torch.nn.Dropout(dropout), *layers[2:], torch.nn.Dropout(dropout)]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(256, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = tp.pmap(lambda x, y: ((model(x) - y) ** 2).mean(), "i", devices=devs)

    def step(x, y):
        opt.zero_grad()
        loss(x, y).unshard().mean().backward()
        opt.step()

    return step


def cases(n):
    devs = tp.devices()[:n]
    x16 = torch.randn(n, 16)
    x1024 = torch.randn(n, 1024)
    params = tp.device_put_replicated({k: torch.randn(256, 256) * 0.05 for k in ("w0", "w1", "w2")}, devs)
    xb, yb = torch.randn(n, 64, 256), torch.randn(n, 64, 256)
    return {
        "x*2 (n,16)": (lambda: tp.pmap(lambda x: x * 2, "i", devices=devs), (x16,), 2000, False),
        "psum (n,1024)": (lambda: tp.pmap(lambda x: tp.psum(x, "i"), "i", devices=devs), (x1024,), 2000, False),
        "MLP step 3x256, 64 rows/dev": (lambda: tp.pmap(mlp_step_fn(), "i", devices=devs), (params, xb, yb), 50, True),
        "MLP step, loss.backward() outside": (lambda: outer_autograd_step(devs), (xb, yb), 50, False),
        "same with two dropouts": (lambda: outer_autograd_step(devs, 0.1), (xb, yb), 50, False),
    }


def main():
    ns = [int(a) for a in sys.argv[1:]] or [2, 4, 8]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(
        "| case | n | threads us/call | stacked us/call | lockstep us/call | stacked speedup | lockstep speedup "
        "| stacked first call (capture) ms | lockstep first call ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        for name, (make, args, iters, feed_back) in cases(n).items():
            res = {}
            for ex in ("threads", "stacked", "lockstep"):
                tp.set_executor(ex)
                f = make()
                t = time.perf_counter()
                try:
                    f(*args)
                except RuntimeWarning as w:  # the executor falls back for this case (lockstep: autograd)
                    print(f"<!-- {name}, {ex}: {w} -->")
                    res[ex] = (float("nan"), float("nan"))
                    continue
                first = (time.perf_counter() - t) * 1e3
                if feed_back:  # params fed back: time the training loop
                    state = {"p": args[0]}

                    def loop(x, y, f=f, state=state):
                        state["p"], _ = f(state["p"], x, y)

                    us = per_call_us(loop, *args[1:], iters=iters)
                else:
                    us = per_call_us(f, *args, iters=iters)
                res[ex] = (us, first)
            (tu, _), (su, sf), (lu, lf) = res["threads"], res["stacked"], res["lockstep"]
            speedups = f"{tu / su:.2f}x | {tu / lu:.2f}x".replace("nanx", "-")
            row = f"| {name} | {n} | {tu:.0f} | {su:.0f} | {lu:.0f} | {speedups} | {sf:.0f} | {lf:.0f} |"
            print(row.replace("nan", "-"))
    tp.set_executor("threads")


if __name__ == "__main__":
    main()
