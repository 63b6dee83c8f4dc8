"""Inputs PyTorch accepts that stress addressing: unaligned storage offsets and row strides
on every operand, sequences long enough to overflow 32-bit offsets, grids past 65535
programs on an axis, single-row queries and keys, and rows or batches the mask leaves
empty. Forward and backward, compiled, against the float64 golden run of ``flex_check``.

The layout matrix runs in one test (one process) and ends with a plain call: a kernel
that faults (a misaligned TMA address, an out-of-bounds read) poisons the CUDA context, so
the plain call would fail too and the fault could not hide behind a later, fresh process.
"""
import pytest
import torch

from inductor_flex import AuxRequest, create_block_mask, flex_attention
from flex_check import check_grads_against_golden, random_like_output

B, H, S, D = 2, 4, 256, 64
UNALIGNED_OFFSET = 997  # elements: not a multiple of 16 bytes in any dtype


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx) * 0.01


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` ([B, H, S, D]) copied into storage of the named layout: ``contiguous``;
    ``offset`` (starts UNALIGNED_OFFSET elements into its storage); ``row_stride`` (rows
    D + 1 apart, so no row but the first is 16-byte aligned); ``offset_and_row_stride``."""
    if layout == "contiguous":
        return values.contiguous()
    b, h, s, d = values.shape
    row = d + 1 if "row_stride" in layout else d
    offset = UNALIGNED_OFFSET if "offset" in layout else 0
    storage = torch.zeros(b * h * s * row + offset, device=values.device, dtype=values.dtype)
    view = torch.as_strided(storage, values.shape, (h * s * row, s * row, row, 1), offset)
    view.copy_(values)
    return view


LAYOUTS = ["offset", "row_stride", "offset_and_row_stride"]
TARGETS = ["query", "key", "value", "grad_out", "all"]


def _layout_case(device, dtype, layout, target, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(B, H, S, D, generator=gen).to(device, dtype) for _ in range(4))
    q, k, v, g = (laid_out(t, layout if target in (name, "all") else "contiguous")
                  for t, name in zip((q, k, v, g), ("query", "key", "value", "grad_out")))
    return q, k, v, g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_strided_matrix_in_one_process_then_a_plain_call(device, dtype):
    block_mask = create_block_mask(causal, None, None, S, S, device=device)
    failures = []
    for i, (layout, target) in enumerate((l, t) for l in LAYOUTS for t in TARGETS):
        torch._dynamo.reset()  # each layout compiles its own graph; no cache limit in the way
        q, k, v, g = _layout_case(device, dtype, layout, target, seed=i)
        assert layout == "row_stride" or target == "grad_out" or any(
            t.storage_offset() == UNALIGNED_OFFSET for t in (q, k, v))
        score_mod = relative_bias if target == "all" else None
        try:
            check_grads_against_golden(q, k, v, grad_out=g, block_mask=block_mask,
                                       score_mod=score_mod)
            torch.cuda.synchronize() if device == "cuda" else None
        except AssertionError as error:
            failures.append(f"{layout}/{target}: {error}")
    assert not failures, "\n".join(failures)
    # The context is healthy: a plain aligned call still runs and is right.
    torch._dynamo.reset()
    q, k, v, g = _layout_case(device, dtype, "contiguous", "all", seed=99)
    check_grads_against_golden(q, k, v, grad_out=g, block_mask=block_mask)


def _leaves(device, dtype, B, H, M, N, E=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, H, n, E, generator=gen).to(device, dtype).requires_grad_()
            for b, n in ((B, M), (B, N), (B, N))]


def test_long_sequence_has_no_offset_overflow(device):
    """S = 131072, B=1 H=4 D=64: q/k/v hold 2^25 elements and the score grid 2^36; an int32
    product anywhere in the addressing would wrap. Checked against a float32 SDPA of the
    last rows and a slice of the gradients, which a float64 dense run cannot afford."""
    M = 131072
    q, k, v = _leaves(device, torch.bfloat16, 1, 4, M, M)
    block_mask = create_block_mask(causal, None, None, M, M, device=device)
    out, aux = torch.compile(flex_attention)(q, k, v, block_mask=block_mask,
                                             return_aux=AuxRequest(lse=True))
    grad_out = random_like_output(q, v)
    out.backward(grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(aux.lse).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # The last 128 query rows see every key: the far end of every offset.
    rows = slice(M - 128, M)
    qs = q.detach()[:, :, rows].float().requires_grad_()
    ks, vs = k.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    bias = torch.arange(M - 128, M, device=device)[:, None] >= torch.arange(M, device=device)
    ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias)
    torch.testing.assert_close(out[:, :, rows].float(), ref, atol=2e-2, rtol=2e-2)
    # The query gradient of those rows depends only on them (and all of k, v).
    ref.backward(grad_out[:, :, rows].float())
    torch.testing.assert_close(q.grad[:, :, rows].float(), qs.grad, atol=3e-2, rtol=3e-2)


def test_grid_past_65535_programs(device):
    """B * H = 98304 heads of S=128: more programs than one grid axis of 65535 holds."""
    q, k, v = _leaves(device, torch.bfloat16, 1024, 96, 128, 128)
    out = torch.compile(flex_attention)(q, k, v)
    out.backward(torch.ones_like(out))
    ref = torch.nn.functional.scaled_dot_product_attention(q.detach().float(), k.detach().float(),
                                                           v.detach().float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    # The last head of the last batch is written (the far end of the grid).
    assert out[-1, -1].abs().sum() > 0 and q.grad[-1, -1].abs().sum() > 0
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("M,N", [(1, 256), (256, 1), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_single_row_queries_and_keys(device, M, N, dtype):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(device, dtype) for n in (M, N, N))
    check_grads_against_golden(q, k, v, score_mod=relative_bias, use_lse=True)


def blind_every_fourth_row(b, h, q_idx, kv_idx):
    return (q_idx % 4 != 0) & (kv_idx <= q_idx)


def blind_first_batch(b, h, q_idx, kv_idx):
    return b > 0


@pytest.mark.parametrize("mask_mod", [blind_every_fourth_row, blind_first_batch])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fully_masked_rows_and_batches(device, mask_mod, dtype):
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(B, H, S, D, generator=gen).to(device, dtype) for _ in range(3))
    block_mask = create_block_mask(mask_mod, B, None, S, S, device=device)
    got, _ = check_grads_against_golden(q, k, v, block_mask=block_mask, use_lse=True)
    if mask_mod is blind_first_batch:
        blind = (0, slice(None), slice(None))
        for name in ("out", "dq", "dk", "dv"):
            assert torch.all(got[name][0] == 0), name
    else:
        blind = (slice(None), slice(None), slice(0, S, 4))
        assert torch.all(got["out"][blind] == 0) and torch.all(got["dq"][blind] == 0)
    assert torch.all(torch.isneginf(got["lse"][blind]))
    for name, value in got.items():
        assert not value.isnan().any(), name


def test_backend_triton_serves_both_passes_and_refuses_what_it_cannot(device):
    """BACKEND='TRITON': the fused templates serve forward and backward (no extern call in
    the code); a call they decline (float64) is an error naming the reason, not a silent
    dense run."""
    if device != "cuda":
        pytest.skip("the fused Triton kernels compile for CUDA only")
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, H, S, D, generator=gen).to(device, torch.bfloat16).requires_grad_()
               for _ in range(3))
    fn = torch.compile(flex_attention)
    block_mask = create_block_mask(causal, None, None, S, S, device=device)

    def step():
        out = fn(q, k, v, block_mask=block_mask, kernel_options={"BACKEND": "TRITON"})
        out.sum().backward()
        return out

    out, code = run_and_get_code(step)
    text = "\n".join(code)
    assert "inductor_flex.dense" not in text and "triton_tem" in text
    ref = flex_attention(*(t.detach().double() for t in (q, k, v)), block_mask=block_mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="BACKEND='TRITON' cannot serve this call: fused Triton forward: dtype torch.float64"):
        fn(*(t.detach().double() for t in (q, k, v)), kernel_options={"BACKEND": "TRITON"})
