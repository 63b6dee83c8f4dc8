"""Peak extra memory and time of the eager (dense, uncompiled) forward.

Compares our chunked dense forward with PyTorch's eager ``flex_attention``, which forms
the whole score matrix.

Method. Each measurement runs in a fresh child process, so peaks do not leak from one
measurement into the next.
- CPU: the child allocates the inputs and a block mask, records its peak resident set size
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a high-water mark kept by the kernel),
  runs one forward, and records the peak again. The difference is the extra peak memory
  of the call: every byte the call held at its worst moment (tensors plus allocator
  slack), counting none of the inputs. One untimed warm-up runs on a tiny problem first, so
  that one-time library loading is counted in the baseline, not the call.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated before the call.
Time is wall-clock for that single call (the numbers are for memory; see the throughput
benchmarks for speed).

Usage:
    python benchmarks/bench_eager_memory.py                 # ours at S=8192, PyTorch at S=2048
    python benchmarks/bench_eager_memory.py --pytorch-full  # also PyTorch at S=8192 (~13 GB!)
"""
import argparse
import json
import math
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, warnings
import torch
cfg = json.loads(sys.argv[1])
device = cfg["device"]
warnings.filterwarnings("ignore")
torch.manual_seed(0)
B, H, S, D = cfg["B"], cfg["H"], cfg["S"], cfg["D"]

def peak_bytes():
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx

if cfg["impl"] == "ours":
    from inductor_flex import create_block_mask, flex_attention
else:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

def run(S):
    q, k, v = (torch.randn(B, H, S, D, device=device) for _ in range(3))
    mask = create_block_mask(causal, None, None, S, S, device=device)
    return q, k, v, mask

# Warm-up on a tiny problem: imports, vmap machinery, first-call caches.
wq, wk, wv, wmask = run(256)
flex_attention(wq, wk, wv, block_mask=wmask)
del wq, wk, wv, wmask

q, k, v, mask = run(S)
if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
else:
    before = peak_bytes()
start = time.perf_counter()
with torch.no_grad():
    out = flex_attention(q, k, v, block_mask=mask)
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
extra = peak_bytes() - before
print(json.dumps({"extra_bytes": extra, "seconds": seconds, "finite": bool(out.isfinite().all())}))
"""


def measure(impl, B, H, S, D, device):
    config = json.dumps({"impl": impl, "B": B, "H": H, "S": S, "D": D, "device": device})
    result = subprocess.run([sys.executable, "-c", CHILD, config], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=16)
    parser.add_argument("--S", type=int, default=8192)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--pytorch-S", type=int, default=2048,
                        help="sequence length for PyTorch's eager flex_attention")
    parser.add_argument("--pytorch-full", action="store_true",
                        help="also run PyTorch's eager flex_attention at --S (needs ~13 GB at 8192)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    rows = []
    for impl, S in [("ours", args.S), ("ours", args.pytorch_S), ("pytorch", args.pytorch_S)] + (
            [("pytorch", args.S)] if args.pytorch_full else []):
        result = measure(impl, args.B, args.H, S, args.D, args.device)
        score_matrix = args.B * args.H * S * S * 4
        rows.append((impl, S, result, score_matrix))

    print(f"eager forward, causal block mask, B={args.B} H={args.H} D={args.D}, fp32, {args.device}")
    print(f"{'impl':<10}{'S':>7}{'extra peak MiB':>16}{'time s':>9}{'fp32 S x S scores MiB':>24}")
    for impl, S, result, score_matrix in rows:
        if "error" in result:
            print(f"{impl:<10}{S:>7}  error: {result['error']}")
            continue
        print(f"{impl:<10}{S:>7}{result['extra_bytes'] / 2**20:>16.0f}{result['seconds']:>9.2f}"
              f"{score_matrix / 2**20:>24.0f}")
    if not args.pytorch_full:
        full = args.B * args.H * args.S * args.S * 4
        print(f"\nPyTorch at S={args.S} not run (pass --pytorch-full): its one fp32 score matrix alone "
              f"is {full / 2**30:.1f} GiB, and its eager path keeps several such tensors.")


if __name__ == "__main__":
    main()
