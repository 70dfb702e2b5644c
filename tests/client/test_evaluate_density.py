"""``mammofed-client evaluate`` writes ``by_density`` when the cache has densities."""

from __future__ import annotations

from client.evaluate import evaluate_checkpoint
from common.detector.errors import (
    BY_DENSITY_KEY,
    BY_SIZE_KEY,
    UNKNOWN_DENSITY,
    DensityTable,
    SizeTable,
)
from common.imaging.cache import SiteCache
from common.keys import CLASSES, MASS


def test_evaluate_by_density(tiny_checkpoint, site_cache, tmp_path):
    kw = {"view": "all", "n_boot": 0, "device": "cpu", "gallery_missed": 0,
          "gallery_fp": 0}  # fmt: skip
    doc = evaluate_checkpoint(tiny_checkpoint, site_cache, tmp_path / "e0", **kw)
    assert BY_DENSITY_KEY not in doc  # no image has a density

    cache = SiteCache(site_cache)
    # patients P0, P1: "a"; P2, P3: "D"; P4, P5: unknown
    for e in cache.iter_entries():
        density = {"P0": "a", "P1": "a", "P2": "D", "P3": "D"}.get(
            str(e.meta.patient_id)
        )
        cache.with_density(e, density)
    doc = evaluate_checkpoint(tiny_checkpoint, site_cache, tmp_path / "e1", **kw)
    assert set(doc[BY_DENSITY_KEY]) == set(CLASSES)
    mass = DensityTable.from_json(doc[BY_DENSITY_KEY][MASS])
    size = SizeTable.from_json(doc[BY_SIZE_KEY][MASS])
    assert [g.density for g in mass.groups] == ["a", "D", UNKNOWN_DENSITY]
    # 2 images per patient, one with a mass: 2 patients per group
    assert [(g.n_images, g.n_lesions) for g in mass.groups] == [(4, 2), (4, 2), (4, 2)]
    assert mass.threshold == size.threshold
    assert sum(g.n_found for g in mass.groups) == size.n_found
    fps = sum(g.n_false_positives for g in mass.groups)
    assert fps / 12 == size.fp_per_image
