"""Tanh soft-capping of attention scores (Gemma 2, Grok): ``cap * tanh(score / cap)``.

Scores keep their sign and order but are squashed into ``(-cap, cap)``; near zero they
are almost unchanged::

    score     -100    -30    -10    0     10     30    100     (cap = 30)
    capped  -29.92 -22.85  -9.65  0.0   9.65  22.85  29.92
"""
from torch import Tensor

__all__ = ["generate_tanh_softcap"]


def generate_tanh_softcap(soft_cap: float):
    """score_mod returning ``soft_cap * tanh(score / soft_cap)`` (``soft_cap > 0``)."""
    if isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float)) or not soft_cap > 0:
        raise ValueError(f"generate_tanh_softcap: soft_cap must be a positive number, got {soft_cap!r}")
    soft_cap = float(soft_cap)

    def tanh_softcap(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return soft_cap * (score / soft_cap).tanh()

    tanh_softcap.__name__ = f"tanh_softcap_{soft_cap:g}"
    return tanh_softcap
