"""The mask library (inductor_flex/masks/): every family against a truth written by hand
(explicit loops over small sizes), through create_mask, and for several of them the
block classification of create_block_mask against blocks cut from that truth."""
import math

import pytest
import torch

from inductor_flex import masks
from inductor_flex._mods import score_mod_grid
from inductor_flex.block_mask import create_block_mask, create_mask
from inductor_flex.masks import create_document_block_mask

CPU = "cpu"


def truth_from_loops(keep, B, H, Q, KV):
    """bool [B, H, Q, KV] with keep(b, h, q, kv) evaluated in plain Python."""
    out = torch.zeros(B, H, Q, KV, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for q in range(Q):
                for kv in range(KV):
                    out[b, h, q, kv] = bool(keep(b, h, q, kv))
    return out


def assert_blocks_match(mask_mod, truth, block_size, B=None, H=None):
    """create_block_mask's partial / full lists agree with blocks cut from ``truth``."""
    _, _, Q, KV = truth.shape
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    bm = create_block_mask(mask_mod, B, H, Q, KV, device=CPU, BLOCK_SIZE=block_size)
    nq, nk = math.ceil(Q / q_block), math.ceil(KV / kv_block)
    for b in range(truth.shape[0]):
        for h in range(truth.shape[1]):
            for i in range(nq):
                partial = set(bm.kv_indices[b, h, i, : int(bm.kv_num_blocks[b, h, i])].tolist())
                full = set(bm.full_kv_indices[b, h, i, : int(bm.full_kv_num_blocks[b, h, i])].tolist())
                for j in range(nk):
                    tile = truth[b, h, i * q_block:(i + 1) * q_block, j * kv_block:(j + 1) * kv_block]
                    expected = "full" if tile.all() else "partial" if tile.any() else "empty"
                    got = "full" if j in full else "partial" if j in partial else "empty"
                    assert got == expected, (b, h, i, j)
    return bm


def dense(mod, B, H, Q, KV):
    return create_mask(mod, B, H, Q, KV, device=CPU)


# --------------------------------------------------------------------------------------
# Mask mods
# --------------------------------------------------------------------------------------


def test_causal_and_offset_causal():
    truth = truth_from_loops(lambda b, h, q, kv: kv <= q, 1, 1, 9, 9)
    assert torch.equal(dense(masks.causal_mask, 1, 1, 9, 9), truth)
    assert_blocks_match(masks.causal_mask, truth, 4)
    # Bottom-right alignment: 4 queries at the end of 10 keys.
    bottom_right = masks.generate_causal_mask(offset=6)
    assert torch.equal(dense(bottom_right, 1, 1, 4, 10), truth_from_loops(lambda b, h, q, kv: kv <= q + 6, 1, 1, 4, 10))
    with pytest.raises(ValueError, match="offset must be an int"):
        masks.generate_causal_mask(1.5)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(causal):
    window = 3
    if causal:
        truth = truth_from_loops(lambda b, h, q, kv: 0 <= q - kv <= window, 1, 1, 20, 20)
    else:
        truth = truth_from_loops(lambda b, h, q, kv: abs(q - kv) <= window, 1, 1, 20, 20)
    mod = masks.generate_sliding_window_mask(window, causal=causal)
    assert torch.equal(dense(mod, 1, 1, 20, 20), truth)
    # Per query: window + 1 keys (causal) or 2 * window + 1, away from the edges.
    assert int(truth[0, 0, 10].sum()) == (window + 1 if causal else 2 * window + 1)
    assert_blocks_match(mod, truth, (4, 2))
    with pytest.raises(ValueError, match="window_size must be a non-negative int"):
        masks.generate_sliding_window_mask(-1)


def test_prefix_lm_int_and_per_batch():
    truth = truth_from_loops(lambda b, h, q, kv: kv < 5 or kv <= q, 1, 1, 12, 12)
    mod = masks.generate_prefix_lm_mask(5)
    assert torch.equal(dense(mod, 1, 1, 12, 12), truth)
    assert_blocks_match(mod, truth, 4)
    prefixes = [0, 3, 12]
    per_batch = masks.generate_prefix_lm_mask(torch.tensor(prefixes))
    truth = truth_from_loops(lambda b, h, q, kv: kv < prefixes[b] or kv <= q, 3, 1, 12, 12)
    assert torch.equal(dense(per_batch, 3, 1, 12, 12), truth)
    assert_blocks_match(per_batch, truth, 4, B=3)
    with pytest.raises(ValueError, match="1-D integer"):
        masks.generate_prefix_lm_mask(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="non-negative"):
        masks.generate_prefix_lm_mask(-2)


def test_chunked_causal_and_block_causal():
    chunked = masks.generate_chunked_causal_mask(4)
    truth = truth_from_loops(lambda b, h, q, kv: q // 4 == kv // 4 and kv <= q, 1, 1, 14, 14)
    assert torch.equal(dense(chunked, 1, 1, 14, 14), truth)
    assert_blocks_match(chunked, truth, 2)
    block_causal = masks.generate_block_causal_mask(4)
    truth = truth_from_loops(lambda b, h, q, kv: kv // 4 <= q // 4, 1, 1, 14, 14)
    assert torch.equal(dense(block_causal, 1, 1, 14, 14), truth)
    bm = assert_blocks_match(block_causal, truth, 4)
    # Chunks aligned with blocks: no partial block at all.
    assert int(bm.kv_num_blocks.sum()) == 0
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        masks.generate_block_causal_mask(0)


def natten_truth(height, width, kernel_h, kernel_w):
    def keep(b, h, q, kv):
        q_row, q_col = divmod(q, width)
        kv_row, kv_col = divmod(kv, width)
        # Window start: centred on the pixel, shifted to stay inside the image.
        row_start = min(max(q_row - kernel_h // 2, 0), height - kernel_h)
        col_start = min(max(q_col - kernel_w // 2, 0), width - kernel_w)
        return row_start <= kv_row < row_start + kernel_h and col_start <= kv_col < col_start + kernel_w

    n = height * width
    return truth_from_loops(keep, 1, 1, n, n)


@pytest.mark.parametrize("height, width, kernel", [(5, 6, 3), (4, 7, (3, 5)), (3, 3, 3)])
def test_natten(height, width, kernel):
    kernel_h, kernel_w = (kernel, kernel) if isinstance(kernel, int) else kernel
    truth = natten_truth(height, width, kernel_h, kernel_w)
    mod = masks.generate_natten_mask(height, width, kernel)
    assert torch.equal(dense(mod, 1, 1, height * width, height * width), truth)
    # Every pixel sees exactly a full kernel window, even in the corners.
    assert bool((truth[0, 0].sum(-1) == kernel_h * kernel_w).all())
    assert_blocks_match(mod, truth, 4)


def test_natten_rejects_bad_kernels():
    with pytest.raises(ValueError, match="must be odd"):
        masks.generate_natten_mask(8, 8, 4)
    with pytest.raises(ValueError, match="exceeds the image size"):
        masks.generate_natten_mask(8, 4, (3, 5))
    with pytest.raises(ValueError, match="height must be a positive int"):
        masks.generate_natten_mask(0, 4, 3)


@pytest.mark.parametrize("causal", [True, False])
def test_dilated_sliding_window(causal):
    window, dilation = 2, 3

    def keep(b, h, q, kv):
        allowed = {q - step * dilation for step in range(window + 1)}
        if not causal:
            allowed |= {q + step * dilation for step in range(window + 1)}
        return kv in allowed

    truth = truth_from_loops(keep, 1, 1, 22, 22)
    mod = masks.generate_dilated_sliding_window_mask(window, dilation, causal=causal)
    assert torch.equal(dense(mod, 1, 1, 22, 22), truth)
    assert_blocks_match(mod, truth, 3)
    plain = masks.generate_sliding_window_mask(window, causal=causal)
    assert torch.equal(dense(masks.generate_dilated_sliding_window_mask(window, 1, causal), 1, 1, 22, 22),
                       dense(plain, 1, 1, 22, 22))
    with pytest.raises(ValueError, match="dilation must be a positive int"):
        masks.generate_dilated_sliding_window_mask(2, 0)


@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens_plus_sliding_window(causal):
    def keep(b, h, q, kv):
        visible = q < 2 or kv < 2 or abs(q - kv) <= 3
        return visible and (not causal or kv <= q)

    truth = truth_from_loops(keep, 1, 1, 24, 24)
    mod = masks.generate_global_sliding_window_mask(2, 3, causal=causal)
    assert torch.equal(dense(mod, 1, 1, 24, 24), truth)
    assert_blocks_match(mod, truth, 4)


@pytest.mark.parametrize("causal", [True, False])
def test_document_mask_with_local_inner_mod(causal):
    lengths = [5, 9, 1, 0, 11]
    starts = [0, 5, 14, 15, 15]
    doc = [d for d, n in enumerate(lengths) for _ in range(n)]
    prefix = masks.generate_prefix_lm_mask(3)  # applied inside every document

    def keep(b, h, q, kv):
        if doc[q] != doc[kv] or (causal and kv > q):
            return False
        local_q, local_kv = q - starts[doc[q]], kv - starts[doc[kv]]
        return local_kv < 3 or local_kv <= local_q

    truth = truth_from_loops(keep, 1, 1, 26, 26)
    mod = masks.generate_document_mask(prefix, lengths=lengths, causal=causal, device=CPU)
    assert torch.equal(dense(mod, 1, 1, 26, 26), truth)
    assert_blocks_match(mod, truth, 4)
    # The arithmetic constructor gives the same element mask.
    bm = create_document_block_mask(lengths=lengths, causal=causal, mask_mod=prefix, BLOCK_SIZE=4, device=CPU)
    assert torch.equal(dense(bm.mask_mod, 1, 1, 26, 26), truth)
    assert torch.equal(masks.document_ids(lengths=lengths, device=CPU), torch.tensor(doc, dtype=torch.int32))
    assert masks.document_ids(offsets=[[0, 2, 4], [0, 1, 4]], device=CPU).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]


def test_document_mask_plain_and_per_batch_packings():
    packings = [[3, 5], [8], [1, 1, 6]]

    def keep(b, h, q, kv):
        doc = [d for d, n in enumerate(packings[b]) for _ in range(n)]
        return doc[q] == doc[kv]

    truth = truth_from_loops(keep, 3, 1, 8, 8)
    mod = masks.generate_document_mask(lengths=packings, device=CPU)
    assert torch.equal(dense(mod, 3, 1, 8, 8), truth)
    assert_blocks_match(mod, truth, 2, B=3)
    with pytest.raises(ValueError, match="inner_mask_mod must be a callable"):
        masks.generate_document_mask(5, lengths=[2, 2], device=CPU)


# --------------------------------------------------------------------------------------
# Score mods
# --------------------------------------------------------------------------------------


def apply_score_mod(mod, scores):
    B, H, Q, KV = scores.shape
    return score_mod_grid(mod, scores, torch.arange(B), torch.arange(H), torch.arange(Q), torch.arange(KV))


def random_scores(B, H, Q, KV, seed=0):
    return torch.randn(B, H, Q, KV, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 20


def test_alibi_slopes_follow_the_paper():
    assert masks.alibi_slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]
    assert masks.alibi_slopes(4).tolist() == [2.0 ** (-2 * k) for k in range(1, 5)]
    # 6 heads: the 4-head slopes, then every other one of the 8-head slopes (1st, 3rd).
    assert masks.alibi_slopes(6).tolist() == pytest.approx([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                            2.0 ** -1, 2.0 ** -3])
    assert masks.alibi_slopes(1).tolist() == [2.0 ** -8]
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        masks.alibi_slopes(0)


def test_alibi_bias_values():
    heads = 3
    scores = random_scores(2, heads, 5, 7)
    out = apply_score_mod(masks.generate_alibi_bias(heads), scores)
    slopes = masks.alibi_slopes(heads).tolist()
    for b in range(2):
        for h in range(heads):
            for q in range(5):
                for kv in range(7):
                    expected = float(scores[b, h, q, kv]) + slopes[h] * (kv - q)
                    assert float(out[b, h, q, kv]) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert out.dtype == torch.float64
    assert create_mask(masks.generate_alibi_bias(heads), 1, heads, 5, 7, device=CPU).all()
    with pytest.raises(ValueError, match="slopes must be a float tensor of shape"):
        masks.generate_alibi_bias(3, slopes=torch.ones(4))


def test_tanh_softcap_values():
    scores = random_scores(1, 2, 4, 6, seed=1) * 5
    out = apply_score_mod(masks.generate_tanh_softcap(30), scores)
    for index in range(scores.numel()):
        s = float(scores.view(-1)[index])
        assert float(out.view(-1)[index]) == pytest.approx(30 * math.tanh(s / 30), rel=1e-12)
    assert float(out.abs().max()) < 30
    with pytest.raises(ValueError, match="soft_cap must be a positive number"):
        masks.generate_tanh_softcap(0)


@pytest.mark.parametrize("per_head", [True, False])
def test_relative_position_bias_values_and_gradient(per_head):
    heads, max_distance = 2, 2
    shape = (heads, 2 * max_distance + 1) if per_head else (2 * max_distance + 1,)
    table = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    scores = random_scores(1, heads, 4, 6, seed=2)
    out = apply_score_mod(masks.generate_relative_position_bias(table), scores)
    expected_grad = torch.zeros(shape, dtype=torch.float64)
    for h in range(heads):
        for q in range(4):
            for kv in range(6):
                slot = min(max(kv - q, -max_distance), max_distance) + max_distance
                entry = (h, slot) if per_head else (slot,)
                expected = float(scores[0, h, q, kv]) + float(table.detach()[entry])
                assert float(out.detach()[0, h, q, kv]) == pytest.approx(expected, rel=1e-12)
                expected_grad[entry] += 1
    out.sum().backward()
    assert torch.equal(table.grad, expected_grad)


def test_relative_position_bias_rejects_bad_tables():
    with pytest.raises(ValueError, match="odd last dim"):
        masks.generate_relative_position_bias(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="must be a float tensor"):
        masks.generate_relative_position_bias(torch.zeros(5, dtype=torch.int64))


def test_library_exports():
    for name in masks.__all__:
        assert callable(getattr(masks, name)), name
    assert masks.create_document_block_mask is create_document_block_mask


@pytest.mark.parametrize("name", ["alibi", "relative_position"])
def test_bias_score_mods_keep_float32_scores_when_compiled(name):
    """A bias mod must not cast back to the traced score's dtype: traced, the score stands
    in bf16 while the computation holds it in float32, so a cast rounds every biased score
    (ALiBi's compiled error was 6.5x eager's). Compiled bf16 error stays near eager's."""
    from inductor_flex import flex_attention

    torch.manual_seed(0)
    H, S = 4, 256
    if name == "alibi":
        score_mod = masks.generate_alibi_bias(H)
    else:
        score_mod = masks.generate_relative_position_bias(torch.randn(H, 2 * 64 + 1).bfloat16())
    q, k, v = (torch.randn(1, H, S, 32) for _ in range(3))
    golden = flex_attention(*(t.double() for t in (q, k, v)), score_mod=score_mod)
    low = [t.bfloat16() for t in (q, k, v)]
    eager_error = (flex_attention(*low, score_mod=score_mod).double() - golden).abs().mean()
    compiled = torch.compile(flex_attention, fullgraph=True)
    compiled_error = (compiled(*low, score_mod=score_mod).double() - golden).abs().mean()
    assert compiled_error <= 1.1 * eager_error, (compiled_error, eager_error)
