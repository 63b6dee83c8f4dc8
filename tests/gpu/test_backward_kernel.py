"""The fused backward kernel under torch.compile: gradients of query, key, value, lse and
captured buffers against a float64 golden run (error-ratio rule of flex_check), shapes and
strides, rows that see nothing, dynamic shapes, and generated-code checks (the backward
template is used, buffer gradients accumulate atomically, kernel options reach it)."""
import re
from typing import Callable, NamedTuple

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from inductor_flex import create_block_mask, flex_attention
from flex_check import (check_grads_against_golden, forward_backward, kernel_sources, qkv,
                        random_like_output)
from test_forward_kernel import alibi, bias_table, causal

B, H, S, D = 2, 4, 256, 64
LONG = 2048
BACKWARD_MARKER = "# inductor_flex backward"


@pytest.fixture
def cuda_device(device):
    """For tests that read the generated Triton backward kernel: other devices compile the
    extern fallback, which has no such kernel."""
    if device != "cuda":
        pytest.skip("inspects the generated Triton backward kernel, which only CUDA has")
    return device


# ---------------------------------------------------------------------------------------
# Score mods and masks
# ---------------------------------------------------------------------------------------

def times_two(score, b, h, q_idx, kv_idx):
    return score * 2


def squared(score, b, h, q_idx, kv_idx):
    return score * score


def inverse_causal(b, h, q_idx, kv_idx):
    return q_idx <= kv_idx


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx)


def trig(score, b, h, q_idx, kv_idx):
    return torch.sin(score) + torch.cos(score)


def head_scale(scale):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score * scale[h]
    return score_mod


def relative_table(table, offset):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + offset]
    return score_mod


def inputs(device, dtype, M=S, **kwargs):
    """Random query, key, value at this file's default sizes (flex_check.qkv)."""
    return qkv(device, dtype, **{"B": B, "Hq": H, "M": M, "E": D, **kwargs})


class GradCase(NamedTuple):
    buffers: tuple  # tensors the mods read; golden gets float64 copies
    mods: Callable  # (*buffers) -> flex_attention keyword arguments built from them
    kwargs: dict  # keyword arguments that need no upcasting (block masks)


def _random(*shape, dtype, device, seed, requires_grad):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(requires_grad)


def grad_case(name, device, dtype, Bq=B, Hq=H, M=S, N=S):
    """The named score_mod / mask family at query length M and key length N. Learned
    buffers are float32 parameters, except the full bias, which has the inputs' dtype (an
    activation)."""
    def mask(mask_mod):
        return dict(block_mask=create_block_mask(mask_mod, None, None, M, N, device=device))

    def score_only(score_mod, **kwargs):
        return GradCase((), lambda: dict(score_mod=score_mod), kwargs)

    if name == "identity":
        return GradCase((), lambda: {}, {})
    if name == "times_two":
        return score_only(times_two)
    if name == "squared":
        return score_only(squared)
    if name == "causal":
        return GradCase((), lambda: {}, mask(causal))
    if name == "inverse_causal":
        return GradCase((), lambda: {}, mask(inverse_causal))
    if name == "relative_bias":
        return score_only(relative_bias)
    if name == "relative_causal":
        return score_only(relative_bias, **mask(causal))
    if name == "alibi":
        slopes = torch.exp2(-torch.arange(1, Hq + 1, dtype=torch.float32, device=device))
        return GradCase((slopes,), lambda slopes: dict(score_mod=alibi(slopes)), {})
    if name == "trig":
        return score_only(trig)
    if name == "head_scale":
        scale = (1 + 0.25 * _random(Hq, dtype=torch.float32, device=device, seed=5,
                                    requires_grad=False)).requires_grad_()
        return GradCase((scale,), lambda scale: dict(score_mod=head_scale(scale)), {})
    if name == "relative_table":
        table = _random(M + N, dtype=torch.float32, device=device, seed=6, requires_grad=True)
        return GradCase((table,), lambda table: dict(score_mod=relative_table(table, N)), {})
    if name == "full_bias":
        bias = _random(Bq, Hq, M, N, dtype=dtype, device=device, seed=7, requires_grad=True)
        return GradCase((bias,), lambda bias: dict(score_mod=bias_table(bias)), {})
    raise KeyError(name)


FAMILIES = ["identity", "times_two", "squared", "causal", "inverse_causal", "relative_bias",
            "relative_causal", "alibi", "trig", "head_scale", "relative_table", "full_bias"]
# float16 / float32 run a subset: plain, masked, transcendental, a buffer gradient reduced
# over all scores ([H]) and one with an entry per score ([B, H, S, S]).
FAMILY_SUBSET = ["identity", "causal", "trig", "head_scale", "full_bias"]
BUFFER_GRAD_FAMILIES = {"head_scale", "relative_table", "full_bias"}


def check_case(q, k, v, case, **extra):
    """check_grads_against_golden for a GradCase (extra: grad_out, use_lse, compiled, ...)."""
    kwargs = dict(case.kwargs)
    kwargs.update(extra)
    return check_grads_against_golden(q, k, v, buffers=case.buffers, mods=case.mods, **kwargs)


def check_family(device, dtype, name, **extra):
    q, k, v = inputs(device, dtype)
    got, golden = check_case(q, k, v, grad_case(name, device, dtype), **extra)
    # A buffer that requires grad really got one.
    assert ("d_buffer0" in got) == (name in BUFFER_GRAD_FAMILIES), list(got)
    return got, golden


# ---------------------------------------------------------------------------------------
# Score_mod and mask families, dtypes, lengths
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_families_bfloat16(device, name):
    check_family(device, torch.bfloat16, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", FAMILY_SUBSET)
def test_families_float16_float32(device, dtype, name):
    check_family(device, dtype, name)


@pytest.mark.parametrize("name", ["causal", "alibi", "relative_table"])
def test_long_sequence(device, name):
    q, k, v = inputs(device, torch.bfloat16, M=LONG)
    check_case(q, k, v, grad_case(name, device, torch.bfloat16, M=LONG, N=LONG))


@pytest.mark.parametrize("q_len,kv_len", [(255, 255), (383, 383), (255, 383)])
def test_ragged_lengths_causal(device, q_len, kv_len):
    q, k, v = inputs(device, torch.bfloat16, M=q_len, N=kv_len)
    check_case(q, k, v, grad_case("causal", device, torch.bfloat16, M=q_len, N=kv_len))


def test_several_captured_tables_at_head_dim_128(device):
    # Three float32 [B, H, S, S] tables (one learned) plus a relative table, gathered per
    # score at D=128, whose default tiles take the most shared memory: the mods' loads
    # must not push either kernel past the GPU's limit (they must compile and launch).
    tables = [_random(B, H, S, S, dtype=torch.float32, device=device, seed=10 + i,
                      requires_grad=(i == 0)) for i in range(3)]
    relative = _random(2 * S, dtype=torch.float32, device=device, seed=13, requires_grad=False)

    def mods(first, second, third, relative):
        def score_mod(score, b, h, q_idx, kv_idx):
            for table in (first, second, third):
                score = score + table[b, h, q_idx, kv_idx]
            return score + relative[q_idx - kv_idx + S]
        return dict(score_mod=score_mod)

    q, k, v = inputs(device, torch.bfloat16, E=128)
    case = GradCase(tuple(tables) + (relative,), mods,
                    grad_case("causal", device, torch.bfloat16).kwargs)
    got, _ = check_case(q, k, v, case)
    assert "d_buffer0" in got and "d_buffer1" not in got, list(got)


# ---------------------------------------------------------------------------------------
# Shapes and layouts: GQA, broadcast batch, head dims, strides
# ---------------------------------------------------------------------------------------

def test_grouped_query_attention(device):
    # dK / dV sum over the 4 query heads of each group; the scale is indexed by query head.
    q, k, v = inputs(device, torch.bfloat16, Hq=8, Hkv=2)
    case = grad_case("head_scale", device, torch.bfloat16, Hq=8)
    got, _ = check_case(q, k, v, case, enable_gqa=True, **grad_case("causal", device, torch.bfloat16).kwargs)
    assert got["dk"].shape == k.shape and got["dv"].shape == v.shape and got["d_buffer0"].shape == (8,)


@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_scale_of_zero_or_below(device, scale):
    # With no score_mod a positive scale folds into the exponent; a scale <= 0 must not
    # (masked and out-of-range scores are -inf: times a scale <= 0 they would be +inf or NaN).
    q, k, v = inputs(device, torch.bfloat16, M=255)
    case = grad_case("causal", device, torch.bfloat16, M=255, N=255)
    check_case(q, k, v, case, scale=scale)


def test_block_mask_per_head_under_gqa(device):
    # Each query head its own mask (the transposed lists are indexed by query head).
    q, k, v = inputs(device, torch.bfloat16, Hq=8, Hkv=2)

    def staggered(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 32 * (h + 1))

    block_mask = create_block_mask(staggered, None, 8, S, S, device=device)
    check_case(q, k, v, grad_case("identity", device, torch.bfloat16), block_mask=block_mask,
               enable_gqa=True)


def test_key_value_batch_broadcast(device):
    # Query batch 2 against key/value batch 1: dK / dV sum over the query batch.
    q, k, v = inputs(device, torch.bfloat16, Bkv=1)
    got, _ = check_case(q, k, v, grad_case("relative_causal", device, torch.bfloat16))
    assert got["dk"].shape[0] == 1 and got["dv"].shape[0] == 1


@pytest.mark.parametrize("E,Ev", [(64, 32), (32, 64), (17, 17), (94, 94)])
def test_head_dims(device, E, Ev):
    q, k, v = inputs(device, torch.bfloat16, E=E, Ev=Ev)
    got, _ = check_case(q, k, v, grad_case("causal", device, torch.bfloat16))
    assert got["dq"].shape[-1] == E and got["dk"].shape[-1] == E and got["dv"].shape[-1] == Ev


def test_strided_inputs_and_grad_out(device):
    gen = torch.Generator().manual_seed(3)
    # [B, S, H, D] storage viewed as [B, H, S, D] (the layout projections produce); the
    # gradients must come back in the same layout (check_grads compares strides with eager).
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(device, torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    # A cotangent that is neither contiguous nor dense: every other column of a wider tensor.
    grad_out = torch.randn(B, S, H, 2 * D, generator=gen).to(device, torch.bfloat16)
    grad_out = grad_out.transpose(1, 2)[..., ::2]
    assert not grad_out.is_contiguous()
    got, _ = check_case(q, k, v, grad_case("alibi", device, torch.bfloat16), grad_out=grad_out)
    assert got["dq"].stride() == q.stride()
    # Slices of a larger buffer: a storage offset and a padded row stride.
    big = torch.randn(3, B, H, S + 8, D + 16, generator=gen).to(device, torch.bfloat16)
    q, k, v = (big[i, :, :, 5:5 + S, 3:3 + D] for i in range(3))
    assert q.storage_offset() != 0
    check_case(q, k, v, grad_case("relative_table", device, torch.bfloat16))


# ---------------------------------------------------------------------------------------
# Rows that see nothing, and the lse gradient
# ---------------------------------------------------------------------------------------

def late_start(b, h, q_idx, kv_idx):
    return (q_idx >= S // 4) & (kv_idx <= q_idx)  # the first quarter of the rows see nothing


def every_fourth_row_blind(b, h, q_idx, kv_idx):
    return (q_idx % 4 != 0) & (kv_idx <= q_idx)


def keeps_nothing(b, h, q_idx, kv_idx):
    return q_idx < 0


@pytest.mark.parametrize("mask_mod,blind", [
    (late_start, lambda rows: rows < S // 4),
    (every_fourth_row_blind, lambda rows: rows % 4 == 0),
    (keeps_nothing, lambda rows: rows >= 0),
], ids=["late_start", "every_fourth_row", "keeps_nothing"])
def test_rows_that_see_nothing(device, mask_mod, blind):
    q, k, v = inputs(device, torch.bfloat16)
    block_mask = create_block_mask(mask_mod, None, None, S, S, device=device)
    case = grad_case("head_scale", device, torch.bfloat16)
    # The lse of a blind row is -inf; its cotangent must still produce zeros, not NaN.
    got, golden = check_case(q, k, v, case, block_mask=block_mask, use_lse=True)
    rows = blind(torch.arange(S, device=device))
    for name, value in got.items():
        if name != "lse":
            assert torch.isfinite(value).all(), name
    assert torch.all(got["out"][:, :, rows] == 0)
    assert torch.all(torch.isneginf(got["lse"][:, :, rows]))
    assert torch.all(got["dq"][:, :, rows] == 0)
    if bool(rows.all()):
        for name in ("dq", "dk", "dv", "d_buffer0"):
            assert torch.all(got[name] == 0), name
    else:
        assert got["dk"].abs().sum() > 0 and golden["d_buffer0"].abs().sum() > 0


def test_max_autotune(device):
    # Several backward choices are timed on made-up inputs: valid block lists, captured
    # buffers and gradient buffers in the kernel's argument order.
    q, k, v = inputs(device, torch.bfloat16)
    case = grad_case("relative_table", device, torch.bfloat16)
    compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
    check_case(q, k, v, case, compiled=compiled, **grad_case("causal", device, torch.bfloat16).kwargs)


@pytest.mark.parametrize("name", ["alibi", "relative_table"])
def test_lse_gradient(device, name):
    _, golden = check_family(device, torch.bfloat16, name, use_lse=True)
    # The lse term really changed the gradients that were just compared.
    q, k, v = (t.double().requires_grad_() for t in inputs(device, torch.bfloat16))
    case = grad_case(name, device, torch.bfloat16)
    buffers = [b.detach().double().requires_grad_(b.requires_grad) for b in case.buffers]
    without_lse = forward_backward(flex_attention, q, k, v, buffers, case.mods,
                                   grad_out=random_like_output(q, v), **case.kwargs)
    assert (golden["dq"] - without_lse["dq"]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# Dynamic shapes
# ---------------------------------------------------------------------------------------

def test_dynamic_shapes_do_not_recompile(device):
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(flex_attention, backend=counter, dynamic=True)

    # One table serves every length (a length-dependent offset would be a new constant).
    # (No length equals another size of the call, which duck sizing would tie to it.)
    lengths, batches = (S + S // 4, S + S // 2), (2, 3)
    longest = max(lengths)
    table = torch.randn(2 * longest, generator=torch.Generator().manual_seed(8)).to(device)
    case = GradCase((table.requires_grad_(),),
                    lambda table: dict(score_mod=relative_table(table, longest)), {})

    def run(batch, length):
        q, k, v = inputs(device, torch.bfloat16, B=batch, M=length, seed=batch * 1000 + length)
        block_mask = create_block_mask(causal, None, None, length, length, device=device)
        check_case(q, k, v, case, compiled=compiled, block_mask=block_mask)

    run(batches[0], lengths[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(batches[0], lengths[1])
        run(batches[1], lengths[0])
        run(batches[1], lengths[1])
    assert counter.frame_count == 1, counter.frame_count


# ---------------------------------------------------------------------------------------
# Generated code: the backward template is used, and kernel options reach it
# ---------------------------------------------------------------------------------------

def backward_code(q, k, v, case, **kwargs):
    """The generated source of the backward graph of a compiled forward+backward call."""
    compiled = torch.compile(flex_attention)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    buffers = [b.detach().requires_grad_(b.requires_grad) for b in case.buffers]
    grad_out = torch.randn(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
    _, codes = run_and_get_code(forward_backward, compiled, *leaves, buffers=buffers,
                                mods=case.mods, grad_out=grad_out, **case.kwargs, **kwargs)
    backward = [code for code in codes if re.search(r"AOT ID: \['\d+_backward'\]", code)]
    assert len(backward) == 1, [code.splitlines()[0] for code in codes]
    return backward[0]


def backward_kernel(code):
    """The source of the Triton kernel(s) carrying the backward template's marker (one
    kernel, or the dQ and dK/dV kernels if the template is split), joined."""
    marked = [src for src in kernel_sources(code).values() if BACKWARD_MARKER in src]
    assert marked, f"no Triton kernel in the backward carries {BACKWARD_MARKER!r}"
    return "\n".join(marked)


@pytest.mark.parametrize("name", ["identity", "causal", "alibi", "relative_table"])
def test_backward_template_is_used(cuda_device, name):
    q, k, v = inputs(cuda_device, torch.bfloat16)
    code = backward_code(q, k, v, grad_case(name, cuda_device, torch.bfloat16))
    assert "inductor_flex.dense_backward" not in code
    kernel = backward_kernel(code)
    assert "@triton.jit" in kernel
    if name in BUFFER_GRAD_FAMILIES:
        # Many (query, key) pairs share a table entry: their gradients add up atomically.
        assert "tl.atomic_add" in kernel


@pytest.mark.parametrize("length", [255, 256])
def test_backward_is_divisible(cuda_device, length):
    # A ragged length must turn on the backward's bounds checks (the numerics of ragged
    # lengths are checked by test_ragged_lengths_causal).
    q, k, v = inputs(cuda_device, torch.bfloat16, M=length)
    case = grad_case("causal", cuda_device, torch.bfloat16, M=length, N=length)
    kernel = backward_kernel(backward_code(q, k, v, case))
    expected = "True" if length % 128 == 0 else "False"
    assert f"IS_DIVISIBLE : tl.constexpr = {expected}" in kernel


BACKWARD_OPTIONS = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                    "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 1}


def test_backward_kernel_options(cuda_device):
    from torch.testing import FileCheck

    q, k, v = inputs(cuda_device, torch.bfloat16)
    case = grad_case("alibi", cuda_device, torch.bfloat16)
    causal_mask = grad_case("causal", cuda_device, torch.bfloat16).kwargs
    check_case(q, k, v, case, kernel_options=BACKWARD_OPTIONS, **causal_mask)
    torch._dynamo.reset()
    kernel = backward_kernel(backward_code(q, k, v, case, kernel_options=BACKWARD_OPTIONS,
                                           **causal_mask))
    for name in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        FileCheck().check(f"{name} : tl.constexpr = {BACKWARD_OPTIONS['bwd_' + name]}").run(kernel)
    assert re.search(r"num_warps=4\b", kernel) and re.search(r"num_stages=1\b", kernel)


@pytest.mark.parametrize("early_dp", [False, True])
@pytest.mark.parametrize("length", [255, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("score_mod", ["alibi", None])
def test_backward_early_dp_either_way(cuda_device, early_dp, length, head_dim, score_mod):
    # Both orders of the full-block loops (dO v^T before or after the exponentials), at the
    # head dims whose defaults differ, a ragged and a divisible length, with a score_mod
    # (ALiBi) and without one (the scale folded into the exponent); causal has partial and
    # full blocks.
    q, k, v = inputs(cuda_device, torch.bfloat16, M=length, E=head_dim)
    causal_case = grad_case("causal", cuda_device, torch.bfloat16, M=length, N=length)
    case = causal_case if score_mod is None else grad_case(
        score_mod, cuda_device, torch.bfloat16, M=length, N=length)
    mask = {} if score_mod is None else causal_case.kwargs
    options = {"bwd_EARLY_DP": early_dp}
    check_case(q, k, v, case, kernel_options=options, **mask)
    torch._dynamo.reset()
    kernel = backward_kernel(backward_code(q, k, v, case, kernel_options=options, **mask))
    assert f"HAS_SCORE_MOD : tl.constexpr = {score_mod is not None}" in kernel
    assert re.search(rf"EARLY_DP : tl.constexpr = {early_dp}\b", kernel)


@pytest.mark.parametrize("length", [255, 256])
def test_default_at_head_dim_128_on_hopper(cuda_device, length):
    # The D=128 default on Hopper: 64x64 tiles on one warpgroup, two stages (two programs
    # per SM), dP in the plain order; causal has partial and full blocks, ALiBi a score_mod.
    if torch.cuda.get_device_capability(cuda_device) < (9, 0):
        pytest.skip("the Hopper default")
    q, k, v = inputs(cuda_device, torch.bfloat16, M=length, E=128)
    case = grad_case("alibi", cuda_device, torch.bfloat16, M=length, N=length)
    causal_mask = grad_case("causal", cuda_device, torch.bfloat16, M=length, N=length).kwargs
    check_case(q, k, v, case, **causal_mask)
    torch._dynamo.reset()
    kernel = backward_kernel(backward_code(q, k, v, case, **causal_mask))
    for name in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        assert f"{name} : tl.constexpr = 64" in kernel
    assert "EARLY_DP : tl.constexpr = False" in kernel
    assert re.search(r"num_warps=4\b", kernel) and re.search(r"num_stages=2\b", kernel)


def _names_value_error(error, text):
    """Whether ``error`` is, or wraps, a ValueError whose message names ``text``. Inductor
    re-raises lowering errors as its own types with the original type and message in
    theirs ("ValueError: ...")."""
    seen = error
    while seen is not None:
        if isinstance(seen, ValueError) and text in str(seen):
            return True
        inner = getattr(seen, "inner_exception", None)
        seen = inner or seen.__cause__ or seen.__context__
    return re.search(rf"ValueError: [^\n]*{re.escape(text)}", str(error)) is not None


@pytest.mark.parametrize("option,value,block_size", [
    ("bwd_BLOCK_N1", 96, 128),  # not a power of 2, does not divide 128
    ("bwd_BLOCK_M2", 64, 32),  # larger than the block mask's 32-row blocks
])
def test_backward_tile_that_does_not_divide_the_block_is_an_error(cuda_device, option, value,
                                                                  block_size):
    q, k, v = inputs(cuda_device, torch.bfloat16)
    block_mask = create_block_mask(causal, None, None, S, S, device=cuda_device,
                                   BLOCK_SIZE=block_size)
    grad_out = torch.ones(B, H, S, D, device=cuda_device, dtype=torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with pytest.raises(Exception) as caught:
        forward_backward(torch.compile(flex_attention), *leaves, grad_out=grad_out,
                         block_mask=block_mask, kernel_options={option: value})
    assert _names_value_error(caught.value, option.removeprefix("bwd_")), caught.value


# ---------------------------------------------------------------------------------------
# TMA tiles from host-built descriptors (lowering/descriptors.py)
# ---------------------------------------------------------------------------------------

def _hopper(device):
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("TMA needs Hopper or newer")


@pytest.mark.parametrize("E,Ev", [(128, 128), (64, 96)])
def test_tma_tiles_come_from_host_descriptors(cuda_device, E, Ev):
    # q and dO (dK/dV programs) and k and v (dQ programs) stream through four descriptors
    # the wrapper builds before the launch: the kernel declares them as tensordesc
    # parameters with its own tiles and builds none itself (no per-program scratch).
    # Ev=96 is not a power of 2: its tile is 128 wide and the TMA zero-fills the rest.
    _hopper(cuda_device)
    q, k, v = inputs(cuda_device, torch.bfloat16, M=255, E=E, Ev=Ev)
    case = grad_case("alibi", cuda_device, torch.bfloat16, M=255, N=255)
    causal_mask = grad_case("causal", cuda_device, torch.bfloat16, M=255, N=255).kwargs
    check_case(q, k, v, case, **causal_mask)
    torch._dynamo.reset()
    code = backward_code(q, k, v, case, **causal_mask)
    kernel = backward_kernel(code)
    assert "USE_TMA : tl.constexpr = True" in kernel
    assert "make_tensor_descriptor" not in kernel
    rows = {name: re.search(rf"{name} : tl.constexpr = (\d+)", kernel).group(1)
            for name in ("BLOCK_M1", "BLOCK_N2")}
    widths = {"QK": 128 if E > 64 else 64, "V": 128}
    for name, block, width in (("Q_DESC", "BLOCK_M1", widths["QK"]), ("DO_DESC", "BLOCK_M1", widths["V"]),
                               ("K_DESC", "BLOCK_N2", widths["QK"]), ("V_DESC", "BLOCK_N2", widths["V"])):
        signature = rf"'arg_{name}': 'tensordesc<bf16\[1, 1, {rows[block]}, {width}\]>'"
        assert re.search(signature, kernel), signature
    assert code.count("TensorDescriptor.from_tensor(") == 4


@pytest.mark.parametrize("layout", ["contiguous", "heads_second"])
def test_tma_under_max_autotune_with_several_tiles(cuda_device, layout):
    # Timing several choices hands each kernel autotuning's stand-in descriptors, shaped and
    # strided as the described tensors; the one host descriptor per tensor then serves
    # whichever tile wins.
    _hopper(cuda_device)
    q, k, v = inputs(cuda_device, torch.bfloat16, E=128)
    if layout == "heads_second":  # [B, S, H, D] in memory, as after a projection and a transpose
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    case = grad_case("alibi", cuda_device, torch.bfloat16)
    compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
    check_case(q, k, v, case, compiled=compiled, **grad_case("causal", cuda_device, torch.bfloat16).kwargs)


def test_expanded_key_value_load_without_the_tma(cuda_device):
    # A key/value batch broadcast by expand (batch stride 0) gets no descriptor (the driver
    # is not known to take a zero stride): its tiles come through pointer loads.
    _hopper(cuda_device)
    q, k, v = inputs(cuda_device, torch.bfloat16, E=128)
    k, v = (t[:1].expand_as(t) for t in (k, v))
    case = grad_case("causal", cuda_device, torch.bfloat16)
    check_case(q, k, v, case)
    torch._dynamo.reset()
    kernel = backward_kernel(backward_code(q, k, v, case))
    assert "USE_TMA : tl.constexpr = False" in kernel


def test_backward_allocates_only_its_results(cuda_device):
    # The compiled backward's peak allocation is dQ, dK, dV and delta, byte for byte: with
    # descriptors built in the kernel it also held 128 bytes per descriptor per program
    # (4 x 1024 programs here, 512 KiB).
    _hopper(cuda_device)
    Bm, Hm, Sm, Dm = 1, 4, 8192, 128
    q, k, v = (torch.randn(Bm, Hm, Sm, Dm, device=cuda_device, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    block_mask = create_block_mask(causal, None, None, Sm, Sm, device=cuda_device)
    grad_out = torch.randn(Bm, Hm, Sm, Dm, device=cuda_device, dtype=torch.bfloat16)
    compiled = torch.compile(flex_attention)
    for _ in range(2):  # the first call compiles
        for t in (q, k, v):
            t.grad = None
        out = compiled(q, k, v, block_mask=block_mask)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.backward(grad_out)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    gradients = 3 * q.numel() * q.element_size()
    delta = Bm * Hm * Sm * 4
    assert peak == gradients + delta, (peak, gradients, delta)


def test_tma_descriptors_under_cuda_graphs(cuda_device):
    # reduce-overhead replays the captured launches: their descriptors were encoded once, at
    # capture, over cudagraph trees' static buffers. Every replay must still read its own
    # call's data, so it matches the same kernels run without graphs, bit for bit.
    _hopper(cuda_device)
    block_mask = create_block_mask(causal, None, None, S, S, device=cuda_device)
    graphed = torch.compile(flex_attention, mode="reduce-overhead")
    plain = torch.compile(flex_attention)
    for seed in range(4):  # warm-up, capture, then replays
        q, k, v = qkv(cuda_device, torch.bfloat16, B=B, Hq=H, M=S, E=128, seed=seed)
        grad_out = random_like_output(q, v, seed=seed + 10)
        results = []
        for fn in (graphed, plain):
            torch.compiler.cudagraph_mark_step_begin()
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            got = forward_backward(fn, *leaves, grad_out=grad_out, block_mask=block_mask)
            results.append({name: t.clone() for name, t in got.items()})
        for name in ("out", "dq", "dk", "dv"):
            assert torch.equal(results[0][name], results[1][name]), (seed, name)
