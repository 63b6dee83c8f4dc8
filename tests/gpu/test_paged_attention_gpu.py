"""PagedAttention through the compiled CUDA kernels: prefill through the fused forward
(BACKEND="TRITON", so a declined kernel fails instead of falling back), short queries
through whatever the dispatcher picks; output, lse and max_scores against the float64
contiguous golden (flex_check.PAGED_FACTOR), placement independence bit for bit, no host
syncs in assign / convert, and a compiled decoding step."""
import pytest
import torch

from inductor_flex import create_block_mask, flex_attention, noop_mask
from inductor_flex.paged_attention import PagedAttention
from flex_check import (PAGED_FACTOR, causal_at_end, check_against_golden, paged_flex, paged_helpers,
                        paged_suite_score_mods, qkv)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HQ, HKV = 8, 2
SCORE_MODS = paged_suite_score_mods(HQ)
FUSED = {"BACKEND": "TRITON"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SCORE_MODS))
def test_prefill_through_the_fused_forward(device, name, dtype):
    # GQA, Q_LEN != KV_LEN, a ragged last page, spare pages full of garbage.
    q, k, v = qkv(device, dtype, B=2, Hq=HQ, Hkv=HKV, M=384, N=1000, E=64)
    mask = create_block_mask(causal_at_end(384, 1000), 2, 1, 384, 1000, device=device)
    compiled = torch.compile(flex_attention)
    for block_mask in (None, mask):
        check_against_golden(q, k, v, compiled=paged_flex(compiled), factor=PAGED_FACTOR[dtype],
                             score_mod=SCORE_MODS[name], block_mask=block_mask, enable_gqa=True,
                             kernel_options=FUSED)


@pytest.mark.parametrize("page_size", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len", [1, 4])
def test_short_queries_against_a_1024_token_cache(device, q_len, dtype, page_size):
    q, k, v = qkv(device, dtype, B=4, Hq=HQ, Hkv=HKV, M=q_len, N=1024, E=128)
    mask = create_block_mask(causal_at_end(q_len, 1024), 4, 1, q_len, 1024, device=device,
                             BLOCK_SIZE=(128, page_size))
    compiled = torch.compile(flex_attention)
    for name in ("identity", "alibi"):
        check_against_golden(q, k, v, compiled=paged_flex(compiled, page_size=page_size),
                             factor=PAGED_FACTOR[dtype], score_mod=SCORE_MODS[name],
                             block_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("q_len", [1, 256])
def test_results_are_bitwise_independent_of_the_page_assignment(device, q_len):
    q, k, v = qkv(device, torch.bfloat16, B=3, Hq=HQ, Hkv=HKV, M=q_len, N=2048, E=128)
    mask = create_block_mask(causal_at_end(q_len, 2048), 3, 1, q_len, 2048, device=device)
    compiled = torch.compile(flex_attention)
    outs = [paged_flex(compiled, shuffle=shuffle, seed=seed)(
                q, k, v, score_mod=SCORE_MODS["relative_bias"], block_mask=mask, enable_gqa=True)
            for shuffle, seed in ((False, 0), (True, 0), (True, 7))]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_assign_and_convert_never_wait_for_the_gpu(device):
    k = torch.randn(4, HKV, 1000, 64, device=device)
    paged, k_cache, v_cache = paged_helpers.paged_cache(k, k, 128, spare_pages=2)
    mask = create_block_mask(causal_at_end(1000, 1000), 4, 1, 1000, 1000, device=device)
    batch_idx = torch.arange(4, device=device)
    position = torch.full((4, 1), 999, device=device)
    kv_len = torch.full((4,), 1000, device=device)
    last_row = mask[:, :, 999 // 128]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        paged.assign(batch_idx, position, k[:, :, :1], k[:, :, :1], k_cache, v_cache)
        paged.convert_logical_block_mask(mask, kv_len=kv_len)
        paged.convert_logical_block_mask(last_row, batch_idx=batch_idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_compiled_decoding_step(device):
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=HQ, Hkv=HKV, M=1, N=640, E=128)
    paged = PagedAttention(12, 128, 2, device=device)
    for b in range(2):
        paged.reserve(b, 640)
    k_cache = torch.zeros(1, HKV, 12 * 128, 128, device=device, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    batch_idx = torch.arange(2, device=device)
    paged.assign(batch_idx, torch.arange(639, device=device).expand(2, 639), k[:, :, :639], v[:, :, :639],
                 k_cache, v_cache)
    mask = paged.convert_logical_block_mask(create_block_mask(noop_mask, 2, 1, 1, 640, device=device))
    alibi = paged.get_score_mod(SCORE_MODS["alibi"])

    @torch.compile(fullgraph=True)
    def step(q, k_new, v_new, position):
        paged.assign(batch_idx, position, k_new, v_new, k_cache, v_cache)
        return flex_attention(q, k_cache, v_cache, score_mod=alibi, block_mask=mask, enable_gqa=True)

    out = step(q, k[:, :, 639:], v[:, :, 639:], torch.full((2, 1), 639, device=device))
    expected = flex_attention(q, k, v, score_mod=SCORE_MODS["alibi"], enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
