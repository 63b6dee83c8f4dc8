"""Block lists, the block mask's storage: per row of blocks, ``num_blocks`` counts the
first entries of ``indices`` that are listed (in increasing order); later entries are
ignored, whatever they hold. One implementation for BlockMask (block_mask.py) and the dense
reference's keep mask (ops/dense.py); ``OperatorBlockMask`` names the fields of the tuple
the operators take."""
from typing import Any, Callable, NamedTuple, Tuple

import torch
from torch import Tensor


def listed_to_dense(num_blocks: Tensor, indices: Tensor, num_cols: int) -> Tensor:
    """bool ``[..., rows, num_cols]``: True at the first ``num_blocks`` entries of each row of
    ``indices``. The entries past ``num_blocks`` are ignored, whatever they hold."""
    slot = torch.arange(indices.shape[-1], device=indices.device)
    listed = slot < num_blocks.unsqueeze(-1)
    # Unlisted slots write into a spare column that is cut off afterwards.
    target = torch.where(listed, indices.to(torch.int64), num_cols)
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, target, torch.ones_like(target, dtype=torch.bool))
    return dense[..., :num_cols]


def dense_to_listed(dense: Tensor) -> Tuple[Tensor, Tensor]:
    """(num_blocks int32 ``[..., rows]``, indices int32 ``[..., rows, cols]``) of a bool block
    matrix: each row lists its True columns in increasing order, then its False ones."""
    marked = dense.to(torch.int32)
    num_blocks = marked.sum(-1, dtype=torch.int32)
    # Stable partition by rank: the k-th True column goes to slot k, the k-th False one to
    # slot num_blocks + k. Linear time, unlike a sort.
    true_rank = marked.cumsum(-1) - 1
    false_rank = num_blocks.unsqueeze(-1).to(true_rank.dtype) + (1 - marked).cumsum(-1) - 1
    slot = torch.where(dense, true_rank, false_rank)
    columns = torch.arange(dense.shape[-1], dtype=torch.int32, device=dense.device).expand(dense.shape)
    # Out of place: this also runs inside Inductor decompositions (varlen's paged lists),
    # which must stay functional.
    indices = torch.empty(dense.shape, dtype=torch.int32, device=dense.device).scatter(-1, slot, columns)
    return num_blocks, indices


def dense_to_listed_by_search(dense: Tensor) -> Tuple[Tensor, Tensor]:
    """``dense_to_listed`` for compiled code: the same lists, each slot found by a binary
    search of the running counts (slot k holds the column where the count of True columns
    first reaches k + 1; past them, where the count of False ones reaches k + 1 - num_blocks).

    Under symbolic sizes on CUDA, Inductor 2.11 fails to generate the kernel of
    ``dense_to_listed``'s scatter (a tiled store into a buffer whose size is a ceil-division
    of a symbolic length). A stable sort served before, but Inductor's own sort of short
    rows is a bitonic network over (value, index) pairs that ptxas takes minutes to compile
    at 32 rows x 128 columns (measured for sm_90: 38-240 s per config); a scan and a search
    compile in seconds. O(cols log cols) per row, so the eager paths keep the partition."""
    marked = dense.to(torch.int32)
    listed_count = marked.cumsum(-1, dtype=torch.int32)
    unlisted_count = (1 - marked).cumsum(-1, dtype=torch.int32)
    num_blocks = marked.sum(-1, dtype=torch.int32)
    row_count = num_blocks.unsqueeze(-1)
    slot = torch.arange(dense.shape[-1], dtype=torch.int32, device=dense.device).expand(dense.shape)
    # Both searched values read the row's count, so they vary along rows and columns alike:
    # Inductor 2.11's search helper sizes its loop state by the values' tile, and a value
    # that is constant along rows (``slot + 1``) fails Triton's loop-carried type check
    # once the tile spans rows. Clamping to the count changes no slot that is used.
    listed = torch.searchsorted(listed_count, torch.minimum(slot + 1, row_count), out_int32=True)
    unlisted = torch.searchsorted(unlisted_count, slot + 1 - row_count, out_int32=True)
    indices = torch.where(slot < row_count, listed, unlisted)
    return num_blocks, indices


def transpose_listed(num_blocks: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    """The same relation listed from the other side (KV blocks -> query blocks, or back)."""
    dense = listed_to_dense(num_blocks, indices, indices.shape[-1])
    return dense_to_listed(dense.transpose(-2, -1))


class OperatorBlockMask(NamedTuple):
    """The block mask as the attention operators take it (docs/internals.md, "The block
    mask tuple"): lengths, the eight block lists, the sparse block sizes, the mask_mod.

    Operators receive and pass on a plain tuple (what tracing, pytree and FX carry); code
    that reads it wraps it, ``OperatorBlockMask(*block_mask)``, and reads fields by name."""
    q_len: Any
    kv_len: Any
    kv_num_blocks: Any
    kv_indices: Any
    full_kv_num_blocks: Any
    full_kv_indices: Any
    q_num_blocks: Any
    q_indices: Any
    full_q_num_blocks: Any
    full_q_indices: Any
    q_block_size: Any
    kv_block_size: Any
    mask_mod: Callable

    def with_mask_mod(self, mask_mod: Callable) -> tuple:
        """The plain operator tuple with ``mask_mod`` in place of this one's."""
        return tuple(self._replace(mask_mod=mask_mod))
