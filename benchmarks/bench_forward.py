"""Forward FlexAttention: inductor_flex against PyTorch's FlexAttention and SDPA.

One process, bfloat16. For each shape and mask it compiles

- ``ours``: ``torch.compile(inductor_flex.flex_attention)``,
- ``pt``:   ``torch.compile(torch.nn.attention.flex_attention.flex_attention)``,

in the same compile mode (``default`` and/or ``max-autotune-no-cudagraphs``), times them
with ``triton.testing.do_bench`` (median), and adds SDPA where it applies: cuDNN and
FlashAttention-2 for full / causal, the memory-efficient kernel with a dense boolean mask
for masks that have one. TFLOP/s count only the unmasked work,
``4 * B * H * S * S * D * density``. The first-call (compile) time of each compiled
function is reported too. A compact table is printed last; ``--json`` saves every number.

    python benchmarks/bench_forward.py --shapes big --masks full,causal --modes default
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "big": dict(B=4, H=16, S=8192, D=128),
    "small": dict(B=8, H=16, S=4096, D=64),
}
MASKS = ["full", "causal", "sliding_window", "prefix_lm", "document", "alibi_causal", "softcap_causal"]
MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


# ---------------------------------------------------------------------------------------
# Masks and score mods, written once for both libraries
# ---------------------------------------------------------------------------------------

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_case(name, shape, device):
    """(score_mod, mask_mod, dense bool mask [S, S] or None, density)."""
    S, H = shape["S"], shape["H"]
    score_mod = None
    if name == "full":
        mask_mod = None
    elif name in ("causal", "alibi_causal", "softcap_causal"):
        mask_mod = causal
    elif name == "sliding_window":
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < 1024)
    elif name == "prefix_lm":
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < 2048) | (q_idx >= kv_idx)
    elif name == "document":
        gen = torch.Generator().manual_seed(0)
        lengths, total = [], 0
        while total < S:  # random document lengths between 256 and 2048 tokens
            length = min(int(torch.randint(256, 2049, (1,), generator=gen)), S - total)
            lengths.append(length)
            total += length
        doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        doc_ids = doc_ids.to(device=device, dtype=torch.int32)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)
    else:
        raise KeyError(name)

    if name == "alibi_causal":
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=device, dtype=torch.float32) / H)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)
    elif name == "softcap_causal":
        def score_mod(score, b, h, q_idx, kv_idx):
            return 30.0 * torch.tanh(score / 30.0)

    dense = None
    if mask_mod is not None:
        q_idx = torch.arange(S, device=device)[:, None]
        kv_idx = torch.arange(S, device=device)[None, :]
        zero = torch.zeros((), dtype=torch.int32, device=device)
        dense = mask_mod(zero, zero, q_idx, kv_idx)
    density = 1.0 if dense is None else dense.float().mean().item()
    return score_mod, mask_mod, dense, density


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------

def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def first_call(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_case(shape_name, mask_name, modes, baselines, results, check=True, ours_options=None):
    import inductor_flex
    from torch.nn.attention import flex_attention as torch_flex

    shape = SHAPES[shape_name]
    B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    score_mod, mask_mod, dense, density = make_case(mask_name, shape, device)
    flops = 4 * B * H * S * S * D * density
    row = dict(shape=shape_name, mask=mask_name, density=density)

    ours_mask = torch_mask = None
    if mask_mod is not None:
        ours_mask = inductor_flex.create_block_mask(mask_mod, None, None, S, S, device=device)
        torch_mask = torch_flex.create_block_mask(mask_mod, None, None, S, S, device=device)

    reference = None
    for mode in modes:
        torch._dynamo.reset()
        for lib, flex, block_mask in (("ours", inductor_flex.flex_attention, ours_mask),
                                      ("pt", torch_flex.flex_attention, torch_mask)):
            if lib == "pt" and "pt" not in baselines:
                continue
            compiled = torch.compile(flex, mode=MODES[mode])

            options = ours_options if lib == "ours" else None

            def call(compiled=compiled, block_mask=block_mask, options=options):
                return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                kernel_options=options)

            out, seconds = first_call(call)
            ms = bench(call)
            row[f"{lib}_{mode}_ms"] = ms
            row[f"{lib}_{mode}_tflops"] = flops / ms / 1e9
            row[f"{lib}_{mode}_compile_s"] = seconds
            if check:
                if reference is None:
                    reference = out
                else:
                    row[f"{lib}_{mode}_maxdiff"] = (out.float() - reference.float()).abs().max().item()
            del out
        if f"pt_{mode}_ms" in row:
            row[f"ratio_{mode}"] = row[f"pt_{mode}_ms"] / row[f"ours_{mode}_ms"]

    if "sdpa" in baselines and score_mod is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = []
        if mask_name in ("full", "causal"):
            backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]
        for name, backend in backends:
            def call(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=mask_name == "causal")
            try:
                call()
                row[f"sdpa_{name}_tflops"] = flops / bench(call) / 1e9
            except RuntimeError as error:
                row[f"sdpa_{name}_error"] = str(error).splitlines()[0]
        if dense is not None:
            def call():
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
            try:
                call()
                row["sdpa_dense_tflops"] = flops / bench(call) / 1e9
            except RuntimeError as error:
                row["sdpa_dense_error"] = str(error).splitlines()[0]
    results.append(row)
    print(json.dumps(row), flush=True)
    del q, k, v, dense
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------

def _fmt(value, digits=0):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def print_table(results, modes):
    headers = ["shape", "mask"]
    for mode in modes:
        tag = "" if mode == "default" else "MA "
        headers += [f"{tag}ours TF", f"{tag}pt TF", f"{tag}ratio", f"{tag}compile s ours/pt"]
    headers += ["cuDNN TF", "flash TF", "dense TF"]
    rows = []
    for r in results:
        line = [r["shape"], r["mask"]]
        for mode in modes:
            line += [
                _fmt(r.get(f"ours_{mode}_tflops")),
                _fmt(r.get(f"pt_{mode}_tflops")),
                _fmt(r.get(f"ratio_{mode}"), 2),
                f"{_fmt(r.get(f'ours_{mode}_compile_s'), 1)}/{_fmt(r.get(f'pt_{mode}_compile_s'), 1)}",
            ]
        line += [_fmt(r.get("sdpa_cudnn_tflops")), _fmt(r.get("sdpa_flash_tflops")),
                 _fmt(r.get("sdpa_dense_tflops"))]
        rows.append(line)
    print_markdown(headers, rows)


def sweep(shapes, masks, option_sets):
    """Time inductor_flex (default compile mode) once per kernel_options dict."""
    import inductor_flex

    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        for mask_name in masks:
            score_mod, mask_mod, _, density = make_case(mask_name, shape, "cuda")
            block_mask = None if mask_mod is None else inductor_flex.create_block_mask(
                mask_mod, None, None, S, S, device="cuda")
            for options in option_sets:
                torch._dynamo.reset()
                compiled = torch.compile(inductor_flex.flex_attention)

                def call():
                    return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                    kernel_options=options)
                try:
                    call()
                    ms = bench(call)
                    tflops = 4 * B * H * S * S * D * density / ms / 1e9
                except Exception as error:
                    ms, tflops = float("nan"), float("nan")
                    print(f"# {options} failed: {type(error).__name__}: {str(error)[:200]}")
                rows.append((shape_name, mask_name, json.dumps(options), ms, tflops))
                print(f"{shape_name:6} {mask_name:15} {tflops:6.0f} TF {ms:8.3f} ms  {json.dumps(options)}",
                      flush=True)
    print()
    for row in rows:
        print(f"{row[0]:6} {row[1]:15} {row[4]:6.0f} TF  {row[2]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="big,small", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--masks", default=",".join(MASKS), help=f"comma list of {MASKS}")
    parser.add_argument("--modes", default="default", help=f"comma list of {list(MODES)}")
    parser.add_argument("--baselines", default="pt,sdpa", help="comma list of pt, sdpa (or none)")
    parser.add_argument("--json", default=None, help="write all numbers to this file")
    parser.add_argument("--no-check", action="store_true", help="skip the output cross-check")
    parser.add_argument("--sweep", default=None,
                        help="JSON list of kernel_options dicts: time inductor_flex (default mode) "
                             "with each, instead of the comparison")
    parser.add_argument("--ours-options", default=None,
                        help='kernel_options for inductor_flex only, as JSON ({"USE_TMA": true})')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_forward.py needs a CUDA GPU")
    modes = [m for m in args.modes.split(",") if m]
    baselines = set(args.baselines.split(","))
    results = []
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    if args.sweep:
        return sweep(args.shapes.split(","), args.masks.split(","), json.loads(args.sweep))
    for shape in args.shapes.split(","):
        for mask in args.masks.split(","):
            try:
                run_case(shape, mask, modes, baselines, results, check=not args.no_check,
                         ours_options=json.loads(args.ours_options) if args.ours_options else None)
            except Exception as error:  # keep going: one failure should not lose the table
                print(f"# {shape} {mask} failed: {type(error).__name__}: {error}", flush=True)
                results.append(dict(shape=shape, mask=mask, error=str(error)[:200]))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    print_table(results, modes)


def print_markdown(headers, rows):
    """Print one table (headers, then rows of cells) with columns padded to align."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    print()
    print(" | ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for line in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)))


if __name__ == "__main__":
    main()
