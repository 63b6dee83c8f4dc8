"""The benchmark command (inductor_flex/bench.py) end to end in its reduced CPU form, and the
benchmark scripts built on its pieces (benchmarks/bench_forward.py, bench_backward.py)."""
import csv
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from inductor_flex import bench

REPO = pathlib.Path(__file__).resolve().parents[1]
# Tiny CPU shapes, eager (compiling PyTorch's FlexAttention on the CPU alone takes seconds),
# short timing windows: the whole command in about a second.
# PyTorch warns that its eager FlexAttention is unfused: that is what "eager" times here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
FAST = ["--device", "cpu", "--shapes", "1x2x128x16", "--modes", "eager", "--rep", "2", "--quiet"]


def test_command_writes_table_csv_and_json(tmp_path, capsys):
    csv_path, json_path = tmp_path / "rows.csv", tmp_path / "rows.json"
    status = bench.main(FAST + ["--masks", "causal,alibi_causal", "--passes", "fwd,bwd",
                                "--baselines", "pt,sdpa", "--csv", str(csv_path),
                                "--json", str(json_path)])
    assert status == 0
    table = capsys.readouterr().out
    assert "ratio = baseline ms / ours ms" in table
    header = next(line for line in table.splitlines() if line.startswith("shape"))
    assert [cell.strip() for cell in header.split("|")][-6:] == [
        "pt ms", "pt/ours", "sdpa_flash ms", "sdpa_flash/ours", "sdpa_dense ms", "sdpa_dense/ours"]
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["mask"], r["pass"]) for r in rows] == [
        ("causal", "fwd"), ("causal", "bwd"), ("alibi_causal", "fwd"), ("alibi_causal", "bwd")]
    causal_fwd = rows[0]
    for impl in ("pt", "sdpa_flash", "sdpa_dense"):
        assert causal_fwd[f"ratio_{impl}"] == pytest.approx(causal_fwd[f"{impl}_ms"] / causal_fwd["ours_ms"])
    assert causal_fwd["density"] == pytest.approx((128 * 129 / 2) / 128**2)
    # PyTorch has no FlexAttention backward on the CPU: recorded, not fatal.
    assert "NotImplementedError" in rows[1]["pt_error"] and rows[1]["ours_ms"] > 0
    assert "sdpa_flash_ms" not in rows[2]  # SDPA cannot add a score_mod
    with open(csv_path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4 and float(lines[0]["ratio_pt"]) == pytest.approx(causal_fwd["ratio_pt"])
    table_line = next(line for line in table.splitlines() if " causal " in line and " bwd " in line)
    assert "err" in table_line


def test_module_entry_point_with_decode_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bars.png"
    result = subprocess.run(
        [sys.executable, "-m", "inductor_flex.bench", *FAST[:-1], "--masks", "full",
         "--passes", "fwd,decode", "--baselines", "sdpa", "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "decode (one query token against a long KV cache) is not available" in result.stderr
    assert "[1/1] 1x2x128x16 full fwd eager: timing ours" in result.stderr  # progress
    assert "| sdpa_flash/ours" in result.stdout and " decode " not in result.stdout
    assert plot.stat().st_size > 5000


def test_decode_alone_and_bad_options(capsys):
    assert bench.main(FAST + ["--passes", "decode"]) == 2
    assert "not available" in capsys.readouterr().err
    for bad in (["--masks", "nope"], ["--shapes", "2x0x64x16"], ["--passes", ""],
                ["--dtype", "fp8"], ["--baselines", "cudnn"]):
        with pytest.raises(SystemExit):
            bench.parse_args(FAST + bad)
    assert "unknown masks ['nope']" in capsys.readouterr().err


def test_masks_keep_the_measured_sizes_on_long_sequences():
    # docs/measurements.md's tables used window 1024, prefix 2048 and documents of 256 to
    # 2048 tokens at S = 4096 and 8192; shorter sequences scale them down.
    shape = dict(bench.SHAPES["small"])
    q = torch.arange(4096)[:, None]
    kv = torch.arange(4096)[None, :]
    zero = torch.zeros((), dtype=torch.int32)
    _, window, _, _ = bench.make_case("sliding_window", shape, "cpu")
    assert torch.equal(window(zero, zero, q, kv), (q >= kv) & (q - kv < 1024))
    _, prefix, _, _ = bench.make_case("prefix_lm", shape, "cpu")
    assert torch.equal(prefix(zero, zero, q, kv), (kv < 2048) | (q >= kv))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_scripts_use_the_shared_pieces(capsys):
    forward, backward = load_script("bench_forward"), load_script("bench_backward")
    for script in (forward, backward):
        assert script.make_case is bench.make_case and script.print_markdown is bench.print_markdown
    args = backward.parse_args(["--shapes", "small", "--masks", "causal", "--no-memory"])
    assert args.shapes == ["small"] and args.modes == ["default"] and not args.memory
    forward.print_table([dict(shape="small", mask="causal", ours_default_tflops=400.0,
                              ours_triton_default_tflops=380.0, pt_default_tflops=350.0,
                              ratio_default=1.14, ours_default_vs_best_sdpa=1.01)], ["default"],
                        triton_column=True)
    backward.print_case_table([dict(shape="small", mask="causal", ours_default_error="boom")],
                              ["default"])
    out = capsys.readouterr().out
    assert re.search(r"small \| causal \| 400 +\| 380 +\| 350 +\| 1\.14 +\| [^|]+\| 1\.01", out), out
    assert "small | causal | err" in out


def test_decode_benchmark_pieces():
    decode = load_script("bench_decode")
    assert decode.bench_ms is bench.bench_ms and decode.print_markdown is bench.print_markdown
    k = torch.zeros(2, 4, 1000, 64, dtype=torch.bfloat16)
    assert decode.kv_bytes_read(k, k, None) == 2 * 4 * 1000 * 64 * 2 * 2
    window = decode.window_mask(999, 256)
    assert torch.equal(window(0, 0, torch.tensor(0), torch.arange(1000)), torch.arange(1000) >= 744)
    row = dict(ours_GBps=1234.5, pt_error="boom")
    assert (decode.fmt(row, "ours_GBps", ".0f"), decode.fmt(row, "pt_GBps", ".0f"),
            decode.fmt(row, "sdpa_GBps", ".0f")) == ("1234", "err", "-")


def test_paired_ratio_alternates_the_order_and_takes_the_median():
    # A clock that slows down with every timing: the call timed second in a round reads
    # longer, so a ratio from one fixed order would be biased; alternating cancels it.
    order, clock = [], iter(range(100, 200))

    def timing(name, base):
        def measure():
            order.append(name)
            return base * next(clock) / 100
        return measure

    ratio = bench.paired_ratio(timing("ours", 2.0), timing("theirs", 2.0), rounds=4)
    assert order == ["ours", "theirs", "theirs", "ours"] * 2
    assert ratio == pytest.approx(1.0, abs=0.011)  # same kernel: ratios 1.01, 0.99, ... median ~1
    assert bench.paired_ratio(lambda: 1.0, lambda: 1.5, rounds=3) == 1.5
    assert bench.best_sdpa({"sdpa_cudnn_tflops": 400.0, "sdpa_flash_tflops": 300.0}, "sdpa_{}_tflops") == "cudnn"
    assert bench.best_sdpa({"sdpa_flash_tflops": 300.0}, "sdpa_{}_tflops") == "flash"
    assert bench.best_sdpa({}, "sdpa_{}_tflops") is None
