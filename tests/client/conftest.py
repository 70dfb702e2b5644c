"""Fixtures for the client tests: synthetic sites to ingest and exams to score.

Sites: small FOR PRESENTATION DICOMs and PNG research images with CSVs.
Exams: four views of one study from :func:`benchmarks.synthetic.write_mammo`
(breast phantom with a marker block) with the patient, study and series
attributes a modality writes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from benchmarks.synthetic import mg_dataset, write_mammo
from client.detector_trainer import DetectorTrainer
from client.state import SiteState
from common.config.loader import config_to_dict
from common.wire.federation import (
    FederationConfig,
    FitInstructions,
    PersonalizationConfig,
    StrategyConfig,
    TrainerConfig,
)
from server.checkpoints import CheckpointStore
from tests.conftest import make_site_cache

#: The one site of :func:`one_site_config`.
SITE = "siteA"
#: (ImageLaterality, ViewPosition, breast side in the stored image) per view.
FOUR_VIEWS = (("L", "CC", "left"), ("L", "MLO", "left"), ("R", "CC", "right"),
              ("R", "MLO", "right"))  # fmt: skip


def breast_array(
    rows: int, cols: int, *, left: bool, seed: int, maxval: int
) -> np.ndarray:
    """A half-ellipse 'breast' against the chest wall on one side, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx = 0 if left else cols - 1
    inside = ((xx - cx) / (0.7 * cols)) ** 2 + (
        (yy - rows / 2) / (0.45 * rows)
    ) ** 2 < 1
    img = np.where(inside, 0.6 * maxval, 0.02 * maxval)
    img = img + rng.normal(0, 0.02 * maxval, size=img.shape)
    return np.clip(img, 0, maxval)


def write_dicom(
    path: Path,
    *,
    rows: int = 160,
    cols: int = 128,
    patient: str = "P1",
    laterality: str = "L",
    view: str = "CC",
    spacing: float = 0.2,
    manufacturer: str = "ACME",
    seed: int = 0,
    bits: int = 14,
) -> Path:
    """Write a small FOR PRESENTATION MG DICOM (breast on the laterality side)."""
    ds = mg_dataset()
    ds.Modality = "MG"
    ds.PatientID = patient
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "Model-1"
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelSpacing = [f"{spacing}", f"{spacing}"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    arr = breast_array(
        rows, cols, left=laterality == "L", seed=seed, maxval=2**bits - 1
    )
    ds.PixelData = arr.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_png(
    path: Path, *, rows: int = 200, cols: int = 160, left: bool, seed: int
) -> Path:
    """8-bit grey PNG research image."""
    arr = breast_array(rows, cols, left=left, seed=seed, maxval=255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    """Write a small CSV."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def synthetic_site(tmp_path: Path) -> Path:
    """A small site: 4 DICOMs (2 patients, 2 vendors), 2 PNGs + images.csv,
    one corrupt .dcm, a text file, annotations.csv with good and broken rows."""
    site = tmp_path / "site"
    write_dicom(site / "p1" / "l_cc.dcm", patient="P1", laterality="L", seed=1)
    write_dicom(site / "p1" / "r_cc.dcm", patient="P1", laterality="R", seed=2)
    write_dicom(
        site / "p2" / "l_mlo.dcm", patient="P2", laterality="L", view="MLO",
        manufacturer="OtherCo", seed=3,
    )  # fmt: skip
    write_dicom(
        site / "p2" / "r_mlo.dcm", patient="P2", laterality="R", view="MLO", seed=4
    )
    write_png(site / "research" / "a.png", left=True, seed=5)
    write_png(site / "research" / "b.png", left=False, seed=6)
    (site / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    (site / "notes.txt").write_text("not an image\n")
    write_csv(
        site / "images.csv",
        ["image", "patient_id", "laterality", "view", "spacing_mm"],
        [
            ["research/a.png", "W1", "L", "MLO", "0.2"],
            ["research/b.png", "W1", "R", "MLO", "0.2"],
        ],
    )
    write_csv(
        site / "annotations.csv",
        ["image", "finding", "xmin", "ymin", "xmax", "ymax"],
        [
            ["p1/l_cc.dcm", "mass", 10, 60, 30, 80],
            ["p1/r_cc.dcm", "none", "", "", "", ""],
            ["p2/l_mlo.dcm", "calcification", "", "", "", ""],  # image-level
            ["research/a.png", "CIRC", 20, 90, 40, 110],
            ["research/a.png", "ARCH", 5, 20, 25, 40],
            ["p2/r_mlo.dcm", "mass", 50, 10, 40, 30],  # xmin >= xmax
            ["ghost.dcm", "mass", 1, 1, 5, 5],  # unknown image
            ["research/b.png", "tumour", 1, 1, 5, 5],  # unknown word
        ],
    )
    return site


@dataclass(frozen=True)
class ExamImage:
    """One written image: its path, laterality, and marker box (stored space)."""

    path: Path
    laterality: str
    view: str
    marker_box: tuple[int, int, int, int]


def add_study(
    path: Path,
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    unique_pixels: bool = False,
    **attrs: object,
) -> None:
    """Give the file at ``path`` the patient, study and series attributes.

    ``unique_pixels`` adds a little noise seeded by the SOP instance UID, so
    that no two images have the same pixels; ``attrs`` are set last.
    """
    ds = pydicom.dcmread(path)
    if unique_pixels:
        px = ds.pixel_array.astype(np.int32)
        seed = int(str(ds.SOPInstanceUID).replace(".", "")) % 2**32
        noise = np.random.default_rng(seed).integers(0, 8, size=px.shape)
        ds.PixelData = np.clip(px + noise, 0, 4095).astype(np.uint16).tobytes()
    ds.PatientName = "DOE^JANE"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate, ds.StudyTime = "20250115", "093000"
    ds.ContentDate, ds.ContentTime = "20250115", "093100"
    ds.AccessionNumber = "ACC42"
    ds.ReferringPhysicianName = "WHO^DR"
    ds.StudyID = "S1"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def write_study(
    folder: Path,
    *,
    rows: int = 128,
    cols: int = 96,
    spacing_mm: float = 0.1,
    study_uid: str | None = None,
    patient_id: str = "P001",
    unique_pixels: bool = False,
) -> list[ExamImage]:
    """Write a four-view exam (LCC, LMLO, RCC, RMLO) of one study into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out = []
    for i, (lat, view, side) in enumerate(FOUR_VIEWS, start=1):
        path = folder / f"{lat}{view}.dcm"
        ph = write_mammo(
            path, rows=rows, cols=cols, side=side, image_laterality=lat,
            view_position=view, pixel_spacing=(spacing_mm, spacing_mm),
        )  # fmt: skip
        orientation = ["A", "R"] if lat == "L" else ["P", "L"]
        add_study(
            path, study_uid, series_uid, i, unique_pixels=unique_pixels,
            PatientID=patient_id, PatientOrientation=orientation,
        )  # fmt: skip
        out.append(ExamImage(path, lat, view, ph.marker_box))
    return out


@pytest.fixture
def exam(tmp_path: Path) -> list[ExamImage]:
    """A synthetic four-view exam in ``tmp_path/exam``."""
    return write_study(tmp_path / "exam")


@pytest.fixture
def exam_writer() -> Callable[..., list[ExamImage]]:
    """:func:`write_study` itself, for tests that need more than one exam."""
    return write_study


def one_site_config(
    root: Path,
    *,
    name: str = "client-test",
    strategy: str = "personalized",
    trainer: str = "detector",
    learning_rate: float = 1e-3,
    personalization: PersonalizationConfig | None = None,
    **options: object,
) -> FederationConfig:
    """One round of the ``tiny`` detector on CPU at :data:`SITE`, under ``root``.

    ``options`` are the trainer's options beyond ``arch`` and ``device``.
    """
    return FederationConfig(
        name=name,
        num_rounds=1,
        seed=0,
        strategy=StrategyConfig(name=strategy),
        trainer=TrainerConfig(
            name=trainer,
            batch_size=2,
            learning_rate=learning_rate,
            options={"arch": "tiny", "device": "cpu", **options},
        ),
        personalization=personalization or PersonalizationConfig(),
        sites=(SITE,),
        state_dir=root / "state",
        run_dir=root / "run" / "server",
    )


@dataclass
class OneRound:
    """One site's first round, trained without Flower, and where it was kept."""

    cfg: FederationConfig
    cache: Path
    trainer: DetectorTrainer
    shared: dict[str, np.ndarray]  # global shared arrays of round 1
    metrics: dict[str, Any]  # the site's reply metrics
    ckdir: Path  # checkpoints of rounds 0 and 1


def train_one_round(root: Path, cfg: FederationConfig) -> OneRound:
    """Fit round 1 on a :func:`make_site_cache` site; record it, save rounds 0, 1."""
    cache = make_site_cache(root / "cache" / SITE)
    trainer = DetectorTrainer(SITE, root / "state", cfg, data_dir=cache)
    shared0 = trainer.initial_shared()
    shared1, metrics = trainer.fit(shared0, FitInstructions.from_federation(cfg, 1))
    SiteState(root / "state", SITE).record_round(1, "train", dict(metrics))
    assert cfg.run_dir is not None
    store = CheckpointStore(cfg.run_dir / "checkpoints")
    store.save(0, shared0, config=config_to_dict(cfg))
    store.save(1, shared1, config=config_to_dict(cfg))
    return OneRound(cfg, cache, trainer, shared1, dict(metrics), store.dir)


#: The node id the ClientApp tests' site runs as.
APP_NODE = 7


@pytest.fixture
def task_identity() -> None:
    """What a ServerApp process has set before messages are built."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


def app_context(state_dir: Path, run_json: str, node: int = APP_NODE) -> Any:
    """The flwr ``Context`` a ClientApp gets at site ``site-a`` (state in
    ``state_dir``) for a run whose federation config is ``run_json``."""
    from flwr.app import Context, RecordDict

    from common.wire.federation import NODE_SITE, NODE_STATE_DIR, RUN_FEDERATION_JSON

    return Context(
        run_id=1,
        node_id=node,
        node_config={NODE_SITE: "site-a", NODE_STATE_DIR: str(state_dir)},
        state=RecordDict(),
        run_config={RUN_FEDERATION_JSON: run_json},
    )
