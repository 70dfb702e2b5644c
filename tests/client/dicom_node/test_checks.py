"""What the storage node accepts, and the status of each refusal."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from benchmarks import synthetic
from client.dicom_node.checks import (
    STATUS_DATASET_MISMATCH,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    check_received,
    is_valid_uid,
)


@pytest.fixture
def mg(tmp_path: Path, kit: SimpleNamespace) -> pydicom.Dataset:
    return pydicom.dcmread(kit.write_exam(tmp_path / "exam")[0])


def test_mammogram_is_accepted(mg: pydicom.Dataset) -> None:
    assert check_received(mg, mg.SOPClassUID) is None
    assert check_received(mg) is None


def test_ct_is_refused_sop_class_not_supported(
    tmp_path: Path, kit: SimpleNamespace
) -> None:
    ds = pydicom.dcmread(kit.write_ct(tmp_path / "ct.dcm"))
    r = check_received(ds, ds.SOPClassUID)
    assert r is not None
    assert (r.status, r.field, r.value) == (
        STATUS_SOP_CLASS_NOT_SUPPORTED,
        "SOPClassUID",
        synthetic.CT_IMAGE,
    )
    msg = r.message(ds.SOPInstanceUID)
    assert ds.SOPInstanceUID in msg and "CT Image Storage" in msg and "0x0122" in msg


@pytest.mark.parametrize(
    ("change", "field", "value"),
    [
        (lambda ds: setattr(ds, "Modality", "CT"), "Modality", "CT"),
        (lambda ds: delattr(ds, "Modality"), "Modality", "absent"),
        (lambda ds: delattr(ds, "PixelData"), "PixelData", "absent"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2.3/../../x"),
         "StudyInstanceUID", "1.2.3/../../x"),
        (lambda ds: setattr(ds, "SOPInstanceUID", "1.02.3"), "SOPInstanceUID",
         "1.02.3"),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_mammo_class_that_is_no_mammogram_does_not_match(
    mg: pydicom.Dataset, change, field: str, value: str
) -> None:
    change(mg)
    r = check_received(mg, mg.SOPClassUID)
    assert r is not None and (r.status, r.field, r.value) == (
        STATUS_DATASET_MISMATCH,
        field,
        value,
    )


def test_secondary_capture_of_a_breast_is_refused(
    tmp_path: Path, kit: SimpleNamespace
) -> None:
    path = tmp_path / "sc.dcm"
    synthetic.write_mammo(path, modality="OT", sop_class=synthetic.SECONDARY_CAPTURE)
    r = check_received(pydicom.dcmread(path))
    assert r is not None and r.status == STATUS_SOP_CLASS_NOT_SUPPORTED


def test_request_class_must_match(mg: pydicom.Dataset) -> None:
    other = "1.2.840.10008.5.1.4.1.1.1.2.1"  # For Processing
    r = check_received(mg, other)
    assert r is not None and r.status == STATUS_DATASET_MISMATCH
    assert r.field == "SOPClassUID"


def test_uid_syntax() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.1.2")
    assert is_valid_uid("0.1")
    for bad in ("", "1..2", "1.2.", "01.2", "1.2a", "../1", "1." * 40 + "1", "1.2\n"):
        assert not is_valid_uid(bad), bad
