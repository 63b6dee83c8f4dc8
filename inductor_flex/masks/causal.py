"""Causal masks: a query sees itself and the keys before it.

::

    q\\kv 0 1 2 3 4
      0   █ · · · ·
      1   █ █ · · ·
      2   █ █ █ · ·
      3   █ █ █ █ ·
      4   █ █ █ █ █

``causal_mask`` aligns the first query with the first key. When queries are the last
``Q_LEN`` positions of a longer key sequence (decoding with a cache), use
``generate_causal_mask(offset=KV_LEN - Q_LEN)`` ("bottom-right" alignment).
"""
from torch import Tensor

__all__ = ["causal_mask", "generate_causal_mask"]


def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Keep ``kv_idx <= q_idx``."""
    return q_idx >= kv_idx


def generate_causal_mask(offset: int = 0):
    """A causal mask_mod where query ``i`` sits at key position ``i + offset``."""
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise ValueError(f"generate_causal_mask: offset must be an int, got {offset!r}")

    def causal_offset_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx + offset >= kv_idx

    causal_offset_mask.__name__ = f"causal_mask_offset_{offset}"
    return causal_offset_mask
