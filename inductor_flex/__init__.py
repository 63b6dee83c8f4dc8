"""inductor_flex: FlexAttention as a torch.compile Inductor plugin.

The public names are those of PyTorch's built-in FlexAttention module, so swapping one
import is enough. Importing the package registers the operators, their Dynamo capture
rule and the Inductor lowering, so plain ``torch.compile`` works; the backend name
``"inductor_flex"`` selects Inductor with attention-friendly options.
"""
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
from . import masks
from .masks import create_document_block_mask
from . import dynamo as _dynamo
from .ops import inductor_flex_attention, inductor_flex_attention_backward

_dynamo.register()


def _register_lowering() -> None:
    from inductor_flex import lowering

    lowering.register()


_register_lowering()

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BlockMask",
    "FlexKernelOptions",
    "and_masks",
    "create_block_mask",
    "create_document_block_mask",
    "create_mask",
    "flex_attention",
    "masks",
    "noop_mask",
    "or_masks",
]
