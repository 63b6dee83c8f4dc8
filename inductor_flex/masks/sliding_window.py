"""Sliding-window masks: a query sees keys at most ``window_size`` positions away.

Causal (``causal=True``, window_size=2): the query and the two keys before it::

    q\\kv 0 1 2 3 4 5
      0   █ · · · · ·
      1   █ █ · · · ·
      2   █ █ █ · · ·
      3   · █ █ █ · ·
      4   · · █ █ █ ·
      5   · · · █ █ █

Two-sided (``causal=False``, window_size=1): ``|q - kv| <= 1``::

    q\\kv 0 1 2 3 4 5
      0   █ █ · · · ·
      1   █ █ █ · · ·
      2   · █ █ █ · ·
      3   · · █ █ █ ·
      4   · · · █ █ █
      5   · · · · █ █

A query sees ``window_size + 1`` keys when causal, ``2 * window_size + 1`` otherwise
(fewer at the edges).
"""
from torch import Tensor

from ._checks import non_negative_int

__all__ = ["generate_sliding_window_mask"]


def generate_sliding_window_mask(window_size: int, causal: bool = True):
    """mask_mod keeping ``0 <= q - kv <= window_size`` (causal) or ``|q - kv| <= window_size``."""
    non_negative_int("generate_sliding_window_mask", "window_size", window_size)

    if causal:

        def sliding_window_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            distance = q_idx - kv_idx
            return (distance >= 0) & (distance <= window_size)

    else:

        def sliding_window_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx - kv_idx).abs() <= window_size

    sliding_window_mask.__name__ = f"{'causal_' if causal else ''}sliding_window_{window_size}"
    return sliding_window_mask
