"""Inductor lowerings for inductor_flex's operators (installed as ``inductor_flex.lowering``).

One lowering per operator; ``dispatch.py`` chooses the kernel that serves a call: the
fused Triton templates on CUDA (``forward.py``, ``backward.py``), and for every other
device or any case a template declines, the extern call of the exact chunked
implementation (``extern.py``).

Nothing here imports Inductor at module level: ``register`` runs once Inductor's lowering
module has been imported (``inductor_flex/__init__.py``), so importing the package stays
cheap.
"""
_registered = False


def register() -> None:
    """Register both lowerings with Inductor (idempotent)."""
    global _registered
    if _registered:
        return
    from torch._inductor.lowering import register_lowering

    from inductor_flex.ops import inductor_flex_attention, inductor_flex_attention_backward

    from . import fake_tensor_updates

    # Without it Inductor's FakeTensorUpdater warns "Please add support for subgraph args"
    # for every compiled graph holding our operators (fake_tensor_updates.py says why).
    fake_tensor_updates.install()
    register_lowering(inductor_flex_attention, type_promotion_kind=None)(_lower_forward)
    register_lowering(inductor_flex_attention_backward, type_promotion_kind=None)(_lower_backward)
    # varlen_attn's custom ops reach Inductor as decompositions into the operators above,
    # so they lower to the same fused templates (inductor_flex/varlen.py).
    from inductor_flex import _compat, varlen

    varlen.register_decompositions(_compat.register_inductor_decomposition)
    _registered = True


def _lower_forward(*args, **kwargs):
    from .dispatch import lower_forward

    return lower_forward(*args, **kwargs)


def _lower_backward(*args, **kwargs):
    from .dispatch import lower_backward

    return lower_backward(*args, **kwargs)
