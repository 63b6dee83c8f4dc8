"""Vendor SDPA candidates on the CPU: the block mask's pattern tag (set only where proven,
dropped by every change), how it reaches the operator, the pure dispatch decisions
(lowering/vendor.py), BACKEND="TRITON" skipping the vendors, and the lse conversion."""
import math

import pytest
import torch

import inductor_flex.api as api
from inductor_flex import BlockMask, and_masks, create_block_mask, flex_attention, noop_mask
from inductor_flex._mask_patterns import CAUSAL, FULL, PATTERN_KEY, traces_to_causal
from inductor_flex.lowering import dispatch, vendor
from inductor_flex.masks import causal_mask, generate_causal_mask, generate_sliding_window_mask

CPU = torch.device("cpu")


def _mask(mask_mod, q_len=256, kv_len=256, B=None, H=None, **kwargs):
    return create_block_mask(mask_mod, B, H, q_len, kv_len, device=CPU, BLOCK_SIZE=64, **kwargs)


def causal_reversed(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


# --- the tag ------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_mod, q_len, kv_len, expected", [
    (causal_mask, 256, 256, CAUSAL),
    (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 256, 256, CAUSAL),
    (causal_reversed, 192, 192, CAUSAL),
    (noop_mask, 256, 256, FULL),
    (noop_mask, 256, 100, FULL),       # keeping everything needs no alignment
    (causal_mask, 256, 128, None),     # Q_LEN != KV_LEN: alignments differ
    (causal_mask, 128, 256, None),
    (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx - 1, 256, 256, None),  # near-causal
    (lambda b, h, q_idx, kv_idx: q_idx > kv_idx, 256, 256, None),       # strict
    (lambda b, h, q_idx, kv_idx: kv_idx >= q_idx, 256, 256, None),      # anti-causal
    (lambda b, h, q_idx, kv_idx: q_idx >= 0, 256, 256, None),
    (generate_causal_mask(offset=0), 256, 256, None),   # not proven (arithmetic on q_idx)
    (generate_causal_mask(offset=64), 256, 256, None),  # another alignment
    (and_masks(causal_mask), 256, 256, None),
    (generate_sliding_window_mask(64), 256, 256, None),
], ids=["causal_mask", "lambda", "kv<=q", "noop", "noop-ragged", "causal-q>kv", "causal-q<kv",
        "near", "strict", "anti", "const", "offset0", "offset64", "and_masks", "window"])
def test_pattern_is_set_only_where_proven(mask_mod, q_len, kv_len, expected):
    assert _mask(mask_mod, q_len, kv_len)._proven_pattern() == expected


def test_pattern_survives_batch_head_dims_and_unseparated_full_blocks():
    assert _mask(causal_mask, B=2, H=3)._proven_pattern() == CAUSAL
    assert _mask(causal_mask, separate_full_blocks=False)._proven_pattern() == CAUSAL


def test_only_the_exact_body_is_proven_and_the_mod_is_never_called():
    calls = []

    def counted(b, h, q_idx, kv_idx):
        calls.append(1)
        return q_idx >= kv_idx

    def branchy(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx if q_idx else q_idx >= kv_idx

    def torch_function(b, h, q_idx, kv_idx):
        return torch.ge(q_idx, kv_idx)

    def renamed(batch, head, row, col):
        return row >= col

    def swapped_names(b, h, kv_idx, q_idx):  # the third parameter is the query index
        return q_idx >= kv_idx

    assert not any(traces_to_causal(m) for m in (counted, branchy, torch_function, swapped_names))
    assert traces_to_causal(renamed) and not calls


@pytest.mark.parametrize("change", ["getitem", "getitem-batch", "adjust", "from_kv_blocks",
                                    "pytree", *BlockMask._MEANING_FIELDS])
def test_every_change_drops_the_pattern(change):
    mask = _mask(causal_mask, B=2)
    if change == "getitem":
        derived = mask[:, :, :2]
    elif change == "getitem-batch":
        derived = mask[0]
    elif change == "adjust":
        derived = mask._adjust(128, 128)
    elif change == "from_kv_blocks":
        derived = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                           mask.full_kv_indices, BLOCK_SIZE=64, mask_mod=causal_mask,
                                           seq_lengths=(256, 256))
    elif change == "pytree":
        leaves, spec = torch.utils._pytree.tree_flatten(mask)
        derived = torch.utils._pytree.tree_unflatten(leaves, spec)
    else:
        derived = mask
        setattr(mask, change, getattr(mask, change))  # even the same value: a hand edit
    assert derived._proven_pattern() is None


@pytest.mark.parametrize("field", BlockMask._BLOCK_LIST_FIELDS)
def test_an_in_place_edit_drops_the_pattern(field):
    mask = _mask(causal_mask)
    getattr(mask, field)[..., 0] += 0
    assert mask._proven_pattern() is None
    assert mask.to(CPU)._proven_pattern() is None


def test_to_keeps_the_pattern_and_other_attributes_do_not_drop_it():
    mask = _mask(causal_mask)
    assert mask.to(CPU)._proven_pattern() == CAUSAL
    mask.dq_kv_order_spt = True  # write-order metadata: no change of meaning
    assert mask._proven_pattern() == CAUSAL


# --- the pattern reaches the operator --------------------------------------------------------

@pytest.fixture
def operator_options(monkeypatch):
    seen = []
    real = api.inductor_flex_attention

    def spy(*args):
        seen.append(dict(args[6]))
        return real(*args)

    monkeypatch.setattr(api, "inductor_flex_attention", spy)
    return seen


def _qkv(q_len=256):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, q_len, 16, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_operator_gets_the_pattern_of_proven_masks_only(operator_options, compiled):
    torch._dynamo.reset()
    fn = torch.compile(flex_attention, backend="eager", fullgraph=True) if compiled else flex_attention
    q, k, v = _qkv()
    fn(q, k, v, block_mask=_mask(causal_mask))
    assert operator_options[-1][PATTERN_KEY] == CAUSAL
    fn(q, k, v)
    assert operator_options[-1][PATTERN_KEY] == FULL
    fn(q, k, v, block_mask=_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx - 1))
    assert PATTERN_KEY not in operator_options[-1]
    edited = _mask(causal_mask)
    edited.kv_indices = edited.kv_indices.clone()
    fn(q, k, v, block_mask=edited)  # compiled: a guard on the tag recompiles
    assert PATTERN_KEY not in operator_options[-1]


def test_a_mask_built_inside_a_compiled_function_is_tagged(operator_options):
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def attend(q, k, v):
        return flex_attention(q, k, v, block_mask=create_block_mask(causal_mask, None, None, 256, 256,
                                                                    device=CPU))

    attend(*_qkv())
    assert operator_options[-1][PATTERN_KEY] == CAUSAL


@pytest.mark.parametrize("key", ["MASK_PATTERN", "mask_pattern"])
def test_users_cannot_set_the_pattern(key):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="kernel_options must not set"):
        flex_attention(q, k, v, kernel_options={key: "causal"})


def test_tagged_calls_compiled_on_cpu_take_the_exact_path():
    torch._dynamo.reset()
    q, k, v = _qkv()
    mask = _mask(causal_mask)
    out = torch.compile(flex_attention)(q, k, v, block_mask=mask)
    torch.testing.assert_close(out, flex_attention(q, k, v, block_mask=mask))


# --- dispatch decisions ------------------------------------------------------------------------

def _call(**changes):
    base = dict(pattern=CAUSAL, has_score_mod=False, num_buffers=0, dtype=torch.bfloat16,
                qk_head_dim=128, v_head_dim=128, same_kv_batch=True, equal_lengths=True)
    return vendor.VendorCall(**{**base, **changes})


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"pattern": FULL, "equal_lengths": False}, None),
    ({"dtype": torch.float16, "qk_head_dim": 64, "v_head_dim": 64}, None),
    ({"pattern": None}, "no proven full / causal pattern"),
    ({"equal_lengths": False}, "causal needs Q_LEN == KV_LEN"),
    ({"has_score_mod": True}, "a score_mod"),
    ({"num_buffers": 1}, "captured buffers"),
    ({"dtype": torch.float32}, "float16 / bfloat16 only"),
    ({"v_head_dim": 64}, "head dims differ"),
    ({"qk_head_dim": 60, "v_head_dim": 60}, "head dim 60: no vendor"),
    ({"qk_head_dim": 512, "v_head_dim": 512}, "head dim 512: no vendor"),
    ({"same_kv_batch": False}, "batch broadcasts"),
    ({"same_heads": False}, None),
    ({"same_heads": False, "backward": True}, "GQA: the vendor backwards"),
])
def test_declined_reasons(changes, reason):
    got = vendor.declined_reason(_call(**changes))
    assert got is None if reason is None else reason in got


def test_usable_vendors_by_head_dim():
    assert vendor.usable_vendors(torch.bfloat16, 128) == ("cudnn", "flash")
    assert vendor.usable_vendors(torch.float16, 256) == ("flash",)
    assert vendor.usable_vendors(torch.bfloat16, 72) == ("cudnn", "flash")
    assert vendor.usable_vendors(torch.float32, 64) == ()


@pytest.mark.parametrize("capability, dtype, head_dim, expected", [
    ((9, 0), torch.bfloat16, 128, "cudnn"),
    ((9, 0), torch.float16, 64, "cudnn"),
    ((9, 0), torch.bfloat16, 96, None),   # not measured: ours
    ((8, 0), torch.bfloat16, 128, None),  # not measured: ours
    ((10, 0), torch.bfloat16, 128, None),
    ((9, 0), torch.float32, 128, None),
])
@pytest.mark.parametrize("backward", [False, True])
def test_default_rule(capability, dtype, head_dim, expected, backward):
    assert vendor.default_vendor(capability, dtype, head_dim, backward=backward) == expected


def test_vendor_candidates_come_before_the_fused_kernels_and_only_for_auto():
    # (The short-query decode kernel stands before them: it serves calls they never do.)
    for candidates in (dispatch.FORWARD, dispatch.BACKWARD):
        names = [c.lowering for c in candidates]
        vendor = next(c for c in candidates if c.lowering.startswith("vendor."))
        fused = next(i for i, name in enumerate(names) if name.startswith(("forward.", "backward.")))
        assert names.index(vendor.lowering) < fused
        assert vendor.backends == ("AUTO",) and vendor.devices == ("cuda",)


def test_triton_backend_never_tries_the_vendor():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError) as error:
        torch.compile(flex_attention)(q, k, v, block_mask=_mask(causal_mask),
                                      kernel_options={"BACKEND": "TRITON"})
    reasons = str(error.value).split("cannot serve this call: ")[1].splitlines()[0]
    assert reasons == "fused Triton forward: compiles for cuda, not cpu"


# --- lse conversion ---------------------------------------------------------------------------

def test_lse_conversion_layouts_and_round_trip():
    ours = torch.randn(2, 3, 5)
    ops = dict(multiply=torch.mul)
    cudnn_lse = vendor.lse_from_ours("cudnn", ours, unsqueeze=lambda x: x.unsqueeze(-1), **ops)
    assert cudnn_lse.shape == (2, 3, 5, 1)
    assert torch.equal(vendor.lse_to_ours("cudnn", cudnn_lse, squeeze=lambda x: x.squeeze(-1), **ops), ours)
    flash_lse = vendor.lse_from_ours("flash", ours, unsqueeze=lambda x: x.unsqueeze(-1), **ops)
    assert flash_lse is ours
    assert vendor.lse_to_ours("flash", ours, squeeze=lambda x: x.squeeze(-1), **ops) is ours


def test_lse_conversion_of_a_base_2_vendor(monkeypatch):
    monkeypatch.setitem(vendor.LSE_LAYOUTS, "flash", vendor.LseLayout(trailing_unit_dim=False, log_base=2.0))
    scores = torch.randn(4, 7, dtype=torch.float64)
    natural = scores.logsumexp(-1)
    base2 = natural / math.log(2.0)
    converted = vendor.lse_to_ours("flash", base2, squeeze=None, multiply=torch.mul)
    torch.testing.assert_close(converted, natural)
    back = vendor.lse_from_ours("flash", natural, unsqueeze=None, multiply=torch.mul)
    torch.testing.assert_close(back, base2)
