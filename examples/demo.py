"""inductor_flex in one page: masks, score mods, eager and compiled attention.

On a machine without a GPU it runs small CPU sizes; on a GPU, full sizes with timings.
    python examples/demo.py
"""
import time

import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.masks import causal_mask, generate_sliding_window_mask, generate_tanh_softcap

on_gpu = torch.cuda.is_available()
device = "cuda" if on_gpu else "cpu"
dtype = torch.bfloat16 if on_gpu else torch.float32
B, H, S, D = (4, 16, 8192, 128) if on_gpu else (2, 4, 512, 64)
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))


def reference(q, k, v, mask, score_mod=None):
    """Exact attention in float64 with a dense mask (small sizes only)."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / D**0.5
    if score_mod is not None:
        scores = score_mod(scores, None, None, None, None)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def timed(fn, *args, **kwargs):
    fn(*args, **kwargs)  # warm-up (compiles when fn is compiled)
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if on_gpu:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


compiled = torch.compile(flex_attention)
cases = {
    "causal": (causal_mask, None),
    "sliding window 256": (generate_sliding_window_mask(256, causal=True), None),
    "causal + tanh softcap 30": (causal_mask, generate_tanh_softcap(30.0)),
}
print(f"device={device} dtype={dtype} B={B} H={H} S={S} D={D}")
for name, (mask_mod, score_mod) in cases.items():
    block_mask = create_block_mask(mask_mod, None, None, S, S, device=device)
    out_eager, t_eager = timed(flex_attention, q, k, v, score_mod=score_mod, block_mask=block_mask)
    out_compiled, t_compiled = timed(compiled, q, k, v, score_mod=score_mod, block_mask=block_mask)
    line = f"{name:26s} sparsity {block_mask.sparsity():5.1f}%  eager {t_eager * 1e3:8.2f} ms  compiled {t_compiled * 1e3:8.2f} ms"
    if not on_gpu:
        qi = torch.arange(S).view(-1, 1)
        ki = torch.arange(S).view(1, -1)
        dense_mask = mask_mod(0, 0, qi, ki)
        ref = reference(q, k, v, dense_mask, (lambda s, *_: score_mod(s, 0, 0, 0, 0)) if score_mod else None)
        err = (out_compiled.double() - ref).abs().max().item()
        line += f"  max |compiled - float64| {err:.2e}"
    print(line)
