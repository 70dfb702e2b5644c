"""In-process node: one image pydicom cannot use costs that image, not the exam."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from benchmarks import synthetic
from client.dicom_node import DicomNode
from client.dicom_node.node import SCORED_JSON
from common.config.site import load_site_config


@pytest.mark.parametrize("kind", synthetic.HEADER_BREAKS)
def test_exam_with_a_broken_image_gets_an_sr_for_the_others(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace, kind: str
) -> None:
    cfg_path = kit.site_yaml(
        tmp_path, kit.free_port(), kit.free_port(), tiny_checkpoint
    )
    files = kit.write_exam(tmp_path / "exam")
    synthetic.break_header(files[3], kind)
    node = DicomNode(load_site_config(cfg_path), source=str(cfg_path), device="cpu")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    study = str(headers[0].StudyInstanceUID)
    folder = node.incoming / study
    folder.mkdir(parents=True)
    for f, ds in zip(files, headers, strict=True):
        shutil.copy(f, folder / f"{ds.SOPInstanceUID}.dcm")

    queued = node.process_study(study)

    assert queued is not None and queued.parent == tmp_path / "outbox" / "pending"
    sr = pydicom.dcmread(queued)
    assert str(sr.StudyInstanceUID) == study
    cited = {
        str(sop.ReferencedSOPInstanceUID)
        for series in sr.CurrentRequestedProcedureEvidenceSequence[
            0
        ].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert cited == {str(ds.SOPInstanceUID) for ds in headers[:3]}
    record = json.loads((folder / SCORED_JSON).read_text())
    assert record["sr"] == str(sr.SOPInstanceUID)
    [(name, why)] = record["refused"].items()
    assert name == f"{headers[3].SOPInstanceUID}.dcm"
    assert ("LUTDescriptor" if kind.startswith("modality-lut") else "Rows=") in why


def _received(
    tmp_path: Path, checkpoint: Path, kit: SimpleNamespace, files: list[Path]
) -> tuple[DicomNode, str]:
    """A node whose incoming folder holds ``files`` as one received study."""
    cfg_path = kit.site_yaml(tmp_path, kit.free_port(), kit.free_port(), checkpoint)
    node = DicomNode(load_site_config(cfg_path), source=str(cfg_path), device="cpu")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    folder = node.incoming / study
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return node, study


def test_the_sr_reads_only_small_header_values_of_the_exam(
    tmp_path: Path,
    tiny_checkpoint: Path,
    kit: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large private value before the pixels stays in the file.

    Every scored image's header is held at once while the SR is built, and
    the number of images of a study is the senders'; large values are left
    unread (deferred), as the scorer leaves them.
    """
    import client.dicom_node.node as node_module

    files = kit.write_exam(tmp_path / "exam")
    tag = 0x00091010
    for f in files:
        ds = pydicom.dcmread(f)
        ds.add_new(0x00090010, "LO", "ACME")
        ds.add_new(tag, "OB", b"\0" * 2**20)  # 1 MiB before the pixels
        ds.save_as(f, enforce_file_format=True)
    node, study = _received(tmp_path, tiny_checkpoint, kit, files)
    seen: list[object] = []
    real = node_module.build_cad_sr

    def spy(sources, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.extend(s.get_item(tag, keep_deferred=True).value for s in sources)
        return real(sources, *args, **kwargs)

    monkeypatch.setattr(node_module, "build_cad_sr", spy)
    assert node.process_study(study) is not None
    assert seen and all(v is None for v in seen)  # deferred: not read


def test_an_exam_scored_again_gets_the_same_sr_uids(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace
) -> None:
    """A crash after queueing the SR, before the record, scores the exam again.

    The second SR must be the same report to the archive (same SOP Instance
    UID), not a second one.
    """
    files = kit.write_exam(tmp_path / "exam")
    node, study = _received(tmp_path, tiny_checkpoint, kit, files)
    first = node.process_study(study)
    assert first is not None
    a = pydicom.dcmread(first)
    # the queue item's name starts with the time: a second later it differs
    first.rename(first.with_name("19990101T000000-" + first.name.split("-", 1)[1]))
    again = node.process_study(study)
    assert again is not None and node.outbox.pending() == [again]  # queued once
    b = pydicom.dcmread(again)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (
        b.SOPInstanceUID,
        b.SeriesInstanceUID,
    )
    # another model's report of the same exam is another SR
    node.scorer.model_sha256 = "another model"
    third = node.process_study(study)
    assert third is not None and third != again and len(node.outbox.pending()) == 2
