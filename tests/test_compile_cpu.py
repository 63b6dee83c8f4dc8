"""torch.compile on CPU: the Inductor extern fallback (lowering/extern.py) and aot_eager.

Forward and backward numerics of compiled flex_attention against a float64 reference,
with the error-ratio rule (compiled error at most 1.1x the eager same-dtype error for
bf16/fp16, 10x for fp32); gradients of a captured bias table; rows that see nothing;
dynamic shapes; and peak memory of a compiled call against the eager one.
"""
import ctypes
import math
import warnings

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch._inductor.utils import run_and_get_code

import inductor_flex
from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex.ops import dense

from test_dynamo import _Doubled
from test_ops import causal, naive_attention

inductor_flex.lowering.register()  # idempotent; the package import may already do it


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def make_inputs(dtype, batch=2, q_heads=4, kv_heads=2, q_len=48, kv_len=40, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, q_heads, q_len, head_dim), (batch, kv_heads, kv_len, head_dim),
              (batch, kv_heads, kv_len, head_dim), (q_heads, q_len, kv_len)]
    return [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]


def attention_with_bias(query, key, value, bias, block_mask):
    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    return flex_attention(query, key, value, score_mod=biased, block_mask=block_mask, enable_gqa=True)


def forward_backward(fn, tensors, block_mask, grad_out):
    for t in tensors:
        t.grad = None
    out = fn(*tensors, block_mask)
    out.backward(grad_out)
    return [out.detach()] + [t.grad.detach() for t in tensors]


def reference_results(tensors, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    query, key, value, bias = leaves
    scale = 1.0 / math.sqrt(query.shape[-1])
    out, _ = naive_attention(query, key, value,
                             lambda s, b, h, q, kv: s + bias[h, q, kv], causal, scale)
    out.backward(grad_out.double())
    return [out.detach()] + [t.grad for t in leaves]


def max_error(results, reference):
    return [(r.double() - ref).abs().max().item() for r, ref in zip(results, reference)]


@pytest.mark.parametrize("dtype, allowed_ratio", [(torch.float32, 10.0), (torch.bfloat16, 1.1),
                                                  (torch.float16, 1.1)])
def test_inductor_forward_backward_error_ratio(dtype, allowed_ratio):
    tensors = make_inputs(dtype)
    block_mask = create_block_mask(causal, None, None, 48, 40, device="cpu", BLOCK_SIZE=16)
    grad_out = torch.randn(2, 4, 48, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    reference = reference_results(tensors, grad_out)
    eager = forward_backward(attention_with_bias, tensors, block_mask, grad_out)
    compiled_fn = torch.compile(attention_with_bias, backend="inductor", fullgraph=True)
    compiled, codes = run_and_get_code(forward_backward, compiled_fn, tensors, block_mask, grad_out)

    code = "\n".join(codes)
    assert "torch.ops.inductor_flex.dense_forward.default(" in code
    assert "torch.ops.inductor_flex.dense_backward.default(" in code
    names = ["out", "grad_query", "grad_key", "grad_value", "grad_bias"]
    for name, got, want in zip(names, compiled, eager):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), name
    floor = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}[dtype]
    for name, compiled_error, eager_error in zip(names, max_error(compiled, reference),
                                                max_error(eager, reference)):
        assert compiled_error <= allowed_ratio * eager_error + floor, (name, compiled_error, eager_error)


def test_fully_masked_rows_compiled():
    query, key, value, _ = make_inputs(torch.float32, q_heads=2, kv_heads=2, q_len=32, kv_len=32)

    def late_causal(b, h, q_idx, kv_idx):
        return (q_idx >= 8) & (kv_idx <= q_idx)  # rows 0..7 see nothing

    block_mask = create_block_mask(late_causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=8)

    def attend(query, key, value, block_mask):
        out, aux = flex_attention(query, key, value, block_mask=block_mask,
                                  return_aux=AuxRequest(lse=True))
        return out, aux.lse

    compiled = torch.compile(attend, backend="inductor", fullgraph=True)
    out, lse = compiled(query, key, value, block_mask)
    assert torch.all(out[:, :, :8] == 0) and torch.all(lse[:, :, :8] == -math.inf)
    (out.sum() + lse[:, :, 8:].sum()).backward()
    for t in (query, key, value):
        assert torch.isfinite(t.grad).all()
    assert torch.all(query.grad[:, :, :8] == 0)
    expected, expected_lse = naive_attention(query, key, value, lambda s, *_: s, late_causal,
                                             1.0 / math.sqrt(16))
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, :, 8:], expected_lse[:, :, 8:].float(), atol=1e-5, rtol=1e-5)


def test_aot_eager_backend_matches_reference():
    tensors = make_inputs(torch.float64)
    block_mask = create_block_mask(causal, None, None, 48, 40, device="cpu", BLOCK_SIZE=16)
    grad_out = torch.randn(2, 4, 48, 16, dtype=torch.float64)
    compiled_fn = torch.compile(attention_with_bias, backend="aot_eager", fullgraph=True)
    results = forward_backward(compiled_fn, tensors, block_mask, grad_out)
    for got, want in zip(results, reference_results(tensors, grad_out)):
        torch.testing.assert_close(got, want)


def test_dynamic_shapes_compile_once():
    """Sequence length and head dim change; the default scale 1/sqrt(E) is symbolic."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * 0.5 + (q_idx - kv_idx) * 0.01

    def attend(query, key, value, block_mask):
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask)

    compiled = torch.compile(attend, backend=counter, dynamic=True, fullgraph=True)
    for length, head_dim in ((24, 16), (40, 8)):
        query, key, value, _ = make_inputs(torch.float32, q_heads=2, kv_heads=2, q_len=length,
                                           kv_len=length, head_dim=head_dim)
        block_mask = create_block_mask(causal, None, None, length, length, device="cpu", BLOCK_SIZE=8)
        out = compiled(query, key, value, block_mask)
        out.sum().backward()
        leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
        expected, _ = naive_attention(*leaves, score_mod, causal, 1.0 / math.sqrt(head_dim))
        expected.sum().backward()
        torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)
        for t, leaf in zip((query, key, value), leaves):
            torch.testing.assert_close(t.grad, leaf.grad.float(), atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 1


def test_dynamic_shapes_default_mask_compiles_once_across_block_boundaries():
    """Without a block mask the default full mask has one row per 128-query block; that
    row count must not pin the length, so one frame serves lengths on both sides of 128."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(flex_attention, backend=counter, dynamic=True)
    for length in (64, 128, 256, 1000):
        query, key, value = (torch.randn(1, 2, length, 8, requires_grad=True) for _ in range(3))
        out = compiled(query, key, value)
        out.sum().backward()
        leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
        expected = torch.nn.functional.scaled_dot_product_attention(*leaves)
        expected.sum().backward()
        torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)
        for t, leaf in zip((query, key, value), leaves):
            torch.testing.assert_close(t.grad, leaf.grad.float(), atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 1


_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc)


@pytest.fixture
def exact_resident_memory():
    """Make resident memory follow live allocations, and return a peak-measuring function.

    glibc serves large blocks with mmap and unmaps them on free only above a threshold it
    raises dynamically; pinning the threshold low (which also stops the raising) makes the
    process's peak resident size (VmHWM, resettable through /proc/self/clear_refs) track
    the peak of live tensor memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        open("/proc/self/clear_refs", "w").close()
    except OSError as error:
        pytest.skip(f"needs glibc and /proc (Linux): {error}")
    assert libc.mallopt(_M_MMAP_THRESHOLD, 16 * 1024) == 1

    def status_kib(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def peak_extra_bytes(fn):
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the peak restarts from the current resident size
        start = status_kib("VmRSS")
        fn()
        return (status_kib("VmHWM") - start) * 1024

    yield peak_extra_bytes
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # glibc's default threshold


def test_compiled_peak_memory_no_worse_than_eager(exact_resident_memory, monkeypatch):
    # Small chunks, so the chunking shows at a size the test can afford.
    monkeypatch.setattr(dense, "DEFAULT_SCORE_ELEMENTS_PER_CHUNK", 1 << 14)
    batch, heads, length, head_dim = 1, 1, 512, 16
    score_matrix_bytes = batch * heads * length * length * 4
    query, key, value, _ = make_inputs(torch.float32, batch=batch, q_heads=heads, kv_heads=heads,
                                       q_len=length, kv_len=length, head_dim=head_dim)
    block_mask = create_block_mask(causal, None, None, length, length, device="cpu")

    def attend(query, key, value, block_mask):
        return flex_attention(query, key, value, score_mod=lambda s, b, h, q, kv: 20 * torch.tanh(s / 20),
                              block_mask=block_mask)

    compiled = torch.compile(attend, backend="inductor", fullgraph=True)

    def step(fn):
        def run():
            out = fn(query, key, value, block_mask)
            out.sum().backward()
        return run

    step(compiled)()  # compile (and warm up) outside the measurement
    step(attend)()
    eager_peak = exact_resident_memory(step(attend))
    compiled_peak = exact_resident_memory(step(compiled))
    assert compiled_peak <= 1.25 * eager_peak + (256 << 10), (compiled_peak, eager_peak)
    # The measurement sees chunk-sized work, far below one whole score matrix.
    assert compiled_peak < score_matrix_bytes / 2, (compiled_peak, score_matrix_bytes)


def test_inductor_backward_uses_score_mod_custom_gradient():
    query, key, value, bias = make_inputs(torch.float32, q_heads=2, kv_heads=2, q_len=16, kv_len=16)
    bias = bias.detach()  # captured, no grad: eager keeps the user's mod as written
    block_mask = create_block_mask(causal, None, None, 16, 16, device="cpu", BLOCK_SIZE=8)

    def attend(query, key, value, block_mask, doubled=_Doubled.apply):
        def score_mod(score, b, h, q_idx, kv_idx):
            return doubled(score) + bias[h, q_idx, kv_idx]

        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask)

    tensors = (query, key, value)
    expected = attend(*tensors, block_mask)
    expected_grads = torch.autograd.grad(expected.square().sum(), tensors)
    compiled = torch.compile(attend, backend="inductor", fullgraph=True)(*tensors, block_mask)
    grads = torch.autograd.grad(compiled.square().sum(), tensors)
    torch.testing.assert_close(compiled, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The custom rule matters: the true derivative of 2 * score gives other gradients.
    plain = attend(*tensors, block_mask, doubled=lambda score: 2 * score)
    plain_grad_query, = torch.autograd.grad(plain.square().sum(), (query,))
    assert not torch.allclose(plain_grad_query, grads[0], atol=1e-3)


def test_inductor_mod_reading_a_symbolic_size():
    """Under dynamic shapes a size the score_mod reads is a SymInt buffer of the operator;
    the extern call takes it as an int, one compiled frame serves every length."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def attend(query, key, value):
        window = query.shape[2] // 4

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where((q_idx - kv_idx).abs() <= window, score, score - 5.0)

        return flex_attention(query, key, value, score_mod=score_mod)

    compiled = torch.compile(attend, backend=counter, dynamic=True, fullgraph=True)
    for length in (24, 40):
        query, key, value, _ = make_inputs(torch.float64, q_heads=2, kv_heads=2, q_len=length,
                                           kv_len=length)
        out = compiled(query, key, value)
        out.sum().backward()
        window = length // 4
        leaves = [t.detach().requires_grad_() for t in (query, key, value)]
        expected, _ = naive_attention(
            *leaves, lambda s, b, h, q, kv: torch.where((q - kv).abs() <= window, s, s - 5.0),
            lambda b, h, q, kv: q >= 0, 1.0 / math.sqrt(16))
        expected.sum().backward()
        torch.testing.assert_close(out, expected)
        for t, leaf in zip((query, key, value), leaves):
            torch.testing.assert_close(t.grad, leaf.grad)
    assert counter.frame_count == 1


def _softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)  # tanh's backward decomposes with dtype casts


def _distance_decay(score, b, h, q_idx, kv_idx):
    return score * torch.cos((q_idx - kv_idx).float() / 8.0)  # .float() traces as a cast


def _run_watching_batching(attend, compile_kwargs, length):
    """(compiled, eager, float64 reference) outputs and gradients of ``attend`` in bf16, and
    the warnings the compiled run raised about ops vmap could not batch."""
    def output_and_grads(fn, dtype):
        tensors = [t.detach().to(dtype).requires_grad_()
                   for t in make_inputs(torch.float64, q_heads=2, kv_heads=2, q_len=length,
                                        kv_len=length)[:3]]
        out = fn(*tensors)
        return [out.detach()] + list(torch.autograd.grad(out.sum(), tensors))

    reference = output_and_grads(attend, torch.float64)
    eager = output_and_grads(attend, torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = output_and_grads(torch.compile(attend, fullgraph=True, **compile_kwargs),
                                    torch.bfloat16)
    unbatched = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    return compiled, eager, reference, unbatched


@pytest.mark.parametrize("score_mod", [_softcap, _distance_decay])
def test_extern_mods_avoid_ops_vmap_cannot_batch(score_mod, monkeypatch):
    """AOT tracing turns dtype casts into prims.convert_element_type, which vmap has no
    batching rule for: the dense kernel would evaluate such a mod one score at a time
    (seconds instead of milliseconds). The mods sent to the extern ops must not use it."""
    from inductor_flex.lowering import extern

    sources = []

    def recording_mod_to_source(graph_module):
        source, constants = original_mod_to_source(graph_module)
        sources.append(source)
        return source, constants

    original_mod_to_source = extern.mod_to_source
    monkeypatch.setattr(extern, "mod_to_source", recording_mod_to_source)
    block_mask = create_block_mask(causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)

    def attend(query, key, value):
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask)

    compiled, eager, reference, unbatched = _run_watching_batching(
        attend, dict(backend="inductor"), 32)
    # Forward score_mod and mask_mod, backward score_mod, score gradient and mask_mod.
    assert len(sources) == 5, sources
    assert not [s for s in sources if "prims." in s], sources
    assert any("aten._to_copy" in s for s in sources), "the casts should have been rewritten"
    assert not unbatched, unbatched[:1]
    # The score gradient comes from the joint graph, traced in bf16, so it is rounded where
    # eager's is not: compare errors against float64, as the error-ratio test does.
    for compiled_error, eager_error in zip(max_error(compiled, reference),
                                           max_error(eager, reference)):
        assert compiled_error <= 1.1 * eager_error, (compiled_error, eager_error)


@pytest.mark.parametrize("score_mod", [_softcap, _distance_decay])
def test_decomposed_mods_run_batched_in_dense_kernel(score_mod):
    """Under aot_eager_decomp_partition the operators' dense kernels run the traced mods
    themselves (forward graph, and the joint graph's score gradient in the backward); the
    casts the decompositions introduce must not push vmap onto its per-element fallback.
    bfloat16, because tanh_backward's decomposition casts only for low-precision inputs."""
    def attend(query, key, value):
        return flex_attention(query, key, value, score_mod=score_mod)

    compiled, eager, reference, unbatched = _run_watching_batching(
        attend, dict(backend="aot_eager_decomp_partition"), 16)
    assert not unbatched, unbatched[:1]
    # The decomposed score gradient is computed in bf16 where eager's autograd is not:
    # compare errors against float64, as the error-ratio test does.
    for compiled_error, eager_error in zip(max_error(compiled, reference),
                                           max_error(eager, reference)):
        assert compiled_error <= 1.1 * eager_error, (compiled_error, eager_error)


def test_batchable_rewrites_a_copy_once():
    from inductor_flex._mods import batchable

    def cast_then_scale(score):
        return torch.ops.prims.convert_element_type.default(score, torch.float64) * 2.0

    with_cast = torch.fx.symbolic_trace(cast_then_scale)
    without_cast = torch.fx.symbolic_trace(lambda score: score * 2.0)
    rewritten = batchable(with_cast)
    assert rewritten is not with_cast and batchable(with_cast) is rewritten
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten._to_copy.default in targets
    assert torch.ops.prims.convert_element_type.default not in targets
    assert torch.ops.prims.convert_element_type.default in [n.target for n in with_cast.graph.nodes]
    score = torch.randn(3, dtype=torch.float32)
    out = rewritten(score)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, with_cast(score))
    assert batchable(without_cast) is without_cast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tiles_take_the_fused_score_mod(dtype):
    """Calls of at least FUSED_TILES_MIN_SCORES scores run each tile's score_mod, mask and
    softmax as one Inductor-compiled kernel (ops/fused_tiles.py): a learned ALiBi-style
    bias (a captured buffer) and a tanh soft-cap; numerics within the error-ratio rule of
    eager."""
    from inductor_flex.lowering import extern

    heads, seq, dim = 8, 1024, 16  # 2**23 scores
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, heads, seq, dim, generator=generator).to(dtype)
                         for _ in range(3))
    slopes = torch.rand(heads, generator=generator)

    def alibi_softcap(score, b, h, q_idx, kv_idx):
        return 20.0 * torch.tanh((score + slopes[h] * (kv_idx - q_idx) / 64.0) / 20.0)

    extern._tile_kernels.clear()
    compiled = torch.compile(flex_attention)(query, key, value, score_mod=alibi_softcap)
    kernels = list(extern._tile_kernels.values())
    assert len(kernels) == 1 and not kernels[0]._forward.failed
    eager = flex_attention(query, key, value, score_mod=alibi_softcap)
    exact, _ = naive_attention(query, key, value, alibi_softcap, lambda b, h, q, kv: q >= 0,
                               1.0 / math.sqrt(dim))
    compiled_error = (compiled.double() - exact).abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    ratio = 10.0 if dtype == torch.float32 else 1.1
    assert compiled.dtype == dtype and compiled_error <= ratio * eager_error + 1e-6
