"""The split-KV decode kernel (templates/decode.py.jinja, lowering/decode.py) under
torch.compile: numerics against a float64 golden run (flex_check's error-ratio rule), which
kernel the dispatcher picks, and the decoding loops it must survive (a growing cache
without recompiling, block-mask slicing by input position, CUDA-graph replay)."""
import pytest
import torch

from inductor_flex import AuxRequest, BlockMask, create_block_mask, flex_attention
from flex_check import (
    APPROX_TANH_ALLOWANCE,
    alibi,
    causal_at,
    sliding_window_at,
    softcap,
    check_against_golden,
    check_grads_against_golden,
    compiled_code,
    kernel_sources,
    qkv,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
KV_LEN = 1000  # not a multiple of the 128-key block: the ragged edge is always exercised
DECODE_MARK = "inductor_flex decode"      # the decode template's header comment
FORWARD_MARK = "inductor_flex forward"    # the fused forward's


def mask_kwargs(name, q_len, kv_len, device):
    offset = kv_len - q_len  # the query tokens are the last ones of the sequence
    if name == "full":
        return {}
    if name == "causal":
        return dict(block_mask=create_block_mask(causal_at(offset), None, None, q_len, kv_len, device=device))
    if name == "sliding_window":
        return dict(block_mask=create_block_mask(sliding_window_at(offset, 256), None, None,
                                                 q_len, kv_len, device=device))
    raise KeyError(name)


def score_mod_kwargs(name, q_heads, device):
    if name == "identity":
        return {}
    if name == "alibi":
        slopes = torch.exp2(-torch.arange(1, q_heads + 1, dtype=torch.float32, device=device) / 2)
        return dict(score_mod=alibi(slopes))
    if name == "softcap":
        return dict(score_mod=softcap)
    raise KeyError(name)


def decode_and_check(q, k, v, expect_decode=True, lse_atol=0.0, **kwargs):
    """check_against_golden, and assert which kernel served (from the generated code)."""
    compiled = torch.compile(flex_attention)
    _, code = compiled_code(compiled, q, k, v, enable_gqa=True,
                            return_aux=AuxRequest(lse=True, max_scores=True), **kwargs)
    source = "\n".join(code)
    assert (DECODE_MARK in source) == expect_decode, "decode kernel chosen" if not expect_decode else "decode kernel not chosen"
    return check_against_golden(q, k, v, compiled=compiled, enable_gqa=True, lse_atol=lse_atol, **kwargs)


def problem(device, dtype, q_len, group, head_dim=64, kv_heads=2, batch=2, kv_len=KV_LEN, seed=0):
    return qkv(device, dtype, B=batch, Hq=kv_heads * group, Hkv=kv_heads, M=q_len, N=kv_len,
               E=head_dim, seed=seed)


# ---------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4, 5])
@pytest.mark.parametrize("q_len", [1, 4, 16, 64])
def test_query_lengths_and_gqa_groups(device, q_len, group, dtype):
    q, k, v = problem(device, dtype, q_len, group)
    decode_and_check(q, k, v, **mask_kwargs("causal", q_len, KV_LEN, device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_head_dims(device, head_dim, dtype):
    q, k, v = problem(device, dtype, 4, 5, head_dim=head_dim)
    decode_and_check(q, k, v, **mask_kwargs("causal", 4, KV_LEN, device))


def test_value_head_dim_differs(device):
    q, k, _ = problem(device, torch.bfloat16, 1, 4, head_dim=128)
    v = torch.randn(*k.shape[:3], 64, device=device, dtype=torch.bfloat16)
    decode_and_check(q, k, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("score_mod", ["identity", "alibi", "softcap"])
@pytest.mark.parametrize("mask", ["full", "causal", "sliding_window"])
def test_masks_and_score_mods(device, mask, score_mod, dtype):
    q_len, group = 4, 4
    q, k, v = problem(device, dtype, q_len, group)
    allowance = APPROX_TANH_ALLOWANCE if score_mod == "softcap" and dtype != torch.float32 else 0.0
    decode_and_check(q, k, v, lse_atol=allowance, **mask_kwargs(mask, q_len, KV_LEN, device),
                     **score_mod_kwargs(score_mod, q.shape[1], device))


def test_captured_buffers_in_both_mods(device):
    # A [B, Hq, Q, KV] bias table read by score_mod and per-key document ids by mask_mod.
    q, k, v = problem(device, torch.bfloat16, 4, 4)
    B, Hq, M, _ = q.shape
    N = k.shape[2]
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(B, Hq, M, N, generator=gen).to(device)
    documents = (torch.arange(N) // 300).to(torch.int32).to(device)
    last_doc = documents[-1]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]

    def same_document(b, h, q_idx, kv_idx):
        return documents[kv_idx] == last_doc

    mask = create_block_mask(same_document, None, None, M, N, device=device)
    decode_and_check(q, k, v, score_mod=score_mod, block_mask=mask)


def test_per_head_block_mask(device):
    # A mask that differs per query head: the kernel packs one head per program.
    q, k, v = problem(device, torch.float16, 4, 4)

    def head_window(b, h, q_idx, kv_idx):
        return kv_idx >= KV_LEN - 100 * (h + 1)

    mask = create_block_mask(head_window, None, q.shape[1], 4, KV_LEN, device=device)
    decode_and_check(q, k, v, block_mask=mask)


def test_rows_that_see_nothing(device):
    q, k, v = problem(device, torch.bfloat16, 2, 4)

    def odd_heads(b, h, q_idx, kv_idx):
        return (h % 2) == 1

    mask = create_block_mask(odd_heads, None, q.shape[1], 2, KV_LEN, device=device)
    out, aux, _, _ = decode_and_check(q, k, v, block_mask=mask)
    assert torch.equal(out[:, 0::2], torch.zeros_like(out[:, 0::2]))
    assert torch.isneginf(aux.lse[:, 0::2]).all() and torch.isneginf(aux.max_scores[:, 0::2]).all()


def test_key_value_batch_broadcast_and_long_cache(device):
    q, _, _ = problem(device, torch.bfloat16, 1, 4, batch=3)
    _, k, v = problem(device, torch.bfloat16, 1, 4, batch=1, kv_len=32768 + 77, seed=1)
    decode_and_check(q, k, v)


def test_strided_query_keeps_its_layout(device):
    # A [B, M, H, D] projection viewed as [B, H, M, D]: the output keeps the query's order.
    q, k, v = problem(device, torch.bfloat16, 4, 4)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    decode_and_check(q, k, v)


@pytest.mark.parametrize("splits", [1, 3, 64])
def test_split_kv_option(device, splits):
    q, k, v = problem(device, torch.float32, 1, 4)
    decode_and_check(q, k, v, kernel_options={"SPLIT_KV": splits})


def test_output_epilogue_fuses_into_the_merge(device):
    q, k, v = problem(device, torch.bfloat16, 1, 4)
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, enable_gqa=True).cos())
    out, code = compiled_code(fn, q, k, v)
    kernels = kernel_sources(code[0])
    assert any(DECODE_MARK in src for src in kernels.values()), list(kernels)
    # The cos lands in the kernel that divides by the merged sum, not a kernel of its own.
    cos_kernels = [name for name, src in kernels.items() if "cos(" in src]
    assert len(cos_kernels) == 1, cos_kernels
    expected = flex_attention(q.double(), k.double(), v.double(), enable_gqa=True).cos()
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------
# Which kernel serves
# ---------------------------------------------------------------------------------------

def test_backend_triton_decode_forces_it(device):
    q, k, v = problem(device, torch.bfloat16, 16, 1)
    decode_and_check(q, k, v, kernel_options={"BACKEND": "TRITON_DECODE"})


def test_backend_triton_decode_names_why_it_cannot_serve(device):
    q, k, v = problem(device, torch.bfloat16, 128, 1)
    with pytest.raises(Exception, match="BACKEND='TRITON_DECODE' cannot serve this call: "
                                        "split-KV Triton decode: Q_LEN=128 is above 64"):
        torch.compile(flex_attention)(q, k, v, kernel_options={"BACKEND": "TRITON_DECODE"})


def test_long_queries_take_the_forward(device):
    q, k, v = problem(device, torch.bfloat16, 128, 1)
    decode_and_check(q, k, v, expect_decode=False)


def test_force_use_flex_attention_avoids_it(device):
    q, k, v = problem(device, torch.bfloat16, 1, 4)
    _, code = compiled_code(torch.compile(flex_attention), q, k, v, enable_gqa=True,
                            kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
    source = "\n".join(code)
    assert DECODE_MARK not in source and FORWARD_MARK in source


@pytest.mark.parametrize("use_lse", [False, True])
def test_requires_grad_takes_the_fused_forward_and_backward_works(device, use_lse):
    q, k, v = problem(device, torch.bfloat16, 4, 4)
    compiled = torch.compile(flex_attention)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, code = compiled_code(compiled, *leaves, enable_gqa=True)
    source = "\n".join(code)
    assert DECODE_MARK not in source and FORWARD_MARK in source
    check_grads_against_golden(q, k, v, compiled=compiled, use_lse=use_lse, enable_gqa=True,
                               **mask_kwargs("causal", 4, KV_LEN, device))


def test_forced_decode_under_autograd_feeds_the_backward(device):
    q, k, v = problem(device, torch.float16, 4, 4)
    check_grads_against_golden(q, k, v, use_lse=True, enable_gqa=True,
                               kernel_options={"BACKEND": "TRITON_DECODE"},
                               **mask_kwargs("causal", 4, KV_LEN, device))


def test_inference_mode_takes_it(device):
    q, k, v = problem(device, torch.bfloat16, 1, 4)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        out, code = compiled_code(torch.compile(flex_attention), *leaves, enable_gqa=True)
    assert DECODE_MARK in "\n".join(code)


# ---------------------------------------------------------------------------------------
# Decoding loops
# ---------------------------------------------------------------------------------------

def test_growing_cache_does_not_recompile(device):
    # Dynamic shapes: the KV length (and the block mask's size) change every step. Heads
    # are symbolic too, so the kernel takes one head per program.
    compiled = torch.compile(flex_attention, dynamic=True)
    for step, kv_len in enumerate((700, 701, 1024, 1500, 4099)):
        q, k, v = problem(device, torch.bfloat16, 1, 4, kv_len=kv_len, seed=step)
        kwargs = mask_kwargs("causal", 1, kv_len, device)
        if step == 0:  # (run_and_get_code resets Dynamo: only before the first compile)
            _, code = compiled_code(compiled, q, k, v, enable_gqa=True, **kwargs)
            assert DECODE_MARK in "\n".join(code)
        # The causal offset is a captured int: symbolic from the second length on, a kernel
        # argument then (not a reason to leave the decode kernel).
        with torch._dynamo.config.patch(error_on_recompile=step > 1):
            compiled(q, k, v, enable_gqa=True, **kwargs)
            check_against_golden(q, k, v, compiled=compiled, enable_gqa=True, **kwargs)


def test_block_mask_sliced_by_input_position(device):
    # gpt-fast's pattern: one mask for the whole cache, sliced to the query block holding
    # input_pos, its mask_mod shifted by the position (a captured tensor: no recompiles).
    max_len, block = 2048, 128
    full_mask = create_block_mask(causal_at(0), None, None, max_len, max_len, device=device)
    _, k, v = problem(device, torch.bfloat16, 1, 4, kv_len=max_len, seed=7)
    compiled = torch.compile(flex_attention)
    position = torch.zeros(1, dtype=torch.int32, device=device)

    def shifted(b, h, q_idx, kv_idx):
        return q_idx + position[0] >= kv_idx

    for step, input_pos in enumerate((5, 300, 1029, 2047)):
        position.fill_(input_pos)
        mask = full_mask[:, :, input_pos // block]
        mask.mask_mod = shifted
        mask.seq_lengths = (1, max_len)
        q, _, _ = problem(device, torch.bfloat16, 1, 4, seed=step)
        if step == 0:  # (run_and_get_code resets Dynamo: only before the first compile)
            _, code = compiled_code(compiled, q, k, v, enable_gqa=True, block_mask=mask)
            assert DECODE_MARK in "\n".join(code)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            compiled(q, k, v, enable_gqa=True, block_mask=mask)
            check_against_golden(q, k, v, compiled=compiled, enable_gqa=True, block_mask=mask)


def test_cuda_graph_replay_of_a_decode_step(device):
    if device != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    B, Hq, Hkv, D, max_len = 2, 8, 2, 64, 512
    gen = torch.Generator().manual_seed(11)
    k_cache = torch.zeros(B, Hkv, max_len, D, device=device, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    position = torch.zeros(1, dtype=torch.int64, device=device)

    def seen(b, h, q_idx, kv_idx):
        return kv_idx <= position[0]

    # Every block listed as partial, so mask_mod (reading the position tensor) decides.
    blocks = max_len // 128
    mask = BlockMask.from_kv_blocks(
        torch.full((1, 1, 1), blocks, dtype=torch.int32, device=device),
        torch.arange(blocks, dtype=torch.int32, device=device).view(1, 1, 1, blocks),
        mask_mod=seen, seq_lengths=(1, max_len))

    def step(q, k_new, v_new):
        k_cache.index_copy_(2, position, k_new)
        v_cache.index_copy_(2, position, v_new)
        return flex_attention(q, k_cache, v_cache, block_mask=mask, enable_gqa=True)

    compiled = torch.compile(step, mode="reduce-overhead")
    q0 = torch.zeros(B, Hq, 1, D, device=device, dtype=torch.bfloat16)
    kv0 = q0[:, :Hkv].contiguous()
    _, code = compiled_code(compiled, q0, kv0, kv0)
    assert DECODE_MARK in "\n".join(code)
    k_cache.zero_()
    v_cache.zero_()
    reference_k = torch.zeros(B, Hkv, max_len, D, dtype=torch.float64)
    reference_v = torch.zeros_like(reference_k)
    for pos in range(40):
        q, k_new, v_new = (torch.randn(*shape, generator=gen).to(device, torch.bfloat16)
                           for shape in ((B, Hq, 1, D), (B, Hkv, 1, D), (B, Hkv, 1, D)))
        position.fill_(pos)
        out = compiled(q, k_new, v_new).clone()
        reference_k[:, :, pos] = k_new[:, :, 0].double().cpu()
        reference_v[:, :, pos] = v_new[:, :, 0].double().cpu()
        expected = flex_attention(q.double().cpu(), reference_k[:, :, :pos + 1],
                                  reference_v[:, :, :pos + 1], enable_gqa=True)
        torch.testing.assert_close(out.double().cpu(), expected, atol=2e-2, rtol=2e-2)
