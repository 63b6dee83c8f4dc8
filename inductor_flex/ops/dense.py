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

Query rows are processed in chunks, so the extra memory is O(chunk x KV_LEN), never the
whole score matrix. A row that keeps nothing gets out 0, lse -inf, max_scores -inf, and
zero gradients.

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
from .._mods import mask_mod_grid, score_mod_at, score_mod_grid
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
        self.scale = float(scale)
        self.score_mod = score_mod
        self.score_mod_buffers = tuple(score_mod_buffers)
        self.mask_mod_buffers = tuple(mask_mod_buffers)
        mask = OperatorBlockMask(*block_mask)
        self.kv_num_blocks, self.kv_indices = mask.kv_num_blocks, mask.kv_indices
        self.full_kv_num_blocks, self.full_kv_indices = mask.full_kv_num_blocks, mask.full_kv_indices
        self.q_block_size, self.kv_block_size = mask.q_block_size, mask.kv_block_size
        self.mask_mod = mask.mask_mod
        self.q_len, self.kv_len = q_len, kv_len
        self.batch_idx = torch.arange(batch, device=self.device)
        self.head_idx = torch.arange(q_heads, device=self.device)
        self.kv_idx = torch.arange(kv_len, device=self.device)
        # KV block of every kv position, and the number of KV blocks.
        self.kv_block_of = self.kv_idx // self.kv_block_size
        self.num_kv_blocks = -(-kv_len // self.kv_block_size)
        if chunk_size is None:
            chunk_size = default_chunk_rows(batch, q_heads, q_len, kv_len, self.q_block_size, budget)
        self.chunk_size = max(1, int(chunk_size))

    def chunks(self):
        for start in range(0, self.q_len, self.chunk_size):
            yield start, min(start + self.chunk_size, self.q_len)

    def _block_marks(self, num_blocks: Tensor, indices: Tensor, first_qb: int, end_qb: int) -> Tensor:
        """bool ``[Bm, Hm, end_qb - first_qb, num_kv_blocks]``: which KV blocks each query block lists."""
        return listed_to_dense(num_blocks[..., first_qb:end_qb], indices[..., first_qb:end_qb, :],
                               self.num_kv_blocks)

    def keep_mask(self, start: int, stop: int, q_idx: Tensor) -> Tensor:
        """bool ``[B, Hq, stop - start, N]`` (maybe broadcast): which scores of the chunk are kept."""
        first_qb = start // self.q_block_size
        end_qb = (stop - 1) // self.q_block_size + 1
        q_block_of = q_idx // self.q_block_size - first_qb

        def expand(marks: Tensor) -> Tensor:
            return marks.index_select(-2, q_block_of).index_select(-1, self.kv_block_of)

        partial = expand(self._block_marks(self.kv_num_blocks, self.kv_indices, first_qb, end_qb))
        allowed = mask_mod_grid(self.mask_mod, self.batch_idx, self.head_idx, q_idx, self.kv_idx,
                                self.mask_mod_buffers)
        keep = partial & allowed
        if self.full_kv_num_blocks is not None:
            keep |= expand(self._block_marks(self.full_kv_num_blocks, self.full_kv_indices,
                                             first_qb, end_qb))
        return keep

    def raw_scores(self, q_chunk: Tensor) -> Tuple[Tensor, Tensor]:
        """``scale * Q K^T`` for a query chunk, as (stacked query rows, stacked scores)."""
        q_rows = self.stacking.to_rows(q_chunk).to(self.dtype)
        scores = torch.matmul(q_rows, self.key.transpose(-1, -2))
        scores.mul_(self.scale)
        return q_rows, scores

    def modify(self, raw_grid: Tensor, q_idx: Tensor, score_mod_buffers: Sequence[Tensor]) -> Tensor:
        modified = score_mod_grid(self.score_mod, raw_grid, self.batch_idx, self.head_idx, q_idx,
                                  self.kv_idx, score_mod_buffers)
        # A mod mixing in a float64 tensor (or an int result) would promote; scores stay in
        # the working dtype.
        return modified.to(self.dtype)

    def softmax_parts(self, modified_grid: Tensor, keep: Tensor, chunk: int):
        """Masked softmax pieces in stacked-rows layout.

        Returns ``(unnormalized, denominator, row_max, lse)``: ``exp(kept - row_max)`` (0 where
        dropped), its row sum, the row max of kept scores and the natural-log lse; the last
        three keep a trailing dim of 1. Rows that keep nothing have row_max = lse = -inf,
        denominator 0 and all-zero unnormalized weights.
        """
        stacked_shape = self.stacking.to_rows(modified_grid[..., :1]).shape[:-1] + (self.kv_len,)
        masked = torch.empty(stacked_shape, dtype=self.dtype, device=self.device)
        neg_inf = torch.full((), -math.inf, dtype=self.dtype, device=self.device)
        # Written through the grid view, so the result lands in stacked order without a copy.
        torch.where(keep, modified_grid, neg_inf, out=self.stacking.to_grid(masked, chunk))
        row_max = masked.amax(dim=-1, keepdim=True)
        # Shift by 0 on empty rows so exp(-inf - -inf) never happens.
        shift = torch.where(row_max == -math.inf, torch.zeros_like(row_max), row_max)
        unnormalized = masked.sub_(shift).exp_()
        denominator = unnormalized.sum(dim=-1, keepdim=True)
        lse = denominator.log().add_(shift)  # log(0) = -inf on empty rows
        return unnormalized, denominator, row_max, lse

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
                                    wanted_buffers: Sequence[Tensor], q_idx: Tensor) -> list:
    """Captured-buffer gradients from the kept positions alone: the score_mod runs only
    where the mask keeps a score, so values it takes where the mask drops one (a log of a
    negative distance, say) cannot reach the sums. Taken only when the grid-wide vjp gave a
    non-finite buffer gradient: it costs index lists of the kept positions."""
    b, h, q, kv = keep.nonzero(as_tuple=True)
    indices = (problem.batch_idx[b], problem.head_idx[h], q_idx[q], problem.kv_idx[kv])

    def modify_kept(scores, *wanted):
        merged = _with_wanted(buffers, grad_positions, wanted)
        return score_mod_at(problem.score_mod, scores, *indices, merged).to(problem.dtype)

    _, vjp = torch.func.vjp(modify_kept, raw_grid[b, h, q, kv], *wanted_buffers)
    _, *grads = vjp(grad_scores_grid[b, h, q, kv])
    return grads


def _nonzero_denominator(denominator: Tensor) -> Tensor:
    return torch.where(denominator == 0, torch.ones_like(denominator), denominator)


@torch.no_grad()
def dense_attention(query: Tensor, key: Tensor, value: Tensor, score_mod: Callable,
                    block_mask: tuple, scale: float,
                    score_mod_other_buffers: Sequence[Tensor] = (),
                    mask_mod_other_buffers: Sequence[Tensor] = (), *,
                    chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact forward of the attention operator.

    Arguments follow the operator (docs/internals.md), without kernel_options: ``block_mask``
    is the block mask tuple. ``chunk_size`` overrides the number of query rows processed at
    once (default: see ``default_chunk_rows``); the result does not depend on it.

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
    for start, stop in problem.chunks():
        chunk = stop - start
        q_idx = torch.arange(start, stop, device=query.device)
        _, raw = problem.raw_scores(query[:, :, start:stop])
        modified = problem.modify(stacking.to_grid(raw, chunk), q_idx, problem.score_mod_buffers)
        keep = problem.keep_mask(start, stop, q_idx)
        unnormalized, denominator, row_max, chunk_lse = problem.softmax_parts(modified, keep, chunk)
        del raw, modified, keep
        if problem.operand_dtype is None:
            chunk_out = torch.matmul(unnormalized, problem.value).div_(_nonzero_denominator(denominator))
        else:
            # The normalised probabilities are what gets rounded (the eager recipe), so
            # normalise before the product.
            probs = unnormalized.div_(_nonzero_denominator(denominator))
            chunk_out = torch.matmul(_round_in_place(probs, problem.operand_dtype), problem.value)
        out[:, :, start:stop] = stacking.to_grid(chunk_out, chunk)
        lse[:, :, start:stop] = problem.rows_to_stat(chunk_lse, chunk)
        max_scores[:, :, start:stop] = problem.rows_to_stat(row_max, chunk)
    return out, lse, max_scores


def _wants_grad(buffer) -> bool:
    return isinstance(buffer, Tensor) and buffer.is_floating_point() and buffer.requires_grad


@torch.no_grad()
def dense_attention_backward(query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                             logsumexp: Tensor, grad_out: Tensor, grad_logsumexp: Optional[Tensor],
                             score_mod: Callable, block_mask: tuple, scale: float,
                             score_mod_other_buffers: Sequence[Tensor] = (),
                             mask_mod_other_buffers: Sequence[Tensor] = (), *,
                             chunk_size: Optional[int] = None,
                             buffers_requiring_grad: Optional[Sequence[bool]] = None):
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
    rowsum(dO * out) reads ``out`` (the forward's result, in the input dtype) for float16 /
    bfloat16 inputs and recomputes it otherwise. ``logsumexp`` is accepted to match the
    operator's signature. The softmax and matmul gradients are
    written out; the score_mod's own gradient (with respect to its score and its buffers)
    comes from ``torch.func.vjp``, which works whatever the surrounding grad mode or
    dispatch state.
    """
    del logsumexp
    buffers = tuple(score_mod_other_buffers)
    if buffers_requiring_grad is None:
        buffers_requiring_grad = [_wants_grad(b) for b in buffers]
    if len(buffers_requiring_grad) != len(buffers):
        raise ValueError(f"buffers_requiring_grad has {len(buffers_requiring_grad)} entries for "
                         f"{len(buffers)} score_mod buffers")
    grad_positions = [i for i, wanted in enumerate(buffers_requiring_grad) if wanted]

    work = _working_dtype(query.dtype)
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
            q_rows, raw = problem.raw_scores(query[:, :, start:stop])

            def modify(raw_grid, *wanted_buffers):
                return problem.modify(raw_grid, q_idx, _with_wanted(buffers, grad_positions, wanted_buffers))

            raw_grid = stacking.to_grid(raw, chunk)
            wanted_buffers = [buffers[i].detach() for i in grad_positions]
            modified, modify_vjp = torch.func.vjp(modify, raw_grid, *wanted_buffers)
            keep = problem.keep_mask(start, stop, q_idx)
            probs, denominator, _, _ = problem.softmax_parts(modified, keep, chunk)
            del modified
            probs.div_(_nonzero_denominator(denominator))

            grad_out_rows = stacking.to_rows(grad_out[:, :, start:stop]).to(work)
            # d loss / d probs, then through the softmax: p * (dP - rowsum(p * dP) + dlse).
            grad_scores = torch.matmul(grad_out_rows, problem.value.transpose(-1, -2))
            # rowsum(p * dP) = rowsum(dO * (p @ V)): a [rows, Ev] product instead of [rows, N].
            # In float16/bfloat16 p @ V is the output the forward returned, rounded to that
            # dtype, as a fused kernel (which keeps only that output) must read it too.
            if problem.operand_dtype is None:
                out_rows = torch.matmul(probs, problem.value)
            else:
                out_rows = stacking.to_rows(out[:, :, start:stop]).to(work)
            row_dot = (grad_out_rows * out_rows).sum(-1, keepdim=True)
            del out_rows
            if grad_logsumexp is not None:
                lse_rows = stacking.to_rows(grad_logsumexp[:, :, start:stop].unsqueeze(-1))
                row_dot = row_dot - lse_rows.to(work)
            grad_scores.sub_(row_dot).mul_(probs)
            # Stacked rows already hold the GQA group (and a folded batch): one matmul sums them.
            # probs is not needed unrounded any more.
            _round_in_place(probs, problem.operand_dtype)
            grad_value_acc += torch.matmul(probs.transpose(-1, -2), grad_out_rows)
            del probs

            grad_scores_grid = stacking.to_grid(grad_scores, chunk)
            grad_modified_input, *grad_wanted_buffers = modify_vjp(grad_scores_grid)
            # A dropped score contributes nothing, even where the score_mod (or its
            # derivative) is not finite there: 0 * NaN would otherwise leak into the sums.
            keep = keep.expand(grad_modified_input.shape)
            grad_modified_input = torch.where(keep, grad_modified_input, 0.0)
            if not all(bool(torch.isfinite(g).all()) for g in grad_wanted_buffers):
                grad_wanted_buffers = _buffer_grads_at_kept_positions(
                    problem, buffers, grad_positions, raw_grid, grad_scores_grid, keep,
                    wanted_buffers, q_idx)
            del grad_scores, grad_scores_grid, raw, raw_grid, keep
            for acc, grad in zip(grad_buffer_acc, grad_wanted_buffers):
                acc += grad
            # scores = scale * q_rows @ key^T; the scale goes on the small products.
            grad_raw = stacking.to_rows(grad_modified_input)
            if problem.operand_dtype is not None:
                # The vjp's result may be a view or broadcast: round through a half-size copy,
                # not in place, and let the full-size original go before widening again.
                grad_raw = grad_raw.to(problem.operand_dtype)
                del grad_modified_input
                grad_raw = grad_raw.to(work)
            grad_query[:, :, start:stop] = stacking.to_grid(
                torch.matmul(grad_raw, problem.key).mul_(problem.scale), chunk).to(query.dtype)
            grad_key_acc += torch.matmul(grad_raw.transpose(-1, -2), q_rows).mul_(problem.scale)

    def in_layout_of(like: Tensor, accumulated: Tensor) -> Tensor:
        return empty_in_layout_of(like, like.shape).copy_(accumulated)

    grad_buffers = [None] * len(buffers)
    for position, acc in zip(grad_positions, grad_buffer_acc):
        grad_buffers[position] = in_layout_of(buffers[position], acc)
    return (grad_query, in_layout_of(key, grad_key_acc), in_layout_of(value, grad_value_acc),
            tuple(grad_buffers))
