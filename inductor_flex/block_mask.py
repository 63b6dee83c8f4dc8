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

import inspect
import itertools
import math
import mmap
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _compat
from ._mods import mask_mod_grid, score_mod_grid

__all__ = [
    "BlockMask",
    "and_masks",
    "create_block_mask",
    "create_document_block_mask",
    "create_mask",
    "noop_mask",
    "or_masks",
]

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


def noop_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """The mask_mod that keeps every position (a scalar ``True``)."""
    return b.new_ones((), dtype=torch.bool)


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


def _positive_length(function: str, name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{function}: {name} must be a positive int, got {value!r}")
    return value


def _broadcast_size(function: str, name: str, value) -> int:
    if value is None:
        return 1
    if not _is_int(value) or value < 1:
        raise ValueError(f"{function}: {name} must be None (broadcast) or a positive int, got {value!r}")
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
# Ordered block lists <-> dense block matrices
# --------------------------------------------------------------------------------------


def _ordered_to_dense(num_blocks: Tensor, indices: Tensor, num_cols: int) -> Tensor:
    """bool ``[..., rows, num_cols]``: True at the first ``num_blocks`` entries of each row of
    ``indices``. The entries past ``num_blocks`` are ignored, whatever they hold."""
    slot = torch.arange(indices.shape[-1], device=indices.device)
    listed = slot < num_blocks.unsqueeze(-1)
    # Unlisted slots write into a spare column that is cut off afterwards.
    target = torch.where(listed, indices.to(torch.int64), num_cols)
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, target, torch.ones_like(target, dtype=torch.bool))
    return dense[..., :num_cols]


def _dense_to_ordered(dense: Tensor) -> Tuple[Tensor, Tensor]:
    """(num_blocks int32 ``[..., rows]``, indices int32 ``[..., rows, cols]``) of a bool block
    matrix: each row lists its True columns in increasing order, then its False ones."""
    marked = dense.to(torch.int32)
    num_blocks = marked.sum(-1, dtype=torch.int32)
    # Stable partition by rank: the k-th True column goes to slot k, the k-th False one to
    # slot num_blocks + k. Linear time, unlike a sort.
    true_rank = marked.cumsum(-1) - 1
    false_rank = num_blocks.unsqueeze(-1).to(true_rank.dtype) + (1 - marked).cumsum(-1) - 1
    slot = torch.where(dense, true_rank, false_rank)
    columns = torch.arange(dense.shape[-1], dtype=torch.int32, device=dense.device).expand(dense.shape)
    indices = torch.empty(dense.shape, dtype=torch.int32, device=dense.device)
    indices.scatter_(-1, slot, columns)
    return num_blocks, indices


def _transpose_ordered(num_blocks: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    dense = _ordered_to_dense(num_blocks, indices, indices.shape[-1])
    return _dense_to_ordered(dense.transpose(-2, -1))


# --------------------------------------------------------------------------------------
# BlockMask
# --------------------------------------------------------------------------------------


def _sliced_query_blocks_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    raise RuntimeError(
        "This BlockMask was indexed along its query-block dimension, so its query positions no "
        "longer match the original mask_mod. Assign a mask_mod built from the original mask, "
        "shifted to the selected query positions, e.g. "
        "sliced.mask_mod = lambda b, h, q, kv: original.mask_mod(b, h, q + offset, kv)."
    )


class BlockMask:
    """Block-sparse layout of an attention mask plus the element-level ``mask_mod``.

    Fields (docs/internals.md fixes their shapes): ``seq_lengths = (Q_LEN, KV_LEN)``,
    ``kv_num_blocks``/``kv_indices`` (partial KV blocks of each query block),
    ``full_kv_num_blocks``/``full_kv_indices`` (full ones, or None), their transposes
    ``q_num_blocks``/``q_indices``/``full_q_num_blocks``/``full_q_indices``,
    ``BLOCK_SIZE = (Q_BLOCK_SIZE, KV_BLOCK_SIZE)`` and ``mask_mod``.

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
    BLOCK_SIZE: Tuple[int, int]
    mask_mod: _mask_mod_signature

    _TENSOR_FIELDS = (
        "kv_num_blocks",
        "kv_indices",
        "full_kv_num_blocks",
        "full_kv_indices",
        "q_num_blocks",
        "q_indices",
        "full_q_num_blocks",
        "full_q_indices",
    )

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
        mask_mod: Optional[_mask_mod_signature] = None,
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
        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = (BLOCK_SIZE, BLOCK_SIZE) if _is_int(BLOCK_SIZE) else tuple(BLOCK_SIZE)
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask

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
    ) -> "BlockMask":
        """A BlockMask from its KV-side lists; the query-side transposes are derived.

        ``seq_lengths`` defaults to the block counts times the block sizes. The number of
        KV blocks is ``kv_indices.shape[-1]``.
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
            q_num_blocks, q_indices = _transpose_ordered(kv_num_blocks, kv_indices)
            if full_kv_num_blocks is not None:
                full_q_num_blocks, full_q_indices = _transpose_ordered(full_kv_num_blocks, full_kv_indices)
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
        )

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields in the operator's order (docs/internals.md).

        ``flatten=False`` keeps ``seq_lengths`` and ``BLOCK_SIZE`` as pairs.
        """
        if flatten:
            lengths = (self.seq_lengths[0], self.seq_lengths[1])
            block_size = (self.BLOCK_SIZE[0], self.BLOCK_SIZE[1])
        else:
            lengths = (self.seq_lengths,)
            block_size = (self.BLOCK_SIZE,)
        return (
            *lengths,
            self.kv_num_blocks,
            self.kv_indices,
            self.full_kv_num_blocks,
            self.full_kv_indices,
            self.q_num_blocks,
            self.q_indices,
            self.full_q_num_blocks,
            self.full_q_indices,
            *block_size,
            self.mask_mod,
        )

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
        visible = _ordered_to_dense(self.kv_num_blocks, self.kv_indices, num_cols)
        if self.full_kv_num_blocks is not None:
            visible = visible | _ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, num_cols)
        return visible.to(torch.int32)

    def _block_kinds(self, batch_index: Tuple[int, ...]) -> Tensor:
        """int8 ``[n_q_blocks, n_kv_blocks]`` for one batch entry: 0 empty, 1 partial, 2 full."""
        num_cols = self.kv_indices.shape[-1]
        kinds = _ordered_to_dense(
            self.kv_num_blocks[batch_index], self.kv_indices[batch_index], num_cols
        ).to(torch.int8)
        if self.full_kv_num_blocks is not None:
            full = _ordered_to_dense(self.full_kv_num_blocks[batch_index], self.full_kv_indices[batch_index], num_cols)
            kinds = torch.where(full, 2, kinds).to(torch.int8)
        return kinds.cpu()

    _PICTURE_CHARS = {0: "·", 1: "░", 2: "█"}

    def to_string(self, grid_size: Union[int, Tuple[int, int]] = (20, 20), limit: int = 4) -> str:
        """A picture of the block layout: ``█`` full, ``░`` partial, ``·`` empty.

        One character pair stands for one block, or, when there are more blocks than
        ``grid_size`` (rows, cols; -1 for no cap), for a rectangle of blocks: full when
        all of them are full, empty when all are empty, partial otherwise. At most
        ``limit`` batch entries are drawn.
        """
        if grid_size == -1:
            max_rows = max_cols = None
        elif _is_int(grid_size):
            max_rows = max_cols = grid_size
        else:
            max_rows, max_cols = grid_size
        *batch_dims, num_rows, num_cols = self.kv_indices.shape
        row_step = 1 if not max_rows else max(1, _cdiv(num_rows, max_rows))
        col_step = 1 if not max_cols else max(1, _cdiv(num_cols, max_cols))
        lines = [f"{self._PICTURE_CHARS[2] * 2} full  {self._PICTURE_CHARS[1] * 2} partial  "
                 f"{self._PICTURE_CHARS[0] * 2} empty"]
        if row_step > 1 or col_step > 1:
            lines.append(f"(each cell covers up to {row_step} x {col_step} blocks)")
        entries = list(itertools.islice(itertools.product(*(range(n) for n in batch_dims)), limit + 1))
        for count, batch_index in enumerate(entries):
            if count == limit:
                total = math.prod(batch_dims)
                lines.append(
                    f"... {total - limit} more batch entries; call to_string(limit=N) or index "
                    f"the mask (block_mask[b, h]) to see them"
                )
                break
            lines.append(str(batch_index))
            lines.extend(self._picture_rows(self._block_kinds(batch_index), row_step, col_step))
        return "\n".join(lines)

    def _picture_rows(self, kinds: Tensor, row_step: int, col_step: int) -> List[str]:
        num_rows, num_cols = kinds.shape
        cell_rows, cell_cols = _cdiv(num_rows, row_step), _cdiv(num_cols, col_step)
        padding = (0, cell_cols * col_step - num_cols, 0, cell_rows * row_step - num_rows)
        # Pad with the value that cannot change each reduction.
        lowest = F.pad(kinds, padding, value=2).view(cell_rows, row_step, cell_cols, col_step).amin((1, 3))
        highest = F.pad(kinds, padding, value=0).view(cell_rows, row_step, cell_cols, col_step).amax((1, 3))
        cell = torch.where(lowest == 2, 2, torch.where(highest == 0, 0, 1))
        return ["".join(self._PICTURE_CHARS[v] * 2 for v in row) for row in cell.tolist()]

    def __repr__(self) -> str:
        header = (
            f"BlockMask(shape={self.shape}, BLOCK_SIZE={tuple(self.BLOCK_SIZE)}, "
            f"sparsity={self.sparsity():.2f}%, mask_mod={_mod_name(self.mask_mod)}"
        )
        return header + "\n" + self.to_string() + "\n)"

    def __getitem__(self, index) -> "BlockMask":
        """Select batch, head and (optionally) query-block entries.

        Accepts up to three indices (ints, slices, 1-D integer tensors or lists); an int
        keeps its dimension (size 1), so every field stays 4-d like the original. When only
        the batch / head dims are indexed, ``mask_mod`` is rewrapped so it keeps seeing the
        original batch / head indices; indexing the query blocks resets it to a mod that
        raises, since the query positions moved (assign a shifted one).
        """
        if self.kv_num_blocks.dim() != 3:
            raise IndexError(
                f"BlockMask indexing needs the [B, H, n_q_blocks] layout, got kv_num_blocks of "
                f"shape {tuple(self.kv_num_blocks.shape)}"
            )
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError(
                f"BlockMask can be indexed on batch, head and query-block dims (3 indices at most), "
                f"got {len(index)} indices"
            )
        sizes = tuple(self.kv_num_blocks.shape)
        selections = [_dim_selection(i, n, dim) for dim, (i, n) in enumerate(zip(index, sizes))]
        selections += [None] * (3 - len(selections))

        def select(tensor: Optional[Tensor]) -> Optional[Tensor]:
            if tensor is None:
                return None
            for dim, chosen in enumerate(selections):
                if chosen is not None:
                    tensor = tensor.index_select(dim, chosen.to(tensor.device))
            return tensor.contiguous()

        if selections[2] is not None:
            mask_mod = _sliced_query_blocks_mask_mod
        else:
            # Broadcast dims (size 1) pass the caller's indices through unchanged.
            batch_map = selections[0] if sizes[0] > 1 else None
            head_map = selections[1] if sizes[1] > 1 else None
            mask_mod = _remap_batch_head(self.mask_mod, batch_map, head_map, self.kv_num_blocks.device)
        return BlockMask.from_kv_blocks(
            select(self.kv_num_blocks),
            select(self.kv_indices),
            select(self.full_kv_num_blocks),
            select(self.full_kv_indices),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=mask_mod,
            seq_lengths=self.seq_lengths,
            compute_q_blocks=self.q_indices is not None,
        )

    def to(self, device: Union[torch.device, str]) -> "BlockMask":
        """A BlockMask whose tensors live on ``device`` (this one is left unchanged)."""
        moved = [None if t is None else t.to(device) for t in (getattr(self, f) for f in self._TENSOR_FIELDS)]
        return BlockMask(self.seq_lengths, *moved, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod)


def _dim_selection(index, size: int, dim: int) -> Optional[Tensor]:
    """The chosen positions along one dim as an int64 tensor, or None for "all"."""
    names = ("batch", "head", "query-block")
    if _is_int(index):
        if not -size <= index < size:
            raise IndexError(f"BlockMask {names[dim]} index {index} is out of range for size {size}")
        return torch.tensor([index % size])
    if isinstance(index, slice):
        if index == slice(None):
            return None
        return torch.arange(size)[index]
    if isinstance(index, (list, tuple)):
        index = torch.tensor(index, dtype=torch.int64)
    if isinstance(index, Tensor):
        if index.dtype == torch.bool:
            if index.shape != (size,):
                raise IndexError(f"BlockMask boolean {names[dim]} index must have shape ({size},)")
            return index.cpu().nonzero().flatten()
        if index.dtype.is_floating_point or index.dim() > 1:
            raise IndexError(f"BlockMask {names[dim]} index tensor must be 1-D integer, got {index.dtype} "
                             f"of shape {tuple(index.shape)}")
        chosen = index.reshape(-1).to(torch.int64).cpu()
        if chosen.numel() and not bool(((chosen >= -size) & (chosen < size)).all()):
            raise IndexError(f"BlockMask {names[dim]} index out of range for size {size}")
        return chosen % size
    raise IndexError(
        f"BlockMask {names[dim]} index must be an int, slice, list or tensor, got {type(index).__name__}"
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
# mask_mod and which optional fields are absent) is the context.
def _flatten_block_mask(block_mask: BlockMask):
    present = tuple(f for f in BlockMask._TENSOR_FIELDS if getattr(block_mask, f) is not None)
    children = [getattr(block_mask, f) for f in present]
    context = (tuple(block_mask.seq_lengths), tuple(block_mask.BLOCK_SIZE), block_mask.mask_mod, present)
    return children, context


def _flatten_block_mask_with_keys(block_mask: BlockMask):
    children, context = _flatten_block_mask(block_mask)
    return [(pytree.GetAttrKey(f), c) for f, c in zip(context[3], children)], context


def _unflatten_block_mask(children, context) -> BlockMask:
    seq_lengths, block_size, mask_mod, present = context
    fields = dict.fromkeys(BlockMask._TENSOR_FIELDS)
    fields.update(zip(present, children))
    return BlockMask(seq_lengths, **fields, BLOCK_SIZE=block_size, mask_mod=mask_mod)


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
    Q_LEN = _positive_length(fn, "Q_LEN", Q_LEN)
    KV_LEN = _positive_length(fn, "KV_LEN", KV_LEN)
    device = _usable_device(fn, device)
    b, h, kv = (torch.arange(n, device=device) for n in (B, H, KV_LEN))
    mask = torch.empty(B, H, Q_LEN, KV_LEN, dtype=torch.bool, device=device)
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
) -> BlockMask:
    """The BlockMask of ``mask_mod`` over ``[B, H, Q_LEN, KV_LEN]`` (None: a broadcast dim).

    Every block is classified exactly: full when each of its existing pairs is visible
    (positions past Q_LEN / KV_LEN in a ragged last block do not count), partial when some
    are, empty otherwise. ``mask_mod`` is evaluated over a slab of query rows at a time,
    so memory beyond the result is O(slab rows x KV_LEN), never Q_LEN x KV_LEN. Called
    inside a compiled function it is traced as whole-grid tensor ops instead, so lengths
    stay symbolic and Inductor fuses the evaluation into the block reduction.
    ``_compile`` is accepted for signature compatibility and has no effect: compiling the
    slab evaluation was measured slower than this eager path on CPU.
    """
    fn = "create_block_mask"
    if not callable(mask_mod):
        raise ValueError(f"{fn}: mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool, "
                         f"got {type(mask_mod).__name__}")
    arity = _required_positional_count(mask_mod)
    if arity is not None and arity != 4:
        hint = " (that looks like a score_mod; create_block_mask needs a mask_mod)" if arity == 5 else ""
        raise ValueError(
            f"{fn}: mask_mod must take 4 arguments (b, h, q_idx, kv_idx); "
            f"{_mod_name(mask_mod)} takes {arity}{hint}"
        )
    B = _broadcast_size(fn, "B", B)
    H = _broadcast_size(fn, "H", H)
    Q_LEN = _positive_length(fn, "Q_LEN", Q_LEN)
    KV_LEN = _positive_length(fn, "KV_LEN", KV_LEN)
    q_block, kv_block = _block_size_pair(fn, BLOCK_SIZE)
    device = _usable_device(fn, device)
    if torch.compiler.is_compiling():
        # Traced by Dynamo (create_block_mask inside a compiled function): Python loops
        # over slabs would be unrolled and pin the lengths, so express the whole grid as
        # tensor ops with symbolic sizes; Inductor fuses the evaluation into the reduction.
        any_visible, all_visible = _classify_whole_grid(mask_mod, B, H, Q_LEN, KV_LEN, q_block, kv_block, device)
        return _block_mask_from_dense_blocks(
            any_visible & ~all_visible, all_visible, (B, H), (Q_LEN, KV_LEN), (q_block, kv_block), mask_mod
        )

    by_batch, by_head = _dependent_dims(mask_mod, B, H, device)
    batch = torch.arange(B if by_batch else 1, device=device)
    head = torch.arange(H if by_head else 1, device=device)
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

    partial = any_visible & ~all_visible
    return _block_mask_from_dense_blocks(
        partial, all_visible, (B, H), (Q_LEN, KV_LEN), (q_block, kv_block), mask_mod
    )


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
    mask = mask_mod_grid(mask_mod, b, h, q.clamp(max=Q_LEN - 1), kv.clamp(max=KV_LEN - 1))
    exists = (q < Q_LEN)[:, None] & (kv < KV_LEN)[None, :]
    visible = (mask & exists).view(B, H, n_q, q_block, n_kv, kv_block).sum((3, 5), dtype=torch.int64)
    block_rows = (Q_LEN - torch.arange(n_q, device=device) * q_block).clamp(max=q_block)
    block_cols = (KV_LEN - torch.arange(n_kv, device=device) * kv_block).clamp(max=kv_block)
    return visible > 0, visible == block_rows[:, None] * block_cols[None, :]


def _block_mask_from_dense_blocks(
    partial: Tensor,
    full: Tensor,
    batch_sizes: Tuple[int, int],
    seq_lengths: Tuple[int, int],
    block_size: Tuple[int, int],
    mask_mod: Callable,
) -> BlockMask:
    """A BlockMask from bool block matrices ``[b, h, n_q, n_kv]``, whose batch / head dims
    may be 1 where the mask does not vary; those are broadcast to ``batch_sizes`` after
    the (cheaper) ordering."""
    lists = []
    for dense in (partial, full, partial.transpose(-2, -1), full.transpose(-2, -1)):
        num_blocks, indices = _dense_to_ordered(dense)
        target = batch_sizes + tuple(dense.shape[2:])
        lists.append(num_blocks.expand(target[:-1]).contiguous())
        lists.append(indices.expand(target).contiguous())
    return BlockMask(seq_lengths, *lists, BLOCK_SIZE=block_size, mask_mod=mask_mod)


# --------------------------------------------------------------------------------------
# Packed documents
# --------------------------------------------------------------------------------------


class _DocumentLayout(NamedTuple):
    offsets: List[Tensor]  # per packing: int64 [n_docs + 1], offsets[0] == 0
    doc_ids: Tensor  # int32 [packings, total]: document of each position
    starts: Tensor  # int32 [packings, max_docs]: first position of each document
    total: int  # tokens per packing
    batched: bool  # given as one packing per batch entry (2-D / list of sequences)


def _as_int_tensor(function: str, name: str, value) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{function}: {name} must hold integers, got dtype {tensor.dtype}")
    return tensor.to(torch.int64)


def _document_layout(function: str, lengths, offsets, device: torch.device) -> _DocumentLayout:
    """Validate document lengths or offsets (one packing, or one per batch entry) and
    compute the document id of every position."""
    if (lengths is None) == (offsets is None):
        raise ValueError(f"{function}: give exactly one of lengths= or offsets=")
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
    all_offsets = []
    for position, packing in enumerate(packings):
        values = _as_int_tensor(function, name, packing).to(device)
        where = f"{name}[{position}]" if len(packings) > 1 else name
        if values.dim() != 1 or values.numel() == 0:
            raise ValueError(f"{function}: {where} must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
        if lengths is not None:
            if bool((values < 0).any()):
                raise ValueError(f"{function}: {where} has a negative document length")
            values = F.pad(values.cumsum(0), (1, 0))
        else:
            if int(values[0]) != 0:
                raise ValueError(f"{function}: {where} must start at 0, got {int(values[0])}")
            if values.numel() > 1 and bool((values[1:] < values[:-1]).any()):
                raise ValueError(f"{function}: {where} must be non-decreasing")
        all_offsets.append(values)
    totals = {int(o[-1]) for o in all_offsets}
    if len(totals) != 1:
        raise ValueError(f"{function}: every packing must hold the same number of tokens, got {sorted(totals)}")
    total = totals.pop()
    if total < 1:
        raise ValueError(f"{function}: the documents hold no tokens")
    max_docs = max(o.numel() - 1 for o in all_offsets)
    doc_ids = torch.empty(len(all_offsets), total, dtype=torch.int32, device=device)
    starts = torch.full((len(all_offsets), max_docs), total, dtype=torch.int32, device=device)
    for row, packing_offsets in enumerate(all_offsets):
        n_docs = packing_offsets.numel() - 1
        doc_ids[row] = torch.repeat_interleave(
            torch.arange(n_docs, dtype=torch.int32, device=device), packing_offsets.diff()
        )
        starts[row, :n_docs] = packing_offsets[:-1].to(torch.int32)
    return _DocumentLayout(all_offsets, doc_ids, starts, total, batched)


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
    if layout.doc_ids.shape[0] == 1:
        # One packing shared by every batch entry: the batch index is not needed.
        doc_ids, starts = layout.doc_ids[0], layout.starts[0]

        def doc_of(b, idx):
            return doc_ids[idx]

        def start_of(b, doc):
            return starts[doc]
    else:
        doc_ids, starts = layout.doc_ids, layout.starts

        def doc_of(b, idx):
            return doc_ids[b, idx]

        def start_of(b, doc):
            return starts[b, doc]

    def document_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_doc, kv_doc = doc_of(b, q_idx), doc_of(b, kv_idx)
        keep = q_doc == kv_doc
        if causal:
            keep = keep & (q_idx >= kv_idx)
        if inner is not None:
            keep = keep & inner(b, h, q_idx - start_of(b, q_doc), kv_idx - start_of(b, kv_doc))
        return keep

    document_mask.__name__ = "causal_document_mask" if causal else "document_mask"
    if inner is not None:
        document_mask.__name__ += f"[{_mod_name(inner)}]"
    return document_mask


class _BlockRuns(NamedTuple):
    """Per row block, its visible column blocks as runs: partial blocks are
    ``[lo, lo + n_left)`` then ``[lo + n_left + n_full, lo + n_partial + n_full)``; full blocks
    are ``[full_start, full_start + n_full)``."""

    lo: Tensor
    n_left: Tensor
    n_partial: Tensor
    n_full: Tensor
    full_start: Tensor


def _document_block_runs(
    offsets: Tensor,
    length: int,
    row_block: int,
    col_block: int,
    row_bounds_low: bool,
    row_bounds_high: bool,
    allow_full: bool,
) -> _BlockRuns:
    """Block runs of the same-document relation (with causality) for one packing.

    Rows and columns index the same positions. Causal masks cut the visible columns at
    the row block's last position (``row_bounds_high``, KV side) or start them at its
    first position (``row_bounds_low``, query side). Documents are contiguous, so the
    visible columns of a row block form one range, every block of which sees something;
    full blocks are those inside the single document of a row block that lies in one
    document, with the causal cut; the partial ones are what is left of the range.
    """
    device = offsets.device
    n_rows, n_cols = _cdiv(length, row_block), _cdiv(length, col_block)
    first = torch.arange(n_rows, device=device) * row_block
    last = (first + row_block).clamp(max=length) - 1
    doc_first = torch.searchsorted(offsets, first, right=True) - 1
    doc_last = torch.searchsorted(offsets, last, right=True) - 1
    start_first = offsets[doc_first]
    visible_low = first if row_bounds_low else start_first
    visible_high = last if row_bounds_high else offsets[doc_last + 1] - 1
    lo = visible_low // col_block
    n_visible = visible_high // col_block - lo + 1
    if allow_full:
        # Causal cuts: a full block's columns all come at or after the row block's last
        # position (query side) or at or before its first one (KV side). Within one
        # document these bounds already lie inside it.
        full_low = last if row_bounds_low else start_first
        full_high = first if row_bounds_high else offsets[doc_first + 1] - 1
        full_start = -(-full_low // col_block)
        # Last column block whose last existing position is <= full_high.
        full_end = torch.where(full_high >= length - 1, n_cols - 1, (full_high + 1) // col_block - 1)
        has_full = (doc_first == doc_last) & (full_start <= full_end)
        n_full = torch.where(has_full, full_end - full_start + 1, 0)
        n_left = torch.where(has_full, full_start - lo, 0)
        full_start = torch.where(has_full, full_start, 0)
    else:
        n_full = n_left = full_start = torch.zeros_like(lo)
    return _BlockRuns(lo, n_left, n_visible - n_full, n_full, full_start)


# A million tokens give [8192, 8192] index lists, 1 GiB for the four of them, of which a
# packed-document mask uses only a short prefix per row. A fresh anonymous mapping reads
# as zeros (valid block indices) and costs nothing until a page is written, so on the CPU
# large lists come from one and only the used prefix is written: page faults on the whole
# gigabyte would otherwise dominate the construction time.
_LAZY_ZEROS_MIN_BYTES = 16 << 20


def _zeros_int32(shape: Tuple[int, ...], device: torch.device) -> Tensor:
    nbytes = math.prod(shape) * 4
    if device.type == "cpu" and nbytes >= _LAZY_ZEROS_MIN_BYTES and hasattr(mmap, "MAP_ANONYMOUS"):
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(buffer, dtype=torch.int32).view(shape)
    return torch.zeros(shape, dtype=torch.int32, device=device)


def _write_runs(out: Tensor, count: Tensor, base: Tensor, fix_start: Optional[Tensor] = None,
                fix_count: Optional[Tensor] = None) -> None:
    """Fill the used prefix of each row of the zeroed ``out [rows, n_cols]``: slot c of row r
    := ``base[r] + c`` (capped at n_cols - 1), except the first ``fix_count[r]`` slots :=
    ``fix_start[r] + c``. The prefix is ``max(count)`` wide; later slots stay 0."""
    if out.shape[0] == 0:
        return
    width = int(count.max())
    if width == 0:
        return
    n_cols = out.shape[1]
    ramp = torch.arange(n_cols, dtype=torch.int32, device=out.device)
    capped = torch.cat([ramp, ramp.new_full((width,), n_cols - 1)])
    # Row s of the unfolded view is capped[s : s + width]; gathering rows is one copy.
    prefix = torch.index_select(capped.unfold(0, width, 1), 0, base.clamp(0, n_cols))
    if fix_count is not None:
        slots = ramp[:width]
        prefix = torch.where(slots < fix_count[:, None], fix_start[:, None].to(torch.int32) + slots, prefix)
    out[:, :width] = prefix


def create_document_block_mask(
    lengths=None,
    offsets=None,
    causal: bool = True,
    mask_mod: Optional[_mask_mod_signature] = None,
    BLOCK_SIZE: _BlockSize = _DEFAULT_SPARSE_BLOCK_SIZE,
    device: Optional[Union[str, torch.device]] = None,
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

    The result's ``mask_mod`` is the exact element mask (it closes over the document ids).
    Work is proportional to the number of blocks.
    """
    fn = "create_document_block_mask"
    if mask_mod is not None and not callable(mask_mod):
        raise ValueError(f"{fn}: mask_mod must be a callable (b, h, q_idx, kv_idx), got {type(mask_mod).__name__}")
    q_block, kv_block = _block_size_pair(fn, BLOCK_SIZE)
    device = _document_device(fn, lengths, offsets, device)
    layout = _document_layout(fn, lengths, offsets, device)
    total = layout.total
    n_q, n_kv = _cdiv(total, q_block), _cdiv(total, kv_block)
    packings = len(layout.offsets)

    has_full = mask_mod is None

    def lists_for(rows: int, cols: int) -> List[Tensor]:
        # [num_blocks, indices], then their full versions when there are any.
        sizes = [(packings, 1, rows), (packings, 1, rows, cols)] * (2 if has_full else 1)
        return [_zeros_int32(size, device) for size in sizes]

    kv_lists, q_lists = lists_for(n_q, n_kv), lists_for(n_kv, n_q)
    for p, packing_offsets in enumerate(layout.offsets):
        for lists, rows, cols, low, high in (
            (kv_lists, q_block, kv_block, False, causal),
            (q_lists, kv_block, q_block, causal, False),
        ):
            runs = _document_block_runs(packing_offsets, total, rows, cols, low, high, has_full)
            lists[0][p, 0] = runs.n_partial
            _write_runs(lists[1][p, 0], runs.n_partial, runs.lo + runs.n_full, runs.lo, runs.n_left)
            if has_full:
                lists[2][p, 0] = runs.n_full
                _write_runs(lists[3][p, 0], runs.n_full, runs.full_start)
    if not has_full:
        # No block is known to be full: the inner mask_mod must run everywhere.
        kv_lists += [None, None]
        q_lists += [None, None]
    return BlockMask(
        (total, total),
        kv_lists[0],
        kv_lists[1],
        kv_lists[2],
        kv_lists[3],
        q_lists[0],
        q_lists[1],
        q_lists[2],
        q_lists[3],
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=_document_mask_mod(layout, causal, mask_mod),
    )
