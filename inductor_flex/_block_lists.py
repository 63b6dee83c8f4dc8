"""Block lists, the block mask's storage: per row of blocks, ``num_blocks`` counts the
first entries of ``indices`` that are listed (in increasing order); later entries are
ignored, whatever they hold. One implementation for BlockMask (block_mask.py) and the dense
reference's keep mask (ops/dense.py)."""
from typing import Tuple

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
    indices = torch.empty(dense.shape, dtype=torch.int32, device=dense.device)
    indices.scatter_(-1, slot, columns)
    return num_blocks, indices


def transpose_listed(num_blocks: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    """The same relation listed from the other side (KV blocks -> query blocks, or back)."""
    dense = listed_to_dense(num_blocks, indices, indices.shape[-1])
    return dense_to_listed(dense.transpose(-2, -1))
