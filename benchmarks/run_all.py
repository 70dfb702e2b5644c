"""``make bench``: every CPU benchmark once, each appending JSON lines to results/.

GPU figures come from ``benchmarks/train_speed.py --device cuda`` and
``benchmarks/gpu_study.sh`` on a GPU machine (see docs/results.md).
"""

from __future__ import annotations

import subprocess
import sys

RUNS: tuple[tuple[str, ...], ...] = (
    ("benchmarks.ingest",),
    ("benchmarks.phantom",),
    ("benchmarks.train_speed", "--device", "cpu", "--threads", "1"),
    ("benchmarks.federation",),
)


def main() -> int:
    """Run each benchmark module; return non-zero if any failed."""
    failed = []
    for mod, *args in RUNS:
        print(f"== {mod} {' '.join(args)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", mod, *args])
        if rc != 0:
            failed.append(mod)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
