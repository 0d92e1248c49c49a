"""The two halves of the communicator on their own: a GroupBackend called directly
with every replica's tensor on one thread (as a lockstep or stacked runner will),
the thread rendezvous over a backend, and the Collective that describes a call."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import NewBytes, devices, rows

import torchpmap as tp
from torchpmap import _axis, _ops
from torchpmap._communicator import (
    Collective,
    GroupBackend,
    LocalBackend,
    ThreadRendezvous,
    compute_results,
    describe,
)

ALL = ((0, 1, 2, 3),)


def every_collective(k):
    """(Collective, input shape per replica) for each kind, with and without groups."""
    halves = ((0, 1), (2, 3))
    return [
        (Collective("all_reduce", "sum"), (3,)),
        (Collective("all_reduce", "max", halves), (3,)),
        (Collective("all_gather"), (3,)),
        (Collective("all_gather", groups=halves), (3,)),
        (Collective("reduce_scatter", "sum"), (k, 2)),
        (Collective("reduce_scatter", "min", halves), (2, 2)),
        (Collective("all_to_all"), (k, 2)),
        (Collective("all_to_all", groups=halves), (2, 2)),
        (Collective("permute", pairs=((0, 1), (1, 2), (2, 0))), (3,)),
    ]


def reference(collective, xs):
    """What each rank gets, written independently of compute_results."""
    k = len(xs)
    groups = collective.groups or (tuple(range(k)),)
    out = [None] * k
    if collective.kind == "permute":
        out = [torch.zeros_like(x) for x in xs]
        for src, dst in collective.pairs:
            out[dst] = xs[src]
        return out
    reduce = {"sum": torch.sum, "max": torch.amax, "min": torch.amin}
    for g in groups:
        members = torch.stack([xs[r] for r in g])
        for pos, r in enumerate(g):
            if collective.kind == "all_reduce":
                out[r] = reduce[collective.op](members, 0)
            elif collective.kind == "all_gather":
                out[r] = members
            elif collective.kind == "reduce_scatter":
                out[r] = reduce[collective.op](members, 0)[pos]
            else:  # all_to_all
                out[r] = members[:, pos]
    return out


@pytest.mark.parametrize("case", range(9))
def test_local_backend_called_directly_from_one_thread(case):
    devs = devices(4)
    collective, shape = every_collective(4)[case]
    xs = [rows(1, *shape, offset=float(r))[0] * (r + 1) for r in range(4)]
    results = LocalBackend(devs).run(collective, xs)
    for r, (got, want) in enumerate(zip(results, reference(collective, xs))):
        torch.testing.assert_close(got, want, msg=f"rank {r}")
    # Never aliasing an input or another result: replicas may update them in place.
    before = [t.clone() for t in [*xs, *results]]
    for r, t in enumerate(results):
        t.add_(1000.0)
        after = [*xs, *results]
        for j, (u, was) in enumerate(zip(after, before)):
            if j != len(xs) + r:
                assert torch.equal(u, was), f"writing result {r} changed tensor {j}"
        t.sub_(1000.0)


class RecordingBackend(GroupBackend):
    def __init__(self, devs):
        super().__init__(devs, 0, len(devs))
        self.calls = []

    def run(self, collective, xs):
        self.calls.append((collective, [x.clone() for x in xs]))
        return [x + 100 * r for r, x in enumerate(xs)]


def test_rendezvous_calls_its_backend_once_per_exchange_with_every_input_in_rank_order():
    devs = devices(3)
    backend = RecordingBackend(devs)
    comm = ThreadRendezvous(backend)
    collective = Collective("all_gather")
    results = [None] * 3

    def replica(r):
        results[r] = comm.exchange(r, collective, torch.full((2,), float(r)))

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(backend.calls) == 1
    seen, inputs = backend.calls[0]
    assert seen == collective
    assert [x.tolist() for x in inputs] == [[0.0] * 2, [1.0] * 2, [2.0] * 2]
    assert [x.tolist() for x in results] == [[0.0] * 2, [101.0] * 2, [202.0] * 2]


def test_signature_and_its_description():
    x = torch.ones(2, 3)
    signature = Collective("all_reduce", "sum").signature(x)
    assert signature == (Collective("all_reduce", "sum"), (2, 3), torch.float32)
    assert signature != Collective("all_reduce", "max").signature(x)
    assert signature != Collective("all_reduce", "sum").signature(x.double())
    assert describe(signature) == "all_reduce('sum',) on a torch.float32 tensor of shape [2, 3]"
    pairs = ((0, 1), (1, 0))
    assert describe(Collective("permute", pairs=pairs).signature(x)).startswith("ppermute(((0, 1), (1, 0)),) on")
    assert describe(Collective("all_gather", groups=((0,), (1,))).signature(x)).startswith("all_gather(((0,), (1,)),)")
    with pytest.raises(AttributeError):
        Collective("all_gather").kind = "all_to_all"  # frozen: a collective is shared


class RecordingCommunicator:
    size = 4

    def __init__(self):
        self.seen = []

    def exchange(self, rank, collective, x):
        self.seen.append((rank, collective))
        return x.clone()


OP_CALLS = [
    ("all_reduce", ("sum", "i", [0, 1, 2, 3], 2, "", -1, None)),
    ("all_reduce", ("max", "i", [0, 1, -1, 2], 0, "", -1, None)),
    ("all_gather", ("i", [], 4, "", -1, None)),
    ("reduce_scatter", ("sum", "i", [3, 1, 0, 2], 2, "", -1, None)),
    ("all_to_all", ("i", [], 4, "", -1, None)),
    ("permute", ("i", [0, 1, 1, 0], "", -1, None)),
]


@pytest.mark.parametrize("name, args", OP_CALLS, ids=[f"{n}{i}" for i, (n, _) in enumerate(OP_CALLS)])
def test_collective_of_an_op_call_is_what_its_kernel_exchanges(name, args):
    comm = RecordingCommunicator()
    _axis.bind(_axis.ReplicaFrame("i", 4, 2, devices(1)[0], comm))
    try:
        _ops._KERNELS[name](torch.ones(4, 2), *args)
    finally:
        _axis.unbind()
    axes, collective = _ops.collective_of(name, *args)
    assert axes == ("i",)
    assert comm.seen == [(2, collective)]
    assert collective.kind == name


def test_collective_of_decodes_groups_pairs_and_tree_tags():
    _, c = _ops.collective_of("all_reduce", "sum", "i\x1fj", [0, 1, -1, 2], 0, "t", 1, [3])
    assert c == Collective("all_reduce", "sum", ((0, 1), (2,)), None, ("t", 1, (3,)))
    axes, c = _ops.collective_of("permute", "i\x1fj", [0, 1, 1, 0], "", -1, None)
    assert axes == ("i", "j") and c == Collective("permute", pairs=((0, 1), (1, 0)))


def test_a_pmap_with_the_split_communicator_still_sums():
    f = tp.pmap(lambda v: tp.psum(v, "i"), "i", devices=devices(4))
    assert f(torch.arange(4.0)).unshard().tolist() == [6.0] * 4


@pytest.mark.parametrize(
    "collective",
    [
        Collective("all_reduce", "sum"),
        Collective("all_reduce", "max", ((0, 5, 9), tuple(r for r in range(16) if r not in (0, 5, 9)))),
        Collective("all_gather"),
        Collective("all_gather", groups=(tuple(range(0, 16, 2)), tuple(range(1, 16, 2)))),
        Collective("reduce_scatter", "sum"),
        Collective("all_to_all"),
        Collective("permute", pairs=tuple((r, (r + 3) % 16) for r in range(16))),
    ],
    ids=lambda c: c.kind + ("_groups" if c.groups else ""),
)
def test_results_for_some_ranks_are_theirs_and_cost_only_their_size(collective):
    # A process of a 16-replica job holding replicas 5 and 6 computes only their results.
    size, mine = 16, [5, 6]
    xs = [rows(size, 4, offset=float(r)) for r in range(size)]  # (16, 4): a row per rank
    want = reference(collective, xs)
    with NewBytes() as every:
        compute_results(collective, xs, size, lambda t, r: t)
    with NewBytes() as some:
        got = compute_results(collective, xs, size, lambda t, r: t, mine)
    assert len(got) == len(mine)
    for r, t in zip(mine, got):
        torch.testing.assert_close(t, want[r], rtol=0, atol=0, msg=f"rank {r}")
    one_input = xs[0].untyped_storage().nbytes()
    result = max(t.untyped_storage().nbytes() for t in got)
    # At most one result per wanted rank plus one reduction of a whole input (all_reduce):
    # nothing proportional to the ranks of other processes.
    assert some.bytes <= len(mine) * result + one_input, (some.bytes, every.bytes)
    assert some.bytes <= every.bytes * 3 / size + one_input
    assert len({t.untyped_storage().data_ptr() for t in got}) == len(mine) or collective.kind == "reduce_scatter"
