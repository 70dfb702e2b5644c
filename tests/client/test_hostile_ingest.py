"""Ingest that one file cannot take down: budget, decoder crashes, duplicates.

Decoder crashes are injected through the ingest's ``reader`` argument: a small
module written into ``tmp_path`` whose reader raises a ``BaseException`` (like
pyo3's ``PanicException``), kills its own process, exits, runs out of memory
or hangs for the files so named, and reads the others normally. It runs in the
ingest's decode processes, which must all be gone when the ingest returns.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import config as pydicom_config

from benchmarks.synthetic import write_rle_bomb
from client import ingest as ingest_mod
from client.ingest import ingest_site, resolve_duplicates
from common.config.site import SiteConfig
from common.errors import MammofedError

from .conftest import write_csv, write_dicom

CRASH_READER = '''
"""Test reader: crashes on the files so named, reads the others."""
import os
import resource
import signal
import time
from pathlib import Path

from common.imaging.image_io import read_any

PIDS = {pids!r}


class PanicException(BaseException):
    """Like pyo3_runtime.PanicException: a BaseException, not an Exception."""


def reader(path, **kwargs):
    with open(PIDS, "a") as fh:
        fh.write(f"{{os.getpid()}}\\n")
    name = Path(path).name
    if name.startswith("panic"):
        raise PanicException("called `Result::unwrap()` on an `Err` value")
    if name.startswith("segv"):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("exit"):
        os._exit(3)
    if name.startswith("oom"):
        raise MemoryError()
    if name.startswith("hang"):
        time.sleep(120)
    if name.startswith("limited"):
        # a real native decode under a memory limit, budget off
        with open("/proc/self/status") as fh:
            vm = [ln for ln in fh if ln.startswith("VmSize:")][0]
        limit = int(vm.split()[1]) * 1024 + 200 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        kwargs["max_pixels"] = None
    return read_any(path, **kwargs)
'''


@pytest.fixture
def crash_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``(reader, pids_file)``: the injected reader, importable in the workers."""
    mod_dir = tmp_path / "readermod"
    mod_dir.mkdir()
    pids = tmp_path / "pids.txt"
    name = f"crash_reader_{abs(hash(str(tmp_path)))}"
    (mod_dir / f"{name}.py").write_text(CRASH_READER.format(pids=str(pids)))
    monkeypatch.syspath_prepend(str(mod_dir))
    module = importlib.import_module(name)
    yield module.reader, pids
    sys.modules.pop(name, None)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\tZ" not in status.split("State:")[1].splitlines()[0]


def _assert_no_decode_process_left(pids_file: Path) -> None:
    pids = (
        {int(p) for p in pids_file.read_text().split()} if pids_file.exists() else set()
    )
    assert pids, "the reader never ran"
    assert [p for p in pids if _alive(p)] == []


def _manifest_sources(cache: Path) -> list[str]:
    with open(cache / "manifest.csv", newline="") as fh:
        return sorted(r["source"] for r in csv.DictReader(fh))


def _report(cache: Path) -> dict[str, Any]:
    return dict(json.loads((cache / "ingest_report.json").read_text()))


def _reasons(result: Any) -> dict[str, str]:
    return {s["file"]: s["reason"] for s in result.skipped}


@pytest.mark.parametrize("workers", [1, 2])
def test_decoder_crashes_cost_one_file_each(
    tmp_path: Path, crash_reader: Any, workers: int
) -> None:
    """PanicException, SIGSEGV, os._exit, MemoryError: that file skipped, rest in."""
    reader, pids = crash_reader
    site = tmp_path / "site"
    names = ["a_ok", "exit", "oom", "panic", "segv", "z_ok"]
    for i, name in enumerate(names):
        write_dicom(site / f"{name}.dcm", patient=f"P{i}", seed=i)
    cache = tmp_path / "cache"
    res = ingest_site(site, cache, SiteConfig(), workers=workers, reader=reader)
    assert sorted(e.source for e in res.entries) == ["a_ok.dcm", "z_ok.dcm"]
    reasons = _reasons(res)
    assert (
        "decoder aborted: PanicException: called `Result::unwrap()`"
        in (reasons["panic.dcm"])
    )
    assert "SIGSEGV" in reasons["segv.dcm"]
    assert "exited with code 3" in reasons["exit.dcm"]
    assert "out of memory" in reasons["oom.dcm"]
    report = _report(cache)
    assert report["status"] == "complete" and report["counts"]["skipped"] == 4
    assert _manifest_sources(cache) == ["a_ok.dcm", "z_ok.dcm"]
    _assert_no_decode_process_left(pids)
    refused = json.loads((cache / "refused.json").read_text())
    assert {v["file"] for v in refused.values()} == {
        "exit.dcm",
        "panic.dcm",
        "segv.dcm",
    }


def test_hanging_decoder_is_stopped_after_the_timeout(
    tmp_path: Path, crash_reader: Any
) -> None:
    """A decode that never ends is stopped at decode_timeout_s; the rest goes on."""
    reader, pids = crash_reader
    site = tmp_path / "site"
    write_dicom(site / "hang.dcm", patient="P1", seed=1)
    write_dicom(site / "ok.dcm", patient="P2", seed=2)
    cfg = SiteConfig(decode_timeout_s=3.0)
    res = ingest_site(site, tmp_path / "cache", cfg, workers=1, reader=reader)
    assert [e.source for e in res.entries] == ["ok.dcm"]
    assert "longer than decode_timeout_s=3" in _reasons(res)["hang.dcm"]
    assert res.seconds < 60
    _assert_no_decode_process_left(pids)


def test_real_decoder_under_a_memory_limit_skips_the_file(
    tmp_path: Path, crash_reader: Any
) -> None:
    """The real 8.4 MB RLE bomb, budget off, 200 MB of headroom: the native
    decoder fails inside its process and only that file is lost."""
    reader, pids = crash_reader
    site = tmp_path / "site"
    write_dicom(site / "a_ok.dcm", patient="P1", seed=1)
    write_rle_bomb(site / "limited_bomb.dcm", full=True)
    res = ingest_site(site, tmp_path / "cache", SiteConfig(), workers=1, reader=reader)
    assert [e.source for e in res.entries] == ["a_ok.dcm"]
    reason = _reasons(res)["limited_bomb.dcm"]
    assert "dynamic range" not in reason  # it never decoded
    assert any(
        w in reason for w in ("SIG", "out of memory", "aborted", "cannot be decoded")
    ), reason
    _assert_no_decode_process_left(pids)


def test_pixel_budget_at_ingest_and_remembered_refusal(tmp_path: Path) -> None:
    """The 16384^2 header is refused before decoding, by the configured budget;
    the refusal is reused while the budget is unchanged and redone when not."""
    site = tmp_path / "site"
    write_dicom(site / "ok.dcm")
    write_rle_bomb(site / "bomb.dcm")
    cache = tmp_path / "cache"
    first = ingest_site(site, cache, SiteConfig(), workers=1)
    assert [e.source for e in first.entries] == ["ok.dcm"]
    assert "16384 x 16384 x 1 x 1 = 268435456 samples" in _reasons(first)["bomb.dcm"]
    assert _report(cache)["max_pixels"] == SiteConfig().max_pixels
    again = ingest_site(site, cache, SiteConfig(), workers=1)
    assert again.new == [] and _reasons(again) == _reasons(first)
    smaller = ingest_site(site, cache, SiteConfig(max_pixels=2**20), workers=1)
    assert "max_pixels=1048576" in _reasons(smaller)["bomb.dcm"]


def test_hostile_headers_are_refused_with_field_and_value(tmp_path: Path) -> None:
    """NaN / 1e308 slope, PALETTE COLOR, RGB: skipped naming the field; no
    all-zero or colour-as-grey image reaches the manifest."""
    site = tmp_path / "site"
    edits = {
        "nan.dcm": {"RescaleSlope": "NaN", "RescaleIntercept": "0"},
        "huge.dcm": {"RescaleSlope": "1e308", "RescaleIntercept": "0"},
        "palette.dcm": {"PhotometricInterpretation": "PALETTE COLOR"},
        "rgb.dcm": {"PhotometricInterpretation": "RGB"},
    }
    for i, (name, values) in enumerate(edits.items()):
        path = write_dicom(site / name, patient=f"P{i}", seed=i)
        ds = pydicom.dcmread(path)
        for k, v in values.items():
            setattr(ds, k, v)
        with pydicom_config.disable_value_validation():
            ds.save_as(path, enforce_file_format=True)
    write_dicom(site / "ok.dcm", patient="P9", seed=9)
    res = ingest_site(site, tmp_path / "cache", SiteConfig(), workers=1)
    assert [e.source for e in res.entries] == ["ok.dcm"]
    reasons = _reasons(res)
    assert "RescaleSlope='NaN'" in reasons["nan.dcm"]
    assert "RescaleSlope='1e308'" in reasons["huge.dcm"]
    assert "PhotometricInterpretation='PALETTE COLOR'" in reasons["palette.dcm"]
    assert "PhotometricInterpretation='RGB'" in reasons["rgb.dcm"]


def test_interrupted_run_still_writes_report_and_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected stop after the first decoded file: the manifest lists it,
    the report says interrupted and why, and the error is raised."""
    site = tmp_path / "site"
    for i in range(3):
        write_dicom(site / f"f{i}.dcm", patient=f"P{i}", seed=i)
    real = ingest_mod._run_jobs

    def stops_after_one(jobs: list[Any], *args: Any) -> Any:
        yield from real(jobs[:1], *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_mod, "_run_jobs", stops_after_one)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        ingest_site(site, cache, SiteConfig(), workers=1)
    report = _report(cache)
    assert report["status"] == "interrupted" and report["error"] == "KeyboardInterrupt"
    assert _manifest_sources(cache) == ["f0.dcm"]
    assert (cache / "annotations.json").is_file()


def test_reader_that_cannot_reach_a_decode_process_is_a_clear_error(
    tmp_path: Path,
) -> None:
    """A lambda reader cannot be sent to a decode process: one clear error, and
    the report of the (empty) run is still written."""
    site = tmp_path / "site"
    write_dicom(site / "a.dcm")
    cache = tmp_path / "cache"
    with pytest.raises(MammofedError, match="module-level function"):
        ingest_site(site, cache, SiteConfig(), reader=lambda p, **k: None)
    assert _report(cache)["status"] == "interrupted"
    assert _manifest_sources(cache) == []


def _set_uid(path: Path, uid: str) -> None:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(path, enforce_file_format=True)


def test_duplicates_never_move_labels_across_patients(tmp_path: Path) -> None:
    """The duplicate rule (see client.ingest.resolve_duplicates), with labels
    keyed by SOPInstanceUID and by path."""
    site = tmp_path / "site"
    # same UID, two patients, different pixels -> both refused
    write_dicom(site / "uid_a.dcm", patient="PA", seed=1)
    write_dicom(site / "uid_b.dcm", patient="PB", seed=2)
    shared = str(pydicom.dcmread(site / "uid_a.dcm").SOPInstanceUID)
    _set_uid(site / "uid_b.dcm", shared)
    # same UID, same pixels, same patient, other header bytes -> first kept
    write_dicom(site / "same_a.dcm", patient="PS", seed=3)
    write_dicom(site / "same_b.dcm", patient="PS", seed=3, manufacturer="OTHER")
    same_uid = str(pydicom.dcmread(site / "same_a.dcm").SOPInstanceUID)
    _set_uid(site / "same_b.dcm", same_uid)
    # same pixels, other UIDs, two patients -> both refused
    write_dicom(site / "pix_a.dcm", patient="PC", seed=4)
    write_dicom(site / "pix_b.dcm", patient="PD", seed=4)
    # same pixels, other UIDs, one patient -> first kept
    write_dicom(site / "twin_a.dcm", patient="PE", seed=5)
    write_dicom(site / "twin_b.dcm", patient="PE", seed=5)
    write_dicom(site / "ok.dcm", patient="PF", seed=6)
    box = [10, 60, 30, 80]
    write_csv(
        site / "annotations.csv",
        ["image", "finding", "xmin", "ymin", "xmax", "ymax"],
        [
            [shared, "mass", *box],
            [same_uid, "mass", *box],
            ["pix_b.dcm", "mass", *box],
            ["twin_b.dcm", "mass", *box],
            ["ok.dcm", "none", "", "", "", ""],
        ],
    )
    cache = tmp_path / "cache"
    res = ingest_site(site, cache, SiteConfig(), workers=1)
    kept = sorted(e.source for e in res.entries)
    assert kept == ["ok.dcm", "same_a.dcm", "twin_a.dcm"]
    assert _manifest_sources(cache) == kept
    reasons = _reasons(res)
    for name in ("uid_a.dcm", "uid_b.dcm"):
        assert f"SOPInstanceUID {shared}" in reasons[name]
        assert "'PA', 'PB'" in reasons[name]
    for name in ("pix_a.dcm", "pix_b.dcm"):
        assert "identical pixels" in reasons[name] and "'PC', 'PD'" in reasons[name]
    assert "duplicate of same_a.dcm" in reasons["same_b.dcm"]
    assert "duplicate of twin_a.dcm" in reasons["twin_b.dcm"]
    # labels: the UID row lands on same_a (the same image); the others nowhere
    labeled = {
        r["source"]: r["labeled"] for r in csv.DictReader(open(cache / "manifest.csv"))
    }
    assert labeled == {"ok.dcm": "1", "same_a.dcm": "1", "twin_a.dcm": "0"}
    skipped_refs = {s.value for s in res.annotation_skips}
    assert {shared, "pix_b.dcm", "twin_b.dcm"} <= skipped_refs
    # a rerun reuses the held entries and gives the same answer
    again = ingest_site(site, cache, SiteConfig(), workers=1)
    assert again.new == [] and sorted(e.source for e in again.entries) == kept
    assert _reasons(again) == reasons


def test_resolve_duplicates_without_conflict_keeps_everything(tmp_path: Path) -> None:
    """Negative case: distinct UIDs and pixels, nothing is set aside."""
    site = tmp_path / "site"
    for i in range(3):
        write_dicom(site / f"f{i}.dcm", patient=f"P{i % 2}", seed=i)
    res = ingest_site(site, tmp_path / "cache", SiteConfig(), workers=1)
    kept, skips = resolve_duplicates(res.entries)
    assert skips == [] and len(kept) == 3 and res.skipped == []
