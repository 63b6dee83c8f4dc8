"""Global tokens plus a sliding window (Longformer / BigBird style).

The first ``num_global`` positions are global: they see every key and every query sees
them; the rest attend within ``|q - kv| <= window_size``. num_global=1, window_size=1::

    q\\kv 0 1 2 3 4 5
      0   █ █ █ █ █ █
      1   █ █ █ · · ·
      2   █ █ █ █ · ·
      3   █ · █ █ █ ·
      4   █ · · █ █ █
      5   █ · · · █ █

With ``causal=True`` the same pattern is additionally cut to ``kv <= q``.
"""
from torch import Tensor

from ._checks import non_negative_int

__all__ = ["generate_global_sliding_window_mask"]


def generate_global_sliding_window_mask(num_global: int, window_size: int, causal: bool = False):
    """mask_mod keeping ``q < num_global``, ``kv < num_global`` or ``|q - kv| <= window_size``
    (and ``kv <= q`` when ``causal``)."""
    fn = "generate_global_sliding_window_mask"
    non_negative_int(fn, "num_global", num_global)
    non_negative_int(fn, "window_size", window_size)

    def global_sliding_window_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = (q_idx < num_global) | (kv_idx < num_global) | ((q_idx - kv_idx).abs() <= window_size)
        if causal:
            keep = keep & (q_idx >= kv_idx)
        return keep

    global_sliding_window_mask.__name__ = (
        f"{'causal_' if causal else ''}global_{num_global}_sliding_window_{window_size}"
    )
    return global_sliding_window_mask
