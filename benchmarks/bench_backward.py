"""Backward FlexAttention: inductor_flex against PyTorch's FlexAttention and SDPA.

One process, bfloat16, the shapes and masks of ``bench_forward.py``. For each shape and
mask it compiles

- ``ours``: ``torch.compile(inductor_flex.flex_attention)``,
- ``pt``:   ``torch.compile(torch.nn.attention.flex_attention.flex_attention)``,

in the same compile mode, each with a block mask from its own ``create_block_mask``, and
times with ``triton.testing.do_bench`` (median)

- the backward alone: one forward with inputs that require grad, then
  ``torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)`` per iteration
  (donated buffers are switched off so that the compiled backward may run again);
- forward + backward: a fresh forward and its gradients per iteration;
- the first call (forward + backward, which compiles both) as the compile time, compiled
  from nothing (``inductor_flex.bench.cold_compile_caches``).

TFLOP/s count only the unmasked work: the forward is ``4 * B * H * S * S * D * density``,
the backward 2.5 times that, forward + backward 3.5 times. Ratios are pt time / ours time
(above 1: ours is faster). SDPA's backward is timed where it applies: cuDNN and
FlashAttention-2 for full / causal, the memory-efficient kernel with a dense boolean mask
for masks that have one and no score_mod. Ours' out / dq / dk / dv are compared with pt's
(largest absolute difference, printed, not asserted) so a broken kernel shows in the log.

``--memory`` (on by default) then measures the peak memory of one forward + backward at
B=1 H=16 S=32768 D=128, causal, for ours, pt, SDPA flash and SDPA cuDNN: the
``max_memory_allocated`` of the call minus what was allocated just before it (the inputs
q, k, v, grad_out and the block mask), after a warm-up call so that compiling does not
count. A compact table is printed last; ``--json`` saves every number.

    python benchmarks/bench_backward.py --shapes big --masks full,causal --no-memory
    python benchmarks/bench_backward.py --shapes "" --memory      # the memory table only

Shapes, masks, inputs, timing and table printing come from ``inductor_flex.bench`` (the
``python -m inductor_flex.bench`` command), shared with the other benchmarks.
"""
import argparse
import functools
import gc
import importlib
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from inductor_flex.bench import (
    BACKWARD_WORK, best_sdpa, DENSE_MASK_MAX_ELEMENTS, FORWARD_BACKWARD_WORK, MASKS, MODES, SHAPES,
    allow_retained_backward, backward_ms, bench_ms, causal, cell, compile_flex, first_call,
    forward_backward_ms, forward_flops, free_device_memory, leaf_inputs, log, make_case,
    one_line, paired_ratio, print_markdown, ratio_to_best_sdpa, sdpa_forwards, triton_only)

MEMORY_SHAPE = dict(B=1, H=16, S=32768, D=128)
GRAD_NAMES = ("out", "dq", "dk", "dv")


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------

def measure_library(flex, block_mask, options, score_mod, inputs, grad_out, mode, bench,
                    keep_results):
    """Compile ``flex`` in ``mode`` and time it.

    Returns (compile seconds, backward ms, forward+backward ms, first-call
    (out, dq, dk, dv) detached, or None unless ``keep_results``, the compiled forward)."""
    compiled = compile_flex(flex, mode)
    q, k, v = inputs

    def forward():
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask,
                        kernel_options=options)

    def forward_backward():
        out = forward()
        return (out,) + torch.autograd.grad(out, inputs, grad_out)

    first, compile_s = first_call(forward_backward, cold=MODES[mode] is not None)
    # Detaching drops the first call's graph (and what it saved) right away.
    first = tuple(t.detach() for t in first) if keep_results else None
    bwd_ms = backward_ms(forward, inputs, grad_out, bench)
    fwd_bwd_ms = forward_backward_ms(forward, inputs, grad_out, bench)
    return compile_s, bwd_ms, fwd_bwd_ms, first, forward


def compare(ours, reference):
    """Largest |ours - reference| and largest |reference| of each of out, dq, dk, dv."""
    return {name: dict(maxdiff=(a.float() - b.float()).abs().max().item(),
                       scale=b.float().abs().max().item())
            for name, a, b in zip(GRAD_NAMES, ours, reference)}


def run_case(shape_name, mask_name, modes, baselines, bench, check=True, ours_options=None,
             device="cuda", triton_column=False, rounds=0):
    """Every measurement of one shape and mask, as a dict of numbers (and error strings)."""
    import inductor_flex
    from torch.nn.attention import flex_attention as torch_flex

    allow_retained_backward()
    shape = SHAPES[shape_name]
    B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
    inputs, grad_out = leaf_inputs(shape, device)
    score_mod, mask_mod, dense, density = make_case(mask_name, shape, device)
    flops = forward_flops(shape, density)
    row = dict(shape=shape_name, mask=mask_name, B=B, H=H, S=S, D=D, density=density)
    tag = f"{shape_name} {mask_name}"

    libraries = [("ours", inductor_flex, ours_options)]
    if triton_column:
        libraries.append(("ours_triton", inductor_flex, triton_only(ours_options)))
    if "pt" in baselines:
        libraries.append(("pt", torch_flex, None))
    block_masks = {}
    forwards = {}  # the last mode's compiled forwards (Dynamo resets between modes) and SDPA's
    for mode in modes:
        torch._dynamo.reset()
        firsts = {}
        for lib, module, options in libraries:
            key = f"{lib}_{mode}"
            try:
                if module not in block_masks:
                    block_masks[module] = None if mask_mod is None else module.create_block_mask(
                        mask_mod, None, None, S, S, device=device)
                compile_s, bwd_ms, fwd_bwd_ms, first, forwards[lib] = measure_library(
                    module.flex_attention, block_masks[module], options, score_mod, inputs, grad_out,
                    mode, bench, keep_results=check)
            except Exception as error:  # keep going: the other library's numbers still count
                row[f"{key}_error"] = one_line(error)
                log(f"{tag} {lib} {mode} failed: {one_line(error)}")
                free_device_memory(device)
                continue
            if first is not None:
                firsts[lib] = first
            row[f"{key}_compile_s"] = compile_s
            row[f"{key}_bwd_ms"] = bwd_ms
            row[f"{key}_bwd_tflops"] = BACKWARD_WORK * flops / bwd_ms / 1e9
            row[f"{key}_fwdbwd_ms"] = fwd_bwd_ms
            row[f"{key}_fwdbwd_tflops"] = FORWARD_BACKWARD_WORK * flops / fwd_bwd_ms / 1e9
            log(f"{tag} {lib} {mode}: compile {compile_s:.1f} s, "
                f"bwd {bwd_ms:.3f} ms {row[f'{key}_bwd_tflops']:.0f} TF, "
                f"fwd+bwd {fwd_bwd_ms:.3f} ms {row[f'{key}_fwdbwd_tflops']:.0f} TF")
        for kind in ("bwd", "fwdbwd"):
            if f"ours_{mode}_{kind}_ms" in row and f"pt_{mode}_{kind}_ms" in row:
                row[f"ratio_{mode}_{kind}"] = (row[f"pt_{mode}_{kind}_ms"]
                                               / row[f"ours_{mode}_{kind}_ms"])
        if "ours" in firsts and "pt" in firsts:
            diffs = compare(firsts["ours"], firsts["pt"])
            row[f"diff_{mode}"] = diffs
            row[f"grad_maxdiff_{mode}"] = max(diffs[name]["maxdiff"] for name in GRAD_NAMES[1:])
            log(f"{tag} {mode} max|ours - pt| (max|pt|): " + ", ".join(
                f"{name} {d['maxdiff']:.3g} ({d['scale']:.3g})" for name, d in diffs.items()))
        del firsts

    if "sdpa" in baselines:
        if dense is not None and dense.numel() > DENSE_MASK_MAX_ELEMENTS:
            row["sdpa_dense_skipped"] = f"dense mask of {S}x{S} is too large"
        for name, forward in sdpa_forwards(mask_name, score_mod, dense, *inputs).items():
            try:
                ms = backward_ms(forward, inputs, grad_out, bench)
                forwards[f"sdpa_{name}"] = forward
            except Exception as error:
                row[f"sdpa_{name}_error"] = one_line(error)
                log(f"{tag} sdpa {name} failed: {one_line(error)}")
                free_device_memory(device)
                continue
            row[f"sdpa_{name}_bwd_ms"] = ms
            row[f"sdpa_{name}_bwd_tflops"] = BACKWARD_WORK * flops / ms / 1e9
            log(f"{tag} sdpa {name}: bwd {ms:.3f} ms {row[f'sdpa_{name}_bwd_tflops']:.0f} TF")
    for mode in modes:
        ratio = ratio_to_best_sdpa(row, f"ours_{mode}_bwd_tflops", "sdpa_{}_bwd_tflops")
        if ratio is not None:
            row[f"ours_{mode}_vs_best_sdpa"] = ratio
    best = best_sdpa(row, "sdpa_{}_bwd_tflops")
    if rounds and best and "ours" in forwards:
        ours, sdpa = forwards["ours"], forwards[f"sdpa_{best}"]
        row["ours_vs_best_sdpa_paired"] = paired_ratio(
            lambda: backward_ms(ours, inputs, grad_out, bench),
            lambda: backward_ms(sdpa, inputs, grad_out, bench), rounds)
    return row


def measure_peak_memory(impl, mode, device="cuda"):
    """(extra peak bytes, bytes held before) of one forward + backward, causal, MEMORY_SHAPE.

    ``impl`` is ours, pt, flash or cudnn; ``mode`` the compile mode of ours / pt. The
    extra peak is ``max_memory_allocated`` during the call minus the bytes allocated just
    before it (the inputs and the block mask); it includes the call's own out, dq, dk, dv."""
    allow_retained_backward()
    inputs, grad_out = leaf_inputs(MEMORY_SHAPE, device)
    q, k, v = inputs
    S = MEMORY_SHAPE["S"]
    if impl in ("ours", "pt"):
        if impl == "ours":
            import inductor_flex as module
        else:
            from torch.nn.attention import flex_attention as module
        block_mask = module.create_block_mask(causal, None, None, S, S, device=device)
        torch._dynamo.reset()
        compiled = compile_flex(module.flex_attention, mode)

        def forward():
            return compiled(q, k, v, block_mask=block_mask)
    else:
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[impl]

        def forward():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward():
        return torch.autograd.grad(forward(), inputs, grad_out)

    for _ in range(2):  # compile, autotune and first-call caches happen here, uncounted
        forward_backward()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    grads = forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    del grads
    return peak, held


def run_memory(impls, mode, device="cuda"):
    rows = []
    for impl in impls:
        row = dict(impl=impl, mode=mode if impl in ("ours", "pt") else "-", **MEMORY_SHAPE)
        try:
            peak, held = measure_peak_memory(impl, mode, device)
            row.update(peak_mib=peak / 2**20, held_mib=held / 2**20)
            log(f"memory {impl}: peak {row['peak_mib']:.0f} MiB "
                f"over {row['held_mib']:.0f} MiB held")
        except Exception as error:
            row["error"] = one_line(error)
            log(f"memory {impl} failed: {one_line(error)}")
        free_device_memory(device)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

def print_case_table(results, modes, triton_column=False):
    headers = ["shape", "mask"]
    for mode in modes:
        tag = "" if mode == "default" else "MA "
        headers += [f"{tag}ours (auto) bwd TF"]
        headers += [f"{tag}ours (Triton only) bwd TF"] if triton_column else []
        headers += [f"{tag}auto / best SDPA bwd", f"{tag}pt bwd TF", f"{tag}ratio",
                    f"{tag}ours fwd+bwd TF", f"{tag}pt fwd+bwd TF", f"{tag}ratio",
                    f"{tag}compile s ours/pt", f"{tag}grad diff"]
    headers += ["auto / best SDPA bwd, paired", "cuDNN bwd TF", "flash bwd TF", "dense bwd TF"]
    rows = []
    for r in results:
        line = [r["shape"], r["mask"]]
        for mode in modes:
            ours, pt = (f"ours_{mode}_error",), (f"pt_{mode}_error",)
            line += [cell(r, f"ours_{mode}_bwd_tflops", error_keys=ours)]
            if triton_column:
                line += [cell(r, f"ours_triton_{mode}_bwd_tflops",
                              error_keys=(f"ours_triton_{mode}_error",))]
            line += [
                cell(r, f"ours_{mode}_vs_best_sdpa", ".2f", ours),
                cell(r, f"pt_{mode}_bwd_tflops", error_keys=pt),
                cell(r, f"ratio_{mode}_bwd", ".2f", ours + pt),
                cell(r, f"ours_{mode}_fwdbwd_tflops", error_keys=ours),
                cell(r, f"pt_{mode}_fwdbwd_tflops", error_keys=pt),
                cell(r, f"ratio_{mode}_fwdbwd", ".2f", ours + pt),
                f"{cell(r, f'ours_{mode}_compile_s', '.1f', ours)}/"
                f"{cell(r, f'pt_{mode}_compile_s', '.1f', pt)}",
                cell(r, f"grad_maxdiff_{mode}", ".2g", ours + pt),
            ]
        line += [cell(r, "ours_vs_best_sdpa_paired", ".3f")]
        line += [cell(r, f"sdpa_{name}_bwd_tflops", error_keys=(f"sdpa_{name}_error",))
                 for name in ("cudnn", "flash", "dense")]
        rows.append(line)
    print_markdown(headers, rows)


def print_memory_table(rows):
    shape = MEMORY_SHAPE
    print(f"\nPeak memory of one forward + backward, causal, B={shape['B']} H={shape['H']} "
          f"S={shape['S']} D={shape['D']} bf16 (MiB over the inputs and block mask; "
          f"out + dq + dk + dv alone are "
          f"{4 * shape['B'] * shape['H'] * shape['S'] * shape['D'] * 2 / 2**20:.0f} MiB)")
    print_markdown(["impl", "mode", "peak MiB", "held before MiB"],
                   [[r["impl"], r["mode"], cell(r, "peak_mib"), cell(r, "held_mib")]
                    for r in rows])


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def _names(parser, text, known, what):
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {list(known)}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="big,small",
                        help=f"comma list of {list(SHAPES)} (empty: no timing cases)")
    parser.add_argument("--masks", default=",".join(MASKS), help=f"comma list of {MASKS}")
    parser.add_argument("--modes", default="default", help=f"comma list of {list(MODES)}")
    parser.add_argument("--baselines", default="pt,sdpa", help="comma list of pt, sdpa (or none)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="peak memory of forward + backward at S=32768, causal "
                             "(ours, pt, SDPA flash, SDPA cuDNN), in the first of --modes")
    parser.add_argument("--json", default=None, help="write all numbers to this file")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing ours' out/dq/dk/dv with pt's")
    parser.add_argument("--ours-options", default=None,
                        help='kernel_options for inductor_flex only, as JSON ({"USE_TMA": true})')
    parser.add_argument("--triton-column", action="store_true",
                        help='also time ours with BACKEND="TRITON" (never the vendor SDPA kernels) '
                             'next to ours (auto)')
    parser.add_argument("--paired-rounds", type=int, default=0,
                        help="also time the backward of ours (auto, the last mode) and of the faster "
                             "SDPA backend back to back this many rounds: the median ratio")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=float, default=100, help="do_bench repetition time, ms")
    args = parser.parse_args(argv)
    args.shapes = _names(parser, args.shapes, SHAPES, "shapes")
    args.masks = _names(parser, args.masks, MASKS, "masks")
    args.modes = _names(parser, args.modes, MODES, "modes")
    if not args.modes:
        parser.error("--modes needs at least one compile mode")
    args.baselines = set(_names(parser, args.baselines, ("pt", "sdpa", "none"), "baselines"))
    if args.ours_options:
        try:
            args.ours_options = json.loads(args.ours_options)
        except json.JSONDecodeError as error:
            parser.error(f"--ours-options is not JSON: {error}")
        if not isinstance(args.ours_options, dict):
            parser.error("--ours-options must be a JSON object")
    return args


def require_cuda_and_triton():
    """Exit with a clear message where the benchmark cannot run."""
    if not torch.cuda.is_available():
        sys.exit("bench_backward.py needs a CUDA GPU: torch.cuda.is_available() is False")
    try:
        importlib.import_module("triton.testing")  # do_bench lives there
    except ImportError as error:
        sys.exit(f"bench_backward.py needs Triton for do_bench: {error}")


def main(argv=None):
    args = parse_args(argv)
    require_cuda_and_triton()
    allow_retained_backward()
    bench = functools.partial(bench_ms, warmup=args.warmup, rep=args.rep)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cases=[], memory=[])
    log(f"{report['device']}  torch {report['torch']}")

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    for shape in args.shapes:
        for mask in args.masks:
            try:
                row = run_case(shape, mask, args.modes, args.baselines, bench,
                               check=not args.no_check, ours_options=args.ours_options,
                               triton_column=args.triton_column, rounds=args.paired_rounds)
            except Exception as error:  # keep going: one failure should not lose the table
                log(f"{shape} {mask} failed: {one_line(error)}")
                row = dict(shape=shape, mask=mask, error=one_line(error))
            report["cases"].append(row)
            print(json.dumps(row), flush=True)
            free_device_memory("cuda")
            save()

    if args.memory:
        impls = ["ours"] + (["pt"] if "pt" in args.baselines else []) + (
            ["flash", "cudnn"] if "sdpa" in args.baselines else [])
        report["memory"] = run_memory(impls, args.modes[0])
        save()

    if report["cases"]:
        print_case_table(report["cases"], args.modes, args.triton_column)
    if report["memory"]:
        print_memory_table(report["memory"])
    log("done")


if __name__ == "__main__":
    main()
