"""Relative-position bias looked up in a table (T5 / Swin style, unbucketed).

The score of query ``q`` and key ``kv`` gets ``table[h, d + max_distance]`` with
``d = clamp(kv - q, -max_distance, max_distance)``: one learned number per head and
clipped offset. With max_distance=1 and table ``[a, b, c]`` (one head)::

    q\\kv  0  1  2  3
      0    b  c  c  c
      1    a  b  c  c
      2    a  a  b  c
      3    a  a  a  b

The table may require grad: it is closed over by the score_mod, so its gradient flows.
"""
from torch import Tensor

__all__ = ["generate_relative_position_bias"]


def generate_relative_position_bias(bias_table: Tensor):
    """score_mod adding ``bias_table[h, clamp(kv - q, -M, M) + M]``.

    ``bias_table`` is float ``[H, 2M + 1]`` (one row per head) or ``[2M + 1]`` (shared by
    all heads); ``M`` is the largest distinguished offset.
    """
    fn = "generate_relative_position_bias"
    if not isinstance(bias_table, Tensor) or not bias_table.dtype.is_floating_point:
        raise ValueError(f"{fn}: bias_table must be a float tensor")
    if bias_table.dim() not in (1, 2) or bias_table.shape[-1] % 2 == 0:
        raise ValueError(
            f"{fn}: bias_table must be [2M + 1] or [H, 2M + 1] (odd last dim), got shape "
            f"{tuple(bias_table.shape)}"
        )
    max_distance = bias_table.shape[-1] // 2
    per_head = bias_table.dim() == 2

    def relative_position_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        offset = (kv_idx - q_idx).clamp(-max_distance, max_distance) + max_distance
        bias = bias_table[h, offset] if per_head else bias_table[offset]
        return score + bias  # no cast to score.dtype: see alibi.py

    return relative_position_bias
