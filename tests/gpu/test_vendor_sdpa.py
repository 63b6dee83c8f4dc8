"""The vendor SDPA candidates (lowering/vendor.py) on a GPU: numerics of full / causal calls
against the float64 golden (error-ratio rule), forward, gradients and lse, and which kernel
the generated code calls (the cuDNN / flash aten op for tagged calls where the measured rule
picks one, our Triton template otherwise, with BACKEND="TRITON", max_scores, an lse
gradient or a mask without a proven pattern)."""
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex.lowering import vendor
from flex_check import FACTOR, check_against_golden, check_grads_against_golden, forward_backward, qkv

pytestmark = pytest.mark.vendor

FORWARD_MARKER = "# inductor_flex forward"
BACKWARD_MARKER = "# inductor_flex backward"
VENDOR_CALL = re.compile(r"aten\._scaled_dot_product_(cudnn|flash)_attention(_backward)?\b")


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def near_causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx - 1


def mask_kwargs(pattern, length, device):
    if pattern == "full":
        return {}
    mod = {"causal": causal, "near_causal": near_causal}[pattern]
    return {"block_mask": create_block_mask(mod, None, None, length, length, device=device)}


def expected_vendor(device, dtype, head_dim, backward=False):
    capability = torch.cuda.get_device_capability(device)
    return vendor.default_vendor(capability, dtype, head_dim, backward=backward)


def vendor_ops(code):
    """The vendor aten ops a generated module calls, e.g. {"cudnn", "cudnn_backward"}."""
    return {name + (suffix or "") for name, suffix in VENDOR_CALL.findall(code)}


def forward_backward_codes(q, k, v, use_lse=False, **kwargs):
    """(forward code, backward code) of a compiled forward + backward call."""
    compiled = torch.compile(flex_attention)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn(q.shape[:3], device=q.device) if use_lse else None
    _, codes = run_and_get_code(forward_backward, compiled, *leaves, grad_out=grad_out,
                                grad_lse=grad_lse, **kwargs)
    forward = [c for c in codes if re.search(r"AOT ID: \['\d+_forward'\]", c)]
    backward = [c for c in codes if re.search(r"AOT ID: \['\d+_backward'\]", c)]
    assert len(forward) == 1 and len(backward) == 1, [c.splitlines()[0] for c in codes]
    return forward[0], backward[0]


CASES = [  # (pattern, dtype, head dim, kv heads of 4 query heads)
    ("full", torch.bfloat16, 128, 4),
    ("causal", torch.bfloat16, 128, 4),
    ("causal", torch.bfloat16, 64, 2),
    ("full", torch.float16, 64, 1),
    ("causal", torch.float16, 128, 2),
]
CASE_IDS = [f"{p}-{str(d)[6:]}-D{e}-Hkv{h}" for p, d, e, h in CASES]


@pytest.mark.parametrize("pattern, dtype, head_dim, kv_heads", CASES, ids=CASE_IDS)
def test_forward_and_lse(device, pattern, dtype, head_dim, kv_heads):
    q, k, v = qkv(device, dtype, B=2, Hq=4, Hkv=kv_heads, M=512, E=head_dim)
    check_against_golden(q, k, v, aux=AuxRequest(lse=True), enable_gqa=True,
                         **mask_kwargs(pattern, 512, device))


@pytest.mark.parametrize("pattern, dtype, head_dim, kv_heads", CASES, ids=CASE_IDS)
def test_gradients(device, pattern, dtype, head_dim, kv_heads):
    q, k, v = qkv(device, dtype, B=2, Hq=4, Hkv=kv_heads, M=512, E=head_dim)
    check_grads_against_golden(q, k, v, enable_gqa=True, **mask_kwargs(pattern, 512, device))


@pytest.mark.parametrize("pattern", ["full", "causal"])
def test_gradients_through_lse(device, pattern):
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=512, E=128)
    check_grads_against_golden(q, k, v, use_lse=True, **mask_kwargs(pattern, 512, device))


@pytest.mark.parametrize("pattern", ["full", "causal"])
def test_max_autotune_times_vendors_with_our_configs(device, pattern):
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, Hkv=2, M=512, E=128)
    compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
    check_grads_against_golden(q, k, v, compiled=compiled, enable_gqa=True,
                               **mask_kwargs(pattern, 512, device))


# --- which kernel serves -------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["full", "causal"])
@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_tagged_calls_use_the_rules_vendor(device, pattern, dtype, head_dim):
    q, k, v = qkv(device, dtype, B=2, Hq=4, M=512, E=head_dim)
    forward, backward = forward_backward_codes(q, k, v, **mask_kwargs(pattern, 512, device))
    pick = expected_vendor(device, dtype, head_dim)
    back_pick = expected_vendor(device, dtype, head_dim, backward=True)
    if pick is None:
        assert not vendor_ops(forward) and FORWARD_MARKER in forward
    else:
        assert vendor_ops(forward) == {pick} and FORWARD_MARKER not in forward
    if back_pick is None:
        assert not vendor_ops(backward) and BACKWARD_MARKER in backward
    else:
        assert vendor_ops(backward) == {back_pick + "_backward"} and BACKWARD_MARKER not in backward


def _skip_without_a_rule(device):
    if expected_vendor(device, torch.bfloat16, 128) is None:
        pytest.skip("no measured vendor rule for this GPU: every call stays on ours anyway")


def test_triton_backend_forces_ours(device):
    _skip_without_a_rule(device)
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=512, E=128)
    forward, backward = forward_backward_codes(q, k, v, kernel_options={"BACKEND": "TRITON"},
                                               **mask_kwargs("causal", 512, device))
    assert not vendor_ops(forward) and not vendor_ops(backward)
    assert FORWARD_MARKER in forward and BACKWARD_MARKER in backward


def test_lse_gradient_keeps_the_backward_on_ours(device):
    _skip_without_a_rule(device)
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=512, E=128)
    forward, backward = forward_backward_codes(q, k, v, use_lse=True)
    assert vendor_ops(forward) and not vendor_ops(backward) and BACKWARD_MARKER in backward


def test_gqa_keeps_the_backward_on_ours(device):
    # The vendors' GQA dK / dV measured 1.2x our eager error (vendor.lower_backward_vendor).
    _skip_without_a_rule(device)
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, Hkv=2, M=512, E=128)
    forward, backward = forward_backward_codes(q, k, v, enable_gqa=True,
                                               **mask_kwargs("causal", 512, device))
    assert vendor_ops(forward) and not vendor_ops(backward) and BACKWARD_MARKER in backward


def test_max_scores_forces_our_forward(device):
    _skip_without_a_rule(device)
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=512, E=128)
    kwargs = mask_kwargs("causal", 512, device)
    (out, aux), codes = run_and_get_code(torch.compile(flex_attention), q, k, v,
                                         return_aux=AuxRequest(lse=True, max_scores=True), **kwargs)
    assert not vendor_ops(codes[0]) and FORWARD_MARKER in codes[0]
    check_against_golden(q, k, v, **kwargs)  # max_scores included


@pytest.mark.parametrize("change", ["near_causal", "reassigned", "sliced", "score_mod", "buffer"])
def test_untagged_or_modified_calls_stay_on_ours(device, change):
    _skip_without_a_rule(device)
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=512, E=128)
    kwargs = mask_kwargs("near_causal" if change == "near_causal" else "causal", 512, device)
    if change == "reassigned":
        kwargs["block_mask"].kv_indices = kwargs["block_mask"].kv_indices.clone()
    elif change == "sliced":
        kwargs["block_mask"] = kwargs["block_mask"][:, :]
    elif change == "score_mod":
        kwargs["score_mod"] = lambda score, b, h, q_idx, kv_idx: score * 2
    elif change == "buffer":
        bias = torch.randn(4, device=device)
        kwargs["score_mod"] = lambda score, b, h, q_idx, kv_idx: score + bias[h]
    _, codes = run_and_get_code(torch.compile(flex_attention), q, k, v, **kwargs)
    assert not vendor_ops(codes[0]) and FORWARD_MARKER in codes[0]


def test_lse_is_ours_in_layout_and_base(device):
    _skip_without_a_rule(device)
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=512, E=128)
    kwargs = mask_kwargs("causal", 512, device)
    aux = AuxRequest(lse=True)
    _, vendor_aux = torch.compile(flex_attention)(q, k, v, return_aux=aux, **kwargs)
    torch._dynamo.reset()
    _, our_aux = torch.compile(flex_attention)(q, k, v, return_aux=aux,
                                               kernel_options={"BACKEND": "TRITON"}, **kwargs)
    assert vendor_aux.lse.shape == our_aux.lse.shape == (2, 4, 512)
    assert vendor_aux.lse.is_contiguous()
    torch.testing.assert_close(vendor_aux.lse, our_aux.lse, atol=1e-3, rtol=0)


def cudnn_forward_lse_flags(code):
    """The compute_log_sumexp argument of each cuDNN forward call in generated code."""
    # (query, key, value, attn_bias=None, compute_log_sumexp, dropout_p=0.0, ...)
    return re.findall(r"aten\._scaled_dot_product_cudnn_attention\.default\(.*?None, (True|False), 0\.0,",
                      code)


@pytest.mark.parametrize("pattern", ["full", "causal"])
def test_inference_without_lse_asks_cudnn_for_none(device, pattern):
    """As SDPA does for inference, cuDNN skips the lse when nothing reads it; when the lse
    is returned, it is computed, and both outputs match our kernel's."""
    if expected_vendor(device, torch.bfloat16, 128) != "cudnn":
        pytest.skip("the measured rule does not pick cuDNN on this GPU")
    q, k, v = qkv(device, torch.bfloat16, B=2, Hq=4, M=512, E=128)
    kwargs = mask_kwargs(pattern, 512, device)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(flex_attention), q, k, v, **kwargs)
        assert cudnn_forward_lse_flags(codes[0]) == ["False"], codes[0]
        torch._dynamo.reset()
        (out_lse, aux), codes = run_and_get_code(torch.compile(flex_attention), q, k, v,
                                                 return_aux=AuxRequest(lse=True), **kwargs)
        assert cudnn_forward_lse_flags(codes[0]) == ["True"], codes[0]
        torch._dynamo.reset()
        ours, our_aux = torch.compile(flex_attention)(q, k, v, return_aux=AuxRequest(lse=True),
                                                      kernel_options={"BACKEND": "TRITON"}, **kwargs)
    torch.testing.assert_close(aux.lse, our_aux.lse, atol=1e-3, rtol=0)
    golden = flex_attention(q.double(), k.double(), v.double(), **kwargs)
    eager_error = (flex_attention(q, k, v, **kwargs).double() - golden).abs().mean()
    for compiled_out in (out, out_lse):
        assert (compiled_out.double() - golden).abs().mean() <= FACTOR[q.dtype] * eager_error
