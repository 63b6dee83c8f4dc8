"""The higher-order operators behind flex_attention (see docs/internals.md)."""
from .forward import inductor_flex_attention
from .backward import inductor_flex_attention_backward
from . import autograd as _autograd  # noqa: F401  (registers the autograd rule)

__all__ = ["inductor_flex_attention", "inductor_flex_attention_backward"]
