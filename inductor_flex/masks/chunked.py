"""Chunked masks: the sequence is cut into chunks of ``chunk_size`` positions.

Chunked causal (``generate_chunked_causal_mask(2)``, local attention inside each chunk,
as in Llama 4's chunked layers)::

    q\\kv 0 1 2 3 4 5
      0   █ · · · · ·
      1   █ █ · · · ·
      2   · · █ · · ·
      3   · · █ █ · ·
      4   · · · · █ ·
      5   · · · · █ █

Block causal (``generate_block_causal_mask(2)``: a chunk sees itself entirely and every
earlier chunk)::

    q\\kv 0 1 2 3 4 5
      0   █ █ · · · ·
      1   █ █ · · · ·
      2   █ █ █ █ · ·
      3   █ █ █ █ · ·
      4   █ █ █ █ █ █
      5   █ █ █ █ █ █
"""
from torch import Tensor

from ._checks import positive_int

__all__ = ["generate_block_causal_mask", "generate_chunked_causal_mask"]


def generate_chunked_causal_mask(chunk_size: int):
    """mask_mod keeping ``q // chunk_size == kv // chunk_size`` and ``kv <= q``."""
    positive_int("generate_chunked_causal_mask", "chunk_size", chunk_size)

    def chunked_causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx // chunk_size == kv_idx // chunk_size) & (q_idx >= kv_idx)

    chunked_causal_mask.__name__ = f"chunked_causal_{chunk_size}"
    return chunked_causal_mask


def generate_block_causal_mask(chunk_size: int):
    """mask_mod keeping ``kv // chunk_size <= q // chunk_size``."""
    positive_int("generate_block_causal_mask", "chunk_size", chunk_size)

    def block_causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx // chunk_size <= q_idx // chunk_size

    block_causal_mask.__name__ = f"block_causal_{chunk_size}"
    return block_causal_mask
