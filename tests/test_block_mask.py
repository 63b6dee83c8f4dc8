"""BlockMask and its constructors (inductor_flex/block_mask.py).

The truth for every block classification is brute force: the dense element mask, cut
into blocks with explicit loops (ragged last blocks hold only existing positions).
"""
import ast
import math
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import inductor_flex.block_mask as block_mask_module
from inductor_flex.block_mask import (
    _DEFAULT_SPARSE_BLOCK_SIZE,
    BlockMask,
    and_masks,
    create_block_mask,
    create_mask,
    noop_mask,
    or_masks,
)
from inductor_flex.masks import create_document_block_mask

CPU = "cpu"
REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Brute-force helpers
# --------------------------------------------------------------------------------------


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def brute_blocks(dense, q_block, kv_block):
    """(partial, full) bool [B, H, nQ, nKV] from a dense bool mask [B, H, Q, KV]."""
    B, H, Q, KV = dense.shape
    nq, nk = math.ceil(Q / q_block), math.ceil(KV / kv_block)
    partial = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    full = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, :, i * q_block:(i + 1) * q_block, j * kv_block:(j + 1) * kv_block]
            every = tile.flatten(2).all(-1)
            some = tile.flatten(2).any(-1)
            full[:, :, i, j] = every
            partial[:, :, i, j] = some & ~every
    return partial, full


def listed_blocks(num_blocks, indices, num_cols):
    """bool [..., rows, num_cols] from ordered lists, asserting each listed row is strictly
    increasing and in range."""
    out = torch.zeros(*indices.shape[:-1], num_cols, dtype=torch.bool)
    flat_num = num_blocks.reshape(-1)
    flat_idx = indices.reshape(-1, indices.shape[-1])
    flat_out = out.view(-1, num_cols)
    for row in range(flat_num.numel()):
        chosen = flat_idx[row, : int(flat_num[row])].tolist()
        assert chosen == sorted(set(chosen)), f"row {row} not strictly increasing: {chosen}"
        assert all(0 <= c < num_cols for c in chosen)
        flat_out[row, chosen] = True
    return out


def assert_layout(bm, partial, full, check_tail_range=True):
    """The BlockMask's four list pairs describe exactly ``partial`` / ``full`` ([B,H,nQ,nKV])."""
    nq, nk = partial.shape[-2:]
    assert bm.kv_num_blocks.dtype == torch.int32 and bm.kv_indices.dtype == torch.int32
    assert tuple(bm.kv_num_blocks.shape) == tuple(partial.shape[:-1])
    assert tuple(bm.kv_indices.shape) == tuple(partial.shape)
    assert tuple(bm.q_num_blocks.shape) == tuple(partial.shape[:2]) + (nk,)
    assert tuple(bm.q_indices.shape) == tuple(partial.shape[:2]) + (nk, nq)
    assert torch.equal(listed_blocks(bm.kv_num_blocks, bm.kv_indices, nk), partial)
    assert torch.equal(listed_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nk), full)
    assert torch.equal(listed_blocks(bm.q_num_blocks, bm.q_indices, nq), partial.transpose(-2, -1))
    assert torch.equal(listed_blocks(bm.full_q_num_blocks, bm.full_q_indices, nq), full.transpose(-2, -1))
    if check_tail_range:
        # Unused slots must still be valid block indices (kernels may prefetch them).
        for indices, bound in ((bm.kv_indices, nk), (bm.full_kv_indices, nk), (bm.q_indices, nq),
                               (bm.full_q_indices, nq)):
            assert int(indices.min()) >= 0 and int(indices.max()) < bound


def block_structured_mask(B, H, Q, KV, q_block, kv_block, seed):
    """A random dense mask whose blocks are a random mix of empty, full and mixed."""
    gen = torch.Generator().manual_seed(seed)
    nq, nk = math.ceil(Q / q_block), math.ceil(KV / kv_block)
    kind = torch.randint(0, 3, (B, H, nq, nk), generator=gen)
    kind = kind.repeat_interleave(q_block, 2)[:, :, :Q].repeat_interleave(kv_block, 3)[..., :KV]
    noise = torch.rand(B, H, Q, KV, generator=gen) < 0.7
    return torch.where(kind == 2, True, torch.where(kind == 0, False, noise))


def table_mask_mod(table):
    def table_mask(b, h, q_idx, kv_idx):
        return table[b, h, q_idx, kv_idx]

    return table_mask


# --------------------------------------------------------------------------------------
# noop / and / or
# --------------------------------------------------------------------------------------


def test_noop_mask_is_a_true_bool_scalar():
    i = torch.tensor(3, dtype=torch.int32)
    out = noop_mask(i, i, i, i)
    assert out.dtype == torch.bool and out.shape == () and bool(out)
    assert create_mask(noop_mask, 2, 3, 5, 7, device=CPU).all()


def test_and_or_masks_match_elementwise_logic():
    def even_q(b, h, q, kv):
        return q % 2 == 0

    def kv_below_3(b, h, q, kv):
        return kv < 3

    q = torch.arange(6).view(-1, 1)
    kv = torch.arange(5).view(1, -1)
    both = create_mask(and_masks(causal, even_q, kv_below_3), None, None, 6, 5, device=CPU)[0, 0]
    either = create_mask(or_masks(causal, even_q, kv_below_3), None, None, 6, 5, device=CPU)[0, 0]
    assert torch.equal(both, (q >= kv) & (q % 2 == 0) & (kv < 3))
    assert torch.equal(either, (q >= kv) | (q % 2 == 0) | (kv < 3))
    assert create_mask(and_masks(), None, None, 3, 3, device=CPU).all()
    assert not create_mask(or_masks(), None, None, 3, 3, device=CPU).any()


@pytest.mark.parametrize("combinator", [and_masks, or_masks])
def test_combinators_reject_non_callables(combinator):
    with pytest.raises(RuntimeError, match=r"argument 1 is not callable \(got int\)"):
        combinator(causal, 3)


# --------------------------------------------------------------------------------------
# create_block_mask: exact classification
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B, H, Q, KV, block_size",
    [
        (1, 1, 64, 64, 16),
        (2, 3, 100, 37, 16),
        (1, 2, 37, 130, (32, 16)),
        (2, 1, 130, 100, (16, 64)),
        (1, 1, 1, 1, 16),
        (3, 2, 81, 81, (8, 24)),
    ],
)
def test_create_block_mask_matches_brute_force(B, H, Q, KV, block_size):
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    dense = block_structured_mask(B, H, Q, KV, q_block, kv_block, seed=Q * 1000 + KV)
    bm = create_block_mask(table_mask_mod(dense), B, H, Q, KV, device=CPU, BLOCK_SIZE=block_size)
    partial, full = brute_blocks(dense, q_block, kv_block)
    if partial.numel() >= 6:
        assert partial.any() and full.any()  # the random mask exercises both kinds
    assert_layout(bm, partial, full)
    assert bm.seq_lengths == (Q, KV) and bm.BLOCK_SIZE == (q_block, kv_block)
    assert bm.shape == (B, H, Q, KV)


def test_ragged_last_blocks_count_only_existing_positions():
    # Everything visible: every block is full, including the ragged last row and column.
    bm = create_block_mask(noop_mask, None, None, 70, 50, device=CPU, BLOCK_SIZE=32)
    assert bm.kv_num_blocks.sum() == 0
    assert torch.equal(bm.full_kv_num_blocks, torch.tensor([[[2, 2, 2]]], dtype=torch.int32))
    # Causal with Q=KV=65, block 32: the 1x1 last diagonal tile (q=64, kv=64) is full.
    bm = create_block_mask(causal, None, None, 65, 65, device=CPU, BLOCK_SIZE=32)
    partial, full = brute_blocks(create_mask(causal, 1, 1, 65, 65, device=CPU), 32, 32)
    assert bool(full[0, 0, 2, 2]) and not bool(partial[0, 0, 2, 2])
    assert_layout(bm, partial, full)


def test_mask_that_sees_nothing_has_no_blocks():
    def nothing(b, h, q, kv):
        return q < 0

    bm = create_block_mask(nothing, 2, 2, 100, 60, device=CPU, BLOCK_SIZE=32)
    assert bm.kv_num_blocks.sum() == 0 and bm.full_kv_num_blocks.sum() == 0
    assert bm.q_num_blocks.sum() == 0 and bm.full_q_num_blocks.sum() == 0
    assert bm.sparsity() == 100.0
    assert bm.to_dense().sum() == 0


def test_causal_layout_and_ordering():
    bm = create_block_mask(causal, None, None, 512, 512, device=CPU)
    assert bm.kv_num_blocks.shape == (1, 1, 4) and bm.kv_indices.shape == (1, 1, 4, 4)
    assert torch.equal(bm.kv_num_blocks[0, 0], torch.ones(4, dtype=torch.int32))
    assert torch.equal(bm.full_kv_num_blocks[0, 0], torch.arange(4, dtype=torch.int32))
    # Query block i: partial block i (the diagonal), full blocks 0..i-1 in increasing order.
    for i in range(4):
        assert int(bm.kv_indices[0, 0, i, 0]) == i
        assert bm.full_kv_indices[0, 0, i, :i].tolist() == list(range(i))
    assert bm.sparsity() == pytest.approx(100 * 6 / 16)


def test_mask_varying_with_batch_and_head_only_where_the_mod_reads_them():
    def head_window(b, h, q, kv):  # depends on h, not b
        return (q - kv).abs() <= 8 * (h + 1)

    def batch_shift(b, h, q, kv):  # depends on b, not h
        return kv <= q + 16 * b

    for mod, expect_equal_over in ((head_window, 0), (batch_shift, 1)):
        dense = create_mask(mod, 3, 2, 96, 96, device=CPU)
        bm = create_block_mask(mod, 3, 2, 96, 96, device=CPU, BLOCK_SIZE=16)
        assert_layout(bm, *brute_blocks(dense, 16, 16))
        # The fields are materialized (contiguous, full size) even where they do not vary.
        assert bm.kv_indices.is_contiguous() and bm.kv_indices.shape == (3, 2, 6, 6)
        first = bm.kv_num_blocks.select(expect_equal_over, 0)
        assert torch.equal(bm.kv_num_blocks.select(expect_equal_over, 1), first)


def test_small_slabs_give_the_same_mask(monkeypatch):
    dense = block_structured_mask(2, 3, 150, 90, 16, 32, seed=7)
    reference = create_block_mask(table_mask_mod(dense), 2, 3, 150, 90, device=CPU, BLOCK_SIZE=(16, 32))
    # A budget below one block of rows forces per-batch, per-head, one-block slabs.
    monkeypatch.setattr(block_mask_module, "_SLAB_ELEMENT_BUDGET", 500)
    sliced = create_block_mask(table_mask_mod(dense), 2, 3, 150, 90, device=CPU, BLOCK_SIZE=(16, 32))
    for field in BlockMask._BLOCK_LIST_FIELDS:
        assert torch.equal(getattr(sliced, field), getattr(reference, field)), field


def test_large_query_blocks_count_rows_in_groups():
    # Q_BLOCK 384 > 255 rows: the per-column counts are kept in groups of at most 255 rows.
    dense = block_structured_mask(1, 1, 800, 64, 384, 16, seed=3)
    bm = create_block_mask(table_mask_mod(dense), 1, 1, 800, 64, device=CPU, BLOCK_SIZE=(384, 16))
    assert_layout(bm, *brute_blocks(dense, 384, 16))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces (vmap hands physical tensors down)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_the_whole_mask_is_ever_allocated(monkeypatch):
    Q = KV = 2048
    monkeypatch.setattr(block_mask_module, "_SLAB_ELEMENT_BUDGET", 1 << 16)
    with _LargestTensor() as spy:
        bm = create_block_mask(causal, None, None, Q, KV, device=CPU, BLOCK_SIZE=64)
    # One slab is max(budget, one block of rows) = 64 rows x 2048 = 2**17 elements.
    assert spy.largest <= 64 * KV
    assert spy.largest * 16 <= Q * KV
    assert_layout(bm, *brute_blocks(create_mask(causal, 1, 1, Q, KV, device=CPU), 64, 64))


# --------------------------------------------------------------------------------------
# create_block_mask / create_mask: argument errors
# --------------------------------------------------------------------------------------


def score_mod_identity(score, b, h, q, kv):
    return score


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(mask_mod=score_mod_identity), ValueError, "looks like a score_mod"),
        (dict(mask_mod=lambda b, h, q: q > 0), ValueError, "must take 4 arguments"),
        (dict(mask_mod="causal"), ValueError, "must be a callable"),
        (dict(B=-1), ValueError, "B must be None"),
        (dict(H=2.0), ValueError, "H must be None"),
        (dict(Q_LEN=-1), ValueError, "Q_LEN must be a non-negative int"),
        (dict(KV_LEN=-3), ValueError, "KV_LEN must be a non-negative int"),
        (dict(dq_kv_order=None), ValueError, "dq_kv_order must be a bool"),
        (dict(BLOCK_SIZE=0), ValueError, "BLOCK_SIZE entries must be positive"),
        (dict(BLOCK_SIZE=(16, 16, 16)), ValueError, "BLOCK_SIZE must be an int or"),
        (dict(device="nonsense"), ValueError, "is not a device"),
    ],
)
def test_create_block_mask_rejects_bad_arguments(kwargs, error, message):
    args = dict(mask_mod=causal, B=1, H=1, Q_LEN=16, KV_LEN=16, device=CPU)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        create_block_mask(**args)


def test_default_device_is_torchs():
    """No device named: the current accelerator, else the CPU (torch's default), for the
    builders and the document mask alike."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    expected = torch_create_block_mask(causal, 1, 1, 16, 16).kv_num_blocks.device
    assert create_block_mask(causal, 1, 1, 16, 16).kv_num_blocks.device == expected
    assert create_mask(causal, 1, 1, 16, 16).device == expected
    assert create_document_block_mask(lengths=[100, 156]).kv_num_blocks.device == expected
    # An explicit CUDA device without CUDA still gets a clear error.
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"CUDA is not available.*device='cpu'"):
            create_block_mask(causal, 1, 1, 16, 16, device="cuda")


def test_create_mask_shapes_and_score_mods():
    mask = create_mask(causal, None, 3, 5, 4, device=CPU)
    assert mask.shape == (1, 3, 5, 4) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 2], torch.arange(5).view(-1, 1) >= torch.arange(4).view(1, -1))

    def minus_inf_above_diagonal(score, b, h, q, kv):
        return torch.where(q >= kv, score + h, -float("inf"))

    assert torch.equal(create_mask(minus_inf_above_diagonal, 2, 2, 5, 4, device=CPU),
                       create_mask(causal, 2, 2, 5, 4, device=CPU))
    with pytest.raises(ValueError, match="must take 4 arguments .* or 5"):
        create_mask(lambda a, b: a, 1, 1, 2, 2, device=CPU)


def test_create_mask_in_slabs_equals_one_shot(monkeypatch):
    def mod(b, h, q, kv):
        return (q * 7 + kv * 3 + b + 2 * h) % 5 < 2

    reference = create_mask(mod, 2, 2, 33, 20, device=CPU)
    monkeypatch.setattr(block_mask_module, "_SLAB_ELEMENT_BUDGET", 50)
    assert torch.equal(create_mask(mod, 2, 2, 33, 20, device=CPU), reference)
    q = torch.arange(33).view(1, 1, -1, 1)
    kv = torch.arange(20).view(1, 1, 1, -1)
    b = torch.arange(2).view(-1, 1, 1, 1)
    h = torch.arange(2).view(1, -1, 1, 1)
    assert torch.equal(reference, (q * 7 + kv * 3 + b + 2 * h) % 5 < 2)


# --------------------------------------------------------------------------------------
# BlockMask methods
# --------------------------------------------------------------------------------------


def test_as_tuple_is_torchs_and_operator_tuple_follows_the_internals_contract():
    bm = create_block_mask(causal, 2, 1, 300, 200, device=CPU, BLOCK_SIZE=(64, 32), compute_dq_write_order=True)
    fields = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
              bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices]
    t = bm.as_tuple()
    assert len(t) == 17
    assert t[0] == 300 and t[1] == 200
    assert all(a is b for a, b in zip(t[2:10], fields))
    assert t[10] is bm.dq_write_order and t[11] is bm.dq_write_order_full
    assert t[12] is None and t[13] is True  # dq_kv_order tensor, dq_kv_order_spt
    assert t[14] == 64 and t[15] == 32 and t[16] is causal
    nested = bm.as_tuple(flatten=False)
    assert nested[0] == (300, 200) and nested[-2] == (64, 32) and len(nested) == 15
    assert BlockMask.from_tuple(t).as_tuple() == t

    op = bm.operator_tuple()
    assert len(op) == 13 and op[:2] == (300, 200)
    assert all(a is b for a, b in zip(op[2:10], fields))
    assert op[10:] == (64, 32, causal)


def test_shape_numel_sparsity_to_dense():
    dense = block_structured_mask(2, 3, 100, 70, 32, 16, seed=11)
    bm = create_block_mask(table_mask_mod(dense), 2, 3, 100, 70, device=CPU, BLOCK_SIZE=(32, 16))
    partial, full = brute_blocks(dense, 32, 16)
    assert bm.shape == (2, 3, 100, 70)
    assert bm.numel() == 2 * 3 * 100 * 70
    to_dense = bm.to_dense()
    assert to_dense.dtype == torch.int32 and to_dense.shape == (2, 3, 4, 5)
    assert torch.equal(to_dense, (partial | full).to(torch.int32))
    skipped = (~(partial | full)).sum().item()
    assert bm.sparsity() == pytest.approx(100.0 * skipped / partial.numel())


def test_sparsity_matches_pytorch_definition_for_divisible_lengths():
    bm = create_block_mask(causal, None, None, 1024, 1024, device=CPU, BLOCK_SIZE=128)
    computed = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    assert bm.sparsity() == pytest.approx(100 * (1 - computed * 128 * 128 / bm.numel()))


def test_to_string_fills_every_computed_block_as_torch_does():
    # PyTorch's picture: a block that is computed (partial or full alike) is filled, an
    # empty one blank; entries are "(b, h)" then their rows, separated by a blank line.
    bm = create_block_mask(causal, None, 2, 96, 96, device=CPU, BLOCK_SIZE=32)
    assert bm.to_string() == "(0, 0)\n██    \n████  \n██████\n\n(0, 1)\n██    \n████  \n██████\n"
    assert str(bm) == ("BlockMask(shape=(1, 2, 96, 96), sparsity=33.33%, \n"
                       "(0, 0)\n██    \n████  \n██████\n\n(0, 1)\n██    \n████  \n██████\n)")
    assert repr(bm) == (
        "BlockMask(\n"
        "    kv_num_blocks=torch.Size([1, 2, 3]),\n"
        "    kv_indices=torch.Size([1, 2, 3, 3]),\n"
        "    full_kv_num_blocks=torch.Size([1, 2, 3]),\n"
        "    full_kv_indices=torch.Size([1, 2, 3, 3]),\n"
        "    q_num_blocks=torch.Size([1, 2, 3]),\n"
        "    q_indices=torch.Size([1, 2, 3, 3]),\n"
        "    full_q_num_blocks=torch.Size([1, 2, 3]),\n"
        "    full_q_indices=torch.Size([1, 2, 3, 3]),\n"
        "    BLOCK_SIZE=(32, 32),\n"
        "    shape=(1, 2, 96, 96),\n"
        "    sparsity=33.33%,\n"
        "    mask_mod=causal\n"
        ")"
    )
    partial_only = create_block_mask(causal, None, None, 64, 64, device=CPU, BLOCK_SIZE=32,
                                     separate_full_blocks=False)
    assert "full_kv_num_blocks=None," in repr(partial_only)
    assert partial_only.to_string() == "(0, 0)\n██  \n████\n"


def test_to_string_is_bounded_for_large_masks():
    bm = create_block_mask(causal, 3, 4, 64 * 100, 64 * 100, device=CPU, BLOCK_SIZE=64)
    lines = bm.to_string().splitlines()
    pictures = [line for line in lines if line and set(line) <= set("█░ ")]
    assert len(pictures) == 4 * 20 and all(len(line) == 2 * 20 for line in pictures)
    assert lines[-3:] == [
        "...",
        "To print out more, set BlockMask.to_string(limit=N)",
        "You can also index (BlockMask[batch, head]) to choose a specific batch or head",
    ]
    # A 5 x 5-block cell mixing computed and empty blocks is shaded; below the diagonal,
    # where every block is computed, it is filled.
    assert pictures[0] == "░░" + "  " * 19 and pictures[19] == "██" * 19 + "░░"
    uncapped = bm.to_string(grid_size=-1, limit=1).splitlines()
    assert len(uncapped) == 1 + 100 + 1 + 3
    assert all(len(line) == 2 * 100 for line in uncapped[1:101])


def test_getitem_keeps_four_dims_and_selects_entries():
    def per_entry(b, h, q, kv):
        return (q - kv).abs() <= 4 * (b + 1) + 16 * h

    dense = create_mask(per_entry, 4, 3, 80, 80, device=CPU)
    bm = create_block_mask(per_entry, 4, 3, 80, 80, device=CPU, BLOCK_SIZE=16)
    partial, full = brute_blocks(dense, 16, 16)
    cases = [
        (1, (slice(1, 2), slice(None))),
        (-1, (slice(3, 4), slice(None))),
        ((2, 0), (slice(2, 3), slice(0, 1))),
        ((slice(0, 4, 2), slice(1, None)), (slice(0, 4, 2), slice(1, None))),
        ((torch.tensor([3, 0]), 2), ([3, 0], slice(2, 3))),
        (([1, 2],), ([1, 2], slice(None))),
    ]
    for index, (batch_sel, head_sel) in cases:
        sliced = bm[index]
        want_partial = partial[batch_sel][:, head_sel]
        want_full = full[batch_sel][:, head_sel]
        assert sliced.kv_num_blocks.dim() == 3 and sliced.kv_indices.dim() == 4
        assert_layout(sliced, want_partial, want_full)
        assert sliced.seq_lengths == (80, 80)
        # The sliced mask_mod still answers for the selected entries.
        batch_ids = torch.arange(4)[batch_sel]
        head_ids = torch.arange(3)[head_sel]
        again = create_mask(sliced.mask_mod, len(batch_ids), len(head_ids), 80, 80, device=CPU)
        assert torch.equal(again, dense[batch_ids][:, head_ids])


def test_getitem_on_query_blocks_and_errors():
    bm = create_block_mask(causal, 2, 2, 128, 128, device=CPU, BLOCK_SIZE=32)
    rows = bm[:, :, torch.tensor([3])]
    assert rows.kv_num_blocks.shape == (2, 2, 1) and rows.kv_indices.shape == (2, 2, 1, 4)
    assert torch.equal(rows.full_kv_indices[0, 0, 0, :3], torch.tensor([0, 1, 2], dtype=torch.int32))
    assert rows.q_num_blocks.shape == (2, 2, 4)
    i = torch.tensor(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="indexed along its query-block dimension"):
        rows.mask_mod(i, i, i, i)
    with pytest.raises(IndexError, match="out of range"):
        bm[5]
    with pytest.raises(IndexError, match="3 indices at most"):
        bm[0, 0, 0, 0]
    with pytest.raises(IndexError, match="must be an int, slice"):
        bm[0.5]


def test_getitem_on_broadcast_dims_keeps_caller_indices():
    def batch_dependent(b, h, q, kv):
        return kv <= q + b

    bm = create_block_mask(batch_dependent, None, 2, 16, 16, device=CPU, BLOCK_SIZE=8)
    sliced = bm[0, 1]
    assert sliced.kv_num_blocks.shape == (1, 1, 2)
    # B was broadcast, so b is still the caller's batch index.
    assert torch.equal(create_mask(sliced.mask_mod, 3, 1, 16, 16, device=CPU),
                       create_mask(batch_dependent, 3, 1, 16, 16, device=CPU))


def test_from_kv_blocks_derives_query_side():
    gen = torch.Generator().manual_seed(5)
    partial = torch.rand(2, 3, 5, 7, generator=gen) < 0.4
    full = (torch.rand(2, 3, 5, 7, generator=gen) < 0.4) & ~partial

    def lists(dense):
        num = dense.sum(-1).to(torch.int32)
        idx = torch.empty(dense.shape, dtype=torch.int32)
        for row, flags in zip(idx.view(-1, 7), dense.view(-1, 7)):
            chosen = flags.nonzero().flatten().tolist()
            row[:] = torch.tensor(chosen + [6] * (7 - len(chosen)))  # tail: any valid index
        return num, idx

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(16, 8))
    assert bm.seq_lengths == (5 * 16, 7 * 8) and bm.BLOCK_SIZE == (16, 8)
    assert bm.mask_mod is noop_mask
    assert_layout(bm, partial, full)

    only_partial = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=16, seq_lengths=(70, 100))
    assert only_partial.full_kv_num_blocks is None and only_partial.full_q_indices is None
    assert only_partial.seq_lengths == (70, 100) and only_partial.BLOCK_SIZE == (16, 16)
    assert torch.equal(listed_blocks(only_partial.q_num_blocks, only_partial.q_indices, 5),
                       partial.transpose(-2, -1))
    no_q = BlockMask.from_kv_blocks(kv_num, kv_idx, compute_q_blocks=False)
    assert no_q.q_num_blocks is None and no_q.q_indices is None


def test_from_kv_blocks_rejects_bad_arguments():
    num = torch.ones(1, 1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        BlockMask.from_kv_blocks(num[0, 0, :1], idx[0, 0, 0])
    with pytest.raises(ValueError, match="both full_kv_num_blocks and full_kv_indices"):
        BlockMask.from_kv_blocks(num, idx, full_kv_num_blocks=num)
    with pytest.raises(ValueError, match="kv_num_blocks shape"):
        BlockMask.from_kv_blocks(num[..., :1], idx)
    with pytest.raises(ValueError, match="full_kv_\\* shapes"):
        BlockMask.from_kv_blocks(num, idx, num[..., :1], idx[..., :1, :])


def test_to_device_returns_a_new_mask():
    bm = create_block_mask(causal, 1, 2, 64, 64, device=CPU, BLOCK_SIZE=16)
    moved = bm.to("meta")
    assert moved is not bm and moved.kv_indices.device.type == "meta"
    assert moved.full_q_indices.device.type == "meta" and bm.kv_indices.device.type == "cpu"
    assert moved.mask_mod is bm.mask_mod and moved.seq_lengths == bm.seq_lengths
    back = bm.to("cpu")
    for field in BlockMask._BLOCK_LIST_FIELDS:
        assert torch.equal(getattr(back, field), getattr(bm, field))


def test_pytree_round_trip_and_torch_compile_fullgraph():
    bm = create_block_mask(causal, 1, 1, 256, 256, device=CPU, BLOCK_SIZE=64)
    leaves, spec = torch.utils._pytree.tree_flatten(bm)
    assert len(leaves) == 8 and all(isinstance(t, torch.Tensor) for t in leaves)
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, BlockMask) and rebuilt.mask_mod is causal
    assert rebuilt.seq_lengths == (256, 256) and rebuilt.BLOCK_SIZE == (64, 64)

    @torch.compile(fullgraph=True, backend="eager")
    def plus_one(block_mask):
        return block_mask.kv_num_blocks + 1

    @torch.compile(fullgraph=True, backend="eager")
    def tuple_sum(block_mask):
        t = block_mask.as_tuple()
        return t[2].sum() + t[5].sum() + t[0] + t[15]

    assert torch.equal(plus_one(bm), bm.kv_num_blocks + 1)
    assert int(tuple_sum(bm)) == int(bm.kv_num_blocks.sum() + bm.full_kv_indices.sum()) + 256 + 64


def test_create_block_mask_traced_by_torch_compile_matches_eager():
    torch._dynamo.reset()
    frames = []

    def count_frames(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    def window(b, h, q, kv):
        return (q - kv).abs() <= 20 + h

    @torch.compile(fullgraph=True, backend=count_frames, dynamic=True)
    def build(x):
        bm = create_block_mask(window, None, 2, x.shape[0], x.shape[1], device=CPU, BLOCK_SIZE=(16, 32))
        return bm.as_tuple()[2:10]

    for q_len, kv_len in ((70, 100), (93, 41)):
        traced = build(torch.empty(q_len, kv_len))
        eager = create_block_mask(window, None, 2, q_len, kv_len, device=CPU, BLOCK_SIZE=(16, 32))
        for field, got in zip(BlockMask._BLOCK_LIST_FIELDS, traced):
            assert torch.equal(got, getattr(eager, field)), field
        assert_layout(eager, *brute_blocks(create_mask(window, 1, 2, q_len, kv_len, device=CPU), 16, 32))
    assert len(frames) == 1  # one graph with symbolic lengths serves both shapes


_DOCUMENT_OF_POSITION = torch.arange(512) // 37


def same_document_causal(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (_DOCUMENT_OF_POSITION[q_idx] == _DOCUMENT_OF_POSITION[kv_idx])


# Length pairs whose padded block reduction Inductor's CPU vectorizer could not compile
# for a causal mask (VecMask<int> vs VecMask<float>), then odd pairs from a fixed seed
# with a mod that indexes a captured tensor by position (so evaluating it past the lengths
# would read out of bounds). One compile each.
_ODD_LENGTH_CASES = [(256, 122, causal), (384, 84, causal), (122, 256, causal)] + [
    (*(int(n) for n in torch.randint(1, 400, (2,), generator=torch.Generator().manual_seed(seed))),
     same_document_causal)
    for seed in range(7)
]


@pytest.mark.parametrize("q_len, kv_len, mask_mod", _ODD_LENGTH_CASES)
def test_create_block_mask_compiled_by_inductor_for_odd_lengths(q_len, kv_len, mask_mod):
    """Built inside a function compiled by Inductor on CPU, for lengths that are not block
    multiples, the mask equals the eager one."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=False)
    def build():
        return create_block_mask(mask_mod, None, None, q_len, kv_len, device=CPU).as_tuple()[2:10]

    eager = create_block_mask(mask_mod, None, None, q_len, kv_len, device=CPU)
    for field, got in zip(BlockMask._TENSOR_FIELDS, build()):
        assert torch.equal(got, getattr(eager, field)), field
    torch._dynamo.reset()


def test_default_block_size_constant():
    assert _DEFAULT_SPARSE_BLOCK_SIZE == 128
    assert create_block_mask(causal, None, None, 256, 256, device=CPU).BLOCK_SIZE == (128, 128)


# --------------------------------------------------------------------------------------
# Document masks
# --------------------------------------------------------------------------------------


def random_lengths(total, gen, max_len):
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(0, max_len + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def document_truth(lengths, causal_flag, window=None):
    """Dense [T, T] truth of the packed-document mask from per-token document ids."""
    doc = torch.tensor([d for d, n in enumerate(lengths) for _ in range(n)])
    starts = torch.tensor([sum(lengths[:d]) for d in range(len(lengths))])
    position = torch.arange(len(doc))
    local = position - starts[doc]
    truth = doc[:, None] == doc[None, :]
    if causal_flag:
        truth &= position[:, None] >= position[None, :]
    if window is not None:
        truth &= (local[:, None] - local[None, :]).abs() <= window
    return truth


def local_window(b, h, q, kv):
    return (q - kv).abs() <= 5


@pytest.mark.parametrize("block_size", [16, 32, 128, (32, 16)])
@pytest.mark.parametrize("causal_flag", [True, False])
def test_document_block_mask_equals_create_block_mask(block_size, causal_flag):
    gen = torch.Generator().manual_seed(hash((str(block_size), causal_flag)) % 1000)
    for total, max_len in ((150, 40), (97, 97), (200, 8)):
        lengths = random_lengths(total, gen, max_len)
        bm = create_document_block_mask(lengths=lengths, causal=causal_flag, BLOCK_SIZE=block_size, device=CPU)
        truth = document_truth(lengths, causal_flag)
        assert torch.equal(create_mask(bm.mask_mod, 1, 1, total, total, device=CPU)[0, 0], truth)
        reference = create_block_mask(bm.mask_mod, None, None, total, total, device=CPU, BLOCK_SIZE=block_size)
        q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
        partial, full = brute_blocks(truth[None, None], q_block, kv_block)
        assert_layout(bm, partial, full)
        for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(bm, field), getattr(reference, field)), field
        assert bm.seq_lengths == (total, total) and bm.BLOCK_SIZE == (q_block, kv_block)


@pytest.mark.parametrize("block_size", [16, (16, 32)])
@pytest.mark.parametrize("causal_flag", [True, False])
def test_document_block_mask_with_inner_sliding_window(block_size, causal_flag):
    gen = torch.Generator().manual_seed(21)
    lengths = random_lengths(180, gen, 60)
    bm = create_document_block_mask(lengths=lengths, causal=causal_flag, mask_mod=local_window,
                                    BLOCK_SIZE=block_size, device=CPU)
    truth = document_truth(lengths, causal_flag, window=5)
    # The element mask is exact; the inner mod sees document-local positions.
    assert torch.equal(create_mask(bm.mask_mod, 1, 1, 180, 180, device=CPU)[0, 0], truth)
    # No block is claimed full; every block that holds a visible pair is listed as partial,
    # and every listed block lies within the document relation.
    assert bm.full_kv_num_blocks is None and bm.full_q_indices is None
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    partial, full = brute_blocks(truth[None, None], q_block, kv_block)
    listed = listed_blocks(bm.kv_num_blocks, bm.kv_indices, partial.shape[-1])
    assert bool((listed >= (partial | full)).all())
    doc_partial, doc_full = brute_blocks(document_truth(lengths, causal_flag)[None, None], q_block, kv_block)
    assert torch.equal(listed, doc_partial | doc_full)
    assert torch.equal(listed_blocks(bm.q_num_blocks, bm.q_indices, partial.shape[-2]), listed.transpose(-2, -1))


def test_document_offsets_lengths_and_batches_agree():
    lengths = [5, 0, 30, 1, 28]
    offsets = torch.tensor([0, 5, 5, 35, 36, 64])
    by_lengths = create_document_block_mask(lengths=lengths, BLOCK_SIZE=16, device=CPU)
    by_offsets = create_document_block_mask(offsets=offsets, BLOCK_SIZE=16)
    for field in BlockMask._BLOCK_LIST_FIELDS:
        assert torch.equal(getattr(by_lengths, field), getattr(by_offsets, field)), field
    # One packing per batch entry: each batch row equals its own single-packing mask.
    other = [64]
    batched = create_document_block_mask(lengths=[lengths, other], BLOCK_SIZE=16, device=CPU)
    single_other = create_document_block_mask(lengths=other, BLOCK_SIZE=16, device=CPU)
    assert batched.kv_indices.shape == (2, 1, 4, 4) and batched.shape == (2, 1, 64, 64)
    for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(batched, field)[0], getattr(by_lengths, field)[0])
        assert torch.equal(getattr(batched, field)[1], getattr(single_other, field)[0])
    dense = create_mask(batched.mask_mod, 2, 1, 64, 64, device=CPU)
    assert torch.equal(dense[0, 0], document_truth(lengths, True))
    assert torch.equal(dense[1, 0], document_truth(other, True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of lengths= or offsets="),
        (dict(lengths=[3], offsets=[0, 3]), "exactly one of lengths= or offsets="),
        (dict(lengths=[3, -1, 4]), "negative document length"),
        (dict(offsets=[1, 3, 5]), "must start at 0"),
        (dict(offsets=[0, 5, 3]), "must be non-decreasing"),
        (dict(lengths=[[3, 4], [5, 5]]), "same number of tokens"),
        (dict(lengths=[0, 0]), "hold no tokens"),
        (dict(lengths=[2.5, 3.0]), "must hold integers"),
        (dict(lengths=[4, 4], mask_mod=3), "mask_mod must be a callable"),
        (dict(lengths=[4, 4], BLOCK_SIZE=-1), "BLOCK_SIZE entries must be positive"),
        (dict(lengths=7), "non-empty 1-D"),
    ],
)
def test_document_block_mask_rejects_bad_arguments(kwargs, message):
    kwargs.setdefault("device", CPU)
    with pytest.raises(ValueError, match=message):
        create_document_block_mask(**kwargs)


def test_document_block_mask_million_tokens_layout_spot_check():
    # Large enough for the lazily zeroed CPU buffers; check a few rows against the
    # arithmetic one document implies.
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 8192, (300,), generator=gen)
    lengths = lengths[lengths.cumsum(0) <= 1 << 20]
    lengths = torch.cat([lengths, torch.tensor([(1 << 20) - int(lengths.sum())])])
    bm = create_document_block_mask(lengths=lengths, device=CPU)
    n = (1 << 20) // 128
    assert bm.kv_indices.shape == (1, 1, n, n) and bm.kv_indices.is_contiguous()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    for row in torch.randint(0, n, (20,), generator=gen).tolist():
        first, last = row * 128, row * 128 + 127
        doc = int(torch.searchsorted(offsets, torch.tensor(first), right=True)) - 1
        listed = listed_blocks(bm.kv_num_blocks[0, 0, row:row + 1], bm.kv_indices[0, 0, row:row + 1], n)[0]
        listed_full = listed_blocks(bm.full_kv_num_blocks[0, 0, row:row + 1],
                                    bm.full_kv_indices[0, 0, row:row + 1], n)[0]
        visible = (listed | listed_full).nonzero().flatten().tolist()
        assert visible == list(range(int(offsets[doc]) // 128, last // 128 + 1))
        assert not bool((listed & listed_full).any())
    # Unused slots (most of each row) are valid indices too.
    for indices in (bm.kv_indices, bm.full_kv_indices, bm.q_indices, bm.full_q_indices):
        assert int(indices.min()) >= 0 and int(indices.max()) < n


# --------------------------------------------------------------------------------------
# Provenance: no dependency on PyTorch's FlexAttention module
# --------------------------------------------------------------------------------------


def test_sources_do_not_import_torch_flex_attention():
    sources = [REPO / "inductor_flex" / "block_mask.py", *sorted((REPO / "inductor_flex" / "masks").glob("*.py"))]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any("nn.attention" in name or "flex_attention" in name for name in names), path


def test_block_mask_module_loads_without_torch_flex_attention():
    # The package __init__ registers the Inductor lowering, and Inductor itself imports
    # PyTorch's flex_attention module; so load block_mask.py and masks/ with the package
    # __init__ skipped, while refusing any import of torch.nn.attention.flex_attention.
    script = textwrap.dedent(f"""
        import sys, types, importlib.abc
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch.nn.attention.flex_attention":
                    raise ImportError("refused: " + name)
        sys.meta_path.insert(0, Refuse())
        package = types.ModuleType("inductor_flex")
        package.__path__ = [{str(REPO / "inductor_flex")!r}]
        sys.modules["inductor_flex"] = package
        from inductor_flex.block_mask import BlockMask, create_block_mask
        import inductor_flex.masks
        from inductor_flex.masks import create_document_block_mask
        bm = create_block_mask(inductor_flex.masks.causal_mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
        assert "torch.nn.attention.flex_attention" not in sys.modules
        print(int(bm.kv_num_blocks.sum()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"


def test_arity_read_off_the_code_object_agrees_with_inspect():
    # The fast path (plain functions, no __wrapped__) must count exactly as inspect.signature.
    import functools
    import inspect

    def by_signature(fn):
        parameters = inspect.signature(fn).parameters.values()
        if any(p.kind == p.VAR_POSITIONAL for p in parameters):
            return None
        return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                   for p in parameters)

    def four(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    @functools.wraps(four)
    def wrapped(*args, **kwargs):
        return four(*args, **kwargs)

    cases = [four, lambda b, h, q, kv=0: q, lambda b, /, h, q, kv, *, extra: q, lambda *args: 0,
             lambda b, h, q, kv, **kwargs: q, wrapped, functools.partial(lambda x, b, h, q, kv: q, 0)]
    counts = [block_mask_module._required_positional_count(fn) for fn in cases]
    assert counts == [by_signature(fn) for fn in cases] == [4, 3, 4, None, 4, 4, 4]
