"""CPU FlexAttention: inductor_flex against PyTorch's FlexAttention, one process (issue #22).

For each shape, dtype and mask it times, interleaved round by round and keeping each
one's best time (the machine may be shared, so the best of several rounds is the honest
figure of what the code can do):

- ``ours_c``: ``torch.compile(inductor_flex.flex_attention)`` forward,
- ``ours_e``: ``inductor_flex.flex_attention`` eager forward,
- ``pt_c``:   ``torch.compile(torch.nn.attention.flex_attention.flex_attention)`` forward,
- ``pt_e``:   PyTorch's eager forward (its dense reference; skipped above --pt-eager-max
  elements of the score matrix, where it takes minutes),
- ``ours_fb``: forward + backward of ours compiled (PyTorch has no CPU backward),

each with a block mask from its own ``create_block_mask``. Ratios: ``pt_c / ours_c``
(above 1: ours is faster), ``full / causal`` forward of ours compiled, and
``ours_fb / ours_c``. Threads: ``torch.set_num_threads(os.cpu_count())`` unless --threads.

    R=$PWD; cd /tmp; python3 -P $R/benchmarks/bench_cpu.py --quick
    python3 -P $R/benchmarks/bench_cpu.py            # the whole matrix: long on 2 cores
"""
import argparse
import os
import sys
import time

import torch

SHAPES = {"s2k": dict(B=1, H=8, S=2048, D=64), "s4k": dict(B=2, H=16, S=4096, D=128)}
MASKS = ["full", "causal", "sliding_window", "document", "alibi_causal", "softcap_causal"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WINDOW = 256


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_case(name, shape):
    """(score_mod, mask_mod) of mask ``name``: the matrix of issue #22 (window 256, random
    document lengths), from inductor_flex.bench where it has the same case."""
    from inductor_flex.bench import make_case as shared_case

    if name == "sliding_window":
        def window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)
        return None, window
    score_mod, mask_mod, _, _ = shared_case(name, shape, "cpu")
    return score_mod, mask_mod


def best_times(fns, rounds, min_s=0.3):
    """Best milliseconds of each callable, calls interleaved round by round."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            count = 0
            while True:
                fn()
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_s or elapsed > 2.0:
                    break
            best[name] = min(best[name], elapsed / count * 1e3)
    return best


def run_case(shape_name, dtype_name, mask_name, rounds, pt_eager_max):
    import inductor_flex
    from torch.nn.attention import flex_attention as torch_flex

    shape = SHAPES[shape_name]
    B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(B, H, S, D, generator=gen).to(dtype) for _ in range(4))
    score_mod, mask_mod = make_case(mask_name, shape)
    ours_mask = torch_mask = None
    if mask_mod is not None:
        ours_mask = inductor_flex.create_block_mask(mask_mod, None, None, S, S, device="cpu")
        torch_mask = torch_flex.create_block_mask(mask_mod, None, None, S, S, device="cpu")

    ours_c = torch.compile(inductor_flex.flex_attention)
    pt_c = torch.compile(torch_flex.flex_attention)
    fns = {
        "ours_c": lambda: ours_c(q, k, v, score_mod=score_mod, block_mask=ours_mask),
        "ours_e": lambda: inductor_flex.flex_attention(q, k, v, score_mod=score_mod,
                                                       block_mask=ours_mask),
        "pt_c": lambda: pt_c(q, k, v, score_mod=score_mod, block_mask=torch_mask),
    }
    if B * H * S * S <= pt_eager_max:
        fns["pt_e"] = lambda: torch_flex.flex_attention(q, k, v, score_mod=score_mod,
                                                        block_mask=torch_mask)
    row = {}
    with torch.no_grad():
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            row[name + "_first_s"] = time.perf_counter() - start
        out_ours, out_pt = fns["ours_c"](), fns["pt_c"]()
        row["max_diff"] = (out_ours.float() - out_pt.float()).abs().max().item()
        row.update(best_times(fns, rounds))

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd_bwd():
        out = ours_c(*leaves, score_mod=score_mod, block_mask=ours_mask)
        torch.autograd.grad(out, leaves, grad_out)

    fwd_bwd()
    row.update(best_times({"ours_fb": fwd_bwd}, max(1, rounds - 1)))
    torch._dynamo.reset()
    return row


COLUMNS = ["ours_c", "ours_e", "pt_c", "pt_e", "ours_fb"]


def print_table(rows, file=sys.stdout):
    head = ["shape", "dtype", "mask"] + [c + " ms" for c in COLUMNS] + ["pt_c/ours_c", "fb/fwd"]
    print("| " + " | ".join(head) + " |", file=file)
    print("|" + "---|" * len(head), file=file)
    for (shape, dtype, mask), row in rows:
        cells = [shape, dtype, mask]
        cells += [f"{row[c]:.1f}" if c in row else "-" for c in COLUMNS]
        cells.append(f"{row['pt_c'] / row['ours_c']:.2f}")
        cells.append(f"{row['ours_fb'] / row['ours_c']:.2f}")
        print("| " + " | ".join(cells) + " |", file=file, flush=True)
    full = {(s, d): r["ours_c"] for (s, d, m), r in rows if m == "full"}
    for (s, d, m), r in rows:
        if m == "causal" and (s, d) in full:
            print(f"{s} {d}: full / causal forward (ours compiled) = "
                  f"{full[(s, d)] / r['ours_c']:.2f}", file=file)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="first shape, fp32, masks full, causal, softcap_causal")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--masks", default=",".join(MASKS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: the machine's core count)")
    parser.add_argument("--pt-eager-max", type=int, default=1 << 26,
                        help="largest B*H*S*S for which PyTorch's eager forward is timed")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.dtypes, args.masks = "s2k", "fp32", "full,causal,softcap_causal"
    torch.set_num_threads(args.threads)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            for mask in args.masks.split(","):
                log(f"{shape} {dtype} {mask}")
                row = run_case(shape, dtype, mask, args.rounds, args.pt_eager_max)
                log("  " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()))
                rows.append(((shape, dtype, mask), row))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
