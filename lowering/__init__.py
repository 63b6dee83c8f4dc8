"""Inductor lowerings for inductor_flex's operators (installed as ``inductor_flex.lowering``).

One lowering per operator, chosen by device: CUDA gets the fused Triton templates
(``forward.py``, ``backward.py``, ``decode.py``); every other device, and any case a
template does not cover, gets the extern call of the exact chunked implementation
(``extern.py``).
"""
import warnings

from torch._inductor.lowering import register_lowering

from inductor_flex.ops import inductor_flex_attention, inductor_flex_attention_backward

_registered = False


def register() -> None:
    """Register both lowerings with Inductor (idempotent)."""
    global _registered
    if _registered:
        return
    # Inductor's FX utilities warn about any operator taking graph-module arguments; our
    # lowerings consume those subgraphs themselves, so the warning is noise to users.
    warnings.filterwarnings(
        "ignore", message="Please add support for subgraph args to function inductor_flex_attention"
    )
    register_lowering(inductor_flex_attention, type_promotion_kind=None)(_lower_forward)
    register_lowering(inductor_flex_attention_backward, type_promotion_kind=None)(_lower_backward)
    _registered = True


def _lower_forward(*args, **kwargs):
    query = args[0]
    if query.get_device().type == "cuda":
        from .forward import lower_forward

        lowered = lower_forward(*args, **kwargs)
        if lowered is not None:
            return lowered
    from .extern import lower_forward_extern

    return lower_forward_extern(*args, **kwargs)


def _lower_backward(*args, **kwargs):
    query = args[0]
    if query.get_device().type == "cuda":
        from .backward import lower_backward

        lowered = lower_backward(*args, **kwargs)
        if lowered is not None:
            return lowered
    from .extern import lower_backward_extern

    return lower_backward_extern(*args, **kwargs)
