"""Fixtures: a synthetic four-view exam written by pydicom, and a tiny checkpoint.

The images come from ``tests/dicom/factory.py`` (breast phantom with a marker
block) and get the patient, study and series attributes a modality writes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

#: (ImageLaterality, ViewPosition, breast side in the stored image) per view.
FOUR_VIEWS = (("L", "CC", "left"), ("L", "MLO", "left"), ("R", "CC", "right"),
              ("R", "MLO", "right"))  # fmt: skip
ROWS, COLS = 128, 96


def _load_factory() -> ModuleType:
    """tests/dicom/factory.py, loaded once by the project-wide conftest."""
    return sys.modules["mammofed_tests_dicom_factory"]  # tests/conftest.py


@dataclass(frozen=True)
class ExamImage:
    """One written image: its path, laterality, and marker box (stored space)."""

    path: Path
    laterality: str
    view: str
    marker_box: tuple[int, int, int, int]


def write_exam(
    folder: Path, *, study_uid: str | None = None, patient_id: str = "P001"
) -> list[ExamImage]:
    """Write a four-view exam (LCC, LMLO, RCC, RMLO) of one study into ``folder``."""
    factory = _load_factory()
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out = []
    for i, (lat, view, side) in enumerate(FOUR_VIEWS, start=1):
        path = folder / f"{lat}{view}.dcm"
        ph = factory.write_mammo(
            path, rows=ROWS, cols=COLS, side=side, image_laterality=lat,
            view_position=view,
        )  # fmt: skip
        ds = pydicom.dcmread(path)
        ds.PatientName = "DOE^JANE"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyDate, ds.StudyTime = "20250115", "093000"
        ds.ContentDate, ds.ContentTime = "20250115", "093100"
        ds.AccessionNumber = "ACC42"
        ds.ReferringPhysicianName = "WHO^DR"
        ds.StudyID = "S1"
        ds.SeriesNumber, ds.InstanceNumber = 1, i
        ds.PatientOrientation = ["A", "R"] if lat == "L" else ["P", "L"]
        ds.save_as(path, enforce_file_format=True)
        out.append(ExamImage(path, lat, view, ph.marker_box))
    return out


@pytest.fixture
def exam(tmp_path: Path) -> list[ExamImage]:
    """A synthetic four-view exam in ``tmp_path/exam``."""
    return write_exam(tmp_path / "exam")


@pytest.fixture
def exam_writer() -> Callable[..., list[ExamImage]]:
    """:func:`write_exam` itself, for tests that need more than one exam."""
    return write_exam


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the machine's cores are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
