"""mini-MIAS subset: import -> ingest -> SiteDataset (women grouped, weak labels)."""

from __future__ import annotations

import shutil
from pathlib import Path

from client.ingest import ingest_site
from common.config.site import SiteConfig
from common.imaging.data import SiteDataset
from simulation.importers.mias import import_mias

IDS = ["mdb055", "mdb056", "mdb059", "mdb060", "mdb005", "mdb006", "mdb003", "mdb004"]


def test_mias_subset_to_dataset(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "mini-mias"
    sub = tmp_path / "subset"
    (sub / "png").mkdir(parents=True)
    for i in IDS:
        shutil.copy(src / "png" / f"{i}.png", sub / "png" / f"{i}.png")
    lines = [ln for ln in (src / "Info.txt").read_text().splitlines() if ln[:6] in IDS]
    (sub / "Info.txt").write_text("\n".join(lines) + "\n")
    site = tmp_path / "site"
    import_mias(sub, site)
    res = ingest_site(site, tmp_path / "cache", SiteConfig(), workers=1)
    assert len(res.entries) == len(IDS) and res.skipped == []
    ds = SiteDataset(tmp_path / "cache", test_fraction=0.5, seed=0)
    rec = {r.source: r for r in ds.records}
    # mdb059: CIRC without coordinates -> weak, never box-supervised
    assert rec["mdb059.png"].weak and rec["mdb059.png"].has_lesion
    assert ds.records.index(rec["mdb059.png"]) not in ds.indices("labeled")
    # mdb005: two CIRC boxes, right breast flipped into model space
    r5 = rec["mdb005.png"]
    assert (
        r5.labels.tolist() == [0, 0] and r5.geometry.flip and r5.meta.laterality == "R"
    )
    assert (r5.boxes[:, 2] <= r5.geometry.model_shape[1]).all()
    assert r5.spacing_mm == 0.4
    # both breasts of a woman share patient and split
    for a, b in (
        ("mdb003", "mdb004"),
        ("mdb005", "mdb006"),
        ("mdb059", "mdb060"),
        ("mdb055", "mdb056"),
    ):
        ra, rb = rec[f"{a}.png"], rec[f"{b}.png"]
        assert ra.patient_id == rb.patient_id and ra.split == rb.split
    assert ds.indices("test") and ds.indices("labeled")
    # background tissue (Info.txt) -> density.csv -> the cache's metadata
    tissue = {"mdb003": "D", "mdb005": "F", "mdb055": "G"}
    assert {k: rec[f"{k}.png"].meta.density for k in tissue} == tissue
