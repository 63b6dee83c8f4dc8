"""The fused forward kernel under torch.compile: numerics against a float64 golden run,
generated-code checks (IS_DIVISIBLE, epilogue fusion, options), dynamic shapes."""
import math
import re

import pytest
import torch

from inductor_flex import create_block_mask, flex_attention
from flex_check import check_against_golden, compiled_code, kernel_sources, qkv

B, H, S, D = 2, 4, 256, 64
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# ---------------------------------------------------------------------------------------
# Masks and score mods
# ---------------------------------------------------------------------------------------

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(window):
    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return mask


def prefix_lm(prefix):
    def mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx >= kv_idx)
    return mask


def document(doc_ids):
    def mask(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)
    return mask


def alibi(slopes):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return score_mod


def softcap(cap):
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod


def bias_table(bias):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]
    return score_mod


def random_documents(length, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(length - 1, generator=gen)[:5] + 1).values
    ids = torch.zeros(length, dtype=torch.int32)
    ids[cuts] = 1
    return ids.cumsum(0).to(torch.int32).to(device)


def case_kwargs(name, device, M=S, N=S):
    """(score_mod, block_mask) of a named case at query length M and key length N."""
    if name == "full":
        return {}
    if name == "causal":
        return dict(block_mask=create_block_mask(causal, None, None, M, N, device=device))
    if name == "sliding_window":
        return dict(block_mask=create_block_mask(sliding_window(64), None, None, M, N, device=device))
    if name == "prefix_lm":
        return dict(block_mask=create_block_mask(prefix_lm(64), None, None, M, N, device=device))
    if name == "document":
        mask = document(random_documents(max(M, N), device))
        return dict(block_mask=create_block_mask(mask, None, None, M, N, device=device))
    if name == "alibi_causal":
        slopes = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32, device=device))
        return dict(score_mod=alibi(slopes),
                    block_mask=create_block_mask(causal, None, None, M, N, device=device))
    if name == "softcap_causal":
        return dict(score_mod=softcap(SOFTCAP),
                    block_mask=create_block_mask(causal, None, None, M, N, device=device))
    if name == "bias_table":
        bias = torch.randn(B, H, M, N, generator=torch.Generator().manual_seed(1)).to(device)
        return dict(score_mod=bias_table(bias))
    raise KeyError(name)


CASES = ["full", "causal", "sliding_window", "prefix_lm", "document", "alibi_causal",
         "softcap_causal", "bias_table"]


# tanh.approx.f32 (used for float16 / bfloat16) is within 2^-10.9 relative of tanh, so a
# soft-cap score moves by at most cap * 2^-10.9: lse and max_scores may differ by that much.
SOFTCAP = 2.0
APPROX_TANH_BOUND = 2.0 ** -10.9


def tanh_allowance(case, dtype):
    uses_tanh = case.startswith("softcap")
    return SOFTCAP * APPROX_TANH_BOUND if uses_tanh and dtype != torch.float32 else 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_masks_and_score_mods(device, dtype, case):
    q, k, v = qkv(device, dtype)
    check_against_golden(q, k, v, lse_atol=tanh_allowance(case, dtype), **case_kwargs(case, device))


@pytest.mark.parametrize("case", ["causal", "softcap_causal", "document"])
def test_long_sequence(device, case):
    q, k, v = qkv(device, torch.bfloat16, M=2048)
    check_against_golden(q, k, v, lse_atol=tanh_allowance(case, torch.bfloat16),
                         **case_kwargs(case, device, 2048, 2048))


# ---------------------------------------------------------------------------------------
# Ragged lengths: IS_DIVISIBLE is pinned in the generated kernel
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [255, 256, 383, 384])
def test_ragged_lengths_and_is_divisible(device, length):
    q, k, v = qkv(device, torch.bfloat16, M=length)
    kwargs = case_kwargs("alibi_causal", device, length, length)
    compiled = torch.compile(flex_attention)
    check_against_golden(q, k, v, compiled=compiled, **kwargs)
    torch._dynamo.reset()
    _, code = compiled_code(torch.compile(flex_attention), q, k, v, **kwargs)
    expected = "True" if length % 128 == 0 else "False"
    assert f"IS_DIVISIBLE : tl.constexpr = {expected}" in code[0]


@pytest.mark.parametrize("q_len,kv_len", [(255, 383), (384, 129), (100, 256)])
@pytest.mark.parametrize("case", ["full", "document"])
def test_query_and_key_lengths_differ(device, q_len, kv_len, case):
    q, k, v = qkv(device, torch.float16, M=q_len, N=kv_len)
    check_against_golden(q, k, v, **case_kwargs(case, device, q_len, kv_len))


# ---------------------------------------------------------------------------------------
# Shapes: GQA, broadcasts, head dims, strides
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["causal", "alibi_causal"])
def test_grouped_query_attention(device, case):
    q, k, v = qkv(device, torch.bfloat16, Hq=H, Hkv=1)
    check_against_golden(q, k, v, enable_gqa=True, **case_kwargs(case, device))
    q, k, v = qkv(device, torch.bfloat16, Hq=H, Hkv=2)
    check_against_golden(q, k, v, enable_gqa=True, **case_kwargs(case, device))


def test_key_value_batch_broadcast(device):
    q, k, v = qkv(device, torch.bfloat16, Bkv=1)
    check_against_golden(q, k, v, **case_kwargs("alibi_causal", device))


def test_block_mask_per_batch_and_head(device):
    def mask(b, h, q_idx, kv_idx):
        # Head 0 and batch 1 see everything; the rest are causal with a head-dependent window.
        return (h == 0) | (b == 1) | ((q_idx >= kv_idx) & (q_idx - kv_idx < 32 * (h + 1)))
    block_mask = create_block_mask(mask, B, H, S, S, device=device)
    q, k, v = qkv(device, torch.bfloat16)
    check_against_golden(q, k, v, block_mask=block_mask)
    head_only = create_block_mask(mask, None, H, S, S, device=device)
    q, k, v = qkv(device, torch.bfloat16, B=1)
    check_against_golden(q, k, v, block_mask=head_only)


@pytest.mark.parametrize("E,Ev", [(64, 32), (32, 64), (17, 17), (24, 24), (94, 94), (121, 121)])
def test_head_dims(device, E, Ev):
    q, k, v = qkv(device, torch.bfloat16, E=E, Ev=Ev)
    check_against_golden(q, k, v, **case_kwargs("causal", device))


def test_strided_and_offset_inputs(device):
    gen = torch.Generator().manual_seed(3)
    # [B, S, H, D] storage viewed as [B, H, S, D] (the layout projections produce).
    bshd = [torch.randn(B, S, H, D, generator=gen).to(device, torch.bfloat16).transpose(1, 2)
            for _ in range(3)]
    check_against_golden(*bshd, **case_kwargs("alibi_causal", device))
    # Slices of a larger buffer: a storage offset and a padded row stride.
    big = torch.randn(3, B, H, S + 8, D + 16, generator=gen).to(device, torch.bfloat16)
    q, k, v = (big[i, :, :, 5:5 + S, 3:3 + D] for i in range(3))
    assert q.storage_offset() != 0
    check_against_golden(q, k, v, **case_kwargs("causal", device))


# ---------------------------------------------------------------------------------------
# Rows that see nothing
# ---------------------------------------------------------------------------------------

def test_rows_that_see_nothing(device):
    def mask(b, h, q_idx, kv_idx):
        return (q_idx % 4 != 0) & (kv_idx <= q_idx)
    q, k, v = qkv(device, torch.bfloat16)
    block_mask = create_block_mask(mask, None, None, S, S, device=device)
    out, aux, _, _ = check_against_golden(q, k, v, block_mask=block_mask)
    empty = torch.arange(S, device=device) % 4 == 0
    assert torch.all(out[:, :, empty] == 0)
    assert torch.all(torch.isneginf(aux.lse[:, :, empty]))
    assert torch.all(torch.isneginf(aux.max_scores[:, :, empty]))
    assert torch.isfinite(aux.lse[:, :, ~empty]).all()


def test_mask_that_keeps_nothing(device):
    q, k, v = qkv(device, torch.float16)
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx < 0, None, None, S, S, device=device)
    out, aux, _, _ = check_against_golden(q, k, v, block_mask=block_mask)
    assert torch.all(out == 0) and torch.all(torch.isneginf(aux.lse))


# ---------------------------------------------------------------------------------------
# Epilogue fusion and bytes moved
# ---------------------------------------------------------------------------------------

def test_epilogue_fuses_into_the_template(device):
    from torch._inductor import metrics
    from torch.testing import FileCheck

    q, k, v = qkv(device, torch.bfloat16)
    fn = torch.compile(lambda q, k, v: flex_attention(q, k, v).cos())
    metrics.reset()
    out, code = compiled_code(fn, q, k, v)
    kernels = kernel_sources(code[0])
    templates = [src for name, src in kernels.items() if name.startswith("triton_tem_fused")]
    assert len(templates) == 1, list(kernels)
    FileCheck().check("@triton.jit").check("cos(").run(templates[0])
    # Other kernels may build the default block mask; none computes the cos.
    assert not any("cos(" in src for name, src in kernels.items() if not name.startswith("triton_tem"))
    expected = flex_attention(q.double(), k.double(), v.double()).cos()
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)
    assert metrics.num_bytes_accessed < 5 * q.numel() * q.element_size(), metrics.num_bytes_accessed


# ---------------------------------------------------------------------------------------
# Kernel options
# ---------------------------------------------------------------------------------------

def _defines(code):
    return dict(re.findall(r"^\s*(\w+) : tl\.constexpr = (.+)$", code, flags=re.M))


def test_tile_options_are_honoured(device):
    q, k, v = qkv(device, torch.bfloat16)
    options = {"BLOCK_M": 32, "fwd_BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    kwargs = dict(case_kwargs("causal", device), kernel_options=options)
    check_against_golden(q, k, v, **kwargs)
    torch._dynamo.reset()
    _, code = compiled_code(torch.compile(flex_attention), q, k, v, **kwargs)
    defines = _defines(code[0])
    assert defines["BLOCK_M"] == "64" and defines["BLOCK_N"] == "32"
    assert re.search(r"num_warps=4\b", code[0]) and re.search(r"num_stages=2\b", code[0])


def test_tile_that_does_not_divide_the_block_is_an_error(device):
    q, k, v = qkv(device, torch.bfloat16)
    with pytest.raises(RuntimeError, match="BLOCK_N=96"):
        torch.compile(flex_attention)(q, k, v, kernel_options={"BLOCK_N": 96})


@pytest.mark.parametrize("case", ["full", "alibi_causal"])
def test_prescale_qk(device, case):
    q, k, v = qkv(device, torch.bfloat16)
    # Pre-scaling rounds q * scale (times log2(e) when there is no score_mod) to bfloat16
    # once more, which moves every score by about one rounding unit: allow that much more
    # error in lse / max_scores (a wrong factor would be off by O(1)).
    check_against_golden(q, k, v, factor=3.0, lse_atol=torch.finfo(q.dtype).eps,
                         kernel_options={"PRESCALE_QK": True}, **case_kwargs(case, device))


@pytest.mark.parametrize("case", ["causal", "sliding_window"])
def test_rows_guaranteed_safe_and_contiguous_blocks(device, case):
    q, k, v = qkv(device, torch.bfloat16)
    options = {"ROWS_GUARANTEED_SAFE": case == "causal", "BLOCKS_ARE_CONTIGUOUS": True}
    check_against_golden(q, k, v, kernel_options=options, **case_kwargs(case, device))


@pytest.mark.parametrize("length", [255, 256])
def test_tma(device, length):
    if device != "cuda" or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs Hopper or newer")
    q, k, v = qkv(device, torch.bfloat16, M=length)
    kwargs = dict(case_kwargs("alibi_causal", device, length, length), kernel_options={"USE_TMA": True})
    check_against_golden(q, k, v, **kwargs)
    torch._dynamo.reset()
    _, code = compiled_code(torch.compile(flex_attention), q, k, v, **kwargs)
    assert _defines(code[0])["USE_TMA"] == "True"
    assert "make_tensor_descriptor" in code[0]


@pytest.mark.parametrize("case", ["full", "bias_table"])
@pytest.mark.parametrize("length", [255, 256])
def test_default_without_a_masked_loop_at_head_dim_128(device, case, length):
    # No block needs mask_mod: on Hopper the default is a 64x128 tile with one stage.
    q, k, v = qkv(device, torch.bfloat16, M=length, E=128)
    kwargs = case_kwargs(case, device, length, length)
    check_against_golden(q, k, v, **kwargs)
    if device != "cuda" or torch.cuda.get_device_capability() < (9, 0):
        return
    torch._dynamo.reset()
    _, code = compiled_code(torch.compile(flex_attention), q, k, v, **kwargs)
    defines = _defines(code[0])
    assert (defines["BLOCK_M"], defines["BLOCK_N"], defines["USE_TMA"]) == ("64", "128", "True")
    assert defines["HAS_PARTIAL_BLOCKS"] == "False"
    assert re.search(r"num_stages=1\b", code[0])


def test_max_autotune(device):
    q, k, v = qkv(device, torch.bfloat16)
    compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
    check_against_golden(q, k, v, compiled=compiled, **case_kwargs("document", device))


# ---------------------------------------------------------------------------------------
# tanh soft-cap: the approximate tanh and its error bound
# ---------------------------------------------------------------------------------------

def test_softcap_uses_approximate_tanh_only_for_half_dtypes(device):
    for dtype, expect in ((torch.bfloat16, True), (torch.float32, False)):
        torch._dynamo.reset()
        q, k, v = qkv(device, dtype)
        _, code = compiled_code(torch.compile(flex_attention), q, k, v,
                                **case_kwargs("softcap_causal", device))
        assert ("tanh.approx.f32" in code[0]) == expect, dtype


def test_approximate_tanh_error_bound(device):
    """tanh.approx.f32 stays within 2^-10.9 relative (the bound docs/kernels.md states)."""
    if device != "cuda":
        pytest.skip("inline PTX needs a CUDA GPU")
    import triton
    import triton.language as tl

    @triton.jit
    def approx_tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
        tl.store(y_ptr + offs, y, mask=offs < n)

    x = torch.linspace(-20, 20, 1 << 22, device=device, dtype=torch.float32)
    x = torch.cat([x, torch.logspace(-30, 1, 1 << 16, device=device), -torch.logspace(-30, 1, 1 << 16, device=device)])
    y = torch.empty_like(x)
    approx_tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    exact = torch.tanh(x.double())
    nonzero = exact != 0
    rel = ((y.double() - exact).abs()[nonzero] / exact.abs()[nonzero]).max().item()
    assert rel <= 2 ** -10.9, rel


# ---------------------------------------------------------------------------------------
# Dynamic shapes: one compile serves other batch sizes, head counts and lengths
# ---------------------------------------------------------------------------------------

def relative_position(score, b, h, q_idx, kv_idx):
    return score + 0.01 * (kv_idx - q_idx) * (h + 1)


def test_dynamic_shapes_do_not_recompile(device):
    compiled = torch.compile(flex_attention, dynamic=True)

    def run(b, h, s):
        q, k, v = qkv(device, torch.bfloat16, B=b, Hq=h, M=s, seed=b * 100 + h * 10 + s)
        check_against_golden(q, k, v, compiled=compiled, score_mod=relative_position)

    run(2, 4, 256)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(3, 4, 256)
        run(3, 2, 256)
        run(2, 4, 384)
        run(2, 8, 200)  # (size 1 would be a new specialization, by Dynamo's design)


def test_dynamic_default_mask_across_block_boundaries(device):
    """No block mask, dynamic=True, lengths on both sides of one 128-token block (and not
    multiples of it), forward and backward against the golden."""
    compiled = torch.compile(flex_attention, dynamic=True)
    for length in (64, 128, 200, 1000):
        q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=length, seed=length)
        check_against_golden(q, k, v, compiled=compiled)
        grads = {}
        for name, fn, dtype in (("ours", compiled, None), ("eager", flex_attention, None),
                                ("golden", flex_attention, torch.float64)):
            leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
            fn(*leaves).double().square().sum().backward()
            grads[name] = [t.grad.double() for t in leaves]
        for ours, eager, golden in zip(grads["ours"], grads["eager"], grads["golden"]):
            ours_err, eager_err = (ours - golden).abs().mean(), (eager - golden).abs().mean()
            assert ours_err <= 1.1 * eager_err + 1e-7, (length, ours_err, eager_err)


def test_dynamic_default_mask_one_frame_across_block_boundaries(device):
    # Issue #16 section 4: the default mask must not make Dynamo guard on the length. One
    # kind of call (no grad, same return_aux) and a head dim equal to no length, so that
    # neither autograd nor duck sizing (S == D) adds frames of their own.
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(flex_attention, backend=counter, dynamic=True)
    for length in (64, 128, 256, 1000):
        q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=length, E=48, seed=length)
        check_against_golden(q, k, v, compiled=compiled)
    assert counter.frame_count == 1, counter.frame_count
