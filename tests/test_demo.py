"""examples/demo.py runs (in its --small mode, on CPU) and reports what it promises."""
import os
import pathlib
import subprocess
import sys

DEMO = pathlib.Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_runs_small_on_cpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(DEMO), "--small"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("inductor_flex demo: importing")  # speaks before the slow import
    assert "median of 2 calls" in result.stdout
    assert sum("sparsity" in line and "max |compiled - float64|" in line for line in lines) == 3
    assert "forward + backward" in result.stdout and "lse" in result.stdout
    assert lines[-1] == "done."
    # Every float64 comparison the demo prints is float32-accurate.
    errors = [float(word) for line in lines for word in line.replace(",", " ").split()
              if word[:1].isdigit() and "e-" in word]
    assert errors and max(errors) < 1e-4, result.stdout
    assert "Warning" not in result.stderr, result.stderr[-4000:]
