"""The autograd rule (inductor_flex/ops/autograd.py), in eager mode.

Gradients of query, key, value, explicit score_mod buffers and tensors the score_mod closes
over are compared with float64 autograd of a naive reference; also GQA and broadcast-batch
sums, lse gradients, max_scores, mask_mod buffers, create_graph and double backward.
"""
import math

import pytest
import torch

import inductor_flex  # noqa: F401
from inductor_flex import AuxRequest, flex_attention
from inductor_flex.ops import inductor_flex_attention
from inductor_flex.ops.backward import DOUBLE_BACKWARD_MESSAGE

from test_ops import causal, identity, keep_all, naive_attention, partial_block_mask, qkv

OPTIONS = {"OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": True}
SCALE = 0.5


def run_op(query, key, value, score_mod=identity, mask_mod=causal, score_buffers=(), mask_buffers=()):
    q_len, kv_len = query.shape[2], key.shape[2]
    return inductor_flex_attention(query, key, value, score_mod,
                                   partial_block_mask(q_len, kv_len, mask_mod), SCALE, OPTIONS,
                                   score_buffers, mask_buffers)


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)


def assert_grads_match(tensors, loss_fn, reference_loss_fn, atol=1e-9, rtol=1e-7):
    got = grads_of(loss_fn(), tensors)
    want = grads_of(reference_loss_fn(), tensors)
    for g, w, t in zip(got, want, tensors):
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype
        w = torch.zeros_like(t) if w is None else w  # unused by the reference: zero gradient
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def test_qkv_and_explicit_buffer_grads_match_float64_reference():
    query, key, value = qkv(dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    slope = torch.randn(4, dtype=torch.float64, requires_grad=True)
    frozen = torch.randn(24, dtype=torch.float64)  # no grad: gets None

    def score_mod(score, b, h, q_idx, kv_idx, bias, slope, frozen):
        return score * slope[h] + bias[h, q_idx] + frozen[kv_idx]

    weights = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    tensors = (query, key, value, bias, slope)
    assert_grads_match(
        tensors,
        lambda: (run_op(query, key, value, score_mod,
                        score_buffers=(bias, slope, frozen))[0] * weights).sum(),
        lambda: (naive_attention(query, key, value,
                                 lambda s, b, h, q, kv: score_mod(s, b, h, q, kv, bias, slope, frozen),
                                 causal, SCALE)[0] * weights).sum())


def test_closure_tensor_grads_in_eager_mode():
    """The public API passes no buffers in eager mode; closed-over tensors still get grads,
    including a non-leaf one (its grad flows on to the parameter it came from)."""
    query, key, value = qkv(q_heads=4, kv_heads=4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 16, 24, dtype=torch.float64, requires_grad=True)
    log_scale = torch.randn(4, dtype=torch.float64, requires_grad=True)
    head_scale = log_scale.exp()  # non-leaf, closed over

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * head_scale[h] + bias[h, q_idx, kv_idx]

    weights = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    tensors = (query, key, value, bias, log_scale)
    assert_grads_match(
        tensors,
        lambda: (flex_attention(query, key, value, score_mod=score_mod, scale=SCALE) * weights).sum(),
        lambda: (naive_attention(query, key, value, score_mod, keep_all, SCALE)[0] * weights).sum())


def test_closure_grads_when_only_the_closure_requires_grad():
    query, key, value = qkv(dtype=torch.float64)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx] * kv_idx

    weights = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    got, = grads_of((run_op(query, key, value, score_mod)[0] * weights).sum(), (bias,))
    reference = naive_attention(query, key, value, score_mod, causal, SCALE)[0]
    want, = grads_of((reference * weights).sum(), (bias,))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kv_batch", [2, 1])
def test_gqa_and_broadcast_batch_grads_are_summed(kv_batch):
    query, key, value = qkv(batch=2, q_heads=6, kv_heads=2, kv_batch=kv_batch, value_dim=12,
                            dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, 16, 12, dtype=torch.float64)
    assert_grads_match(
        (query, key, value),
        lambda: (run_op(query, key, value)[0] * weights).sum(),
        lambda: (naive_attention(query, key, value, identity, causal, SCALE)[0] * weights).sum())


def test_float32_grads_close_to_float64_reference():
    query, key, value = qkv(requires_grad=True)
    weights = torch.randn(2, 4, 16, 8)
    got = grads_of((run_op(query, key, value)[0] * weights).sum(), (query, key, value))
    leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    want = grads_of((naive_attention(*leaves, identity, causal, SCALE)[0] * weights.double()).sum(), leaves)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-4)


# lse is float32 even for float64 inputs (the contract), so its gradients carry float32 error.
LSE_TOL = dict(atol=1e-6, rtol=1e-5)


def test_lse_gradient_alone_and_with_out():
    query, key, value = qkv(dtype=torch.float64, requires_grad=True)
    lse_weights = torch.randn(2, 4, 16, dtype=torch.float64)
    out_weights = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    tensors = (query, key, value)
    # Only lse reaches the loss: the backward gets no grad_out.
    assert_grads_match(
        tensors,
        lambda: (run_op(query, key, value)[1] * lse_weights).sum(),
        lambda: (naive_attention(query, key, value, identity, causal, SCALE)[1] * lse_weights).sum(),
        **LSE_TOL)
    assert_grads_match(
        tensors,
        lambda: sum((t * w).sum() for t, w in zip(run_op(query, key, value)[:2], (out_weights, lse_weights))),
        lambda: sum((t * w).sum() for t, w in zip(naive_attention(query, key, value, identity, causal, SCALE),
                                                   (out_weights, lse_weights))),
        **LSE_TOL)


def test_lse_grads_through_public_api():
    query, key, value = qkv(q_heads=4, kv_heads=4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 4, 16, dtype=torch.float64)
    assert_grads_match(
        (query, key, value),
        lambda: (flex_attention(query, key, value, scale=SCALE,
                                return_aux=AuxRequest(lse=True))[1].lse * weights).sum(),
        lambda: (naive_attention(query, key, value, identity, keep_all, SCALE)[1] * weights).sum(),
        **LSE_TOL)


def test_max_scores_is_not_differentiable():
    query, key, value = qkv(requires_grad=True)
    out, lse, max_scores = run_op(query, key, value)
    assert out.requires_grad and lse.requires_grad
    assert not max_scores.requires_grad
    # max_scores alone cannot drive a backward.
    with pytest.raises(RuntimeError, match="does not require grad"):
        max_scores.sum().backward()


def test_mask_mod_buffers_never_get_gradients():
    query, key, value = qkv(dtype=torch.float64, requires_grad=True)
    limit = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)

    def mask_mod(b, h, q_idx, kv_idx, limit):
        return (q_idx - kv_idx) < limit

    out = run_op(query, key, value, mask_mod=mask_mod, mask_buffers=(limit,))[0]
    grad_query, grad_limit = grads_of(out.sum(), (query, limit))
    assert grad_limit is None
    want, = grads_of(naive_attention(query, key, value, identity,
                                     lambda b, h, q, kv: mask_mod(b, h, q, kv, limit), SCALE)[0].sum(),
                     (query,))
    torch.testing.assert_close(grad_query, want)


def test_fully_masked_rows_give_zero_and_finite_grads():
    query, key, value = qkv(dtype=torch.float64, requires_grad=True)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= 4) & (kv_idx <= q_idx)  # rows 0..3 see nothing

    out, lse, _ = run_op(query, key, value, mask_mod=mask_mod)
    assert torch.all(out[:, :, :4] == 0) and torch.all(lse[:, :, :4] == -math.inf)
    grads = grads_of(out.sum(), (query, key, value))
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.all(grads[0][:, :, :4] == 0)
    reference = naive_attention(query, key, value, identity, mask_mod, SCALE)[0]
    want = grads_of(reference.sum(), (query, key, value))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_create_graph_first_order_works_and_double_backward_raises():
    query, key, value = qkv(dtype=torch.float64, requires_grad=True)
    out = run_op(query, key, value)[0]
    grad_query, = torch.autograd.grad(out.sum(), (query,), create_graph=True)
    want, = grads_of(naive_attention(query, key, value, identity, causal, SCALE)[0].sum(), (query,))
    torch.testing.assert_close(grad_query, want)
    assert grad_query.requires_grad
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad_query.sum().backward()
    assert "double backward" in DOUBLE_BACKWARD_MESSAGE


def test_no_graph_recorded_without_grad():
    query, key, value = qkv(requires_grad=True)
    with torch.no_grad():
        out, lse, _ = run_op(query, key, value)
    assert not out.requires_grad and out.grad_fn is None and not lse.requires_grad
    plain = qkv()
    out, _, _ = run_op(*plain)
    assert out.grad_fn is None
