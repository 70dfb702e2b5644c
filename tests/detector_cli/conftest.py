"""Fixtures: a tiny synthetic site cache and a tiny-model checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.imaging.annotations import ImageTargets
from common.imaging.cache import SiteCache
from common.imaging.geometry import Geometry
from common.imaging.image import ImageMeta, MammoImage

SIZE = 96
LESION = [40.0, 48.0, 64.0, 72.0]


@pytest.fixture(autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _image(i: int, pid: str, lesion: bool) -> MammoImage:
    rng = np.random.default_rng(i)
    px = (0.1 * rng.random((SIZE, SIZE))).astype(np.float32)
    if lesion:
        x0, y0, x1, y1 = (int(v) for v in LESION)
        px[y0:y1, x0:x1] = 0.9
    meta = ImageMeta(
        source=f"{i}.dcm", sop_instance_uid=f"1.{i}", patient_id=pid, manufacturer="A",
        model="m", view="CC", laterality="L", laterality_source="ImageLaterality",
        stored_spacing_mm=0.4, spacing_source="PixelSpacing",
        presentation_intent=None, photometric="MONOCHROME2", rows=SIZE, cols=SIZE,
    )  # fmt: skip
    return MammoImage(px, 0.4, Geometry.identity((SIZE, SIZE)), meta)


def make_site_cache(root: Path, n_patients: int = 6) -> Path:
    """2 images per patient; the first image of every patient holds a mass."""
    c = SiteCache(root)
    targets: dict[str, ImageTargets] = {}
    for p in range(n_patients):
        for j in range(2):
            i = 2 * p + j
            key = f"k{i:03d}"
            lesion = j == 0
            c.write(
                key, _image(i, f"P{p}", lesion), source=f"{i:03d}.dcm", size=1,
                mtime_ns=1, working_spacing_mm=0.4,
            )  # fmt: skip
            if lesion:
                b = [list(LESION)]
                targets[key] = ImageTargets(True, False, True, b, b, [0], [], [], [])
            else:
                targets[key] = ImageTargets(True, False, False, [], [], [], [], [], [])
    c.write_annotations(targets)
    c.write_split(None)
    return root


@pytest.fixture
def site_cache(tmp_path: Path) -> Path:
    return make_site_cache(tmp_path / "siteA")
