"""Paged copies of contiguous K/V for the decode benchmark and the paged tests.

``paged_cache(k, v, page_size)`` puts ``k`` / ``v`` ``[B, H_kv, N, D]`` into a
``PagedAttention`` cache (one sequence per batch entry, pages in a random order unless
``shuffle=False``); ``paged_inputs`` also converts the block mask and score_mod written for
the contiguous tensors, so that

    flex_attention(q, k, v, score_mod=s, block_mask=m)

    p = paged_inputs(k, v, page_size, block_mask=m, score_mod=s)
    flex_attention(q, p.k_cache, p.v_cache, score_mod=p.score_mod, block_mask=p.block_mask)

compute the same attention. Only the public PagedAttention API is used.
"""
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from inductor_flex import BlockMask, create_block_mask, noop_mask
from inductor_flex.paged_attention import PagedAttention


class PagedInputs(NamedTuple):
    k_cache: Tensor
    v_cache: Tensor
    block_mask: BlockMask
    score_mod: Optional[Callable]


def paged_cache(k: Tensor, v: Tensor, page_size: int, shuffle: bool = True, *,
                spare_pages: int = 0, seed: int = 0) -> Tuple[PagedAttention, Tensor, Tensor]:
    """(paged_attention, k_cache, v_cache) holding ``k`` / ``v`` ``[B, H_kv, N, D]``, batch
    entry b in page-table row b. ``shuffle=False`` gives each sequence consecutive pages in
    increasing order (the most favourable layout); ``shuffle=True`` scatters them (what a
    serving cache looks like after a while). ``spare_pages`` pages belong to nobody; they,
    and the tail of each sequence's last page, hold random values that must never be
    attended (zeros without spare pages)."""
    batch, heads, kv_len, _ = k.shape
    pages_per_sequence = -(-kv_len // page_size)
    n_pages = batch * pages_per_sequence + spare_pages
    paged = PagedAttention(n_pages, page_size, batch, device=k.device)
    order = (torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed)).tolist()
             if shuffle else list(range(n_pages)))
    # reserve() hands out the free list's last pages in list order, entry 0 first: arrange
    # the list so that entry b receives order[b * pages_per_sequence:][:pages_per_sequence].
    chunks = [order[b * pages_per_sequence:(b + 1) * pages_per_sequence] for b in range(batch)]
    paged.empty_pages = order[batch * pages_per_sequence:] + [p for chunk in reversed(chunks) for p in chunk]
    for b in range(batch):
        paged.reserve(b, kv_len)

    def cache_like(x: Tensor) -> Tensor:
        shape = (1, heads, n_pages * page_size, x.shape[-1])
        if not spare_pages:
            return torch.zeros(shape, dtype=x.dtype, device=x.device)
        generator = torch.Generator(device=x.device).manual_seed(seed + 1)
        return torch.randn(shape, generator=generator, device=x.device).to(x.dtype)

    k_cache, v_cache = cache_like(k), cache_like(v)
    input_pos = torch.arange(kv_len, device=k.device).expand(batch, kv_len)
    paged.assign(torch.arange(batch, device=k.device), input_pos, k.detach(), v.detach(), k_cache, v_cache)
    return paged, k_cache, v_cache


def paged_inputs(k: Tensor, v: Tensor, page_size: int, shuffle: bool = True, *,
                 block_mask: Optional[BlockMask] = None, score_mod: Optional[Callable] = None,
                 q_len: int = 1, spare_pages: int = 0, seed: int = 0) -> PagedInputs:
    """The paged counterpart of ``(k, v, block_mask, score_mod)`` (layout: ``paged_cache``).

    ``block_mask`` defaults to keeping everything for ``q_len`` queries (KV block size
    ``page_size``, as the conversion requires). ``score_mod`` is converted only when given:
    the converted block mask already masks positions a sequence does not own.
    """
    paged, k_cache, v_cache = paged_cache(k, v, page_size, shuffle, spare_pages=spare_pages, seed=seed)
    batch, _, kv_len, _ = k.shape
    if block_mask is None:
        block_mask = create_block_mask(noop_mask, batch, 1, q_len, kv_len, device=k.device,
                                       BLOCK_SIZE=(128, page_size))
    # A mask of batch size 1 is broadcast over the entries by naming them.
    rows = torch.arange(batch, device=k.device) if block_mask.kv_num_blocks.shape[0] == 1 and batch > 1 else None
    return PagedInputs(k_cache, v_cache, paged.convert_logical_block_mask(block_mask, rows),
                       None if score_mod is None else paged.get_score_mod(score_mod))
