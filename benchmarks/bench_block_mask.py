"""Block-mask construction on the CPU: time and peak extra memory.

Cases:
  * causal mask, create_block_mask, S = 16k / 32k / 128k (128k: the memory-bound check,
    which must stay under 1 GB of extra memory);
  * packed documents, create_document_block_mask at 1M tokens (random lengths summing to
    2**20) and at 16k tokens, next to the generic create_block_mask on the same element mask;
  * PyTorch's create_block_mask (torch.nn.attention.flex_attention) on the same inputs as a
    reference, where its estimated peak (~10 bytes per pair) stays within 10 GB; otherwise
    the table says so.

Every measurement runs in a fresh subprocess. "Peak extra" is the growth of the process's
peak resident set (VmHWM, reset just before the call) over its resident set before the
call: everything the construction allocated at its high point, result included.
For the document constructor at 1M tokens the first call of a process is shown apart
(it touches ~1 GB of never-used memory) from the best of the following calls.

Usage: python benchmarks/bench_block_mask.py [--quick] [--threads N]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the 128k causal case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the measured calls (default: torch's)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, size, repeats = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(_run_case(name, size, repeats)))
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
