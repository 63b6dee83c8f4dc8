"""varlen_attn on CUDA, compiled: the custom ops decompose into our flex operators and
lower to the fused Triton templates (no extern call); numerics against the float64
per-sequence reference under the error-ratio rule (yardstick: our eager path in the same
dtype); GQA, sliding window, lse, and torch's own varlen_attn as a second opinion."""
import pathlib
import sys

import pytest
import torch
from torch.testing import FileCheck

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/, the reference

from flex_check import compiled_code, generated_code, kernel_sources  # noqa: E402
from inductor_flex.varlen import AuxRequest, varlen_attn  # noqa: E402
from varlen_reference import (assert_error_ratio, cu_seq, mean_abs, packed, paged_cache,  # noqa: E402
                              reference, run_with_grads)

LENGTHS = [512, 77, 1000, 1, 300, 128]
HEADS, DIM = 8, 64


def make(device, dtype, heads=HEADS, kv_heads=None, lengths=LENGTHS):
    q = packed(sum(lengths), heads, DIM, dtype, device, seed=0)
    k = packed(sum(lengths), kv_heads or heads, DIM, dtype, device, seed=1)
    v = packed(sum(lengths), kv_heads or heads, DIM, dtype, device, seed=2)
    grad_out = packed(sum(lengths), heads, DIM, dtype, device, seed=3)
    return q, k, v, cu_seq(lengths, device), cu_seq(lengths, device), grad_out


def check(device, dtype, window, enable_gqa=False, kv_heads=None, with_lse=False):
    q, k, v, cu_q, cu_k, grad_out = make(device, dtype, kv_heads=kv_heads)
    longest = max(LENGTHS)
    aux = AuxRequest(lse=True) if with_lse else None

    def attend(q, k, v, cu_q, cu_k):
        return varlen_attn(q, k, v, cu_q, cu_k, longest, longest, window_size=window,
                           enable_gqa=enable_gqa, return_aux=aux)

    compiled = torch.compile(attend, fullgraph=True)
    grad_lse = (torch.randn(HEADS, q.shape[0], generator=torch.Generator().manual_seed(4))
                .to(device) if with_lse else None)
    got, codes = compiled_code(run_with_grads, lambda *t: compiled(*t, cu_q, cu_k), q, k, v,
                               grad_out, grad_lse=grad_lse)
    eager = run_with_grads(lambda *t: attend(*t, cu_q, cu_k), q, k, v, grad_out,
                           grad_lse=grad_lse)
    golden = run_with_grads(lambda *t: reference(*t, cu_q, cu_k, window=window), q, k, v,
                            grad_out, torch.float64, grad_lse=grad_lse)
    if not with_lse:
        golden.pop("lse")
    assert_error_ratio(got, eager, golden, dtype)
    return codes


def assert_fused_templates(codes, passes=2):
    """Our fused templates serve every pass (``passes``: 2, forward and backward; 1, the
    forward alone), no extern call."""
    code = "\n".join(codes)
    assert "inductor_flex.dense" not in code, "an extern dense call served varlen_attn"
    assert "torch.ops.inductor_flex.varlen_attn" not in code
    templates = [name for source in codes for name in kernel_sources(source)
                 if name.startswith("triton_tem")]
    assert len(templates) >= passes, templates
    FileCheck().check("triton_tem").check("@triton.jit").run(code)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)], ids=["full", "causal"])
def test_compiled_forward_and_grads(device, dtype, window):
    assert_fused_templates(check(device, dtype, window))


def test_gqa(device):
    assert_fused_templates(check(device, torch.bfloat16, (-1, 0), enable_gqa=True, kv_heads=2))


@pytest.mark.parametrize("window", [(128, 0), (64, 32)])
def test_sliding_window(device, window):
    assert_fused_templates(check(device, torch.bfloat16, window))


def test_lse_and_its_gradient(device):
    assert_fused_templates(check(device, torch.float16, (-1, 0), with_lse=True))


def test_float32(device):
    check(device, torch.float32, (-1, 0))


def test_agrees_with_torch_varlen_attn(device):
    """PyTorch's own varlen_attn (FlashAttention) as a second opinion, same dtype."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    q, k, v, cu_q, cu_k, _ = make(device, torch.bfloat16)
    longest = max(LENGTHS)
    ours = torch.compile(varlen_attn, fullgraph=True)(q, k, v, cu_q, cu_k, longest, longest,
                                                      window_size=(-1, 0))
    try:
        theirs = varlen.varlen_attn(q, k, v, cu_q, cu_k, longest, longest, window_size=(-1, 0))
    except TypeError:  # torch without window_size (2.11)
        theirs = varlen.varlen_attn(q, k, v, cu_q, cu_k, longest, longest, is_causal=True)
    golden = reference(q.double(), k.double(), v.double(), cu_q, cu_k, window=(-1, 0))[0]
    assert mean_abs(ours, golden) <= 1.1 * mean_abs(theirs, golden) + 1e-7


# Batches of a loop: new offsets, token count, document count and longest document each
# (>= 2 documents and > 128 tokens: a size-1 dimension is specialised, one graph more).
LOOP_BATCHES = [[512, 77, 1000, 1, 300, 128], [700, 300, 64, 1200], [2048, 5, 900],
                [128, 128, 128, 128, 333], [1500, 40]]


@pytest.mark.parametrize("passes", ["forward", "forward_backward"])
def test_loop_over_new_batches_stops_compiling_after_the_second(device, passes):
    """A loop over packed batches compiles twice (the first call's sizes, then a dynamic
    graph) and never again; both graphs run our fused templates, forward only
    (torch.no_grad(): an inference graph) and forward + backward; every batch matches the
    float64 reference under the error-ratio rule."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dtype, window = torch.bfloat16, (-1, 0)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(varlen_attn, backend=counter, fullgraph=True)
    for number, lengths in enumerate(LOOP_BATCHES):
        q, k, v, cu_q, cu_k, grad_out = make(device, dtype, lengths=lengths)
        longest = max(lengths)

        def attend(fn):
            return lambda q, k, v: fn(q, k, v, cu_q, cu_k, longest, longest, window_size=window)

        def golden_fn(q, k, v):
            return reference(q, k, v, cu_q, cu_k, window=window)[0]

        with generated_code() as codes:  # compiled_code would reset Dynamo: a compile a call
            if passes == "forward":
                with torch.no_grad():
                    got = {"out": attend(compiled)(q, k, v)}
            else:
                got = run_with_grads(attend(compiled), q, k, v, grad_out)
        if passes == "forward":
            with torch.no_grad():
                eager = {"out": attend(varlen_attn)(q, k, v)}
                golden = {"out": golden_fn(q.double(), k.double(), v.double())}
        else:
            eager = run_with_grads(attend(varlen_attn), q, k, v, grad_out)
            golden = run_with_grads(golden_fn, q, k, v, grad_out, torch.float64)
        assert counter.frame_count == min(number + 1, 2), f"batch {number}: {lengths}"
        if number < 2:  # the calls that compiled: the code of each graph
            assert_fused_templates(codes, passes=1 if passes == "forward" else 2)
        else:
            assert not codes, f"batch {number} generated code: it compiled again"
        assert_error_ratio(got, eager, golden, dtype)


# ---------------------------------------------------------------------------------------
# block_table: keys and values read from a paged cache (forward only)
# ---------------------------------------------------------------------------------------
K_LENGTHS = [700, 77, 1000, 64, 300, 129]


def paged_case(device, dtype, q_lengths, page_size, kv_heads=HEADS, share_first=False):
    q = packed(sum(q_lengths), HEADS, DIM, dtype, device, seed=0)
    k = packed(sum(K_LENGTHS), kv_heads, DIM, dtype, device, seed=1)
    v = packed(sum(K_LENGTHS), kv_heads, DIM, dtype, device, seed=2)
    cu_q, cu_k = cu_seq(q_lengths, device), cu_seq(K_LENGTHS, device)
    if share_first:
        for start in cu_k[:-1].tolist():
            k[start:start + page_size], v[start:start + page_size] = k[:page_size], v[:page_size]
    return q, k, v, cu_q, cu_k, paged_cache(k, v, cu_k, page_size, share_first=share_first)


def attend_paged(q, cu_q, pages, window, enable_gqa=False):
    key_pages, value_pages, table, used = pages
    return varlen_attn(q, key_pages, value_pages, cu_q, cu_q, 1024, max(K_LENGTHS),
                       seqused_k=used, block_table=table, window_size=window,
                       enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)], ids=["full", "causal"])
@pytest.mark.parametrize("page_size", [64, 128])
@pytest.mark.parametrize("q_lengths", [[512, 77, 1000, 1, 300, 128], [1] * 6],
                         ids=["prefill", "decode"])
def test_block_table_compiled(device, dtype, window, page_size, q_lengths):
    q, k, v, cu_q, cu_k, pages = paged_case(device, dtype, q_lengths, page_size, kv_heads=2,
                                            share_first=page_size == 64)
    compiled = torch.compile(attend_paged, fullgraph=True)
    (out, lse), codes = compiled_code(compiled, q, cu_q, pages, window, True)
    with torch.no_grad():
        eager = attend_paged(q, cu_q, pages, window, True)
    golden = reference(q.double(), k.double(), v.double(), cu_q, cu_k, window=window)
    assert_error_ratio({"out": out, "lse": lse}, {"out": eager[0], "lse": eager[1]},
                       {"out": golden[0], "lse": golden[1]}, dtype)
    code = "\n".join(codes)
    assert "inductor_flex.dense" not in code, "an extern dense call served the paged call"
    assert any(name.startswith("triton_tem") for source in codes
               for name in kernel_sources(source))


def test_block_table_placement_is_bit_identical(device):
    """The fused kernels walk each sequence's pages in logical order, wherever they lie."""
    q, k, v, cu_q, cu_k, first = paged_case(device, torch.bfloat16, [512, 77, 1000, 1, 300, 128],
                                            128)
    second = paged_cache(k, v, cu_k, 128, seed=7)  # same shapes, other placement
    assert not torch.equal(first[2], second[2])
    compiled = torch.compile(attend_paged, fullgraph=True, dynamic=False)
    for a, b in zip(compiled(q, cu_q, first, (-1, 0)), compiled(q, cu_q, second, (-1, 0))):
        assert torch.equal(a, b)
