"""In-process SCP handler: what a hostile or broken C-STORE does to the node.

``DicomNode._on_store`` is driven with a stand-in for pynetdicom's event (the
data set, its file meta, the request and the requestor): no network, no model.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from client.dicom_node import DicomNode
from client.dicom_node.checks import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
)
from common.config.site import load_site_config

#: A header value far longer than any log line should be.
HUGE = 1_000_000


def _node(
    tmp_path: Path, checkpoint: Path, kit: SimpleNamespace, **opts: object
) -> DicomNode:
    cfg = kit.site_yaml(tmp_path, kit.free_port(), kit.free_port(), checkpoint, **opts)
    return DicomNode(load_site_config(cfg), source=str(cfg), device="cpu")


def _event(ds: Dataset, request_sop_class: str | None = None) -> SimpleNamespace:
    """What pynetdicom hands EVT_C_STORE, as far as the handler looks."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    requestor = SimpleNamespace(ae_title="MG_ROOM1", address="127.0.0.1", port=4242)
    return SimpleNamespace(
        assoc=SimpleNamespace(requestor=requestor),
        dataset=ds,
        file_meta=meta,
        request=SimpleNamespace(
            AffectedSOPClassUID=request_sop_class or meta.MediaStorageSOPClassUID
        ),
    )


@pytest.fixture
def mg(tmp_path: Path, kit: SimpleNamespace) -> Dataset:
    return pydicom.dcmread(kit.write_exam(tmp_path / "exam")[0])


def _stored(node: DicomNode) -> list[Path]:
    return sorted(p for p in node.incoming.rglob("*") if p.is_file())


def test_mammogram_is_stored(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace, mg: Dataset
) -> None:
    node = _node(tmp_path, tiny_checkpoint, kit)
    node.incoming.mkdir(parents=True)
    assert node._on_store(_event(mg, mg.SOPClassUID)) == STATUS_SUCCESS
    assert _stored(node) == [
        node.incoming / mg.StudyInstanceUID / f"{mg.SOPInstanceUID}.dcm"
    ]
    # as a plain write makes it (0666 less the umask), not the temporary's 0600
    mask = os.umask(0o022)
    os.umask(mask)
    assert _stored(node)[0].stat().st_mode & 0o777 == 0o666 & ~mask
    assert pydicom.dcmread(_stored(node)[0]).SOPInstanceUID == mg.SOPInstanceUID


@pytest.mark.parametrize(
    ("keyword", "status"),
    [
        ("Modality", STATUS_DATASET_MISMATCH),
        ("StudyInstanceUID", STATUS_DATASET_MISMATCH),
        ("SOPClassUID", STATUS_SOP_CLASS_NOT_SUPPORTED),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length")
def test_huge_header_value_is_refused_with_a_bounded_log_line(
    tmp_path: Path,
    tiny_checkpoint: Path,
    kit: SimpleNamespace,
    mg: Dataset,
    caplog: pytest.LogCaptureFixture,
    keyword: str,
    status: int,
) -> None:
    # implicit VR gives every element a 4-byte length: a sender may put
    # megabytes into Modality or a UID; the log quotes it cut, with its length
    node = _node(tmp_path, tiny_checkpoint, kit)
    request = mg.SOPClassUID
    setattr(mg, keyword, "7" * HUGE)
    if keyword != "StudyInstanceUID":  # checked before it; quoted in the line
        mg.SOPInstanceUID = "1." + "2" * HUGE
    with caplog.at_level(logging.INFO, logger="client.dicom_node"):
        assert node._on_store(_event(mg, request)) == status
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(line) < 1000, len(line)
    assert f"{keyword}='777" in line and f"({HUGE} chars)" in line
    assert "from MG_ROOM1 at 127.0.0.1:4242" in line
    assert _stored(node) == []


def test_header_pydicom_cannot_convert_is_refused_and_logged(
    tmp_path: Path,
    tiny_checkpoint: Path,
    kit: SimpleNamespace,
    mg: Dataset,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # explicit VR lets the sender declare Modality as US with 3 bytes:
    # pydicom raises when the check reads it
    node = _node(tmp_path, tiny_checkpoint, kit)
    request = mg.SOPClassUID
    tag = Tag(0x00080060)
    mg[tag] = RawDataElement(tag, "US", 3, b"\x01\x02\x03", 0, False, True)
    with caplog.at_level(logging.INFO, logger="client.dicom_node"):
        assert node._on_store(_event(mg, request)) == STATUS_CANNOT_UNDERSTAND
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "from MG_ROOM1 at 127.0.0.1:4242" in line, line
    assert "header cannot be read: BytesLengthException" in line
    assert "(0008,0060)" in line and "(status 0xC210)" in line
    assert _stored(node) == []


def test_refused_out_of_resources_when_the_disk_is_nearly_full(
    tmp_path: Path,
    tiny_checkpoint: Path,
    kit: SimpleNamespace,
    mg: Dataset,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a sender (or a modality resending its archive) must not fill the disk
    # that the outbox and the cache share: below the floor, 0xA700
    node = _node(tmp_path, tiny_checkpoint, kit, min_free_mb=500)
    node.incoming.mkdir(parents=True)
    real = shutil.disk_usage
    free = {"mb": 499}

    def usage(path: str | Path) -> Any:
        u = real(path)
        return type(u)(u.total, u.used, free["mb"] * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    with caplog.at_level(logging.INFO, logger="client.dicom_node"):
        assert node._on_store(_event(mg, mg.SOPClassUID)) == STATUS_OUT_OF_RESOURCES
    assert _stored(node) == [] and node.tracker.pending() == []
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert f"refused SOP Instance {mg.SOPInstanceUID}" in line
    assert "499 MiB free" in line and "dicom_node.min_free_mb = 500" in line
    assert "from MG_ROOM1 at 127.0.0.1:4242" in line and "(status 0xA700)" in line
    free["mb"] = 501
    assert node._on_store(_event(mg, mg.SOPClassUID)) == STATUS_SUCCESS
    assert len(_stored(node)) == 1


def test_deflated_transfer_syntax_is_not_negotiated(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace
) -> None:
    """pynetdicom inflates a deflated C-STORE data set whole, without a bound
    (a few kB can say gigabytes): the node does not accept that syntax, and
    still accepts the uncompressed one every storage SCU proposes too."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from pynetdicom import AE, build_context

    mg_class = "1.2.840.10008.5.1.4.1.1.1.2"
    with _node(tmp_path, tiny_checkpoint, kit) as node:
        scu = AE(ae_title="MG_ROOM1")
        scu.requested_contexts = [
            build_context(mg_class, [DeflatedExplicitVRLittleEndian]),
            build_context(mg_class, [ExplicitVRLittleEndian]),
        ]
        assoc = scu.associate("127.0.0.1", node.port, ae_title=node.cfg.ae_title)
        try:
            assert assoc.is_established
            accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
            rejected = [cx.transfer_syntax[0] for cx in assoc.rejected_contexts]
        finally:
            assoc.release()
    assert accepted == [ExplicitVRLittleEndian]
    assert rejected == [DeflatedExplicitVRLittleEndian]


def test_an_instance_over_max_instance_mb_aborts_the_association(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace, mg: Dataset
) -> None:
    """pynetdicom holds a received data set in memory, whole: a sender that
    sends more than max_instance_mb towards one instance is aborted while it
    sends, nothing of it is kept, and the next association is served."""
    import numpy as np
    from pynetdicom import AE, build_context

    mg_class = "1.2.840.10008.5.1.4.1.1.1.2"
    big = pydicom.dcmread(kit.write_exam(tmp_path / "big")[0])
    big.PixelData = np.zeros(2 * 2**20, np.uint16).tobytes()  # 4 MiB
    big.Rows, big.Columns = 1024, 2048

    def send(ds: Dataset) -> tuple[bool, int | None]:
        scu = AE(ae_title="MG_ROOM1")
        scu.requested_contexts = [build_context(mg_class, [ExplicitVRLittleEndian])]
        assoc = scu.associate("127.0.0.1", node.port, ae_title=node.cfg.ae_title)
        assert assoc.is_established
        rsp = assoc.send_c_store(ds)
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if status is None:  # no response: the node's A-ABORT is on its way
            for _ in range(100):
                if assoc.is_aborted or not assoc.is_established:
                    break
                threading.Event().wait(0.05)
        aborted = assoc.is_aborted
        if assoc.is_established:
            assoc.release()
        return aborted, status

    with _node(tmp_path, tiny_checkpoint, kit, max_instance_mb=1) as node:
        aborted, status = send(big)
        assert aborted and status is None
        assert _stored(node) == []
        assert send(mg) == (False, STATUS_SUCCESS)  # a normal image still passes
        assert [p.name for p in _stored(node)] == [f"{mg.SOPInstanceUID}.dcm"]


@pytest.mark.parametrize(
    "fault", ["jpeg-syntax-native-pixels", "file-meta-in-data-set"]
)
def test_an_instance_pydicom_cannot_write_is_refused_and_leaves_no_file(
    tmp_path: Path,
    tiny_checkpoint: Path,
    kit: SimpleNamespace,
    mg: Dataset,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """A write that fails part-way must not leave its hidden temporary file.

    Hidden files are never cleaned up, so a sender varying the SOP Instance
    UID could otherwise fill the disk until the node refuses every image.
    """
    node = _node(tmp_path, tiny_checkpoint, kit)
    node.incoming.mkdir(parents=True)
    event = _event(mg, mg.SOPClassUID)
    if fault == "jpeg-syntax-native-pixels":  # the header is written first
        event.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        mg.add_new(0x00020016, "AE", "INSIDE")
    with caplog.at_level(logging.INFO, logger="client.dicom_node"):
        assert node._on_store(event) == STATUS_CANNOT_UNDERSTAND
    assert _stored(node) == []  # hidden temporary files included
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "cannot be written as a DICOM file" in line and mg.SOPInstanceUID in line
