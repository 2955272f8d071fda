"""`make bench`: every CPU benchmark in turn, each writing its own section of docs/benchmarks.md.

They run one after another (never in parallel) so that no benchmark disturbs another's timings.
The GPU benchmark is separate: bench/gpu.sh, on a machine with CUDA.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ["train_overhead.py"],
    ["patch_size.py"],
    ["streaming_merge.py"],
    ["apply_vs_reload.py"],
    ["onnx_bench.py"],
    ["runtime.py", "--threads", "1"],
]


def main() -> int:
    failed = []
    for script, *args in SCRIPTS:
        print(f"\n== bench/{script} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
