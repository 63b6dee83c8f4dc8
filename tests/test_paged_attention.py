"""PagedAttention (inductor_flex/paged_attention.py) on the CPU: eager and compiled (the
CPU's compiled path is the exact extern call), bookkeeping against PyTorch's own class.

Numerics follow PyTorch's paged runs, re-expressed: a paged call (K/V scattered over
shuffled pages, converted block mask and score_mod) against the float64 contiguous golden
with the error-ratio rule (tests/gpu/flex_check.py: 1.1x the eager same-dtype contiguous
error for fp16 / bf16; 20x for fp32, PyTorch's allowance for paged runs), for output, lse
and max_scores.
"""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from inductor_flex import create_block_mask, flex_attention, noop_mask
from inductor_flex.paged_attention import PagedAttention

from gpu.flex_check import (PAGED_FACTOR, causal_at_end, check_against_golden, paged_flex,
                            paged_helpers, paged_suite_score_mods, qkv)

SCORE_MODS = paged_suite_score_mods(4)
relative_bias = SCORE_MODS["relative_bias"]
paged_cache = paged_helpers.paged_cache


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


# ---------------------------------------------------------------------------------------
# Numerics against the float64 golden
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(SCORE_MODS))
def test_eager_paged_matches_golden(name, dtype):
    # GQA, Q_LEN != KV_LEN, a ragged last page, spare pages full of garbage.
    q, k, v = qkv("cpu", dtype, B=2, Hq=4, Hkv=2, M=40, N=200, E=16)
    check_against_golden(q, k, v, compiled=paged_flex(page_size=32), factor=PAGED_FACTOR[dtype],
                         score_mod=SCORE_MODS[name], enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_paged_with_causal_block_mask(dtype):
    q, k, v = qkv("cpu", dtype, B=2, Hq=4, Hkv=2, M=40, N=200, E=16)
    mask = create_block_mask(causal_at_end(40, 200), 2, 1, 40, 200, device="cpu", BLOCK_SIZE=32)
    compiled = torch.compile(flex_attention)
    for score_mod in (None, relative_bias):
        check_against_golden(q, k, v, compiled=paged_flex(compiled, page_size=32), factor=PAGED_FACTOR[dtype],
                             score_mod=score_mod, block_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_queries_against_a_1024_token_cache(q_len, dtype):
    q, k, v = qkv("cpu", dtype, B=2, Hq=4, Hkv=2, M=q_len, N=1024, E=16)
    mask = create_block_mask(causal_at_end(q_len, 1024), 2, 1, q_len, 1024, device="cpu")
    for run in (flex_attention, torch.compile(flex_attention)):
        check_against_golden(q, k, v, compiled=paged_flex(run, page_size=128),
                             factor=PAGED_FACTOR[dtype], score_mod=SCORE_MODS["alibi"],
                             block_mask=mask, enable_gqa=True)


def test_results_do_not_depend_on_the_page_assignment():
    q, k, v = qkv("cpu", torch.float32, B=3, Hq=2, M=24, N=150, E=16)
    mask = create_block_mask(causal_at_end(24, 150), 3, 1, 24, 150, device="cpu", BLOCK_SIZE=32)
    outs = [paged_flex(page_size=32, shuffle=shuffle, seed=seed)(q, k, v, score_mod=relative_bias, block_mask=mask)
            for shuffle, seed in ((False, 0), (True, 0), (True, 5))]
    reference = flex_attention(q, k, v, score_mod=relative_bias, block_mask=mask)
    for out in outs:
        torch.testing.assert_close(out, reference, atol=2e-6, rtol=2e-6)


def test_converted_lists_walk_each_sequence_front_to_back():
    k = torch.randn(2, 1, 256, 8)
    mask = create_block_mask(causal_at_end(64, 256), 2, 1, 64, 256, device="cpu", BLOCK_SIZE=32)
    paged = PagedAttention(20, 32, 2, device="cpu")
    paged.empty_pages = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()
    for b in range(2):
        paged.reserve(b, 256)
    converted = paged.convert_logical_block_mask(mask)
    assert converted.seq_lengths == (64, 20 * 32)
    assert converted.kv_indices.shape == (2, 1, 2, 20)
    for kind in ("kv", "full_kv"):
        num = getattr(converted, f"{kind}_num_blocks")
        physical = getattr(converted, f"{kind}_indices")
        expected_num = getattr(mask, f"{kind}_num_blocks")
        assert torch.equal(num, expected_num)
        for b in range(2):
            for row in range(2):
                pages = physical[b, 0, row, :num[b, 0, row]].long()
                logical = paged.physical_to_logical[b, pages]
                assert torch.equal(logical, getattr(mask, f"{kind}_indices")[b, 0, row, :num[b, 0, row]].to(logical))
                assert (logical.diff() > 0).all(), "pages are listed in logical order"


def test_kv_len_masks_the_tail_of_each_sequence():
    q, k, v = qkv("cpu", torch.float32, B=2, Hq=2, M=8, N=128, E=16)
    lengths = torch.tensor([70, 33])
    paged, k_cache, v_cache = paged_cache(k, v, 32, spare_pages=2)
    logical = create_block_mask(noop_mask, 2, 1, 8, 128, device="cpu", BLOCK_SIZE=32)
    expected = flex_attention(q, k, v, block_mask=create_block_mask(
        lambda b, h, q_idx, kv_idx: kv_idx < lengths[b], 2, 1, 8, 128, device="cpu", BLOCK_SIZE=32))
    converted = paged.convert_logical_block_mask(logical, kv_len=lengths)
    # Full logical blocks cut by kv_len become partial (their tails are masked); blocks past
    # it are dropped.
    assert converted.full_kv_num_blocks.flatten().tolist() == [2, 1]
    assert converted.kv_num_blocks.flatten().tolist() == [1, 1]
    out = flex_attention(q, k_cache, v_cache, block_mask=converted)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # Without kv_len in the mask, the converted score_mod alone masks the tails.
    out = flex_attention(q, k_cache, v_cache, score_mod=paged.get_score_mod(None, kv_len=lengths),
                         block_mask=paged.convert_logical_block_mask(logical))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_a_broadcast_mask_for_chosen_batch_entries():
    q, k, v = qkv("cpu", torch.float32, B=3, Hq=2, M=16, N=96, E=16)
    paged, k_cache, v_cache = paged_cache(k, v, 32, spare_pages=1)
    mask = create_block_mask(causal_at_end(16, 96), 1, 1, 16, 96, device="cpu", BLOCK_SIZE=32)
    converted = paged.convert_logical_block_mask(mask, batch_idx=torch.tensor([2, 0]))
    assert converted.kv_num_blocks.shape[0] == 2
    out = flex_attention(q[[2, 0]], k_cache, v_cache, block_mask=converted)
    expected = flex_attention(q[[2, 0]], k[[2, 0]], v[[2, 0]], block_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_a_compiled_decoding_step_writes_and_reads_without_graph_breaks():
    dtype, page_size = torch.float32, 32
    q, k, v = qkv("cpu", dtype, B=2, Hq=4, Hkv=2, M=1, N=96, E=16)
    paged = PagedAttention(8, page_size, 2, device="cpu")
    for b in range(2):
        paged.reserve(b, 96)
    k_cache = torch.zeros(1, 2, 8 * page_size, 16)
    v_cache = torch.zeros_like(k_cache)
    batch_idx = torch.arange(2)
    paged.assign(batch_idx, torch.arange(95).expand(2, 95), k[:, :, :95], v[:, :, :95], k_cache, v_cache)
    mask = paged.convert_logical_block_mask(
        create_block_mask(noop_mask, 2, 1, 1, 96, device="cpu", BLOCK_SIZE=(128, page_size)))
    alibi = paged.get_score_mod(SCORE_MODS["alibi"])

    def step(q, k_new, v_new, position):
        paged.assign(batch_idx, position, k_new, v_new, k_cache, v_cache)
        return flex_attention(q, k_cache, v_cache, score_mod=alibi, block_mask=mask, enable_gqa=True)

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    out = compiled(q, k[:, :, 95:], v[:, :, 95:], torch.full((2, 1), 95))
    expected = flex_attention(q, k, v, score_mod=SCORE_MODS["alibi"], enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1


def test_a_growing_cache_reconverted_every_step_compiles_once():
    page_size, steps = 32, (40, 70, 100)
    q, k, v = qkv("cpu", torch.float32, B=2, Hq=4, Hkv=2, M=1, N=steps[-1], E=16)
    paged = PagedAttention(8, page_size, 2, device="cpu")
    k_cache = torch.zeros(1, 2, 8 * page_size, 16)
    v_cache = torch.zeros_like(k_cache)
    logical = create_block_mask(noop_mask, 2, 1, 1, 128, device="cpu", BLOCK_SIZE=(128, page_size))
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(flex_attention, backend=counter)
    written = 0
    for length in steps:
        for b in range(2):
            paged.reserve(b, length)
        positions = torch.arange(written, length)
        paged.assign(torch.arange(2), positions.expand(2, -1), k[:, :, written:length],
                     v[:, :, written:length], k_cache, v_cache)
        written = length
        kv_len = torch.full((2,), length)
        out = compiled(q, k_cache, v_cache, score_mod=paged.get_score_mod(SCORE_MODS["alibi"], kv_len),
                       block_mask=paged.convert_logical_block_mask(logical, kv_len=kv_len), enable_gqa=True)
        expected = flex_attention(q, k[:, :, :length], v[:, :, :length], score_mod=SCORE_MODS["alibi"],
                                  enable_gqa=True)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------

def test_allocation_follows_torchs_order():
    from torch.nn.attention.experimental._paged_attention import PagedAttention as TorchPaged

    ours, theirs = PagedAttention(12, 4, 3, device="cpu"), TorchPaged(12, 4, 3, device="cpu")
    steps = [("reserve", 0, 5), ("reserve", 1, 9), ("reserve", 0, 12), ("erase", 1, None),
             ("reserve", 2, 7), ("reserve", 1, 3), ("reserve", 1, 3), ("erase", 0, None), ("reserve", 2, 30)]
    for op, b, length in steps:
        for paged in (ours, theirs):
            if op == "reserve":
                paged.reserve(torch.tensor([b]), torch.tensor([length]))
            else:
                paged.erase(torch.tensor([b]))
        assert torch.equal(ours.page_table, theirs.page_table), (op, b, length)
        assert torch.equal(ours.capacity, theirs.capacity)
        assert ours.empty_pages == theirs.empty_pages
        # physical_to_logical is the page table's inverse. (Torch's erase leaves its row
        # stale: it writes into a copy made by advanced indexing.)
        inverse = torch.full_like(ours.physical_to_logical, -1)
        for row in range(3):
            owned = ours.page_table[row] >= 0
            inverse[row, ours.page_table[row, owned]] = torch.arange(int(owned.sum()), dtype=inverse.dtype)
        assert torch.equal(ours.physical_to_logical, inverse)


def test_erased_pages_are_reused_and_hold_the_new_sequence():
    page_size = 16
    q, k, v = qkv("cpu", torch.float32, B=2, Hq=2, M=8, N=48, E=8)
    paged = PagedAttention(6, page_size, 2, device="cpu")
    k_cache = torch.zeros(1, 2, 6 * page_size, 8)
    v_cache = torch.zeros_like(k_cache)
    paged.reserve(0, 48)
    paged.reserve(1, 48)
    assert paged.empty_pages == []
    with pytest.raises(RuntimeError, match="needs 1 more pages .* only 0 of 6 pages are free"):
        paged.reserve(0, 49)
    first_pages = paged.page_table[0, :3].tolist()
    paged.assign(torch.arange(2), torch.arange(48).expand(2, 48), torch.randn(2, 2, 48, 8),
                 torch.randn(2, 2, 48, 8), k_cache, v_cache)
    paged.erase(0)
    assert paged.capacity.tolist() == [0, 48]
    assert (paged.page_table[0] == -1).all() and (paged.physical_to_logical[0] == -1).all()
    assert sorted(paged.empty_pages) == sorted(first_pages)
    paged.reserve(0, 48)  # the same pages again: nothing else is free
    assert sorted(paged.page_table[0, :3].tolist()) == sorted(first_pages)
    paged.assign(torch.tensor([0]), torch.arange(48)[None], k[:1], v[:1], k_cache, v_cache)
    mask = paged.convert_logical_block_mask(
        create_block_mask(noop_mask, 1, 1, 8, 48, device="cpu", BLOCK_SIZE=page_size), batch_idx=torch.tensor([0]))
    out = flex_attention(q[:1], k_cache, v_cache, block_mask=mask)
    torch.testing.assert_close(out, flex_attention(q[:1], k[:1], v[:1]), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments, message", [
    ((0, 16, 2), "n_pages must be a positive int"),
    ((4, 16.0, 2), "page_size must be a positive int"),
    ((4, 16, -1), "max_batch_size must be a positive int"),
])
def test_bad_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        PagedAttention(*arguments, device="cpu")


def test_bad_reserve_and_erase_arguments():
    paged = PagedAttention(4, 16, 2, device="cpu")
    with pytest.raises(ValueError, match="batch_idx 2 is out of range for max_batch_size 2"):
        paged.reserve(2, 10)
    with pytest.raises(ValueError, match="seq_len must be an int or a one-element integer tensor"):
        paged.reserve(0, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="seq_len must be non-negative"):
        paged.reserve(0, -1)
    with pytest.raises(ValueError, match="batch_idx must be an int or a one-element"):
        paged.erase(torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="needs 5 more pages .* only 4 of 4 pages are free"):
        paged.reserve(1, 65)
    assert paged.empty_pages == [3, 2, 1, 0] and paged.capacity.tolist() == [0, 0]


def test_bad_conversions():
    paged = PagedAttention(8, 32, 2, device="cpu")
    with pytest.raises(ValueError, match=r"KV block size \(128\) must equal page_size \(32\)"):
        paged.convert_logical_block_mask(create_block_mask(noop_mask, 2, 1, 64, 256, device="cpu"))
    broadcast = create_block_mask(noop_mask, 1, 1, 64, 256, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match="batch size 1 .* batch_idx must name"):
        paged.convert_logical_block_mask(broadcast)
    batched = create_block_mask(noop_mask, 2, 1, 64, 256, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match="batch size 2 but batch_idx names 3 entries"):
        paged.convert_logical_block_mask(batched, batch_idx=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="kv_len must have one length per batch entry"):
        paged.convert_logical_block_mask(batched, kv_len=torch.tensor([3]))
    with pytest.raises(ValueError, match="kv_len must be a 1-D integer tensor"):
        paged.convert_logical_block_mask(batched, kv_len=torch.tensor([3.0, 4.0]))


def test_bad_assignments():
    paged = PagedAttention(4, 8, 2, device="cpu")
    paged.reserve(0, 16)
    k_cache = torch.zeros(1, 2, 32, 4)
    v_cache = torch.zeros(1, 2, 32, 4)
    batch_idx, position = torch.tensor([0]), torch.arange(4)[None]
    value = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="must not require grad"):
        paged.assign(batch_idx, position, value.requires_grad_(), value, k_cache, v_cache)
    value = value.detach()
    with pytest.raises(ValueError, match="k_val has 3 heads of dim 4 but k_cache 2 of dim 4"):
        paged.assign(batch_idx, position, torch.randn(1, 3, 4, 4), value, k_cache, v_cache)
    with pytest.raises(ValueError, match="v_cache must be \\[1, H, n_pages \\* page_size = 32, D\\]"):
        paged.assign(batch_idx, position, value, value, k_cache, torch.zeros(1, 2, 16, 4))
    with pytest.raises(ValueError, match="input_pos must be a 2-D integer tensor"):
        paged.assign(batch_idx, torch.arange(4), value, value, k_cache, v_cache)
    with pytest.raises(ValueError, match="k_val \\(torch.float16, cpu\\) must match k_cache"):
        paged.assign(batch_idx, position, value.half(), value, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="input_pos outside the capacity reserved"):
        paged.assign(torch.tensor([1]), position, value, value, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="input_pos outside the capacity reserved"):
        paged.assign(batch_idx, position + 13, value, value, k_cache, v_cache)
    assert not k_cache.any() and not v_cache.any()


def test_exported_lazily():
    import subprocess
    import sys

    script = ("import sys, inductor_flex\n"
              "assert 'inductor_flex.paged_attention' not in sys.modules\n"
              "from inductor_flex import PagedAttention\n"
              "assert PagedAttention is inductor_flex.paged_attention.PagedAttention\n"
              "assert 'PagedAttention' in inductor_flex.__all__\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
