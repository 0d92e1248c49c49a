"""pmap across processes. Launch with torchrun, e.g. on one machine:

    TORCHPMAP_CPU_DEVICES=2 torchrun --nproc_per_node=2 examples/multiprocess.py

and on two machines (run on each, with its --node_rank):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=1 \\
             --master_addr=HOST0 --master_port=29500 examples/multiprocess.py

Every process maps its own local devices; the named axis spans all of them.
"""

import torch

import torchpmap as tp
import torchpmap.distributed as tpd

tpd.initialize()  # Gloo on CPU, NCCL on GPUs, from torchrun's environment
rank, L, G = tp.process_index(), tp.local_device_count(), tp.device_count()
say = print if rank == 0 else (lambda *a, **k: None)
say(f"{tp.process_count()} processes, {G} devices in all: {[str(d) for d in tp.devices()]}")

# Each process feeds one row per local device; axis_index is global.
ids = tp.pmap(lambda x: tp.axis_index("i"), "i")(torch.zeros(L))
total = tp.pmap(lambda x: tp.psum(x, "i"), "i")(torch.ones(L))
print(f"process {rank}: global indices {ids.tolist()}, psum of ones = {total.tolist()}", flush=True)

# Data-parallel least squares: each process loads only its block of the global
# batch (ProcessBatchSampler), and shard_batch gives each device 64 rows of it.
torch.manual_seed(0)
w_true = torch.tensor([2.0, -3.0, 0.5])
x_all = torch.randn(G * 64, 3)
dataset = torch.utils.data.TensorDataset(x_all, x_all @ w_true)
loader = torch.utils.data.DataLoader(dataset, batch_sampler=tp.ProcessBatchSampler(dataset, G * 64))
x, y = tp.shard_batch(next(iter(loader)))


def step(w, x, y):
    grad = torch.func.grad(lambda w: ((x @ w - y) ** 2).mean())(w)
    return w - 0.1 * tp.pmean(grad, "i")


pstep = tp.pmap(step, "i")
w = tp.device_put_replicated(torch.zeros(3), tp.local_devices())
for _ in range(100):
    w = pstep(w, x, y)
say(f"learned w = {w.shards[0].tolist()} (true {w_true.tolist()})")
say(f"as a DTensor over the processes: {tpd.to_dtensor(w).shape}")
tpd.shutdown()
