"""Peak memory of ingesting a hostile file: the 8.4 MB RLE file declaring 16384².

The site folder holds that file (a real RLE Lossless frame of zeros that
decodes to a 512 MB uint16 array) and one normal full-field mammogram
(``--rows`` x ``--cols``, 16-bit, uncompressed, from
:mod:`benchmarks.synthetic`). Two runs of :func:`client.ingest.ingest_site`,
each in its own child process tree under ``RLIMIT_AS`` (``--limit-gb``,
inherited by the decode processes, so this shared machine is never asked for
the 7+ GB an unbounded decode takes):

* ``budget``: the default site config (``max_pixels`` =
  :data:`common.config.site.DEFAULT_MAX_PIXELS`);
* ``no-budget`` (baseline): ``max_pixels=None``, everything else equal;
* ``at-budget``: a folder holding one normal file as large as the default
  budget allows (square, ``floor(sqrt(max_pixels))`` a side), default config:
  the worst accepted case.

Peak memory = the resident high-water mark (``VmHWM``) of every process of the
child's tree (ingest process, fork server, decode processes), sampled every
20 ms from ``/proc``: ``tree_sum`` adds them (an upper bound of the tree's
peak), ``largest`` is the biggest single process. Also reported: what was
ingested and skipped (with the reason) and the wall time. One JSON line per
figure in ``benchmarks/results/ingest_memory.jsonl``.

Run: ``.venv/bin/python -m benchmarks.ingest_memory [--limit-gb 6]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from benchmarks.synthetic import write_mammo, write_rle_bomb
from common.config.site import DEFAULT_MAX_PIXELS

REPO = Path(__file__).resolve().parents[1]
BENCH = "ingest_memory"
SAMPLE_S = 0.02


def make_site(folder: Path, rows: int, cols: int) -> Path:
    """``folder/site`` with ``bomb_16384.dcm`` and ``normal.dcm``."""
    site = folder / "site"
    site.mkdir(parents=True)
    write_rle_bomb(site / "bomb_16384.dcm", full=True)
    write_mammo(site / "normal.dcm", rows=rows, cols=cols)
    return site


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants (from ``/proc/*/task/*/children``)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def _hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(site: Path, cache: Path, budget: bool, limit_gb: float) -> dict[str, Any]:
    """Run one ingest in a child process tree; sample its peak memory."""
    cmd = [
        sys.executable, "-m", "benchmarks.ingest_memory", "--child",
        str(site), str(cache), "budget" if budget else "none", str(limit_gb),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    try:
        while proc.poll() is None:
            for pid in _tree(proc.pid):
                hwm = _hwm_kb(pid)
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
            time.sleep(SAMPLE_S)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds = time.perf_counter() - t0
    child = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "tree_sum_mib": sum(peaks.values()) / 1024,
        "largest_mib": max(peaks.values(), default=0) / 1024,
        "processes": len(peaks),
        **child,
    }


def child(site: str, cache: str, mode: str, limit_gb: float) -> None:
    """In the child: set RLIMIT_AS, ingest, print one JSON line of the outcome."""
    limit = int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from client.ingest import ingest_site
    from common.config.site import SiteConfig

    cfg = SiteConfig() if mode == "budget" else SiteConfig(max_pixels=None)
    res = ingest_site(site, cache, cfg, workers=1)
    print(
        json.dumps(
            {
                "ingested": [e.source for e in res.entries],
                "skipped": res.skipped,
                "status": res.status,
                "max_pixels": cfg.max_pixels,
                "decode_peak_rss_mib": res.decode_peak_rss_mb,
                "ingest_process_maxrss_mib": resource.getrusage(
                    resource.RUSAGE_SELF
                ).ru_maxrss
                / 1024,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Build the site, measure both runs, emit the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-gb", type=float, default=6.0)
    ap.add_argument("--rows", type=int, default=3328)
    ap.add_argument("--cols", type=int, default=2560)
    ap.add_argument("--child", nargs=4, metavar=("SITE", "CACHE", "MODE", "GB"))
    args = ap.parse_args(argv)
    if args.child:
        s, c, mode, gb = args.child
        child(s, c, mode, float(gb))
        return 0
    with tempfile.TemporaryDirectory(prefix="mammofed-ingest-mem-") as tmp:
        site = make_site(Path(tmp), args.rows, args.cols)
        bomb_mb = (site / "bomb_16384.dcm").stat().st_size / 1e6
        side = math.isqrt(DEFAULT_MAX_PIXELS)
        edge = Path(tmp) / "edge"
        edge.mkdir()
        write_mammo(edge / f"normal_{side}.dcm", rows=side, cols=side)
        runs = [("budget", site, True), ("no-budget", site, False)]
        runs.append(("at-budget", edge, True))
        for name, folder, budget in runs:
            r = measure(folder, Path(tmp) / f"cache-{name}", budget, args.limit_gb)
            ctx = {
                "run": name,
                "max_pixels": r.get("max_pixels"),
                "rlimit_as_gb": args.limit_gb,
                "bomb_file_mb": round(bomb_mb, 2),
                "bomb_declared": "16384x16384x16bit RLE",
                "normal_file": (
                    f"{side}x{side}x16bit"
                    if name == "at-budget"
                    else f"{args.rows}x{args.cols}x16bit"
                ),
                "ingested": r.get("ingested"),
                "skipped": r.get("skipped"),
                "status": r.get("status"),
                "returncode": r["returncode"],
                "processes_sampled": r["processes"],
                "decode_peak_rss_mib": r.get("decode_peak_rss_mib"),
                "ingest_process_maxrss_mib": r.get("ingest_process_maxrss_mib"),
                "cpus": os.cpu_count(),
            }
            emit(BENCH, "peak_rss_tree_sum", r["tree_sum_mib"], "MiB", **ctx)
            emit(BENCH, "peak_rss_largest_process", r["largest_mib"], "MiB", **ctx)
            emit(BENCH, "wall_time", r["seconds"], "s", **ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
