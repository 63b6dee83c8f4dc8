"""Design experiment: would an atomic-dQ backward beat our split one on Hopper, in Triton?

Our backward kernel (``templates/backward.py.jinja``) splits the work between dK/dV
programs and dQ programs, so each score costs 7 matrix products (the dQ programs
recompute ``q k^T`` and ``dO v^T``) and dQ needs no float32 accumulator. FlashAttention-2/3
and cuDNN instead add each key tile's share of dQ into a float32 buffer from the dK/dV
programs: 5 products per score, plus the atomics and a float32 buffer of 4 bytes per dQ
element. ``docs/kernels.md`` (the backward's "What stays open") explains why 5 products
looked like the way past the power cap; ``docs/measurements.md`` (2026-11-30, atomic dQ)
has this script's results.

This script answers the question with a hand-written one-pass kernel of that design (full
or causal attention, no mods, bf16, head dim 128, the sequence a multiple of the tiles): per
program BLOCK_N keys, dK and dV in registers, a step of BLOCK_M query rows adds
``dS^T k``'s tile into the float32 dQ buffer, through the TMA's reduce-add (``TMA=1``) or
pointer atomics (``TMA=0``); a small kernel then scales and casts dQ. Each variant is
checked against ours (largest absolute difference of dQ, dK, dV, printed) and timed with
``triton.testing.do_bench`` in the same process as ours (``torch.compile`` of
``inductor_flex.flex_attention``) and PyTorch's FlexAttention. Every timing of the
prototype includes zeroing the float32 buffer, the delta kernel and the cast.

    python benchmarks/bench_atomic_dq.py --masks full \\
        '{"BM": 64, "BN": 128, "W": 8, "ST": 3, "TMA": 1}'

Options of a variant: BM, BN (tiles), W (warps), ST (pipeline stages), TMA (reduce-add
through the TMA), EDP (issue ``dO v^T`` before the exponentials). Needs a Hopper GPU and
Triton's host-side tensor descriptors.
"""
import argparse
import json
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch comes without Triton
    sys.exit("bench_atomic_dq.py needs Triton and a CUDA GPU")

from inductor_flex.bench import SHAPES, allow_retained_backward, bench_ms, leaf_inputs  # noqa: E402

DEFAULT_VARIANTS = (
    '{"BM": 64, "BN": 128, "W": 8, "ST": 2, "TMA": 1}',
    '{"BM": 64, "BN": 128, "W": 8, "ST": 3, "TMA": 1}',
    '{"BM": 64, "BN": 128, "W": 8, "ST": 3, "TMA": 0}',
    '{"BM": 64, "BN": 128, "W": 8, "ST": 3, "TMA": 1, "EDP": 1}',
    '{"BM": 32, "BN": 128, "W": 8, "ST": 3, "TMA": 1}',
    '{"BM": 64, "BN": 64, "W": 4, "ST": 2, "TMA": 1}',
)


@triton.jit
def atomic_dq_backward(desc_q, desc_do, desc_k, desc_v, desc_dq_sum, dq_sum, LSE, DELTA, DK, DV,
                       SEQ_LEN, sm_scale,
                       BLOCK_M: tl.constexpr,     # query rows per step
                       BLOCK_N: tl.constexpr,     # keys per program
                       HEAD_DIM: tl.constexpr,
                       CAUSAL: tl.constexpr,      # keep q_idx >= kv_idx (and start at the diagonal)
                       STAGES: tl.constexpr,      # software-pipeline depth of the q / dO loads
                       TMA_REDUCE: tl.constexpr,  # dQ through the TMA's reduce-add, else pointer atomics
                       EARLY_DP: tl.constexpr):   # issue dO v^T before the exponentials
    """dK, dV of BLOCK_N keys of one (batch, head), adding dQ's share into dq_sum (float32).

    q, k, v, dO are [batch * heads * SEQ_LEN, HEAD_DIM] row-major; LSE (natural log) and
    DELTA (rowsum(dO * O)) are [batch * heads * SEQ_LEN]."""
    head = tl.program_id(1).to(tl.int64)
    head_row = (head * SEQ_LEN).to(tl.int32)
    key_start = tl.program_id(0) * BLOCK_N
    offs_n = key_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = desc_k.load([head_row + key_start, 0])
    v = desc_v.load([head_row + key_start, 0])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    log2_scale = sm_scale * 1.4426950408889634  # scores to base 2
    first_query = key_start if CAUSAL else 0
    for query_start in tl.range(first_query, SEQ_LEN, BLOCK_M, num_stages=STAGES):
        offs_m = query_start + tl.arange(0, BLOCK_M)
        q = desc_q.load([head_row + query_start, 0])
        do = desc_do.load([head_row + query_start, 0])
        lse2 = tl.load(LSE + head * SEQ_LEN + offs_m) * 1.4426950408889634
        delta = tl.load(DELTA + head * SEQ_LEN + offs_m)
        # Keys down the rows: P^T, dP^T, dS^T are [BLOCK_N, BLOCK_M].
        qk_t = tl.dot(k, tl.trans(q))
        if EARLY_DP:
            dp_t = tl.dot(v, tl.trans(do))
        p_t = tl.math.exp2(qk_t * log2_scale - lse2[None, :])
        if CAUSAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        if not EARLY_DP:
            dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk)
        dq_share = tl.dot(tl.trans(ds_t), k)  # [BLOCK_M, HEAD_DIM]: the 5th product
        if TMA_REDUCE:
            desc_dq_sum.atomic_add([head_row + query_start, 0], dq_share)
        else:
            tl.atomic_add(dq_sum + (head * SEQ_LEN + offs_m)[:, None] * HEAD_DIM + offs_d[None, :],
                          dq_share, sem="relaxed")
    rows = (head * SEQ_LEN + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + rows, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + rows, dv.to(DV.dtype.element_ty))


@triton.jit
def row_dot(O, DO, DELTA, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """DELTA = rowsum(O * DO) in float32, ROWS rows per program."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HEAD_DIM)
    at = rows[:, None] * HEAD_DIM + cols[None, :]
    product = tl.load(O + at).to(tl.float32) * tl.load(DO + at).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(product, 1))


@triton.jit
def scale_and_cast(SRC, DST, scale, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """DST = (SRC * scale) in DST's dtype, ROWS rows per program."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    at = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(DST + at, (tl.load(SRC + at) * scale).to(DST.dtype.element_ty))


def prototype_backward(q, k, v, out, lse, grad_out, variant, causal):
    """(dq, dk, dv) of ``[B, H, S, D]`` inputs by the atomic-dQ prototype."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, S, D = q.shape
    rows = B * H * S
    if S % variant["BN"] or S % variant["BM"] or S % 64:
        raise ValueError(f"sequence length {S} must be a multiple of 64 and of the variant's tiles")
    q2, k2, v2, do2, o2 = (t.detach().reshape(rows, D) for t in (q, k, v, grad_out, out))
    scale = D ** -0.5
    dq_sum = torch.zeros(rows, D, device=q.device, dtype=torch.float32)
    delta = torch.empty(rows, device=q.device, dtype=torch.float32)
    row_dot[(rows // 64,)](o2, do2, delta, ROWS=64, HEAD_DIM=D)
    dq, dk, dv = torch.empty_like(q2), torch.empty_like(k2), torch.empty_like(v2)
    bm, bn = variant["BM"], variant["BN"]
    descriptors = [TensorDescriptor.from_tensor(q2, [bm, D]), TensorDescriptor.from_tensor(do2, [bm, D]),
                   TensorDescriptor.from_tensor(k2, [bn, D]), TensorDescriptor.from_tensor(v2, [bn, D]),
                   TensorDescriptor.from_tensor(dq_sum, [bm, D])]
    atomic_dq_backward[(S // bn, B * H)](
        *descriptors, dq_sum, lse.detach().reshape(rows), delta, dk, dv, S, scale,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, CAUSAL=causal, STAGES=variant["ST"],
        TMA_REDUCE=bool(variant["TMA"]), EARLY_DP=bool(variant.get("EDP", 0)),
        num_warps=variant["W"], num_stages=variant["ST"])
    scale_and_cast[(rows // 64,)](dq_sum, dq, scale, ROWS=64, HEAD_DIM=D)
    return tuple(t.view(B, H, S, D) for t in (dq, dk, dv))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=DEFAULT_VARIANTS, help="JSON, one per variant")
    parser.add_argument("--shape", default="big", choices=sorted(SHAPES))
    parser.add_argument("--masks", default="full,causal")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    allow_retained_backward()
    import inductor_flex
    from torch.nn.attention.flex_attention import create_block_mask as pt_create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as pt_flex_attention

    shape = SHAPES[args.shape]
    B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
    inputs, grad_out = leaf_inputs(shape, "cuda")
    ours, pt = torch.compile(inductor_flex.flex_attention), torch.compile(pt_flex_attention)

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    print("| mask | kernel | ms | TFLOP/s | max abs diff dq, dk, dv against ours |")
    print("|---|---|---|---|---|")
    for mask in args.masks.split(","):
        causal = mask == "causal"
        ours_mask = inductor_flex.create_block_mask(causal_mask, None, None, S, S) if causal else None
        pt_mask = pt_create_block_mask(causal_mask, None, None, S, S) if causal else None
        flops = 2.5 * 4 * B * H * S * S * D * (0.5 if causal else 1.0)

        def row(kernel, ms, diff=""):
            print(f"| {mask} | {kernel} | {ms:.3f} | {flops / ms / 1e9:.1f} | {diff} |", flush=True)

        out, lse = ours(*inputs, block_mask=ours_mask, return_lse=True)
        ours_grads = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
        row("ours (split)", bench_ms(lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True),
                                     warmup=50, rep=300))
        pt_out = pt(*inputs, block_mask=pt_mask)
        row("PyTorch FlexAttention", bench_ms(
            lambda: torch.autograd.grad(pt_out, inputs, grad_out, retain_graph=True), warmup=50, rep=300))
        for text in args.variants:
            variant = json.loads(text)
            try:
                grads = prototype_backward(*inputs, out, lse, grad_out, variant, causal)
                diff = ", ".join(f"{float((a - b).abs().max()):.2g}" for a, b in zip(grads, ours_grads))
                ms = bench_ms(lambda: prototype_backward(*inputs, out, lse, grad_out, variant, causal),
                              warmup=50, rep=300)
                row(f"atomic dQ {text}", ms, diff)
            except Exception as error:  # a variant that does not compile or launch
                print(f"| {mask} | atomic dQ {text} | failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200]} | | |", flush=True)


if __name__ == "__main__":
    main()
