"""Which block masks mean exactly what an SDPA kernel computes: the pattern tag.

A BlockMask made by ``create_block_mask`` (or the keep-all mask ``flex_attention`` builds when
given none) carries a *pattern* when its meaning is proven at construction:

- ``FULL``: every score is kept (the mask_mod is ``noop_mask`` itself);
- ``CAUSAL``: top-left aligned causal, ``q_idx >= kv_idx``, with ``Q_LEN == KV_LEN`` (so
  top-left and bottom-right alignment coincide, and every row keeps at least one score).

Proof for causal: the mask_mod is ``masks.causal_mask`` itself, or, called on symbolic
stand-in indices, it returns exactly one comparison ``q_idx >= kv_idx`` (or
``kv_idx <= q_idx``) and does nothing else with them (``traces_to_causal``). Block counts are
never consulted.

``flex_attention`` hands the pattern to the operator in ``kernel_options[PATTERN_KEY]``; the
lowering reads that key directly (not through the ``FWD_``/``BWD_`` prefixed reader), and
users cannot set it.
"""
from typing import Callable, Optional

import torch

FULL = "full"
CAUSAL = "causal"
PATTERN_KEY = "MASK_PATTERN"

class _NotProven(Exception):
    pass


class _Comparison:
    """The result of comparing two symbolic indices; any further use is not proven."""

    def __init__(self, op: str, left, right):
        self.op, self.left, self.right = op, left, right

    def __bool__(self):  # a Python branch on the comparison
        raise _NotProven


class _SymbolicIndex:
    """A stand-in for one mod argument: comparing two of them records the comparison; every
    other use (arithmetic, attributes, torch functions, branching) fails to trace."""

    __slots__ = ()

    def __ge__(self, other):
        return _Comparison(">=", self, other)

    def __le__(self, other):
        return _Comparison("<=", self, other)

    def __bool__(self):
        raise _NotProven


def traces_to_causal(mask_mod: Callable) -> bool:
    """Whether ``mask_mod(b, h, q_idx, kv_idx)`` is exactly ``q_idx >= kv_idx``: called once on
    symbolic stand-ins that only record a comparison, so it costs microseconds (a make_fx
    trace costs ~20 ms per mod, seconds for the first, and masks are often built per batch).
    A mod doing anything else (arithmetic, torch functions, branching on the indices) raises
    inside and is not tagged."""
    b, h, q_idx, kv_idx = (_SymbolicIndex() for _ in range(4))
    try:
        result = mask_mod(b, h, q_idx, kv_idx)
    except Exception:  # any use the stand-ins do not model: not proven
        return False
    if not isinstance(result, _Comparison):
        return False
    return ((result.op == ">=" and result.left is q_idx and result.right is kv_idx)
            or (result.op == "<=" and result.left is kv_idx and result.right is q_idx))


def recognise(mask_mod: Callable, q_len: int, kv_len: int) -> Optional[str]:
    """The pattern ``create_block_mask(mask_mod, ..., Q_LEN=q_len, KV_LEN=kv_len)`` proves,
    or None. Inside a compiled function only the function objects are recognised (Dynamo
    would trace the stand-ins too)."""
    from .block_mask import noop_mask
    from .masks.causal import causal_mask

    if mask_mod is noop_mask:
        return FULL
    if q_len != kv_len:
        return None
    if mask_mod is causal_mask:
        return CAUSAL
    if torch.compiler.is_compiling():
        return None
    return CAUSAL if traces_to_causal(mask_mod) else None
