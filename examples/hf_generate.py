"""Generate with a Hugging Face transformers model whose attention runs through inductor_flex.

A tiny Mistral-style model (sliding-window attention, grouped-query heads) is built from a
config with random weights, so nothing is downloaded and the tokens are nonsense; the point
is the plumbing and the speed. Greedy decoding for a batch of prompts, one left-padded,
with our attention and with transformers' sdpa, then tokens/s for each.

    pip install -e ".[transformers]"
    python examples/hf_generate.py                 # CPU, or the GPU if there is one
    python examples/hf_generate.py --compile       # torch.compile the forward too
"""
import argparse
import copy
import time

import torch
import transformers

from inductor_flex.integrations.transformers import register


def tiny_mistral_config(hidden_size: int, layers: int) -> transformers.MistralConfig:
    return transformers.MistralConfig(
        vocab_size=1024, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=4096, sliding_window=256)


def generate(model, prompts, attention_mask, new_tokens: int):
    """(generated tokens, seconds), after one untimed warm-up run (compilation, caches)."""
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompts, **kwargs)
        if prompts.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = model.generate(prompts, **kwargs)
        if prompts.device.type == "cuda":
            torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    args = parser.parse_args()

    attention = register("inductor_flex")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = tiny_mistral_config(args.hidden_size, args.layers)
    torch.manual_seed(0)
    # Each model gets its own config: layers read the attention implementation from it.
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attention)
    sdpa = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    sdpa.load_state_dict(ours.state_dict())
    ours, sdpa = (model.to(args.device, dtype).eval() for model in (ours, sdpa))
    if args.compile:
        ours.forward = torch.compile(ours.forward)

    prompts = torch.randint(1, config.vocab_size, (args.batch, args.prompt_len), device=args.device)
    attention_mask = torch.ones_like(prompts)
    attention_mask[0, : args.prompt_len // 4] = 0  # the first prompt is left-padded

    print(f"tiny Mistral ({args.layers} layers, hidden {args.hidden_size}, sliding window "
          f"{config.sliding_window}) on {args.device} in {dtype}; batch {args.batch}, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens each")
    results = {}
    for name, model in (("inductor_flex" + (" (compiled)" if args.compile else ""), ours), ("sdpa", sdpa)):
        tokens, seconds = generate(model, prompts, attention_mask, args.new_tokens)
        results[name] = tokens
        print(f"  {name:24s} {args.batch * args.new_tokens / seconds:8.1f} tokens/s  ({seconds:.2f} s)")
    ours_tokens, sdpa_tokens = results.values()
    same = (ours_tokens == sdpa_tokens).all(dim=1)
    print(f"  same tokens as sdpa in {int(same.sum())} of {args.batch} sequences")
    print(f"  first sequence's new tokens: {ours_tokens[0, args.prompt_len:].tolist()}")


if __name__ == "__main__":
    main()
