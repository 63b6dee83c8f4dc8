"""BlockMask, its constructors, combinators and dense / picture views.

A mask over ``(b, h, q_idx, kv_idx)`` is described at the granularity of tiles of
``Q_BLOCK_SIZE x KV_BLOCK_SIZE`` positions. Every tile is one of

* *full*: every existing pair in it is visible, the kernel skips ``mask_mod`` there;
* *partial*: some pairs are visible, the kernel evaluates ``mask_mod`` inside it;
* *empty*: nothing is visible, the kernel never touches it.

Per query block, ``kv_indices`` lists the partial KV blocks (in increasing order, the
first ``kv_num_blocks`` entries count) and ``full_kv_*`` the full ones; the ``q_*`` fields
are the same relation seen from the KV blocks, for the backward. The exact layout is the
tuple contract of docs/internals.md.

``create_block_mask`` classifies tiles exactly by evaluating ``mask_mod`` over a slab of
query rows at a time, so it never holds the whole ``Q_LEN x KV_LEN`` mask.
``create_document_block_mask`` builds the mask of packed documents from their offsets by
arithmetic on block ranges, without evaluating any mod.

Nothing here imports ``torch.nn.attention``: the names and signatures match PyTorch's
FlexAttention so that user code can switch imports, but every line is our own.
"""
from __future__ import annotations

import collections
import inspect
import itertools
import logging
import math
import types
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _compat, _mask_patterns
from ._block_lists import dense_to_listed, dense_to_listed_by_search, listed_to_dense, transpose_listed
from ._mods import mask_mod_grid, score_mod_grid

__all__ = [
    "BlockMask",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "noop_mask",
    "or_masks",
]

log = logging.getLogger("inductor_flex")

_DEFAULT_SPARSE_BLOCK_SIZE = 128

# Upper bound on the number of mask elements evaluated at once by create_block_mask and
# create_mask (16 Mi booleans); the slab height is derived from it.
_SLAB_ELEMENT_BUDGET = 1 << 24

_mask_mod_signature = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
_score_mod_signature = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
_BlockSize = Union[int, Tuple[int, int]]


# --------------------------------------------------------------------------------------
# Mask mods and their combinators
# --------------------------------------------------------------------------------------


def noop_mask(batch: Tensor, head: Tensor, token_q: Tensor, token_kv: Tensor) -> Tensor:
    """The mask_mod that keeps every position (a scalar ``True``)."""
    return batch.new_ones((), dtype=torch.bool)


def _require_callables(combinator: str, mods: Sequence) -> None:
    for position, mod in enumerate(mods):
        if not callable(mod):
            raise RuntimeError(
                f"{combinator}: argument {position} is not callable (got {type(mod).__name__}); "
                f"every argument must be a mask_mod(b, h, q_idx, kv_idx) -> bool tensor"
            )


def and_masks(*mask_mods: _mask_mod_signature) -> _mask_mod_signature:
    """A mask_mod keeping a position only where every one of ``mask_mods`` keeps it.

    With no arguments the result keeps everything.
    """
    _require_callables("and_masks", mask_mods)

    def and_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = b.new_ones((), dtype=torch.bool)
        for mod in mask_mods:
            keep = keep & mod(b, h, q_idx, kv_idx)
        return keep

    return and_mask


def or_masks(*mask_mods: _mask_mod_signature) -> _mask_mod_signature:
    """A mask_mod keeping a position where at least one of ``mask_mods`` keeps it.

    With no arguments the result keeps nothing.
    """
    _require_callables("or_masks", mask_mods)

    def or_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = b.new_zeros((), dtype=torch.bool)
        for mod in mask_mods:
            keep = keep | mod(b, h, q_idx, kv_idx)
        return keep

    return or_mask


def _required_positional_count(fn: Callable) -> Optional[int]:
    """How many positional parameters without a default ``fn`` takes; None if unknowable
    (no signature, or ``*args``)."""
    if inspect.isfunction(fn) and not hasattr(fn, "__wrapped__"):
        # Read off the code object: inspect.signature costs ~50 us (and follows __wrapped__).
        code = fn.__code__
        if code.co_flags & inspect.CO_VARARGS:
            return None
        return code.co_argcount - len(fn.__defaults__ or ())
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in signature.parameters.values():
        if parameter.kind == inspect.Parameter.VAR_POSITIONAL:
            return None
        if (
            parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            and parameter.default is inspect.Parameter.empty
        ):
            count += 1
    return count


def _mod_name(mod: Callable) -> str:
    return getattr(mod, "__name__", None) or type(mod).__name__


# --------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _block_size_pair(function: str, BLOCK_SIZE) -> Tuple[int, int]:
    if _is_int(BLOCK_SIZE):
        pair = (BLOCK_SIZE, BLOCK_SIZE)
    elif isinstance(BLOCK_SIZE, (tuple, list)) and len(BLOCK_SIZE) == 2:
        pair = tuple(BLOCK_SIZE)
    else:
        raise ValueError(
            f"{function}: BLOCK_SIZE must be an int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair, "
            f"got {BLOCK_SIZE!r}"
        )
    if not all(_is_int(v) and v > 0 for v in pair):
        raise ValueError(f"{function}: BLOCK_SIZE entries must be positive ints, got {BLOCK_SIZE!r}")
    return pair


# Zero sizes are accepted, as flex_attention accepts empty batches and sequences.
def _length(function: str, name: str, value) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{function}: {name} must be a non-negative int, got {value!r}")
    return value


def _broadcast_size(function: str, name: str, value) -> int:
    if value is None:
        return 1
    if not _is_int(value) or value < 0:
        raise ValueError(f"{function}: {name} must be None (broadcast) or a non-negative int, got {value!r}")
    return value


def default_device() -> torch.device:
    """Where masks are built when no device is named: the current accelerator if there is
    one, else the CPU (torch's own default for create_block_mask / create_mask)."""
    return _compat.current_accelerator() or torch.device("cpu")


def _usable_device(function: str, device) -> torch.device:
    """``device`` (None: ``default_device()``) as a torch.device, after checking that
    tensors can live there."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{function}: {device!r} is not a device ({error})") from None
    if torch.compiler.is_compiling():
        return resolved
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{function}: device {str(resolved)!r} was requested but CUDA is not available "
            f"(torch.cuda.is_available() is False); pass device='cpu' to build the mask on the CPU"
        )
    try:
        torch.empty(0, device=resolved)
    except RuntimeError as error:
        raise RuntimeError(f"{function}: device {str(resolved)!r} is not usable: {error}") from None
    return resolved


# --------------------------------------------------------------------------------------
# BlockMask
# --------------------------------------------------------------------------------------


def _sliced_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    raise RuntimeError(
        "This BlockMask was indexed along its query-block dimension (or with index tensors on "
        "both its batch and head dimensions), so its positions no longer match the original "
        "mask_mod. Assign a mask_mod built from the original mask, shifted to the selected "
        "positions, e.g. "
        "sliced.mask_mod = lambda b, h, q, kv: original.mask_mod(b, h, q + offset, kv)."
    )


class BlockMask:
    """Block-sparse layout of an attention mask plus the element-level ``mask_mod``.

    Fields (docs/internals.md fixes their shapes): ``seq_lengths = (Q_LEN, KV_LEN)``,
    ``kv_num_blocks``/``kv_indices`` (partial KV blocks of each query block),
    ``full_kv_num_blocks``/``full_kv_indices`` (full ones, or None), their transposes
    ``q_num_blocks``/``q_indices``/``full_q_num_blocks``/``full_q_indices``,
    ``BLOCK_SIZE = (Q_BLOCK_SIZE, KV_BLOCK_SIZE)`` and ``mask_mod``.

    Optional dQ write-order metadata, as PyTorch 2.13 carries it for a deterministic
    block-sparse backward: ``dq_write_order`` / ``dq_write_order_full`` (shaped like
    ``q_indices`` / ``full_q_indices``: for KV block n and its j-th listed query block m,
    the rank of n among the KV blocks that contribute to m's dQ, in the schedule's order),
    ``dq_kv_order`` (an explicit schedule tensor) or ``dq_kv_order_spt`` (built-in
    schedule: False ascending KV blocks, True descending). It is metadata only: our
    backward computes each query block's dQ in one program, in a fixed order, so it is
    deterministic without it and does not read these fields.

    Build one with :func:`create_block_mask`, :func:`create_document_block_mask` or
    :meth:`from_kv_blocks`. The object is a plain holder of tensors, so ``torch.compile``
    can read its attributes and :meth:`as_tuple` without graph breaks.
    """

    seq_lengths: Tuple[int, int]
    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Optional[Tensor]
    full_kv_indices: Optional[Tensor]
    q_num_blocks: Optional[Tensor]
    q_indices: Optional[Tensor]
    full_q_num_blocks: Optional[Tensor]
    full_q_indices: Optional[Tensor]
    dq_write_order: Optional[Tensor]
    dq_write_order_full: Optional[Tensor]
    dq_kv_order: Optional[Tensor]
    dq_kv_order_spt: Optional[bool]
    BLOCK_SIZE: Tuple[int, int]
    mask_mod: _mask_mod_signature

    # The block lists, in the operator's order (docs/internals.md).
    _BLOCK_LIST_FIELDS = (
        "kv_num_blocks",
        "kv_indices",
        "full_kv_num_blocks",
        "full_kv_indices",
        "q_num_blocks",
        "q_indices",
        "full_q_num_blocks",
        "full_q_indices",
    )
    _DQ_METADATA_TENSOR_FIELDS = ("dq_write_order", "dq_write_order_full", "dq_kv_order")
    _TENSOR_FIELDS = _BLOCK_LIST_FIELDS + _DQ_METADATA_TENSOR_FIELDS
    # Assigning any of these drops the pattern tag (_mask_patterns.py).
    _MEANING_FIELDS = _BLOCK_LIST_FIELDS + ("seq_lengths", "BLOCK_SIZE", "mask_mod")

    # The proven pattern (_mask_patterns.FULL / CAUSAL) or None, and the version counters of
    # the block lists when it was proven (None: proven inside a compiled function, where
    # version counters cannot be read). Not annotated: the annotations are torch's fields.
    _pattern = None
    _pattern_versions = None

    def __init__(
        self,
        seq_lengths: Tuple[int, int],
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Optional[Tensor],
        full_kv_indices: Optional[Tensor],
        q_num_blocks: Optional[Tensor],
        q_indices: Optional[Tensor],
        full_q_num_blocks: Optional[Tensor],
        full_q_indices: Optional[Tensor],
        BLOCK_SIZE: _BlockSize = (_DEFAULT_SPARSE_BLOCK_SIZE, _DEFAULT_SPARSE_BLOCK_SIZE),
        mask_mod: Optional[_mask_mod_signature] = noop_mask,
        *,
        dq_write_order: Optional[Tensor] = None,
        dq_write_order_full: Optional[Tensor] = None,
        dq_kv_order: Optional[Tensor] = None,
        dq_kv_order_spt: Optional[bool] = None,
    ) -> None:
        if kv_num_blocks is None or kv_indices is None:
            raise ValueError("BlockMask: kv_num_blocks and kv_indices are required")
        if kv_indices.dim() < 2:
            raise RuntimeError(
                f"BlockMask: kv_indices must have at least 2 dims (query blocks, KV blocks), "
                f"got shape {tuple(kv_indices.shape)}"
            )
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("BlockMask: give both full_kv_num_blocks and full_kv_indices, or neither")
        if (full_q_num_blocks is None) != (full_q_indices is None):
            raise ValueError("BlockMask: give both full_q_num_blocks and full_q_indices, or neither")
        if (q_num_blocks is None) != (q_indices is None):
            raise ValueError("BlockMask: give both q_num_blocks and q_indices, or neither")
        if dq_write_order_full is not None and dq_write_order is None:
            raise ValueError("BlockMask: dq_write_order_full needs dq_write_order")
        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.dq_write_order = dq_write_order
        self.dq_write_order_full = dq_write_order_full
        self.dq_kv_order = dq_kv_order
        self.dq_kv_order_spt = dq_kv_order_spt
        self.BLOCK_SIZE = (BLOCK_SIZE, BLOCK_SIZE) if _is_int(BLOCK_SIZE) else tuple(BLOCK_SIZE)
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask

    def __setattr__(self, name, value) -> None:
        if name in BlockMask._MEANING_FIELDS and self._pattern is not None:
            object.__setattr__(self, "_pattern", None)
        object.__setattr__(self, name, value)

    def _tag_pattern(self, pattern: Optional[str]) -> "BlockMask":
        """Record the pattern its constructor proved (see ``_mask_patterns``)."""
        versions = None
        if pattern is not None and not torch.compiler.is_compiling():
            versions = tuple(t._version for t in self._block_lists() if t is not None)
        object.__setattr__(self, "_pattern", pattern)
        object.__setattr__(self, "_pattern_versions", versions)
        return self

    def _proven_pattern(self) -> Optional[str]:
        """The pattern tag, unless a field was reassigned since (``__setattr__`` drops it)
        or, in eager code, a block list was edited in place (its version counter moved).
        Compiled code cannot read version counters: an in-place edit there goes unseen, so
        edit a copy and assign it."""
        if self._pattern is None or self._pattern_versions is None or torch.compiler.is_compiling():
            return self._pattern
        versions = tuple(t._version for t in self._block_lists() if t is not None)
        return self._pattern if versions == self._pattern_versions else None

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Optional[Tensor] = None,
        full_kv_indices: Optional[Tensor] = None,
        BLOCK_SIZE: _BlockSize = _DEFAULT_SPARSE_BLOCK_SIZE,
        mask_mod: Optional[_mask_mod_signature] = None,
        seq_lengths: Optional[Tuple[int, int]] = None,
        compute_q_blocks: bool = True,
        *,
        dq_write_order: Optional[Tensor] = None,
        dq_write_order_full: Optional[Tensor] = None,
        dq_kv_order: Optional[Union[Tensor, bool]] = None,
    ) -> "BlockMask":
        """A BlockMask from its KV-side lists; the query-side transposes are derived.

        ``seq_lengths`` defaults to the block counts times the block sizes. The number of
        KV blocks is ``kv_indices.shape[-1]``. The dQ write-order metadata (see the class)
        is stored as given: ``dq_kv_order`` is a schedule tensor or the built-in
        schedule's bool.
        """
        if kv_indices.dim() < 2:
            raise RuntimeError(
                f"BlockMask.from_kv_blocks: kv_indices must have at least 2 dims, "
                f"got shape {tuple(kv_indices.shape)}"
            )
        if kv_num_blocks.shape != kv_indices.shape[:-1]:
            raise ValueError(
                f"BlockMask.from_kv_blocks: kv_num_blocks shape {tuple(kv_num_blocks.shape)} must be "
                f"kv_indices shape without its last dim, {tuple(kv_indices.shape[:-1])}"
            )
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError(
                "BlockMask.from_kv_blocks: give both full_kv_num_blocks and full_kv_indices, or neither"
            )
        if full_kv_indices is not None and (
            full_kv_indices.shape != kv_indices.shape or full_kv_num_blocks.shape != kv_num_blocks.shape
        ):
            raise ValueError(
                f"BlockMask.from_kv_blocks: full_kv_* shapes {tuple(full_kv_num_blocks.shape)}, "
                f"{tuple(full_kv_indices.shape)} must match kv_* shapes {tuple(kv_num_blocks.shape)}, "
                f"{tuple(kv_indices.shape)}"
            )
        block_size = _block_size_pair("BlockMask.from_kv_blocks", BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * block_size[0], kv_indices.shape[-1] * block_size[1])
        q_num_blocks = q_indices = full_q_num_blocks = full_q_indices = None
        if compute_q_blocks:
            q_num_blocks, q_indices = transpose_listed(kv_num_blocks, kv_indices)
            if full_kv_num_blocks is not None:
                full_q_num_blocks, full_q_indices = transpose_listed(full_kv_num_blocks, full_kv_indices)
        return cls(
            seq_lengths,
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            q_num_blocks,
            q_indices,
            full_q_num_blocks,
            full_q_indices,
            BLOCK_SIZE=block_size,
            mask_mod=mask_mod,
            dq_write_order=dq_write_order,
            dq_write_order_full=dq_write_order_full,
            dq_kv_order=dq_kv_order if isinstance(dq_kv_order, Tensor) else None,
            dq_kv_order_spt=dq_kv_order if isinstance(dq_kv_order, bool) else None,
        )

    def _block_lists(self) -> Tuple[Optional[Tensor], ...]:
        return tuple(getattr(self, field) for field in self._BLOCK_LIST_FIELDS)

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields in PyTorch 2.13's order: lengths, the eight block lists, the dQ
        write-order metadata (``dq_write_order``, ``dq_write_order_full``, ``dq_kv_order``,
        ``dq_kv_order_spt``), block sizes, ``mask_mod``.

        ``flatten=False`` keeps ``seq_lengths`` and ``BLOCK_SIZE`` as pairs. The operator
        takes :meth:`operator_tuple`, which leaves the metadata out.
        """
        if flatten:
            lengths = (self.seq_lengths[0], self.seq_lengths[1])
            block_size = (self.BLOCK_SIZE[0], self.BLOCK_SIZE[1])
        else:
            lengths = (self.seq_lengths,)
            block_size = (self.BLOCK_SIZE,)
        return (
            *lengths,
            *self._block_lists(),
            self.dq_write_order,
            self.dq_write_order_full,
            self.dq_kv_order,
            self.dq_kv_order_spt,
            *block_size,
            self.mask_mod,
        )

    @classmethod
    def from_tuple(cls, items: Sequence) -> "BlockMask":
        """The BlockMask whose flattened :meth:`as_tuple` is ``items``."""
        q_len, kv_len, *block_lists = items[:10]
        dq_write_order, dq_write_order_full, dq_kv_order, dq_kv_order_spt = items[10:14]
        q_block, kv_block, mask_mod = items[14:]
        return cls((q_len, kv_len), *block_lists, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
                   dq_write_order=dq_write_order, dq_write_order_full=dq_write_order_full,
                   dq_kv_order=dq_kv_order, dq_kv_order_spt=dq_kv_order_spt)

    def operator_tuple(self) -> tuple:
        """The 13-item block mask tuple the attention operators take (docs/internals.md):
        lengths, the eight block lists, block sizes, ``mask_mod``."""
        return (*self.seq_lengths, *self._block_lists(), *self.BLOCK_SIZE, self.mask_mod)

    @property
    def shape(self) -> Tuple[int, ...]:
        """``(*batch_dims, Q_LEN, KV_LEN)``; usually ``(B, H, Q_LEN, KV_LEN)``."""
        return tuple(self.kv_indices.shape[:-2]) + tuple(self.seq_lengths)

    def numel(self) -> int:
        """Number of (b, h, q, kv) positions the mask covers, visible or not."""
        return math.prod(self.shape)

    def _block_grid_size(self) -> int:
        return math.prod(self.kv_num_blocks.shape) * self.kv_indices.shape[-1]

    def sparsity(self) -> float:
        """Percentage of blocks the kernel skips (neither partial nor full).

        For lengths that are multiples of the block sizes this is PyTorch's figure; with a
        ragged last block we count blocks, so the result stays within [0, 100].
        """
        computed = int(self.kv_num_blocks.sum())
        if self.full_kv_num_blocks is not None:
            computed += int(self.full_kv_num_blocks.sum())
        total = self._block_grid_size()
        return 100.0 * (1.0 - computed / total) if total else 0.0

    def to_dense(self) -> Tensor:
        """int32 ``[*batch_dims, n_q_blocks, n_kv_blocks]``: 1 where a block is partial or full."""
        num_cols = self.kv_indices.shape[-1]
        visible = listed_to_dense(self.kv_num_blocks, self.kv_indices, num_cols)
        if self.full_kv_num_blocks is not None:
            visible = visible | listed_to_dense(self.full_kv_num_blocks, self.full_kv_indices, num_cols)
        return visible.to(torch.int32)

    # Picture characters, as PyTorch draws them: a cell is filled when every block it
    # covers is visible (partial or full alike), blank when none is, shaded otherwise.
    _FILLED_CELL, _MIXED_CELL, _BLANK_CELL = "█", "░", " "

    def to_string(self, grid_size: Union[int, Tuple[int, int]] = (20, 20), limit: int = 4) -> str:
        """A picture of which blocks are computed, one ``(b, h)`` entry after another, in
        PyTorch's format: two ``█`` per visible block, two spaces per empty one.

        When there are more blocks than ``grid_size`` (rows, cols; -1 for no cap), a cell
        stands for a rectangle of blocks and is ``░`` when they are mixed. At most
        ``limit`` batch entries are drawn; a note says how to see the others.
        """
        if _is_int(grid_size):
            max_rows = max_cols = grid_size
        else:
            max_rows, max_cols = grid_size
        *batch_dims, num_rows, num_cols = self.kv_indices.shape
        # A cap of -1 (or 0) is no cap: one block per cell.
        row_step = max(1, _cdiv(num_rows, max_rows)) if max_rows > 0 else 1
        col_step = max(1, _cdiv(num_cols, max_cols)) if max_cols > 0 else 1
        visible = self.to_dense().cpu()
        pictures = []
        for count, batch_index in enumerate(itertools.product(*(range(n) for n in batch_dims))):
            if count == limit:
                pictures += [
                    "...",
                    "To print out more, set BlockMask.to_string(limit=N)",
                    "You can also index (BlockMask[batch, head]) to choose a specific batch or head",
                ]
                break
            rows = self._picture_rows(visible[batch_index], row_step, col_step)
            pictures.append(f"{batch_index}\n" + "".join(row + "\n" for row in rows))
        return "\n".join(pictures)

    def _picture_rows(self, visible: Tensor, row_step: int, col_step: int) -> List[str]:
        num_rows, num_cols = visible.shape
        cell_rows, cell_cols = _cdiv(num_rows, row_step), _cdiv(num_cols, col_step)
        padding = (0, cell_cols * col_step - num_cols, 0, cell_rows * row_step - num_rows)
        # Pad with the value that cannot change each reduction, so a ragged last cell
        # summarises only the blocks it covers.
        every = F.pad(visible, padding, value=1).view(cell_rows, row_step, cell_cols, col_step).amin((1, 3))
        some = F.pad(visible, padding, value=0).view(cell_rows, row_step, cell_cols, col_step).amax((1, 3))
        return [
            "".join(2 * (self._FILLED_CELL if e else self._MIXED_CELL if s else self._BLANK_CELL)
                    for e, s in zip(every_row, some_row))
            for every_row, some_row in zip(every.tolist(), some.tolist())
        ]

    def __str__(self) -> str:
        return (f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, \n"
                f"{self.to_string().strip()}\n)")

    def __repr__(self) -> str:
        def shape_of(field: str):
            tensor = getattr(self, field)
            return None if tensor is None else tensor.shape

        fields = "".join(f"    {field}={shape_of(field)},\n" for field in self._BLOCK_LIST_FIELDS)
        return (
            f"BlockMask(\n{fields}"
            f"    BLOCK_SIZE={self.BLOCK_SIZE},\n"
            f"    shape={self.shape},\n"
            f"    sparsity={self.sparsity():.2f}%,\n"
            f"    mask_mod={getattr(self.mask_mod, '__name__', self.mask_mod)}\n"
            f")"
        )

    def __getitem__(self, index) -> "BlockMask":
        """Select batch, head and query-block entries, as PyTorch does: the index applies to
        the leading three dims of the KV-side lists with tensor-indexing semantics (slices,
        lists, integer or bool tensors of any shape), except that an int keeps its dim
        (size 1). The decoding pattern ``block_mask[:, :, input_pos // Q_BLOCK_SIZE]`` with
        ``input_pos`` of shape ``[B, 1]`` thus gives lists of shape ``[B, H, B, 1, ...]``.

        When only the batch / head dims are indexed (and the result is still
        ``[B', H', n_q_blocks]``), ``mask_mod`` is rewrapped so it keeps seeing the original
        batch / head indices; otherwise it is reset to a mod that raises, since the
        positions moved (assign a shifted one). Write-order metadata is recomputed for the
        selection.
        """
        if self.kv_num_blocks.dim() != 3:
            raise IndexError(
                f"BlockMask indexing needs the [B, H, n_q_blocks] layout, got kv_num_blocks of "
                f"shape {tuple(self.kv_num_blocks.shape)}"
            )
        if self.dq_kv_order is not None:
            raise NotImplementedError(
                "BlockMask indexing cannot carry an explicit dq_kv_order schedule tensor over to "
                "the selection; build the selected mask with from_kv_blocks and its own metadata"
            )
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError(
                f"BlockMask can be indexed on batch, head and query-block dims (3 indices at most), "
                f"got {len(index)} indices"
            )
        sizes = tuple(self.kv_num_blocks.shape)
        index = tuple(_dim_index(i, n, dim) for dim, (i, n) in enumerate(zip(index, sizes)))
        index += (slice(None),) * (3 - len(index))

        def select(tensor: Optional[Tensor]) -> Optional[Tensor]:
            return None if tensor is None else tensor[index].contiguous()

        selected = BlockMask.from_kv_blocks(
            select(self.kv_num_blocks),
            select(self.kv_indices),
            select(self.full_kv_num_blocks),
            select(self.full_kv_indices),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=self._selected_mask_mod(index),
            seq_lengths=self.seq_lengths,
            compute_q_blocks=self.q_indices is not None,
        )
        return self._with_dq_metadata_of(selected)

    def _selected_mask_mod(self, index: Tuple) -> Callable:
        """The mask_mod of ``self[index]`` (``index`` normalised to three entries)."""
        if not _selects_all(index[2]):
            return _sliced_mask_mod
        batch_heads = self.kv_num_blocks.shape[:2]
        maps = [torch.arange(n)[i.cpu() if isinstance(i, Tensor) else i] for n, i in zip(batch_heads, index[:2])]
        tensor_indices = sum(isinstance(i, (Tensor, list)) for i in index[:2])
        if tensor_indices > 1 or any(m.dim() != 1 for m in maps):
            # Index tensors on both dims combine into new dims: no per-dim map exists.
            return _sliced_mask_mod
        # Broadcast dims (size 1) pass the caller's indices through unchanged.
        batch_map, head_map = (None if n == 1 or _selects_all(i) else m
                               for n, i, m in zip(batch_heads, index[:2], maps))
        return _remap_batch_head(self.mask_mod, batch_map, head_map, self.kv_num_blocks.device)

    def _with_dq_metadata_of(self, derived: "BlockMask") -> "BlockMask":
        """``derived`` (a selection or crop of this mask) with this mask's write-order
        schedule, and its write order recomputed where this mask has one."""
        derived.dq_kv_order_spt = self.dq_kv_order_spt
        if self.dq_write_order is not None:
            derived.dq_write_order, derived.dq_write_order_full = _dq_write_order(
                derived, descending=bool(self.dq_kv_order_spt)
            )
        return derived

    def _adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """This mask cropped to its upper-left ``new_q_len x new_kv_len`` corner, with the
        same ``mask_mod`` (what flex_attention suggests for a mask built for longer
        sequences; right when the pattern does not depend on the lengths, as causal).

        Unlike PyTorch, the crop is exact for any listed order, and growing is refused: our
        ragged last blocks may be full over their existing positions only.
        """
        if self.dq_kv_order is not None:
            raise NotImplementedError(
                "BlockMask._adjust cannot carry an explicit dq_kv_order schedule tensor over; "
                "build the cropped mask with from_kv_blocks and its own metadata"
            )
        q_len, kv_len = self.seq_lengths
        if not (0 <= new_q_len <= q_len and 0 <= new_kv_len <= kv_len):
            raise ValueError(
                f"BlockMask._adjust crops a mask: the new lengths ({new_q_len}, {new_kv_len}) must lie "
                f"within its lengths ({q_len}, {kv_len}); create a new block mask for longer sequences"
            )
        rows, cols = _cdiv(new_q_len, self.BLOCK_SIZE[0]), _cdiv(new_kv_len, self.BLOCK_SIZE[1])

        def crop(num_blocks: Optional[Tensor], indices: Optional[Tensor]):
            if num_blocks is None:
                return None, None
            dense = listed_to_dense(num_blocks, indices, indices.shape[-1])
            return dense_to_listed(dense[..., :rows, :cols])

        cropped = BlockMask.from_kv_blocks(
            *crop(self.kv_num_blocks, self.kv_indices),
            *crop(self.full_kv_num_blocks, self.full_kv_indices),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=self.mask_mod,
            seq_lengths=(new_q_len, new_kv_len),
            compute_q_blocks=self.q_indices is not None,
        )
        return self._with_dq_metadata_of(cropped)

    def to(self, device: Union[torch.device, str]) -> "BlockMask":
        """A BlockMask whose tensors live on ``device`` (this one is left unchanged)."""
        moved = {field: None if getattr(self, field) is None else getattr(self, field).to(device)
                 for field in self._TENSOR_FIELDS}
        moved_mask = BlockMask(self.seq_lengths, **moved, BLOCK_SIZE=self.BLOCK_SIZE,
                               mask_mod=self.mask_mod, dq_kv_order_spt=self.dq_kv_order_spt)
        # Same tensors' values on another device: the same meaning.
        return moved_mask._tag_pattern(self._proven_pattern())


def _selects_all(index) -> bool:
    return isinstance(index, slice) and index == slice(None)


def _dim_index(index, size: int, dim: int):
    """One dim's index as tensor indexing takes it, an int turned into a one-long slice."""
    names = ("batch", "head", "query-block")
    if _is_int(index):
        if not -size <= index < size:
            raise IndexError(f"BlockMask {names[dim]} index {index} is out of range for size {size}")
        return slice(index % size, index % size + 1)
    if isinstance(index, tuple):
        return list(index)
    if isinstance(index, (slice, list)):
        return index
    if isinstance(index, Tensor) and not index.dtype.is_floating_point and not index.is_complex():
        return index
    raise IndexError(
        f"BlockMask {names[dim]} index must be an int, slice, list or integer / bool tensor, "
        f"got {type(index).__name__}"
    )


def _remap_batch_head(mask_mod: Callable, batch_map: Optional[Tensor], head_map: Optional[Tensor],
                      device: torch.device) -> Callable:
    """``mask_mod`` seen through a batch / head selection: index i of the selection calls the
    original with the i-th selected position (a single selected entry serves every index).
    The maps live on ``device``, where the mask is evaluated."""
    if batch_map is None and head_map is None:
        return mask_mod
    batch_map = None if batch_map is None else batch_map.to(device=device, dtype=torch.int32)
    head_map = None if head_map is None else head_map.to(device=device, dtype=torch.int32)

    def selected_entries_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if batch_map is not None:
            b = batch_map[b % batch_map.shape[0]]
        if head_map is not None:
            h = head_map[h % head_map.shape[0]]
        return mask_mod(b, h, q_idx, kv_idx)

    selected_entries_mask_mod.__name__ = f"{_mod_name(mask_mod)}[selected]"
    return selected_entries_mask_mod


# Registered as a pytree node so that tree utilities (and tracing entry points that
# flatten their inputs) see the tensors inside; the static part (lengths, block sizes,
# mask_mod, the write-order schedule's bool and which optional fields are absent) is the
# context.
def _flatten_block_mask(block_mask: BlockMask):
    present = tuple(f for f in BlockMask._TENSOR_FIELDS if getattr(block_mask, f) is not None)
    children = [getattr(block_mask, f) for f in present]
    context = (tuple(block_mask.seq_lengths), tuple(block_mask.BLOCK_SIZE), block_mask.mask_mod,
               block_mask.dq_kv_order_spt, present)
    return children, context


def _flatten_block_mask_with_keys(block_mask: BlockMask):
    children, context = _flatten_block_mask(block_mask)
    return [(pytree.GetAttrKey(f), c) for f, c in zip(context[-1], children)], context


def _unflatten_block_mask(children, context) -> BlockMask:
    seq_lengths, block_size, mask_mod, dq_kv_order_spt, present = context
    fields = dict.fromkeys(BlockMask._TENSOR_FIELDS)
    fields.update(zip(present, children))
    return BlockMask(seq_lengths, **fields, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                     dq_kv_order_spt=dq_kv_order_spt)


pytree.register_pytree_node(
    BlockMask,
    _flatten_block_mask,
    _unflatten_block_mask,
    serialized_type_name="inductor_flex.block_mask.BlockMask",
    flatten_with_keys_fn=_flatten_block_mask_with_keys,
)


# --------------------------------------------------------------------------------------
# Dense masks
# --------------------------------------------------------------------------------------


def _row_slabs(q_len: int, row_budget: int, row_multiple: int):
    """(start, stop) ranges of query rows, each a multiple of ``row_multiple`` rows high
    (except the last) and about ``row_budget`` rows at most."""
    height = max(row_multiple, row_budget // row_multiple * row_multiple)
    for start in range(0, q_len, height):
        yield start, min(start + height, q_len)


def create_mask(
    mod_fn: Union[_mask_mod_signature, _score_mod_signature],
    B: Optional[int],
    H: Optional[int],
    Q_LEN: int,
    KV_LEN: int,
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    """The dense bool mask ``[B or 1, H or 1, Q_LEN, KV_LEN]`` of a mask_mod or score_mod.

    A mod of five arguments is a score_mod: a position is kept unless the mod turns a zero
    score into ``-inf``. Memory beyond the result stays bounded: rows are evaluated a slab
    at a time.
    """
    fn = "create_mask"
    if not callable(mod_fn):
        raise ValueError(f"{fn}: mod_fn must be a callable mask_mod or score_mod, got {type(mod_fn).__name__}")
    arity = _required_positional_count(mod_fn)
    if arity not in (None, 4, 5):
        raise ValueError(
            f"{fn}: mod_fn must take 4 arguments (mask_mod: b, h, q_idx, kv_idx) or 5 "
            f"(score_mod: score, b, h, q_idx, kv_idx); {_mod_name(mod_fn)} takes {arity}"
        )
    B = _broadcast_size(fn, "B", B)
    H = _broadcast_size(fn, "H", H)
    Q_LEN = _length(fn, "Q_LEN", Q_LEN)
    KV_LEN = _length(fn, "KV_LEN", KV_LEN)
    device = _usable_device(fn, device)
    b, h, kv = (torch.arange(n, device=device) for n in (B, H, KV_LEN))
    mask = torch.empty(B, H, Q_LEN, KV_LEN, dtype=torch.bool, device=device)
    if mask.numel() == 0:
        return mask
    for start, stop in _row_slabs(Q_LEN, _SLAB_ELEMENT_BUDGET // (B * H * KV_LEN), 1):
        q = torch.arange(start, stop, device=device)
        if arity == 5:
            scores = torch.zeros(B, H, stop - start, KV_LEN, device=device)
            mask[:, :, start:stop] = ~torch.isneginf(score_mod_grid(mod_fn, scores, b, h, q, kv))
        else:
            mask[:, :, start:stop] = mask_mod_grid(mod_fn, b, h, q, kv)
    return mask


# --------------------------------------------------------------------------------------
# create_block_mask: exact classification, one slab of query rows at a time
# --------------------------------------------------------------------------------------


def _row_group_size(q_block: int) -> int:
    """Rows counted together per byte lane: the largest divisor of q_block below 256, so a
    lane's count never carries into the next byte."""
    return max(d for d in range(1, min(q_block, 255) + 1) if q_block % d == 0)


def _column_counts(mask: Tensor, group: int) -> Tensor:
    """How many rows are visible per column, for each run of ``group`` consecutive rows
    (the last run may be shorter): ``[nb, nh, n_groups, KV]``."""
    rows, kv_len = mask.shape[2:]
    pieces = []
    whole = rows // group * group
    for begin, end in ((0, whole), (whole, rows)):
        if end == begin:
            continue
        part = mask[:, :, begin:end]
        height = min(group, end - begin)
        if kv_len % 8 == 0:
            # Add up eight columns at once as the bytes of an int64 word: each byte lane
            # counts at most `group` < 256 rows, so no lane carries into the next, and the
            # sum read back as bytes is the per-column count.
            words = part.view(torch.int64).unflatten(2, (-1, height))
            pieces.append(words.sum(3).view(torch.uint8))
        else:
            pieces.append(part.unflatten(2, (-1, height)).sum(3, dtype=torch.int16))
    return pieces[0] if len(pieces) == 1 else torch.cat([p.to(torch.int16) for p in pieces], dim=2)


def _classify_slab(mask: Tensor, q_block: int, kv_block: int) -> Tuple[Tensor, Tensor]:
    """(some visible, all visible) per (query block, KV block) of one slab of rows.

    ``mask`` is bool ``[nb, nh, rows, KV_LEN]`` whose first row starts a query block;
    positions past the slab's last row or past KV_LEN do not exist and do not count.
    """
    mask = mask.contiguous()
    rows, kv_len = mask.shape[2:]
    group = _row_group_size(q_block)
    n_q, n_kv = _cdiv(rows, q_block), _cdiv(kv_len, kv_block)
    counts = _column_counts(mask, group)
    # Visible pairs per block: zero padding stands in for the columns and row groups a
    # ragged last block lacks.
    counts = F.pad(counts, (0, n_kv * kv_block - kv_len))
    per_group = counts.unflatten(-1, (n_kv, kv_block)).sum(-1, dtype=torch.int64)
    groups_per_block = q_block // group
    per_group = F.pad(per_group, (0, 0, 0, n_q * groups_per_block - per_group.shape[2]))
    visible = per_group.unflatten(2, (n_q, groups_per_block)).sum(3)
    # Pairs that exist per block.
    block_rows = (rows - torch.arange(n_q, device=mask.device) * q_block).clamp(max=q_block)
    block_cols = (kv_len - torch.arange(n_kv, device=mask.device) * kv_block).clamp(max=kv_block)
    existing = block_rows[:, None] * block_cols[None, :]
    return visible > 0, visible == existing


def _dependent_dims(mask_mod: Callable, B: int, H: int, device: torch.device) -> Tuple[bool, bool]:
    """Whether the mask can differ along batch and head. vmap leaves an output unbatched
    (stride 0 after broadcasting) along a dim the mod never reads, so one probe position
    answers for all of them."""
    if B == 1 and H == 1:
        return False, False
    one = torch.zeros(1, dtype=torch.int64, device=device)
    probe = mask_mod_grid(
        mask_mod, torch.arange(B, device=device), torch.arange(H, device=device), one, one
    )
    return B > 1 and probe.stride(0) != 0, H > 1 and probe.stride(1) != 0


def create_block_mask(
    mask_mod: _mask_mod_signature,
    B: Optional[int],
    H: Optional[int],
    Q_LEN: int,
    KV_LEN: int,
    device: Union[str, torch.device, None] = None,
    BLOCK_SIZE: _BlockSize = _DEFAULT_SPARSE_BLOCK_SIZE,
    _compile: bool = False,
    separate_full_blocks: bool = True,
    compute_dq_write_order: bool = False,
    dq_kv_order: bool = True,
) -> BlockMask:
    """The BlockMask of ``mask_mod`` over ``[B, H, Q_LEN, KV_LEN]`` (None: a broadcast dim;
    zero sizes give an empty mask, as flex_attention accepts them).

    Every block is classified exactly: full when each of its existing pairs is visible
    (positions past Q_LEN / KV_LEN in a ragged last block do not count), partial when some
    are, empty otherwise. ``separate_full_blocks=False`` lists every non-empty block as
    partial (the full_* fields are None), so the kernels evaluate ``mask_mod`` everywhere.
    On CUDA, ``_compile=True`` and every grid of more than ``_FUSED_MIN_PAIRS`` pairs
    (16 Mi) go to a compiled builder: one generated kernel evaluates ``mask_mod`` and reduces it per
    block without storing the mask, then the lists are ordered, with no host
    synchronisation; it is compiled once per mask_mod code (a closure over new tensors of
    the same shapes reuses it). Otherwise, or when compiling fails, ``mask_mod`` is
    evaluated over a slab of query rows at a time, so memory beyond the result is
    O(slab rows x KV_LEN), never Q_LEN x KV_LEN. On the CPU ``_compile`` has no effect: the
    slabs were measured faster there. Called inside a compiled function it is traced as
    whole-grid tensor ops, so lengths stay symbolic and Inductor fuses the evaluation into
    the block reduction (no nested compile).

    ``compute_dq_write_order=True`` also stores PyTorch's dQ write-order metadata
    (``dq_write_order``, ``dq_write_order_full``, ``dq_kv_order_spt = dq_kv_order``; the
    bool ``dq_kv_order`` picks the KV schedule: False ascending, True descending). Our
    backward does not read it: it is deterministic without it (see :class:`BlockMask`).
    """
    fn = "create_block_mask"
    if not callable(mask_mod):
        raise ValueError(f"{fn}: mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool, "
                         f"got {type(mask_mod).__name__}")
    # Dynamo cannot trace inspect.signature: it would fall back to eager for the whole
    # function and guard on the mask_mod's identity, recompiling for every new closure (a
    # compiled mask builder called once per batch). Compiled, a wrong arity fails at the call.
    arity = None if torch.compiler.is_compiling() else _required_positional_count(mask_mod)
    if arity is not None and arity != 4:
        hint = " (that looks like a score_mod; create_block_mask needs a mask_mod)" if arity == 5 else ""
        raise ValueError(
            f"{fn}: mask_mod must take 4 arguments (b, h, q_idx, kv_idx); "
            f"{_mod_name(mask_mod)} takes {arity}{hint}"
        )
    if not isinstance(dq_kv_order, bool):
        raise ValueError(f"{fn}: dq_kv_order must be a bool (False: ascending KV blocks, True: "
                         f"descending), got {type(dq_kv_order).__name__}")
    B = _broadcast_size(fn, "B", B)
    H = _broadcast_size(fn, "H", H)
    Q_LEN = _length(fn, "Q_LEN", Q_LEN)
    KV_LEN = _length(fn, "KV_LEN", KV_LEN)
    q_block, kv_block = _block_size_pair(fn, BLOCK_SIZE)
    device = _usable_device(fn, device)
    grid = (Q_LEN, KV_LEN, q_block, kv_block)
    if torch.compiler.is_compiling():
        # Traced by Dynamo (create_block_mask inside a compiled function): Python loops
        # over slabs would be unrolled and pin the lengths, and a nested compile is not
        # allowed, so trace the whole-grid builder's plain tensor ops with symbolic sizes.
        lists = _block_lists_of_grid(mask_mod, B, H, *grid, device, separate_full_blocks)
    elif 0 in (B, H, Q_LEN, KV_LEN):
        # Nothing to evaluate: no entries, or no positions on one side.
        nothing = torch.zeros(B, H, _cdiv(Q_LEN, q_block), _cdiv(KV_LEN, kv_block), dtype=torch.bool,
                              device=device)
        lists = _ordered_block_lists(nothing, nothing if separate_full_blocks else None)
    else:
        by_batch, by_head = _dependent_dims(mask_mod, B, H, device)
        batches, heads = (B if by_batch else 1), (H if by_head else 1)
        lists = None
        if _fused_build_wanted(device, batches * heads * Q_LEN * KV_LEN, _compile):
            lists = _fused_block_lists(mask_mod, batches, heads, *grid, device, separate_full_blocks)
        if lists is None:
            any_visible, all_visible = _classify_in_slabs(mask_mod, batches, heads, *grid, device)
            lists = _ordered_block_lists(*_partial_and_full(any_visible, all_visible, separate_full_blocks))
    block_mask = _block_mask_from_lists(lists, (B, H), (Q_LEN, KV_LEN), (q_block, kv_block), mask_mod)
    block_mask._tag_pattern(_mask_patterns.recognise(mask_mod, Q_LEN, KV_LEN))
    if compute_dq_write_order:
        block_mask.dq_write_order, block_mask.dq_write_order_full = _dq_write_order(block_mask, dq_kv_order)
        block_mask.dq_kv_order_spt = dq_kv_order
    return block_mask


def _classify_in_slabs(mask_mod, B: int, H: int, Q_LEN: int, KV_LEN: int, q_block: int, kv_block: int,
                       device: torch.device) -> Tuple[Tensor, Tensor]:
    """(some visible, all visible) per block ``[B, H, n_q, n_kv]``, evaluating ``mask_mod``
    one slab of query rows at a time (B / H: the batch and head entries to evaluate)."""
    batch = torch.arange(B, device=device)
    head = torch.arange(H, device=device)
    n_q, n_kv = _cdiv(Q_LEN, q_block), _cdiv(KV_LEN, kv_block)
    any_visible = torch.empty(len(batch), len(head), n_q, n_kv, dtype=torch.bool, device=device)
    all_visible = torch.empty_like(any_visible)
    kv = torch.arange(KV_LEN, device=device)

    # When one query block of every (b, h) already exceeds the budget, go one batch entry
    # (and then one head) at a time, so memory stays about one block of rows.
    row_elements = KV_LEN * q_block
    if len(batch) * len(head) * row_elements <= _SLAB_ELEMENT_BUDGET:
        groups = [(slice(None), slice(None))]
    elif len(head) * row_elements <= _SLAB_ELEMENT_BUDGET:
        groups = [(slice(i, i + 1), slice(None)) for i in range(len(batch))]
    else:
        groups = [(slice(i, i + 1), slice(j, j + 1)) for i in range(len(batch)) for j in range(len(head))]
    for batch_part, head_part in groups:
        b, h = batch[batch_part], head[head_part]
        row_budget = _SLAB_ELEMENT_BUDGET // (len(b) * len(h) * KV_LEN)
        for start, stop in _row_slabs(Q_LEN, row_budget, q_block):
            q = torch.arange(start, stop, device=device)
            block_any, block_all = _classify_slab(mask_mod_grid(mask_mod, b, h, q, kv), q_block, kv_block)
            rows = slice(start // q_block, _cdiv(stop, q_block))
            any_visible[batch_part, head_part, rows] = block_any
            all_visible[batch_part, head_part, rows] = block_all
    return any_visible, all_visible


def _classify_whole_grid(mask_mod, B, H, Q_LEN, KV_LEN, q_block: int, kv_block: int,
                         device: torch.device) -> Tuple[Tensor, Tensor]:
    """(some visible, all visible) per block, from one evaluation over the whole grid."""
    n_q, n_kv = _cdiv(Q_LEN, q_block), _cdiv(KV_LEN, kv_block)
    # The grid is evaluated over whole blocks, with the positions past Q_LEN / KV_LEN
    # clamped to the last real one (so the mod never indexes past its data) and then
    # dropped. Padding the mask instead (F.pad) makes Inductor's CPU vectorizer emit a
    # masked bool load it cannot compile (VecMask<int> vs VecMask<float>) for some lengths.
    q = torch.arange(n_q * q_block, device=device)
    kv = torch.arange(n_kv * kv_block, device=device)
    b, h = torch.arange(B, device=device), torch.arange(H, device=device)
    # Known whole blocks (plain ints, so no guard is added on symbolic lengths) need
    # neither the clamp nor the existence test: fewer operations per pair.
    whole_blocks = isinstance(Q_LEN, int) and isinstance(KV_LEN, int) and Q_LEN % q_block == 0 \
        and KV_LEN % kv_block == 0
    if whole_blocks:
        mask = mask_mod_grid(mask_mod, b, h, q, kv)
    else:
        mask = mask_mod_grid(mask_mod, b, h, q.clamp(max=Q_LEN - 1), kv.clamp(max=KV_LEN - 1))
        mask = mask & ((q < Q_LEN)[:, None] & (kv < KV_LEN)[None, :])
    count_dtype = torch.int32 if q_block * kv_block < 2 ** 31 else torch.int64  # a block's pairs
    visible = mask.view(B, H, n_q, q_block, n_kv, kv_block).sum((3, 5), dtype=count_dtype)
    block_rows = (Q_LEN - torch.arange(n_q, device=device) * q_block).clamp(max=q_block)
    block_cols = (KV_LEN - torch.arange(n_kv, device=device) * kv_block).clamp(max=kv_block)
    return visible > 0, visible == block_rows[:, None] * block_cols[None, :]


def _partial_and_full(any_visible: Tensor, all_visible: Tensor,
                      separate_full: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The partial and full block matrices (full None: every visible block listed partial)."""
    if separate_full:
        return any_visible & ~all_visible, all_visible
    return any_visible, None


def _ordered_block_lists(partial: Tensor, full: Optional[Tensor],
                         listed: Callable = dense_to_listed) -> List[Optional[Tensor]]:
    """The eight block lists, in the operator's order, of bool block matrices
    ``[b, h, n_q, n_kv]`` (``full`` None: no full blocks, those lists None), each listed
    by ``listed`` (``dense_to_listed`` or, in compiled code, ``dense_to_listed_by_search``)."""

    def ordered(dense: Optional[Tensor]) -> List[Optional[Tensor]]:
        return [None, None] if dense is None else list(listed(dense))

    transposed_full = None if full is None else full.transpose(-2, -1)
    return [*ordered(partial), *ordered(full), *ordered(partial.transpose(-2, -1)), *ordered(transposed_full)]


def _block_lists_of_grid(mask_mod, B, H, Q_LEN, KV_LEN, q_block: int, kv_block: int, device: torch.device,
                         separate_full: bool) -> List[Optional[Tensor]]:
    """The eight block lists of ``mask_mod`` over ``[B, H, Q_LEN, KV_LEN]``, as whole-grid
    tensor ops: what a compiled function traces, and what the compiled builder compiles."""
    any_visible, all_visible = _classify_whole_grid(mask_mod, B, H, Q_LEN, KV_LEN, q_block, kv_block, device)
    return _ordered_block_lists(*_partial_and_full(any_visible, all_visible, separate_full),
                                listed=dense_to_listed_by_search)


# --------------------------------------------------------------------------------------
# The compiled builder: one fused evaluation-and-reduction kernel on CUDA
# --------------------------------------------------------------------------------------

# Grids above this many (b, h, q, kv) pairs are built by the compiled builder on CUDA (or
# any size with _compile=True); smaller ones take one eager slab, quicker than a compile.
_FUSED_MIN_PAIRS = _SLAB_ELEMENT_BUDGET
_FUSED_DEVICE_TYPES = ("cuda",)
# The torch.compile backend of the builder (tests put a counting or CPU-quick one here).
_FUSED_BACKEND = "inductor"
# Compiled builders kept, one per mask_mod code object (least recently used dropped).
_FUSED_BUILDERS_KEPT = 64
# mask_mod code object (or type) -> its compiled builder, or None once compiling failed.
_fused_builders: "collections.OrderedDict[object, Optional[Callable]]" = collections.OrderedDict()


# Whether large grids take the compiled builder without ``_compile=True`` (proven on the
# H200 for issue #20: equal lists, no host sync, 0.14-0.36x PyTorch's compiled builder).
_FUSED_BY_DEFAULT = True


def _fused_build_wanted(device: torch.device, pairs: int, compile_requested: bool) -> bool:
    if device.type not in _FUSED_DEVICE_TYPES:
        return False
    return compile_requested or (_FUSED_BY_DEFAULT and pairs > _FUSED_MIN_PAIRS)


def _fused_builder_key(mask_mod: Callable):
    return getattr(mask_mod, "__code__", None) or type(mask_mod)


def _new_fused_builder(static: bool = False) -> Callable:
    """``_block_lists_of_grid`` compiled, on a code object of its own: Dynamo keeps its
    compiled variants per code object, so each mask_mod code gets its own recompile budget
    (and one mask_mod's variants never evict another's). ``static``: every length is
    compiled as a constant (one compile per length, within that budget), the fallback
    where a compile with symbolic lengths failed."""
    own_code = _block_lists_of_grid.__code__.replace()
    function = types.FunctionType(own_code, _block_lists_of_grid.__globals__, _block_lists_of_grid.__name__)
    compiled = torch.compile(function, backend=_FUSED_BACKEND, fullgraph=True,
                             dynamic=False if static else None)
    compiled._static_lengths = static
    return compiled


def _fused_block_lists(mask_mod, B: int, H: int, Q_LEN: int, KV_LEN: int, q_block: int, kv_block: int,
                       device: torch.device, separate_full: bool) -> Optional[List[Optional[Tensor]]]:
    """The eight block lists from the compiled builder, or None where it cannot serve (the
    caller then evaluates in eager slabs): compiling failed for this mask_mod's code now or
    before, or compiled functions would run eagerly (a whole-grid eager evaluation would
    hold Q_LEN x KV_LEN booleans).

    The mask_mod is an argument of the compiled function: Dynamo traces it inline, guards
    on its code, and passes the tensors it captures as graph inputs, so a new closure over
    new tensors of the same shapes (document ids of the next batch) reuses the compiled
    kernel. Lengths that change are compiled again once, then stay symbolic (Dynamo's
    automatic dynamic shapes). Where a compile fails, the builder is compiled again with
    static lengths and tried at once; only when that fails too is the mask_mod's code
    left to the eager slabs for good."""
    if _compat.compiled_calls_run_eagerly():
        return None
    key = _fused_builder_key(mask_mod)
    if key in _fused_builders:
        _fused_builders.move_to_end(key)
        builder = _fused_builders[key]
        if builder is None:
            return None
    else:
        builder = _fused_builders[key] = _new_fused_builder()
        while len(_fused_builders) > _FUSED_BUILDERS_KEPT:
            _fused_builders.popitem(last=False)
    arguments = (mask_mod, B, H, Q_LEN, KV_LEN, q_block, kv_block, device, separate_full)
    while True:
        try:
            with _compat.dynamo_raise_on_recompile_limit():
                return builder(*arguments)
        except Exception as error:  # any failure: the eager slabs serve, and report real errors
            if _compat.is_recompile_limit_error(error):
                # Too many variants of this code (lengths, captured constants): start afresh.
                _fused_builders[key] = _new_fused_builder(builder._static_lengths)
                log.debug("create_block_mask: compiled builder for %s reached the recompile limit; "
                          "renewed, eager slabs this time", _mod_name(mask_mod))
                return None
            if not builder._static_lengths:
                builder = _fused_builders[key] = _new_fused_builder(static=True)
                log.debug("create_block_mask: compiled builder failed for %s; compiling it again with "
                          "static lengths: %s", _mod_name(mask_mod), error)
                continue
            _fused_builders[key] = None
            log.debug("create_block_mask: compiled builder failed for %s, using eager slabs from now on: %s",
                      _mod_name(mask_mod), error)
            return None


def _block_mask_from_lists(
    lists: Sequence[Optional[Tensor]],
    batch_sizes: Tuple[int, int],
    seq_lengths: Tuple[int, int],
    block_size: Tuple[int, int],
    mask_mod: Callable,
) -> BlockMask:
    """A BlockMask from the eight block lists, whose batch / head dims may be 1 where the
    mask does not vary; those are broadcast to ``batch_sizes`` here, after the (cheaper)
    ordering."""

    def broadcast(tensor: Optional[Tensor]) -> Optional[Tensor]:
        if tensor is None or tuple(tensor.shape[:2]) == tuple(batch_sizes):
            return tensor
        return tensor.expand(*batch_sizes, *tensor.shape[2:]).contiguous()

    return BlockMask(seq_lengths, *map(broadcast, lists), BLOCK_SIZE=block_size, mask_mod=mask_mod)


def _dq_write_order(block_mask: BlockMask, descending: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """PyTorch's dQ write-order metadata of ``block_mask``: (for ``q_indices``, for
    ``full_q_indices`` or None), int32 ``[B, H, n_kv_blocks, n_q_blocks]``.

    Entry ``[b, h, n, j]`` is the rank of KV block n among the KV blocks (partial or full)
    of query block ``m = q_indices[b, h, n, j]``, counted in increasing KV order, or in
    decreasing order when ``descending``: the turn at which n adds its part to m's dQ in a
    deterministic schedule. Slots past ``q_num_blocks`` hold the same formula applied to
    whatever index they hold (clamped into range).
    """
    if block_mask.q_indices is None:
        raise ValueError("dQ write order needs the query-side lists (q_num_blocks / q_indices)")
    lists = [t for t in (block_mask.kv_indices, block_mask.full_kv_indices, block_mask.q_indices,
                         block_mask.full_q_indices) if t is not None]
    batch_heads = torch.broadcast_shapes(*(t.shape[:2] for t in lists))
    num_q_blocks, num_kv_blocks = block_mask.kv_indices.shape[-2], block_mask.q_indices.shape[-2]
    visible = listed_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, num_kv_blocks)
    if block_mask.full_kv_num_blocks is not None:
        visible = visible | listed_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                                              num_kv_blocks)
    visible = visible.to(torch.int32)
    # Visible KV blocks before each one, per query block (row).
    earlier = visible.cumsum(-1, dtype=torch.int32) - visible
    rank = visible.sum(-1, keepdim=True, dtype=torch.int32) - 1 - earlier if descending else earlier
    # [b, h, n, m]: rank of KV block n within query block m.
    rank_by_kv = rank.transpose(-2, -1).expand(*batch_heads, num_kv_blocks, num_q_blocks)

    def gather(q_indices: Optional[Tensor]) -> Optional[Tensor]:
        if q_indices is None:
            return None
        slots = q_indices.to(torch.int64).clamp(0, max(num_q_blocks - 1, 0))
        return rank_by_kv.gather(-1, slots.expand(*batch_heads, *slots.shape[2:])).contiguous()

    return gather(block_mask.q_indices), gather(block_mask.full_q_indices)
