"""inductor_flex in one page: masks, score mods, eager and compiled attention, a backward
pass and the log-sum-exp (return_aux).

Without a GPU it runs small CPU sizes and checks every result against float64; on a GPU,
full sizes in bfloat16. Times are medians over several calls, after a warm-up call (which
compiles).
    python examples/demo.py            # --small: tiny sizes (what the tests run)
"""
import argparse
import statistics
import sys
import time

# Importing torch and compiling take seconds: say so before doing them.
print("inductor_flex demo: importing torch and inductor_flex ...", flush=True)

import torch  # noqa: E402

from inductor_flex import AuxRequest, create_block_mask, flex_attention  # noqa: E402
from inductor_flex.masks import (  # noqa: E402
    causal_mask,
    generate_sliding_window_mask,
    generate_tanh_softcap,
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes, two timed calls (for tests)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement")
    return parser.parse_args(argv)


def say(message):
    print(message, flush=True)


def median_seconds(fn, reps, sync):
    """Median wall time of ``reps`` calls of ``fn``, after one untimed warm-up call (which
    compiles a compiled fn); returns (last result, seconds)."""
    result = fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def reference(q, k, v, keep, score_mod=None):
    """Exact attention in float64 with a dense mask: (out, lse). Small sizes only."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if score_mod is not None:
        scores = score_mod(scores, None, None, None, None)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def dense_keep(mask_mod, length):
    """The token-level mask of ``mask_mod`` (one for all batches and heads)."""
    q_idx = torch.arange(length).view(-1, 1)
    kv_idx = torch.arange(length).view(1, -1)
    return mask_mod(0, 0, q_idx, kv_idx)


def main(argv=None):
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.small:
        B, H, S, D, reps = 1, 2, 128, 32, 2
    elif on_gpu:
        B, H, S, D, reps = 4, 16, 8192, 128, 20
    else:
        B, H, S, D, reps = 2, 4, 512, 64, 5
    reps = args.reps or reps
    check = not on_gpu  # the float64 reference is for small sizes
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    ms = 1e3

    say(f"device={device} dtype={dtype} B={B} H={H} S={S} D={D}; "
        f"times are the median of {reps} calls after a warm-up")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
    compiled = torch.compile(flex_attention)

    say("\nforward: eager (exact chunked implementation) vs torch.compile "
        + ("(fused Triton kernel)" if on_gpu else "(extern call of the same implementation)"))
    window = S // 8
    cases = {
        "causal": (causal_mask, None),
        f"sliding window {window}": (generate_sliding_window_mask(window, causal=True), None),
        "causal + tanh softcap 30": (causal_mask, generate_tanh_softcap(30.0)),
    }
    for name, (mask_mod, score_mod) in cases.items():
        say(f"  {name}: building the block mask, compiling (first call) ...")
        block_mask = create_block_mask(mask_mod, None, None, S, S, device=device)
        attend = dict(score_mod=score_mod, block_mask=block_mask)
        _, t_eager = median_seconds(lambda: flex_attention(q, k, v, **attend), reps, sync)
        out, t_compiled = median_seconds(lambda: compiled(q, k, v, **attend), reps, sync)
        line = (f"  {name:26s} sparsity {block_mask.sparsity():5.1f}%  "
                f"eager {t_eager * ms:8.2f} ms  compiled {t_compiled * ms:8.2f} ms")
        if check:
            softcap = (lambda s, *_: score_mod(s, 0, 0, 0, 0)) if score_mod else None
            expected, _ = reference(q, k, v, dense_keep(mask_mod, S), softcap)
            line += f"  max |compiled - float64| {(out.double() - expected).abs().max().item():.1e}"
        say(line)

    say("\nforward + backward, causal, with return_aux=AuxRequest(lse=True):")
    say("  compiling the forward and backward (first call) ...")
    block_mask = create_block_mask(causal_mask, None, None, S, S, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def forward_backward(attention):
        def step():
            for t in leaves:
                t.grad = None
            out, aux = attention(*leaves, block_mask=block_mask, return_aux=AuxRequest(lse=True))
            out.backward(grad_out)
            return out, aux.lse
        return step

    _, t_eager = median_seconds(forward_backward(flex_attention), reps, sync)
    (out, lse), t_compiled = median_seconds(forward_backward(compiled), reps, sync)
    say(f"  eager {t_eager * ms:8.2f} ms  compiled {t_compiled * ms:8.2f} ms  "
        f"(lse: float32 [B, H, S], the log-sum-exp of each row's kept scores)")
    if check:
        exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
        expected, expected_lse = reference(*exact, dense_keep(causal_mask, S))
        expected.backward(grad_out.double())
        grad_error = max((t.grad.double() - e.grad).abs().max().item() for t, e in zip(leaves, exact))
        say(f"  max |compiled - float64|: out {(out.double() - expected).abs().max().item():.1e}  "
            f"lse {(lse.double() - expected_lse).abs().max().item():.1e}  q/k/v grads {grad_error:.1e}")
    say("\ndone.")


if __name__ == "__main__":
    main(sys.argv[1:])
