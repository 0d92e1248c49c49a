"""Run under torchrun by tests/test_distributed.py: one process of a
multi-process pmap job over Gloo. argv[1] is the scenario."""

import json
import os
import sys
import time

import numpy as np
import torch

import torchpmap as tp
import torchpmap.distributed as tpd


def say(line):
    # One write per line, so two processes sharing stdout do not interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check(name, got, want, results):
    got = np.asarray(got)
    ok = got.shape == np.shape(want) and np.allclose(got, want, atol=1e-5, equal_nan=True)
    results[name] = bool(ok)
    if not ok:
        say(f"MISMATCH {name}: got {got.tolist()} want {np.asarray(want).tolist()}")


def check_bits(name, got, want, results):
    """got equal to want bit for bit, for dtypes numpy lacks too (uint32, float8)."""
    got, want = got.unshard() if hasattr(got, "unshard") else got, want.contiguous()
    ok = got.dtype == want.dtype and got.shape == want.shape
    ok = ok and torch.equal(got.contiguous().unsqueeze(-1).view(torch.uint8), want.unsqueeze(-1).view(torch.uint8))
    results[name] = bool(ok)
    if not ok:
        say(f"MISMATCH {name}: got {got.to(torch.float64).tolist()} want {want.to(torch.float64).tolist()}")


def wire_dtypes(full, first, L, G, results):
    """Dtypes Gloo refuses go on the wire in one it takes: the same bits as in one process."""
    idx = torch.arange(first, first + L)
    big = (torch.arange(G * G * 3, dtype=torch.int32).reshape(G, G, 3) * 9973 - 30000).to(torch.int16)
    mine = big[first : first + L]

    def run(f, x):
        return tp.pmap(f, "i")(x)

    # The sum wraps around as int16 arithmetic in one process does.
    total = big.sum(0, dtype=torch.int16)
    check_bits("psum_int16", run(lambda x: tp.psum(x, "i"), mine), total.expand(L, G, 3), results)
    check_bits("pmax_int16", run(lambda x: tp.pmax(x, "i"), mine), big.max(0).values.expand(L, G, 3), results)
    check_bits("pmin_int16", run(lambda x: tp.pmin(x, "i"), mine), big.min(0).values.expand(L, G, 3), results)
    groups = [list(range(0, G, 2)), list(range(1, G, 2))]
    want = torch.stack([big[g].sum(0, dtype=torch.int16) for g in (groups[i % 2] for i in idx.tolist())])
    check_bits("psum_groups_int16", run(lambda x: tp.psum(x, "i", axis_index_groups=groups), mine), want, results)
    check_bits("psum_scatter_int16", run(lambda x: tp.psum_scatter(x, "i"), mine), total[idx], results)
    bits = torch.tensor(full).view(torch.int32)  # the input's float32 bits: large, varied integers
    perm = [(g, (g + 1) % G) for g in range(G)]
    for dtype in (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2):
        name = str(dtype).removeprefix("torch.")
        every = bits.to(torch.int64).view(torch.uint64).to(dtype) if dtype == torch.uint64 else bits.to(dtype)
        x = every[first : first + L]
        check_bits(f"all_gather_{name}", run(lambda x: tp.all_gather(x, "i"), x), every.expand(L, G, G, 3), results)
        check_bits(f"ppermute_{name}", run(lambda x: tp.ppermute(x, "i", perm), x), every[(idx - 1) % G], results)
        want = every.transpose(1, 0)[idx]
        check_bits(f"all_to_all_{name}", run(lambda x: tp.all_to_all(x, "i", 0, 0), x), want, results)
    # A reduction torch cannot compute is refused before any data moves, and the job goes on.
    try:
        run(lambda x: tp.psum(x, "i"), mine.to(torch.uint16))
        results["psum_uint16_refused"] = False
    except TypeError as e:
        results["psum_uint16_refused"] = "torch.uint16" in str(e) and "all_reduce" in str(e)


def collectives():
    tpd.initialize(timeout=30)
    rank, world = tp.process_index(), tp.process_count()
    local = tp.local_devices()
    L, G = len(local), tp.device_count()
    assert len(tp.devices()) == G == world * L, (tp.devices(), local)
    first = rank * L
    # Virtual CPU devices are numbered globally: each named once, this process's in its place.
    assert tp.devices() == [torch.device("cpu", g) for g in range(G)], tp.devices()
    assert local == tp.devices()[first : first + L], (local, tp.devices())
    # Global input: row g is rng-free and known to every process.
    full = np.arange(G * G * 3, dtype=np.float32).reshape(G, G, 3) / 7.0
    mine = torch.tensor(full[first : first + L])
    results = {}

    def run(f, x=mine, **kw):
        return np.asarray(tp.pmap(f, "i", **kw)(x))

    idx = np.arange(first, first + L)
    check("axis_index", run(lambda x: tp.axis_index("i")), idx, results)
    check("axis_size", run(lambda x: torch.tensor(tp.axis_size("i"))), np.full(L, G), results)
    check("psum", run(lambda x: tp.psum(x, "i")), np.broadcast_to(full.sum(0), (L, G, 3)), results)
    check("pmean", run(lambda x: tp.pmean(x, "i")), np.broadcast_to(full.mean(0), (L, G, 3)), results)
    check("pmax", run(lambda x: tp.pmax(x, "i")), np.broadcast_to(full.max(0), (L, G, 3)), results)
    check("pmin", run(lambda x: tp.pmin(-x, "i")), np.broadcast_to((-full).min(0), (L, G, 3)), results)
    # NaNs held by different processes survive pmax/pmin, as torch.maximum keeps them in one process
    # (Gloo's and NCCL's own max/min drop them).
    nans = full.copy()
    nans[0, 0, 0] = nans[G - 1, 1, 1] = np.nan
    mine_nans = torch.tensor(nans[first : first + L])
    check("pmax_nan", run(lambda x: tp.pmax(x, "i"), mine_nans), np.broadcast_to(np.max(nans, 0), (L, G, 3)), results)
    check("pmin_nan", run(lambda x: tp.pmin(x, "i"), mine_nans), np.broadcast_to(np.min(nans, 0), (L, G, 3)), results)
    bools = torch.tensor(full[first : first + L] > 1.0)
    check("psum_bool", run(lambda x: tp.psum(x, "i"), bools), np.broadcast_to((full > 1.0).sum(0), (L, G, 3)), results)
    check("all_gather", run(lambda x: tp.all_gather(x, "i")), np.broadcast_to(full, (L, G, G, 3)), results)
    check(
        "all_gather_tiled",
        run(lambda x: tp.all_gather(x, "i", axis=1, tiled=True)),
        np.broadcast_to(np.concatenate(list(full), axis=1), (L, G, G * 3)),
        results,
    )
    check("psum_scatter", run(lambda x: tp.psum_scatter(x, "i")), full.sum(0)[idx], results)
    perm = [(g, (g + 1) % G) for g in range(G)]
    check("ppermute", run(lambda x: tp.ppermute(x, "i", perm)), full[(idx - 1) % G], results)
    check("all_to_all", run(lambda x: tp.all_to_all(x, "i", 0, 0)), full.transpose(1, 0, 2)[idx], results)
    groups = [list(range(0, G, 2)), list(range(1, G, 2))]
    expect = np.stack([full[g].sum(0) for g in (groups[i % 2] for i in idx)])
    check("psum_groups", run(lambda x: tp.psum(x, "i", axis_index_groups=groups)), expect, results)
    unequal = [list(range(G - 1)), [G - 1]]  # spans both processes
    group_of = {m: g for g in unequal for m in g}
    expect = np.stack([full[group_of[i]].mean(0) for i in idx])
    check("pmean_unequal_groups", run(lambda x: tp.pmean(x, "i", axis_index_groups=unequal)), expect, results)
    check(
        "psum_count_unequal_groups",
        run(lambda x: tp.psum(1, "i", axis_index_groups=unequal)),
        [len(group_of[i]) for i in idx],
        results,
    )
    # Dicts built in a different order on each process pair their leaves by key.
    tree = (lambda x: {"a": x, "b": -x}) if rank == 0 else (lambda x: {"b": -x, "a": x})
    check(
        "psum_dict_order", run(lambda x: tp.psum(tree(x), "i")["b"]), np.broadcast_to(-full.sum(0), (L, G, 3)), results
    )
    wire_dtypes(full, first, L, G, results)
    # The same values laid out otherwise on one process (a column-major batch): the process group
    # reduces memory element by element, and the sum kept the input's strides (found by a hunt).
    laid_out = (
        torch.tensor(full[first : first + L]) if rank == 0 else torch.tensor(full[first : first + L]).mT.contiguous().mT
    )
    check(
        "psum_other_layout", run(lambda x: tp.psum(x, "i"), laid_out), np.broadcast_to(full.sum(0), (L, G, 3)), results
    )
    ints = (laid_out * 7).round().int()
    want = (np.round(full * 7).astype(np.int32)).max(0)
    check("pmax_int_other_layout", run(lambda x: tp.pmax(x, "i"), ints), np.broadcast_to(want, (L, G, 3)), results)
    # A ShardedTensor goes back in without copies, and converts to a DTensor.
    y = tp.pmap(lambda x: x * 2, "i")(mine)
    dt = tpd.to_dtensor(y)
    check("dtensor_global_shape", np.array(dt.shape), np.array([G, G, 3]), results)
    check("dtensor_full", dt.full_tensor().numpy(), full * 2, results)
    # Trees of the same size but different shapes fail on every process.
    shape = (2, 3) if rank == 0 else (3, 2)
    try:
        run(lambda x: tp.psum({"w": x.new_ones(shape), "b": x.new_ones(4)}, "i")["w"])
        results["tree_mismatch"] = False
    except tp.CollectiveMismatchError as e:
        results["tree_mismatch"] = f"'w': float32{list(shape)}" in str(e)
    say("RESULTS " + json.dumps(results))
    tpd.shutdown()
    sys.exit(0 if all(results.values()) else 1)


def mlp_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w0": torch.randn(4, 8, generator=g),
        "b0": torch.zeros(8),
        "w1": torch.randn(8, 2, generator=g),
        "b1": torch.zeros(2),
    }


def loss_fn(p, x, y):
    h = torch.tanh(x @ p["w0"] + p["b0"])
    return ((h @ p["w1"] + p["b1"] - y) ** 2).mean()


def train():
    """Two shuffled epochs through ProcessBatchSampler, whose last global batch
    is padded and masked: the same parameters as one device on every real row."""
    tpd.initialize(timeout=30)
    L = tp.local_device_count()
    g = torch.Generator().manual_seed(1)
    n, batch, epochs = 21, 8, 2  # 21 rows: the third batch has 5 real rows and 3 padding
    X, Y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)
    sampler = tp.ProcessBatchSampler(n, batch, shuffle=True, seed=7)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_sampler=sampler)

    def masked_loss(p, x, y, mask, real):
        h = torch.tanh(x @ p["w0"] + p["b0"])
        per_row = ((h @ p["w1"] + p["b1"] - y) ** 2).mean(-1)
        return (per_row * mask).sum() / real

    def step(p, x, y, mask):
        real = tp.psum(mask.sum(), "i")
        grads = tp.psum(torch.func.grad(masked_loss)(p, x, y, mask, real), "i")
        return {k: p[k] - 0.1 * grads[k] for k in p}

    pstep = tp.pmap(step, "i")
    params = tp.device_put_replicated(mlp_params(), tp.local_devices())
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            xb, yb, mb = tp.shard_batch((x, y, sampler.mask(i).float()), L)
            params = pstep(params, xb, yb, mb)
    # The same training on one device, on the real rows of each global batch.
    ref = mlp_params()
    whole = tp.ProcessBatchSampler(n, batch, shuffle=True, seed=7, process_index=0, process_count=1)
    for epoch in range(epochs):
        whole.set_epoch(epoch)
        for i, idx in enumerate(whole):
            rows = torch.tensor(idx)[whole.mask(i)]
            grads = torch.func.grad(loss_fn)(ref, X[rows], Y[rows])
            ref = {k: ref[k] - 0.1 * grads[k] for k in ref}
    results = {}
    for k in ref:  # every local replica's copy, each named
        for r, shard in enumerate(params[k].shards):
            check(f"param_{k}_replica{tp.process_index() * L + r}", shard.numpy(), ref[k].numpy(), results)
    say("RESULTS " + json.dumps(results))
    tpd.shutdown()
    sys.exit(0 if all(results.values()) else 1)


def failure(stay_alive=False):
    tpd.initialize(timeout=5)
    rank = tp.process_index()

    def f(x):
        if rank == 1:
            raise ValueError("rank 1 gives up")
        return tp.psum(x, "i")

    t0 = time.monotonic()
    try:
        tp.pmap(f, "i")(torch.ones(tp.local_device_count(), 2))
    except Exception as e:
        say(f"ERROR {type(e).__name__}: {str(e).splitlines()[0]} after {time.monotonic() - t0:.1f}s")
        if stay_alive and rank == 1:
            time.sleep(20)  # a failed rank that lingers: the others must not wait for it
        # Rank 1 leaves with status 0: torchrun kills the other workers as soon as
        # one fails, which raced with rank 0 reporting what it saw (its peer gone).
        os._exit(0 if rank == 1 and not stay_alive else 3)
    say("NO ERROR")
    os._exit(0)


def psum_and_report(rank):
    """One psum across the processes; say how it ended and after how long, then exit."""
    t0 = time.monotonic()
    try:
        tp.pmap(lambda x: tp.psum(x, "i"), "i")(torch.ones(tp.local_device_count(), 2))
        say(f"rank {rank} OK after {time.monotonic() - t0:.1f}s")
    except Exception as e:
        say(f"rank {rank} ERROR {type(e).__name__} after {time.monotonic() - t0:.1f}s")
    os._exit(0)


def late_peer():
    """Rank 1 reaches the psum long after the timeout: rank 0 fails with a
    CollectiveError after the timeout, and neither process hangs."""
    tp.set_collective_timeout(2)
    tpd.initialize(timeout=2)
    rank = tp.process_index()
    if rank == 1:
        time.sleep(6)
    psum_and_report(rank)


def hang_in_data_collectives():
    """Make this process hang in every cross-process data collective, then die: a peer
    that passed the lockstep check and never completes the collective."""

    def hang(*args, **kwargs):
        time.sleep(9)
        os._exit(0)

    tpd.dist.all_reduce = hang


def hung_peer():
    """Rank 1 hangs in the psum's all-reduce. The process group's own timeout is 60 s;
    rank 0's timed wait must give up after torchpmap's 3 s."""
    import datetime

    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    tpd.initialize(timeout=3)
    rank = tp.process_index()
    if rank == 1:
        hang_in_data_collectives()
    psum_and_report(rank)


def shutdown_after_failure():
    """After rank 0's psum timed out (rank 1 hangs in it), shutdown() aborts the process
    group without waiting for the peer, and returns."""
    tpd.initialize(timeout=3)
    rank = tp.process_index()
    if rank == 1:
        hang_in_data_collectives()
    try:
        tp.pmap(lambda x: tp.psum(x, "i"), "i")(torch.ones(tp.local_device_count(), 2))
        say(f"rank {rank} NO ERROR")
    except Exception as e:
        say(f"rank {rank} ERROR {type(e).__name__}")
    t0 = time.monotonic()
    try:
        tpd.shutdown()
        say(f"SHUTDOWN ok after {time.monotonic() - t0:.1f}s")
    except Exception as e:
        say(f"SHUTDOWN raised {type(e).__name__}: {e}")
    os._exit(0)


def catch_and_continue():
    """Rank 1's replica fails at step 3; both ranks catch errors and go on.
    Every later step must give the right value or raise: rank 0's step-3 psum
    must never be paired with rank 1's step-4 psum."""
    tpd.initialize(timeout=10)
    rank, L, G = tp.process_index(), tp.local_device_count(), tp.device_count()

    # First, rank 1's replicas disagree on an out_axes=None output: rank 1 raises that,
    # rank 0 learns it in the same exchange (not at the timeout), and both stay in step.
    def loss(x):
        return x.sum() + (tp.axis_index("i") if rank == 1 else 0)

    t0 = time.monotonic()
    try:
        tp.pmap(loss, "i", out_axes=None)(torch.ones(L, 2))
        first = "no error"
    except ValueError as e:
        first = "another process" if "another process" in str(e) else "own replicas"
    say(f"DISAGREE {rank} {first} after {time.monotonic() - t0:.1f}s")
    # Rank 1 has no out_axes=None output where rank 0 has one: both raise, still in step.
    try:
        tp.pmap(lambda x: (x, {} if rank == 1 else {"r": x.sum() * 0}), "i", out_axes=(0, None))(torch.ones(L, 2))
        say(f"STRUCTURE {rank} no error")
    except ValueError as e:
        say(f"STRUCTURE {rank} {'ok' if 'different output structures' in str(e) else e}")

    def f(x, step):
        if rank == 1 and step == 3 and int(tp.axis_index("i")) == 2:
            raise ValueError("replica 2 fails at step 3")
        return tp.psum(x, "i")

    pf = tp.pmap(f, "i", static_broadcasted_argnums=(1,))
    outcomes = []
    for step in range(1, 7):
        x = torch.full((L, 1), float(step))
        try:
            got = pf(x, step).unshard().flatten().tolist()
            outcomes.append("ok" if got == [step * G] * L else f"WRONG {got}")
        except Exception as e:
            outcomes.append(type(e).__name__)
    say(f"OUTCOMES {rank} " + json.dumps(outcomes))
    os._exit(0)


def failure_then_shutdown(in_backward=False):
    """Rank 1 fails in a call (in its forward, or in the call's backward) and goes straight
    to shutdown() in a ``finally``, while rank 0 waits in a psum of that call: rank 0 must
    raise at once (rank 1's notice), not at the 20 s timeout, and both shutdowns return."""
    tpd.initialize(timeout=20)
    rank, L = tp.process_index(), tp.local_device_count()

    class FailsBackwardOnRank1(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            if rank == 1:
                raise ValueError("rank 1 gives up in backward")
            return g

    def f(x):
        if rank == 1 and not in_backward:
            raise ValueError("rank 1 gives up")
        # The backward runs FailsBackwardOnRank1's first, then the psum's exchange.
        return FailsBackwardOnRank1.apply(tp.psum(x * 2, "i"))

    t0 = time.monotonic()
    try:
        try:
            x = torch.ones(L, 2, requires_grad=True)
            out = tp.pmap(f, "i")(x)
            out.unshard().sum().backward()
            say(f"rank {rank} NO ERROR")
        except Exception as e:
            say(f"rank {rank} ERROR {type(e).__name__} after {time.monotonic() - t0:.1f}s: {str(e).splitlines()[0]}")
    finally:
        t1 = time.monotonic()
        try:
            tpd.shutdown()
            say(f"rank {rank} SHUTDOWN ok after {time.monotonic() - t1:.1f}s")
        except Exception as e:
            say(f"rank {rank} SHUTDOWN raised {type(e).__name__} after {time.monotonic() - t1:.1f}s")
    os._exit(0)


def failure_alike():
    """Every replica of every process raises in the same call (a bad step caught and
    skipped): the processes stay in step, and the next calls run."""
    tpd.initialize(timeout=20)
    rank, L, G = tp.process_index(), tp.local_device_count(), tp.device_count()

    def f(x, step):
        if step == 2:
            raise ValueError("step 2 fails everywhere")
        return tp.psum(x, "i")

    pf = tp.pmap(f, "i", static_broadcasted_argnums=(1,))
    outcomes = []
    for step in range(1, 5):
        t0 = time.monotonic()
        try:
            got = pf(torch.full((L, 1), float(step)), step).unshard().flatten().tolist()
            outcomes.append("ok" if got == [step * G] * L else f"WRONG {got}")
        except Exception as e:
            outcomes.append(f"{type(e).__name__} after {time.monotonic() - t0:.1f}s")
    say(f"OUTCOMES {rank} " + json.dumps(outcomes))
    tpd.shutdown()
    os._exit(0)


def backward_out_of_step():
    """Process 0 runs a call's backward while process 1 skips it and makes its next
    call, whose psum looks like the backward's: both must fail, never pair the two."""
    tpd.initialize(timeout=30)
    rank, L, G = tp.process_index(), tp.local_device_count(), tp.device_count()
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    full = torch.arange(G * 3, dtype=torch.float32).reshape(G, 3)
    out = tp.pmap(lambda x: tp.psum((x * w).sum(), "i"), "i", out_axes=None)(full[rank * L : (rank + 1) * L])
    try:
        if rank == 0:
            out.backward()
        else:
            tp.pmap(lambda x: tp.psum(x.sum(), "i"), "i")(full[rank * L : (rank + 1) * L])
        outcome = "no error"
    except tp.CollectiveMismatchError as e:
        outcome = "mismatch" if "a backward pass" in str(e) else f"other mismatch: {e}"
    say(f"OUTCOME {rank} {outcome}")
    os._exit(0)


def gradients():
    """Autograd through calls whose replicas span both processes gives every
    process what one process of all the devices gives: the double backward's
    collectives meet across processes; an out_axes=None output counts once;
    the gradient of a tensor every replica shares (closed over, broadcast) sums
    every process's replicas; out_axes=None outputs must agree across processes.
    Then a psum of different dtypes on the two processes fails on both at once."""
    tpd.initialize(timeout=30)
    rank, L, G = tp.process_index(), tp.local_device_count(), tp.device_count()
    mine = slice(rank * L, (rank + 1) * L)
    full = torch.linspace(-1.0, 1.0, G * 3, dtype=torch.float64).reshape(G, 3)
    results = {}

    x = full[mine].clone().requires_grad_()
    y = tp.pmap(lambda r: tp.psum(r.sin() * r, "i") * r, "i")(x)
    (gx,) = torch.autograd.grad((y.unshard() ** 2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad((gx**2).sum(), x)
    # The same on one device: every process's loss and penalty, summed.
    X = full.clone().requires_grad_()
    (GX,) = torch.autograd.grad((((X.sin() * X).sum(0) * X) ** 2).sum(), X, create_graph=True)
    (GGX,) = torch.autograd.grad((GX**2).sum(), X)
    check("first_order", gx.detach().numpy(), GX[mine].detach().numpy(), results)
    check("second_order", ggx.numpy(), GGX[mine].numpy(), results)

    # An out_axes=None loss: the gradient of the one value, not one per process.
    x = full[mine].clone().requires_grad_()
    tp.pmap(lambda r: tp.psum((r**2).sum(), "i"), "i", out_axes=None)(x).backward()
    check("out_axes_none_counts_once", x.grad.numpy(), 2 * full[mine].numpy(), results)

    # Tensors every replica shares: closed over (a leaf, a computed tensor, one that only
    # some replicas reach) and broadcast; each process's copy gets the whole gradient.
    w, u, v, b = (torch.arange(3.0, dtype=torch.float64) + k for k in (1, 2, 3, 4))
    w.requires_grad_(), u.requires_grad_(), v.requires_grad_(), b.requires_grad_()
    c = u * 2

    def f(r, b):
        other = v if int(tp.axis_index("i")) % 2 else c  # each process has replicas of both kinds
        return tp.psum((r * w * b).sum() + (r * other).sum(), "i")

    def one_device(W, U, V, B):
        C, odd = U * 2, torch.arange(G) % 2 == 1
        return (full * W * B).sum() + (full[odd] * V).sum() + (full[~odd] * C).sum()

    tp.pmap(f, "i", in_axes=(0, None), out_axes=None)(full[mine], b).backward()
    W, U, V, B = (t.detach().clone().requires_grad_() for t in (w, u, v, b))
    one_device(W, U, V, B).backward()
    shared = (("closed_over", w, W), ("computed_closed_over", u, U), ("closed_over_by_some", v, V), ("broadcast", b, B))
    for name, got, want in shared:
        check(f"shared_{name}", got.grad.numpy(), want.grad.numpy(), results)
    # Mapped outputs: every process's loss adds up, as in the first case.
    w.grad = None
    y = tp.pmap(lambda r: (r * w).sum(), "i")(full[mine])
    (gw,) = torch.autograd.grad((y.unshard() ** 2).sum(), w, create_graph=True)
    (ggw,) = torch.autograd.grad((gw**2).sum(), w)
    W = w.detach().clone().requires_grad_()
    (GW,) = torch.autograd.grad((((full * W).sum(1)) ** 2).sum(), W, create_graph=True)
    (GGW,) = torch.autograd.grad((GW**2).sum(), W)
    check("shared_mapped_outputs", gw.detach().numpy(), GW.detach().numpy(), results)
    check("shared_second_order", ggw.numpy(), GGW.numpy(), results)

    # The tensors a process's replicas reach depend on the process (replicas 0-1 use p,
    # 2-3 use q, in the other order on each process): paired by name, not by position.
    p, q = (torch.arange(3.0, dtype=torch.float64) * k for k in (2, 5))
    p.requires_grad_(), q.requires_grad_()

    def by_process(r):
        first, second = (p, q) if int(tp.axis_index("i")) < L else (q, p)
        return tp.psum((r * first).sum() + (r**2 * second).sum(), "i")

    tp.pmap(by_process, "i", out_axes=None)(full[mine]).backward()
    first_half = torch.arange(G) < L
    check(
        "shared_by_name_p", p.grad.numpy(), (full[first_half].sum(0) + (full[~first_half] ** 2).sum(0)).numpy(), results
    )
    check(
        "shared_by_name_q", q.grad.numpy(), (full[~first_half].sum(0) + (full[first_half] ** 2).sum(0)).numpy(), results
    )

    # Two tensors found under one name (each closure's own w): each gets its own gradient; they
    # were one entry of the sum, and both got one total (found by a hunt).
    def make_scale(value):
        w = torch.full((3,), value, dtype=torch.float64, requires_grad=True)
        return (lambda r: r * w), w

    scale1, w1 = make_scale(2.0)
    scale2, w2 = make_scale(3.0)
    tp.pmap(lambda r: tp.psum((scale2(scale1(r)) + 10 * scale1(r)).sum(), "i"), "i", out_axes=None)(
        full[mine]
    ).backward()
    check("same_name_first", w1.grad.numpy(), (13 * full.sum(0)).numpy(), results)
    check("same_name_second", w2.grad.numpy(), (2 * full.sum(0)).numpy(), results)
    # A PerReplica tensor is each replica's own: never summed across processes. A broadcast
    # argument no replica uses gets no gradient (None), as in one process.
    own = tp.PerReplica(
        [torch.full((3,), float(rank * L + i), dtype=torch.float64, requires_grad=True) for i in range(L)],
        tp.local_devices(),
    )
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    tp.pmap(lambda r, o, u: tp.psum((r * o).sum(), "i"), "i", in_axes=(0, 0, None), out_axes=None)(
        full[mine], own, unused
    ).backward()
    for i, o in enumerate(own.values):
        check(f"per_replica_{i}", o.grad.numpy(), full[rank * L + i].numpy(), results)
    results["unused_broadcast_has_no_grad"] = unused.grad is None
    # A module passed as a broadcast argument: its parameters are shared like closed-over ones.
    lin = torch.nn.Linear(3, 1).double()
    tp.pmap(lambda m, r: tp.psum(m(r).sum(), "i"), "i", in_axes=(None, 0), out_axes=None)(lin, full[mine]).backward()
    check("broadcast_module", lin.weight.grad.numpy(), full.sum(0, keepdim=True).numpy(), results)

    # out_axes=None values that differ between the processes: an error on both.
    try:
        tp.pmap(lambda r: tp.axis_index("i") // L, "i", out_axes=None)(full[mine])
        results["out_axes_none_checked_across_processes"] = False
    except ValueError as e:
        results["out_axes_none_checked_across_processes"] = "processes' replicas returned different" in str(e)

    # Last (it ends the job's collectives): a dtype torch cannot sum on one process only is
    # a mismatch on both at once, not a refusal on one and a timeout on the other.
    dtype = torch.uint16 if rank == 0 else torch.int32
    start = time.monotonic()
    try:
        tp.pmap(lambda r: tp.psum(r.to(dtype), "i"), "i")(full[mine])
        results["dtype_mismatch"] = False
    except tp.CollectiveMismatchError:
        results["dtype_mismatch"] = time.monotonic() - start < 10
    say("RESULTS " + json.dumps(results))
    tpd.shutdown()
    sys.exit(0 if all(results.values()) else 1)


def checkpoint():
    """Both processes save (process 0 alone writes) and load the same state;
    each gets its own random state back; what process 0 alone cannot write
    (parts of per-process values, entries that differ between the processes)
    is refused on both."""
    tpd.initialize(timeout=30)
    rank, L = tp.process_index(), tp.local_device_count()
    path = os.path.join(os.environ["TORCHPMAP_TEST_CHECKPOINT_DIR"], "ckpt.pt")
    torch.manual_seed(0)
    models, opts = tp.replicate(torch.nn.Linear(4, 2), lambda p: torch.optim.AdamW(p, lr=0.1))

    def step(model, opt, x):
        opt.zero_grad()
        model(x).square().mean().backward()
        tp.pmean_grads(model, "i")
        opt.step()

    pstep = tp.pmap(step, "i")
    full = torch.randn(2, tp.device_count(), 3, 4, generator=torch.Generator().manual_seed(5))
    for x in full:
        pstep(models, opts, x[rank * L : (rank + 1) * L])
    saves = []
    real_save = torch.save
    # (torch.distributed's object collectives call torch.save too: count checkpoints only)
    torch.save = lambda obj, *a, **k: (
        saves.append(isinstance(obj, dict) and "entries" in obj),
        real_save(obj, *a, **k),
    )[1]
    torch.manual_seed(100 + rank)  # a different random state in every process
    tp.save_checkpoint(path, model=models, opt=opts, step=2)
    results = {"written_by_process_0_only": sum(saves) == (1 if rank == 0 else 0)}
    results["complete_when_save_returns"] = os.listdir(os.path.dirname(path)) == ["ckpt.pt"]
    after_save = torch.rand(4)
    torch.manual_seed(7)
    fresh_models, fresh_opts = tp.replicate(torch.nn.Linear(4, 2), lambda p: torch.optim.AdamW(p, lr=0.1))
    rest = tp.load_checkpoint(path, model=fresh_models, opt=fresh_opts)
    results["own_random_state"] = torch.equal(torch.rand(4), after_save)
    results["rest"] = rest == {"step": 2}
    results["models"] = all(
        torch.equal(a, b)
        for m in fresh_models
        for a, b in zip(m.state_dict().values(), models[0].state_dict().values())
    )
    results["optimizers"] = all(
        torch.equal(o.state[p]["exp_avg"], opts[0].state[q]["exp_avg"])
        for o, m in zip(fresh_opts, fresh_models)
        for p, q in zip(m.parameters(), models[0].parameters())
    )
    # What process 0 alone would write wrongly is refused on both, the file left as it was.
    sharded = tp.pmap(lambda x: x * 2, "i")(torch.ones(L, 2))
    refused = {
        "nested_sharded_refused": ({"state": {"w": [sharded]}}, "state['w'][0] is a ShardedTensor"),
        "nested_per_replica_refused": ({"state": (1, {"m": models})}, "state[1]['m'] is a PerReplica"),
        "different_names_refused": (
            {"model": models, "step": 3} if rank == 0 else {"model": models, "opt": opts, "step": 3},
            "process 0 passes ['model', 'step'] and process 1 passes ['model', 'opt', 'step']",
        ),
        "different_kinds_refused": (
            {"w": models if rank == 0 else models[0]},
            "w is a PerReplica of module on process 0 but a module on process 1",
        ),
        "different_values_refused": ({"cfg": {"lr": 0.1, "step": 3 + rank}}, "cfg['step'] differs between process 0"),
    }
    for check, (state, message) in refused.items():
        try:
            tp.save_checkpoint(path, **state)
            results[check] = False
        except ValueError as e:
            results[check] = message in str(e)
            if not results[check]:
                say(f"MISMATCH {check}: {e}")
    rest = tp.load_checkpoint(path, rng=False, model=fresh_models, opt=fresh_opts)
    results["refused_left_the_file"] = rest == {"step": 2}
    if rank == 1:
        with torch.no_grad():
            for m in models:
                m.bias.add_(1.0)
    try:
        tp.save_checkpoint(path, model=models)
        results["drift_refused"] = False
    except ValueError as e:
        results["drift_refused"] = "differ between process 0 and process 1 at bias" in str(e)
    say("RESULTS " + json.dumps(results))
    tpd.shutdown()
    sys.exit(0 if all(results.values()) else 1)


def random_streams():
    """Every replica's dropout mask and torch.rand draws, over two calls,
    gathered on every replica: the test compares 2 x 2 with 1 x 4."""
    tpd.initialize(timeout=30)
    rank, L = tp.process_index(), tp.local_device_count()
    torch.manual_seed(0)

    def f(x):
        draws = torch.cat([torch.nn.functional.dropout(x, 0.5), torch.rand(x.shape)])
        return tp.all_gather(draws, "i")

    pf = tp.pmap(f, "i")
    calls = [pf(torch.ones(L, 4)).shards[0].tolist() for _ in range(2)]
    say(f"DRAWS {rank} " + json.dumps(calls))
    tpd.shutdown()


def lockstep():
    """The lockstep executor across processes: each call's collectives go through the
    process group's backend, with the same bits as the threads executor's."""
    import warnings

    tpd.initialize(timeout=30)
    rank, L, G = tp.process_index(), tp.local_device_count(), tp.device_count()
    full = torch.arange(G * G * 3, dtype=torch.float32).reshape(G, G, 3) / 7.0
    mine = full[rank * L : (rank + 1) * L]
    groups = [list(range(0, G, 2)), list(range(1, G, 2))]

    def grad_inside(x):
        return torch.func.grad(lambda w: tp.psum((x * w).sin().sum(), "i"))(x[0])

    functions = {
        "psum_then_pmax": lambda x: tp.pmax(tp.psum(x.sin(), "i") * x + tp.axis_index("i"), "i"),
        "all_gather": lambda x: tp.all_gather(x, "i", axis=1, tiled=True),
        "psum_scatter": lambda x: tp.psum_scatter(x, "i"),
        "ppermute": lambda x: tp.ppermute(x, "i", [(g, (g + 1) % G) for g in range(G)]),
        "all_to_all": lambda x: tp.all_to_all(x, "i", 0, 0),
        "psum_groups": lambda x: tp.psum(x, "i", axis_index_groups=groups),
        "grad_inside": grad_inside,
    }
    results = {}
    for name, f in functions.items():
        pf = tp.pmap(f, "i")
        tp.set_executor("threads")
        want = np.asarray(pf(mine))
        tp.set_executor("lockstep")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback is a failure here
            got = np.asarray(pf(mine))
        results[name] = bool(np.array_equal(got, want))
        if not results[name]:
            say(f"MISMATCH {name}: got {got.tolist()} want {want.tolist()}")
    say("RESULTS " + json.dumps(results))
    tpd.shutdown()
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    scenarios = {
        "lockstep": lockstep,
        "collectives": collectives,
        "train": train,
        "gradients": gradients,
        "backward_out_of_step": backward_out_of_step,
        "failure": failure,
        "failure_stays_alive": lambda: failure(stay_alive=True),
        "late_peer": late_peer,
        "failure_then_shutdown": failure_then_shutdown,
        "failure_alike": failure_alike,
        "failure_in_backward_then_shutdown": lambda: failure_then_shutdown(in_backward=True),
        "catch_and_continue": catch_and_continue,
        "hung_peer": hung_peer,
        "shutdown_after_failure": shutdown_after_failure,
        "random_streams": random_streams,
        "checkpoint": checkpoint,
    }
    scenarios[sys.argv[1]]()
