"""The dense path (eager, and the CPU compiled path that calls it) skips blocks as the block
mask says: mask_mod never runs on empty or full blocks, score_mod never on empty ones.

Each mod here indexes a captured table with an index that is in range only on the blocks
where the mod may run, and far out of range elsewhere, so evaluating it on a skipped block
raises (the code before block skipping evaluated both mods on every position)."""
import math

import pytest
import torch

from inductor_flex import create_block_mask, flex_attention

BLOCK = 64
S = 4 * BLOCK  # 4 x 4 blocks
H, E = 2, 16


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def diagonal_block_index(q_idx, kv_idx):
    """In [0, BLOCK) on the diagonal blocks, at least 936 away from that range elsewhere."""
    return kv_idx % BLOCK + (kv_idx // BLOCK - q_idx // BLOCK) * 1000


def inputs(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, S, E, generator=generator, dtype=dtype).requires_grad_()
            for _ in range(3)]


def reference(q, k, v, keep, bias=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(E)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores.masked_fill(~keep, -math.inf), -1) @ v


def run(q, k, v, compiled, **kwargs):
    attend = torch.compile(flex_attention, fullgraph=True) if compiled else flex_attention
    return attend(q, k, v, **kwargs)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_mask_mod_runs_on_partial_blocks_only(compiled):
    # Causal: the diagonal blocks are partial, those below full, those above empty. The
    # mask_mod answers causally on the diagonal and raises (index out of range) elsewhere.
    table = torch.ones(BLOCK, dtype=torch.bool)

    def diagonal_only_causal(b, h, q_idx, kv_idx):
        return table[diagonal_block_index(q_idx, kv_idx)] & (q_idx >= kv_idx)

    block_mask = create_block_mask(causal, None, None, S, S, device="cpu", BLOCK_SIZE=BLOCK)
    assert block_mask.full_kv_num_blocks.sum() > 0  # there are full blocks to skip
    with pytest.raises(Exception):  # the mod really raises off the diagonal
        create_block_mask(diagonal_only_causal, None, None, S, S, device="cpu", BLOCK_SIZE=BLOCK)
    block_mask.mask_mod = diagonal_only_causal
    q, k, v = inputs()
    out = run(q, k, v, compiled, block_mask=block_mask)
    keep = torch.ones(S, S, dtype=torch.bool).tril()
    want = reference(q, k, v, keep)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q, k, v), grad_out)
    for ours, exact in zip(got, expected):
        torch.testing.assert_close(ours, exact, atol=1e-10, rtol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_score_mod_never_runs_on_empty_blocks(compiled):
    # Block-diagonal mask: only the diagonal blocks are listed (full). The score_mod adds a
    # learned per-column bias read through an index that is out of range off the diagonal.
    def same_block(b, h, q_idx, kv_idx):
        return q_idx // BLOCK == kv_idx // BLOCK

    block_mask = create_block_mask(same_block, None, None, S, S, device="cpu", BLOCK_SIZE=BLOCK)
    assert block_mask.kv_num_blocks.sum() == 0 and block_mask.full_kv_num_blocks.sum() == 4
    bias = torch.randn(BLOCK, dtype=torch.float64, requires_grad=True)

    def diagonal_bias(score, b, h, q_idx, kv_idx):
        return score + bias[diagonal_block_index(q_idx, kv_idx)]

    q, k, v = inputs(seed=1)
    out = run(q, k, v, compiled, score_mod=diagonal_bias, block_mask=block_mask)
    keep = torch.block_diag(*[torch.ones(BLOCK, BLOCK, dtype=torch.bool)] * 4)
    want = reference(q, k, v, keep, bias[torch.arange(S) % BLOCK])
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    expected = torch.autograd.grad(want, (q, k, v, bias), grad_out)
    for ours, exact in zip(got, expected):
        torch.testing.assert_close(ours, exact, atol=1e-9, rtol=0)


def test_rows_listing_no_block_give_zero_out_and_grads():
    # Query blocks 1 and 3 list nothing: their rows are skipped entirely.
    def even_query_blocks(b, h, q_idx, kv_idx):
        return (q_idx // BLOCK) % 2 == 0

    block_mask = create_block_mask(even_query_blocks, None, None, S, S, device="cpu",
                                   BLOCK_SIZE=BLOCK)
    q, k, v = inputs(seed=2)
    out = flex_attention(q, k, v, block_mask=block_mask)
    empty_rows = (torch.arange(S) // BLOCK) % 2 == 1
    assert (out[:, :, empty_rows] == 0).all()
    keep = ~empty_rows[:, None].expand(S, S)
    want = reference(q, k, v, keep)
    torch.testing.assert_close(out[:, :, ~empty_rows], want[:, :, ~empty_rows], atol=1e-10, rtol=0)
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert (grad_q[:, :, empty_rows] == 0).all()
    assert torch.isfinite(grad_k).all() and torch.isfinite(grad_v).all()


@pytest.mark.parametrize("chunk_size", [None, 40, 100])
@pytest.mark.parametrize("budget", [1 << 24, 3000])
def test_batched_mask_evaluation_matches_reference(monkeypatch, chunk_size, budget):
    """mask_mod runs on the partial tiles of several query blocks at once, as many as the
    budget holds (here: all, or one query block per evaluation); per-head masks (marks that
    differ by head), ragged last blocks and chunks that span or split query blocks all give
    the float64 reference."""
    from inductor_flex.ops import dense

    monkeypatch.setattr(dense, "DEFAULT_SCORE_ELEMENTS_PER_CHUNK", budget)
    q_len, kv_len = 90, 75

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx + 7 * h) | (kv_idx % 13 == 0)

    mask = create_block_mask(per_head, None, H, q_len, kv_len, device="cpu", BLOCK_SIZE=16)
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, q_len, E, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, H, kv_len, E, generator=generator, dtype=torch.float64)
            for _ in range(2))
    heads = torch.arange(H)[:, None, None]
    keep = per_head(0, heads, torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :])
    expected = reference(q, k, v, keep)
    out, lse, _ = dense.dense_attention(q, k, v, lambda s, b, h, qi, ki: s, mask.operator_tuple(),
                                        1 / math.sqrt(E), chunk_size=chunk_size)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(E)).masked_fill(~keep, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).float())
