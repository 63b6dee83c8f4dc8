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

Each cell first runs its pass once exactly as it is then timed (fwd under
``torch.no_grad()``, a graph of its own; fwdbwd with its backward), so compiles are not
timed; a compile during the timing anyway (a recompile per call) marks the cell ``*``.
Dynamo is reset per distribution, so the compiled columns run the graph of a first call
(``--dynamic``: a dynamic-shape graph, as a loop over batches of varying sizes runs).
Each cell is logged to stderr as measured, each row once complete; ``--case-seconds``
bounds a cell (first call and timing).

    R=$PWD; cd /tmp; python3 -P $R/benchmarks/bench_varlen.py [--total 32768] [--json out.json]
"""
import argparse
import contextlib
import json
import math
import random
import signal
import sys

import torch

from inductor_flex.bench import bench_ms, log, one_line, pass_first_call, pass_ms, print_markdown

PASSES = {"fwd": 1.0, "fwdbwd": 3.5}


def long_tail_lengths(total: int, longest: int = 8192, seed: int = 0):
    longest = min(longest, total // 4)  # small totals (--device cpu) keep several documents
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


def implementations(lengths, device, dynamic=None):
    """{name: attend(q, k, v) -> out}, each on packed ``[T, H, D]`` tensors and returning
    packed ``[T, H, D]`` (the flex columns view in and out of ``[1, H, T, D]``, so one
    grad_out serves every column)."""
    from inductor_flex import create_document_block_mask, flex_attention
    from inductor_flex.varlen import varlen_attn

    total, longest = sum(lengths), max(lengths)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    ours_varlen = torch.compile(varlen_attn, fullgraph=True, dynamic=dynamic)

    def packed4(t):
        return t.unsqueeze(0).transpose(1, 2)

    def unpacked(out):
        return out.squeeze(0).transpose(0, 1)

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
    ours_flex = torch.compile(flex_attention, fullgraph=True, dynamic=dynamic)
    impls["ours_flex_doc"] = lambda q, k, v: unpacked(ours_flex(
        packed4(q), packed4(k), packed4(v), block_mask=our_mask))

    from torch.nn.attention import flex_attention as pt_flex_module

    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    pt_mask = pt_flex_module.create_block_mask(document_causal, None, None, total, total,
                                               device=device)
    pt_flex = torch.compile(pt_flex_module.flex_attention, fullgraph=True, dynamic=dynamic)
    impls["pt_flex_doc"] = lambda q, k, v: unpacked(pt_flex(
        packed4(q), packed4(k), packed4(v), block_mask=pt_mask))
    return impls


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise CaseTimeout in this (the main) thread after ``seconds`` (0: no limit); a call
    stuck in native code is interrupted when it returns to Python."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"over the case limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def graphs_compiled():
    """Dynamo's count of graphs compiled so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure(attend, pass_name, inputs, grad_out, work, device, case_seconds):
    """One cell: the first call of the pass as timed (compiles), then its time; a compile
    during the timing (a recompile per call) is counted and flagged."""
    entry = {}
    forward = lambda: attend(*inputs)  # noqa: E731
    try:
        with time_limit(case_seconds):
            _, entry["first_call_s"] = pass_first_call(pass_name, forward, inputs, grad_out, device)
            before = graphs_compiled()
            entry["ms"] = pass_ms(pass_name, forward, inputs, grad_out,
                                  lambda fn: bench_ms(fn, device=device), device)
            entry["compiles_while_timing"] = graphs_compiled() - before
        entry["tflops"] = work * PASSES[pass_name] / entry["ms"] / 1e9
    except Exception as error:  # one failing cell must not end the run
        entry["error"] = one_line(error)
    return entry


def cell_text(entry):
    if "tflops" not in entry:
        return "err"
    tflops = entry["tflops"]
    text = f"{tflops:.0f}" if tflops >= 10 else f"{tflops:.2g}"  # the CPU check's are tiny
    return text + ("*" if entry.get("compiles_while_timing") else "")


def run(args):
    device = args.device
    dists, passes = args.dists.split(","), args.passes.split(",")
    rows, report, impls = [], [], []
    for dist in dists:
        torch._dynamo.reset()  # each distribution's numbers do not depend on the ones before
        lengths = DISTRIBUTIONS[dist](args.total)
        work = 4 * args.heads * args.dim * sum(n * (n + 1) / 2 for n in lengths)
        gen = torch.Generator(device=device).manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        q, k, v, grad_out = (torch.randn(args.total, args.heads, args.dim, device=device,
                                         dtype=dtype, generator=gen) for _ in range(4))
        inputs = tuple(t.requires_grad_() for t in (q, k, v))
        log(f"{dist}: {len(lengths)} documents, longest {max(lengths)}")
        attends = implementations(lengths, device, args.dynamic)
        impls = list(dict.fromkeys(impls + list(attends)))
        for pass_name in passes:
            cells = {}
            for name, attend in attends.items():
                entry = measure(attend, pass_name, inputs, grad_out, work, device,
                                args.case_seconds)
                cells[name] = entry
                report.append({"dist": dist, "impl": name, "pass": pass_name, **entry})
                if "error" in entry:
                    log(f"{dist} {pass_name} {name}: {entry['error']}")
                else:
                    log(f"{dist} {pass_name} {name}: {entry['ms']:.3f} ms, "
                        f"{entry['tflops']:.0f} TFLOP/s (first call {entry['first_call_s']:.1f} s"
                        + (f"; {entry['compiles_while_timing']} compiles while timing"
                           if entry["compiles_while_timing"] else "") + ")")
            ours_ms = cells.get("ours", {}).get("ms")
            line = [dist, pass_name] + [cell_text(cells.get(impl, {})) for impl in impls]
            for impl in impls[1:]:
                theirs = cells.get(impl, {}).get("ms")
                line.append(f"{theirs / ours_ms:.2f}" if theirs and ours_ms else "-")
            rows.append(line)
            log("row: " + " | ".join(line))
            if args.json:  # after every row, so an interrupted run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
    headers = (["dist", "pass"] + [f"{i} TFLOP/s" for i in impls]
               + [f"{i}/ours" for i in impls[1:]])
    print("# TFLOP/s of the documents' causal work; * = Dynamo compiled while timing "
          "(a recompile per call)")
    print_markdown(headers, rows)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dists", default="long_tail,uniform2048")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--dynamic", action="store_true",
                        help="torch.compile(dynamic=True) for the compiled columns")
    parser.add_argument("--case-seconds", type=float, default=180,
                        help="time limit of one cell (first call and timing); 0: none")
    parser.add_argument("--device", default="cuda",
                        help="cuda; cpu only checks the command (float32, no pt_varlen)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_varlen needs a CUDA GPU (or --device cpu to check the command)",
              file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
