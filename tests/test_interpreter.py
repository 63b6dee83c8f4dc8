"""Our Triton kernels run on the CPU through Triton's interpreter, against a float64 run
(tests/gpu/flex_check.py's error-ratio rule): the decode kernel (indexing, GQA packing, KV
splits and their merge, mods, captured buffers, block masks, empty rows) and the fused
forward and backward under dynamic shapes. This checks the generated kernels' indexing and
logic, not GPU code generation or speed (tests/gpu covers those). The cases live in
interpreter_cases.py and run in one fresh process (TRITON_INTERPRET must be set before
Triton is imported). The test extra installs Triton, so CI runs them."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, os.path.join(HERE, "interpreter_cases.py")],
                         capture_output=True, text=True, env=env, timeout=1200, cwd="/")
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert results, f"the interpreter run reported nothing (exit {run.returncode}):\n{run.stderr[-3000:]}"
    failed = {r["case"]: r["error"] for r in results if r["error"] is not None}
    assert not failed, "\n\n".join(f"{case}:\n{error}" for case, error in failed.items())
