"""Prefix-LM mask: bidirectional over a prefix, causal after it.

prefix_length=3::

    q\\kv 0 1 2 3 4 5
      0   █ █ █ · · ·
      1   █ █ █ · · ·
      2   █ █ █ · · ·
      3   █ █ █ █ · ·
      4   █ █ █ █ █ ·
      5   █ █ █ █ █ █

Every query sees the whole prefix; past the prefix, keys are causal. The prefix length
may differ per batch entry (a 1-D tensor indexed by ``b``).
"""
from typing import Union

import torch
from torch import Tensor

from ._checks import non_negative_int

__all__ = ["generate_prefix_lm_mask"]


def generate_prefix_lm_mask(prefix_length: Union[int, Tensor]):
    """mask_mod keeping ``kv < prefix_length`` or ``kv <= q``.

    ``prefix_length`` is an int, or an integer tensor ``[B]`` of per-batch prefix lengths.
    """
    if isinstance(prefix_length, Tensor):
        if prefix_length.dim() != 1 or prefix_length.dtype.is_floating_point or prefix_length.dtype == torch.bool:
            raise ValueError(
                f"generate_prefix_lm_mask: a tensor prefix_length must be 1-D integer (one per batch "
                f"entry), got {prefix_length.dtype} of shape {tuple(prefix_length.shape)}"
            )
        if bool((prefix_length < 0).any()):
            raise ValueError("generate_prefix_lm_mask: prefix lengths must be non-negative")
        lengths = prefix_length

        def prefix_lm_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx < lengths[b]) | (q_idx >= kv_idx)

        prefix_lm_mask.__name__ = "prefix_lm_per_batch"
        return prefix_lm_mask

    non_negative_int("generate_prefix_lm_mask", "prefix_length", prefix_length)

    def prefix_lm_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)

    prefix_lm_mask.__name__ = f"prefix_lm_{prefix_length}"
    return prefix_lm_mask
