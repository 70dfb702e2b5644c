"""Stop-33 screen: ensembles with the fixed personalized model, new women.

Run from the repository root; needs ``out/confirm``, ``out/confirm-ssl`` and
``out/confirm-fix`` (``compare_stop33.sh`` names the runs). Writes
``out/join33/seed-<s>/<ensemble>/detections.json``, fused per seed with
``common.detector.ensemble.fuse``, for ``benchmarks.compare_runs``.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.detector.ensemble import fuse
from simulation.report import load_detections

SOURCES = {
    "personalized": "out/confirm-fix",
    "local-only": "out/confirm-fix",
    "personalized-dp": "out/confirm",
    "personalized-dp-tuned": "out/confirm-ssl",
}
ENSEMBLES = {
    "personalized+local": ["personalized", "local-only"],
    "personalized+tuned+local": [
        "personalized",
        "personalized-dp-tuned",
        "local-only",
    ],
    "personalized+personalized-dp+local": [
        "personalized",
        "personalized-dp",
        "local-only",
    ],
}


def main() -> None:
    for s in (0, 1, 2):
        det = {
            r: load_detections(Path(src) / f"seed-{s}" / r / "detections.json")
            for r, src in SOURCES.items()
        }
        for name, members in ENSEMBLES.items():
            out = {
                site: [im.to_json() for im in fuse([det[m][site] for m in members])]
                for site in det[members[0]]
            }
            folder = Path(f"out/join33/seed-{s}/{name}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "detections.json").write_text(json.dumps(out))
        print(f"seed {s}: {len(ENSEMBLES)} ensembles written")


if __name__ == "__main__":
    main()
