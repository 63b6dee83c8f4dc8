"""Block lists of packed documents given as cumulative offsets (``cu_seqlens``), on the
device and without reading a value back to the host. One construction serves both entry
points: ``create_document_block_mask`` (masks/document.py: one offsets tensor per batch
entry, Q and KV sharing it, causal or not) and ``varlen_attn`` (varlen.py: separate query
and key offsets, a window around each document's bottom-right diagonal, ``seqused_k``).

Per row (a query for the ``kv_*`` lists, a key for the transposed ``q_*`` lists) the
visible columns are one range; over a row block, their union is contained in one range and
their intersection, when the block lies in one document, is the run of full column blocks
(``_block_runs``). Partial blocks are the rest of the union's blocks; a few of them may see
nothing (between two documents' windows), which costs time, never accuracy.

Every shape depends only on the token counts and block sizes, so the construction is a
fixed sequence of tensor ops. Work and temporaries: O(documents + row blocks) for the runs
(a binary search per row block), nothing per token; the index lists are written by one
gather each (whole rows where the device's values cannot be read, else only the used
prefix into lazily zeroed memory). ``packed_layout`` gives the per-token tables the
callers' mask_mods read.
"""
import math
import mmap
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["PackedLayout", "Packing", "cu_seq_block_lists", "packed_block_lists", "packed_layout"]


class PackedLayout(NamedTuple):
    """Per token of one packed sequence (queries or keys), int32 ``[tokens]``; positions
    are in that same sequence."""

    doc: Tensor  # document of each token
    start: Tensor  # first position of the token's document (same side)
    end: Tensor  # one past the last *visible* position of the token's document


def packed_layout(offsets: Tensor, length: int, used: Optional[Tensor] = None) -> PackedLayout:
    """Document, start and visible end of each of ``length`` packed tokens described by the
    integer offsets ``offsets`` (``[docs + 1]``, non-decreasing, ``offsets[0] == 0``).
    ``used[d]`` (optional) limits document ``d`` to its first ``used[d]`` tokens: the end
    is ``start + used[d]``. Empty documents own no token."""
    offsets = offsets.to(torch.int32)
    positions = torch.arange(length, dtype=torch.int32, device=offsets.device)
    doc = torch.searchsorted(offsets, positions, right=True, out_int32=True) - 1
    # Trusted offsets (total_length=, never read back) may end before ``length``: the tokens
    # past the end then belong to the last document rather than indexing past the offsets.
    doc = doc.clamp(max=offsets.numel() - 2)  # out of place: Inductor decompositions run this
    start = offsets[doc]
    end = offsets[doc + 1] if used is None else start + used.to(torch.int32)[doc]
    return PackedLayout(doc, start, end)


class Packing(NamedTuple):
    """One packing's documents: query and key offsets (``[docs + 1]`` each) and the number
    of used keys per document (or None: all)."""

    q_offsets: Tensor
    kv_offsets: Tensor
    used_k: Optional[Tensor] = None


class _BlockRuns(NamedTuple):
    """Per row block, its listed column blocks as runs: partial blocks are
    ``[first, first + n_left)`` then ``[first + n_left + n_full, first + n_partial + n_full)``;
    full blocks are ``[full_first, full_first + n_full)``. ``max_left`` bounds ``n_left``
    from the block sizes alone."""

    first: Tensor
    n_left: Tensor
    n_partial: Tensor
    n_full: Tensor
    full_first: Tensor
    max_left: int


def _block_runs(row_offsets: Tensor, row_end: Tensor, col_start: Tensor, col_end: Tensor,
                n_rows: int, n_cols: int, row_block: int, col_block: int, below: int, above: int,
                allow_full: bool) -> _BlockRuns:
    """Runs of every row block of one side. Per document ``d``: its rows start at
    ``row_offsets[d]``, the visible ones end at ``row_end[d]``, its visible columns are
    ``[col_start[d], col_end[d])``; row ``r`` sees them cut to
    ``[diag - below, diag + above]`` (negative: no cut), ``diag = r - row_end + col_end``.

    Along the rows the bounds ``lo(r) <= hi(r)`` of the rows that see anything never
    decrease (within a document both follow the diagonal; documents follow each other on
    both sides), and those rows form one range per document. So a row block's union is
    ``[lo(first seeing row), hi(last seeing row)]``, and its intersection (nonempty only
    when every row sees something, all in one document) ``[lo(last row), hi(first row)]``:
    per document and per row block arithmetic, no per-token work."""
    device = row_offsets.device
    row_start = row_offsets[:-1].to(torch.int64)
    row_end, col_start, col_end = (t.to(torch.int64) for t in (row_end, col_start, col_end))
    shift = col_end - row_end  # diag(r) = r + shift
    # Rows that see something: [seeing_start, row_end), once the diagonal's upper cut
    # reaches the document's first column.
    seeing_start = row_start if above < 0 else torch.maximum(row_start, col_start - above - shift)
    seeing = (col_end > col_start) & (seeing_start < row_end)
    # Monotone stand-ins over the documents that see something: the first one ending after
    # a row, the last one starting at or before it.
    end_so_far = torch.cummax(torch.where(seeing, row_end, 0), 0).values
    start_from_here = torch.cummin(torch.where(seeing, seeing_start, n_rows).flip(0), 0).values.flip(0)
    n_docs = row_end.numel()

    def lo(r: Tensor, d: Tensor) -> Tensor:
        return col_start[d] if below < 0 else torch.maximum(col_start[d], r + shift[d] - below)

    def hi(r: Tensor, d: Tensor) -> Tensor:
        return col_end[d] - 1 if above < 0 else torch.minimum(col_end[d] - 1, r + shift[d] + above)

    block_first = torch.arange(0, n_rows, row_block, dtype=torch.int64, device=device)
    block_last = (block_first + row_block).clamp(max=n_rows) - 1
    first_doc = torch.searchsorted(end_so_far, block_first, right=True).clamp(max=n_docs - 1)
    last_doc = (torch.searchsorted(start_from_here, block_last, right=True) - 1).clamp(min=0)
    first_row = torch.maximum(block_first, seeing_start[first_doc])
    last_row = torch.minimum(block_last, row_end[last_doc] - 1)
    has_rows = (end_so_far[first_doc] > block_first) & (first_row <= block_last)
    first = torch.where(has_rows, lo(first_row, first_doc) // col_block, 0)
    n_visible = torch.where(has_rows, hi(last_row, last_doc) // col_block - first + 1, 0).clamp(min=0)
    if not allow_full:
        zeros = torch.zeros_like(first)
        return _BlockRuns(first, zeros, n_visible, zeros, zeros, 0)
    one_document = has_rows & (first_row == block_first) & (last_row == block_last) & (first_doc == last_doc)
    # A column block is full when all its existing columns lie inside the intersection.
    common_lo, common_hi = lo(block_last, first_doc), hi(block_first, first_doc)
    full_first = -(-common_lo // col_block)
    n_col_blocks = -(-n_cols // col_block)
    full_last = torch.where(common_hi >= n_cols - 1, n_col_blocks - 1, (common_hi + 1) // col_block - 1)
    n_full = torch.where(one_document, full_last - full_first + 1, 0).clamp(min=0)
    has_full = n_full > 0
    n_left = torch.where(has_full, full_first - first, 0)
    # The union starts at lo(block_first), the full run at ceil(lo(block_last) / col_block);
    # lo rises by at most row_block - 1 over the block, and not at all without a lower cut.
    max_left = 1 if below < 0 else -(-(row_block + col_block - 2) // col_block)
    return _BlockRuns(first, n_left, n_visible - n_full, n_full, torch.where(has_full, full_first, 0),
                      max_left)


# A million tokens give [8192, 8192] index lists, 1 GiB for the four of them, of which a
# packed-document mask uses only a short prefix per row. On the CPU, a fresh anonymous
# mapping reads as zeros (valid block indices) and costs nothing until a page is written,
# so large lists come from one and only the used prefix is written: page faults on the
# whole gigabyte would otherwise dominate the construction time. Where values cannot be
# read on the host without waiting (other devices) or at all (tracing), the width of the
# used prefix is not read: whole rows are built, by one gather per list, out of place (a
# decomposition inside Inductor must not mutate).
_LAZY_ZEROS_MIN_BYTES = 16 << 20


def _writes_whole_rows(offsets: Tensor) -> bool:
    # A subclass (fake, functional) holds no values to read either.
    return offsets.device.type != "cpu" or torch.compiler.is_compiling() or type(offsets) is not Tensor


def _lazy_zeros(shape: Tuple[int, ...]) -> Tensor:
    """int32 CPU zeros, from an anonymous mapping where large (pages cost only when written)."""
    nbytes = math.prod(shape) * 4
    if nbytes >= _LAZY_ZEROS_MIN_BYTES and hasattr(mmap, "MAP_ANONYMOUS"):
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(buffer, dtype=torch.int32).view(shape)
    return torch.zeros(shape, dtype=torch.int32)


def _run_rows(base: Tensor, width: int, n_cols: int, fix_start: Optional[Tensor] = None,
              fix_count: Optional[Tensor] = None, max_fix: int = 0) -> Tensor:
    """int32 ``[rows, width]``: slot c of row r is ``base[r] + c`` (capped at n_cols - 1),
    except the first ``fix_count[r]`` slots (at most ``max_fix``), ``fix_start[r] + c``."""
    if type(base) is Tensor and not torch.compiler.is_compiling():
        return _run_rows_by_lookup(base, width, n_cols, fix_start, fix_count, max_fix)
    # Traced (compiled graphs, Inductor decompositions): arithmetic on the slot numbers,
    # functional, which Inductor fuses into one kernel. Views of a ramp (the eager form)
    # would specialise the graph on the token count through unfold's traced width.
    slots = torch.arange(width, dtype=torch.int32, device=base.device)
    base = base.clamp(0, n_cols).to(torch.int32)[:, None]
    if fix_count is None:
        rows = base + slots
    else:
        # fix_start[r] + c + (base[r] - fix_start[r]) * [c >= fix_count[r]]
        fix_start = fix_start.to(torch.int32)[:, None]
        step = ((slots + 1) - fix_count.to(torch.int32)[:, None]).clamp(0, 1)
        rows = step * (base - fix_start) + fix_start + slots
    return rows.clamp(max=n_cols - 1)


def _run_rows_by_lookup(base: Tensor, width: int, n_cols: int, fix_start: Optional[Tensor],
                        fix_count: Optional[Tensor], max_fix: int) -> Tensor:
    """``_run_rows`` eagerly: each row is one window of a capped ramp, so the result is
    written once (at a million tokens each list is 256 MiB; an elementwise chain passes
    over it five times) and no temporary of its size exists. Only the first ``max_fix``
    slots are patched afterwards."""
    n_rows = base.shape[0]
    if width == 0 or n_cols == 0:
        return torch.zeros(n_rows, width, dtype=torch.int32, device=base.device)
    ramp = torch.arange(n_cols + width, dtype=torch.int32, device=base.device).clamp_(max=n_cols - 1)
    windows = ramp.unfold(0, width, 1)  # [n_cols + 1, width]: row s is s, s + 1, ... capped
    rows = windows[base.clamp(0, n_cols).long()]
    head_width = min(max_fix, width) if fix_count is not None else 0
    if head_width:
        head = rows[:, :head_width]
        fixed = windows[:, :head_width][fix_start.clamp(0, n_cols).long()]
        slots = torch.arange(head_width, device=base.device)
        head.copy_(torch.where(slots < fix_count[:, None], fixed, head))
    return rows


def _stack(tensors: List[Tensor]) -> Tensor:
    """``[len, 1, ...]``; one tensor is only viewed, not copied."""
    return tensors[0][None, None] if len(tensors) == 1 else torch.stack(tensors)[:, None]


def _side_lists(all_runs: List[_BlockRuns], n_cols: int, whole_rows: bool, allow_full: bool) -> List[Optional[Tensor]]:
    """num_blocks, indices, full_num_blocks, full_indices (``[packings, 1, ...]``; the full
    pair None unless ``allow_full``) of one side, from each packing's runs."""
    def partial_rows(runs: _BlockRuns, width: int) -> Tensor:
        return _run_rows(runs.first + runs.n_full, width, n_cols, runs.first, runs.n_left, runs.max_left)

    def full_rows(runs: _BlockRuns, width: int) -> Tensor:
        return _run_rows(runs.full_first, width, n_cols)

    def lists(counts: List[Tensor], rows_of) -> List[Tensor]:
        num_blocks = _stack([count.to(torch.int32) for count in counts])
        if whole_rows:
            return [num_blocks, _stack([rows_of(runs, n_cols) for runs in all_runs])]
        indices = _lazy_zeros((len(counts), 1, counts[0].numel(), n_cols))
        for index, (runs, count) in enumerate(zip(all_runs, counts)):
            width = int(count.max()) if count.numel() else 0
            if width:
                indices[index, 0, :, :width] = rows_of(runs, width)
        return [num_blocks, indices]

    partial = lists([runs.n_partial for runs in all_runs], partial_rows)
    if not allow_full:
        return partial + [None, None]
    return partial + lists([runs.n_full for runs in all_runs], full_rows)


def packed_block_lists(packings: Sequence[Packing], q_len: int, kv_len: int,
                       window: Tuple[int, int] = (-1, -1), block_size: Tuple[int, int] = (128, 128),
                       allow_full: bool = True, transposed: bool = True) -> Tuple[Optional[Tensor], ...]:
    """The eight block lists (docs/internals.md order: kv_num_blocks, kv_indices,
    full_kv_*, q_num_blocks, q_indices, full_q_*), each ``[len(packings), 1, ...]``, of
    packed documents: packing ``p`` is batch entry ``p``.

    Query ``i`` of a document (0-based, ``Lq`` queries, ``Lk`` keys, ``Lk`` cut to
    ``used_k[d]`` when given) sees its document's keys ``j`` with
    ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (a negative bound: no limit), so
    ``(-1, 0)`` is causal aligned at the bottom right (``q >= kv`` when Q and KV share the
    offsets). ``allow_full=False`` lists every visible block as partial (the caller's
    mask_mod must then run everywhere): the full lists are None. ``transposed=False``
    leaves the four ``q_*`` lists None (a forward-only caller).
    """
    left, right = window
    q_block, kv_block = block_size
    kv_runs, q_runs = [], []
    for packing in packings:
        q_offsets, kv_offsets = packing.q_offsets, packing.kv_offsets
        kv_end = kv_offsets[1:] if packing.used_k is None else kv_offsets[:-1] + packing.used_k
        kv_runs.append(_block_runs(q_offsets, q_offsets[1:], kv_offsets[:-1], kv_end, q_len, kv_len,
                                   q_block, kv_block, left, right, allow_full))
        if transposed:
            # Key rows, query columns, the window mirrored.
            q_runs.append(_block_runs(kv_offsets, kv_end, q_offsets[:-1], q_offsets[1:], kv_len, q_len,
                                      kv_block, q_block, right, left, allow_full))
    whole_rows = _writes_whole_rows(packings[0].q_offsets)
    n_q, n_kv = -(-q_len // q_block), -(-kv_len // kv_block)
    kv_lists = _side_lists(kv_runs, n_kv, whole_rows, allow_full)
    if not transposed:
        return tuple(kv_lists) + (None,) * 4
    return tuple(kv_lists + _side_lists(q_runs, n_q, whole_rows, allow_full))


def cu_seq_block_lists(cu_seq_q: Tensor, cu_seq_k: Tensor, q_len: int, kv_len: int,
                       window: Tuple[int, int] = (-1, -1), used_k: Optional[Tensor] = None,
                       block_size: Tuple[int, int] = (128, 128), allow_full: bool = True,
                       transposed: bool = True) -> Tuple[Optional[Tensor], ...]:
    """``packed_block_lists`` of one packing (lists ``[1, 1, ...]``): varlen's form."""
    return packed_block_lists([Packing(cu_seq_q, cu_seq_k, used_k)], q_len, kv_len, window, block_size,
                              allow_full, transposed)
