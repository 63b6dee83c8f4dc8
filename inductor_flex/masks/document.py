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
from typing import Callable, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..block_mask import (
    _DEFAULT_SPARSE_BLOCK_SIZE,
    BlockMask,
    _block_size_pair,
    _BlockSize,
    _mask_mod_signature,
    _mod_name,
    _usable_device,
)
from ._packed_blocks import Packing, PackedLayout, packed_block_lists, packed_layout

__all__ = ["create_document_block_mask", "document_ids", "generate_document_mask"]


class _DocumentLayout(NamedTuple):
    offsets: List[Tensor]  # per packing: int64 [n_docs + 1] on the device, offsets[0] == 0
    tokens: List[PackedLayout]  # per packing: document, start and end of every position
    total: int  # tokens per packing
    batched: bool  # given as one packing per batch entry (2-D / list of sequences)

    def table(self, field: str) -> Tensor:
        """int32 ``[packings, total]``: one ``PackedLayout`` field of every position."""
        return torch.stack([getattr(tokens, field) for tokens in self.tokens])

    def packings(self) -> List[Packing]:
        """What the block-list builder takes: Q and KV share the offsets."""
        return [Packing(offsets, offsets) for offsets in self.offsets]


def _checked_host_values(function: str, where: str, packing) -> Tensor:
    """A host sequence or CPU tensor of one packing as int64 on the CPU (shape and dtype
    checked here; values by the caller)."""
    if isinstance(packing, Tensor):
        values = packing
    else:
        try:
            values = torch.as_tensor(packing)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{function}: {where} must hold integers, got {packing!r}") from None
    if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"{function}: {where} must hold integers, got dtype {values.dtype}")
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"{function}: {where} must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    # A copy in fresh (pageable) memory: the non-blocking copy to the device is then staged
    # before it returns, even where the caller's tensor is pinned and changed right after.
    return values.to(torch.int64, copy=True)


def _check_offsets(function: str, where: str, values: Tensor, from_lengths: bool) -> None:
    """The value checks (these read the values: on a device tensor, a host sync)."""
    if from_lengths:
        if bool((values < 0).any()):
            raise ValueError(f"{function}: {where} has a negative document length")
        return
    if int(values[0]) != 0:
        raise ValueError(f"{function}: {where} must start at 0, got {int(values[0])}")
    if values.numel() > 1 and bool((values[1:] < values[:-1]).any()):
        raise ValueError(f"{function}: {where} must be non-decreasing")


def _document_layout(function: str, lengths, offsets, device: torch.device,
                     total_length: Optional[int] = None) -> _DocumentLayout:
    """Validate document lengths or offsets (one packing, or one per batch entry) and
    compute the document id of every position.

    Values given on the host (sequences, CPU tensors) are checked there and copied to
    ``device`` without waiting. Values in a device tensor are read back (a host sync) to
    learn the total and check them, unless ``total_length`` is given: then nothing waits
    for the device, and the values are trusted. Under tracing, tensors are trusted the same
    way."""
    if (lengths is None) == (offsets is None):
        raise ValueError(f"{function}: give exactly one of lengths= or offsets=")
    if total_length is not None and (not isinstance(total_length, int) or isinstance(total_length, bool)
                                     or total_length < 1):
        raise ValueError(f"{function}: total_length must be a positive int, got {total_length!r}")
    given, name = (lengths, "lengths") if lengths is not None else (offsets, "offsets")
    if not isinstance(given, (Tensor, list, tuple)):
        try:
            given = torch.as_tensor(given)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{function}: {name} must be a tensor or a sequence of ints, got {type(given).__name__}"
            ) from None
    if isinstance(given, Tensor):
        batched = given.dim() == 2
    else:
        batched = len(given) > 0 and isinstance(given[0], (list, tuple, Tensor))
    packings = list(given) if batched else [given]
    if not packings:
        raise ValueError(f"{function}: {name} is empty")
    tracing = torch.compiler.is_compiling()
    all_offsets, totals = [], set()
    for position, packing in enumerate(packings):
        where = f"{name}[{position}]" if len(packings) > 1 else name
        on_host = not tracing and not (isinstance(packing, Tensor) and packing.device.type != "cpu")
        if on_host:
            values = _checked_host_values(function, where, packing)
            _check_offsets(function, where, values, lengths is not None)
        else:
            if packing.dtype.is_floating_point or packing.dtype == torch.bool or packing.is_complex():
                raise ValueError(f"{function}: {where} must hold integers, got dtype {packing.dtype}")
            if packing.dim() != 1 or packing.numel() == 0:
                raise ValueError(
                    f"{function}: {where} must be a non-empty 1-D sequence, got shape {tuple(packing.shape)}")
            values = packing.to(torch.int64)
            if total_length is None and not tracing:
                _check_offsets(function, where, values, lengths is not None)
        if lengths is not None:
            values = F.pad(values.cumsum(0), (1, 0))
        if on_host or total_length is None:
            totals.add(int(values[-1]))
        # From pageable host memory a non-blocking copy is staged before the call returns,
        # so the temporary may go; nothing waits for the device.
        all_offsets.append(values.to(device, non_blocking=True))
    if total_length is not None:
        totals.add(total_length)
    if len(totals) != 1:
        described = "" if total_length is None else f" (total_length={total_length})"
        raise ValueError(
            f"{function}: every packing must hold the same number of tokens{described}, got {sorted(totals)}")
    total = totals.pop()
    if total < 1:
        raise ValueError(f"{function}: the documents hold no tokens")
    tokens = [packed_layout(packing_offsets, total) for packing_offsets in all_offsets]
    return _DocumentLayout(all_offsets, tokens, total, batched)


def _document_device(function: str, lengths, offsets, device) -> torch.device:
    """``device``, defaulting to that of the given lengths / offsets tensor, else
    ``default_device()``."""
    if device is None:
        given = lengths if lengths is not None else offsets
        device = given.device if isinstance(given, Tensor) else None
    return _usable_device(function, device)


def _document_mask_mod(layout: _DocumentLayout, causal: bool, inner: Optional[Callable]) -> Callable:
    """The element mask of packed documents: same document, ``q >= kv`` when causal, and
    ``inner`` evaluated on positions local to the document (0 at its first token)."""
    # Per-token tables (not per-document ones): their shapes depend on the total length
    # alone, so a new layout of the same length is the same compiled graph.
    if len(layout.tokens) == 1:
        # One packing shared by every batch entry: the batch index is not needed.
        doc_ids, token_starts = layout.tokens[0].doc, layout.tokens[0].start

        def doc_of(b, idx):
            return doc_ids[idx]

        def start_of(b, idx):
            return token_starts[idx]
    else:
        doc_ids, token_starts = layout.table("doc"), layout.table("start")

        def doc_of(b, idx):
            return doc_ids[b, idx]

        def start_of(b, idx):
            return token_starts[b, idx]

    def document_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = doc_of(b, q_idx) == doc_of(b, kv_idx)
        if causal:
            keep = keep & (q_idx >= kv_idx)
        if inner is not None:
            keep = keep & inner(b, h, q_idx - start_of(b, q_idx), kv_idx - start_of(b, kv_idx))
        return keep

    document_mask.__name__ = "causal_document_mask" if causal else "document_mask"
    if inner is not None:
        document_mask.__name__ += f"[{_mod_name(inner)}]"
    return document_mask


def create_document_block_mask(
    lengths=None,
    offsets=None,
    causal: bool = True,
    mask_mod: Optional[_mask_mod_signature] = None,
    BLOCK_SIZE: _BlockSize = _DEFAULT_SPARSE_BLOCK_SIZE,
    device: Optional[Union[str, torch.device]] = None,
    *,
    total_length: Optional[int] = None,
) -> BlockMask:
    """BlockMask of packed documents, built from block arithmetic without evaluating a mod.

    Give either ``lengths`` (tokens per document) or ``offsets`` (``[0, end_0, end_1, ...]``,
    like ``cu_seqlens``); either may hold one packing (1-D) or one per batch entry (a
    2-D tensor or a list of sequences, all with the same total). Q_LEN = KV_LEN = total.

    A position attends to positions of its own document, only earlier ones when
    ``causal``, and only where ``mask_mod`` (if given) keeps them; ``mask_mod`` receives
    positions local to the document (0 at its first token). With ``mask_mod`` the full_*
    fields are None: every visible block is partial, since only evaluating the mod could
    show a block full.
    ``device`` defaults to the device of the given tensor, else the current accelerator
    (the CPU when there is none).

    ``total_length`` (tokens per packing) lets lengths / offsets that live on the GPU be
    used without reading them back: the construction then never waits for the device, and
    the values are trusted (not checked). Without it such values are read back once, to
    learn the total and check them. Host values are always checked, on the host.

    The result's ``mask_mod`` is the exact element mask (it closes over per-token document
    ids), and every tensor's shape depends on the total length alone: a new layout of the
    same length does not recompile a compiled attention that uses it. Work is proportional
    to the number of blocks and tokens; on the GPU the index lists (whose shape the block
    mask fixes) are each written by one gather.
    """
    fn = "create_document_block_mask"
    if mask_mod is not None and not callable(mask_mod):
        raise ValueError(f"{fn}: mask_mod must be a callable (b, h, q_idx, kv_idx), got {type(mask_mod).__name__}")
    q_block, kv_block = _block_size_pair(fn, BLOCK_SIZE)
    device = _document_device(fn, lengths, offsets, device)
    layout = _document_layout(fn, lengths, offsets, device, total_length)
    total = layout.total
    # With an inner mask_mod no block is known to be full: it must run everywhere.
    lists = packed_block_lists(layout.packings(), total, total, (-1, 0) if causal else (-1, -1),
                               (q_block, kv_block), allow_full=mask_mod is None)
    return BlockMask(
        (total, total),
        *lists,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=_document_mask_mod(layout, causal, mask_mod),
    )


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
    return layout.table("doc") if layout.batched else layout.tokens[0].doc
