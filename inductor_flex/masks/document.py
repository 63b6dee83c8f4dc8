"""Document masks for packed sequences: tokens attend only within their own document.

Three documents of lengths 2, 3 and 1, causal::

    q\\kv 0 1 2 3 4 5
      0   █ · · · · ·
      1   █ █ · · · ·
      2   · · █ · · ·
      3   · · █ █ · ·
      4   · · █ █ █ ·
      5   · · · · · █

Any mask_mod can be applied inside each document: it receives positions local to the
document (0 at the document's first token), so e.g. a prefix-LM or sliding window
restarts in every document.

For the BlockMask, prefer :func:`create_document_block_mask`: it derives the blocks from
the document offsets by arithmetic (time proportional to the number of blocks), while
``create_block_mask(generate_document_mask(...), ...)`` evaluates the mask at every pair.
Both give the same element mask.
"""
from typing import Callable, Optional

from torch import Tensor

from ..block_mask import (
    _document_device,
    _document_layout,
    _document_mask_mod,
    create_document_block_mask,
)

__all__ = ["create_document_block_mask", "document_ids", "generate_document_mask"]


def generate_document_mask(
    inner_mask_mod: Optional[Callable] = None,
    *,
    lengths=None,
    offsets=None,
    causal: bool = False,
    device=None,
) -> Callable:
    """mask_mod of packed documents, given ``lengths`` or ``offsets`` (``[0, end_0, ...]``).

    Keeps pairs in the same document, with ``kv <= q`` when ``causal``, and where
    ``inner_mask_mod`` (called with document-local positions) keeps them. ``lengths`` /
    ``offsets`` may hold one packing or one per batch entry (then ``b`` picks the packing).
    ``device`` (where the document ids live) defaults to the given tensor's device, else
    the current accelerator (the CPU when there is none).
    """
    fn = "generate_document_mask"
    if inner_mask_mod is not None and not callable(inner_mask_mod):
        raise ValueError(f"{fn}: inner_mask_mod must be a callable, got {type(inner_mask_mod).__name__}")
    layout = _document_layout(fn, lengths, offsets, _document_device(fn, lengths, offsets, device))
    return _document_mask_mod(layout, causal, inner_mask_mod)


def document_ids(lengths=None, offsets=None, device=None) -> Tensor:
    """int32 document index of every token: ``[total]`` for one packing, ``[B, total]`` for
    one packing per batch entry."""
    fn = "document_ids"
    layout = _document_layout(fn, lengths, offsets, _document_device(fn, lengths, offsets, device))
    return layout.doc_ids if layout.batched else layout.doc_ids[0]
