"""Dilated sliding window: every ``dilation``-th key within the window.

Causal, window_size=2, dilation=2 (keys ``q, q - 2, q - 4``)::

    q\\kv 0 1 2 3 4 5 6
      0   █ · · · · · ·
      1   · █ · · · · ·
      2   █ · █ · · · ·
      3   · █ · █ · · ·
      4   █ · █ · █ · ·
      5   · █ · █ · █ ·
      6   · · █ · █ · █

``window_size`` counts steps of ``dilation`` positions: a query sees ``window_size + 1``
keys when causal and ``2 * window_size + 1`` when two-sided (fewer at the edges), spread
over ``window_size * dilation`` positions each way. dilation=1 is the plain sliding window.
"""
from torch import Tensor

from ._checks import non_negative_int, positive_int

__all__ = ["generate_dilated_sliding_window_mask"]


def generate_dilated_sliding_window_mask(window_size: int, dilation: int, causal: bool = True):
    """mask_mod keeping ``d = q - kv`` with ``d % dilation == 0`` and ``0 <= d`` (causal) or
    ``-window_size * dilation <= d``, and ``d <= window_size * dilation``."""
    fn = "generate_dilated_sliding_window_mask"
    non_negative_int(fn, "window_size", window_size)
    positive_int(fn, "dilation", dilation)
    reach = window_size * dilation
    lowest = 0 if causal else -reach

    def dilated_sliding_window_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = q_idx - kv_idx
        return (distance % dilation == 0) & (distance >= lowest) & (distance <= reach)

    dilated_sliding_window_mask.__name__ = (
        f"{'causal_' if causal else ''}dilated_sliding_window_{window_size}_d{dilation}"
    )
    return dilated_sliding_window_mask
