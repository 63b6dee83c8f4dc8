"""The README's quick start runs as written, so it cannot drift from the API.

Every ```python block in the README's "## Quick start" section is run, in order, as one
script in a fresh interpreter on CPU (CUDA hidden, so it takes its CPU branch everywhere).
"""
import os
import pathlib
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quick_start_blocks(markdown: str) -> list[str]:
    """The python code blocks between "## Quick start" and the next heading of that level
    or above (read line by line: a "# comment" inside a code block is not a heading)."""
    blocks, current, in_section, fence = [], None, False, None
    for line in markdown.splitlines():
        if fence is None and line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            if line.startswith("## Quick start"):
                in_section = True
            elif level <= 2:
                in_section = False
        elif line.startswith("```"):
            if fence is None:
                fence = line[3:].strip()
                current = [] if in_section and fence == "python" else None
            else:
                if current is not None:
                    blocks.append("\n".join(current) + "\n")
                fence, current = None, None
        elif current is not None:
            current.append(line)
    return blocks


def test_quick_start_has_code():
    blocks = quick_start_blocks(README.read_text())
    assert blocks and "flex_attention" in "".join(blocks)


def test_quick_start_runs_on_cpu(tmp_path):
    script = "\n".join(quick_start_blocks(README.read_text()))
    script += "\nassert out.device.type == 'cpu' and torch.isfinite(out).all()\n"
    script += "assert q.grad is not None and torch.isfinite(q.grad).all()\n"
    path = tmp_path / "quick_start.py"
    path.write_text(script)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    # Normal use shows no alarming warnings (the subgraph-args one in particular).
    assert "Warning" not in result.stderr, result.stderr[-4000:]
