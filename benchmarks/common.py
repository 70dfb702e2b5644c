"""Shared helper for benchmarks: one JSON line per figure.

Usage::

    from benchmarks.common import emit

    emit("ingest", "images_per_s", 12.3, "img/s", workers=2, files="shared-dicom")

Each call prints one JSON object on stdout and appends the same line to
``benchmarks/results/<bench>.jsonl`` (created on demand). Every line carries the
machine (host, platform, CPU count, CPU model, GPU name when CUDA is present),
the Python and torch versions, a UTC timestamp and the free-form ``context``
keyword arguments (configuration of the run).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.fileio import json_safe

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Environment variable that redirects every ``emit`` (smoke runs, tests).
RESULTS_ENV = "MAMMOFED_BENCH_RESULTS"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@lru_cache(maxsize=1)
def machine_info() -> dict[str, Any]:
    """Facts about the machine and software stack, computed once per process."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "cpu_model": _cpu_model(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        info["torch"] = None
    return info


def rounded(v: float, ndigits: int = 4) -> float | None:
    """``v`` rounded for a JSON line; ``None`` for NaN (an undefined figure)."""
    return None if math.isnan(v) else round(v, ndigits)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return repr(v)


def emit(
    bench: str,
    figure: str,
    value: float,
    unit: str,
    *,
    results_dir: str | Path | None = None,
    **context: Any,
) -> dict[str, Any]:
    """Print one figure as a JSON line and append it to ``<results_dir>/<bench>.jsonl``.

    Args:
        bench: benchmark name; also the results file stem (``ingest`` ->
            ``benchmarks/results/ingest.jsonl``).
        figure: what was measured (e.g. ``"images_per_s"``).
        value: the number.
        unit: its unit (e.g. ``"img/s"``, ``"s"``, ``"MiB"``).
        results_dir: override of the results folder (tests use a temp dir).
        **context: configuration of the run (workers, dataset, model...), stored
            under ``"context"``.

    Returns:
        The record written.
    """
    record = {
        "bench": bench,
        "figure": figure,
        "value": float(value),
        "unit": unit,
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "context": _jsonable(context),
        "machine": machine_info(),
    }
    # strict JSON: an undefined figure (e.g. the share of a gap of 0) is null
    line = json.dumps(json_safe(record), sort_keys=False, allow_nan=False)
    if results_dir is None:
        results_dir = os.environ.get(RESULTS_ENV) or RESULTS_DIR
    out_dir = Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{bench}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return record
