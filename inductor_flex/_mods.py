"""Evaluate a score_mod or mask_mod over a grid of indices.

User mods are written for one scalar position ``(b, h, q_idx, kv_idx)``. We run them over
a whole grid with four nested ``torch.vmap``s, so any code that is correct for scalars
(indexing captured tensors, ``torch.where``, ``h.new_zeros(h.shape)``) is correct here,
without materializing more than the grid asked for.
"""
from typing import Callable, Sequence

import torch
from torch import Tensor


def _nest_vmaps(fn: Callable, has_score: bool, num_buffers: int) -> Callable:
    # Positions of b, h, q_idx, kv_idx in the mod's argument list.
    first_index = 1 if has_score else 0
    buffers = (None,) * num_buffers
    # Innermost first: kv_idx, then q_idx, h, b. The score (when present) is batched at
    # every level, one grid dimension peeled off per level from the outside in.
    for index_position in (3, 2, 1, 0):
        in_dims = [None] * (first_index + 4)
        in_dims[first_index + index_position] = 0
        if has_score:
            in_dims[0] = 0
        fn = torch.vmap(fn, in_dims=tuple(in_dims) + buffers, out_dims=0)
    return fn


def _grid_indices(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor):
    return tuple(t.to(torch.int32) for t in (b, h, q_idx, kv_idx))


def mask_mod_grid(mask_mod: Callable, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor,
                  buffers: Sequence[Tensor] = ()) -> Tensor:
    """``mask_mod`` at every ``(b, h, q, kv)`` of the 1-D index vectors: bool ``[B, H, Q, KV]``."""
    grid = _nest_vmaps(mask_mod, has_score=False, num_buffers=len(buffers))
    out = grid(*_grid_indices(b, h, q_idx, kv_idx), *buffers)
    out = torch.as_tensor(out, device=q_idx.device)
    shape = (b.numel(), h.numel(), q_idx.numel(), kv_idx.numel())
    return out.to(torch.bool).expand(shape)


def score_mod_grid(score_mod: Callable, scores: Tensor, b: Tensor, h: Tensor, q_idx: Tensor,
                   kv_idx: Tensor, buffers: Sequence[Tensor] = ()) -> Tensor:
    """``score_mod`` applied to ``scores [B, H, Q, KV]`` at the matching index vectors."""
    grid = _nest_vmaps(score_mod, has_score=True, num_buffers=len(buffers))
    out = grid(scores, *_grid_indices(b, h, q_idx, kv_idx), *buffers)
    return torch.as_tensor(out, device=scores.device).expand(scores.shape)
