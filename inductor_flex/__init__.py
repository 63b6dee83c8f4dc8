"""inductor_flex: FlexAttention as a torch.compile Inductor plugin.

The public names are those of PyTorch's built-in FlexAttention module, so swapping one
import is enough. Importing the package registers the operators and arranges for their
Dynamo capture rule and Inductor lowerings to be registered as soon as Dynamo and Inductor
are imported (without importing them), so plain ``torch.compile`` works; the backend name
``"inductor_flex"`` selects Inductor with attention-friendly options.
"""
import importlib

from .api import AuxOutput, AuxRequest, FlexKernelOptions, flex_attention
from .block_mask import (
    _DEFAULT_SPARSE_BLOCK_SIZE,
    BlockMask,
    and_masks,
    create_block_mask,
    create_mask,
    noop_mask,
    or_masks,
)
from . import masks, varlen
from .masks import create_document_block_mask
from ._post_import import when_imported
from .ops import inductor_flex_attention, inductor_flex_attention_backward


def _register_capture_rule(_dynamo) -> None:
    from inductor_flex import dynamo

    dynamo.register()


def _register_lowering(_lowering) -> None:
    from inductor_flex import lowering

    lowering.register()


# Dynamo and Inductor take over a second to import; users of eager attention and block
# masks need neither. The capture rule and the lowerings go in as soon as each is imported
# (at once if it already is), which is before either traces or lowers anything.
when_imported("torch._dynamo", _register_capture_rule)
when_imported("torch._inductor.lowering", _register_lowering)


def __getattr__(name: str):
    # Serving code alone needs PagedAttention: its module loads on first use.
    if name in ("paged_attention", "PagedAttention"):
        paged_attention = importlib.import_module(f"{__name__}.paged_attention")
        return paged_attention if name == "paged_attention" else paged_attention.PagedAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BlockMask",
    "FlexKernelOptions",
    "PagedAttention",
    "and_masks",
    "create_block_mask",
    "create_document_block_mask",
    "create_mask",
    "flex_attention",
    "masks",
    "noop_mask",
    "or_masks",
    "varlen",
]
