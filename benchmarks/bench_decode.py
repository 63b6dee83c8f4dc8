"""Decoding: K/V bandwidth of inductor_flex's decode kernel against PyTorch's FlexAttention
and SDPA, in one process, bfloat16.

For each shape (issue #18) it times, with ``triton.testing.do_bench`` (median):

- ``ours``:   ``torch.compile(inductor_flex.flex_attention)`` (the dispatcher's choice,
              which is the split-KV decode kernel for these query lengths),
- ``fwd``:    ours with ``BACKEND="TRITON"`` (only the fused kernels: the fused
              forward: the before; without TRITON a dense call would go to the vendor),
- ``pt``:     ``torch.compile(torch.nn.attention.flex_attention.flex_attention)``,
- ``sdpa``:   ``F.scaled_dot_product_attention(..., enable_gqa=True)``, SDPA's own pick
              (dense: it sees no block sparsity; for the sliding-window row it reads the
              whole cache, which is what SDPA decoding does),
- ``paged``:  with ``--paged``, ours through ``inductor_flex.paged_attention.PagedAttention``
              (pages shuffled; see ``paged_case``).

and reports GB/s of K/V bytes the attention must read (the listed blocks only: for the
sliding window, the window), plus ratios against SDPA and PyTorch's FlexAttention. Each
compiled result is checked against SDPA / the float64 reference before timing.

    R=$PWD; cd /tmp; python3 -P $R/benchmarks/bench_decode.py            # the issue's table
    python3 -P $R/benchmarks/bench_decode.py --smoke                      # one small shape, fast
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from inductor_flex.bench import bench_ms, first_call, log, one_line, print_markdown

# name -> (B, Hq, Hkv, KV_LEN, D, Q_LEN, sliding window or None)
SHAPES = {
    "B8_KV32k_q1": (8, 32, 8, 32768, 128, 1, None),
    "B8_KV32k_q4": (8, 32, 8, 32768, 128, 4, None),
    "B1_KV128k_q1": (1, 32, 8, 131072, 128, 1, None),
    "B64_KV2k_q1": (64, 32, 8, 2048, 128, 1, None),
    "B8_KV32k_q1_window4k": (8, 32, 8, 32768, 128, 1, 4096),
}
SMOKE = {"smoke_B2_KV4k_q1": (2, 8, 2, 4096, 128, 1, None),
         "smoke_B2_KV4k_q4_window1k": (2, 8, 2, 4096, 128, 4, 1024)}


def window_mask(offset, window):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx + offset >= kv_idx) & (q_idx + offset - kv_idx < window)
    return mask_mod


def kv_bytes_read(k, v, block_mask):
    """Bytes of K and V inside the listed blocks of the (single) query block row."""
    per_key = (k.shape[-1] + v.shape[-1]) * k.element_size() * k.shape[0] * k.shape[1]
    if block_mask is None:
        return per_key * k.shape[2]
    listed = block_mask.kv_num_blocks[0, 0, 0].item()
    if block_mask.full_kv_num_blocks is not None:
        listed += block_mask.full_kv_num_blocks[0, 0, 0].item()
    return per_key * min(k.shape[2], listed * block_mask.BLOCK_SIZE[1])


def paged_case(q, k, v, mask_mod):
    """The paged column: ours over a PagedAttention cache holding k, v in shuffled pages of
    128 tokens (``_paged.paged_inputs``), with the block mask converted to it."""
    import inductor_flex
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, under -P too
    from _paged import paged_inputs

    B, _, N, _ = k.shape
    logical = inductor_flex.create_block_mask(mask_mod or inductor_flex.noop_mask, B, None,
                                              q.shape[2], N, device=q.device)
    paged = paged_inputs(k, v, 128, shuffle=True, block_mask=logical, q_len=q.shape[2])
    compiled = torch.compile(inductor_flex.flex_attention)
    return lambda: compiled(q, paged.k_cache, paged.v_cache, block_mask=paged.block_mask, enable_gqa=True)


def run_shape(name, shape, args, rows, report):
    import inductor_flex
    from torch.nn.attention import flex_attention as torch_flex

    B, Hq, Hkv, N, D, M, window = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, M, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    mask_mod = window_mask(N - M, window) if window else None
    ours_mask = torch_mask = None
    if mask_mod is not None:
        ours_mask = inductor_flex.create_block_mask(mask_mod, None, None, M, N, device="cuda")
        torch_mask = torch_flex.create_block_mask(mask_mod, None, None, M, N, device="cuda")
    bytes_read = kv_bytes_read(k, v, ours_mask)
    row = dict(shape=name, B=B, Hq=Hq, Hkv=Hkv, KV=N, D=D, Q=M, window=window,
               kv_gigabytes=bytes_read / 1e9)

    dense = None
    if mask_mod is not None:
        positions = torch.arange(N, device="cuda")
        queries = torch.arange(M, device="cuda")[:, None]
        dense = mask_mod(0, 0, queries, positions[None, :])
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)

    torch._dynamo.reset()
    ours = torch.compile(inductor_flex.flex_attention)
    forward_only = torch.compile(inductor_flex.flex_attention)
    pt = torch.compile(torch_flex.flex_attention)
    candidates = {
        "ours": lambda: ours(q, k, v, block_mask=ours_mask, enable_gqa=True),
        "fwd": lambda: forward_only(q, k, v, block_mask=ours_mask, enable_gqa=True,
                                    kernel_options={"BACKEND": "TRITON"}),
        "pt": lambda: pt(q, k, v, block_mask=torch_mask, enable_gqa=True),
        # SDPA decodes densely: the whole cache, with the window as a dense mask if any.
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
    }
    for i, options in enumerate(args.sweep):  # ours with each given kernel_options
        candidates[f"sweep{i}"] = (lambda o: lambda: ours(q, k, v, block_mask=ours_mask, enable_gqa=True,
                                                          kernel_options=o))(options)
    if args.paged:
        try:
            paged = paged_case(q, k, v, mask_mod)
            if paged is not None:
                candidates["paged"] = paged
        except Exception as error:  # reported in the table, the other columns still run
            row["paged_error"] = one_line(error)
            log(f"{name} paged: {one_line(error)}")
    for impl, fn in candidates.items():
        try:
            with torch.no_grad():
                out, seconds = first_call(fn)
                error = (out.float() - reference.float()).abs().max().item()
                if error > 3e-2:
                    raise AssertionError(f"max error {error:.3g} against SDPA")
                if args.cudagraph:  # GPU time only: how a serving loop replays a step
                    import triton

                    ms = triton.testing.do_bench_cudagraph(fn, rep=args.rep)
                else:
                    ms = bench_ms(fn, warmup=25, rep=args.rep)
            # SDPA reads the whole cache whatever the mask.
            read = k.numel() * k.element_size() * 2 if impl == "sdpa" else bytes_read
            row[f"{impl}_ms"] = ms
            row[f"{impl}_GBps"] = read / ms / 1e6
            row[f"{impl}_first_call_s"] = seconds
        except Exception as error:  # one failing implementation must not lose the others
            row[f"{impl}_error"] = one_line(error)
            log(f"{name} {impl}: {one_line(error)}")
    if "ours_ms" in row and "sdpa_ms" in row:
        # Dense shapes: the bandwidth ratio (target >= 0.85); the window: > 1 is faster.
        row["sdpa_time_over_ours"] = row["sdpa_ms"] / row["ours_ms"]
    if "ours_ms" in row and "pt_ms" in row:
        row["pt_time_over_ours"] = row["pt_ms"] / row["ours_ms"]
    rows.append(row)
    report.append(row)


def fmt(row, key, spec):
    return format(row[key], spec) if key in row else ("err" if key.replace("_GBps", "_error").replace("_ms", "_error") in row else "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="two small shapes, quick")
    parser.add_argument("--shapes", default=None, help="comma-separated names of " + ",".join(SHAPES))
    parser.add_argument("--paged", action="store_true", help="add the PagedAttention column")
    parser.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--cudagraph", action="store_true",
                        help="time each call replayed from a CUDA graph (no launch overhead)")
    parser.add_argument("--sweep", default="[]",
                        help='JSON list of kernel_options for extra "ours" columns, e.g. '
                             '\'[{"SPLIT_KV": 128}, {"BLOCK_N": 128}]\' (tuning the split count)')
    args = parser.parse_args(argv)
    args.sweep = json.loads(args.sweep)
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = SMOKE if args.smoke else SHAPES
    if args.shapes:
        shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    rows, report = [], []
    for name, shape in shapes.items():
        log(f"{name} ...")
        run_shape(name, shape, args, rows, report)

    impls = (["ours", "fwd", "pt", "sdpa"] + (["paged"] if args.paged else [])
             + [f"sweep{i}" for i in range(len(args.sweep))])
    for i, options in enumerate(args.sweep):
        print(f"sweep{i}: kernel_options={options}")
    headers = ["shape"] + [f"{i} GB/s" for i in impls] + ["sdpa time/ours", "pt time/ours"]
    table = [[r["shape"]] + [fmt(r, f"{i}_GBps", ".0f") for i in impls]
             + [fmt(r, "sdpa_time_over_ours", ".2f"), fmt(r, "pt_time_over_ours", ".2f")]
             for r in rows]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; GB/s of K/V read "
          f"(listed blocks; SDPA: the whole cache)"
          + ("; CUDA-graph replay" if args.cudagraph else "; launches included"))
    print_markdown(headers, table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
