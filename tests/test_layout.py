"""A ShardedTensor's layout (torchpmap._layout) and its stacked form: shards that
are the dim-0 views of one buffer per physical device, as the stacked runner
will keep them."""

import copy
import io

import pytest
import torch
from helpers import devices as _devices
from helpers import rows

import torchpmap as tp
from torchpmap import ShardedTensor
from torchpmap._layout import Layout, Storage, device_groups
from torchpmap._sharded import distinct_shards

# -- the layout object ---------------------------------------------------------------------


@pytest.mark.threads_only
def test_a_pmap_output_describes_its_layout():
    devs = tuple(_devices(4))
    st = tp.pmap(lambda r: r * 2, out_axes=1)(rows(4, 3, dtype=torch.float64))
    layout = st.shard_layout
    assert layout == Layout(torch.Size([3, 4]), torch.float64, 1, devs, Storage.SHARDS)
    assert layout.shard_shape == (3,) and not layout.is_replicated
    assert layout.is_mapped_on(1, devs) and not layout.is_mapped_on(0, devs)
    assert not layout.is_mapped_on(1, devs[:3] + devs[:1])
    assert st.shard_layout is layout  # built once
    assert st.is_mapped_on(1, devs) and not st.is_mapped_on(0, devs)  # the same answer, without it
    again = tp.pmap(lambda r: r - 1, out_axes=1)(rows(4, 3, dtype=torch.float64))
    assert again.shard_layout is layout  # equal layouts are one object
    assert hash(layout) == hash(layout.with_storage(Storage.SHARDS))


def test_the_storage_form_does_not_change_the_placement():
    devs = tuple(_devices(2))
    a = Layout(torch.Size([2, 3]), torch.float32, 0, devs)
    b = a.with_storage(Storage.STACKED)
    assert a != b and b.is_mapped_on(0, devs) and a.is_mapped_on(0, devs)


def test_replicated_layout():
    devs = tuple(_devices(2))
    layout = Layout(torch.Size([5]), torch.float32, None, devs)
    assert layout.is_replicated and layout.shard_shape == (5,)
    with pytest.raises(ValueError, match="no stacked form"):
        layout.with_storage(Storage.STACKED)


@pytest.mark.parametrize(
    ("shape", "axis", "match"),
    [((4, 3), 2, "out of range"), ((4, 3), 1, "has size 3, but there are 4 devices"), ((4,), -1, "out of range")],
)
def test_layout_refuses_inconsistent_fields(shape, axis, match):
    with pytest.raises(ValueError, match=match):
        Layout(torch.Size(shape), torch.float32, axis, tuple(_devices(4)))


def test_device_groups_by_physical_device():
    cpu0, cpu1, gpu = torch.device("cpu", 0), torch.device("cpu", 1), torch.device("cuda", 0)
    assert device_groups((cpu0, cpu1)) == ((torch.device("cpu"), (0, 1)),)
    assert device_groups((cpu0, gpu, cpu1)) == ((torch.device("cpu"), (0, 2)), (gpu, (1,)))


# -- from_stacked and stacked_buffers --------------------------------------------------------


def _stacked(n, *rest, axis=0):
    buffer = rows(n, *rest).clone()
    return buffer, ShardedTensor.from_stacked(buffer, _devices(n), axis=axis)


@pytest.mark.parametrize("axis", [0, 1])
def test_from_stacked_shards_are_views_of_the_buffer(axis):
    buffer, st = _stacked(4, 3, axis=axis)
    assert st.shard_layout.storage is Storage.STACKED and st.axis == axis
    for i, s in enumerate(st.shards):
        assert s.data_ptr() == buffer[i].data_ptr() and s._base is buffer
    torch.testing.assert_close(st.unshard(), buffer.movedim(0, axis))
    assert st.stacked_buffers() == (buffer,) and st.stacked_buffers()[0] is buffer
    assert st.to_stacked() is st


def test_from_stacked_makes_the_row_views_on_first_use():
    buffer, st = _stacked(4, 3)
    assert st._shard_views is None  # a stacked runner's result fed back never needs them
    assert st.stacked_buffers()[0] is buffer and not st.requires_grad and st.shard_layout.storage is Storage.STACKED
    assert st._shard_views is None
    shards = st.shards
    assert st.shards is shards and [s.data_ptr() for s in shards] == [buffer[i].data_ptr() for i in range(4)]


def test_row_views_made_later_keep_the_grad_mode_of_from_stacked():
    buffer = rows(4, 3).clone()
    with torch.no_grad():
        st = ShardedTensor.from_stacked(buffer, _devices(4))
    w = torch.ones(3, requires_grad=True)
    # As views made at once in no-grad mode: autograd refuses to record a write through them.
    with pytest.raises(RuntimeError, match="created in no_grad mode"):
        st.shards[0].add_(w)


def test_from_stacked_of_a_buffer_that_requires_grad_makes_the_views_at_once():
    w = rows(4, 3).requires_grad_()
    st = ShardedTensor.from_stacked(w * 1, _devices(4))
    assert st._shard_views is not None and st.requires_grad
    with torch.no_grad():
        assert all(s.grad_fn is not None for s in st.shards)  # recorded when from_stacked ran


def test_in_place_updates_of_a_stacked_tensor_reach_the_buffer():
    buffer, st = _stacked(4, 3)
    expected = buffer.clone()
    st.add_(1)  # shard by shard
    st.mul_(torch.arange(3.0))  # on the full tensor, then written back
    st[2] = torch.full((3,), 7.0)  # one shard
    st[:, 1] = -1.0  # the full tensor again
    expected = (expected + 1) * torch.arange(3.0)
    expected[2] = 7.0
    expected[:, 1] = -1.0
    torch.testing.assert_close(buffer, expected)
    torch.testing.assert_close(st.unshard(), expected)
    assert st.stacked_buffers()[0] is buffer  # the shards are still its views


def test_copy_between_stacked_tensors_of_one_buffer():
    buffer = rows(4, 3).clone()
    a = ShardedTensor.from_stacked(buffer, _devices(4))
    b = ShardedTensor.from_stacked(buffer.flip(0).clone(), _devices(4))
    a.copy_(b)
    torch.testing.assert_close(buffer, rows(4, 3).flip(0))
    a.copy_(ShardedTensor.from_stacked(buffer, _devices(4)))  # its own memory: through the full tensor
    torch.testing.assert_close(buffer, rows(4, 3).flip(0))


def test_pmap_takes_a_stacked_tensor_as_it_is():
    buffer, st = _stacked(4, 3)

    def step(r):
        r.add_(10)  # the replica's own shard: the buffer's row
        return r  # returned as is: a view of the buffer, not a copy

    out = tp.pmap(step)(st)
    torch.testing.assert_close(buffer, rows(4, 3) + 10)
    assert [s.data_ptr() for s in out.shards] == [buffer[i].data_ptr() for i in range(4)]
    # Disjoint views of one storage are not aliasing: kept, and found stacked again.
    assert out.stacked_buffers()[0].data_ptr() == buffer.data_ptr()
    assert out.shard_layout.storage is Storage.STACKED


@pytest.mark.parametrize("axis", [0, 1])
def test_distinct_shards_keeps_disjoint_views_of_one_buffer(axis):
    matrix = rows(4, 4).clone()
    shards = matrix.unbind(axis)  # rows, or interleaved columns
    assert all(a is b for a, b in zip(distinct_shards(shards), shards))
    st = ShardedTensor(distinct_shards(shards), _devices(4))
    st.add_(1)  # the aliasing check lets it update them in place
    torch.testing.assert_close(matrix, rows(4, 4) + 1)


def test_distinct_shards_still_copies_shards_that_share_memory():
    one = torch.arange(3.0)
    shards = distinct_shards([one, one.expand(3), torch.zeros(3)])
    assert shards[0].data_ptr() != shards[1].data_ptr()


def test_stacked_buffers_finds_views_of_one_buffer_without_a_copy():
    devs = _devices(4)
    matrix = rows(4, 3).clone()
    rows_st = ShardedTensor(list(matrix.unbind(0)), devs)
    assert rows_st.shard_layout.storage is Storage.SHARDS  # recorded, not detected at construction
    (buffer,) = rows_st.stacked_buffers()
    assert buffer.data_ptr() == matrix.data_ptr() and torch.equal(buffer, matrix)
    assert rows_st.shard_layout.storage is Storage.STACKED
    columns = ShardedTensor(list(matrix.unbind(1)), _devices(3), axis=1)
    (buffer,) = columns.stacked_buffers()
    assert buffer.data_ptr() == matrix.data_ptr() and torch.equal(buffer, matrix.T)


def test_stacked_buffers_survive_deepcopy_and_save():
    _, st = _stacked(4, 3)
    (copied,) = copy.deepcopy(st).stacked_buffers()
    torch.testing.assert_close(copied, st.unshard())
    f = io.BytesIO()
    torch.save(st, f)
    f.seek(0)
    (loaded,) = torch.load(f).stacked_buffers()
    torch.testing.assert_close(loaded, st.unshard())


@pytest.mark.parametrize(
    "make",
    [
        lambda: [torch.zeros(3) for _ in range(4)],  # their own storages
        lambda: list(rows(4, 3).clone().unbind(0))[::-1],  # decreasing offsets
        lambda: [torch.arange(3.0)] * 4,  # one tensor: aliasing
        lambda: list(torch.arange(6.0).unfold(0, 3, 1)),  # overlapping windows
        lambda: [*rows(4, 3).clone().unbind(0)[:3], torch.zeros(3)],  # one apart
        lambda: list(rows(4, 4).clone()[:, :3].unbind(0))[:2] + list(rows(4, 3).clone().unbind(0))[2:],
    ],
)
def test_shards_that_are_not_one_buffer_have_none(make):
    st = ShardedTensor(make(), _devices(4))
    assert st.stacked_buffers() is None
    assert st.shard_layout.storage is Storage.SHARDS


def test_a_shard_moved_since_is_no_longer_stacked():
    buffer, st = _stacked(4, 3)
    with torch.no_grad():
        st.shards[1].set_(torch.zeros(3))
    assert st.stacked_buffers() is None
    assert st.shard_layout.storage is Storage.SHARDS
    stacked = st.to_stacked()
    torch.testing.assert_close(stacked.unshard(), torch.stack([buffer[0], torch.zeros(3), buffer[2], buffer[3]]))


def test_to_stacked_copies_once_and_leaves_the_original():
    shards = [torch.full((2,), float(i)) for i in range(4)]
    st = ShardedTensor(shards, _devices(4), axis=1)
    stacked = st.to_stacked()
    assert stacked is not st and stacked.axis == 1
    assert stacked.shard_layout.storage is Storage.STACKED
    (buffer,) = stacked.stacked_buffers()
    torch.testing.assert_close(buffer, torch.stack(shards))
    stacked.add_(1)
    torch.testing.assert_close(st.unshard(), torch.stack(shards, dim=1))


def test_autograd_reaches_the_shards_through_the_stacked_form():
    leaves = [torch.full((3,), float(i), requires_grad=True) for i in range(4)]
    (buffer,) = ShardedTensor(leaves, _devices(4)).to_stacked().stacked_buffers()
    (buffer * torch.arange(4.0)[:, None]).sum().backward()
    for i, leaf in enumerate(leaves):
        torch.testing.assert_close(leaf.grad, torch.full((3,), float(i)))


def test_autograd_reaches_the_tensor_stacked_shards_were_taken_from():
    w = rows(4, 3).requires_grad_()
    y = w * 2
    st = ShardedTensor([y.select(0, i) for i in range(4)], _devices(4))
    (buffer,) = st.stacked_buffers()
    (buffer * 3).sum().backward()
    torch.testing.assert_close(w.grad, torch.full((4, 3), 6.0))
    # Leaves that merely share memory have no common tensor to take gradients to.
    base = torch.zeros(4, 3)
    leaves = [base[i].detach().requires_grad_() for i in range(4)]
    assert ShardedTensor(leaves, _devices(4)).stacked_buffers() is None


def test_from_stacked_with_autograd_and_in_place_updates():
    w = rows(4, 3).requires_grad_()
    st = ShardedTensor.from_stacked(w * 1, _devices(4))
    with torch.no_grad():
        st.add_(1)  # select views, not unbind's: autograd lets them be updated
    st.shards[0].sum().backward()
    torch.testing.assert_close(w.grad[0], torch.ones(3))


def test_from_stacked_refuses_buffers_that_do_not_fit():
    devs = _devices(4)
    with pytest.raises(ValueError, match="dim 0 must have that size"):
        ShardedTensor.from_stacked(torch.zeros(3, 2), devs)
    with pytest.raises(ValueError, match="2 buffers, but the devices are 1 physical"):
        ShardedTensor.from_stacked([torch.zeros(4), torch.zeros(4)], devs)
    with pytest.raises(TypeError, match="buffer 0 is a list"):
        ShardedTensor.from_stacked([[1.0] * 4], devs)
    with pytest.raises(ValueError, match="share memory"):
        ShardedTensor.from_stacked(torch.zeros(3).expand(4, 3), devs)
    with pytest.raises(ValueError, match="is on meta"):
        ShardedTensor.from_stacked(torch.zeros(4, 3, device="meta"), devs)


def test_delete_drops_the_buffers():
    _, st = _stacked(4, 3)
    st.delete()
    assert st._stacked is None
    with pytest.raises(tp.DeletedShardedTensorError):
        st.stacked_buffers()


def test_one_buffer_per_physical_device_in_replica_order():
    # Virtual CPU devices are one physical device; meta stands in for a second one.
    cpu0, cpu1, meta = torch.device("cpu", 0), torch.device("cpu", 1), torch.device("meta")
    cpu_rows, meta_rows = rows(2, 3).clone(), torch.zeros(1, 3, device="meta")
    st = ShardedTensor.from_stacked([cpu_rows, meta_rows], (cpu0, meta, cpu1), axis=1)
    assert st.shard_layout == Layout(torch.Size([3, 3]), torch.float32, 1, (cpu0, meta, cpu1), Storage.STACKED)
    assert st.shard_layout.device_groups == ((torch.device("cpu"), (0, 2)), (meta, (1,)))
    assert st.shards[0].data_ptr() == cpu_rows[0].data_ptr() and st.shards[2].data_ptr() == cpu_rows[1].data_ptr()
    assert st.shards[1].device == meta
    cpu_buffer, meta_buffer = st.stacked_buffers()
    assert cpu_buffer.data_ptr() == cpu_rows.data_ptr() and meta_buffer.shape == (1, 3)
    with pytest.raises(ValueError, match="buffer 1 is on cpu, not on meta"):
        ShardedTensor.from_stacked([cpu_rows, torch.zeros(1, 3)], (cpu0, meta, cpu1))
