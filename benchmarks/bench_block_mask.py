"""Block-mask construction: time and peak extra memory, on the CPU (default) or CUDA.

CPU cases (``--device cpu``):
  * causal mask, create_block_mask, S = 16k / 32k / 128k (128k: the memory-bound check,
    which must stay under 1 GB of extra memory);
  * packed documents, create_document_block_mask at 1M tokens (random lengths summing to
    2**20) and at 16k tokens, next to the generic create_block_mask on the same element mask;
  * PyTorch's create_block_mask (torch.nn.attention.flex_attention) on the same inputs as a
    reference, where its estimated peak (~10 bytes per pair) stays within 10 GB; otherwise
    the table says so.

Every CPU measurement runs in a fresh subprocess. "Peak extra" is the growth of the
process's peak resident set (VmHWM, reset just before the call) over its resident set
before the call: everything the construction allocated at its high point, result included.
For the document constructor at 1M tokens the first call of a process is shown apart
(it touches ~1 GB of never-used memory) from the best of the following calls.

CUDA cases (``--device cuda``; issue 20's table), one process, B = H = 1 (None):
  * causal create_block_mask at S = 8k / 32k / 128k: ours by default and with
    ``_compile=True``, PyTorch's both ways (its eager form where ~10 B per pair fits);
  * packed documents at 64k and 1M tokens: our create_document_block_mask from host
    lengths and from device offsets with ``total_length`` (no host sync), and the generic
    create_block_mask of both libraries on the same element mask (a closure over the
    per-token document ids on the GPU) where it is affordable;
  * the ratio of the causal mask's construction (S = 8192) to the compiled forward it
    serves (B=4, H=16, D=128, bf16), ours and PyTorch's.
Times are wall-clock medians of synchronised calls after a first call (shown apart: it
compiles); "peak extra" is ``torch.cuda.max_memory_allocated`` over the allocation before
the call (result included). Each row's timed calls stop once ``--row-budget`` seconds are
spent (at least one call), a row whose one call is predicted (from the same
implementation at a smaller size, time ~ tokens**2) to exceed that budget is not run, and
every row is printed ("row: ...") as soon as it is measured, so a run cut short by a time
limit still leaves its numbers; the tables follow at the end.

Usage: python benchmarks/bench_block_mask.py [--device cpu|cuda] [--quick] [--smoke] [--threads N]
       [--row-budget S] [--sections causal,document,ratio]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ONE_M = 1 << 20
# PyTorch's create_block_mask peaked at ~10 bytes per (q, kv) pair here (10.2 GB at 32k x 32k:
# the dense bool mask, its padded / permuted copies and the block sums); it is run only
# where that estimate stays within 10 GB.
PYTORCH_BYTES_PER_PAIR = 10
PYTORCH_LIMIT_BYTES = 10 << 30


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure(build, repeats: int) -> dict:
    """Time ``build()`` (first call and best of ``repeats``) and its peak extra memory."""
    import gc

    gc.collect()
    before_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    result = build()
    first = time.perf_counter() - start
    peak_extra_mb = (_status_kb("VmHWM") - before_kb) / 1024
    del result
    times = [first]
    for _ in range(repeats - 1):
        gc.collect()
        start = time.perf_counter()
        result = build()
        times.append(time.perf_counter() - start)
        del result
    return {"first_s": first, "best_s": min(times), "peak_extra_mb": peak_extra_mb}


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _document_lengths(total: int, seed: int = 0) -> torch.Tensor:
    """Random document lengths (1 .. 8191, mean ~4k) summing to ``total``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8192, (2 * total // 4096 + 2,), generator=gen)
    lengths = lengths[lengths.cumsum(0) < total]
    return torch.cat([lengths, torch.tensor([total - int(lengths.sum())])])


def _run_case(name: str, size: int, repeats: int) -> dict:
    if name.startswith("pytorch"):
        from torch.nn.attention.flex_attention import create_block_mask
    else:
        from inductor_flex.block_mask import create_block_mask, create_document_block_mask
    from inductor_flex.masks import generate_document_mask

    if name in ("ours_causal", "pytorch_causal"):
        return _measure(lambda: create_block_mask(_causal, None, None, size, size, device="cpu"), repeats)
    lengths = _document_lengths(size)
    if name == "ours_document":
        return _measure(lambda: create_document_block_mask(lengths=lengths, causal=True, device="cpu"), repeats)
    document = generate_document_mask(lengths=lengths, causal=True, device="cpu")
    return _measure(lambda: create_block_mask(document, None, None, size, size, device="cpu"), repeats)


def _child(name: str, size: int, repeats: int, threads) -> dict:
    command = [sys.executable, __file__, "--child", name, str(size), str(repeats)]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------

# PyTorch's eager create_block_mask holds ~10 bytes per pair on the GPU too (10.5 GB at
# 32k x 32k); it is run only where that stays within 40 GB.
PYTORCH_CUDA_LIMIT_BYTES = 40 << 30


# Wall-clock seconds one CUDA row may spend on its timed calls (after the first call):
# repeats stop there, and a row predicted to need more for one call is not run.
CUDA_ROW_BUDGET_S = 5.0


def _cuda_measure(build, repeats: int, budget_s=None) -> dict:
    """First call (compiles where it compiles), then up to ``repeats`` synchronised calls
    (at least one; no more once ``budget_s``, default the row budget, is spent): their
    median, and the peak memory allocated over the allocation before the first of them."""
    import gc
    import statistics

    budget_s = CUDA_ROW_BUDGET_S if budget_s is None else budget_s
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = build()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    del result
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    spent_since = time.perf_counter()
    while len(times) < max(1, repeats) and (not times or time.perf_counter() - spent_since < budget_s):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = build()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak_extra = torch.cuda.max_memory_allocated() - before
        del result
    return {"first_s": first, "ms": 1e3 * statistics.median(times), "peak_extra_mb": peak_extra / 2**20,
            "calls": len(times)}


def _cuda_row_cells(r: dict, reference_ms) -> list:
    """One table line: measured numbers, or the note saying why there are none."""
    if "ms" not in r:
        return [r["case"], r["tokens"], r["implementation"], "-", r.get("note", "-"), "-", "-"]
    ratio = f"{r['ms'] / reference_ms:.2f}" if reference_ms else "-"
    return [r["case"], r["tokens"], r["implementation"], f"{r['first_s']:.2f}", f"{r['ms']:.3f}",
            f"{r['peak_extra_mb']:.1f}", ratio]


def _cuda_row(table: list, case: str, tokens: int, implementation: str, build, repeats: int,
              skip_reason: str = "", reference_ms=None) -> dict:
    """Measure one row, append it to ``table`` and print it at once (so a run cut short
    still leaves its numbers)."""
    from inductor_flex.bench import free_device_memory, log, one_line

    row = dict(case=case, tokens=tokens, implementation=implementation)
    if skip_reason:
        row["note"] = skip_reason
    else:
        log(f"{case} {tokens}: {implementation}")
        try:
            row.update(_cuda_measure(build, repeats))
        except Exception as error:  # keep going: one failure should not lose the table
            row["note"] = one_line(error)
            free_device_memory("cuda")
    table.append(row)
    print("row: " + " | ".join(str(c) for c in _cuda_row_cells(row, reference_ms)), flush=True)
    return row


def _too_slow(table: list, case: str, implementation: str, tokens: int) -> str:
    """Why a row is not run (or ""): one call predicted, from this implementation's row at
    the largest smaller size (time grows with the pairs, tokens**2), to exceed the row
    budget."""
    smaller = [r for r in table if r["case"] == case and r["implementation"] == implementation
               and r["tokens"] < tokens and "ms" in r]
    if not smaller:
        return ""
    last = max(smaller, key=lambda r: r["tokens"])
    predicted_s = last["ms"] / 1e3 * (tokens / last["tokens"]) ** 2
    if predicted_s <= CUDA_ROW_BUDGET_S:
        return ""
    return f"not run: ~{predicted_s:,.0f} s per call predicted from {last['tokens']} tokens (> {CUDA_ROW_BUDGET_S:.0f} s)"


def _document_ids_on(lengths: torch.Tensor, device: str) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths).to(device)


def run_cuda(smoke: bool, quick: bool, sections=("causal", "document")) -> list:
    """Every CUDA row (dicts: case, tokens, implementation, first_s, ms, peak_extra_mb or note)."""
    from torch.nn.attention import flex_attention as torch_flex

    import inductor_flex
    from inductor_flex.masks import create_document_block_mask

    device = "cuda"
    repeats = 3 if smoke else 10
    causal_sizes = [1024, 4096] if smoke else [8192, 32768] + ([] if quick else [131072])
    document_sizes = [8192] if smoke else [1 << 16, ONE_M]
    causal_sizes = causal_sizes if "causal" in sections else []
    document_sizes = document_sizes if "document" in sections else []
    table = []
    print("row: mask | tokens | implementation | first (s) | median (ms) | peak extra (MB) | ratio", flush=True)
    # PyTorch _compile=True first: the other rows' ratios are to it, printed as they come.
    builders = {
        "PyTorch _compile=True": lambda mod, n, **kw: torch_flex.create_block_mask(
            mod, None, None, n, n, device=device, _compile=True, **kw),
        "ours": lambda mod, n, **kw: inductor_flex.create_block_mask(mod, None, None, n, n, device=device, **kw),
        "ours _compile=True": lambda mod, n, **kw: inductor_flex.create_block_mask(
            mod, None, None, n, n, device=device, _compile=True, **kw),
        "PyTorch": lambda mod, n, **kw: torch_flex.create_block_mask(mod, None, None, n, n, device=device, **kw),
    }

    def skip_reason(case, name, size, pytorch_eager):
        needed = PYTORCH_BYTES_PER_PAIR * size * size
        if pytorch_eager and needed > PYTORCH_CUDA_LIMIT_BYTES:
            return f"not run: needs ~{needed / 2**30:,.0f} GiB (~10 B per pair)"
        return _too_slow(table, case, name, size)

    for size in causal_sizes:
        reference = None
        for name, build in builders.items():
            row = _cuda_row(table, "causal", size, name, lambda build=build, size=size: build(_causal, size),
                            repeats, skip_reason("causal", name, size, name == "PyTorch"), reference)
            if name == "PyTorch _compile=True":
                reference = row.get("ms")

    for size in document_sizes:
        lengths = _document_lengths(size)
        offsets_on_device = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device)
        _cuda_row(table, "document", size, "ours create_document_block_mask (host lengths)",
                  lambda lengths=lengths: create_document_block_mask(lengths=lengths, device=device), repeats)
        _cuda_row(table, "document", size, "ours create_document_block_mask (device offsets, total_length)",
                  lambda o=offsets_on_device, size=size: create_document_block_mask(
                      offsets=o, device=device, total_length=size), repeats)
        ids = _document_ids_on(lengths, device)

        def document_causal(b, h, q_idx, kv_idx, ids=ids):
            return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

        for name in ("ours", "PyTorch _compile=True", "PyTorch"):
            implementation = f"{name} create_block_mask"
            _cuda_row(table, "document", size, implementation,
                      lambda build=builders[name], size=size: build(document_causal, size),
                      1 if size == ONE_M else repeats,
                      skip_reason("document", implementation, size, name == "PyTorch"))
    return table


def attention_ratio_rows(smoke: bool) -> list:
    """Mask construction (causal, S) against the compiled forward it serves, per library."""
    from torch.nn.attention import flex_attention as torch_flex

    import inductor_flex
    from inductor_flex.bench import bench_ms, leaf_inputs

    shape = dict(B=1, H=2, S=1024, D=64) if smoke else dict(B=4, H=16, S=8192, D=128)
    S = shape["S"]
    (q, k, v), _ = leaf_inputs(shape, "cuda", requires_grad=False)
    rows = []
    for name, module in (("ours", inductor_flex), ("PyTorch", torch_flex)):
        def build(module=module):
            return module.create_block_mask(_causal, None, None, S, S, device="cuda")

        block_mask = build()
        forward = torch.compile(module.flex_attention)
        with torch.no_grad():
            forward(q, k, v, block_mask=block_mask)
            forward_ms = bench_ms(lambda: forward(q, k, v, block_mask=block_mask))
        mask_ms = _cuda_measure(build, 3 if smoke else 20)["ms"]
        rows.append(dict(library=name, shape="B{B} H{H} S{S} D{D} bf16".format(**shape), mask_ms=mask_ms,
                         forward_ms=forward_ms, ratio=mask_ms / forward_ms))
    return rows


def print_cuda(table: list, ratios: list) -> None:
    from inductor_flex.bench import print_markdown

    reference = {r["tokens"]: r.get("ms") for r in table
                 if r["case"] == "causal" and r["implementation"] == "PyTorch _compile=True"}
    lines = [_cuda_row_cells(r, reference.get(r["tokens"]) if r["case"] == "causal" else None) for r in table]
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}; ratio = ms / PyTorch _compile=True ms")
    print_markdown(["mask", "tokens", "implementation", "first (s)", "median (ms)", "peak extra (MB)",
                    "ratio"], lines)
    print_markdown(["library", "forward (causal, compiled)", "causal mask ms", "forward ms", "mask / forward"],
                   [[r["library"], r["shape"], f"{r['mask_ms']:.3f}", f"{r['forward_ms']:.3f}", f"{r['ratio']:.3f}"]
                    for r in ratios])


def main() -> None:
    global CUDA_ROW_BUDGET_S
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="skip the 128k causal case")
    parser.add_argument("--smoke", action="store_true",
                        help="CUDA: small sizes and few repeats, to check the command runs")
    parser.add_argument("--json", default=None, help="CUDA: write every row to this file")
    parser.add_argument("--row-budget", type=float, default=CUDA_ROW_BUDGET_S,
                        help="CUDA: seconds of timed calls per row; rows predicted to exceed it are skipped")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the measured calls (default: torch's)")
    parser.add_argument("--sections", default="causal,document,ratio",
                        help="CUDA: comma list of the tables to run (causal, document, ratio)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, size, repeats = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(_run_case(name, size, repeats)))
        return
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda, but torch.cuda.is_available() is False")
        CUDA_ROW_BUDGET_S = args.row_budget
        sections = args.sections.split(",")
        table = run_cuda(args.smoke, args.quick, sections)
        ratios = attention_ratio_rows(args.smoke) if "ratio" in sections else []
        print_cuda(table, ratios)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(rows=table, attention=ratios), f, indent=1)
        return

    cases = [
        ("causal", 16384, "ours_causal", 3),
        ("causal", 16384, "pytorch_causal", 3),
        ("causal", 32768, "ours_causal", 2),
        ("causal", 32768, "pytorch_causal", 2),
        ("causal", 131072, "ours_causal", 1),
        ("causal", 131072, "pytorch_causal", 1),
        ("document", 16384, "ours_document", 5),
        ("document", 16384, "ours_generic", 3),
        ("document", 16384, "pytorch_generic", 3),
        ("document", ONE_M, "ours_document", 5),
        ("document", ONE_M, "ours_generic", 1),
        ("document", ONE_M, "pytorch_generic", 1),
    ]
    labels = {
        "ours_causal": "inductor_flex create_block_mask",
        "pytorch_causal": "PyTorch create_block_mask",
        "ours_document": "inductor_flex create_document_block_mask",
        "ours_generic": "inductor_flex create_block_mask",
        "pytorch_generic": "PyTorch create_block_mask",
    }
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    header = f"| {'mask':8} | {'tokens':>9} | {'implementation':42} | {'first (s)':>9} | {'best (s)':>8} | {'peak extra (MB)':>15} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for mask, size, name, repeats in cases:
        if args.quick and size == 131072:
            continue
        row = f"| {mask:8} | {size:>9} | {labels[name]:42} |"
        needed = PYTORCH_BYTES_PER_PAIR * size * size
        if name.startswith("pytorch") and needed >= PYTORCH_LIMIT_BYTES:
            print(f"{row} not run: needs ~{needed / 2**30:,.0f} GiB (~10 B per pair; > 10 GB) |")
            continue
        if name == "ours_generic" and size == ONE_M:
            print(f"{row} not run: evaluates the mask_mod at 2**40 pairs (~hours on 2 cores) |")
            continue
        result = _child(name, size, repeats, args.threads)
        if "error" in result:
            print(f"{row} failed: {result['error']} |")
            continue
        print(f"{row} {result['first_s']:>9.3f} | {result['best_s']:>8.3f} | {result['peak_extra_mb']:>15.1f} |")


if __name__ == "__main__":
    main()
