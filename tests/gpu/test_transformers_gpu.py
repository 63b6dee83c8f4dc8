"""transformers integration on the GPU: tiny bf16 models whose forward is compiled, so every
attention layer runs the fused Triton kernels, against transformers' eager attention in bf16.

bf16 logits of two implementations differ by rounding, so the rule is the one the kernel
tests use: our error against a float32 eager reference at most a small multiple of eager
bf16's own error. Sequences are long enough (256 tokens, 128-token blocks) for the sliding
windows to skip whole blocks.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from inductor_flex.integrations.transformers import register  # noqa: E402

ATTENTION = register("inductor_flex")
SEQ_LEN = 256
SLIDING_WINDOW = 64
_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=1024, initializer_range=0.3)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_SIZES),
    "mistral": lambda: transformers.MistralConfig(**_SIZES, sliding_window=SLIDING_WINDOW),
    "gemma2": lambda: transformers.Gemma2Config(**_SIZES, sliding_window=SLIDING_WINDOW,
                                                attn_logit_softcapping=2.0, query_pre_attn_scalar=16),
}


def models(name, device):
    """float32 eager reference, bf16 eager, bf16 ours (same weights)."""
    torch.manual_seed(0)
    config = CONFIGS[name]()

    def build(implementation):
        return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                             attn_implementation=implementation)

    reference, eager_bf16, ours = build("eager"), build("eager"), build(ATTENTION)
    for model in (eager_bf16, ours):
        model.load_state_dict(reference.state_dict())
    return (reference.to(device).eval(), eager_bf16.to(device, torch.bfloat16).eval(),
            ours.to(device, torch.bfloat16).eval())


def inputs(device, batch=2, pad=37):
    ids = torch.randint(0, _SIZES["vocab_size"], (batch, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(batch, SEQ_LEN, dtype=torch.long)
    attention_mask[1, :pad] = 0
    return ids.to(device), attention_mask.to(device)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_bf16_logits_match_eager(name, device):
    reference, eager_bf16, ours = models(name, device)
    ids, attention_mask = inputs(device)
    kept = attention_mask.bool()
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        expected = reference(ids, attention_mask=attention_mask, use_cache=False).logits[kept]
        eager_error = (eager_bf16(ids, attention_mask=attention_mask, use_cache=False).logits[kept].float()
                       - expected).abs().max().item()
        our_error = (compiled(ids, attention_mask=attention_mask, use_cache=False).logits[kept].float()
                     - expected).abs().max().item()
    assert our_error <= 2.0 * eager_error + 1e-2, (our_error, eager_error)


def test_compiled_bf16_generation_matches_eager(device):
    # Greedy decoding through the cache with a compiled forward: the first new tokens
    # follow the same argmax as eager bf16.
    _, eager_bf16, ours = models("mistral", device)
    ids, attention_mask = inputs(device)
    ours.forward = torch.compile(ours.forward, fullgraph=True)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = eager_bf16.generate(ids, **kwargs)
        got = ours.generate(ids, **kwargs)
    assert torch.equal(got, expected)
