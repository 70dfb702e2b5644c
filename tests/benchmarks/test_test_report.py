"""benchmarks.test_report: parts, skips with reasons, coverage, failure exit."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.test_report import coverage_by_package, main, read_junit

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
 <testcase classname="tests.common.imaging.test_hostile" name="test_budget_refuses"
   time="0.5"/>
 <testcase classname="tests.client.test_sr.TestSr" name="test_dciodvfy_clean" time="1">
  <skipped type="pytest.skip" message="dciodvfy not installed">skip</skipped>
 </testcase>
 <testcase classname="tests.server.test_robust" name="test_attack_sign_flip"
   time="2.0"/>
 %s
</testsuite></testsuites>
"""
FAIL = (
    '<testcase classname="tests.common.detector.test_x" name="test_y" time="0.1">'
    '<failure message="assert 1 == 2">trace</failure></testcase>'
)


def _write(tmp_path: Path, failing: bool) -> tuple[Path, Path]:
    j = tmp_path / "junit.xml"
    j.write_text(JUNIT % (FAIL if failing else ""))
    c = tmp_path / "coverage.json"
    c.write_text(
        json.dumps(
            {
                "files": {
                    "common/a.py": {
                        "summary": {"covered_lines": 3, "num_statements": 4}
                    },
                    "client/b.py": {
                        "summary": {"covered_lines": 1, "num_statements": 4}
                    },
                    "tests/t.py": {
                        "summary": {"covered_lines": 9, "num_statements": 9}
                    },
                }
            }
        )
    )
    return j, c


def test_report_lists_parts_skips_coverage_and_checks(tmp_path):
    j, c = _write(tmp_path, failing=False)
    cases = read_junit(j)
    assert {x.part for x in cases} == {"common/imaging", "client", "server"}
    assert [x.outcome for x in cases].count("skipped") == 1
    cov = coverage_by_package(c)
    assert cov["common"] == (3, 4) and cov["client"] == (1, 4)
    assert cov["server"] == (0, 0)
    out = tmp_path / "report.md"
    rc = main(["--junit", str(j), "--coverage", str(c), "--out", str(out),
               "--results", str(tmp_path)])  # fmt: skip
    assert rc == 0
    text = out.read_text()
    assert "dciodvfy not installed" in text
    assert "| common | 3 | 4 | 75% |" in text
    assert "| common/imaging | 1 | 0 | 0 | 0 |" in text
    assert "A node that lies or attacks (1 of 1 passed)" in text


def test_a_failed_test_is_listed_and_exits_1(tmp_path):
    j, c = _write(tmp_path, failing=True)
    out = tmp_path / "report.md"
    assert main(["--junit", str(j), "--out", str(out), "--results", str(tmp_path)]) == 1
    assert "assert 1 == 2" in out.read_text()
    assert main(["--junit", str(tmp_path / "none.xml"), "--out", str(out)]) == 2
