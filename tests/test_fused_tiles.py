"""The compiled CPU path's fused tile kernels (inductor_flex/ops/fused_tiles.py).

With the size threshold lowered to 0, small problems take the fused kernels. The dense
kernels' results with them must equal those of the plain (vmap) path, and gradients,
including a captured buffer's, must satisfy the error-ratio rule against a float64
reference: masks with partial and full blocks, rows that keep nothing, GQA, a score
gradient that differs from the score_mod's own derivative, float32/bfloat16/float16.
The kernels' own float32 tanh is checked against the exact one.
"""
import math

import pytest
import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex._mods import identity_score_mod
from inductor_flex.ops import dense, fused_tiles

from test_ops import naive_attention

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

BLOCK = 16
Q_LEN, KV_LEN, DIM = 64, 48, 16


@pytest.fixture(autouse=True)
def always_fused(monkeypatch):
    monkeypatch.setattr(fused_tiles, "FUSED_TILES_MIN_SCORES", 0)


def causal_but_row_five(b, h, q_idx, kv_idx):
    # Causal with its kv positions offset, and one row that keeps nothing.
    return (q_idx + 8 >= kv_idx) & (q_idx != 5)


def striped(b, h, q_idx, kv_idx):
    # Per head: head 1 sees only every other kv block (masked columns not contiguous).
    return (h == 0) | ((kv_idx // BLOCK) % 2 == 0)


def softcap_alibi(score, b, h, q_idx, kv_idx, slopes):
    return 8.0 * torch.tanh((score + slopes[h] * (kv_idx - q_idx) / 16.0) / 8.0)


def make(dtype, q_heads=4, kv_heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, q_heads, Q_LEN, DIM, generator=generator).to(dtype)
    key, value = (torch.randn(2, kv_heads, KV_LEN, DIM, generator=generator).to(dtype)
                  for _ in range(2))
    grad_out = torch.randn(2, q_heads, Q_LEN, DIM, generator=generator).to(dtype)
    slopes = torch.rand(q_heads, generator=generator)
    return query, key, value, grad_out, slopes


def operator_mask(mask_mod, heads):
    return create_block_mask(mask_mod, None, heads, Q_LEN, KV_LEN, device="cpu",
                             BLOCK_SIZE=BLOCK).operator_tuple()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_mod", [causal_but_row_five, striped])
def test_fused_forward_equals_plain_path(dtype, mask_mod):
    query, key, value, _, slopes = make(dtype)
    block_mask = operator_mask(mask_mod, query.shape[1])
    kernels = fused_tiles.TileKernels(softcap_alibi)
    fused = dense.dense_attention(query, key, value, softcap_alibi, block_mask, 0.25, (slopes,),
                                  fused_tiles=fused_tiles.FusedTiles(kernels))
    plain = dense.dense_attention(query, key, value, softcap_alibi, block_mask, 0.25, (slopes,))
    assert not kernels._forward.failed
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for got, expected in zip(fused, plain):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    if mask_mod is causal_but_row_five:
        assert (fused[0][:, :, 5] == 0).all() and (fused[1][:, :, 5] == -math.inf).all()


@pytest.mark.parametrize("score_mod", [softcap_alibi, identity_score_mod], ids=["mod", "identity"])
def test_fused_backward_equals_plain_path(score_mod):
    query, key, value, grad_out, slopes = make(torch.float32)
    block_mask = operator_mask(causal_but_row_five, query.shape[1])
    buffers = (slopes,) if score_mod is softcap_alibi else ()
    out, lse, _ = dense.dense_attention(query, key, value, score_mod, block_mask, 0.25, buffers)
    kernels = fused_tiles.TileKernels(None if score_mod is identity_score_mod else score_mod)
    wanted = [True] * len(buffers)
    fused = dense.dense_attention_backward(
        query, key, value, out, lse, grad_out, None, score_mod, block_mask, 0.25, buffers,
        buffers_requiring_grad=wanted, fused_tiles=fused_tiles.FusedTiles(kernels))
    plain = dense.dense_attention_backward(
        query, key, value, out, lse, grad_out, None, score_mod, block_mask, 0.25, buffers,
        buffers_requiring_grad=wanted)
    assert kernels._backward is None or not kernels._backward.failed
    for got, expected in zip(fused[:3] + tuple(fused[3]), plain[:3] + tuple(plain[3])):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (fused[0][:, :, 5] == 0).all()  # the row that keeps nothing


def test_fused_backward_takes_the_given_score_gradient():
    """A score gradient function (the joint graph's, in the compiled path) replaces the
    score_mod's own derivative; the buffers' gradients still come from the score_mod."""
    query, key, value, grad_out, slopes = make(torch.float32)
    block_mask = operator_mask(causal_but_row_five, query.shape[1])

    def doubled_gradient(score, b, h, q_idx, kv_idx, grad, slopes):
        return (2.0 * grad,)

    from inductor_flex.ops.backward import with_score_gradient

    out, lse, _ = dense.dense_attention(query, key, value, softcap_alibi, block_mask, 0.25, (slopes,))
    fused = dense.dense_attention_backward(
        query, key, value, out, lse, grad_out, None, softcap_alibi, block_mask, 0.25, (slopes,),
        buffers_requiring_grad=[True], fused_tiles=fused_tiles.FusedTiles(
            fused_tiles.TileKernels(softcap_alibi, doubled_gradient)))
    plain = dense.dense_attention_backward(
        query, key, value, out, lse, grad_out, None,
        with_score_gradient(softcap_alibi, doubled_gradient), block_mask, 0.25, (slopes,),
        buffers_requiring_grad=[True])
    for got, expected in zip(fused[:3] + tuple(fused[3]), plain[:3] + tuple(plain[3])):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gradients_with_fused_tiles_match_float64(dtype):
    """torch.compile end to end (the extern ops hand the dense kernels fused tiles): a
    learned bias buffer's gradient, GQA, a partial-block mask; error ratio vs eager."""
    from inductor_flex.lowering import extern

    query, key, value, grad_out, slopes = make(dtype)
    bias = (slopes / 4).requires_grad_()

    def softcap_bias(score, b, h, q_idx, kv_idx):
        return 8.0 * torch.tanh((score + bias[h] * (kv_idx - q_idx) / 16.0) / 8.0)

    block_mask = create_block_mask(causal_but_row_five, None, None, Q_LEN, KV_LEN, device="cpu",
                                   BLOCK_SIZE=BLOCK)

    def run(attend, leaves):
        out = attend(*leaves, score_mod=softcap_bias, block_mask=block_mask, enable_gqa=True)
        grads = torch.autograd.grad(out, leaves + [bias], grad_out)
        return [out] + list(grads)

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (query, key, value)]

    extern._tile_kernels.clear()
    compiled = run(torch.compile(flex_attention), leaves())
    assert extern._tile_kernels and all(
        k._backward is None or not k._backward.failed for k in extern._tile_kernels.values())
    assert any(k._backward is not None for k in extern._tile_kernels.values())
    eager = run(flex_attention, leaves())

    exact_leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    exact_bias = bias.detach().double().requires_grad_()
    group = query.shape[1] // key.shape[1]

    def exact_mod(score, b, h, q_idx, kv_idx):
        return 8.0 * torch.tanh((score + exact_bias[h] * (kv_idx - q_idx) / 16.0) / 8.0)

    exact_out, _ = naive_attention(*exact_leaves, exact_mod, causal_but_row_five, 0.25)
    exact = [exact_out] + list(torch.autograd.grad(exact_out, exact_leaves + [exact_bias],
                                                   grad_out.double()))
    assert group == 2
    ratio = 10.0 if dtype == torch.float32 else 1.1
    for got, same_dtype, expected in zip(compiled, eager, exact):
        assert got.dtype == same_dtype.dtype and got.shape == expected.shape
        compiled_error = (got.double() - expected).abs().max().item()
        eager_error = (same_dtype.double() - expected).abs().max().item()
        assert compiled_error <= ratio * eager_error + 1e-6


def test_tile_kernels_tanh_is_as_exact_as_tanh():
    """The tile kernels' tanh (``_tanh_from_exp``, compiled as the kernels compile it) is
    within 1.2 float32 epsilons of the exact tanh, keeps tanh's specials and the sign of
    zero, and leaves other dtypes to Inductor's own tanh."""
    from inductor_flex._compat import inductor_with_decompositions

    tanh = torch.compile(torch.tanh, dynamic=True,
                         backend=inductor_with_decompositions(fused_tiles._TILE_DECOMPOSITIONS))
    magnitudes = torch.logspace(-30, 1.5, 20_001)
    x = torch.cat([torch.linspace(-20.0, 20.0, 400_001), magnitudes, -magnitudes])
    exact = torch.tanh(x.double())
    got = tanh(x)
    assert got.dtype == torch.float32
    relative = ((got.double() - exact).abs() / exact.abs())[exact != 0]
    assert relative.max().item() <= 1.2 * torch.finfo(torch.float32).eps
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf])
    got = tanh(specials)
    assert got.tolist() == [0.0, 0.0, 1.0, -1.0]
    assert got.signbit().tolist() == [False, True, False, True]
    assert tanh(torch.tensor([math.nan])).isnan().all()
    assert fused_tiles._tanh_from_exp(x.double()) is NotImplemented
    assert fused_tiles._tanh_from_exp(x.half()) is NotImplemented
