"""``make test-report``: docs/test-report.md from a real run of the test suite.

Reads what pytest wrote (``--junitxml``) and what coverage wrote
(``--cov-report=json``), plus the security and robustness figures under
``benchmarks/results/``, and writes one Markdown document people can read:

* the machine and the versions the run used;
* tests by part (``tests/<package>/...``, mirroring the packages): passed,
  failed, skipped, seconds;
* every skip with its reason (a missing tool, no GPU...);
* line coverage of each package (``common``, ``client``, ``server``,
  ``simulation``); code run only in child processes (SuperLink, SuperNodes,
  ``storescu``'s peer) is not counted, so these are lower bounds;
* the checks against real files and hostile input, each test with its outcome,
  and the benchmark figures that size them (newest line per figure).

Usage::

    python -m benchmarks.test_report --junit out/test-report/junit.xml \
        --coverage out/test-report/coverage.json --out docs/test-report.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_info

PACKAGES = ("common", "client", "server", "simulation")

#: Test-name fragments of the real-file / hostile-input checks, with the
#: heading they are listed under.
CHECK_GROUPS: dict[str, tuple[str, ...]] = {
    "Model files that run code": ("crafted", "trojan", "unsafe", "pickle"),
    "Hostile or broken DICOM and annotations": (
        "hostile",
        "budget",
        "corrupt",
        "broken",
        "truncated",
        "duplicate",
        "colour",
        "color",
        "palette",
        "rgb",
        "non_finite",
        "nan_slope",
        "panic",
        "decoder",
    ),
    "A node that lies or attacks": (
        "attack",
        "robust",
        "sign_flip",
        "scaled",
        "num_examples",
        "initial_model",
        "reject",
        "guard",
        "privacy",
    ),
    "Who may control the federation": (
        "outsider",
        "signed",
        "unsigned",
        "control",
        "register",
        "auth",
        "tls",
    ),
    "Faults": ("restart", "degraded", "silent", "disconnect", "killed", "timeout"),
    "Real files and tools nobody here wrote": (
        "shared",
        "real",
        "dciodvfy",
        "dsrdump",
        "storescu",
        "storescp",
        "onnx",
        "mias",
    ),
}

#: Benchmark result files whose newest figures the report quotes.
FIGURE_FILES: tuple[str, ...] = (
    "ingest_memory.jsonl",
    "attacks.jsonl",
    "onnx_parity.jsonl",
    "ingest.jsonl",
)

#: Command-line tools the interoperability tests use, with a version flag.
TOOLS: dict[str, Sequence[str]] = {
    "dsrdump (DCMTK)": ("dsrdump", "--version"),
    "storescu (DCMTK)": ("storescu", "--version"),
    "dciodvfy (dicom3tools)": ("dciodvfy", "-version"),
}


@dataclass(frozen=True)
class Case:
    """One test case of the junit file."""

    part: str
    name: str
    outcome: str  # passed | failed | error | skipped
    seconds: float
    message: str


def _part(classname: str, file: str | None) -> str:
    """The folder of a test below ``tests/``, which mirrors the packages.

    ``tests/common/imaging/test_dicom.py`` (classname
    ``tests.common.imaging.test_dicom[.TestClass]``) is part ``common/imaging``;
    a test module directly in ``tests/`` is ``(top)``.
    """
    if file:
        bits = list(Path(file).parts[:-1])
    else:
        bits = classname.split(".")
        module = [i for i, b in enumerate(bits) if b.startswith("test_")]
        bits = bits[: module[0]] if module else bits[:1]
    if bits and bits[0] == "tests":
        return "/".join(bits[1:]) or "(top)"
    return bits[0] if bits else "(top)"


def read_junit(path: Path) -> list[Case]:
    """Every ``<testcase>`` of a pytest junit XML file."""
    root = ET.parse(path).getroot()
    cases: list[Case] = []
    for tc in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or el.text or "").strip()
                break
        cases.append(
            Case(
                part=_part(tc.get("classname", ""), tc.get("file")),
                name=f"{tc.get('classname', '')}::{tc.get('name', '')}",
                outcome=outcome,
                seconds=float(tc.get("time") or 0.0),
                message=message.splitlines()[0][:200] if message else "",
            )
        )
    return cases


def coverage_by_package(path: Path) -> dict[str, tuple[int, int]]:
    """``{package: (covered lines, statements)}`` from coverage's JSON report."""
    doc = json.loads(path.read_text())
    out: dict[str, list[int]] = {p: [0, 0] for p in PACKAGES}
    for fname, info in doc.get("files", {}).items():
        top = Path(fname).parts[0]
        if top in out:
            s = info["summary"]
            out[top][0] += int(s["covered_lines"])
            out[top][1] += int(s["num_statements"])
    return {k: (v[0], v[1]) for k, v in out.items()}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unusable ({exc})"
    text = (res.stdout + res.stderr).strip().splitlines()
    line = next((t for t in text if any(c.isdigit() for c in t)), "")
    return line.strip()[:80] or "installed"


def newest_figures(results: Path, names: Iterable[str]) -> list[dict[str, object]]:
    """The newest JSON line of every (bench, figure) in the named result files."""
    rows: dict[tuple[str, str, str], dict[str, object]] = {}
    for name in names:
        f = results / name
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            ctx = rec.get("context") or {}
            variant = ",".join(
                f"{k}={ctx[k]}"
                for k in ("attack", "aggregator", "config", "budget", "case")
                if k in ctx
            )
            rows[(str(rec.get("bench")), str(rec.get("figure")), variant)] = rec
    return list(rows.values())


def _group_checks(cases: list[Case]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for heading, keys in CHECK_GROUPS.items():
        hits = [c for c in cases if any(k in c.name.lower() for k in keys)]
        if hits:
            out[heading] = hits
    return out


def render(
    cases: list[Case],
    coverage: dict[str, tuple[int, int]] | None,
    figures: list[dict[str, object]],
    *,
    command: str,
) -> str:
    """The Markdown document."""
    m = machine_info()
    total: dict[str, int] = defaultdict(int)
    parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for c in cases:
        total[c.outcome] += 1
        parts[c.part][c.outcome] += 1
        parts[c.part]["seconds"] += c.seconds
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Test report",
        "",
        f"Written by `make test-report` on {now} from a real run of `{command}`.",
        "Regenerate it with `make test-report`; do not edit it by hand.",
        "",
        "## Summary",
        "",
        f"- **{len(cases)} tests**: {total['passed']} passed, "
        f"{total['failed']} failed, {total['error']} errors, "
        f"{total['skipped']} skipped; "
        f"{sum(c.seconds for c in cases) / 60:.1f} min of test time.",
        "",
        "## Machine and versions",
        "",
        f"- {m['platform']}, {m['cpu_count']} CPUs ({m['cpu_model']}), "
        f"CUDA: {m.get('cuda')}",
        f"- Python {platform.python_version()}; "
        + ", ".join(
            f"{d} {_version(d)}"
            for d in (
                "torch",
                "torchvision",
                "flwr",
                "pydicom",
                "highdicom",
                "pynetdicom",
                "onnxruntime",
                "opacus",
                "numpy",
            )
        ),
        "- Tools: " + "; ".join(f"{k}: {_tool_version(v)}" for k, v in TOOLS.items()),
        "",
        "## Tests by part",
        "",
        "| part | passed | failed | errors | skipped | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for part in sorted(parts):
        p = parts[part]
        lines.append(
            f"| {part} | {int(p['passed'])} | {int(p['failed'])} | "
            f"{int(p['error'])} | {int(p['skipped'])} | {p['seconds']:.0f} |"
        )
    lines += ["", "## Skipped, with the reason", ""]
    skipped = [c for c in cases if c.outcome == "skipped"]
    lines += [f"- `{c.name}`: {c.message or 'no reason given'}" for c in skipped]
    if not skipped:
        lines.append("- none")
    bad = [c for c in cases if c.outcome in ("failed", "error")]
    if bad:
        lines += ["", "## Failed", ""]
        lines += [f"- `{c.name}`: {c.message}" for c in bad]
    lines += ["", "## Line coverage by package", ""]
    if coverage is None:
        lines.append("No coverage file was given.")
    else:
        lines += [
            "Code run only inside child processes (SuperLink, SuperNodes, the "
            "DICOM node under test) is not counted: these are lower bounds.",
            "",
            "| package | covered lines | statements | coverage |",
            "|---|---:|---:|---:|",
        ]
        for pkg, (cov, stmts) in coverage.items():
            pct = f"{100.0 * cov / stmts:.0f}%" if stmts else "n/a"
            lines.append(f"| {pkg} | {cov} | {stmts} | {pct} |")
    lines += ["", "## Real-file and hostile-input checks", ""]
    for heading, hits in _group_checks(cases).items():
        ok = sum(c.outcome == "passed" for c in hits)
        lines += ["", f"### {heading} ({ok} of {len(hits)} passed)", ""]
        lines += [f"- {c.outcome}: `{c.name}`" for c in hits]
    lines += ["", "## Figures behind those checks (benchmarks/results)", ""]
    if not figures:
        lines.append("No result files found.")
    else:
        lines += [
            "| bench | figure | value | unit | context |",
            "|---|---|---:|---|---|",
        ]
        for r in figures:
            ctx = json.dumps(r.get("context") or {}, sort_keys=True)
            lines.append(
                f"| {r.get('bench')} | {r.get('figure')} | {r.get('value')} | "
                f"{r.get('unit')} | `{ctx[:160]}` |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; exit 1 if a test failed (the report is written anyway)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--junit", type=Path, required=True)
    ap.add_argument("--coverage", type=Path)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out", type=Path, default=Path("docs/test-report.md"))
    ap.add_argument("--command", default="make test-report")
    args = ap.parse_args(argv)
    if not args.junit.is_file():
        print(f"error: junit file {args.junit} does not exist", file=sys.stderr)
        return 2
    cases = read_junit(args.junit)
    cov = (
        coverage_by_package(args.coverage)
        if args.coverage and args.coverage.is_file()
        else None
    )
    text = render(
        cases, cov, newest_figures(args.results, FIGURE_FILES), command=args.command
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}: {len(cases)} tests")
    return 1 if any(c.outcome in ("failed", "error") for c in cases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
