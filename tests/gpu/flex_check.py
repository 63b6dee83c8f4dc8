"""Shared checks for the GPU forward tests.

Accuracy is judged against a float64 "golden" run of the same call (the eager operator on
upcast inputs), relative to the error the eager operator makes in the test dtype:

    compiled_error <= FACTOR[dtype] * eager_error

with errors measured as mean absolute difference from golden. FACTOR is 10 for float32.
For float16 / bfloat16 it is 2: the eager path keeps softmax probabilities in float32
through the second matmul, while the fused kernel, like every flash-attention kernel,
rounds them to the input dtype for the tensor-core product; that costs a measured
1.5-1.6x the eager error on random inputs (see docs/kernels.md), and a real bug (a wrong
mask, index or scale) costs orders of magnitude more.
"""
import re

import torch

from inductor_flex import AuxRequest, flex_attention

FACTOR = {torch.float32: 10.0, torch.float16: 2.0, torch.bfloat16: 2.0}


def qkv(device, dtype, B=2, Hq=4, M=256, N=None, E=64, Ev=None, Hkv=None, Bkv=None, seed=0):
    """Random query/key/value, contiguous [B, H, L, E]."""
    N = M if N is None else N
    Ev = E if Ev is None else Ev
    Hkv = Hq if Hkv is None else Hkv
    Bkv = B if Bkv is None else Bkv
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return rand(B, Hq, M, E), rand(Bkv, Hkv, N, E), rand(Bkv, Hkv, N, Ev)


def _mean_abs(a, b):
    return (a.double() - b.double()).abs().mean().item()


def _finite_mean_abs(a, b):
    """Mean |a - b| where b is finite; -inf must match -inf exactly."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "-inf rows differ"
    finite = torch.isfinite(b)
    return (a[finite] - b[finite]).abs().mean().item() if finite.any() else 0.0


def check_against_golden(q, k, v, compiled=None, factor=None, lse_atol=0.0, **kwargs):
    """Run flex_attention eagerly (in q's dtype and in float64) and compiled; assert the
    compiled output and lse are within ``factor`` x the eager error of golden (lse and
    max_scores also within ``lse_atol`` more, for options that trade accuracy). Returns
    (compiled_out, compiled_aux, golden_out, golden_aux)."""
    aux = AuxRequest(lse=True, max_scores=True)
    if compiled is None:
        compiled = torch.compile(flex_attention)
    golden_out, golden_aux = flex_attention(q.double(), k.double(), v.double(), return_aux=aux, **kwargs)
    eager_out, eager_aux = flex_attention(q, k, v, return_aux=aux, **kwargs)
    out, out_aux = compiled(q, k, v, return_aux=aux, **kwargs)

    assert out.shape == eager_out.shape and out.dtype == q.dtype
    assert out.stride() == eager_out.stride(), (out.stride(), eager_out.stride())
    assert not out.isnan().any(), "NaN in the compiled output"
    assert out_aux.lse.dtype == torch.float32 and out_aux.max_scores.dtype == torch.float32
    factor = FACTOR[q.dtype] if factor is None else factor
    # A floor of a few float32 ulps keeps exact-match cases from demanding a zero error.
    floor = 1e-7
    out_err, eager_err = _mean_abs(out, golden_out), _mean_abs(eager_out, golden_out)
    assert out_err <= factor * eager_err + floor, f"out error {out_err:.3g} vs eager {eager_err:.3g}"
    lse_err = _finite_mean_abs(out_aux.lse, golden_aux.lse)
    eager_lse_err = _finite_mean_abs(eager_aux.lse, golden_aux.lse)
    assert lse_err <= factor * eager_lse_err + floor + lse_atol, f"lse error {lse_err:.3g} vs eager {eager_lse_err:.3g}"
    max_err = _finite_mean_abs(out_aux.max_scores, golden_aux.max_scores)
    eager_max_err = _finite_mean_abs(eager_aux.max_scores, golden_aux.max_scores)
    assert max_err <= factor * eager_max_err + floor + lse_atol, f"max error {max_err:.3g} vs eager {eager_max_err:.3g}"
    return out, out_aux, golden_out, golden_aux


def compiled_code(fn, *args, **kwargs):
    """(result, generated source of every compiled graph) of a torch.compile'd ``fn``."""
    from torch._inductor.utils import run_and_get_code

    return run_and_get_code(fn, *args, **kwargs)


def kernel_sources(code):
    """{kernel name: source} of the Triton kernels in Inductor's generated module."""
    pieces = re.split(r"^(\w+) = async_compile\.triton\(", code, flags=re.M)
    return {pieces[i]: pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}
