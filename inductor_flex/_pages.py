"""Page-table lookups shared by ``PagedAttention`` and ``varlen_attn(block_table=)``: light,
so that importing ``varlen`` (done by ``import inductor_flex``) does not load
``paged_attention`` (exported lazily)."""
from typing import Tuple

import torch
from torch import Tensor


def page_to_logical(physical_to_logical: Tensor, row: Tensor, physical_kv: Tensor,
                    page_size: int) -> Tuple[Tensor, Tensor]:
    """(owned, logical_kv) of cache position ``physical_kv`` for the sequence whose row of
    ``physical_to_logical`` (int32 ``[rows, n_pages]``, -1 = page not owned) is ``row``.
    ``logical_kv`` is meaningless where not owned; callers mask or clamp it."""
    # aten.index directly: ``table[row, col]`` would read 0-d indices on the host wherever
    # no tracer routes it (the eager dense kernel run from a compiled graph).
    logical_block = torch.ops.aten.index.Tensor(physical_to_logical, [row, physical_kv // page_size])
    return logical_block >= 0, logical_block * page_size + physical_kv % page_size


def physical_to_logical_of_table(block_table: Tensor, pages_used: Tensor, n_pages: int) -> Tensor:
    """int32 ``[rows, n_pages]``: entry ``[r, p]`` is the logical block that page ``p`` holds
    in sequence ``r`` of the page table ``block_table [rows, width]`` (logical block ->
    page), -1 where sequence ``r`` does not own ``p``. Only the first ``pages_used[r]``
    entries of each row count (the rest may hold anything); a page listed twice in one row
    is not supported (its logical block would be ambiguous). On the device, no host read."""
    rows, width = block_table.shape
    logical = torch.arange(width, dtype=torch.int32, device=block_table.device).expand(rows, width)
    owned = logical < pages_used.to(torch.int32)[:, None]
    # Entries that do not count write into a spare column, cut off afterwards.
    target = torch.where(owned, block_table.to(torch.int64), n_pages)
    # Out of place: varlen_attn's decomposition calls this, and it must stay functional.
    table = torch.full((rows, n_pages + 1), -1, dtype=torch.int32, device=block_table.device)
    return table.scatter(1, target, torch.where(owned, logical, -1))[:, :n_pages]
