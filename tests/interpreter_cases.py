"""Our Triton kernels' cases run through Triton's interpreter (see triton_interpreter.py).

``python interpreter_cases.py [case ...]`` under ``TRITON_INTERPRET=1`` runs each case
against a float64 run with tests/gpu/flex_check.py's error-ratio rule, and prints one JSON
line per case: {"case": name, "error": null or the failure}. The decode cases compile with
BACKEND="TRITON_DECODE", the others with BACKEND="TRITON", so the kernel under test must
serve them. tests/test_interpreter.py runs it in a fresh process.
"""
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "gpu")]

import triton_interpreter  # noqa: E402,F401  (must come before torch compiles anything)
import torch  # noqa: E402
from torch._inductor.utils import run_and_get_code  # noqa: E402

from flex_check import (  # noqa: E402
    alibi, causal_at, check_against_golden, check_grads_against_golden, qkv, sliding_window_at, softcap)
from inductor_flex import AuxRequest, BlockMask, create_block_mask, flex_attention  # noqa: E402

DECODE = {"BACKEND": "TRITON_DECODE"}


def run_decode(q, k, v, **kwargs):
    """check_against_golden through the decode kernel, and the generated code must hold it."""
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention)
    _, code = run_and_get_code(compiled, q, k, v, enable_gqa=True, kernel_options=DECODE,
                               return_aux=AuxRequest(lse=True), **kwargs)
    assert any("inductor_flex decode" in c for c in code), "the decode kernel was not generated"
    check_against_golden(q, k, v, compiled=compiled, enable_gqa=True, kernel_options=DECODE,
                         **kwargs)


def gqa4_one_token_ragged():
    # 4 heads per KV head packed, KV_LEN not a multiple of the block, 3 splits.
    q, k, v = qkv("cpu", torch.float32, B=2, Hq=8, Hkv=2, M=1, N=300)
    run_decode(q, k, v)


def gqa5_four_tokens_causal_alibi():
    # A group of 5 heads x 4 tokens packed into 32 rows (20 used), head dim 80, a captured
    # per-head buffer indexed by each row's head, a causal mask at an offset.
    q, k, v = qkv("cpu", torch.float16, B=1, Hq=10, Hkv=2, M=4, N=260, E=80)
    slopes = torch.exp2(-torch.arange(1, 11, dtype=torch.float32))
    mask = create_block_mask(causal_at(200), None, None, 4, 260, device="cpu")
    run_decode(q, k, v, score_mod=alibi(slopes), block_mask=mask)


def per_head_mask_sixteen_tokens_softcap():
    # A block mask per head: one head per program; sliding window; tanh soft-cap. (float16:
    # the interpreter gets bfloat16 wrong in the forward kernel too, 8e8 off.)
    q, k, v = qkv("cpu", torch.float16, B=1, Hq=4, Hkv=2, M=16, N=384)
    mask = create_block_mask(sliding_window_at(300, 100), None, 4, 16, 384, device="cpu")
    check = dict(score_mod=softcap, block_mask=mask)
    torch._dynamo.reset()
    check_against_golden(q, k, v, enable_gqa=True, kernel_options=dict(DECODE, APPROX_TANH=False),
                         **check)


def rows_that_see_nothing():
    # Heads whose mask keeps nothing: out 0, lse and max_scores -inf, no NaN.
    q, k, v = qkv("cpu", torch.float32, B=1, Hq=4, Hkv=1, M=2, N=256)

    def odd_heads_only(b, h, q_idx, kv_idx):
        return (h % 2) == 1

    mask = create_block_mask(odd_heads_only, None, 4, 2, 256, device="cpu")
    torch._dynamo.reset()
    out, aux, _, _ = check_against_golden(q, k, v, enable_gqa=True, kernel_options=DECODE,
                                          block_mask=mask)
    assert torch.equal(out[:, 0::2], torch.zeros_like(out[:, 0::2]))
    assert torch.isneginf(aux.lse[:, 0::2]).all() and torch.isneginf(aux.max_scores[:, 0::2]).all()


def split_kv_option():
    # SPLIT_KV fixes the split count: more splits than blocks leaves some splits empty.
    q, k, v = qkv("cpu", torch.float32, B=1, Hq=2, Hkv=2, M=1, N=200)
    torch._dynamo.reset()
    check_against_golden(q, k, v, kernel_options=dict(DECODE, SPLIT_KV=5))


def default_mask_dynamic_across_block_boundaries():
    # The default full mask under dynamic=True (on the CPU with a spare block row and
    # column, whose strides are sums) through the fused forward and backward: exact on both
    # sides of 128 tokens, one frame. Strides pasted unparenthesised read wrong rows here.
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(flex_attention, backend=counter, dynamic=True)
    for length in (64, 200, 520):
        q, k, v = qkv("cpu", torch.float32, B=2, Hq=2, M=length, E=16, seed=length)
        check_grads_against_golden(q, k, v, compiled=compiled, kernel_options={"BACKEND": "TRITON"})
    assert counter.frame_count == 1, counter.frame_count


def captured_ints_become_kernel_arguments():
    # Under dynamic=True an int a mod captures turns symbolic once it changes (Dynamo's
    # automatic dynamic); the kernels take it as an argument instead of declining to the
    # dense path (the forced backends raise if they decline). Decode: a causal offset;
    # fused forward and backward: a score_mod shift. No recompile at the third value.
    def shifted(offset):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + 0.01 * (q_idx + offset - kv_idx)
        return score_mod

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=True)
    for kv_len in (300, 301, 520):
        q, k, v = qkv("cpu", torch.float16, B=2, Hq=8, Hkv=2, M=1, N=kv_len, seed=kv_len)
        mask = create_block_mask(causal_at(kv_len - 1), None, None, 1, kv_len, device="cpu")
        with torch._dynamo.config.patch(error_on_recompile=kv_len == 520):
            check_against_golden(q, k, v, compiled=compiled, enable_gqa=True, block_mask=mask,
                                 kernel_options=DECODE)
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=True)
    triton_only = {"BACKEND": "TRITON"}
    for offset in (3, 5, 9):
        q, k, v = qkv("cpu", torch.float16, B=1, Hq=2, M=130, N=130, seed=offset)
        with torch._dynamo.config.patch(error_on_recompile=offset == 9):
            check_against_golden(q, k, v, compiled=compiled, score_mod=shifted(offset),
                                 kernel_options=triton_only)
            check_grads_against_golden(q, k, v, compiled=compiled, score_mod=shifted(offset),
                                       kernel_options=triton_only)


def compiled_block_mask_builder_at_three_lengths():
    # create_block_mask's compiled builder through Inductor's Triton code generation: the
    # second length compiles with symbolic lengths, the third reuses it (issue 20: on the
    # H200 the symbolic compile once failed and the builder fell back to eager slabs for
    # good). Lists equal the eager slabs', and the builder is still the symbolic one.
    import inductor_flex.block_mask as block_mask_module

    def causal_or_sink(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (kv_idx < 8)

    torch._dynamo.reset()
    saved = block_mask_module._FUSED_DEVICE_TYPES, block_mask_module._fused_builders
    block_mask_module._FUSED_DEVICE_TYPES = ("cpu",)
    block_mask_module._fused_builders = type(saved[1])()
    torch._dynamo.utils.counters.clear()
    try:
        for q_len, kv_len in ((256, 256), (640, 512), (1024, 896)):
            build = lambda: create_block_mask(causal_or_sink, None, None, q_len, kv_len,  # noqa: E731
                                              device="cpu", BLOCK_SIZE=(128, 64), _compile=True)
            if q_len == 256:
                # No sort in the generated code: Inductor's bitonic sort of (value, index)
                # pairs takes ptxas minutes per config at 128-block rows (issue 20).
                got, code = run_and_get_code(build)
                source = "\n".join(code)
                assert "sort_with_index" not in source and "associative_scan" in source, "listing kernel"
            else:
                got = build()
            builder = block_mask_module._fused_builders.get(causal_or_sink.__code__)
            assert builder is not None and not builder._static_lengths, f"{q_len}: the builder fell back"
            expected = create_block_mask(causal_or_sink, None, None, q_len, kv_len, device="cpu",
                                         BLOCK_SIZE=(128, 64))
            for field in BlockMask._BLOCK_LIST_FIELDS:
                assert torch.equal(getattr(got, field), getattr(expected, field)), (q_len, field)
        # One compile for the first lengths, one with symbolic lengths for the other two.
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    finally:
        block_mask_module._FUSED_DEVICE_TYPES, block_mask_module._fused_builders = saved
        torch._dynamo.reset()


CASES = {f.__name__: f for f in (captured_ints_become_kernel_arguments, compiled_block_mask_builder_at_three_lengths,
                                  default_mask_dynamic_across_block_boundaries, gqa4_one_token_ragged, gqa5_four_tokens_causal_alibi,
                                  per_head_mask_sixteen_tokens_softcap, rows_that_see_nothing,
                                  split_kv_option)}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        try:
            CASES[name]()
            error = None
        except Exception:  # reported to the parent test, which fails naming it
            error = traceback.format_exc()[-3000:]
        print(json.dumps({"case": name, "error": error}), flush=True)
