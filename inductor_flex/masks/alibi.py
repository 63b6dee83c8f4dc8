"""ALiBi (Press et al., "Train Short, Test Long", 2022): a per-head linear distance penalty.

The score of query ``q`` and key ``kv`` in head ``h`` gets ``slope[h] * (kv - q)``, which
is ``-slope[h] * distance`` for keys behind the query. One head, slope 1/2::

    q\\kv    0     1     2     3
      0    0.0   0.5   1.0   1.5
      1   -0.5   0.0   0.5   1.0
      2   -1.0  -0.5   0.0   0.5
      3   -1.5  -1.0  -0.5   0.0

(Usually combined with a causal mask, so only the lower triangle matters.)

Slopes follow the paper: with ``n`` heads, a power of two, head ``i`` (from 0) gets
``2 ** (-8 * (i + 1) / n)``; otherwise the slopes of the nearest lower power of two ``m``
come first, followed by every other slope of ``2m`` heads until there are ``n``.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from ._checks import positive_int

__all__ = ["alibi_slopes", "generate_alibi_bias"]


def _geometric_slopes(num_heads: int):
    return [2.0 ** (-8.0 * (i + 1) / num_heads) for i in range(num_heads)]


def alibi_slopes(num_heads: int) -> Tensor:
    """float32 ``[num_heads]``: the ALiBi paper's slope of each head."""
    positive_int("alibi_slopes", "num_heads", num_heads)
    power = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = _geometric_slopes(power)
    if power < num_heads:
        slopes += _geometric_slopes(2 * power)[0::2][: num_heads - power]
    return torch.tensor(slopes, dtype=torch.float32)


def generate_alibi_bias(num_heads: int, slopes: Optional[Tensor] = None, device=None):
    """score_mod adding ``slopes[h] * (kv_idx - q_idx)``; ``slopes`` defaults to
    :func:`alibi_slopes` and lives on ``device`` (default: where ``slopes`` is, else CPU)."""
    positive_int("generate_alibi_bias", "num_heads", num_heads)
    if slopes is None:
        slopes = alibi_slopes(num_heads)
    elif slopes.shape != (num_heads,) or not slopes.dtype.is_floating_point:
        raise ValueError(
            f"generate_alibi_bias: slopes must be a float tensor of shape ({num_heads},), got "
            f"{slopes.dtype} of shape {tuple(slopes.shape)}"
        )
    if device is not None:
        slopes = slopes.to(device)

    def alibi_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # No cast back to score.dtype: traced, the score stands in the input dtype (bf16), while
        # the kernel holds it in float32; a cast would round every biased score.
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi_bias
