"""The Makefile's study targets name regimes that exist, and run the recommended one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simulation import regimes as R

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    "target",
    ["study", "study-confirm", "study-holdout", "study-holdout2", "study-confirm-ssl"],
)
def test_study_targets_run_known_regimes_and_the_recommended_one(target: str) -> None:
    dry = subprocess.run(
        ["make", "-n", "-s", target, "BIN=bin"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    named = re.findall(r"--regime (\S+)", dry)
    assert named, dry
    assert set(named) <= set(R.ORDER), set(named) - set(R.ORDER)
    assert R.RECOMMENDED in named
    if target in ("study-confirm", "study-holdout", "study-holdout2"):
        # its paired lines score the recommended regime on the new women only
        label = {
            "study-confirm": "confirm-new-women",
            "study-holdout": "holdout",
            "study-holdout2": "holdout2",
        }
        (b,) = set(
            re.findall(
                rf"--b ((?:\S+ )+)\\?\s*--label {label[target]}-recommended", dry
            )
        )
        runs = b.split()
        assert len(runs) == 3 and all(r.endswith(f"/{R.RECOMMENDED}") for r in runs)
        cases = {
            "study-confirm": "-01[0-9]{3}$",
            "study-holdout": "-03[0-9]{3}$",
            "study-holdout2": "-04[0-9]{3}$",
        }
        assert f"--cases='{cases[target]}'" in dry
