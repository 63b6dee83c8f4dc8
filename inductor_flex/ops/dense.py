"""Exact FlexAttention in plain tensor code: the eager implementation of both operators.

The math, straight from the definition (docs/internals.md):

    scores[b, h, q, kv] = score_mod(scale * <query[b, h, q], key[b', h // g, kv]>, b, h, q, kv)
    kept iff kv's block is full for q's block, or partial and mask_mod(b, h, q, kv)
    out = softmax(kept scores) @ value,   lse = log sum exp(kept scores)

Scores, softmax statistics and every accumulation are float32 (float64 for float64 inputs).
For float16/bfloat16 inputs the two matrices that a plain eager program in that dtype would
hand to a half-precision matmul are rounded to the input dtype first, as
``softmax(scores).to(v.dtype) @ v`` does: the normalised probabilities P before ``P @ V``
(and ``P^T @ dO`` in the backward), and the gradient of the raw score dS before
``dS @ K`` and ``dS^T @ Q``. The products still accumulate in float32. This is also what a
tensor-core attention kernel does, so a compiled kernel and this eager path carry errors of
the same size. lse and max_scores never see the rounding.

Query rows are processed in chunks (a query block at a time, see ``sparse_chunk_rows``),
so the extra memory is O(chunk x KV_LEN), never the whole score matrix. Each chunk reads
only the KV blocks its block-mask rows list (``_Tile``): key/value are sliced (or gathered)
to those columns, the two products are batched matmuls over those columns alone, the mods
run once on that score tile, and mask_mod runs only on the columns of partial blocks. So
empty blocks cost nothing and no mod is ever evaluated on them. A row that keeps nothing
gets out 0, lse -inf, max_scores -inf, and zero gradients.

Layout trick: the query heads that share a KV head (GQA), and the batch when key/value have
batch 1, are stacked along the row dimension, so one batched matmul per KV head serves them
all and key/value are never repeated per query head.

These functions are not differentiable by autograd; ``dense_attention_backward`` gives the
gradients.
"""
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._block_lists import OperatorBlockMask, listed_to_dense
from .._mods import identity_score_mod, mask_mod_tiles, score_mod_at, score_mod_grid
from .fused_tiles import FusedTiles
from .._compat import cpu_has_bfloat16_matmul_units
from ._shared import empty_in_layout_of  # the fake registrations use it too: strides agree

# Chunks are sized so one chunk's fp32 score tile holds about this many elements (64 MiB);
# the forward keeps a handful of tiles of that size alive at once, the backward about twice
# as many, which keeps both well under 1 GiB.
DEFAULT_SCORE_ELEMENTS_PER_CHUNK = 1 << 24


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul_operand_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype P and dS are rounded to before their matmuls, or None for no rounding."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _round_in_place(tile: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """Round ``tile`` (working dtype, owned by the caller) to ``dtype`` values, kept in place."""
    if dtype is not None:
        tile.copy_(tile.to(dtype))
    return tile


def _native_bfloat16_matmul(query: Tensor) -> bool:
    # CPU only: cuBLAS may reduce bfloat16 products in reduced precision, and the CUDA eager
    # path is the yardstick of the fused kernels' error.
    return (query.dtype == torch.bfloat16 and query.device.type == "cpu"
            and cpu_has_bfloat16_matmul_units())


def default_chunk_rows(batch: int, q_heads: int, q_len: int, kv_len: int, q_block_size: int,
                       budget: int = DEFAULT_SCORE_ELEMENTS_PER_CHUNK) -> int:
    """Query rows per chunk so that ``rows x batch x q_heads x kv_len`` stays within ``budget``.

    A multiple of ``q_block_size`` when at least one block fits, never less than one row,
    never more than ``q_len``.
    """
    per_row = max(1, batch * q_heads * max(kv_len, 1))
    rows = max(1, budget // per_row)
    if rows >= q_block_size:
        rows -= rows % q_block_size
    return max(1, min(rows, q_len))


def sparse_chunk_rows(q_block_size: int, budget_rows: int) -> int:
    """Query rows per chunk: one query block, or fewer rows where ``budget_rows``
    (``default_chunk_rows``) says so. A chunk within one query block reads exactly the KV
    blocks that block lists, so no mod runs on a block the mask leaves out."""
    return max(1, min(budget_rows, q_block_size))


class _Tile:
    """The KV columns one chunk of query rows attends to, from the block mask.

    ``kv_idx``: the kv positions of the listed blocks (those any batch/head lists for any
    row of the chunk), in increasing order; ``kv_slice``: the same as a slice when they are
    contiguous (key/value are then read as views, not gathered). ``masked_columns``: the
    tile's columns (a slice or an index tensor) in blocks that are not full for every
    batch, head and row, and ``keep``: bool ``[B, Hq, rows, len(masked_columns)]`` (maybe
    broadcast) of which scores there are kept; both None when every column is full (nothing
    to mask). mask_mod ran only on columns of partial blocks; unlisted blocks were never
    looked at.
    """

    def __init__(self, kv_idx: Tensor, kv_slice: Optional[slice], masked_columns=None,
                 keep: Optional[Tensor] = None):
        self.kv_idx = kv_idx
        self.kv_slice = kv_slice
        self.masked_columns = masked_columns
        self.keep = keep

    def gather(self, tensor: Tensor) -> Tensor:
        """``tensor [B, H, N, X]`` at the tile's kv positions."""
        if self.kv_slice is not None:
            return tensor[:, :, self.kv_slice]
        return tensor.index_select(2, self.kv_idx)

    def add_product(self, acc: Tensor, left: Tensor, right: Tensor) -> None:
        """``acc [B, H, N, X]`` += ``left @ right`` at the tile's kv positions. A slice of
        ``acc`` takes the product in place (the matmul accumulates into it), without a
        product-sized temporary and a second pass to add it."""
        if self.kv_slice is not None and left.shape[:2] == acc.shape[:2]:
            acc[:, :, self.kv_slice].flatten(0, 1).baddbmm_(left.flatten(0, 1), right.flatten(0, 1))
        elif self.kv_slice is not None:
            acc[:, :, self.kv_slice] += torch.matmul(left, right)
        else:
            acc.index_add_(2, self.kv_idx, torch.matmul(left, right))

    def drop_masked(self, grid: Tensor, fill: float) -> None:
        """Set the dropped scores of ``grid [B, Hq, rows, columns]`` to ``fill``, in place."""
        if self.keep is None:
            return
        if isinstance(self.masked_columns, slice):
            # A view: filled in place, one pass over the masked columns alone.
            grid[..., self.masked_columns].masked_fill_(~self.keep, fill)
        else:
            part = grid[..., self.masked_columns]
            grid[..., self.masked_columns] = torch.where(self.keep, part, fill)

    def kernel_mask(self, columns: int, dtype: torch.dtype) -> Optional[Tensor]:
        """The kept scores as a ``dtype`` tile of 1s and 0s over all ``columns``, for a
        fused tile kernel (``fused_tiles``), with batch and head dims of size 1 where the
        mask is the same for all; None when nothing is masked. (Floats, not bools: Inductor's
        C++ kernels load a float mask as a vector, a bool one an element at a time.)"""
        if self.keep is None:
            return None
        keep = self.keep
        for dim in (0, 1):
            if keep.stride(dim) == 0:
                keep = keep.narrow(dim, 0, 1)
        tile = torch.ones(keep.shape[:-1] + (columns,), dtype=dtype, device=keep.device)
        tile[..., self.masked_columns] = keep.to(dtype)
        return tile

    def keep_everywhere(self, shape) -> Tensor:
        """bool ``shape`` (the whole tile) of the kept scores."""
        keep = torch.ones(shape, dtype=torch.bool, device=self.kv_idx.device)
        if self.keep is not None:
            keep[..., self.masked_columns] = self.keep.expand(keep[..., self.masked_columns].shape)
        return keep


def _as_slice(positions: Tensor):
    """``positions`` (increasing, 1-D) as a slice when they are one run, else as they are."""
    first, last = int(positions[0]), int(positions[-1])
    return slice(first, last + 1) if last - first + 1 == positions.numel() else positions


class _RowStacking:
    """Maps a chunk between the grid view ``[B, Hq, c, X]`` and the stacked-rows view
    ``[Bx, Hkv, R, X]`` that a matmul against key/value ``[Bkv, Hkv, N, *]`` wants.

    Rows are ordered (group, chunk row) per batch, or (group, batch, chunk row) when
    key/value have batch 1 and the batch is folded into the rows. In both orders a
    contiguous stacked tensor reads back as a grid without a copy.
    """

    def __init__(self, batch: int, q_heads: int, kv_batch: int, kv_heads: int):
        self.batch = batch
        self.q_heads = q_heads
        self.kv_heads = kv_heads
        self.group = q_heads // kv_heads
        self.fold_batch = kv_batch == 1 and batch > 1

    def to_rows(self, grid: Tensor) -> Tensor:
        batch, _, chunk, last = grid.shape
        split = grid.reshape(batch, self.kv_heads, self.group, chunk, last)
        if self.fold_batch:
            return split.permute(1, 2, 0, 3, 4).reshape(1, self.kv_heads, -1, last)
        return split.reshape(batch, self.kv_heads, self.group * chunk, last)

    def to_grid(self, rows: Tensor, chunk: int) -> Tensor:
        last = rows.shape[-1]
        if self.fold_batch:
            split = rows.reshape(self.kv_heads, self.group, self.batch, chunk, last)
            return split.permute(2, 0, 1, 3, 4).reshape(self.batch, self.q_heads, chunk, last)
        return rows.reshape(self.batch, self.q_heads, chunk, last)


class _Problem:
    """Everything a chunk needs, prepared once per call."""

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, score_mod: Callable,
                 block_mask: tuple, scale: float, score_mod_buffers: Sequence[Tensor],
                 mask_mod_buffers: Sequence[Tensor], chunk_size: Optional[int], budget: int):
        batch, q_heads, q_len, _ = query.shape
        kv_batch, kv_heads, kv_len, _ = key.shape
        self.device = query.device
        self.dtype = _working_dtype(query.dtype)
        self.operand_dtype = _matmul_operand_dtype(query.dtype)
        self.stacking = _RowStacking(batch, q_heads, kv_batch, kv_heads)
        # Converted once, not per chunk; a no-op for float32 inputs.
        self.key = key.to(self.dtype)
        self.value = value.to(self.dtype)
        # bfloat16 P @ V as a bfloat16 matmul where the CPU has the units: it accumulates in
        # float32 and rounds once, as the float32 product of the rounded P then rounded
        # does, in a third of the time (docs/kernels.md, CPU section).
        self.bfloat16_value = value if _native_bfloat16_matmul(query) else None
        # P as P @ V takes it: bfloat16 (that cast rounds), or the working dtype rounded to
        # the input's half-precision dtype (None: no rounding).
        self.probs_dtype = self.dtype if self.bfloat16_value is None else torch.bfloat16
        self.probs_round = None if self.bfloat16_value is not None else self.operand_dtype
        self.scale = float(scale)
        self.score_mod = score_mod
        self.score_mod_buffers = tuple(score_mod_buffers)
        # No score_mod: no vmap, no vjp, the raw scores are the scores.
        self.identity_score = score_mod is identity_score_mod
        self.mask_mod_buffers = tuple(mask_mod_buffers)
        mask = OperatorBlockMask(*block_mask)
        self.q_block_size, self.kv_block_size = mask.q_block_size, mask.kv_block_size
        self.mask_mod = mask.mask_mod
        self.q_len, self.kv_len = q_len, kv_len
        self.batch_idx = torch.arange(batch, device=self.device)
        self.head_idx = torch.arange(q_heads, device=self.device)
        self.num_kv_blocks = -(-kv_len // self.kv_block_size)
        # bool [Bm, Hm, nQB, nKB] of partial and full blocks. Which blocks any batch or
        # head lists decides each chunk's columns, on the host (one transfer per call).
        self.partial = listed_to_dense(mask.kv_num_blocks, mask.kv_indices, self.num_kv_blocks)
        self.full = None
        if mask.full_kv_num_blocks is not None:
            self.full = listed_to_dense(mask.full_kv_num_blocks, mask.full_kv_indices,
                                        self.num_kv_blocks)
        listed = self.partial if self.full is None else self.partial | self.full
        self.listed_any = listed.flatten(0, 1).any(0).cpu()
        # (query block, kv block) tiles mask_mod must see: partial for some batch or head.
        self.partial_any = self.partial.flatten(0, 1).any(0).cpu()
        # When no batch or head differs, a partial tile's kept scores are mask_mod's alone.
        self.uniform_marks = self.partial.shape[:2] == (1, 1)
        self.mask_budget = budget
        self._allowed = None  # (first q block, end q block, {(qb, kb): row}, bool tiles)
        if chunk_size is None:
            chunk_size = sparse_chunk_rows(self.q_block_size, default_chunk_rows(
                batch, q_heads, q_len, kv_len, self.q_block_size, budget))
        self.chunk_size = max(1, int(chunk_size))

    def chunks(self):
        for start in range(0, self.q_len, self.chunk_size):
            yield start, min(start + self.chunk_size, self.q_len)

    def tile(self, start: int, stop: int, q_idx: Tensor) -> Optional[_Tile]:
        """The chunk's ``_Tile``, or None when its rows list no block at all."""
        first_qb = start // self.q_block_size
        end_qb = (stop - 1) // self.q_block_size + 1
        blocks = self.listed_any[first_qb:end_qb].any(0).nonzero().flatten()
        if blocks.numel() == 0:
            return None
        size = self.kv_block_size
        first, last = int(blocks[0]), int(blocks[-1])
        if last - first + 1 == blocks.numel():
            kv_slice = slice(first * size, min((last + 1) * size, self.kv_len))
            kv_idx = torch.arange(kv_slice.start, kv_slice.stop, device=self.device)
        else:
            kv_slice = None
            kv_idx = (blocks[:, None] * size + torch.arange(size)).flatten()
            kv_idx = kv_idx[kv_idx < self.kv_len].to(self.device)
        block_ids = blocks.to(self.device)

        def marks(dense: Tensor) -> Tensor:
            return dense[..., first_qb:end_qb, :].index_select(-1, block_ids)

        # Columns of a block that is full for every batch, head and row need no mask.
        partial_marks = marks(self.partial)
        if self.full is None:
            full_marks = None
            masked_blocks = torch.ones(block_ids.shape, dtype=torch.bool, device=self.device)
        else:
            full_marks = marks(self.full)
            masked_blocks = ~full_marks.flatten(0, 2).all(0)
        masked_block_ids = blocks[masked_blocks.cpu()].tolist()
        if not masked_block_ids:
            return _Tile(kv_idx, kv_slice)
        column_block = torch.searchsorted(block_ids, kv_idx // size)
        masked = masked_blocks[column_block].nonzero().flatten()
        masked_columns = _as_slice(masked)
        rows_per_block = []
        for qb in range(first_qb, end_qb):
            block_start = qb * self.q_block_size
            rows_per_block.append(slice(max(start, block_start) - block_start,
                                        min(stop, block_start + self.q_block_size) - block_start))
        # mask_mod's verdict on every masked column, block row by block row (False on
        # tiles no batch or head lists as partial: they hold no partial scores to keep).
        allowed = torch.cat([self._allowed_row(qb, masked_block_ids)[..., rows, :]
                             for qb, rows in zip(range(first_qb, end_qb), rows_per_block)], dim=2)
        allowed = allowed[..., :masked.numel()]  # the ragged last kv block
        if self.uniform_marks and end_qb - first_qb == 1:
            # One query block, no batch or head differences: a masked block is partial.
            return _Tile(kv_idx, kv_slice, masked_columns, allowed)
        masked_block = column_block[masked_columns]
        row_block = q_idx // self.q_block_size - first_qb

        def expand(block_marks: Tensor) -> Tensor:
            return block_marks.index_select(-2, row_block).index_select(-1, masked_block)

        keep = expand(partial_marks) & allowed
        if full_marks is not None:
            keep |= expand(full_marks)
        return _Tile(kv_idx, kv_slice, masked_columns, keep)

    def _allowed_row(self, qb: int, kv_blocks: Sequence[int]) -> Tensor:
        """bool ``[B, Hq, QB, len(kv_blocks) * KB]``: mask_mod on query block ``qb`` against
        ``kv_blocks`` (False on tiles not partial anywhere). mask_mod runs on the partial tiles
        of many query blocks at once, as many as ``mask_budget`` elements hold, at positions
        clamped into range (the clamped ones are sliced off by the caller)."""
        if self._allowed is None or not self._allowed[0] <= qb < self._allowed[1]:
            self._evaluate_partial_tiles(qb)
        _, _, row_of, tiles = self._allowed
        zero_row = tiles.shape[0] - 1
        rows = torch.tensor([row_of.get((qb, kb), zero_row) for kb in kv_blocks],
                            device=self.device)
        picked = tiles.index_select(0, rows)  # [n, B, H, QB, KB]
        n, batch, heads, q_size, kv_size = picked.shape
        return picked.permute(1, 2, 3, 0, 4).reshape(batch, heads, q_size, n * kv_size)

    def _evaluate_partial_tiles(self, first_qb: int) -> None:
        q_size, kv_size = self.q_block_size, self.kv_block_size
        per_tile = self.batch_idx.numel() * self.head_idx.numel() * q_size * kv_size
        pairs = []
        end_qb = first_qb
        while end_qb < self.partial_any.shape[0]:
            row = self.partial_any[end_qb].nonzero().flatten().tolist()
            if pairs and (len(pairs) + len(row)) * per_tile > self.mask_budget:
                break
            pairs += [(end_qb, kb) for kb in row]
            end_qb += 1
        # A last, all-False tile for masked blocks that are not partial in this row.
        no_tile = torch.zeros((1, self.batch_idx.numel(), self.head_idx.numel(), q_size, kv_size),
                              dtype=torch.bool, device=self.device)
        if pairs:  # (none: mask_mod is not called on an empty batch of tiles)
            q_tiles = torch.tensor([qb for qb, _ in pairs], dtype=torch.long)[:, None] * q_size
            kv_tiles = torch.tensor([kb for _, kb in pairs], dtype=torch.long)[:, None] * kv_size
            q_tiles = (q_tiles + torch.arange(q_size)).clamp_(max=self.q_len - 1).to(self.device)
            kv_tiles = (kv_tiles + torch.arange(kv_size)).clamp_(max=self.kv_len - 1).to(self.device)
            tiles = torch.cat([mask_mod_tiles(self.mask_mod, self.batch_idx, self.head_idx, q_tiles,
                                              kv_tiles, self.mask_mod_buffers), no_tile])
        else:
            tiles = no_tile
        self._allowed = (first_qb, end_qb, {pair: i for i, pair in enumerate(pairs)}, tiles)

    def raw_scores(self, q_chunk: Tensor, key: Tensor) -> Tuple[Tensor, Tensor]:
        """``scale * Q K^T`` of a query chunk and the tile's keys, as (stacked ``scale * Q``
        rows, stacked scores). The scale goes on the query rows, not on the larger tile."""
        scaled_q_rows = self.stacking.to_rows(q_chunk).to(self.dtype) * self.scale
        return scaled_q_rows, torch.matmul(scaled_q_rows, key.transpose(-1, -2))

    def modify(self, raw_grid: Tensor, q_idx: Tensor, kv_idx: Tensor,
               score_mod_buffers: Sequence[Tensor]) -> Tensor:
        if self.identity_score:
            return raw_grid
        modified = score_mod_grid(self.score_mod, raw_grid, self.batch_idx, self.head_idx, q_idx,
                                  kv_idx, score_mod_buffers)
        # A mod mixing in a float64 tensor (or an int result) would promote; scores stay in
        # the working dtype.
        return modified.to(self.dtype)

    def softmax_parts(self, modified_grid: Tensor, tile: _Tile, chunk: int, owned: bool):
        """Masked softmax pieces in stacked-rows layout. ``owned``: ``modified_grid`` is the
        caller's to overwrite (saves a copy when it is already in stacked order).

        Returns ``(probs, row_max, lse)``: the softmax of the kept scores (0 where dropped),
        the row max of kept scores and the natural-log lse, the last two with a trailing dim
        of 1. Rows that keep nothing have all-zero probs and row_max = lse = -inf.
        """
        columns = modified_grid.shape[-1]
        stacked_shape = self.stacking.to_rows(modified_grid[..., :1]).shape[:-1] + (columns,)
        if owned and not self.stacking.fold_batch and modified_grid.is_contiguous():
            probs = modified_grid.view(stacked_shape)  # the grid is stacked order already
        else:
            probs = torch.empty(stacked_shape, dtype=self.dtype, device=self.device)
            # Written through the grid view, so it lands in stacked order without a copy.
            self.stacking.to_grid(probs, chunk).copy_(modified_grid)
        tile.drop_masked(self.stacking.to_grid(probs, chunk), -math.inf)
        row_max = probs.amax(dim=-1, keepdim=True)
        # One fused pass (max, exp, sum, scale per row), in place; the row sum it does not
        # return is 1 / (the largest probability, that of the row max), which gives lse.
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)
        lse = row_max - probs.amax(dim=-1, keepdim=True).log()
        empty = row_max == -math.inf
        if bool(empty.any()):
            # softmax of a row of -inf is NaN: such rows keep nothing.
            probs.masked_fill_(empty, 0.0)
            lse.masked_fill_(empty, -math.inf)
        return probs, row_max, lse

    def fused_softmax_parts(self, fused: FusedTiles, raw_grid: Tensor, tile: _Tile,
                            q_idx: Tensor):
        """``softmax_parts`` of the raw scores through the fused forward kernel, probs
        already as ``P @ V`` takes them (``probs_operand``); None when the kernel is not
        available."""
        parts = fused.forward(raw_grid, self.batch_idx, self.head_idx, q_idx, tile.kv_idx,
                              self.score_mod_buffers, tile.kernel_mask(raw_grid.shape[-1], self.dtype),
                              self.probs_dtype, self.probs_round)
        return None if parts is None else tuple(map(self.stacking.to_rows, parts))

    def probs_operand(self, probs: Tensor) -> Tensor:
        """``probs`` (working dtype, the caller's) as ``P @ V`` takes it."""
        if self.bfloat16_value is not None:
            return probs.to(torch.bfloat16)
        return _round_in_place(probs, self.operand_dtype)

    def rows_to_stat(self, stacked: Tensor, chunk: int) -> Tensor:
        """``[Bx, Hkv, R, 1]`` -> ``[B, Hq, chunk]``."""
        return self.stacking.to_grid(stacked, chunk).squeeze(-1)


def _with_wanted(buffers: Sequence[Tensor], grad_positions: Sequence[int],
                 wanted_buffers: Sequence[Tensor]) -> list:
    """The score_mod's buffers with those that take gradients replaced by the vjp's inputs."""
    merged = list(buffers)
    for position, buffer in zip(grad_positions, wanted_buffers):
        merged[position] = buffer
    return merged


def _buffer_grads_at_kept_positions(problem: "_Problem", buffers: Sequence[Tensor],
                                    grad_positions: Sequence[int], raw_grid: Tensor,
                                    grad_scores_grid: Tensor, keep: Tensor,
                                    wanted_buffers: Sequence[Tensor], q_idx: Tensor,
                                    kv_idx: Tensor) -> list:
    """Captured-buffer gradients from the kept positions alone: the score_mod runs only
    where the mask keeps a score, so values it takes where the mask drops one (a log of a
    negative distance, say) cannot reach the sums. Taken only when the grid-wide vjp gave a
    non-finite buffer gradient: it costs index lists of the kept positions."""
    b, h, q, kv = keep.nonzero(as_tuple=True)
    indices = (problem.batch_idx[b], problem.head_idx[h], q_idx[q], kv_idx[kv])

    def modify_kept(scores, *wanted):
        merged = _with_wanted(buffers, grad_positions, wanted)
        return score_mod_at(problem.score_mod, scores, *indices, merged).to(problem.dtype)

    _, vjp = torch.func.vjp(modify_kept, raw_grid[b, h, q, kv], *wanted_buffers)
    _, *grads = vjp(grad_scores_grid[b, h, q, kv])
    return grads


@torch.no_grad()
def dense_attention(query: Tensor, key: Tensor, value: Tensor, score_mod: Callable,
                    block_mask: tuple, scale: float,
                    score_mod_other_buffers: Sequence[Tensor] = (),
                    mask_mod_other_buffers: Sequence[Tensor] = (), *,
                    chunk_size: Optional[int] = None,
                    fused_tiles: Optional[FusedTiles] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact forward of the attention operator.

    Arguments follow the operator (docs/internals.md), without kernel_options: ``block_mask``
    is the block mask tuple. ``chunk_size`` overrides the number of query rows processed at
    once (default: see ``default_chunk_rows``); the result does not depend on it.
    ``fused_tiles``, if given (the compiled CPU path, ``lowering/extern.py``), does each
    tile's work between the two matmuls in one compiled kernel, on calls large enough.

    Returns ``out [B, Hq, M, Ev]`` in the query's dtype and memory order, and ``lse`` and
    ``max_scores`` ``[B, Hq, M]`` in float32 (also for float64 inputs, per the contract).
    """
    batch, q_heads, q_len, _ = query.shape
    value_dim = value.shape[-1]
    out = empty_in_layout_of(query, (batch, q_heads, q_len, value_dim))
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=query.device)
    max_scores = torch.empty_like(lse)
    if key.shape[2] == 0:
        # No key at all: every row keeps nothing.
        out.zero_()
        lse.fill_(-math.inf)
        max_scores.fill_(-math.inf)
        return out, lse, max_scores

    problem = _Problem(query, key, value, score_mod, block_mask, scale, score_mod_other_buffers,
                       mask_mod_other_buffers, chunk_size, DEFAULT_SCORE_ELEMENTS_PER_CHUNK)
    stacking = problem.stacking
    # Without a score_mod, ATen's softmax is as fast as the fused kernel.
    if fused_tiles is not None and (problem.identity_score or not FusedTiles.worth_it(
            batch, q_heads, q_len, key.shape[2])):
        fused_tiles = None
    for start, stop in problem.chunks():
        chunk = stop - start
        q_idx = torch.arange(start, stop, device=query.device)
        tile = problem.tile(start, stop, q_idx)
        if tile is None:
            out[:, :, start:stop] = 0
            lse[:, :, start:stop] = -math.inf
            max_scores[:, :, start:stop] = -math.inf
            continue
        _, raw = problem.raw_scores(query[:, :, start:stop], tile.gather(problem.key))
        raw_grid = stacking.to_grid(raw, chunk)
        parts = None
        if fused_tiles is not None:
            parts = problem.fused_softmax_parts(fused_tiles, raw_grid, tile, q_idx)
        if parts is None:
            modified = problem.modify(raw_grid, q_idx, tile.kv_idx, problem.score_mod_buffers)
            probs, row_max, chunk_lse = problem.softmax_parts(modified, tile, chunk, owned=True)
            del modified
            # In float16/bfloat16 the normalised probabilities are rounded before the
            # product, as the eager recipe does.
            probs = problem.probs_operand(probs)
        else:
            probs, row_max, chunk_lse = parts
        del raw, raw_grid
        value_tile = tile.gather(problem.value if problem.bfloat16_value is None
                                 else problem.bfloat16_value)
        chunk_out = torch.matmul(probs, value_tile)
        out[:, :, start:stop] = stacking.to_grid(chunk_out, chunk)
        lse[:, :, start:stop] = problem.rows_to_stat(chunk_lse, chunk)
        max_scores[:, :, start:stop] = problem.rows_to_stat(row_max, chunk)
    return out, lse, max_scores


def _wants_grad(buffer) -> bool:
    return isinstance(buffer, Tensor) and buffer.is_floating_point() and buffer.requires_grad


def _plain_backward_tile(problem: "_Problem", tile: _Tile, chunk: int, q_idx: Tensor,
                         raw_grid: Tensor, buffers: Sequence, grad_positions: Sequence[int],
                         wanted_buffers: Sequence[Tensor], grad_out_rows: Tensor,
                         value_tile: Tensor, row_dot: Tensor, grad_value_acc: Tensor,
                         lse_rows: Optional[Tensor] = None):
    """One tile of the backward as separate ops (the vjp by ``torch.func``): adds the
    tile's dV into ``grad_value_acc``; returns the raw scores' gradient (stacked rows,
    rounded for its matmuls) and the wanted buffers' gradients. ``lse_rows``: the
    forward's lse (stacked rows), which gives P directly when there is no score_mod."""
    stacking = problem.stacking

    def modify(raw, *wanted):
        return problem.modify(raw, q_idx, tile.kv_idx, _with_wanted(buffers, grad_positions, wanted))

    if problem.identity_score and not wanted_buffers:
        modified, modify_vjp = raw_grid, lambda grad: (grad,)
    else:
        modified, modify_vjp = torch.func.vjp(modify, raw_grid, *wanted_buffers)
    if lse_rows is not None and modified is raw_grid:
        # P = exp(raw - lse) in place: the raw scores are not needed again.
        probs = stacking.to_rows(raw_grid)
        torch.sub(probs, lse_rows, out=probs).exp_()
        tile.drop_masked(raw_grid, 0.0)
        empty = lse_rows == -math.inf
        if bool(empty.any()):
            probs.masked_fill_(empty, 0.0)
    else:
        probs, _, _ = problem.softmax_parts(modified, tile, chunk, owned=False)
    del modified
    # d loss / d probs, then through the softmax: p * (dP - rowsum(p * dP) + dlse).
    grad_scores = torch.matmul(grad_out_rows, value_tile.transpose(-1, -2))
    grad_scores.sub_(row_dot).mul_(probs)
    # Stacked rows already hold the GQA group (and a folded batch): one matmul sums them.
    # probs is not needed unrounded any more.
    _round_in_place(probs, problem.operand_dtype)
    tile.add_product(grad_value_acc, probs.transpose(-1, -2), grad_out_rows)
    del probs

    grad_scores_grid = stacking.to_grid(grad_scores, chunk)
    grad_modified_input, *grad_wanted_buffers = modify_vjp(grad_scores_grid)
    # A dropped score contributes nothing, even where the score_mod (or its
    # derivative) is not finite there: 0 * NaN would otherwise leak into the sums.
    if tile.keep is not None:
        # The vjp's result may be a broadcast view: mask a copy.
        grad_modified_input = grad_modified_input.contiguous()
        tile.drop_masked(grad_modified_input, 0.0)
    if not all(bool(torch.isfinite(g).all()) for g in grad_wanted_buffers):
        grad_wanted_buffers = _buffer_grads_at_kept_positions(
            problem, buffers, grad_positions, raw_grid, grad_scores_grid,
            tile.keep_everywhere(grad_modified_input.shape), wanted_buffers, q_idx,
            tile.kv_idx)
    del grad_scores, grad_scores_grid
    grad_raw = stacking.to_rows(grad_modified_input)
    if problem.operand_dtype is not None:
        # The vjp's result may be a view or broadcast: round through a half-size copy,
        # not in place, and let the full-size original go before widening again.
        grad_raw = grad_raw.to(problem.operand_dtype)
        del grad_modified_input
        grad_raw = grad_raw.to(problem.dtype)
    return grad_raw, grad_wanted_buffers


@torch.no_grad()
def dense_attention_backward(query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                             logsumexp: Tensor, grad_out: Tensor, grad_logsumexp: Optional[Tensor],
                             score_mod: Callable, block_mask: tuple, scale: float,
                             score_mod_other_buffers: Sequence[Tensor] = (),
                             mask_mod_other_buffers: Sequence[Tensor] = (), *,
                             chunk_size: Optional[int] = None,
                             buffers_requiring_grad: Optional[Sequence[bool]] = None,
                             fused_tiles: Optional[FusedTiles] = None):
    """Exact gradients of ``dense_attention``, chunked over query rows like the forward.

    Returns ``(grad_query, grad_key, grad_value, grad_score_mod_buffers)`` with the shapes and
    dtypes of query, key, value and the buffers; GQA groups and a broadcast key/value batch
    are summed. A score_mod buffer gets a gradient when it is floating point and
    ``requires_grad`` (or as ``buffers_requiring_grad`` says, one bool per buffer), else None.
    ``grad_logsumexp`` may be None.

    Each chunk's probabilities are recomputed in the working precision (float64 for float64
    inputs) rather than read back from the float32 ``logsumexp``, so the result is exact to
    that precision up to the float16/bfloat16 rounding of P (before ``P^T @ dO``) and of the
    raw-score gradient dS (before ``dS @ K`` and ``dS^T @ Q``) that the module docstring
    describes; the softmax gradient itself uses the unrounded P, and its row term
    rowsum(dO * out) reads ``out`` (the forward's result, in the input dtype; in float32 and
    float64 it is exactly P @ V). The softmax and matmul gradients are
    written out; the score_mod's own gradient (with respect to its score and its buffers)
    comes from ``torch.func.vjp``, which works whatever the surrounding grad mode or
    dispatch state.

    ``fused_tiles`` (the compiled CPU path, ``lowering/extern.py``), on calls large enough
    and not in float64, does each tile's elementwise work in one compiled kernel; it reads
    P as ``exp(score - logsumexp)``, so ``logsumexp`` must then be the forward's. Otherwise
    ``logsumexp`` is not read.
    """
    buffers = tuple(score_mod_other_buffers)
    if buffers_requiring_grad is None:
        buffers_requiring_grad = [_wants_grad(b) for b in buffers]
    if len(buffers_requiring_grad) != len(buffers):
        raise ValueError(f"buffers_requiring_grad has {len(buffers_requiring_grad)} entries for "
                         f"{len(buffers)} score_mod buffers")
    grad_positions = [i for i, wanted in enumerate(buffers_requiring_grad) if wanted]

    work = _working_dtype(query.dtype)
    if fused_tiles is not None and (work == torch.float64 or not FusedTiles.worth_it(
            query.shape[0], query.shape[1], query.shape[2], key.shape[2])):
        fused_tiles = None
    # Without a score_mod, P is exp(raw - lse): one pass, no fused kernel needed.
    reads_lse = fused_tiles is not None
    # Outputs in their inputs' memory order, as the fake registration promises.
    grad_query = empty_in_layout_of(query, query.shape).zero_()
    grad_key_acc = torch.zeros(key.shape, dtype=work, device=key.device)
    grad_value_acc = torch.zeros(value.shape, dtype=work, device=value.device)
    grad_buffer_acc = [torch.zeros(buffers[i].shape, dtype=_working_dtype(buffers[i].dtype),
                                   device=buffers[i].device) for i in grad_positions]

    if key.shape[2] > 0 and query.shape[2] > 0:
        # The backward keeps about twice as many score-sized tiles alive as the forward.
        problem = _Problem(query, key, value, score_mod, block_mask, scale, buffers,
                           mask_mod_other_buffers, chunk_size, DEFAULT_SCORE_ELEMENTS_PER_CHUNK // 2)
        stacking = problem.stacking
        for start, stop in problem.chunks():
            chunk = stop - start
            q_idx = torch.arange(start, stop, device=query.device)
            tile = problem.tile(start, stop, q_idx)
            if tile is None:
                continue  # nothing kept: zero gradients, as initialised
            key_tile, value_tile = tile.gather(problem.key), tile.gather(problem.value)
            scaled_q_rows, raw = problem.raw_scores(query[:, :, start:stop], key_tile)
            raw_grid = stacking.to_grid(raw, chunk)
            wanted_buffers = [buffers[i].detach() for i in grad_positions]
            grad_out_rows = stacking.to_rows(grad_out[:, :, start:stop]).to(work)
            # rowsum(p * dP) = rowsum(dO * (p @ V)) = rowsum(dO * out): the forward's output
            # (in float16/bfloat16 rounded to that dtype, as a fused kernel, which keeps only
            # that output, must read it too), not a [rows, N] product.
            out_rows = stacking.to_rows(out[:, :, start:stop]).to(work)
            row_dot = (grad_out_rows * out_rows).sum(-1, keepdim=True)
            del out_rows
            if grad_logsumexp is not None:
                lse_rows = stacking.to_rows(grad_logsumexp[:, :, start:stop].unsqueeze(-1))
                row_dot = row_dot - lse_rows.to(work)
            grad_raw = None
            lse_rows = None
            if reads_lse:
                lse_rows = stacking.to_rows(logsumexp[:, :, start:stop].unsqueeze(-1))
            if fused_tiles is not None and not problem.identity_score:
                grad_probs = torch.matmul(grad_out_rows, value_tile.transpose(-1, -2))
                parts = fused_tiles.backward(
                    raw_grid, problem.batch_idx, problem.head_idx, q_idx, tile.kv_idx, buffers,
                    grad_positions, wanted_buffers, tile.kernel_mask(raw.shape[-1], work),
                    stacking.to_grid(lse_rows, chunk), stacking.to_grid(grad_probs, chunk),
                    stacking.to_grid(row_dot, chunk), problem.operand_dtype)
                del grad_probs
                # Non-finite buffer gradients: the plain path sums over kept positions alone.
                if parts is not None and all(bool(torch.isfinite(g).all()) for g in parts[2]):
                    probs, grad_raw_grid, grad_wanted_buffers = parts
                    tile.add_product(grad_value_acc, stacking.to_rows(probs).transpose(-1, -2),
                                     grad_out_rows)
                    del probs, parts
                    grad_raw = stacking.to_rows(grad_raw_grid)
            if grad_raw is None:
                grad_raw, grad_wanted_buffers = _plain_backward_tile(
                    problem, tile, chunk, q_idx, raw_grid, buffers, grad_positions,
                    wanted_buffers, grad_out_rows, value_tile, row_dot, grad_value_acc, lse_rows)
            del raw, raw_grid
            for acc, grad in zip(grad_buffer_acc, grad_wanted_buffers):
                acc += grad
            grad_query[:, :, start:stop] = stacking.to_grid(
                torch.matmul(grad_raw, key_tile).mul_(problem.scale), chunk).to(query.dtype)
            tile.add_product(grad_key_acc, grad_raw.transpose(-1, -2), scaled_q_rows)

    def in_layout_of(like: Tensor, accumulated: Tensor) -> Tensor:
        return empty_in_layout_of(like, like.shape).copy_(accumulated)

    grad_buffers = [None] * len(buffers)
    for position, acc in zip(grad_positions, grad_buffer_acc):
        grad_buffers[position] = in_layout_of(buffers[position], acc)
    return (grad_query, in_layout_of(key, grad_key_acc), in_layout_of(value, grad_value_acc),
            tuple(grad_buffers))
