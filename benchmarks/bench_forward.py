"""Forward FlexAttention: inductor_flex against PyTorch's FlexAttention and SDPA.

One process, bfloat16. For each shape and mask it compiles

- ``ours``: ``torch.compile(inductor_flex.flex_attention)``,
- ``pt``:   ``torch.compile(torch.nn.attention.flex_attention.flex_attention)``,

in the same compile mode (``default`` and/or ``max-autotune-no-cudagraphs``), times them
with ``triton.testing.do_bench`` (median), and adds SDPA where it applies: cuDNN and
FlashAttention-2 for full / causal, the memory-efficient kernel with a dense boolean mask
for masks that have one. TFLOP/s count only the unmasked work,
``4 * B * H * S * S * D * density``. The first-call (compile) time of each compiled
function is reported too, each compiled from nothing (Dynamo reset, empty Inductor and
Triton caches: ``inductor_flex.bench.cold_compile_caches``). A compact table is printed last; ``--json`` saves every number.

    python benchmarks/bench_forward.py --shapes big --masks full,causal --modes default

Shapes, masks, inputs, timing and table printing come from ``inductor_flex.bench`` (the
``python -m inductor_flex.bench`` command), shared with the other benchmarks.
"""
import argparse
import json
import sys

import torch

from inductor_flex.bench import (
    MASKS, MODES, SHAPES, bench_ms, best_sdpa, compile_flex, first_call, forward_flops, leaf_inputs,
    make_case, paired_ratio, print_markdown, ratio_to_best_sdpa, sdpa_forwards, triton_only)


def bench(fn):
    return bench_ms(fn, warmup=50, rep=200)


def run_case(shape_name, mask_name, modes, baselines, results, check=True, ours_options=None,
             triton_column=False, rounds=0):
    import inductor_flex
    from torch.nn.attention import flex_attention as torch_flex

    shape = SHAPES[shape_name]
    S = shape["S"]
    device = "cuda"
    (q, k, v), _ = leaf_inputs(shape, device, requires_grad=False)
    score_mod, mask_mod, dense, density = make_case(mask_name, shape, device)
    flops = forward_flops(shape, density)
    row = dict(shape=shape_name, mask=mask_name, density=density)

    ours_mask = torch_mask = None
    if mask_mod is not None:
        ours_mask = inductor_flex.create_block_mask(mask_mod, None, None, S, S, device=device)
        torch_mask = torch_flex.create_block_mask(mask_mod, None, None, S, S, device=device)

    reference = None
    calls = {}  # the last mode's compiled calls (Dynamo resets between modes) and SDPA's
    for mode in modes:
        torch._dynamo.reset()
        libraries = [("ours", inductor_flex.flex_attention, ours_mask, ours_options)]
        if triton_column:
            libraries.append(("ours_triton", inductor_flex.flex_attention, ours_mask,
                              triton_only(ours_options)))
        if "pt" in baselines:
            libraries.append(("pt", torch_flex.flex_attention, torch_mask, None))
        for lib, flex, block_mask, options in libraries:
            compiled = compile_flex(flex, mode)

            def call(compiled=compiled, block_mask=block_mask, options=options):
                return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                kernel_options=options)

            out, seconds = first_call(call, cold=mode != "eager")
            calls[lib] = call
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

    if "sdpa" in baselines:
        for name, call in sdpa_forwards(mask_name, score_mod, dense, q, k, v).items():
            try:
                call()
                calls[f"sdpa_{name}"] = call
                row[f"sdpa_{name}_tflops"] = flops / bench(call) / 1e9
            except RuntimeError as error:
                row[f"sdpa_{name}_error"] = str(error).splitlines()[0]
    for mode in modes:
        row[f"ours_{mode}_vs_best_sdpa"] = ratio_to_best_sdpa(row, f"ours_{mode}_tflops", "sdpa_{}_tflops")
    best = best_sdpa(row, "sdpa_{}_tflops")
    if rounds and best and "ours" in calls:
        ours_call, sdpa_call = calls["ours"], calls[f"sdpa_{best}"]
        with torch.no_grad():
            row["ours_vs_best_sdpa_paired"] = paired_ratio(
                lambda: bench(ours_call), lambda: bench(sdpa_call), rounds)
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


def print_table(results, modes, triton_column=False):
    headers = ["shape", "mask"]
    for mode in modes:
        tag = "" if mode == "default" else "MA "
        headers += [f"{tag}ours (auto) TF"] + ([f"{tag}ours (Triton only) TF"] if triton_column else [])
        headers += [f"{tag}pt TF", f"{tag}ratio", f"{tag}compile s ours/pt", f"{tag}auto / best SDPA"]
    headers += ["auto / best SDPA, paired", "cuDNN TF", "flash TF", "dense TF"]
    rows = []
    for r in results:
        line = [r["shape"], r["mask"]]
        for mode in modes:
            line += [_fmt(r.get(f"ours_{mode}_tflops"))]
            if triton_column:
                line += [_fmt(r.get(f"ours_triton_{mode}_tflops"))]
            line += [
                _fmt(r.get(f"pt_{mode}_tflops")),
                _fmt(r.get(f"ratio_{mode}"), 2),
                f"{_fmt(r.get(f'ours_{mode}_compile_s'), 1)}/{_fmt(r.get(f'pt_{mode}_compile_s'), 1)}",
                _fmt(r.get(f"ours_{mode}_vs_best_sdpa"), 2),
            ]
        line += [_fmt(r.get("ours_vs_best_sdpa_paired"), 3), _fmt(r.get("sdpa_cudnn_tflops")),
                 _fmt(r.get("sdpa_flash_tflops")), _fmt(r.get("sdpa_dense_tflops"))]
        rows.append(line)
    print_markdown(headers, rows)


def sweep(shapes, masks, option_sets):
    """Time inductor_flex (default compile mode) once per kernel_options dict."""
    import inductor_flex

    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        S = shape["S"]
        (q, k, v), _ = leaf_inputs(shape, "cuda", requires_grad=False)
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
                    tflops = forward_flops(shape, density) / ms / 1e9
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
    parser.add_argument("--triton-column", action="store_true",
                        help='also time ours with BACKEND="TRITON" (never the vendor SDPA kernels) '
                             'next to ours (auto)')
    parser.add_argument("--paired-rounds", type=int, default=0,
                        help="also time ours (auto, the last mode) and the faster SDPA backend back "
                             "to back this many rounds: the median ratio (same-kernel calls compare fairly)")
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
                         ours_options=json.loads(args.ours_options) if args.ours_options else None,
                         triton_column=args.triton_column, rounds=args.paired_rounds)
            except Exception as error:  # keep going: one failure should not lose the table
                print(f"# {shape} {mask} failed: {type(error).__name__}: {error}", flush=True)
                results.append(dict(shape=shape, mask=mask, error=str(error)[:200]))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    print_table(results, modes, args.triton_column)


if __name__ == "__main__":
    main()
