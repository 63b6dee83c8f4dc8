"""PagedAttention: a KV cache of fixed-size pages shared by a batch of sequences.

The API is that of PyTorch's experimental ``PagedAttention``: the caches are
``[1, H_kv, n_pages * page_size, D]``; ``reserve`` gives a batch entry pages until it holds
a length, ``erase`` returns them, ``assign`` writes keys and values at logical positions,
and ``convert_logical_block_mask`` / ``get_mask_mod`` / ``get_score_mod`` turn a block
mask and mods written for the logical (contiguous) sequence into ones over the cache.

How it stays exact and placement-independent (docs/internals.md, "Paged KV caches"):

* A page is one KV block of the block mask (``page_size == KV_BLOCK_SIZE``), so a block
  never straddles two pages and the kernels' tiles see the same tokens, in the same order,
  wherever the pages lie.
* The converted block lists name physical pages in logical order (not in increasing page
  order): the kernels walk a sequence front to back whatever pages it got, so results do
  not depend on the page assignment.
* Blocks without a page, or past the logical mask's KV_LEN or ``kv_len``, are dropped from
  the lists; a full block that ``kv_len`` (or a ragged logical KV_LEN) cuts becomes partial,
  and the converted mask_mod drops the positions past the end, so stale cache rows are
  never read as keys.

Bookkeeping (``reserve``, ``erase``) runs on the host against Python mirrors of the page
table: it reads its arguments once (a sync when they live on the GPU) and writes the device
tables without reading them back. ``assign`` and ``convert_logical_block_mask`` are tensor
programs without host syncs, and the converted mods are traceable tensor lookups.
"""
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._block_lists import dense_to_listed, listed_to_dense
from ._mods import identity_score_mod
from ._pages import page_to_logical
from .block_mask import BlockMask, noop_mask
from .masks._checks import positive_int

__all__ = ["PagedAttention"]


def _host_int(function: str, name: str, value) -> int:
    """``value`` (an int, or a tensor holding one integer) as a Python int."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"{function}: {name} must be an int or a one-element integer tensor, "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{function}: {name} must be an int or a one-element integer tensor, "
                         f"got {type(value).__name__}")
    return value


def _require_integer_tensor(function: str, name: str, value, dims: int) -> Tensor:
    if not isinstance(value, Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool \
            or value.dim() != dims:
        described = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
                     else type(value).__name__)
        raise ValueError(f"{function}: {name} must be a {dims}-D integer tensor, got {described}")
    return value


class PagedAttention:
    """A page table over a KV cache of ``n_pages`` pages of ``page_size`` tokens, for up to
    ``max_batch_size`` sequences at once (PyTorch's experimental API and semantics).

    Attributes, as PyTorch keeps them: ``page_table`` int64 ``[max_batch_size, n_pages]``
    (logical block -> physical page, -1 where none), ``capacity`` int64 ``[max_batch_size]``
    (tokens reserved), ``physical_to_logical`` ``[max_batch_size, n_pages]`` (physical page
    -> logical block of that batch entry, -1 elsewhere; int32 here, the converted mods look
    it up per score) and ``empty_pages`` (the free list: pages are taken from its end and
    erased pages appended, so allocation order matches PyTorch's).
    """

    def __init__(self, n_pages: int, page_size: int, max_batch_size: int, device: str = "cuda") -> None:
        fn = "PagedAttention"
        self.n_pages = positive_int(fn, "n_pages", n_pages)
        self.page_size = positive_int(fn, "page_size", page_size)
        self.max_batch_size = positive_int(fn, "max_batch_size", max_batch_size)
        self.page_table = torch.full((max_batch_size, n_pages), -1, dtype=torch.int64, device=device)
        self.capacity = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.physical_to_logical = torch.full((max_batch_size, n_pages), -1, dtype=torch.int32,
                                              device=device)
        self.empty_pages: List[int] = list(range(n_pages - 1, -1, -1))
        # Host mirrors of each entry's pages (in logical order), so bookkeeping never reads
        # the device tables back.
        self._pages_of: List[List[int]] = [[] for _ in range(max_batch_size)]

    # ----------------------------------------------------------------------------------
    # Bookkeeping (host)
    # ----------------------------------------------------------------------------------

    def _batch_entry(self, function: str, batch_idx) -> int:
        entry = _host_int(function, "batch_idx", batch_idx)
        if not 0 <= entry < self.max_batch_size:
            raise ValueError(f"{function}: batch_idx {entry} is out of range for max_batch_size "
                             f"{self.max_batch_size}")
        return entry

    def reserve(self, batch_idx, seq_len) -> None:
        """Give batch entry ``batch_idx`` pages until it holds at least ``seq_len`` tokens
        (both an int or a one-element tensor). Never shrinks; raises ``RuntimeError`` when
        fewer pages are free than needed."""
        fn = "PagedAttention.reserve"
        entry = self._batch_entry(fn, batch_idx)
        length = _host_int(fn, "seq_len", seq_len)
        if length < 0:
            raise ValueError(f"{fn}: seq_len must be non-negative, got {length}")
        owned = self._pages_of[entry]
        needed = -(-length // self.page_size) - len(owned)
        if needed <= 0:
            return
        if needed > len(self.empty_pages):
            raise RuntimeError(
                f"{fn}: batch entry {entry} needs {needed} more pages of {self.page_size} tokens "
                f"to hold seq_len {length}, but only {len(self.empty_pages)} of {self.n_pages} "
                f"pages are free; erase finished sequences or create PagedAttention with more "
                f"n_pages")
        pages = self.empty_pages[-needed:]
        del self.empty_pages[-needed:]
        first = len(owned)
        owned.extend(pages)
        device = self.page_table.device
        physical = torch.tensor(pages, dtype=torch.int64, device=device)
        logical = torch.arange(first, first + needed, dtype=torch.int32, device=device)
        self.page_table[entry, first:first + needed] = physical
        self.physical_to_logical[entry, physical] = logical
        self.capacity[entry] = len(owned) * self.page_size

    def erase(self, batch_idx) -> None:
        """Free every page of batch entry ``batch_idx`` (an int or a one-element tensor);
        they go back to the free list and are handed out again by later reservations."""
        entry = self._batch_entry("PagedAttention.erase", batch_idx)
        self.empty_pages.extend(self._pages_of[entry])
        self._pages_of[entry] = []
        self.page_table[entry] = -1
        self.physical_to_logical[entry] = -1
        self.capacity[entry] = 0

    # ----------------------------------------------------------------------------------
    # Writing the cache (device)
    # ----------------------------------------------------------------------------------

    def assign(self, batch_idx: Tensor, input_pos: Tensor, k_val: Tensor, v_val: Tensor,
               k_cache: Tensor, v_cache: Tensor) -> None:
        """Write ``k_val`` / ``v_val`` ``[B, H, S, D]`` at the logical positions
        ``input_pos [B, S]`` of the entries ``batch_idx [B]`` into ``k_cache`` / ``v_cache``
        ``[1, H, n_pages * page_size, D]``. The positions must lie within each entry's
        reserved capacity (checked on the device, without a host sync)."""
        fn = "PagedAttention.assign"
        if k_val.requires_grad or v_val.requires_grad:
            raise RuntimeError(f"{fn}: k_val and v_val must not require grad (the cache is "
                               f"written in place); pass them detached")
        _require_integer_tensor(fn, "batch_idx", batch_idx, 1)
        _require_integer_tensor(fn, "input_pos", input_pos, 2)
        slots = self.n_pages * self.page_size
        for name, value, cache in (("k", k_val, k_cache), ("v", v_val, v_cache)):
            if value.dim() != 4 or cache.dim() != 4:
                raise ValueError(f"{fn}: {name}_val and {name}_cache must be 4-D, got shapes "
                                 f"{tuple(value.shape)} and {tuple(cache.shape)}")
            if cache.shape[0] != 1 or cache.shape[2] != slots:
                raise ValueError(f"{fn}: {name}_cache must be [1, H, n_pages * page_size = {slots}, D], "
                                 f"got {tuple(cache.shape)}")
            if value.shape[0] != batch_idx.shape[0] or value.shape[2] != input_pos.shape[1] \
                    or input_pos.shape[0] != batch_idx.shape[0]:
                raise ValueError(f"{fn}: {name}_val {tuple(value.shape)} must be [B, H, S, D] with "
                                 f"B = len(batch_idx) = {batch_idx.shape[0]} and input_pos "
                                 f"[B, S], got input_pos {tuple(input_pos.shape)}")
            if value.shape[1] != cache.shape[1] or value.shape[3] != cache.shape[3]:
                raise ValueError(f"{fn}: {name}_val has {value.shape[1]} heads of dim {value.shape[3]} "
                                 f"but {name}_cache {cache.shape[1]} of dim {cache.shape[3]}")
            if value.dtype != cache.dtype or value.device != cache.device:
                raise ValueError(f"{fn}: {name}_val ({value.dtype}, {value.device}) must match "
                                 f"{name}_cache ({cache.dtype}, {cache.device})")
        rows = self.page_table[batch_idx]  # [B, n_pages]
        position = input_pos.to(torch.int64)
        within = (position >= 0) & (position < self.capacity[batch_idx].unsqueeze(1))
        torch._assert_async(within.all(), f"{fn}: input_pos outside the capacity reserved for "
                                          f"its batch entry (call reserve first)")
        logical_block = (position // self.page_size).clamp(0, self.n_pages - 1)
        page = rows.gather(1, logical_block)
        address = (page * self.page_size + position % self.page_size).flatten()
        for value, cache in ((k_val, k_cache), (v_val, v_cache)):
            # [B, H, S, D] -> [1, H, B * S, D], ordered like the flattened addresses.
            heads, dim = value.shape[1], value.shape[3]
            rows_first = value.transpose(0, 1).reshape(1, heads, -1, dim)
            cache.index_copy_(2, address, rows_first)

    # ----------------------------------------------------------------------------------
    # Logical -> physical views (device)
    # ----------------------------------------------------------------------------------

    def _logical_positions(self, b: Tensor, physical_kv: Tensor, kv_len: Optional[Tensor],
                           table_rows: Optional[Tensor], logical_kv_len: Optional[int]) -> Tuple[Tensor, Tensor]:
        """(valid, logical_kv) of cache position ``physical_kv`` for batch entry ``b``:
        valid where the page belongs to the entry and the logical position is before the
        ends given; logical_kv is clamped to 0 elsewhere, so a mod indexing with it stays in
        range. ``table_rows[b]`` is the page-table row of ``b`` (None: ``b`` itself)."""
        row = b if table_rows is None else table_rows[b]
        valid, logical_kv = page_to_logical(self.physical_to_logical, row, physical_kv, self.page_size)
        if kv_len is not None:
            valid = valid & (logical_kv < kv_len[b])
        if logical_kv_len is not None:
            valid = valid & (logical_kv < logical_kv_len)
        return valid, torch.where(valid, logical_kv, 0)

    def _converted_mask_mod(self, mask_mod: Optional[Callable], kv_len: Optional[Tensor],
                            table_rows: Optional[Tensor] = None,
                            logical_kv_len: Optional[int] = None) -> Callable:
        logical_mask_mod = noop_mask if mask_mod is None else mask_mod

        def paged_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, physical_kv_idx: Tensor) -> Tensor:
            valid, logical_kv = self._logical_positions(b, physical_kv_idx, kv_len, table_rows, logical_kv_len)
            return valid & logical_mask_mod(b, h, q_idx, logical_kv)

        return paged_mask_mod

    def get_mask_mod(self, mask_mod: Optional[Callable], kv_len: Optional[Tensor] = None) -> Callable:
        """The mask_mod over cache positions of ``mask_mod`` (None: keep all) written for
        logical positions: it keeps a position when its page belongs to the batch entry
        ``b``, the logical position is below ``kv_len[b]`` (when given) and ``mask_mod``
        keeps the logical position."""
        return self._converted_mask_mod(mask_mod, kv_len)

    def get_score_mod(self, score_mod: Optional[Callable], kv_len: Optional[Tensor] = None) -> Callable:
        """The score_mod over cache positions of ``score_mod`` (None: identity) written for
        logical positions; positions the entry does not own (or past ``kv_len[b]``) get
        -inf. With a converted block mask those are masked already, so a score_mod that
        ignores ``kv_idx`` needs no conversion."""
        logical_score_mod = identity_score_mod if score_mod is None else score_mod

        def paged_score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor,
                            physical_kv_idx: Tensor) -> Tensor:
            valid, logical_kv = self._logical_positions(b, physical_kv_idx, kv_len, None, None)
            return torch.where(valid, logical_score_mod(score, b, h, q_idx, logical_kv), float("-inf"))

        return paged_score_mod

    def convert_logical_block_mask(self, block_mask: BlockMask, batch_idx: Optional[Tensor] = None,
                                   kv_len: Optional[Tensor] = None) -> BlockMask:
        """The BlockMask over the cache (``KV_LEN = n_pages * page_size``) of ``block_mask``,
        written for logical positions.

        ``batch_idx [B]`` names the page-table row of each batch entry of the call (default:
        entry i is row i); a block mask of batch size 1 is broadcast to them. ``kv_len [B]``
        (optional) is each entry's length: positions at or past it are masked. The page
        size must equal the mask's KV block size. Rebuild the mask after ``reserve`` or
        ``erase`` changes the pages; the converted mask_mod reads the live table.
        """
        fn = "PagedAttention.convert_logical_block_mask"
        q_block, kv_block = block_mask.BLOCK_SIZE
        if kv_block != self.page_size:
            raise ValueError(
                f"{fn}: block_mask's KV block size ({kv_block}) must equal page_size "
                f"({self.page_size}); create the block mask with BLOCK_SIZE=({q_block}, {self.page_size})")
        if block_mask.kv_indices.dim() != 4:
            raise ValueError(f"{fn}: block_mask must have [B, H, query blocks, KV blocks] lists, got "
                             f"kv_indices of shape {tuple(block_mask.kv_indices.shape)}")
        mask_batch, heads, rows, logical_cols = block_mask.kv_indices.shape
        device = block_mask.kv_indices.device
        # The converted mask_mod maps a call's batch entry to its page-table row only when
        # batch_idx may differ from the identity.
        rows_given = batch_idx is not None
        if batch_idx is None:
            if mask_batch == 1 and self.max_batch_size > 1:
                raise ValueError(
                    f"{fn}: block_mask has batch size 1 (broadcast), so batch_idx must name the "
                    f"page-table rows of the call's batch entries")
            batch_idx = torch.arange(mask_batch, device=device)
        batch_idx = _require_integer_tensor(fn, "batch_idx", batch_idx, 1).to(device)
        table_rows = batch_idx if rows_given else None
        batch = batch_idx.shape[0]
        if mask_batch not in (1, batch):
            raise ValueError(f"{fn}: block_mask has batch size {mask_batch} but batch_idx names "
                             f"{batch} entries (the mask's batch must be 1 or equal)")
        if kv_len is not None:
            _require_integer_tensor(fn, "kv_len", kv_len, 1)
            if kv_len.shape[0] != batch:
                raise ValueError(f"{fn}: kv_len must have one length per batch entry ({batch}), got "
                                 f"shape {tuple(kv_len.shape)}")

        # Work in the logical block domain: which logical blocks are partial / full, as
        # bool matrices, restricted to those that have a page and lie before the end.
        q_len, logical_kv_len = block_mask.seq_lengths
        columns = min(logical_cols, self.n_pages)
        pages = self.page_table.to(device)[batch_idx][:, :columns]  # [B, columns]
        block_start = torch.arange(columns, device=device) * self.page_size
        end = torch.full((batch,), logical_kv_len, dtype=torch.int64, device=device)
        if kv_len is not None:
            kv_len = kv_len.to(device)
            end = torch.minimum(end, kv_len.to(torch.int64))
        end = end[:, None]
        usable = ((pages >= 0) & (block_start < end))[:, None, None, :]
        whole = (block_start + self.page_size <= end)[:, None, None, :]

        def logical_dense(num_blocks: Tensor, indices: Tensor) -> Tensor:
            dense = listed_to_dense(num_blocks, indices, logical_cols)[..., :columns]
            return dense.expand(batch, heads, rows, columns)

        partial = logical_dense(block_mask.kv_num_blocks, block_mask.kv_indices)
        full = None
        if block_mask.full_kv_num_blocks is not None:
            listed_full = logical_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
            partial = partial | (listed_full & ~whole)
            full = listed_full & whole & usable
        partial = partial & usable

        def physical_lists(dense: Optional[Tensor]) -> List[Optional[Tensor]]:
            if dense is None:
                return [None, None]
            # Listed in increasing logical order, then mapped to pages: the kernels walk a
            # sequence front to back whatever pages it got. Unlisted slots may name blocks
            # without a page (-1); they are never read, but must stay in range.
            num_blocks, logical = dense_to_listed(dense)
            physical = pages[:, None, None, :].expand(dense.shape).gather(-1, logical.to(torch.int64))
            physical = F.pad(physical.clamp(min=0).to(torch.int32), (0, self.n_pages - columns))
            return [num_blocks, physical]

        paged_mask_mod = self._converted_mask_mod(
            block_mask.mask_mod, kv_len, table_rows=table_rows,
            logical_kv_len=logical_kv_len if logical_kv_len % self.page_size else None)
        return BlockMask.from_kv_blocks(
            *physical_lists(partial), *physical_lists(full), BLOCK_SIZE=(q_block, kv_block),
            mask_mod=paged_mask_mod, seq_lengths=(q_len, self.n_pages * self.page_size))
