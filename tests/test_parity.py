"""Drop-in parity with PyTorch's FlexAttention module (issue #16, section 3).

PyTorch's ``torch.nn.attention.flex_attention`` is imported here only as the reference:
its public signatures are walked and compared with ours, and block masks built by both
are compared field by field. The package itself never imports it.
"""
import inspect
import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

import inductor_flex
from inductor_flex import BlockMask, create_block_mask, flex_attention

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

CPU = "cpu"


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def head_window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 70 + 30 * h


def batch_prefix(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < 64 * (b + 1))


def torch_create_block_mask(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_flex.create_block_mask(*args, **kwargs)


def assert_same_fields(ours, theirs, skip=()):
    """Both masks' as_tuple() items are equal (tensors exactly), mask_mod aside."""
    our_items, their_items = ours.as_tuple()[:-1], theirs.as_tuple()[:-1]
    assert len(our_items) == len(their_items)
    for position, (mine, reference) in enumerate(zip(our_items, their_items)):
        if position in skip:
            continue
        if isinstance(reference, torch.Tensor) or isinstance(mine, torch.Tensor):
            assert isinstance(mine, torch.Tensor) and isinstance(reference, torch.Tensor), position
            assert mine.shape == reference.shape and torch.equal(mine, reference), position
        else:
            assert mine == reference, position


# Lengths divisible by the block sizes: there both implementations classify every tile
# alike (with a ragged last tile PyTorch never calls it full, docs/masks.md).
MASK_CASES = [
    (causal, (2, 2, 512, 512), {}),
    (head_window, (1, 3, 384, 640), {"BLOCK_SIZE": (64, 128)}),
    (batch_prefix, (3, None, 256, 256), {"BLOCK_SIZE": 32}),
]


# --------------------------------------------------------------------------------------
# create_block_mask keywords and the write-order metadata
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_mod, sizes, kwargs", MASK_CASES)
@pytest.mark.parametrize("separate_full_blocks", [True, False])
@pytest.mark.parametrize("compute_dq_write_order, dq_kv_order", [(False, True), (True, False), (True, True)])
def test_create_block_mask_keywords_give_torchs_fields(mask_mod, sizes, kwargs, separate_full_blocks,
                                                       compute_dq_write_order, dq_kv_order):
    options = dict(kwargs, device=CPU, separate_full_blocks=separate_full_blocks,
                   compute_dq_write_order=compute_dq_write_order, dq_kv_order=dq_kv_order)
    ours = create_block_mask(mask_mod, *sizes, **options)
    theirs = torch_create_block_mask(mask_mod, *sizes, **options)
    assert_same_fields(ours, theirs)
    assert (ours.full_kv_num_blocks is None) == (not separate_full_blocks)
    assert (ours.dq_write_order is None) == (not compute_dq_write_order)


def test_mask_without_full_blocks_attends_the_same():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 384, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    separate = create_block_mask(head_window, 2, 3, 384, 384, device=CPU, BLOCK_SIZE=64)
    together = create_block_mask(head_window, 2, 3, 384, 384, device=CPU, BLOCK_SIZE=64,
                                 separate_full_blocks=False)
    assert together.full_kv_num_blocks is None and together.full_q_indices is None
    assert torch.equal(together.to_dense(), separate.to_dense())
    assert int(together.kv_num_blocks.sum()) == int(separate.kv_num_blocks.sum() + separate.full_kv_num_blocks.sum())
    torch.testing.assert_close(flex_attention(query, key, value, block_mask=together),
                               flex_attention(query, key, value, block_mask=separate))


def test_write_order_is_the_rank_among_each_query_blocks_kv_blocks():
    # Brute force on a small irregular mask: for KV block n and its j-th listed query block
    # m, the rank of n among m's visible KV blocks, ascending or descending.
    def irregular(b, h, q_idx, kv_idx):
        return ((q_idx // 16 * 5 + kv_idx // 16 * 3) % 4 == 0) | (q_idx == kv_idx)

    for descending in (False, True):
        bm = create_block_mask(irregular, None, None, 96, 80, device=CPU, BLOCK_SIZE=16,
                               compute_dq_write_order=True, dq_kv_order=descending)
        assert bm.dq_kv_order_spt is descending and bm.dq_kv_order is None
        visible = bm.to_dense()[0, 0].bool()
        for field, lists in (("dq_write_order", (bm.q_num_blocks, bm.q_indices)),
                             ("dq_write_order_full", (bm.full_q_num_blocks, bm.full_q_indices))):
            order = getattr(bm, field)[0, 0]
            num, indices = lists[0][0, 0], lists[1][0, 0]
            assert order.shape == indices.shape and order.dtype == torch.int32
            for n in range(indices.shape[0]):
                for j in range(int(num[n])):
                    m = int(indices[n, j])
                    row = visible[m].nonzero().flatten().tolist()
                    rank = row.index(n)
                    assert int(order[n, j]) == (len(row) - 1 - rank if descending else rank)


def test_write_order_metadata_travels_with_the_mask():
    bm = create_block_mask(causal, 2, 1, 256, 256, device=CPU, BLOCK_SIZE=64, compute_dq_write_order=True,
                           dq_kv_order=False)
    leaves, spec = torch.utils._pytree.tree_flatten(bm)
    assert len(leaves) == 10
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert rebuilt.dq_kv_order_spt is False and torch.equal(rebuilt.dq_write_order, bm.dq_write_order)
    moved = bm.to("meta")
    assert moved.dq_write_order.device.type == "meta" and moved.dq_kv_order_spt is False
    # A selection gets the write order of its own layout, as PyTorch recomputes it.
    theirs = torch_create_block_mask(causal, 2, 1, 256, 256, device=CPU, BLOCK_SIZE=64,
                                     compute_dq_write_order=True, dq_kv_order=False)
    for index in [(1,), (slice(None), 0), (slice(None), slice(None), torch.tensor([3, 1]))]:
        assert_same_fields(bm[index], theirs[index])
    assert_same_fields(bm._adjust(192, 192), theirs._adjust(192, 192))


def test_from_kv_blocks_takes_the_metadata_keywords():
    bm = create_block_mask(causal, 1, 2, 128, 128, device=CPU, BLOCK_SIZE=32, compute_dq_write_order=True)
    schedule = torch.arange(4, dtype=torch.int32).flip(0).expand(1, 2, 4)
    rebuilt = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                       BLOCK_SIZE=32, dq_write_order=bm.dq_write_order,
                                       dq_write_order_full=bm.dq_write_order_full, dq_kv_order=schedule)
    assert rebuilt.dq_kv_order is schedule and rebuilt.dq_kv_order_spt is None
    assert BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, dq_kv_order=True).dq_kv_order_spt is True
    with pytest.raises(NotImplementedError):
        rebuilt[0]
    with pytest.raises(NotImplementedError):
        rebuilt._adjust(64, 64)
    with pytest.raises(ValueError, match="dq_write_order_full needs dq_write_order"):
        BlockMask(bm.seq_lengths, *bm._block_lists(), dq_write_order_full=bm.dq_write_order_full)


# --------------------------------------------------------------------------------------
# Pictures, crops, indexing, zero sizes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_mod, sizes, kwargs", MASK_CASES)
def test_repr_str_and_to_string_are_torchs(mask_mod, sizes, kwargs):
    ours = create_block_mask(mask_mod, *sizes, device=CPU, **kwargs)
    theirs = torch_create_block_mask(mask_mod, *sizes, device=CPU, **kwargs)
    assert repr(ours) == repr(theirs)
    assert str(ours) == str(theirs)
    for options in ({}, {"limit": 1}, {"grid_size": 3}, {"grid_size": (2, 5), "limit": 2}, {"grid_size": -1}):
        assert ours.to_string(**options) == theirs.to_string(**options), options
    without_full = dict(kwargs, separate_full_blocks=False)
    assert repr(create_block_mask(mask_mod, *sizes, device=CPU, **without_full)) == repr(
        torch_create_block_mask(mask_mod, *sizes, device=CPU, **without_full))


def full_dense(block_mask):
    return block_mask.to_dense() - BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks, block_mask.kv_indices, BLOCK_SIZE=block_mask.BLOCK_SIZE).to_dense()


@pytest.mark.parametrize("mask_mod", [causal, head_window, batch_prefix])
def test_adjust_crops_like_torch(mask_mod):
    ours = create_block_mask(mask_mod, 2, 2, 512, 512, device=CPU, BLOCK_SIZE=128)
    theirs = torch_create_block_mask(mask_mod, 2, 2, 512, 512, device=CPU, BLOCK_SIZE=128)
    # Crops where PyTorch's lists stay in range: field for field the same.
    for q_len, kv_len in [(384, 512), (256, 256), (128, 384), (512, 512), (0, 0)]:
        assert_same_fields(ours._adjust(q_len, kv_len), theirs._adjust(q_len, kv_len))
    # Any crop: the upper-left corner of the blocks, partial and full, with every listed
    # index in range. (PyTorch's own crop can keep a listed block past the new last
    # column, and then fails building the query side, e.g. causal to (512, 256).)
    for q_len, kv_len in [(300, 200), (512, 100), (512, 256), (1, 1), (200, 0)]:
        cropped = ours._adjust(q_len, kv_len)
        rows, cols = -(-q_len // 128), -(-kv_len // 128)
        assert cropped.seq_lengths == (q_len, kv_len) and cropped.mask_mod is mask_mod
        assert torch.equal(cropped.to_dense(), ours.to_dense()[..., :rows, :cols])
        assert torch.equal(full_dense(cropped), full_dense(ours)[..., :rows, :cols])
        for field in ("kv_indices", "full_kv_indices", "q_indices", "full_q_indices"):
            indices = getattr(cropped, field)
            assert indices.numel() == 0 or int(indices.max()) < indices.shape[-1], field


def test_adjust_crops_the_torch_bug_away():
    # PyTorch's crop of a causal 512 mask to (300, 200) keeps KV block 2 listed as partial
    # for query block 2, past the two columns that remain; ours drops it.
    ours = create_block_mask(causal, 1, 1, 512, 512, device=CPU, BLOCK_SIZE=128)._adjust(300, 200)
    assert ours.kv_num_blocks.tolist() == [[[1, 1, 0]]]
    assert ours.full_kv_num_blocks.tolist() == [[[0, 1, 2]]]
    with pytest.raises(ValueError, match="crops a mask"):
        ours._adjust(301, 200)


def test_indexing_with_a_decoding_position_tensor_is_torchs():
    ours = create_block_mask(head_window, 2, 2, 512, 512, device=CPU, BLOCK_SIZE=128)
    theirs = torch_create_block_mask(head_window, 2, 2, 512, 512, device=CPU, BLOCK_SIZE=128)
    input_pos = torch.tensor([[130], [300]])  # [B, 1], one decoding position per sequence
    for index in [
        (slice(None), slice(None), input_pos // 128),
        (slice(None), slice(None), input_pos[0] // 128),
        (slice(None), slice(None), torch.tensor([1])),
        (0,), (-1, 1), (slice(0, 2), [1]), (torch.tensor([1, 0]),), (torch.tensor([True, False]), 0),
        ([0, 1], [1, 0]),
    ]:
        assert_same_fields(ours[index], theirs[index])
    assert ours[:, :, input_pos // 128].kv_num_blocks.shape == (2, 2, 2, 1)
    # Only batch / head selected: our mask_mod still answers for the selected entries.
    selected = ours[torch.tensor([1, 0]), 1]
    i = torch.tensor(0)
    assert bool(selected.mask_mod(i, i, i + 160, i)) == bool(head_window(i + 1, i + 1, i + 160, i))


@pytest.mark.parametrize("sizes", [(2, 1, 0, 256), (0, 2, 256, 256), (2, 2, 256, 0), (2, 0, 256, 256)])
def test_zero_sizes_give_torchs_empty_masks(sizes):
    assert_same_fields(create_block_mask(causal, *sizes, device=CPU),
                       torch_create_block_mask(causal, *sizes, device=CPU))
    assert inductor_flex.create_mask(causal, *sizes, device=CPU).shape == torch_flex.create_mask(
        causal, *sizes, device=CPU).shape


@pytest.mark.parametrize("batch, q_len", [(2, 0), (0, 256)])
def test_flex_attention_with_zero_sized_masks(batch, q_len):
    query = torch.randn(batch, 2, q_len, 16)
    key = value = torch.randn(batch, 2, 256, 16)
    block_mask = create_block_mask(causal, batch, 2, q_len, 256, device=CPU)
    out = flex_attention(query, key, value, block_mask=block_mask)
    assert out.shape == (batch, 2, q_len, 16)


# --------------------------------------------------------------------------------------
# PyTorch's block masks in our flex_attention
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_takes_torchs_block_mask(compiled):
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 3, 384, 16, generator=generator) for _ in range(3))
    ours = create_block_mask(head_window, 2, 3, 384, 384, device=CPU, BLOCK_SIZE=64)
    theirs = torch_create_block_mask(head_window, 2, 3, 384, 384, device=CPU, BLOCK_SIZE=64,
                                     compute_dq_write_order=True)
    attend = flex_attention
    if compiled:
        torch._dynamo.reset()
        attend = torch.compile(flex_attention, backend="aot_eager", fullgraph=True)
    expected = flex_attention(query, key, value, block_mask=ours)
    torch.testing.assert_close(attend(query, key, value, block_mask=theirs), expected)
    # Gradients flow through the adopted mask's query-side lists too.
    query.requires_grad_()
    attend(query, key, value, block_mask=theirs).sum().backward()
    from_torch = query.grad
    query.grad = None
    flex_attention(query, key, value, block_mask=ours).sum().backward()
    torch.testing.assert_close(from_torch, query.grad)


def test_a_13_item_block_mask_tuple_is_read_too():
    # PyTorch before the write-order metadata (2.11): as_tuple() has no dq_* entries.
    class OlderTorchBlockMask:
        def __init__(self, mask):
            self.BLOCK_SIZE, self.seq_lengths, self.mask_mod = mask.BLOCK_SIZE, mask.seq_lengths, mask.mask_mod
            self._items = mask.operator_tuple()

        def as_tuple(self):
            return self._items

    query = torch.randn(1, 1, 128, 8)
    ours = create_block_mask(causal, None, None, 128, 128, device=CPU, BLOCK_SIZE=32)
    torch.testing.assert_close(flex_attention(query, query, query, block_mask=OlderTorchBlockMask(ours)),
                               flex_attention(query, query, query, block_mask=ours))


# --------------------------------------------------------------------------------------
# Every public name of torch's module, with the same parameters
# --------------------------------------------------------------------------------------

# Deliberate differences, each with its reason. Keys: "<name>" or "<Class>.<member>";
# an entry skips that comparison. None today: every signature matches.
ALLOWED_DIFFERENCES = {}

# FlexKernelOptions keys we declare beyond torch's (torch's must all be there): the
# per-pass tile knobs (a "fwd_" / "bwd_" prefix applies a knob to one pass), and flags of
# our own kernels: EARLY_DP (backward dP order on full blocks), APPROX_TANH (fast tanh in
# half-precision score_mods), WARP_SPECIALIZE (producer / consumer warps in the forward).
EXTRA_KERNEL_OPTIONS = {
    *(f"{prefix}_{knob}" for prefix in ("fwd", "bwd") for knob in ("num_warps", "num_stages")),
    "fwd_BLOCK_M", "fwd_BLOCK_N", "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2",
    "EARLY_DP", "APPROX_TANH", "WARP_SPECIALIZE",
    "SPLIT_KV",  # PyTorch's decode lowering reads it too, undeclared
}

# Parameters torch 2.13 added: with an older torch installed we still offer them.
ADDED_IN_2_13 = {
    "create_block_mask": ("separate_full_blocks", "compute_dq_write_order", "dq_kv_order"),
    "BlockMask.__init__": ("dq_write_order", "dq_write_order_full", "dq_kv_order", "dq_kv_order_spt"),
    "BlockMask.from_kv_blocks": ("dq_write_order", "dq_write_order_full", "dq_kv_order"),
}

# BlockMask members besides the public ones that user code calls.
BLOCK_MASK_PRIVATE_MEMBERS = ("__init__", "__getitem__", "__repr__", "__str__", "_adjust")


def parameter_list(function, name):
    """(name, kind, default) per parameter; callables as defaults compare by name."""
    parameters = []
    for parameter in inspect.signature(function).parameters.values():
        default = parameter.default
        if callable(default) and not isinstance(default, type):
            default = ("callable", default.__name__)
        parameters.append((parameter.name, parameter.kind, default))
    if TORCH_VERSION < (2, 13) and name in ADDED_IN_2_13:
        parameters = [p for p in parameters if p[0] not in ADDED_IN_2_13[name]]
    return parameters


def public_names():
    return sorted(torch_flex.__all__)


def block_mask_members():
    torch_members = [m for m in vars(torch_flex.BlockMask) if not m.startswith("_")]
    return sorted(torch_members) + list(BLOCK_MASK_PRIVATE_MEMBERS)


def test_every_public_name_is_exported():
    missing = [name for name in public_names() if not hasattr(inductor_flex, name)]
    assert not missing
    assert set(public_names()) <= set(inductor_flex.__all__)


@pytest.mark.parametrize("name", public_names())
def test_public_name_matches_torch(name):
    if name in ALLOWED_DIFFERENCES:
        pytest.skip(ALLOWED_DIFFERENCES[name])
    theirs, ours = getattr(torch_flex, name), getattr(inductor_flex, name)
    if inspect.isfunction(theirs):
        # flex_attention's overloads are typing only: the implementation's signature counts.
        assert parameter_list(ours, name) == parameter_list(theirs, name)
    elif isinstance(theirs, type) and issubclass(theirs, tuple) and hasattr(theirs, "_fields"):
        assert ours._fields == theirs._fields
        assert ours._field_defaults == theirs._field_defaults
    elif isinstance(theirs, type) and hasattr(theirs, "__total__"):  # a TypedDict (typing or typing_extensions)
        their_keys, our_keys = set(theirs.__annotations__), set(ours.__annotations__)
        assert their_keys <= our_keys
        assert our_keys - their_keys <= EXTRA_KERNEL_OPTIONS
        assert ours.__total__ == theirs.__total__
    elif name == "BlockMask":
        pass  # member by member below
    else:
        pytest.fail(f"no comparison written for {name} ({type(theirs).__name__})")


@pytest.mark.parametrize("member", block_mask_members())
def test_block_mask_member_matches_torch(member):
    key = f"BlockMask.{member}"
    if key in ALLOWED_DIFFERENCES:
        pytest.skip(ALLOWED_DIFFERENCES[key])
    theirs = inspect.getattr_static(torch_flex.BlockMask, member)
    ours = inspect.getattr_static(BlockMask, member, None)
    assert ours is not None, f"BlockMask has no {member}"
    assert type(ours) is type(theirs), f"{member}: {type(ours).__name__} vs {type(theirs).__name__}"
    if isinstance(theirs, property):
        return
    if isinstance(theirs, (classmethod, staticmethod)):
        theirs, ours = theirs.__func__, ours.__func__
    if callable(theirs):
        assert parameter_list(ours, key) == parameter_list(theirs, key)


def test_block_mask_fields_are_torchs():
    their_fields = list(torch_flex.BlockMask.__annotations__)
    if TORCH_VERSION < (2, 13):
        their_fields += [f for f in ADDED_IN_2_13["BlockMask.__init__"] if f not in their_fields]
    assert sorted(BlockMask.__annotations__) == sorted(their_fields)
