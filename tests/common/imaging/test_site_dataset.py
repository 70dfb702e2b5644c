"""SiteDataset: views, hidden labels, patient-grouped deterministic split, folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import MammofedError
from common.imaging.annotations import ImageTargets
from common.imaging.data import SiteDataset, collate
from common.imaging.geometry import Geometry
from common.imaging.image import ImageMeta, MammoImage
from tests.conftest import write_site_cache


def _img(i: int, pid: str) -> MammoImage:
    px = np.full((40, 32), (i % 10) / 10, np.float32)
    meta = ImageMeta(
        source=f"{i}.dcm", sop_instance_uid=f"1.{i}", patient_id=pid, manufacturer="A",
        model="m", view="CC", laterality="L", laterality_source="ImageLaterality",
        stored_spacing_mm=0.1, spacing_source="PixelSpacing",
        presentation_intent=None, photometric="MONOCHROME2", rows=160, cols=128,
    )  # fmt: skip
    return MammoImage(
        px, 0.4, Geometry((160, 128), (0, 0, 128, 160), False, (40, 32)), meta
    )


def make_cache(
    root: Path, n_patients: int = 20, split: dict[str, str] | None = None
) -> Path:
    """2 images per patient; patients 0..n-3 labeled (every 3rd with a lesion),
    the last 2 patients unlabeled; patient 1's second image weakly labeled."""

    def targets(p: int, j: int) -> ImageTargets:
        if p >= n_patients - 2:
            return ImageTargets.unlabeled()
        if p == 1 and j == 1:
            return ImageTargets(True, True, True, [], [], [], [], [], ["mass"])
        if p % 3 == 0 and j == 0:
            b = [[4.0, 8.0, 12.0, 16.0]]
            return ImageTargets(
                True, False, True, b, b, [1], [[0.0, 0.0, 2.0, 2.0]],
                [[0.0, 0.0, 2.0, 2.0]], [],
            )  # fmt: skip
        return ImageTargets(True, False, False, [], [], [], [], [], [])

    def image(p: int, j: int) -> MammoImage:
        return _img(2 * p + j, f"P{p:02d}")

    return write_site_cache(root, n_patients, image, targets, split)


def test_views_and_hidden_labels(tmp_path: Path) -> None:
    ds = SiteDataset(make_cache(tmp_path / "c"), test_fraction=0.25, seed=0)
    assert len(ds) == 40 and len(ds.view("all")) == 40
    train, test = set(ds.indices("train")), set(ds.indices("test"))
    assert train.isdisjoint(test)
    assert set(ds.indices("labeled")) | set(ds.indices("unlabeled")) == train
    assert all(ds.records[i].box_labeled for i in ds.indices("labeled"))
    assert all(ds.records[i].box_labeled for i in test)
    # unlabeled: the 4 images of never-labeled patients + the weak image (P01 train?)
    unl = ds.view("unlabeled")
    keys = {r.key for r in unl.records}
    assert {"k036", "k037", "k038", "k039"} <= keys
    weak_key = "k003"
    assert (weak_key in keys) == (ds.records[3].split == "train")
    for i in range(len(unl)):
        img, t = unl[i]
        assert img.shape == (1, 40, 32) and img.dtype == torch.float32
        assert t["labeled"] is False and t["boxes"].shape == (0, 4)
        assert t["labels"].numel() == 0 and t["ignore"].shape == (0, 4)
    # labels are visible in the labeled view, model space, right dtypes
    lab = ds.view("labeled")
    ts = [lab.target(i) for i in range(len(lab))]
    with_box = [t for t in ts if len(t["boxes"])]
    assert with_box and all(t["labels"].dtype == torch.int64 for t in ts)
    assert with_box[0]["boxes"].tolist() == [[4.0, 8.0, 12.0, 16.0]]
    assert with_box[0]["labels"].tolist() == [1] and with_box[0]["labeled"] is True
    assert with_box[0]["spacing_mm"] == 0.4 and with_box[0]["patient_id"].startswith(
        "P"
    )
    with pytest.raises(ValueError, match="valid views"):
        ds.view("validation")
    images, targets = collate([lab[0], lab[1]])
    assert len(images) == 2 and isinstance(targets[0], dict)


def test_split_grouped_deterministic_stratified(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "c", n_patients=30)
    a = SiteDataset(root, test_fraction=0.2, seed=1)
    b = SiteDataset(root, test_fraction=0.2, seed=1)
    c = SiteDataset(root, test_fraction=0.2, seed=2)
    assert a.split == b.split
    assert a.split != c.split
    for ds in (a, c):
        by_patient: dict[str, set[str]] = {}
        for r in ds.records:
            by_patient.setdefault(r.patient_id, set()).add(r.split)
        assert all(len(s) == 1 for s in by_patient.values())  # never split a patient
        test_p = {p for p, s in by_patient.items() if s == {"test"}}
        # 28 labeled patients: 11 with a lesion (P01's is image-level), 17 without
        # -> round(0.2 * 11) + round(0.2 * 17) = 2 + 3 in test
        assert len(test_p) == 5
        assert sum(1 for p in test_p if int(p[1:]) % 3 == 0 or p == "P01") == 2
        assert not test_p & {"P28", "P29"}  # unlabeled patients always train


def test_site_split_wins(tmp_path: Path) -> None:
    split = {f"P{p:02d}": ("test" if p < 3 else "train") for p in range(20)}
    ds = SiteDataset(make_cache(tmp_path / "c", split=split), seed=5)
    assert {r.patient_id for r in ds.records if r.split == "test"} == {
        "P00",
        "P01",
        "P02",
    }


def test_folds_partition_patients(tmp_path: Path) -> None:
    ds = SiteDataset(make_cache(tmp_path / "c", n_patients=22))
    folds = ds.folds(5, seed=3)
    assert folds == ds.folds(5, seed=3) and folds != ds.folds(5, seed=4)
    vals = [set(v) for _, v in folds]
    everything = set().union(*vals)
    assert sum(len(v) for v in vals) == len(everything)  # disjoint
    assert everything == {i for i, r in enumerate(ds.records) if r.box_labeled}
    for tr, va in folds:
        assert not set(tr) & set(va)
        assert not {ds.records[i].patient_id for i in tr} & {
            ds.records[i].patient_id for i in va
        }
        assert any(ds.records[i].has_lesion for i in va)  # stratified
    sub = ds.subset(folds[0][1])
    assert len(sub) == len(folds[0][1]) and sub[0][0].shape == (1, 40, 32)
    with pytest.raises(ValueError):
        ds.folds(1)
    with pytest.raises(IndexError):
        ds.subset([10_000])


def test_empty_cache_raises(tmp_path: Path) -> None:
    with pytest.raises(MammofedError, match="no cache entries"):
        SiteDataset(tmp_path)


def test_a_model_of_another_working_spacing_is_refused(tmp_path: Path) -> None:
    from common.errors import ConfigError
    from tests.conftest import make_site_cache, write_train_yaml

    cache = make_site_cache(tmp_path / "cache")  # ingested at 0.4 mm
    assert len(SiteDataset(cache, model_spacing_mm=0.4)) == 12
    with pytest.raises(ConfigError, match=r"ingested at 0\.4 mm.*works at 0\.8 mm"):
        SiteDataset(cache, model_spacing_mm=0.8)
    # what silently trained a "0.8 mm" model on 0.4 mm pixels before
    from simulation.train import load_train_config

    yaml = write_train_yaml(
        tmp_path, [cache], model={"arch": "tiny", "working_spacing_mm": 0.8}
    )
    with pytest.raises(ConfigError, match="working_spacing_mm"):
        load_train_config(yaml).sites()
