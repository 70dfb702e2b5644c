"""In-process node: studies left unscored by a stopped daemon are scored at start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pydicom

from client.cad_sr import MAMMOGRAPHY_CAD_SR_STORAGE
from client.dicom_node import DicomNode
from client.dicom_node.node import SCORED_JSON
from client.gsps import GSPS_STORAGE
from common.config.site import load_site_config
from common.imaging.cache import SiteCache


def _place(files: list[Path], incoming: Path) -> tuple[str, set[str]]:
    ds = pydicom.dcmread(files[0])
    folder = incoming / str(ds.StudyInstanceUID)
    folder.mkdir(parents=True)
    uids = set()
    for f in files:
        uid = str(pydicom.dcmread(f).SOPInstanceUID)
        shutil.copy(f, folder / f"{uid}.dcm")
        uids.add(uid)
    return str(ds.StudyInstanceUID), uids


def test_unscored_study_is_scored_and_ingested_at_start(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace
) -> None:
    cfg_path = kit.site_yaml(
        tmp_path, kit.free_port(), kit.free_port(), tiny_checkpoint,
        exam_settle_s=0.0, retry_interval_s=60,
    )  # fmt: skip
    incoming = tmp_path / "data" / "incoming"
    todo, uids = _place(kit.write_exam(tmp_path / "a"), incoming)
    done, _ = _place(kit.write_exam(tmp_path / "b")[:2], incoming)
    marker = {"files": [p.name for p in (incoming / done).glob("*.dcm")], "sr": "1.2"}
    (incoming / done / SCORED_JSON).write_text(json.dumps(marker))
    node = DicomNode(load_site_config(cfg_path), source=str(cfg_path), device="cpu")
    pending = tmp_path / "outbox" / "pending"
    cache = SiteCache(tmp_path / "cache")
    with node:
        kit.wait_for(
            lambda: len(cache.read_manifest()) == 6, 120, "the ingest after scoring"
        )
    [sr_file] = sorted(pending.glob("*.dcm"))
    sr = pydicom.dcmread(sr_file)
    assert str(sr.StudyInstanceUID) == todo  # the scored study only
    record = json.loads((incoming / todo / SCORED_JSON).read_text())
    assert {Path(f).stem for f in record["files"]} == uids and record["sr"] == str(
        sr.SOPInstanceUID
    )
    assert json.loads((incoming / done / SCORED_JSON).read_text()) == marker
    rows = cache.read_manifest()
    assert all(r["labeled"] == "0" for r in rows)
    assert {r["source"].split("/")[1] for r in rows} == {todo, done}


def test_presentation_states_are_queued_beside_the_sr_once(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace
) -> None:
    """``presentation_states: true``: one state per image, each once per exam."""
    cfg_path = kit.site_yaml(
        tmp_path, kit.free_port(), kit.free_port(), tiny_checkpoint,
        exam_settle_s=0.0, retry_interval_s=60, presentation_states="true",
    )  # fmt: skip
    incoming = tmp_path / "data" / "incoming"
    study, uids = _place(kit.write_exam(tmp_path / "a"), incoming)
    node = DicomNode(load_site_config(cfg_path), source=str(cfg_path), device="cpu")
    pending = tmp_path / "outbox" / "pending"
    node.process_study(study)
    node.process_study(study)  # scored again (a crash before the record)
    objects = [pydicom.dcmread(p) for p in sorted(pending.glob("*.dcm"))]
    by_class: dict[str, list[pydicom.Dataset]] = {}
    for ds in objects:
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
    assert sorted(by_class) == [GSPS_STORAGE, MAMMOGRAPHY_CAD_SR_STORAGE]
    assert len(by_class[MAMMOGRAPHY_CAD_SR_STORAGE]) == 1
    states = by_class[GSPS_STORAGE]
    assert len(states) == 4  # one per image, not doubled by the second pass
    refs = {
        str(
            ps.ReferencedSeriesSequence[0]
            .ReferencedImageSequence[0]
            .ReferencedSOPInstanceUID
        )
        for ps in states
    }
    assert refs == uids and {str(ps.StudyInstanceUID) for ps in states} == {study}
    record = json.loads((incoming / study / SCORED_JSON).read_text())
    assert sorted(record["presentation_states"]) == sorted(
        str(ps.SOPInstanceUID) for ps in states
    )
