"""Block lists of packed documents given as cumulative offsets (``cu_seqlens``), on the
device and without reading a value back to the host: what ``varlen_attn`` builds on every
call, also under ``torch.compile``.

Unlike ``document.create_document_block_mask`` (one packing, Q and KV sharing the
offsets, host-side checks), this takes separate query and key offsets, a
``(left, right)`` window around the bottom-right diagonal of each document (FlashAttention's
varlen convention) and an optional number of used keys per document, and every shape
depends only on the token counts and block sizes, so the whole construction is a fixed
sequence of tensor ops. Work: O(tokens) for per-token bounds, O(row blocks x column
blocks) for the index lists (that many entries exist anyway).

Per row token ``r`` of document ``d`` (rows are queries for the ``kv_*`` lists, keys for
the transposed ``q_*`` lists) the visible columns are one range ``[lo(r), hi(r)]``; over
the rows of a row block, their union is contained in ``[min lo, max hi]`` (documents
follow each other in both sequences) and a column block inside ``[max lo, min hi]`` is
seen by every row, i.e. full. Partial blocks are the rest of the union's blocks; a few of
them may see nothing (between two documents' windows), which costs time, never accuracy.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CuSeqLayout", "cu_seq_block_lists", "cu_seq_layout"]


class CuSeqLayout(NamedTuple):
    """Per token of one packed sequence (queries or keys), int32 ``[tokens]``; positions
    are in that same sequence."""

    doc: Tensor  # document of each token
    start: Tensor  # first position of the token's document (same side)
    end: Tensor  # one past the last *visible* position of the token's document


def cu_seq_layout(cu_seq: Tensor, length: int, used: Optional[Tensor] = None) -> CuSeqLayout:
    """Document, start and visible end of each of ``length`` packed tokens described by the
    int32 offsets ``cu_seq`` (``[docs + 1]``). ``used[d]`` (optional) limits document
    ``d`` to its first ``used[d]`` tokens: the end is ``start + used[d]``."""
    positions = torch.arange(length, dtype=cu_seq.dtype, device=cu_seq.device)
    doc = torch.searchsorted(cu_seq, positions, right=True, out_int32=True) - 1
    start = cu_seq[doc]
    end = cu_seq[doc + 1] if used is None else start + used.to(cu_seq.dtype)[doc]
    return CuSeqLayout(doc, start, end)


def _visible_bounds(row: CuSeqLayout, col_start_of_doc: Tensor, col_end_of_doc: Tensor,
                    below: int, above: int) -> Tuple[Tensor, Tensor]:
    """Per row token, its visible columns ``[lo, hi]`` (empty when lo > hi): its document's
    columns, cut to ``[diag - below, diag + above]`` around the bottom-right diagonal
    (a negative bound is no cut)."""
    rows = torch.arange(row.doc.numel(), dtype=row.doc.dtype, device=row.doc.device)
    col_start, col_end = col_start_of_doc[row.doc], col_end_of_doc[row.doc]
    diagonal = rows - row.end + col_end
    lo = col_start if below < 0 else torch.maximum(col_start, diagonal - below)
    hi = col_end - 1 if above < 0 else torch.minimum(col_end - 1, diagonal + above)
    # A row past its document's visible end (used < length) sees nothing.
    hi = torch.where(rows < row.end, hi, lo - 1)
    return lo, hi


def _per_block(values: Tensor, block: int, pad: int, reduce) -> Tensor:
    blocks = -(-values.numel() // block)
    padded = F.pad(values, (0, blocks * block - values.numel()), value=pad)
    return reduce(padded.view(blocks, block), dim=1)


def _lists(lo: Tensor, hi: Tensor, n_cols: int, row_block: int, col_block: int,
           allow_full: bool) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(num_blocks, indices, full_num_blocks, full_indices) from per-row bounds, each with
    leading ``[1, 1]`` dims; full ones None when ``allow_full`` is False."""
    n_col_blocks = -(-n_cols // col_block)
    empty = lo > hi
    # Union over the block's non-empty rows; padding rows are empty.
    union_lo = _per_block(torch.where(empty, n_cols, lo), row_block, n_cols, torch.amin)
    union_hi = _per_block(torch.where(empty, -1, hi), row_block, -1, torch.amax)
    first = union_lo // col_block
    n_visible = (union_hi // col_block - first + 1).clamp(min=0)
    slots = torch.arange(n_col_blocks, dtype=lo.dtype, device=lo.device)
    if allow_full:
        # Intersection over the block's rows (an empty row empties it); padding rows are
        # neutral. A column block is full when all its existing columns lie inside.
        common_lo = _per_block(lo, row_block, 0, torch.amax)
        common_hi = _per_block(hi, row_block, n_cols, torch.amin)
        full_first = (common_lo + col_block - 1) // col_block
        full_last = torch.where(common_hi >= n_cols - 1, n_col_blocks - 1,
                                (common_hi + 1) // col_block - 1)
        n_full = (full_last - full_first + 1).clamp(min=0)
        n_before = torch.where(n_full > 0, full_first - first, n_visible)
    else:
        n_full = torch.zeros_like(first)
        n_before = n_visible
    # Partial blocks: those before the full run, then those after it.
    partial = torch.where(slots < n_before[:, None], first[:, None] + slots,
                          first[:, None] + n_full[:, None] + slots)

    def listed(counts: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
        return (counts.to(torch.int32)[None, None],
                indices.clamp(0, n_col_blocks - 1).to(torch.int32)[None, None])

    num_blocks, indices = listed(n_visible - n_full, partial)
    if not allow_full:
        return num_blocks, indices, None, None
    return (num_blocks, indices) + listed(n_full, full_first[:, None] + slots)


def cu_seq_block_lists(cu_seq_q: Tensor, cu_seq_k: Tensor, q_len: int, kv_len: int,
                       window: Tuple[int, int] = (-1, -1), used_k: Optional[Tensor] = None,
                       block_size: Tuple[int, int] = (128, 128), allow_full: bool = True,
                       q_layout: Optional[CuSeqLayout] = None,
                       kv_layout: Optional[CuSeqLayout] = None,
                       transposed: bool = True) -> Tuple[Optional[Tensor], ...]:
    """The eight block lists (docs/internals.md order: kv_num_blocks, kv_indices,
    full_kv_*, q_num_blocks, q_indices, full_q_*) of packed documents.

    Query ``i`` of a document (0-based, ``Lq`` queries, ``Lk`` keys, ``Lk`` cut to
    ``used_k[d]`` when given) sees its document's keys ``j`` with
    ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (a negative bound: no limit), so
    ``(-1, 0)`` is causal aligned at the bottom right. ``allow_full=False`` lists every
    visible block as partial (the caller's mask_mod must then run everywhere). The
    layouts may be passed when the caller already has them (``cu_seq_layout``).
    ``transposed=False`` leaves the four ``q_*`` lists None (a forward-only caller).
    """
    left, right = window
    q_block, kv_block = block_size
    if q_layout is None:
        q_layout = cu_seq_layout(cu_seq_q, q_len)
    kv_end_of_doc = cu_seq_k[1:] if used_k is None else cu_seq_k[:-1] + used_k.to(cu_seq_k.dtype)
    lo, hi = _visible_bounds(q_layout, cu_seq_k[:-1], kv_end_of_doc, left, right)
    kv_lists = _lists(lo, hi, kv_len, q_block, kv_block, allow_full)
    if not transposed:
        return kv_lists + (None,) * 4
    if kv_layout is None:
        kv_layout = cu_seq_layout(cu_seq_k, kv_len, used_k)
    # The transposed relation: key rows, query columns, the window mirrored.
    lo, hi = _visible_bounds(kv_layout, cu_seq_q[:-1], cu_seq_q[1:], right, left)
    q_lists = _lists(lo, hi, q_len, kv_block, q_block, allow_full)
    return kv_lists + q_lists
