"""The written site: DICOM tags per vendor, annotations.csv and split.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom
import pytest

from common.errors import ConfigError
from simulation.phantom import Scenario, load_scenario, plan_site
from simulation.phantom.dicom_writer import SOP_CLASS_PRESENTATION, SOP_CLASS_PROCESSING
from tests.conftest import REPO

EXPECTED = {
    # site: (photometric, intent, spacing tags present, absent, voi form)
    "A": (
        "MONOCHROME2",
        "FOR PRESENTATION",
        {"PixelSpacing", "ImagerPixelSpacing"},
        set(),
        "LINEAR",
    ),
    "B": (
        "MONOCHROME1",
        "FOR PRESENTATION",
        {"ImagerPixelSpacing", "EstimatedRadiographicMagnificationFactor"},
        {"PixelSpacing"},
        "SIGMOID",
    ),
    "C": (
        "MONOCHROME2",
        "FOR PRESENTATION",
        {"ImagerPixelSpacing"},
        {"PixelSpacing"},
        "LUT",
    ),
    "D": (
        "MONOCHROME2",
        "FOR PRESENTATION",
        {"PixelSpacing", "ImagerPixelSpacing"},
        set(),
        "LINEAR",
    ),
    "E": (
        "MONOCHROME1",
        "FOR PROCESSING",
        {"ImagerPixelSpacing"},
        {"PixelSpacing"},
        "LINEAR",
    ),
}


@pytest.mark.parametrize("site", sorted(EXPECTED))
def test_dicom_tags_per_vendor(
    test_scenario: Scenario, generated: dict[str, Path], site: str
) -> None:
    photometric, intent, present, absent, voi = EXPECTED[site]
    vendor = test_scenario.vendor_of(test_scenario.site(site))
    files = sorted(generated[site].rglob("*.dcm"))
    assert len(files) == 4 * test_scenario.site(site).women
    uids = set()
    for f in files:
        ds = pydicom.dcmread(f)
        lat, view = f.stem.split("_")
        assert ds.ImageLaterality == lat and ds.ViewPosition == view
        assert ds.Modality == "MG" and ds.PatientID == f.parent.name
        assert ds.Manufacturer == vendor.manufacturer.strip()
        assert ds.Manufacturer.startswith("Phantom-")
        assert ds.PhotometricInterpretation == photometric
        assert ds.PresentationIntentType == intent
        sop = (
            SOP_CLASS_PROCESSING
            if intent == "FOR PROCESSING"
            else SOP_CLASS_PRESENTATION
        )
        assert ds.SOPClassUID == sop == ds.file_meta.MediaStorageSOPClassUID
        assert (
            ds.BitsStored == vendor.bits_stored and ds.HighBit == vendor.bits_stored - 1
        )
        for tag in present:
            assert tag in ds, (f, tag)
        for tag in absent:
            assert tag not in ds, (f, tag)
        if voi == "LUT":
            assert "VOILUTSequence" in ds and "WindowCenter" not in ds
            assert (
                len(ds.VOILUTSequence[0].LUTData)
                == ds.VOILUTSequence[0].LUTDescriptor[0]
            )
        else:
            assert ds.VOILUTFunction == voi
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns)
        assert int(arr.max()) < 2**ds.BitsStored
        assert ds.SOPInstanceUID.startswith("2.25.") and len(ds.SOPInstanceUID) <= 64
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == len(files)


def test_spacing_tags_give_the_breast_pitch(
    test_scenario: Scenario, generated: dict[str, Path]
) -> None:
    for site in ("A", "B", "C"):
        vendor = test_scenario.vendor_of(test_scenario.site(site))
        ds = pydicom.dcmread(next(generated[site].rglob("*.dcm")))
        spacing = float(ds.ImagerPixelSpacing[0]) / float(
            ds.get("EstimatedRadiographicMagnificationFactor", 1.0)
        )
        assert spacing == pytest.approx(test_scenario.stored_pitch_mm(vendor), rel=1e-6)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_annotations_and_split(
    test_scenario: Scenario, generated: dict[str, Path]
) -> None:
    for site in test_scenario.sites:
        sdir = generated[site.name]
        plans = plan_site(test_scenario, site)
        split = {r["patient_id"]: r["split"] for r in _rows(sdir / "split.csv")}
        assert set(split) == {p.patient_id for p in plans}
        assert set(split.values()) <= {"train", "test"}
        ann = _rows(sdir / "annotations.csv")
        assert list(ann[0].keys()) if ann else True
        annotated = {r["image"] for r in ann}
        for p in plans:
            assert (sdir / p.relpath).is_file()
            assert (p.relpath in annotated) == p.labeled
            if split[p.patient_id] == "test":
                assert p.labeled, "test women are fully labeled"
        for r in ann:
            assert r["finding"] in {"mass", "calcification", "none"}
            if r["finding"] != "none":
                x0, y0, x1, y1 = (int(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                ds = pydicom.dcmread(sdir / r["image"], stop_before_pixels=True)
                assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
    c = test_scenario.site("C")
    train = [p for p in plan_site(test_scenario, c) if p.split == "train"]
    assert sum(p.labeled for p in train) == round(c.labeled_fraction * len(train))


def test_bad_configs_name_file_key_value(tmp_path: Path) -> None:
    cfg = REPO / "configs" / "simulation"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"name: x\nseed: 1\nworking_spacing_mm: 0.4\nvendors_dir: {cfg / 'vendors'}\n"
        "sites:\n  - {name: A, vendor: NOPE}\n"
    )
    with pytest.raises(ConfigError, match=r"bad.yaml: sites\[0\].vendor: .*'NOPE'"):
        load_scenario(bad)
    bad.write_text(
        f"name: x\nseed: 1\nworking_spacing_mm: 0.4\nvendors_dir: {cfg / 'vendors'}\n"
        "lesions: {mass_diameter_mm: [30.0, 5.0]}\nsites:\n  - {name: A, vendor: H}\n"
    )
    with pytest.raises(ConfigError, match="mass_diameter_mm"):
        load_scenario(bad)
    bad.write_text(
        "name: x\nseed: 1\nworking_spacing_mm: 0.4\npixel_scale: 0.5\n"
        "sites:\n  - {name: A, vendor: H}\n"
    )
    with pytest.raises(ConfigError, match="pixel_scale: must be >= 1.0, got 0.5"):
        load_scenario(bad)
