"""``python -m inductor_flex.bench``: time inductor_flex against PyTorch's FlexAttention and SDPA.

For each shape, mask, pass and compile mode it times

- ``ours``: ``inductor_flex.flex_attention``, compiled with ``torch.compile`` (or eager),
- ``pt``:   ``torch.nn.attention.flex_attention.flex_attention``, compiled the same way,
  each with a block mask from its own ``create_block_mask``,
- ``sdpa``: the ``scaled_dot_product_attention`` kernels that can compute the case
  (cuDNN and FlashAttention-2 for full / causal, the memory-efficient kernel with a dense
  boolean mask where the mask has no score_mod; on the CPU its flash kernel and its
  default dense-mask path),

and prints a table: milliseconds, TFLOP/s of the unmasked work (forward
``4 * B * H * S * S * D * density``; backward 2.5 times that, forward + backward 3.5
times) and ratios baseline time / ours (above 1: ours is faster). Progress goes to stderr
while it compiles and times. ``--csv`` / ``--json`` save every number, ``--plot`` a bar
chart (matplotlib).

On CUDA it times with ``triton.testing.do_bench`` (median). On the CPU it runs a reduced
form for checking the command itself: tiny shapes, ``torch.utils.benchmark`` timing, and
the compiled path of ours is the extern (eager) kernel; PyTorch has no FlexAttention
backward on the CPU, so those cells read ``err``.

The pieces here (shapes, masks written once for both libraries, timing, tables) are also
what ``benchmarks/bench_forward.py`` and ``benchmarks/bench_backward.py`` are built from.

    python -m inductor_flex.bench --masks causal,document --shapes small --passes fwd,bwd
    python -m inductor_flex.bench --device cpu --shapes tiny --modes eager --csv out.csv
"""
import argparse
import contextlib
import csv
import gc
import json
import re
import sys
import time
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

SHAPES = {
    "big": dict(B=4, H=16, S=8192, D=128),
    "small": dict(B=8, H=16, S=4096, D=64),
    "tiny": dict(B=1, H=2, S=256, D=32),  # the CPU form: seconds, not minutes
}
MASKS = ["full", "causal", "sliding_window", "prefix_lm", "document", "alibi_causal", "softcap_causal"]
# Compile mode names -> torch.compile's mode; "eager" runs without torch.compile.
MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs", "eager": None}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Work of each pass in units of the forward's FLOPs: the backward does five matmuls of the
# forward's size against its two.
PASS_WORK = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
PASSES = list(PASS_WORK) + ["decode"]
DECODE_NOT_AVAILABLE = ("decode (one query token against a long KV cache) is not available "
                        "in inductor_flex.bench yet; choose from fwd, bwd, fwdbwd")
BACKWARD_WORK, FORWARD_BACKWARD_WORK = PASS_WORK["bwd"], PASS_WORK["fwdbwd"]
# The efficient kernel turns a bool [S, S] mask into a bf16 bias; beyond 16384^2 entries
# that alone is half a GiB, so larger dense masks are skipped.
DENSE_MASK_MAX_ELEMENTS = 16384 * 16384
# A call slower than this is timed once instead of repeatedly (see bench_unless_slow).
SLOW_CALL_S = 1.0

_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the start."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def free_device_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def allow_retained_backward() -> None:
    """Let a compiled backward run several times on one graph (``retain_graph=True``).

    AOTAutograd otherwise lets the backward reuse ("donate") saved forward buffers, which
    forbids running it twice. Must be set before compiling."""
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False


# ---------------------------------------------------------------------------------------
# Masks and score mods, written once for both libraries
# ---------------------------------------------------------------------------------------

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_case(name, shape, device):
    """(score_mod, mask_mod, dense bool mask [S, S] or None, density) of mask ``name``.

    Sizes are those of the measured tables (window 1024, prefix 2048, documents of 256 to
    2048 tokens) wherever the sequence is long enough for them, scaled down below that."""
    S, H = shape["S"], shape["H"]
    window, prefix = min(1024, S // 4), min(2048, S // 2)
    score_mod = None
    if name == "full":
        mask_mod = None
    elif name in ("causal", "alibi_causal", "softcap_causal"):
        mask_mod = causal
    elif name == "sliding_window":
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    elif name == "prefix_lm":
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < prefix) | (q_idx >= kv_idx)
    elif name == "document":
        shortest, longest = min(256, max(1, S // 16)), min(2048, max(1, S // 2))
        gen = torch.Generator().manual_seed(0)
        lengths, total = [], 0
        while total < S:  # random document lengths between shortest and longest tokens
            length = min(int(torch.randint(shortest, longest + 1, (1,), generator=gen)), S - total)
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


def forward_flops(shape, density: float) -> float:
    return 4 * shape["B"] * shape["H"] * shape["S"] * shape["S"] * shape["D"] * density


def leaf_inputs(shape, device, seed=0, dtype=torch.bfloat16, requires_grad=True):
    """q, k, v (leaves, requiring grad unless told otherwise) and grad_out, all ``[B, H, S, D]``,
    drawn in that order from one seeded generator, so every benchmark sees the same data."""
    B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
    generator = torch.Generator(device=device).manual_seed(seed)
    q, k, v, grad_out = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=generator)
                         for _ in range(4))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v)), grad_out


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, warmup=25, rep=100, device="cuda"):
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (warmup and rep
    in ms), ``torch.utils.benchmark`` on the CPU (runs for about ``rep`` ms)."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    from torch.utils.benchmark import Timer

    fn()  # warm caches; the first call (compiling) is timed by first_call
    measurement = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return measurement.blocked_autorange(min_run_time=rep / 1e3).median * 1e3


@contextlib.contextmanager
def cold_compile_caches():
    """Compiling as a fresh process with an empty cache would: Dynamo reset, and Inductor
    (with Triton's kernels under it) reading and writing a new, empty cache directory with
    its caches switched off, so no earlier compile of either library shortens this one."""
    import os
    import tempfile

    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    saved = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="inductor_flex_cold_") as directory:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
        os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
        try:
            with torch._inductor.config.patch(force_disable_caches=True):
                yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def first_call(fn, device="cuda", cold=False):
    """(result, seconds) of one call of ``fn``: with torch.compile, the compile time;
    ``cold``: a compile from nothing (``cold_compile_caches``), the first call of a new
    process, so two libraries' compile times compare fairly."""
    synchronize(device)
    with cold_compile_caches() if cold else contextlib.nullcontext():
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
    return out, seconds


def bench_unless_slow(fn, bench, device="cuda"):
    """Milliseconds of ``fn()`` by ``bench``, or of one call where that call alone takes
    over SLOW_CALL_S (an unfused fallback), so that such a case cannot eat the run's time."""
    _, seconds = first_call(fn, device)
    if seconds > SLOW_CALL_S:
        log(f"one call takes {seconds:.1f} s: timed once, not repeatedly")
        return seconds * 1e3
    return bench(fn)


def backward_ms(forward, inputs, grad_out, bench, device="cuda"):
    """Milliseconds of the backward alone: one forward, then its gradients per iteration."""
    out = forward()
    return bench_unless_slow(
        lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True), bench, device)


def forward_backward_ms(forward, inputs, grad_out, bench, device="cuda"):
    """Milliseconds of a fresh forward and its gradients per iteration."""
    return bench_unless_slow(lambda: torch.autograd.grad(forward(), inputs, grad_out), bench, device)


def pass_ms(pass_name, forward, inputs, grad_out, bench, device="cuda"):
    """Milliseconds of one pass (fwd, bwd or fwdbwd) of ``forward``, a call on ``inputs``."""
    if pass_name == "fwd":
        with torch.no_grad():
            return bench_unless_slow(forward, bench, device)
    if pass_name == "bwd":
        return backward_ms(forward, inputs, grad_out, bench, device)
    return forward_backward_ms(forward, inputs, grad_out, bench, device)


def pass_first_call(pass_name, forward, inputs, grad_out, device="cuda", cold=False):
    """``first_call`` of one pass run as ``pass_ms`` runs it: the forward without autograd
    for fwd (a graph of its own under torch.compile), a forward and its gradients
    otherwise, so the compiles the timing would hit happen here instead."""
    if pass_name == "fwd":
        with torch.no_grad():
            return first_call(forward, device, cold)
    return first_call(lambda: torch.autograd.grad(forward(), inputs, grad_out), device, cold)


def triton_only(options):
    """``options`` with BACKEND="TRITON": our fused kernels only, never the vendor SDPA
    kernels that "AUTO" may pick for full / causal calls (the "ours (Triton only)" column)."""
    return {**(options or {}), "BACKEND": "TRITON"}


def ratio_to_best_sdpa(row, ours_key, sdpa_key_format):
    """``row[ours_key]`` (TFLOP/s) over the best of SDPA cuDNN / flash in the same row
    (``sdpa_key_format.format(name)``), or None where either is missing."""
    best = max((row.get(sdpa_key_format.format(name)) or 0.0) for name in ("cudnn", "flash"))
    ours = row.get(ours_key)
    return ours / best if ours and best else None


def paired_ratio(measure_ours, measure_theirs, rounds: int) -> float:
    """Median over ``rounds`` of theirs / ours milliseconds (``measure_*()`` returns one
    timing), the two timed back to back in each round, which one first alternating. Two
    calls that run the same kernel (ours through a vendor, and SDPA) then compare under
    the same clocks and temperature instead of each under those of its own moment."""
    import statistics

    ratios = []
    for index in range(rounds):
        if index % 2:
            theirs, ours = measure_theirs(), measure_ours()
        else:
            ours, theirs = measure_ours(), measure_theirs()
        ratios.append(theirs / ours)
    return statistics.median(ratios)


def best_sdpa(row, sdpa_key_format):
    """The name (cudnn / flash) of the faster SDPA backend in ``row``, or None."""
    timed = {name: row.get(sdpa_key_format.format(name)) for name in ("cudnn", "flash")}
    timed = {name: value for name, value in timed.items() if value}
    return max(timed, key=timed.get) if timed else None


def compile_flex(flex, mode):
    """``flex`` under ``torch.compile`` in compile mode ``mode`` (a MODES name), or as is for eager."""
    return flex if MODES[mode] is None else torch.compile(flex, mode=MODES[mode])


def sdpa_forwards(mask_name, score_mod, dense, q, k, v):
    """{name: forward callable} of the SDPA kernels that can compute this case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if score_mod is not None:
        return {}
    on_cuda = q.device.type == "cuda"
    forwards = {}
    if mask_name in ("full", "causal"):
        backends = ((("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
                    if on_cuda else (("flash", SDPBackend.FLASH_ATTENTION),))
        for name, backend in backends:
            def forward(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=mask_name == "causal")
            forwards[name] = forward
    if dense is not None and dense.numel() <= DENSE_MASK_MAX_ELEMENTS:
        # The CPU has no memory-efficient kernel; SDPA's own choice serves a dense mask there.
        def forward():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if on_cuda else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        forwards["dense"] = forward
    return forwards


# ---------------------------------------------------------------------------------------
# Tables and files
# ---------------------------------------------------------------------------------------

def print_markdown(headers, rows, file=None):
    """Print one table (headers, then rows of cells) with columns padded to align."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    print(file=file)
    print(" | ".join(str(h).ljust(w) for h, w in zip(headers, widths)), file=file)
    print("-|-".join("-" * w for w in widths), file=file)
    for line in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)), file=file)


def cell(row, key, spec=".0f", error_keys=()):
    """The number at ``key``; ``err`` where it failed; ``-`` where it does not apply."""
    if key in row:
        return format(row[key], spec)
    if "error" in row or any(k in row for k in error_keys):
        return "err"
    return "-"


def write_json(path, report) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def write_csv(path, rows: Sequence[Dict]) -> None:
    """One line per row; the columns are every key any row has, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

def parse_shape(text: str):
    """A SHAPES name or ``BxHxSxD`` (e.g. ``2x4x512x64``) -> (name, shape dict)."""
    if text in SHAPES:
        return text, SHAPES[text]
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", text)
    if not match or 0 in map(int, match.groups()):
        raise ValueError(f"shape {text!r} is neither one of {list(SHAPES)} nor BxHxSxD with sizes > 0")
    return text, dict(zip("BHSD", map(int, match.groups())))


def implementations(baselines, device) -> List[str]:
    """Column names of the implementations measured, ours first."""
    names = ["ours"] + (["pt"] if "pt" in baselines else [])
    if "sdpa" in baselines:
        names += ["sdpa_cudnn", "sdpa_flash", "sdpa_dense"] if device.type == "cuda" else \
            ["sdpa_flash", "sdpa_dense"]
    return names


def row_head(shape_name, shape, dtype, mask_name, pass_name, mode) -> Dict:
    """The columns that say which case a row measured."""
    return {"shape": shape_name, **shape, "dtype": str(dtype).replace("torch.", ""),
            "mask": mask_name, "pass": pass_name, "mode": mode}


def run_case(shape_name, shape, mask_name, passes, mode, baselines, bench, dtype, device,
             progress=log):
    """Rows (one per pass) of one shape, mask and compile mode: ``{impl}_ms``,
    ``{impl}_tflops``, ``{impl}_compile_s`` (flex libraries), ``ratio_{impl}`` (that
    baseline's time / ours) and ``{impl}_error`` where one failed."""
    import inductor_flex

    allow_retained_backward()
    score_mod, mask_mod, dense, density = make_case(mask_name, shape, device)
    inputs, grad_out = leaf_inputs(shape, device, dtype=dtype)
    S = shape["S"]
    libraries = [("ours", inductor_flex)]
    if "pt" in baselines:
        # The baseline this command compares against: imported here only, never by the package.
        from torch.nn.attention import flex_attention as pytorch_flex

        libraries.append(("pt", pytorch_flex))
    block_masks = {lib: None if mask_mod is None else
                   module.create_block_mask(mask_mod, None, None, S, S, device=device)
                   for lib, module in libraries}
    rows = []
    torch._dynamo.reset()
    for pass_name in passes:
        row = dict(row_head(shape_name, shape, dtype, mask_name, pass_name, mode), density=density)
        flops = PASS_WORK[pass_name] * forward_flops(shape, density)
        tag = f"{shape_name} {mask_name} {pass_name} {mode}"
        # PyTorch refuses inputs that require grad where it has no backward (the CPU), so
        # the forward alone gets detached views of the same data.
        args = tuple(t.detach() for t in inputs) if pass_name == "fwd" else inputs
        timed = {}
        for lib, module in libraries:
            compiled = compile_flex(module.flex_attention, mode)

            def forward(compiled=compiled, block_mask=block_masks[lib]):
                return compiled(*args, score_mod=score_mod, block_mask=block_mask)

            progress(f"{tag}: {'running' if mode == 'eager' else 'compiling'} {lib}")
            try:
                _, row[f"{lib}_compile_s"] = pass_first_call(pass_name, forward, inputs, grad_out,
                                                             device, cold=mode != "eager")
                progress(f"{tag}: timing {lib}")
                timed[lib] = pass_ms(pass_name, forward, inputs, grad_out, bench, device)
            except Exception as error:  # keep going: the other implementations still count
                row[f"{lib}_error"] = one_line(error)
                progress(f"{tag}: {lib} failed: {one_line(error)}")
                free_device_memory(device)
        if "sdpa" in baselines:
            for name, forward in sdpa_forwards(mask_name, score_mod, dense, *args).items():
                progress(f"{tag}: timing sdpa {name}")
                try:
                    timed[f"sdpa_{name}"] = pass_ms(pass_name, forward, inputs, grad_out, bench, device)
                except Exception as error:
                    row[f"sdpa_{name}_error"] = one_line(error)
                    progress(f"{tag}: sdpa {name} failed: {one_line(error)}")
                    free_device_memory(device)
        for impl, ms in timed.items():
            row[f"{impl}_ms"] = ms
            row[f"{impl}_tflops"] = flops / ms / 1e9
            if impl != "ours" and "ours" in timed:
                row[f"ratio_{impl}"] = ms / timed["ours"]
        rows.append(row)
    return rows


def print_results(rows, impls, file=None):
    """The command's table: per row, each implementation's ms (and TF/s) and the ratio of
    each baseline's time to ours."""
    headers = ["shape", "dtype", "mask", "pass", "mode", "ours ms", "ours TF/s", "compile s"]
    for impl in impls[1:]:
        headers += [f"{impl} ms", f"{impl}/ours"]
    lines = []
    for r in rows:
        line = [r["shape"], r["dtype"], r["mask"], r["pass"], r["mode"],
                cell(r, "ours_ms", ".3f", ("ours_error",)),
                cell(r, "ours_tflops", ".3g", ("ours_error",)),
                cell(r, "ours_compile_s", ".1f", ("ours_error",))]
        for impl in impls[1:]:
            errors = (f"{impl}_error",)
            line += [cell(r, f"{impl}_ms", ".3f", errors),
                     cell(r, f"ratio_{impl}", ".2f", errors + ("ours_error",))]
        lines.append(line)
    print_markdown(headers, lines, file=file)


def plot_results(path, rows, impls) -> None:
    """A bar chart of each row's milliseconds per implementation (log scale) to ``path``."""
    from .visualize import new_figure

    figure = new_figure((max(6.0, 1.2 * len(rows) + 2.0), 4.0), 100)
    ax = figure.subplots()
    width = 0.8 / len(impls)
    for n, impl in enumerate(impls):
        heights = [r.get(f"{impl}_ms", float("nan")) for r in rows]  # nan: no bar
        ax.bar([i + n * width for i in range(len(rows))], heights, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['shape']}\n{r['mask']}\n{r['pass']} {r['mode']}" for r in rows],
                       fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds (lower is faster)")
    ax.set_title("inductor_flex.bench", fontsize=9)
    ax.legend(fontsize=7)
    figure.savefig(path)


def _names(parser, text, known, what):
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {list(known)}")
    if not names:
        parser.error(f"--{what} needs at least one of {list(known)}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m inductor_flex.bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda when available)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of {list(SHAPES)} or BxHxSxD (default: small on "
                             "CUDA, tiny on the CPU)")
    parser.add_argument("--masks", default="full,causal", help=f"comma list of {MASKS}")
    parser.add_argument("--passes", default="fwd", help=f"comma list of {PASSES}")
    parser.add_argument("--modes", default="default", help=f"comma list of {list(MODES)}")
    parser.add_argument("--dtype", default=None,
                        help=f"one of {list(DTYPES)} (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--baselines", default="pt,sdpa", help="comma list of pt, sdpa, or none")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warmup, ms (CUDA)")
    parser.add_argument("--rep", type=float, default=100, help="time spent timing each call, ms")
    parser.add_argument("--csv", default=None, help="write one line per row to this CSV file")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--plot", default=None, help="draw a bar chart PNG here (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False; use --device cpu")
    on_cuda = args.device.type == "cuda"
    try:
        args.shapes = [parse_shape(text) for text in
                       (args.shapes or ("small" if on_cuda else "tiny")).split(",") if text]
    except ValueError as error:
        parser.error(str(error))
    args.masks = _names(parser, args.masks, MASKS, "masks")
    args.passes = _names(parser, args.passes, PASSES, "passes")
    args.modes = _names(parser, args.modes, MODES, "modes")
    args.dtype = DTYPES[_names(parser, args.dtype or ("bf16" if on_cuda else "fp32"), DTYPES, "dtype")[0]]
    args.baselines = set(_names(parser, args.baselines, ("pt", "sdpa", "none"), "baselines"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    progress = (lambda message: None) if args.quiet else log
    passes = [p for p in args.passes if p != "decode"]
    if "decode" in args.passes:
        print(f"inductor_flex.bench: {DECODE_NOT_AVAILABLE}", file=sys.stderr, flush=True)
        if not passes:
            return 2
    if args.device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            sys.exit("inductor_flex.bench on CUDA times with triton.testing.do_bench; install Triton")
        device_name = torch.cuda.get_device_name(args.device)
    else:
        device_name = f"CPU ({torch.get_num_threads()} threads; reduced form, compiled path = extern)"
    report = dict(device=device_name, torch=torch.__version__, rows=[])
    progress(f"{device_name}  torch {torch.__version__}")

    def bench(fn):
        return bench_ms(fn, warmup=args.warmup, rep=args.rep, device=args.device)

    cases = [(shape, mask, mode) for shape in args.shapes for mask in args.masks for mode in args.modes]
    for number, ((shape_name, shape), mask, mode) in enumerate(cases, 1):
        tagged = lambda message, number=number: progress(f"[{number}/{len(cases)}] {message}")
        try:
            rows = run_case(shape_name, shape, mask, passes, mode, args.baselines, bench,
                            args.dtype, args.device, tagged)
        except Exception as error:  # keep going: one failure should not lose the table
            tagged(f"{shape_name} {mask} failed: {one_line(error)}")
            rows = [dict(row_head(shape_name, shape, args.dtype, mask, pass_name, mode),
                         error=one_line(error)) for pass_name in passes]
        report["rows"] += rows
        free_device_memory(args.device)
        if args.json:  # after every case, so an interrupted run keeps what it measured
            write_json(args.json, report)

    impls = implementations(args.baselines, args.device)
    print(f"# {device_name}  torch {torch.__version__}; ratio = baseline ms / ours ms "
          "(above 1: ours is faster)")
    print_results(report["rows"], impls)
    if args.csv:
        write_csv(args.csv, report["rows"])
    if args.plot:
        plot_results(args.plot, report["rows"], impls)
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
