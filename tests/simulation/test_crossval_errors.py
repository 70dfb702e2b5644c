"""mammofed-sim crossval writes the pooled error galleries, by_size and by_density."""

from __future__ import annotations

import json

from common.detector.errors import (
    BY_DENSITY_KEY,
    BY_SIZE_KEY,
    ERRORS_KEY,
    UNKNOWN_DENSITY,
    DensityTable,
    SizeTable,
    gallery_name,
)
from common.imaging.cache import SiteCache
from common.keys import CLASSES, MASS
from simulation.cli import main as sim_main
from simulation.crossval import CV_METRICS_JSON
from tests.conftest import make_site_cache, write_train_yaml

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_crossval_writes_galleries_size_and_density_tables(tmp_path):
    a = make_site_cache(tmp_path / "siteA", n_patients=4)
    b = make_site_cache(tmp_path / "siteB", n_patients=2)
    cache = SiteCache(a)
    for e in cache.iter_entries():  # siteA: BI-RADS c; siteB: no density
        cache.with_density(e, "c")
    cfg = write_train_yaml(
        tmp_path, [a, b], out_dir=str(tmp_path / "cv"), n_boot=0, test_fraction=0.0
    )
    out = tmp_path / "cv"
    assert sim_main(["crossval", "--config", str(cfg), "--folds", "2"]) == 0
    doc = json.loads((out / CV_METRICS_JSON).read_text())
    for name in CLASSES:
        data = (out / gallery_name(name)).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, name
        assert doc[ERRORS_KEY][name]["gallery"] == gallery_name(name)
    size = SizeTable.from_json(doc[BY_SIZE_KEY][MASS])
    assert size.n_images == 12 and size.n_lesions == 6  # one mass per patient
    assert size.n_lesions == doc["classes"][MASS]["n_lesions"]

    density = DensityTable.from_json(doc[BY_DENSITY_KEY][MASS])
    assert [(g.density, g.n_images, g.n_lesions) for g in density.groups] == [
        ("c", 8, 4), (UNKNOWN_DENSITY, 4, 2),
    ]  # fmt: skip
    assert density.threshold == size.threshold
    assert sum(g.n_found for g in density.groups) == size.n_found
    assert set(doc[BY_DENSITY_KEY]) == set(CLASSES)

    # without any density in the caches the key is absent (the rest unchanged)
    for e in cache.iter_entries():
        cache.with_density(e, None)
    out2 = tmp_path / "cv2"
    argv = ["crossval", "--config", str(cfg), "--folds", "2", "--out", str(out2)]
    assert sim_main(argv) == 0
    doc2 = json.loads((out2 / CV_METRICS_JSON).read_text())
    assert BY_DENSITY_KEY not in doc2
    assert doc2[BY_SIZE_KEY] == doc[BY_SIZE_KEY]
