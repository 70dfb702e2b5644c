"""Stop-34 screen: does the base model help as a fourth ensemble member? New women.

Run from the repository root; needs ``out/confirm``, ``out/confirm-fix`` and
``out/confirm-ssl`` (``compare_stop33.sh`` names the runs). Writes
``out/join34/seed-<s>/<ensemble>/detections.json`` (fused per seed with
``common.detector.ensemble.fuse``) for ``benchmarks.compare_runs``:
``ptl`` = personalized + personalized-dp-tuned + local-only (stop 33's screen),
``ptl+base`` adds the base model, ``pl+base`` = personalized + local-only +
base. Then, for e in those and a in base, local-only::

    python -m benchmarks.compare_runs --cases='-01[0-9]{3}$' \
        --a out/confirm/seed-{0,1,2}/$a --b out/join34/seed-{0,1,2}/$e \
        --label screen34-$e-vs-$a --results benchmarks/results/study_confirm
"""

from __future__ import annotations

import json
from pathlib import Path

from common.detector.ensemble import fuse
from simulation.report import load_detections

SOURCES = {
    "base": "out/confirm",
    "personalized": "out/confirm-fix",
    "local-only": "out/confirm-fix",
    "personalized-dp-tuned": "out/confirm-ssl",
}
ENSEMBLES = {
    "ptl": ["personalized", "personalized-dp-tuned", "local-only"],
    "ptl+base": ["personalized", "personalized-dp-tuned", "local-only", "base"],
    "pl+base": ["personalized", "local-only", "base"],
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
            folder = Path(f"out/join34/seed-{s}/{name}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "detections.json").write_text(json.dumps(out))
        print(f"seed {s}: {len(ENSEMBLES)} ensembles written")


if __name__ == "__main__":
    main()
