"""varlen_attn(..., block_table=): key/value read from a paged cache through the page table
(CPU, the dense path; tests/gpu/test_varlen_gpu.py runs the fused kernels). The result must
be that of varlen_attn on the packed tensors: float64 per-sequence reference, error-ratio
rule against the packed path in the same dtype."""
import pytest
import torch

from inductor_flex.varlen import AuxRequest, _paged, varlen_attn
from varlen_reference import assert_error_ratio, cu_seq, packed, paged_cache, reference

Q_LENGTHS = [5, 1, 130, 3, 0, 40]
K_LENGTHS = [70, 17, 200, 16, 9, 33]  # ragged last pages, one exactly one page
HEADS, DIM = 4, 32


def case(dtype, kv_heads=HEADS, page_size=16, share_first=False, q_lengths=Q_LENGTHS,
         k_lengths=K_LENGTHS, seed=0):
    q = packed(sum(q_lengths), HEADS, DIM, dtype, seed=seed)
    k = packed(sum(k_lengths), kv_heads, DIM, dtype, seed=seed + 1)
    v = packed(sum(k_lengths), kv_heads, DIM, dtype, seed=seed + 2)
    cu_q, cu_k = cu_seq(q_lengths), cu_seq(k_lengths)
    if share_first:  # every sequence starts with the first sequence's first page of keys
        for start, length in zip(cu_k[:-1].tolist(), k_lengths):
            n = min(length, page_size, k_lengths[0])
            k[start:start + n], v[start:start + n] = k[:n], v[:n]
    pages = paged_cache(k, v, cu_k, page_size, share_first=share_first, seed=seed)
    return q, k, v, cu_q, cu_k, pages


def attend_paged(q, cu_q, pages, window=(-1, -1), **kwargs):
    key_pages, value_pages, table, used = pages
    return varlen_attn(q, key_pages, value_pages, cu_q, None, max(Q_LENGTHS), max(K_LENGTHS),
                       seqused_k=used, block_table=table, window_size=window,
                       return_aux=AuxRequest(lse=True), **kwargs)


def results(out_lse):
    return {"out": out_lse[0], "lse": out_lse[1]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (24, 3)], ids=["full", "causal", "window"])
def test_matches_the_packed_call(dtype, window):
    q, k, v, cu_q, cu_k, pages = case(dtype)
    got = results(attend_paged(q, cu_q, pages, window))
    packed_path = results(varlen_attn(q, k, v, cu_q, cu_k, 130, 200, window_size=window,
                                      return_aux=AuxRequest(lse=True)))
    golden = results(reference(*(t.double() for t in (q, k, v)), cu_q, cu_k, window=window))
    assert got["out"].shape == q.shape and got["out"].dtype == dtype
    assert got["lse"].shape == (HEADS, q.shape[0]) and got["lse"].dtype == torch.float32
    assert_error_ratio(got, packed_path, golden, dtype)


@pytest.mark.parametrize("page_size", [8, 32, 128])
def test_gqa_and_page_sizes_exact_in_float64(page_size):
    q, k, v, cu_q, cu_k, pages = case(torch.float64, kv_heads=2, page_size=page_size)
    out, lse = attend_paged(q, cu_q, pages, (-1, 0), enable_gqa=True)
    golden_out, golden_lse = reference(q, k, v, cu_q, cu_k, window=(-1, 0))
    torch.testing.assert_close(out, golden_out)
    torch.testing.assert_close(lse, golden_lse.float())


def test_placement_does_not_change_the_result():
    # The dense CPU path sums over the cache's columns, so only to rounding here; the fused
    # kernels walk pages in logical order and are bit-identical (tests/gpu).
    q, k, v, cu_q, cu_k, first = case(torch.bfloat16)
    second = paged_cache(k, v, cu_k, 16, spare_pages=7, width_extra=3, seed=11)
    assert first[2].shape != second[2].shape
    for a, b in zip(attend_paged(q, cu_q, first, (-1, 0)), attend_paged(q, cu_q, second, (-1, 0))):
        torch.testing.assert_close(a, b)


def test_used_keys_cut_the_cache_and_the_diagonal():
    # seqused_k below what the pages hold: later rows (stale data) are never keys, and the
    # bottom-right diagonal ends at the last used key.
    q, k, v, cu_q, cu_k, (key_pages, value_pages, table, _) = case(torch.float64)
    used = torch.tensor([64, 1, 150, 16, 0, 20], dtype=torch.int32)
    out, lse = attend_paged(q, cu_q, (key_pages, value_pages, table, used), (-1, 0))
    golden_out, golden_lse = reference(q, k, v, cu_q, cu_k, window=(-1, 0), used_k=used)
    torch.testing.assert_close(out, golden_out)
    torch.testing.assert_close(lse, golden_lse.float())
    assert torch.isneginf(lse[:, cu_q[4]:cu_q[5]]).all()  # the query-less document is empty


def test_a_page_shared_by_sequences_is_walked_once_per_query_block():
    # Short query sequences share a 128-query block, and every sequence's first page is
    # the same physical page: it must be listed once for that block, not once per sequence.
    q, k, v, cu_q, cu_k, pages = case(torch.float64, share_first=True)
    shared = pages[2][:, 0]
    assert (shared == shared[0]).all()
    out, lse = attend_paged(q, cu_q, pages, (-1, -1))
    golden_out, golden_lse = reference(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(out, golden_out)
    torch.testing.assert_close(lse, golden_lse.float())
    packed_view = _paged(q, pages[0], pages[1], cu_q, -1, -1, pages[3], pages[2])
    num_blocks, indices = packed_view.block_mask[2], packed_view.block_mask[3]
    for row in range(num_blocks.shape[-1]):
        listed = indices[0, 0, row, :num_blocks[0, 0, row]].tolist()
        assert len(listed) == len(set(listed)), (row, listed)


def test_compiled_matches_eager():
    q, k, v, cu_q, cu_k, pages = case(torch.bfloat16, kv_heads=2)

    def attend(q, key_pages, value_pages, table, used):
        return varlen_attn(q, key_pages, value_pages, cu_q, cu_q, 130, 200, seqused_k=used,
                           block_table=table, window_size=(-1, 0), enable_gqa=True,
                           return_aux=AuxRequest(lse=True))

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True)
    got = results(compiled(q, *pages))
    eager = results(attend(q, *pages))
    golden = results(reference(*(t.double() for t in (q, k, v)), cu_q, cu_k, window=(-1, 0)))
    assert_error_ratio(got, eager, golden, torch.bfloat16)


def test_no_backward():
    q, _, _, cu_q, _, pages = case(torch.float32)
    with pytest.raises(RuntimeError, match="inference-only"):
        attend_paged(q.requires_grad_(), cu_q, pages)


def bad_args():
    q, _, _, cu_q, _, (key_pages, value_pages, table, used) = case(torch.float32)
    return dict(query=q, key=key_pages, value=value_pages, cu_seq_q=cu_q, cu_seq_k=cu_q,
                max_q=130, max_k=200, seqused_k=used, block_table=table)


@pytest.mark.parametrize("change, message", [
    (lambda a: dict(block_table=a["block_table"].long()), "block_table must be an int32"),
    (lambda a: dict(block_table=a["block_table"][0]), "block_table must be an int32"),
    (lambda a: dict(block_table=a["block_table"][1:]), r"block_table must be an int32 \[N = 6"),
    (lambda a: dict(seqused_k=None), "block_table requires seqused_k"),
    (lambda a: dict(key=a["key"].flatten(0, 1)), r"key must be a paged \[n_pages, page_size"),
    (lambda a: dict(value=a["value"][:, :8]), "same number of pages, page size and heads"),
    (lambda a: dict(seqused_k=a["seqused_k"] + 1000), "seqused_k must lie between 0 and"),
    (lambda a: dict(max_k=100), r"max_k=100 is smaller than the longest sequence in seqused_k"),
    (lambda a: dict(block_table=a["block_table"].clone().fill_(-1)), "block_table row 0 must name"),
    (lambda a: dict(block_table=a["block_table"].clone().fill_(3)), "distinct pages"),
])
def test_bad_input(change, message):
    args = bad_args()
    args.update(change(args))
    with pytest.raises(ValueError, match=message):
        varlen_attn(**args)


def test_mods_with_block_table_are_refused():
    with pytest.raises(NotImplementedError, match="block_table"):
        varlen_attn(**bad_args(), score_mod=lambda s, b, h, q, kv: s)
