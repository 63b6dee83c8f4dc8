"""The ``"inductor_flex"`` torch.compile backend: Inductor with our lowerings registered.

``torch.compile(model, backend="inductor_flex")`` finds this function through the
``torch_dynamo_backends`` entry point in setup.py. It accepts the same ``mode`` and
``options`` as the stock ``"inductor"`` backend; the options below are applied first, so
anything the caller passes wins.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["ATTENTION_CONFIG", "inductor_flex_backend"]

# Inductor settings this backend applies before the caller's mode and options. Each one
# is the value Inductor ships with today; we pin them so that an environment variable or
# a global config edit meant for something else does not quietly cost attention its
# fusions. Nothing here changes numerics.
ATTENTION_CONFIG: dict[str, Any] = {
    # Pointwise consumers of the attention output (a dtype cast, a scale, a residual
    # add) fuse into the template's store instead of re-reading the [B, H, M, Ev]
    # output from memory in a second kernel.
    "epilogue_fusion": True,
    # Pointwise producers of an input a template declares fusable (a cast or rotary
    # embedding of query/key) fuse into the template's loads. Inductor only fuses inputs
    # a template lists as prologue-capable, so templates that declare none are unaffected.
    "prologue_fusion": True,
    # When autotuning is on (mode="max-autotune"), benchmark "template + fused
    # epilogue" against "template, then a separate epilogue kernel" and keep the faster,
    # so a fusion that spills registers in the attention inner loop is not forced.
    "benchmark_epilogue_fusion": True,
}


def _check_option_names(patches: dict) -> None:
    known = torch._inductor.config.get_config_copy()
    unknown = sorted(name for name in patches if name not in known)
    if unknown:
        raise ValueError(
            f"inductor_flex backend: unknown Inductor option(s) {unknown}; see "
            "torch._inductor.list_options() for the valid names")


def inductor_flex_backend(gm: torch.fx.GraphModule, example_inputs: list, *,
                          mode: Optional[str] = None, options: Optional[dict] = None):
    """Compile ``gm`` with Inductor, our lowerings registered and ATTENTION_CONFIG applied.

    ``mode`` ("default", "reduce-overhead", "max-autotune", ...) and ``options`` (a dict
    of Inductor config names) mean what they mean for ``backend="inductor"``; they are
    applied after ATTENTION_CONFIG, ``options`` last.
    """
    import torch._inductor
    from torch._inductor.compile_fx import compile_fx

    from inductor_flex import lowering

    lowering.register()
    patches = dict(ATTENTION_CONFIG)
    if mode is not None:
        if mode not in torch._inductor.list_mode_options():
            raise ValueError(
                f"inductor_flex backend: unknown mode {mode!r}; expected one of "
                f"{sorted(torch._inductor.list_mode_options())}")
        patches.update(torch._inductor.list_mode_options(mode))
    if options:
        if not isinstance(options, dict):
            raise ValueError(f"inductor_flex backend: options must be a dict, got {type(options).__name__}")
        patches.update(options)
    _check_option_names(patches)
    return compile_fx(gm, example_inputs, config_patches=patches)
