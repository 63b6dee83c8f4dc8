"""A score_mod that is not finite where the mask drops a score must not reach any gradient
(issue: silent NaN gradients). Masked positions contribute exactly zero to the gradients of
query, key, value and every captured buffer, eagerly and under torch.compile on CPU."""
import math

import pytest
import torch

from inductor_flex import create_block_mask, flex_attention

L, E, H = 256, 16, 2


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def reference(q, k, v, w, kind):
    """Plain float64 attention whose mod is evaluated only on kept positions (clamped
    distances elsewhere give the same kept values and finite derivatives)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(E)
    rows = torch.arange(L)[:, None]
    cols = torch.arange(L)[None, :]
    distance = (rows - cols).clamp(min=0).double()
    if kind == "sqrt":
        scores = scores / torch.sqrt(distance + 200)
    else:
        scores = scores - w[None, :, None, None] * torch.log1p(distance)
    scores = scores.masked_fill(~(rows >= cols), -math.inf)
    return torch.softmax(scores, -1) @ v


def mods(kind, w):
    if kind == "sqrt":
        # NaN wherever kv_idx > q_idx + 200: only where causal drops the score.
        return lambda s, b, h, q, kv: s / torch.sqrt((q - kv + 200).to(s.dtype))
    return lambda s, b, h, q, kv: s - w[h] * torch.log1p((q - kv).to(s.dtype))


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["sqrt", "learned_log_bias"])
def test_masked_non_finite_mod_gives_finite_exact_gradients(device, compiled, kind):
    """On CUDA the compiled call runs the fused backward kernel (the causal diagonal blocks
    are partial: there the mask drops the scores whose mod is not finite)."""
    gen = torch.Generator().manual_seed(0)
    q64, k64, v64 = (torch.randn(1, H, L, E, generator=gen, dtype=torch.float64) for _ in range(3))
    w64 = torch.rand(H, generator=gen, dtype=torch.float64)
    block_mask = create_block_mask(causal, None, None, L, L, device=device)

    q, k, v, w = (t.float().to(device).requires_grad_() for t in (q64, k64, v64, w64))
    attention = torch.compile(flex_attention) if compiled else flex_attention
    out = attention(q, k, v, score_mod=mods(kind, w), block_mask=block_mask)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out.to(device))

    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64, w64)]
    expected = reference(*leaves64, kind)
    expected.backward(grad_out.double())

    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-4)
    names = ["q", "k", "v", "w"] if kind != "sqrt" else ["q", "k", "v"]
    for name, got, want in zip(names, (q, k, v, w), leaves64):
        assert torch.isfinite(got.grad).all(), f"non-finite grad of {name}"
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=1e-4, rtol=1e-4, msg=name)
