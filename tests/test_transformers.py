"""transformers integration (inductor_flex.integrations.transformers): tiny models built from
configs in code (random weights, nothing downloaded) give the same logits and generated
tokens with attn_implementation="inductor_flex" as with transformers' own "sdpa", or "eager"
where sdpa lacks the feature (soft-capping, sinks).

The weights are drawn with a large initializer_range so that attention is sharp: with the
default 0.02 the scores are so small that a missing mask or soft-cap barely moves the
logits.
"""
import copy
import subprocess
import sys

import pytest
import torch
import torch._dynamo

transformers = pytest.importorskip("transformers")

from inductor_flex.integrations.transformers import register  # noqa: E402

ATTENTION = register("inductor_flex")
TOLERANCE = 1e-4
SEQ_LEN = 40
SLIDING_WINDOW = 8  # well below SEQ_LEN, so sliding layers mask for real

_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, initializer_range=0.3)


def llama_config():
    return transformers.LlamaConfig(**_SIZES)


def mistral_config():
    return transformers.MistralConfig(**_SIZES, sliding_window=SLIDING_WINDOW)


def gemma2_config():
    # Alternating sliding / full layers, scores soft-capped at 2 (sharp enough to matter).
    return transformers.Gemma2Config(**_SIZES, sliding_window=SLIDING_WINDOW,
                                     attn_logit_softcapping=2.0, query_pre_attn_scalar=16)


def gpt_oss_config():
    return transformers.GptOssConfig(**{**_SIZES, "intermediate_size": 64}, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=SLIDING_WINDOW,
                                     layer_types=["sliding_attention", "full_attention"])


CONFIGS = {  # name -> (config, the reference implementation)
    "llama": (llama_config, "sdpa"),
    "mistral": (mistral_config, "sdpa"),
    "gemma2": (gemma2_config, "eager"),
}


def model_pair(make_config, reference):
    """(reference model, our model) with the same weights. Each gets its own config copy:
    the layers read the attention implementation from the config at call time."""
    torch.manual_seed(0)
    config = make_config()
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=ATTENTION)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def tokens(batch=2, length=SEQ_LEN, seed=1):
    return torch.randint(0, _SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(batch=2, length=SEQ_LEN, pad=7):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :pad] = 0
    return mask


def assert_close_where_kept(ref, ours, attention_mask=None):
    # Logits at padding positions are whatever each implementation makes of a row that
    # keeps nothing; only the real tokens' logits are compared.
    if attention_mask is not None:
        ref, ours = ref[attention_mask.bool()], ours[attention_mask.bool()]
    torch.testing.assert_close(ours, ref, atol=TOLERANCE, rtol=TOLERANCE)


def test_importing_the_package_does_not_import_transformers():
    code = "import sys, inductor_flex; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_logits_match_reference(name, padded):
    ref, ours = model_pair(*CONFIGS[name])
    attention_mask = left_padded() if padded else None
    with torch.no_grad():
        expected = ref(tokens(), attention_mask=attention_mask).logits
        got = ours(tokens(), attention_mask=attention_mask).logits
    assert_close_where_kept(expected, got, attention_mask)


def test_the_model_runs_through_our_attention(monkeypatch):
    from inductor_flex import BlockMask
    from inductor_flex.integrations import transformers as integration

    masks, calls = [], []
    monkeypatch.setitem(transformers.masking_utils.AttentionMaskInterface._global_mapping, ATTENTION,
                        lambda *a, **k: masks.append(integration.block_mask_for(*a, **k)) or masks[-1])
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, ATTENTION,
                        lambda *a, **k: calls.append(1) or integration.attention_forward(*a, **k))
    _, ours = model_pair(*CONFIGS["gemma2"])
    with torch.no_grad():
        ours(tokens())
    assert len(calls) == _SIZES["num_hidden_layers"]
    assert len(masks) == 2 and all(isinstance(mask, BlockMask) for mask in masks)  # full + sliding


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_reference(name):
    # Prefill with left padding, then 8 decode steps against the cache (sliding layers
    # crop theirs): the same tokens and the same per-step logits.
    ref, ours = model_pair(*CONFIGS[name])
    kwargs = dict(attention_mask=left_padded(), max_new_tokens=8, do_sample=False,
                  return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        expected = ref.generate(tokens(), **kwargs)
        got = ours.generate(tokens(), **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for step_expected, step_got in zip(expected.logits, got.logits):
        torch.testing.assert_close(step_got, step_expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_packed_sequences_attend_within_their_document():
    # position_ids restarting at 0 mark packed documents (no attention_mask, no cache):
    # the second document's logits equal those of running it alone.
    ref, ours = model_pair(*CONFIGS["llama"])
    ids = tokens(batch=1)
    position_ids = torch.cat([torch.arange(15), torch.arange(SEQ_LEN - 15)])[None]
    with torch.no_grad():
        expected = ref(ids, position_ids=position_ids, use_cache=False).logits
        got = ours(ids, position_ids=position_ids, use_cache=False).logits
        alone = ours(ids[:, 15:], use_cache=False).logits
    assert_close_where_kept(expected, got)
    torch.testing.assert_close(got[:, 15:], alone, atol=TOLERANCE, rtol=TOLERANCE)


def test_attention_sinks_match_eager():
    ref, ours = model_pair(gpt_oss_config, "eager")
    with torch.no_grad():
        for layer in ref.model.layers:  # sinks large enough to take a real share of each row
            layer.self_attn.sinks.normal_(0.0, 2.0)
    ours.load_state_dict(ref.state_dict())
    attention_mask = left_padded()
    with torch.no_grad():
        expected = ref(tokens(), attention_mask=attention_mask).logits
        got = ours(tokens(), attention_mask=attention_mask).logits
    assert_close_where_kept(expected, got, attention_mask)


def test_attention_weights_slot_carries_the_log_sum_exp():
    """transformers records the attention function's second output as the layer's
    attentions; ours is each query's log-sum-exp of its (scaled, masked) scores."""
    from inductor_flex import create_block_mask
    from inductor_flex.integrations.transformers import attention_forward

    query, key, value = (torch.randn(2, 4, 24, 16, dtype=torch.float64) for _ in range(3))
    causal = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 24, 24, device="cpu")
    output, lse = attention_forward(None, query, key, value, causal, scaling=0.25)
    scores = (query @ key.transpose(-1, -2) * 0.25).masked_fill(~torch.ones(24, 24).tril().bool(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    torch.testing.assert_close(output, (scores.softmax(-1) @ value).transpose(1, 2))

    # Before the compiled-model test: after a model has been compiled, this transformers
    # version (5.24) recorded no attentions for models built afterwards in the process.
    _, ours = model_pair(*CONFIGS["llama"])
    with torch.no_grad():
        attentions = ours(tokens(), output_attentions=True).attentions
    assert len(attentions) == _SIZES["num_hidden_layers"]
    assert all(a.shape == (2, _SIZES["num_attention_heads"], SEQ_LEN) and a.isfinite().all() for a in attentions)


def test_compiled_model_matches_reference():
    # Gemma 2 covers the most at once: full and sliding layers, soft-capping, GQA, padding.
    # fullgraph: the mask builder and the attention must both trace without a break.
    torch._dynamo.reset()
    ref, ours = model_pair(*CONFIGS["gemma2"])
    compiled = torch.compile(ours, fullgraph=True)
    attention_mask = left_padded()
    with torch.no_grad():
        expected = ref(tokens(), attention_mask=attention_mask, use_cache=False).logits
        got = compiled(tokens(), attention_mask=attention_mask, use_cache=False).logits
    assert_close_where_kept(expected, got, attention_mask)
    torch._dynamo.reset()


def test_dropout_is_refused():
    from inductor_flex.integrations.transformers import attention_forward

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)


def test_mask_builder_compiles_with_symbolic_cache_offsets():
    # While decoding, the cache offsets change every step; compiled with dynamic shapes
    # they are SymInts, and the builder must neither fail on them nor pin their values.
    from transformers.masking_utils import sliding_window_causal_mask_function
    from inductor_flex.integrations.transformers import block_mask_for

    def build(q_length, kv_length, q_offset, kv_offset, padding):
        return block_mask_for(2, q_length, kv_length, q_offset, kv_offset,
                              mask_function=sliding_window_causal_mask_function(SLIDING_WINDOW),
                              attention_mask=padding)

    torch._dynamo.reset()
    compiled = torch.compile(build, dynamic=True, fullgraph=True)
    counter_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for past in (20, 21, 22):
        padding = left_padded(length=past + 1).bool()
        expected = build(1, SLIDING_WINDOW, past, past + 1 - SLIDING_WINDOW, padding).to_dense()
        got = compiled(1, SLIDING_WINDOW, past, past + 1 - SLIDING_WINDOW, padding).to_dense()
        assert torch.equal(got, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - counter_before == 1
    torch._dynamo.reset()

