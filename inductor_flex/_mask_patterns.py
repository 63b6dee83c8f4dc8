"""Which block masks mean exactly what an SDPA kernel computes: the pattern tag.

A BlockMask made by ``create_block_mask`` (or the keep-all mask ``flex_attention`` builds when
given none) carries a *pattern* when its meaning is proven at construction:

- ``FULL``: every score is kept (the mask_mod is ``noop_mask`` itself);
- ``CAUSAL``: top-left aligned causal, ``q_idx >= kv_idx``, with ``Q_LEN == KV_LEN`` (so
  top-left and bottom-right alignment coincide, and every row keeps at least one score).

Proof for causal: the mask_mod is ``masks.causal_mask`` itself, or a plain function whose
bytecode is exactly ``return q_idx >= kv_idx`` (or ``return kv_idx <= q_idx``) on its third
and fourth parameters (``traces_to_causal``; the mod is never called, so side effects run
as often as without the tag). Block counts are never consulted.

``flex_attention`` hands the pattern to the operator in ``kernel_options[PATTERN_KEY]``; the
lowering reads that key directly (not through the ``FWD_``/``BWD_`` prefixed reader), and
users cannot set it.
"""
import functools
from typing import Callable, Optional

import torch

FULL = "full"
CAUSAL = "causal"
PATTERN_KEY = "MASK_PATTERN"

# Instructions that do nothing (3.11+ frame setup, padding).
_NO_OPS = frozenset({"RESUME", "NOP", "CACHE", "EXTENDED_ARG"})


def traces_to_causal(mask_mod: Callable) -> bool:
    """Whether ``mask_mod(b, h, q_idx, kv_idx)`` is a plain function whose whole body is
    ``return q_idx >= kv_idx`` (or ``return kv_idx <= q_idx``), read from its bytecode. The mod
    is never called (a side-effecting mod runs exactly as often as without the tag), and
    anything else, even an equivalent spelling, is simply not proven."""
    import inspect

    return inspect.isfunction(mask_mod) and _code_is_causal(mask_mod.__code__)


@functools.lru_cache(maxsize=256)
def _code_is_causal(code) -> bool:
    """``traces_to_causal`` on a code object (the answer depends on nothing else, so each
    mask_mod's bytecode is read once, not at every create_block_mask)."""
    import dis
    import inspect

    if code.co_argcount != 4 or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return False
    q_name, kv_name = code.co_varnames[2], code.co_varnames[3]
    loads, compare, returned = [], None, False
    for instruction in dis.get_instructions(code):
        name = instruction.opname
        if name in _NO_OPS:
            continue
        if returned or compare is not None and name != "RETURN_VALUE":
            return False
        if name == "LOAD_FAST":
            loads.append(instruction.argval)
        elif name == "LOAD_FAST_LOAD_FAST":  # 3.13: two loads in one instruction
            loads.extend(instruction.argval)
        elif name == "COMPARE_OP":
            compare = instruction.argrepr.replace("bool(", "").rstrip(")")
        elif name == "RETURN_VALUE" and compare is not None:
            returned = True
        else:
            return False
    return returned and ((compare == ">=" and loads == [q_name, kv_name])
                         or (compare == "<=" and loads == [kv_name, q_name]))


def recognise(mask_mod: Callable, q_len: int, kv_len: int) -> Optional[str]:
    """The pattern ``create_block_mask(mask_mod, ..., Q_LEN=q_len, KV_LEN=kv_len)`` proves,
    or None. Inside a compiled function only the function objects are recognised (Dynamo
    cannot trace bytecode inspection)."""
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
