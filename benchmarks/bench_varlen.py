"""Packed variable-length attention: inductor_flex's varlen_attn against PyTorch's.

One process, bfloat16, causal, ``T`` packed tokens (default 32768), H=16, D=128. For each
document-length distribution it times, forward and forward + backward:

- ``ours``:          ``torch.compile(inductor_flex.varlen.varlen_attn)``,
- ``pt_varlen``:     ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention custom op),
- ``ours_flex_doc``: compiled ``inductor_flex.flex_attention`` with
  ``create_document_block_mask`` on the packed tensors viewed as ``[1, H, T, D]``,
- ``pt_flex_doc``:   compiled PyTorch ``flex_attention`` with its ``create_block_mask``
  of the same document-causal mask_mod.

TFLOP/s count only real work: ``4 * H * D * sum(L * (L + 1) / 2)`` over the documents for
the forward, 3.5 times that for forward + backward. Distributions: ``long_tail`` (seeded:
many short documents, log-normal lengths clipped to [16, 8192], two near 8192) and
``uniform2048`` (every document 2048). Ratios are baseline time / ours (above 1: ours is
faster).

    R=$PWD; cd /tmp; python3 -P $R/benchmarks/bench_varlen.py [--total 32768] [--json out.json]
"""
import argparse
import json
import math
import random
import sys

import torch

from inductor_flex.bench import bench_ms, first_call, log, one_line, pass_ms, print_markdown

PASSES = {"fwd": 1.0, "fwdbwd": 3.5}


def long_tail_lengths(total: int, longest: int = 8192, seed: int = 0):
    rng = random.Random(seed)
    lengths = [longest - rng.randrange(0, 64), longest - rng.randrange(0, 64)]
    while sum(lengths) < total:
        lengths.append(min(longest, max(16, int(rng.lognormvariate(math.log(256), 1.2)))))
    lengths[-1] -= sum(lengths) - total
    rng.shuffle(lengths)
    return [n for n in lengths if n > 0]


def uniform_lengths(total: int, length: int = 2048):
    return [length] * (total // length) + ([total % length] if total % length else [])


DISTRIBUTIONS = {"long_tail": long_tail_lengths, "uniform2048": uniform_lengths}


def implementations(lengths, heads, device):
    """{name: (attend(q, k, v) on packed [T, H, D] tensors -> out)}."""
    from inductor_flex import create_document_block_mask, flex_attention
    from inductor_flex.varlen import varlen_attn

    total, longest = sum(lengths), max(lengths)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    ours_varlen = torch.compile(varlen_attn, fullgraph=True)

    def packed4(t):
        return t.unsqueeze(0).transpose(1, 2)

    impls = {"ours": lambda q, k, v: ours_varlen(q, k, v, cu, cu, longest, longest,
                                                  window_size=(-1, 0))}
    try:
        from torch.nn.attention.varlen import varlen_attn as pt_varlen_attn

        def pt_varlen(q, k, v):
            try:
                return pt_varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))
            except TypeError:  # torch without window_size (2.11): is_causal
                return pt_varlen_attn(q, k, v, cu, cu, longest, longest, is_causal=True)

        impls["pt_varlen"] = pt_varlen
    except ImportError as error:
        log(f"pt_varlen unavailable: {one_line(error)}")

    our_mask = create_document_block_mask(offsets=cu, causal=True)
    ours_flex = torch.compile(flex_attention, fullgraph=True)
    impls["ours_flex_doc"] = lambda q, k, v: ours_flex(
        packed4(q), packed4(k), packed4(v), block_mask=our_mask)

    from torch.nn.attention import flex_attention as pt_flex_module

    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    pt_mask = pt_flex_module.create_block_mask(document_causal, None, None, total, total,
                                               device=device)
    pt_flex = torch.compile(pt_flex_module.flex_attention, fullgraph=True)
    impls["pt_flex_doc"] = lambda q, k, v: pt_flex(
        packed4(q), packed4(k), packed4(v), block_mask=pt_mask)
    return impls


def run(args):
    device = "cuda"
    rows, report = [], []
    for dist in args.dists.split(","):
        lengths = DISTRIBUTIONS[dist](args.total)
        work = 4 * args.heads * args.dim * sum(n * (n + 1) / 2 for n in lengths)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad_out = (torch.randn(args.total, args.heads, args.dim, device=device,
                                         dtype=torch.bfloat16, generator=gen) for _ in range(4))
        inputs = tuple(t.requires_grad_() for t in (q, k, v))
        log(f"{dist}: {len(lengths)} documents, longest {max(lengths)}")
        for name, attend in implementations(lengths, args.heads, device).items():
            for pass_name in args.passes.split(","):
                entry = {"dist": dist, "impl": name, "pass": pass_name}
                try:
                    forward = lambda: attend(*inputs)  # noqa: E731
                    _, entry["first_call_s"] = first_call(forward, device)
                    entry["ms"] = pass_ms(pass_name, forward, inputs, grad_out, bench_ms, device)
                    entry["tflops"] = work * PASSES[pass_name] / entry["ms"] / 1e9
                except Exception as error:  # one failing cell must not end the run
                    entry["error"] = one_line(error)
                    log(f"{dist} {name} {pass_name}: {entry['error']}")
                report.append(entry)
    impls = list(dict.fromkeys(e["impl"] for e in report))
    for dist in args.dists.split(","):
        for pass_name in args.passes.split(","):
            cells = {e["impl"]: e for e in report if e["dist"] == dist and e["pass"] == pass_name}
            ours_ms = cells.get("ours", {}).get("ms")
            line = [dist, pass_name]
            for impl in impls:
                e = cells.get(impl, {})
                line.append(f"{e['tflops']:.0f}" if "tflops" in e else "err")
            for impl in impls[1:]:
                theirs = cells.get(impl, {}).get("ms")
                line.append(f"{theirs / ours_ms:.2f}" if theirs and ours_ms else "-")
            rows.append(line)
    headers = (["dist", "pass"] + [f"{i} TFLOP/s" for i in impls]
               + [f"{i}/ours" for i in impls[1:]])
    print_markdown(headers, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dists", default="long_tail,uniform2048")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_varlen needs a CUDA GPU", file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
