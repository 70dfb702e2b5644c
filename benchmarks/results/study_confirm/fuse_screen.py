"""Post-hoc ensemble screens on the confirmation's new women (stops 33 and 34).

``python benchmarks/results/study_confirm/fuse_screen.py stop33|stop34`` from
the repository root; needs ``out/confirm``, ``out/confirm-fix`` and
``out/confirm-ssl`` (``compare_stop33.sh`` names the runs). Writes
``out/join<NN>/seed-<s>/<ensemble>/detections.json`` (fused per seed with
``common.detector.ensemble.fuse``) for ``benchmarks.compare_runs``, e.g.::

    python -m benchmarks.compare_runs --cases='-01[0-9]{3}$' \\
        --a out/confirm/seed-{0,1,2}/base --b out/join34/seed-{0,1,2}/ptl+base \\
        --label screen34-ptl+base-vs-base --results benchmarks/results/study_confirm

- ``stop33``: ensembles with the fixed personalized model (labels
  ``screen33-*``).
- ``stop34``: does the base model help as a fourth member? ``ptl`` =
  personalized + personalized-dp-tuned + local-only, ``ptl+base`` adds the
  base, ``pl+base`` = personalized + local-only + base (labels
  ``screen34-*``, against base and local-only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.detector.ensemble import fuse
from simulation.report import load_detections

SOURCES = {
    "base": "out/confirm",
    "personalized": "out/confirm-fix",
    "local-only": "out/confirm-fix",
    "personalized-dp": "out/confirm",
    "personalized-dp-tuned": "out/confirm-ssl",
}
SCREENS: dict[str, dict[str, list[str]]] = {
    "stop33": {
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
    },
    "stop34": {
        "ptl": ["personalized", "personalized-dp-tuned", "local-only"],
        "ptl+base": ["personalized", "personalized-dp-tuned", "local-only", "base"],
        "pl+base": ["personalized", "local-only", "base"],
    },
}


def main(screen: str) -> None:
    ensembles = SCREENS[screen]
    out_root = Path(f"out/join{screen.removeprefix('stop')}")
    for s in (0, 1, 2):
        det = {
            r: load_detections(Path(src) / f"seed-{s}" / r / "detections.json")
            for r, src in SOURCES.items()
        }
        for name, members in ensembles.items():
            out = {
                site: [im.to_json() for im in fuse([det[m][site] for m in members])]
                for site in det[members[0]]
            }
            folder = out_root / f"seed-{s}" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "detections.json").write_text(json.dumps(out))
        print(f"seed {s}: {len(ensembles)} ensembles written to {out_root}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SCREENS:
        sys.exit(f"usage: fuse_screen.py {'|'.join(SCREENS)}")
    main(sys.argv[1])
