"""The public flex_attention (inductor_flex/api.py): numerics, outputs, options, validation."""
import math
import warnings

import pytest
import torch

import inductor_flex.api as api
from inductor_flex import AuxOutput, AuxRequest, BlockMask, create_block_mask, flex_attention


def randn(*shape, dtype=torch.float64, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def qkv(batch=2, heads=4, q_len=10, kv_len=None, dim=8, kv_batch=None, kv_heads=None,
        value_dim=None, dtype=torch.float64, requires_grad=False):
    kv_len = q_len if kv_len is None else kv_len
    kv_batch = batch if kv_batch is None else kv_batch
    kv_heads = heads if kv_heads is None else kv_heads
    value_dim = dim if value_dim is None else value_dim
    return (randn(batch, heads, q_len, dim, dtype=dtype, seed=1, requires_grad=requires_grad),
            randn(kv_batch, kv_heads, kv_len, dim, dtype=dtype, seed=2, requires_grad=requires_grad),
            randn(kv_batch, kv_heads, kv_len, value_dim, dtype=dtype, seed=3, requires_grad=requires_grad))


def grid(batch, heads, q_len, kv_len):
    b = torch.arange(batch, dtype=torch.int32).view(-1, 1, 1, 1)
    h = torch.arange(heads, dtype=torch.int32).view(1, -1, 1, 1)
    q = torch.arange(q_len, dtype=torch.int32).view(1, 1, -1, 1)
    kv = torch.arange(kv_len, dtype=torch.int32).view(1, 1, 1, -1)
    return b, h, q, kv


def naive(query, key, value, score_mod=None, mask_mod=None, scale=None):
    """Whole-matrix float64 attention with broadcast index tensors (mods here are elementwise)."""
    batch, heads, q_len, dim = query.shape
    group = heads // key.shape[1]
    key = key.expand(batch, -1, -1, -1).repeat_interleave(group, dim=1)
    value = value.expand(batch, -1, -1, -1).repeat_interleave(group, dim=1)
    scale = 1 / math.sqrt(dim) if scale is None else scale
    scores = scale * query @ key.transpose(-1, -2)
    index = grid(batch, heads, q_len, key.shape[2])
    if score_mod is not None:
        scores = score_mod(scores, *index)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if mask_mod is not None:
        keep = mask_mod(*index).expand_as(scores)
    row_has = keep.any(-1, keepdim=True)
    masked = torch.where(row_has, scores.masked_fill(~keep, -math.inf), torch.zeros_like(scores))
    probs = torch.softmax(masked, -1) * row_has
    lse = torch.where(row_has.squeeze(-1), torch.logsumexp(masked, -1), -math.inf)
    max_scores = torch.where(row_has.squeeze(-1), masked.amax(-1), -math.inf)
    return probs @ value, lse, max_scores


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_or_sink(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx).abs() <= 2 + h) | (kv_idx == 0)


def softcap_alibi(score, b, h, q_idx, kv_idx):
    return 4 * torch.tanh(score / 4) - (h + 1) * 0.1 * (q_idx - kv_idx).abs()


# ---------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------
def test_defaults_match_plain_softmax_attention():
    query, key, value = qkv(q_len=9, kv_len=13)
    out = flex_attention(query, key, value)
    reference, _, _ = naive(query, key, value)
    assert out.shape == (2, 4, 9, 8) and out.dtype == torch.float64
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kv_batch, kv_heads", [(2, 4), (2, 2), (1, 1)])
def test_mods_masks_gqa_and_broadcast(kv_batch, kv_heads):
    query, key, value = qkv(q_len=20, kv_len=17, kv_batch=kv_batch, kv_heads=kv_heads, value_dim=5)
    mask = create_block_mask(sliding_or_sink, None, 4, 20, 17, device="cpu", BLOCK_SIZE=8)
    out, aux = flex_attention(query, key, value, score_mod=softcap_alibi, block_mask=mask, scale=0.3,
                              enable_gqa=kv_heads != 4, return_aux=AuxRequest(lse=True, max_scores=True))
    ref_out, ref_lse, ref_max = naive(query, key, value, softcap_alibi, sliding_or_sink, scale=0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(aux.lse, ref_lse.float(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(aux.max_scores, ref_max.float(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_dtypes_and_shapes(dtype):
    query, key, value = qkv(q_len=6, value_dim=3, dtype=dtype)
    out, aux = flex_attention(query, key, value, return_aux=AuxRequest(lse=True, max_scores=True))
    assert out.dtype == dtype and out.shape == (2, 4, 6, 3) and out.is_contiguous()
    for stat in aux:
        assert stat.dtype == torch.float32 and stat.shape == (2, 4, 6)
    ref_out, _, _ = naive(query.double(), key.double(), value.double())
    torch.testing.assert_close(out.double(), ref_out, atol={torch.float32: 1e-6}.get(dtype, 2e-2), rtol=0)


def test_gradients_reach_inputs_closures_and_lse():
    query, key, value = qkv(q_len=12, kv_heads=2, requires_grad=True)
    head_scale = torch.tensor([1.0, 0.5, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    bias_table = randn(25, seed=7, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * head_scale[h] + bias_table[q_idx - kv_idx + 12]

    mask = create_block_mask(causal, None, None, 12, 12, device="cpu", BLOCK_SIZE=4)
    out, aux = flex_attention(query, key, value, score_mod=score_mod, block_mask=mask, enable_gqa=True,
                              return_aux=AuxRequest(lse=True, max_scores=True))
    assert aux.lse.requires_grad and not aux.max_scores.requires_grad
    grad_out, grad_lse = randn(*out.shape, seed=8), randn(*aux.lse.shape, seed=9)
    leaves = (query, key, value, head_scale, bias_table)
    got = torch.autograd.grad((out * grad_out).sum() + (aux.lse * grad_lse).sum(), leaves)

    def reference_score_mod(score, b, h, q_idx, kv_idx):
        return score * head_scale[h.long()] + bias_table[(q_idx - kv_idx + 12).long()]

    ref_out, ref_lse, _ = naive(query, key, value, reference_score_mod, causal)
    want = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse * grad_lse).sum(), leaves)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)  # lse is float32 by contract


def test_fully_masked_rows():
    query, key, value = qkv(q_len=8, requires_grad=True)

    def later_half_sees_nothing(b, h, q_idx, kv_idx):
        return (q_idx < 4) & (kv_idx <= q_idx)

    mask = create_block_mask(later_half_sees_nothing, None, None, 8, 8, device="cpu", BLOCK_SIZE=4)
    out, aux = flex_attention(query, key, value, block_mask=mask, return_aux=AuxRequest(lse=True))
    assert (out[:, :, 4:] == 0).all() and torch.isneginf(aux.lse[:, :, 4:]).all()
    out.sum().backward()
    assert (query.grad[:, :, 4:] == 0).all()
    assert not any(t.grad.isnan().any() for t in (query, key, value))


# ---------------------------------------------------------------------------------------
# outputs: return_lse, return_aux
# ---------------------------------------------------------------------------------------
def test_return_lse_is_deprecated_and_warns_once(monkeypatch):
    monkeypatch.setattr(api, "_warned_return_lse", False)
    query, key, value = qkv(q_len=4)
    with pytest.warns(FutureWarning, match="return_lse is deprecated"):
        out, lse = flex_attention(query, key, value, return_lse=True)
    _, ref_lse, _ = naive(query, key, value)
    torch.testing.assert_close(lse, ref_lse.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flex_attention(query, key, value, return_lse=True)


@pytest.mark.parametrize("request_lse, request_max", [(False, False), (True, False), (False, True), (True, True)])
def test_return_aux_combinations(request_lse, request_max):
    query, key, value = qkv(q_len=5)
    out, aux = flex_attention(query, key, value, return_aux=AuxRequest(lse=request_lse, max_scores=request_max))
    assert isinstance(aux, AuxOutput) and isinstance(out, torch.Tensor)
    _, ref_lse, ref_max = naive(query, key, value)
    assert (aux.lse is None) == (not request_lse) and (aux.max_scores is None) == (not request_max)
    if request_lse:
        torch.testing.assert_close(aux.lse, ref_lse.float())
    if request_max:
        torch.testing.assert_close(aux.max_scores, ref_max.float())


def test_return_lse_and_return_aux_together_is_an_error():
    query, key, value = qkv(q_len=4)
    with pytest.raises(ValueError, match="Cannot specify both return_lse and return_aux"):
        flex_attention(query, key, value, return_lse=True, return_aux=AuxRequest(lse=True))


# ---------------------------------------------------------------------------------------
# what reaches the operator
# ---------------------------------------------------------------------------------------
@pytest.fixture
def operator_calls(monkeypatch):
    calls = []
    real = api.inductor_flex_attention

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(api, "inductor_flex_attention", spy)
    return calls


def test_kernel_options_are_copied_upper_cased_and_flagged(operator_calls):
    query, key, value = qkv(q_len=4)
    options = {"block_m": 64, "fwd_num_warps": 4, "PRESCALE_QK": True}
    frozen = dict(options)
    flex_attention(query, key, value, kernel_options=options, return_aux=AuxRequest(max_scores=True))
    assert options == frozen
    passed = operator_calls[-1][6]
    assert passed is not options
    # No block mask: the keep-all mask flex_attention builds carries the "full" pattern.
    assert passed == {"BLOCK_M": 64, "FWD_NUM_WARPS": 4, "PRESCALE_QK": True,
                      "OUTPUT_LOGSUMEXP": False, "OUTPUT_MAX": True, "MASK_PATTERN": "full"}


@pytest.mark.parametrize("requires_grad, return_lse, expected", [(False, False, False), (True, False, True),
                                                                 (False, True, True)])
def test_output_logsumexp_flag(operator_calls, requires_grad, return_lse, expected):
    query, key, value = qkv(q_len=4, requires_grad=requires_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        flex_attention(query, key, value, return_lse=return_lse)
    assert operator_calls[-1][6]["OUTPUT_LOGSUMEXP"] is expected
    assert operator_calls[-1][6]["OUTPUT_MAX"] is False


def test_defaults_reaching_the_operator(operator_calls):
    query, key, value = qkv(batch=1, heads=2, q_len=300, kv_len=200, dim=16)
    flex_attention(query, key, value)
    (_, _, _, score_mod, block_mask, scale, _, score_buffers, mask_buffers) = operator_calls[-1]
    assert scale == pytest.approx(0.25) and score_buffers == () and mask_buffers == ()
    score = torch.tensor(1.5, dtype=torch.float64)
    assert score_mod(score, *[torch.tensor(0)] * 4) is score
    q_len, kv_len, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx, qb, kb, mask_mod = block_mask
    assert (q_len, kv_len, qb, kb) == (300, 200, 128, 128)
    # Every KV block is full for every query block (and vice versa); nothing is partial.
    assert kv_num.tolist() == [[[0, 0, 0]]] and full_num.tolist() == [[[2, 2, 2]]]
    assert full_idx.shape == (1, 1, 3, 2) and full_idx[0, 0, :, :2].tolist() == [[0, 1]] * 3
    assert q_num.tolist() == [[[0, 0]]] and full_q_num.tolist() == [[[3, 3]]]
    assert full_q_idx[0, 0].tolist() == [[0, 1, 2]] * 2 and kv_idx.shape == (1, 1, 3, 2)


def test_explicit_scale_reaches_the_operator(operator_calls):
    query, key, value = qkv(q_len=4)
    out = flex_attention(query, key, value, scale=2)
    assert operator_calls[-1][5] == 2
    torch.testing.assert_close(out, naive(query, key, value, scale=2)[0], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _mask(q_len, kv_len, batch=None, heads=None, device="cpu"):
    return create_block_mask(causal, batch, heads, q_len, kv_len, device=device, BLOCK_SIZE=4)


def _bad_inputs():
    q, k, v = qkv(q_len=8)
    f16 = k.half()
    return [
        ("dtype", (q, f16, v), {}, ValueError, "Expected query, key, and value to have the same dtype"),
        ("device", (q, k.to("meta"), v), {}, ValueError,
         "Expected query, key, and value to have the same device type"),
        ("not 4-D", (q[0], k[0], v[0]), {}, NotImplementedError, "query, key, and value must be 4D tensors"),
        ("not a tensor", (q.tolist(), k, v), {}, ValueError, "query must be a torch.Tensor"),
        ("integer dtype", (q.long(), k.long(), v.long()), {}, ValueError, "must be floating point"),
        ("batch", (q, k[:, :, :, :][[0, 0, 1]], v[[0, 0, 1]]), {}, ValueError,
         "same batch size .*Bq=2 and Bkv=3"),
        ("key/value mismatch", (q, k, v[:, :, :5]), {}, ValueError, "key and value to have the same"),
        ("heads without gqa", (q, k[:, :2], v[:, :2]), {}, ValueError,
         "same number of heads but got Hq=4 and Hkv=2. Try setting enable_gqa=True"),
        ("gqa not divisible", (q, k[:, :3], v[:, :3]), {"enable_gqa": True}, ValueError,
         "multiple of kv heads for GQA but got Hq=4 and Hkv=3"),
        ("head dims", (q, k[..., :4], v), {}, ValueError, "same embedding dimension but got E=8 and E=4"),
        ("scale", (q, k, v), {"scale": "0.5"}, ValueError, "scale must be a number"),
        ("scale tensor", (q, k, v), {"scale": torch.tensor(0.5)}, ValueError, "scale must be a number"),
        ("kernel_options", (q, k, v), {"kernel_options": [("BLOCK_M", 64)]}, ValueError,
         "kernel_options must be a dict"),
        ("reserved option", (q, k, v), {"kernel_options": {"output_max": True}}, ValueError,
         "must not set output_max"),
        ("duplicate option", (q, k, v), {"kernel_options": {"block_m": 32, "BLOCK_M": 64}}, ValueError,
         "sets BLOCK_M twice"),
        ("score_mod", (q, k, v), {"score_mod": 3}, ValueError, "score_mod must be callable"),
        ("return_aux", (q, k, v), {"return_aux": True}, ValueError, "return_aux must be an AuxRequest"),
        ("block_mask type", (q, k, v), {"block_mask": causal}, ValueError, "block_mask must be a BlockMask"),
        ("block_mask longer", (q, k, v), {"block_mask": _mask(12, 8)}, ValueError,
         "block_mask was created for Q_LEN=12 and KV_LEN=8 but got q_len=8 and kv_len=8"),
        ("block_mask shorter", (q, k, v), {"block_mask": _mask(8, 4)}, ValueError,
         "block_mask was created for Q_LEN=8 and KV_LEN=4"),
        ("block_mask batch", (q, k, v), {"block_mask": _mask(8, 8, batch=3)}, ValueError,
         "block_mask has batch size 3 and 1 heads, which do not broadcast"),
        ("block_mask heads", (q, k, v), {"block_mask": _mask(8, 8, heads=2)}, ValueError,
         "block_mask has batch size 1 and 2 heads"),
        ("block_mask device", (q, k, v), {"block_mask": _mask(8, 8).to("meta")}, RuntimeError,
         "Expect q/k/v and block_mask to be on the same device"),
    ]


@pytest.mark.parametrize("name, args, kwargs, error, message", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_validation_errors(name, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        flex_attention(*args, **kwargs)


def test_block_mask_with_wrong_block_count():
    query, key, value = qkv(q_len=8)
    good = _mask(8, 8)
    bad = BlockMask.from_kv_blocks(good.kv_num_blocks[..., :1], good.kv_indices[..., :1, :],
                                   BLOCK_SIZE=4, mask_mod=causal, seq_lengths=(8, 8))
    with pytest.raises(ValueError, match=r"do not describe Q_LEN=8, KV_LEN=8 in blocks of 4 x 4 \(2 query blocks\)"):
        flex_attention(query, key, value, block_mask=bad)


def test_nested_tensors_are_rejected():
    nested = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)], layout=torch.jagged)
    with pytest.raises(NotImplementedError, match="does not support nested tensors"):
        flex_attention(nested, nested, nested)


def test_kv_batch_one_broadcasts_without_block_mask():
    query, key, value = qkv(q_len=6, kv_batch=1)
    out = flex_attention(query, key, value)
    torch.testing.assert_close(out, naive(query, key, value)[0], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------
# debugging mods
# ---------------------------------------------------------------------------------------
def test_debug_mods_run_on_plain_scalars(monkeypatch, capsys):
    query, key, value = qkv(batch=1, heads=2, q_len=3, kv_len=4)
    seen = []

    def score_mod(score, b, h, q_idx, kv_idx):
        seen.append((score, b, h, q_idx, kv_idx))
        # Formatting a tensor as a number fails under vmap; in debug mode it just works.
        print(f"h={h} q={q_idx} kv={kv_idx}")
        return score * 0.5 + q_idx

    def mask_mod(b, h, q_idx, kv_idx):
        seen.append((b, h, q_idx, kv_idx))
        return kv_idx <= q_idx + 1

    mask = create_block_mask(mask_mod, None, None, 3, 4, device="cpu", BLOCK_SIZE=2)
    expected = naive(query, key, value, lambda s, b, h, q, kv: s * 0.5 + q, mask_mod)[0]
    seen.clear()
    monkeypatch.setattr(api, "DEBUG_MODS", True)
    out = flex_attention(query, key, value, score_mod=score_mod, block_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    # Every call saw unbatched 0-d tensors, and score_mod ran at every position.
    assert all(t.dim() == 0 and not torch._C._functorch.is_batchedtensor(t) for call in seen for t in call)
    positions = {tuple(int(t) for t in call[2:]) for call in seen if len(call) == 5}
    assert positions == {(h, q, kv) for h in range(2) for q in range(3) for kv in range(4)}
    printed = capsys.readouterr().out
    assert "h=1 q=2 kv=3" in printed and "BatchedTensor" not in printed


# ---------------------------------------------------------------------------------------
# Dynamo traces the api (validation and defaults use only shapes, dtypes and devices)
# ---------------------------------------------------------------------------------------
def test_api_traces_in_one_graph():
    query, key, value = qkv(batch=2, heads=4, q_len=16, kv_heads=2, dtype=torch.float32)
    bias = randn(4, dtype=torch.float32, seed=5)
    mask = create_block_mask(causal, None, None, 16, 16, device="cpu", BLOCK_SIZE=8)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h]

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(query, key, value, enable_gqa=True),
                               flex_attention(query, key, value, enable_gqa=True), atol=1e-6, rtol=0)
    request = dict(score_mod=score_mod, block_mask=mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
    got_out, got_aux = compiled(query, key, value, **request)
    want_out, want_aux = flex_attention(query, key, value, **request)
    torch.testing.assert_close(got_out, want_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_aux.lse, want_aux.lse, atol=1e-6, rtol=0)
    assert got_aux.max_scores is None


def test_unknown_kernel_option_warns_naming_it_and_known_ones_do_not():
    import warnings

    from inductor_flex import FlexKernelOptions

    q = torch.randn(1, 1, 8, 4)
    with pytest.warns(UserWarning, match="unknown kernel option 'BLOCK_Q'"):
        flex_attention(q, q, q, kernel_options={"BLOCK_Q": 64})
    # Every declared key (and its pass-prefixed, any-case spelling) is accepted silently.
    options = {key: 1 for key in FlexKernelOptions.__annotations__}
    options.update(BACKEND="AUTO", FORCE_USE_FLEX_ATTENTION=False)  # values checked elsewhere
    options.update({"bwd_USE_TMA": False, "fwd_prescale_qk": False})
    options["approx_tanh"] = options.pop("APPROX_TANH")  # any case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flex_attention(q, q, q, kernel_options=options)
    assert {"APPROX_TANH", "WARP_SPECIALIZE", "EARLY_DP"} <= set(FlexKernelOptions.__annotations__)
