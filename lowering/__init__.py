"""Inductor lowerings for inductor_flex's operators (installed as ``inductor_flex.lowering``).

One lowering per operator, chosen by device: CUDA gets the fused Triton templates
(``forward.py``, ``backward.py``); every other device, and any case a
template does not cover, gets the extern call of the exact chunked implementation
(``extern.py``).
"""
import importlib
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


def _fused_or_extern(fused: str, extern: str):
    """A lowering that tries the fused CUDA template (``module.function`` in this package,
    returning None where it does not apply) and otherwise lowers to the extern call
    (``extern.<extern>``). Modules load on first use: Inductor imports them only when a
    graph holds the operator."""
    def lower(*args, **kwargs):
        if args[0].get_device().type == "cuda":
            module, function = fused.split(".")
            lowered = getattr(importlib.import_module(f"{__name__}.{module}"), function)(*args, **kwargs)
            if lowered is not None:
                return lowered
        return getattr(importlib.import_module(f"{__name__}.extern"), extern)(*args, **kwargs)

    return lower


_lower_forward = _fused_or_extern("forward.lower_forward", "lower_forward_extern")
_lower_backward = _fused_or_extern("backward.lower_backward", "lower_backward_extern")
