"""Fuzz: random masks, score mods, lengths, GQA and block sizes against a float64 dense
reference, for the output and every gradient (query, key, value, a captured buffer).

Each case draws a mask (one or two of inductor_flex.masks' mods, combined with and_masks /
or_masks), a score_mod (some not finite where the mask drops the score, such as
``s / sqrt(q - kv + c)`` under causal), lengths that are mostly not multiples of 128, a
GQA layout and block sizes. The reference evaluates the score_mod only at kept positions,
so its gradients are exact.

CI runs a few cases with a fixed seed, eager, and the first ones compiled as well. For a
longer run (on a GPU, say)::

    INDUCTOR_FLEX_FUZZ_CASES=500 INDUCTOR_FLEX_FUZZ_DEVICE=cuda \\
    INDUCTOR_FLEX_FUZZ_COMPILED_CASES=500 pytest tests/test_fuzz.py

INDUCTOR_FLEX_FUZZ_SEED changes the seed.
"""
import math
import os
import random

import pytest
import torch
import torch._dynamo

from inductor_flex import and_masks, create_block_mask, flex_attention, or_masks
from inductor_flex import masks

CASES = int(os.environ.get("INDUCTOR_FLEX_FUZZ_CASES", "24"))
COMPILED_CASES = int(os.environ.get("INDUCTOR_FLEX_FUZZ_COMPILED_CASES", "3"))
DEVICE = os.environ.get("INDUCTOR_FLEX_FUZZ_DEVICE", "cpu")
SEED = int(os.environ.get("INDUCTOR_FLEX_FUZZ_SEED", "0"))


def _head_parity(b, h, q_idx, kv_idx):
    return (kv_idx + h) % 3 != 0


def _draw_mask(rng: random.Random):
    """(mask_mod, whether it implies causal)."""
    pieces = [
        lambda: masks.generate_sliding_window_mask(rng.randint(1, 80)),
        lambda: masks.generate_chunked_causal_mask(rng.randint(1, 70)),
        lambda: masks.generate_prefix_lm_mask(rng.randint(0, 90)),
        lambda: masks.generate_global_sliding_window_mask(rng.randint(1, 8), rng.randint(1, 40)),
        lambda: masks.generate_dilated_sliding_window_mask(rng.randint(2, 60), rng.randint(1, 3)),
        lambda: _head_parity,
    ]
    other = rng.choice(pieces)()
    kind = rng.choice(["causal", "causal_and", "or", "other"])
    if kind == "causal":
        return masks.causal_mask, True
    if kind == "causal_and":
        return and_masks(masks.causal_mask, other), True
    if kind == "or":
        return or_masks(other, rng.choice(pieces)()), False
    return other, False


def _draw_score_mod(rng: random.Random, causal: bool, q_heads: int):
    """(factory taking the captured weight w [q_heads], whether it reads w)."""
    # Drawn here, not inside the factories: ours and the reference call each factory.
    offset = rng.choice([1, 7, 200])
    soft_cap = rng.choice([5.0, 30.0])
    choices = [
        (lambda w: None, False),
        (lambda w: lambda s, b, h, q, kv: s * w[h], True),
        (lambda w: lambda s, b, h, q, kv: s - w[h] * (q - kv).abs().float() / 16, True),
        (lambda w: masks.generate_tanh_softcap(soft_cap), False),
        (lambda w: masks.generate_alibi_bias(q_heads, device=DEVICE), False),
    ]
    if causal:
        # Not finite where causal drops the score (q < kv): NaN, or -inf from log1p(-1).
        choices += [
            (lambda w: lambda s, b, h, q, kv: s / torch.sqrt((q - kv + offset).float()) * 4, False),
            (lambda w: lambda s, b, h, q, kv: s - w[h] * torch.log1p((q - kv).float()), True),
        ]
    return rng.choice(choices)


def _draw_case(index: int):
    rng = random.Random(SEED * 100003 + index)
    mask_mod, causal = _draw_mask(rng)
    kv_heads = rng.choice([1, 2])
    q_heads = kv_heads * rng.choice([1, 2, 3])
    score_factory, reads_weight = _draw_score_mod(rng, causal, q_heads)
    return dict(
        batch=rng.choice([1, 2]), q_heads=q_heads, kv_heads=kv_heads,
        q_len=rng.choice([1, 17, 64, 100, 128, 129, 200, 257]), kv_len=rng.choice([1, 33, 64, 127, 150, 256, 300]),
        dim=rng.choice([8, 16]), value_dim=rng.choice([8, 16]),
        block=(rng.choice([16, 32, 64, 128]), rng.choice([16, 32, 64, 128])),
        mask_mod=mask_mod, score_factory=score_factory, reads_weight=reads_weight,
        scale=rng.choice([None, 0.3]), seed=rng.randrange(1 << 30))


def _reference(query, key, value, score_mod, mask_mod, scale):
    """float64 attention with the score_mod evaluated at kept positions only."""
    batch, q_heads, q_len, dim = query.shape
    group = q_heads // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scores = query @ key.transpose(-1, -2) * (1 / math.sqrt(dim) if scale is None else scale)
    b, h, q, kv = (torch.arange(n, device=query.device, dtype=torch.int32) for n in scores.shape)
    keep = mask_mod(b[:, None, None, None], h[None, :, None, None], q[None, None, :, None], kv[None, None, None, :])
    kept = keep.expand(scores.shape).nonzero(as_tuple=True)
    kept_scores = scores[kept]
    if score_mod is not None:
        kept_scores = score_mod(kept_scores, *(i.to(torch.int32) for i in kept)).to(torch.float64)
    full = torch.full_like(scores, -math.inf).index_put(kept, kept_scores)
    row_max = full.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    weights = torch.exp(full - row_max)
    denominator = weights.sum(-1, keepdim=True)
    return (weights @ value) / torch.where(denominator == 0, 1.0, denominator)


def _run_case(index: int, compiled: bool):
    case = _draw_case(index)
    generator = torch.Generator().manual_seed(case["seed"])

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_()

    query = leaf(case["batch"], case["q_heads"], case["q_len"], case["dim"])
    key = leaf(case["batch"], case["kv_heads"], case["kv_len"], case["dim"])
    value = leaf(case["batch"], case["kv_heads"], case["kv_len"], case["value_dim"])
    weight = (torch.rand(case["q_heads"], generator=generator) + 0.5).to(DEVICE).requires_grad_()
    grad_out = torch.randn(case["batch"], case["q_heads"], case["q_len"], case["value_dim"],
                           generator=generator).to(DEVICE)
    block_mask = create_block_mask(case["mask_mod"], None, case["q_heads"], case["q_len"], case["kv_len"],
                                   device=DEVICE, BLOCK_SIZE=case["block"])

    attend = flex_attention
    if compiled:
        torch._dynamo.reset()
        attend = torch.compile(flex_attention)
    out = attend(query, key, value, score_mod=case["score_factory"](weight), block_mask=block_mask,
                 scale=case["scale"], enable_gqa=True)
    out.backward(grad_out)

    leaves64 = [t.detach().double().requires_grad_() for t in (query, key, value, weight)]
    expected = _reference(*leaves64[:3], case["score_factory"](leaves64[3]), case["mask_mod"], case["scale"])
    expected.backward(grad_out.double())

    tolerance = dict(atol=2e-4, rtol=2e-4) if DEVICE == "cpu" else dict(atol=2e-2, rtol=2e-2)
    described = {k: v for k, v in case.items() if k not in ("score_factory",)}
    torch.testing.assert_close(out.double(), expected, **tolerance, msg=lambda m: f"out, {described}: {m}")
    for name, got, want in zip(("query", "key", "value", "weight"), (query, key, value, weight), leaves64):
        if name == "weight" and not case["reads_weight"]:
            assert got.grad is None or not got.grad.any()
            continue
        assert got.grad is not None and torch.isfinite(got.grad).all(), (name, described)
        torch.testing.assert_close(got.grad.double(), want.grad, **tolerance,
                                   msg=lambda m: f"grad {name}, {described}: {m}")
    if compiled:
        torch._dynamo.reset()


@pytest.mark.parametrize("index", range(CASES))
def test_fuzz_eager(index):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("INDUCTOR_FLEX_FUZZ_DEVICE=cuda needs a GPU")
    _run_case(index, compiled=False)


@pytest.mark.parametrize("index", range(min(COMPILED_CASES, CASES)))
def test_fuzz_compiled(index):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("INDUCTOR_FLEX_FUZZ_DEVICE=cuda needs a GPU")
    _run_case(index, compiled=True)
