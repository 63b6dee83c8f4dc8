"""Shared checks for the GPU kernel tests (forward and backward).

Accuracy is judged against a float64 "golden" run of the same call: the eager operator on
inputs (and captured buffers) upcast to float64, gradients included. Every error is the
mean absolute difference from golden, and the compiled result must satisfy

    compiled_error <= FACTOR[dtype] * eager_error + floor

where eager_error is the error of the eager operator run in the test dtype and the floor
is a few float32 ulps (so results that match golden exactly do not demand a zero error;
for the float32 lse and max_scores, one ulp of their size).

FACTOR is 1.1 for float16 / bfloat16: the eager path rounds what a tensor-core kernel
rounds (the softmax probabilities P before P @ V and P^T @ dO, and the score gradient dS
before dS @ K and dS^T @ Q) to the input dtype, so a correct kernel carries errors of the
same size and only reordered float32 sums separate the two. It is 10 for float32, whose
errors are float32 rounding of differently ordered sums and exp2/log2 in place of exp/log.
A wrong mask, index, scale or missing gradient term costs orders of magnitude more.
"""
import contextlib
import math
import re

import torch

from inductor_flex import AuxRequest, flex_attention

FACTOR = {torch.float32: 10.0, torch.float16: 1.1, torch.bfloat16: 1.1}


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


def _statistic_floor(golden):
    """lse and max_scores are float32 whatever the inputs: errors within about one float32
    ulp of their size (2^-23 x mean |value|) are rounding noise, not a kernel's doing."""
    finite = golden[torch.isfinite(golden)]
    return 2.0 ** -23 * finite.double().abs().mean().item() if finite.numel() else 0.0


def _finite_mean_abs(a, b):
    """Mean |a - b| where b is finite; -inf must match -inf exactly."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "-inf rows differ"
    finite = torch.isfinite(b)
    return (a[finite] - b[finite]).abs().mean().item() if finite.any() else 0.0


def check_against_golden(q, k, v, compiled=None, factor=None, lse_atol=0.0,
                         aux=AuxRequest(lse=True, max_scores=True), **kwargs):
    """Run flex_attention eagerly (in q's dtype and in float64) and compiled; assert the
    compiled output and lse are within ``factor`` x the eager error of golden (lse and
    max_scores also within ``lse_atol`` more, for options that trade accuracy). ``aux``
    must ask for lse; max_scores is checked when it asks for it. Returns
    (compiled_out, compiled_aux, golden_out, golden_aux)."""
    if compiled is None:
        compiled = torch.compile(flex_attention)
    golden_out, golden_aux = flex_attention(q.double(), k.double(), v.double(), return_aux=aux, **kwargs)
    eager_out, eager_aux = flex_attention(q, k, v, return_aux=aux, **kwargs)
    out, out_aux = compiled(q, k, v, return_aux=aux, **kwargs)

    assert out.shape == eager_out.shape and out.dtype == q.dtype
    assert out.stride() == eager_out.stride(), (out.stride(), eager_out.stride())
    assert not out.isnan().any(), "NaN in the compiled output"
    assert out_aux.lse.dtype == torch.float32 and out_aux.lse.shape == q.shape[:3]
    factor = FACTOR[q.dtype] if factor is None else factor
    # A floor of a few float32 ulps keeps exact-match cases from demanding a zero error.
    floor = 1e-7
    out_err, eager_err = _mean_abs(out, golden_out), _mean_abs(eager_out, golden_out)
    assert out_err <= factor * eager_err + floor, f"out error {out_err:.3g} vs eager {eager_err:.3g}"
    lse_err = _finite_mean_abs(out_aux.lse, golden_aux.lse)
    eager_lse_err = _finite_mean_abs(eager_aux.lse, golden_aux.lse)
    assert lse_err <= factor * eager_lse_err + _statistic_floor(golden_aux.lse) + lse_atol, f"lse error {lse_err:.3g} vs eager {eager_lse_err:.3g}"
    if not aux.max_scores:
        return out, out_aux, golden_out, golden_aux
    assert out_aux.max_scores.dtype == torch.float32
    max_err = _finite_mean_abs(out_aux.max_scores, golden_aux.max_scores)
    eager_max_err = _finite_mean_abs(eager_aux.max_scores, golden_aux.max_scores)
    assert max_err <= factor * eager_max_err + _statistic_floor(golden_aux.max_scores) + lse_atol, f"max error {max_err:.3g} vs eager {eager_max_err:.3g}"
    return out, out_aux, golden_out, golden_aux


def compiled_code(fn, *args, **kwargs):
    """(result, generated source of every compiled graph) of a torch.compile'd ``fn``."""
    from torch._inductor.utils import run_and_get_code

    return run_and_get_code(fn, *args, **kwargs)


@contextlib.contextmanager
def generated_code():
    """A list collecting the source of every graph Inductor compiles inside the block.
    Unlike ``compiled_code`` (``run_and_get_code``) it does not reset Dynamo first, so a
    loop that counts compiles can record each call's code."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        yield codes


def kernel_sources(code):
    """{kernel name: source} of the Triton kernels in Inductor's generated module."""
    pieces = re.split(r"^(\w+) = async_compile\.triton\(", code, flags=re.M)
    return {pieces[i]: pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------

# Gradients are compared with a floor relative to their golden size (about 8 float32 ulps),
# since their scale varies by orders of magnitude between cases.
GRAD_FLOOR = 2.0 ** -20


def _fresh_leaf(t, dtype=None):
    """A new autograd leaf holding ``t``'s values; it keeps ``t``'s strides and storage
    offset unless ``dtype`` converts a floating-point tensor (for the golden run)."""
    leaf = t.detach()
    if dtype is not None and leaf.is_floating_point():
        leaf = leaf.to(dtype)
    return leaf.requires_grad_(t.requires_grad)


def forward_backward(fn, q, k, v, buffers=(), mods=None, grad_out=None, grad_lse=None, **kwargs):
    """Run ``fn(q, k, v, **mods(*buffers), **kwargs)`` and its backward.

    ``q``, ``k``, ``v`` and the ``buffers`` that require grad must be leaves; the gradients
    are taken with ``torch.autograd.grad`` (so they come back in the layout the backward
    produced, not restrided by ``.grad`` accumulation) for the loss
    ``<out, grad_out> + <lse, grad_lse>``; the lse term (``return_aux=AuxRequest(lse=True)``)
    only when ``grad_lse`` is given. Returns ``{name: tensor}`` with ``out``, ``lse`` (when
    asked), ``dq``, ``dk``, ``dv`` and ``d_buffer{i}`` for each buffer that requires grad.
    """
    call_kwargs = dict(kwargs)
    if mods is not None:
        call_kwargs.update(mods(*buffers))
    if grad_lse is not None:
        out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **call_kwargs)
        outputs, seeds = (out, aux.lse), (grad_out, grad_lse)
    else:
        out = fn(q, k, v, **call_kwargs)
        outputs, seeds = (out,), (grad_out,)
    wanted = {"dq": q, "dk": k, "dv": v}
    wanted.update({f"d_buffer{i}": b for i, b in enumerate(buffers)
                   if isinstance(b, torch.Tensor) and b.requires_grad})
    grads = torch.autograd.grad(outputs, list(wanted.values()), seeds)
    results = {"out": out.detach()}
    if grad_lse is not None:
        results["lse"] = aux.lse.detach()
    results.update(zip(wanted, grads))
    return results


def random_like_output(q, v, dtype=None, seed=1):
    """A random cotangent of shape [B, Hq, M, Ev] (contiguous, ``q``'s dtype by default)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (*q.shape[:3], v.shape[-1])
    return torch.randn(*shape, generator=gen).to(device=q.device, dtype=dtype or q.dtype)


def check_grads_against_golden(q, k, v, compiled=None, buffers=(), mods=None, grad_out=None,
                               use_lse=False, factor=None, **kwargs):
    """Forward and backward of ``flex_attention(q, k, v, **mods(*buffers), **kwargs)``
    run in float64 (golden), eagerly in ``q``'s dtype, and through ``compiled``.

    ``mods`` builds the keyword arguments that read tensors (``score_mod``, a ``block_mask``
    whose mask_mod reads them, ...) from ``buffers``, so that the golden run can hand it
    float64 copies; a buffer that requires grad has its gradient checked. ``grad_out``
    (random by default; may be any strided tensor) is the cotangent of ``out``; with
    ``use_lse`` the loss also includes the returned lse (against a random float32
    cotangent), so its gradient flows into the backward.

    Asserts for out, lse (with ``use_lse``), dq, dk, dv and each buffer gradient: no NaN,
    the error-ratio rule of this module's docstring, and for the gradients the exact shape,
    dtype and strides of the eager ones. Returns ``(compiled_results, golden_results)``,
    the dicts of ``forward_backward``.
    """
    if compiled is None:
        compiled = torch.compile(flex_attention)
    if grad_out is None:
        grad_out = random_like_output(q, v)
    grad_lse = None
    if use_lse:
        gen = torch.Generator(device="cpu").manual_seed(2)
        grad_lse = torch.randn(*q.shape[:3], generator=gen).to(q.device)

    def run(fn, dtype=None):
        leaves = [_fresh_leaf(t, dtype).requires_grad_() for t in (q, k, v)]
        bufs = [_fresh_leaf(b, dtype) if isinstance(b, torch.Tensor) else b for b in buffers]
        cotangents = [None if t is None else (t.detach().to(dtype) if dtype else t)
                      for t in (grad_out, grad_lse)]
        return forward_backward(fn, *leaves, buffers=bufs, mods=mods, grad_out=cotangents[0],
                                grad_lse=cotangents[1], **kwargs)

    golden = run(flex_attention, torch.float64)
    eager = run(flex_attention)
    got = run(compiled)

    assert got.keys() == eager.keys() == golden.keys(), (list(got), list(eager))
    factor = FACTOR[q.dtype] if factor is None else factor
    for name, value in got.items():
        reference = eager[name]
        assert value.shape == reference.shape, (name, value.shape, reference.shape)
        assert value.dtype == reference.dtype, (name, value.dtype, reference.dtype)
        assert not value.isnan().any(), f"NaN in the compiled {name}"
        if name == "lse":
            err, eager_err = _finite_mean_abs(value, golden[name]), _finite_mean_abs(reference, golden[name])
            floor = _statistic_floor(golden[name])
        else:
            err, eager_err = _mean_abs(value, golden[name]), _mean_abs(reference, golden[name])
            floor = 1e-7 if name == "out" else GRAD_FLOOR * golden[name].abs().mean().item()
        if name.startswith("d"):
            assert value.stride() == reference.stride(), (name, value.stride(), reference.stride())
            assert torch.isfinite(value).all(), f"non-finite compiled {name}"
        allowed = (factor * _few_samples_allowance(int(golden[name].count_nonzero()))
                   if name.startswith("d_buffer") else factor)
        assert err <= allowed * eager_err + floor, (
            f"{name} error {err:.3g} vs eager {eager_err:.3g} (allowed {allowed:.3g} x eager + {floor:.2g})")
    return got, golden


def _few_samples_allowance(numel: int) -> float:
    """How much a mean-abs error over ``numel`` values may exceed another of the same law
    by chance. A buffer gradient with few elements (a per-head scale: 4 values) sums a
    whole head's rounding noise into each value, so both errors are a handful of random
    draws: the relative spread of a mean of n half-normal errors is sqrt(pi/2 - 1)/sqrt(n)
    ~ 0.76/sqrt(n), about 1.07/sqrt(n) for the ratio of two, and this allows two of those
    spreads. It is ~1 for the large tensors (a [B, H, S, S] bias: 1.004); out, lse, dq, dk
    and dv keep the plain factor. ``numel`` counts the values that receive contributions
    (non-zero in the golden): under a causal mask half of a relative-position table gets
    none, is exactly 0 in every run and adds nothing to either error, so the ratio is a
    ratio of means over the other half. (Seen on the H100: a [4] scale measured 0.80x the eager
    error with one seed, 1.83x with another.)"""
    return 1.0 + 2.2 / math.sqrt(max(1, numel))


# ---------------------------------------------------------------------------------------
# Paged KV caches (inductor_flex/paged_attention.py)
# ---------------------------------------------------------------------------------------

# PyTorch allows float32 paged runs 20x the eager error (their sums run over a longer,
# differently ordered cache); half precision keeps the plain rule.
PAGED_FACTOR = {**FACTOR, torch.float32: 20.0}


def _load_paged_helpers():
    """benchmarks/_paged.py, the one builder of paged copies (shared with bench_decode)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "_paged.py"
    spec = importlib.util.spec_from_file_location("inductor_flex_bench_paged", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


paged_helpers = _load_paged_helpers()


def paged_suite_score_mods(num_heads):
    """The score_mods PyTorch's paged runs cover, by name (None: identity)."""
    def times_two(score, b, h, q_idx, kv_idx):
        return score * 2

    def causal(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, float("-inf"))

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) * 0.05

    def alibi(score, b, h, q_idx, kv_idx):
        # As PyTorch's tests write it (masks.generate_alibi_bias casts the sum to the
        # score's dtype, which compiled half-precision traces take literally).
        return score + (kv_idx - q_idx) * torch.exp2(-(h + 1) * 8.0 / num_heads)

    return {"identity": None, "times_two": times_two, "causal": causal,
            "relative_bias": relative_bias, "alibi": alibi}


def causal_at_end(q_len, kv_len):
    """mask_mod: causal for q_len queries placed at the end of kv_len keys (a decoding step)."""
    def causal_end(b, h, q_idx, kv_idx):
        return q_idx + (kv_len - q_len) >= kv_idx

    return causal_end


def paged_flex(run=flex_attention, page_size=128, shuffle=True, spare_pages=3, seed=0):
    """A drop-in for ``run(q, k, v, score_mod=..., block_mask=..., **kwargs)`` that attends
    over a paged copy of k / v (scattered pages, garbage in unowned rows) through the
    converted block mask and score_mod: what ``check_against_golden`` calls in place of the
    compiled function to hold a paged run to the contiguous golden."""
    def call(q, k, v, score_mod=None, block_mask=None, **kwargs):
        from inductor_flex import create_block_mask, noop_mask

        if block_mask is None:
            block_mask = create_block_mask(noop_mask, q.shape[0], 1, q.shape[2], k.shape[2],
                                           device=q.device, BLOCK_SIZE=(128, page_size))
        paged = paged_helpers.paged_inputs(k, v, page_size, shuffle, block_mask=block_mask,
                                           score_mod=score_mod, spare_pages=spare_pages, seed=seed)
        return run(q, paged.k_cache, paged.v_cache, score_mod=paged.score_mod,
                   block_mask=paged.block_mask, **kwargs)

    return call


# ---- mods for short-query (decode) cases: the query tokens stand at the end of the cache ----

def causal_at(offset):
    """Causal for query tokens standing at positions offset, offset + 1, ..."""
    def mask(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx
    return mask


def sliding_window_at(offset, window):
    def mask(b, h, q_idx, kv_idx):
        return (q_idx + offset >= kv_idx) & (q_idx + offset - kv_idx <= window)
    return mask


def alibi(slopes):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return score_mod


SOFTCAP = 2.0
# tanh.approx.f32 (half dtypes) is within 2^-10.9 relative of tanh: lse may move by that.
APPROX_TANH_ALLOWANCE = SOFTCAP * 2.0 ** -10.9


def softcap(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)
