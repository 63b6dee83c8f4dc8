"""Import time: torch alone, and torch + inductor_flex, each in a fresh interpreter (best of
N), plus what a first compiled call then costs to import (Dynamo and Inductor).

    python benchmarks/bench_import.py [--repeat 5]
"""
import argparse
import json
import subprocess
import sys

SNIPPET = """
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import inductor_flex
t2 = time.perf_counter()
import torch._dynamo, torch._inductor.lowering  # what the first torch.compile call loads
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def measure(repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True,
                             check=True).stdout.split()
        runs.append([float(x) for x in out])
    best = [min(run[i] for run in runs) for i in range(3)]
    return {"torch_s": best[0], "inductor_flex_over_torch_s": best[1],
            "dynamo_and_inductor_on_first_compile_s": best[2], "repeat": repeat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    result = measure(parser.parse_args().repeat)
    print(f"import torch                 {result['torch_s']:.2f} s")
    print(f"import inductor_flex (extra) {result['inductor_flex_over_torch_s']:.3f} s")
    print(f"Dynamo + Inductor, loaded by the first compiled call "
          f"{result['dynamo_and_inductor_on_first_compile_s']:.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
