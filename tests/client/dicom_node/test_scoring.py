"""ExamScorer: stored-space detections, refusals, model reload on file change."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import torch

from client.dicom_node.scoring import ExamScorer
from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig, build_detector
from common.errors import MammofedError


def test_scores_exam_in_stored_space_and_reloads(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace
) -> None:
    files = kit.write_exam(tmp_path / "exam")
    broken = tmp_path / "exam" / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    scorer = ExamScorer(tiny_checkpoint, score_floor=0.0, device="cpu")
    res = scorer.score([*files, broken])
    assert [s.path for s in res.scored] == files
    assert [p for p, _ in res.refused] == [broken] and res.refused[0][1]
    for s in res.scored:
        ds = pydicom.dcmread(s.path, stop_before_pixels=True)
        assert s.sop_instance_uid == ds.SOPInstanceUID
        assert s.detections, "an untrained model at floor 0 detects something"
        for d in s.detections:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= ds.Columns and 0 <= y0 <= y1 <= ds.Rows
            assert d["label"] in ("mass", "calcification")
    first = scorer.model_sha256
    assert len(first) == 64
    # a new export replaces the model file: the next exam uses it
    torch.manual_seed(1)
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    save_checkpoint(tiny_checkpoint, build_detector(cfg), cfg)
    st = tiny_checkpoint.stat()
    os.utime(tiny_checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    scorer.score(files[:1])
    assert scorer.model_sha256 != first


def test_an_image_over_the_pixel_budget_is_refused_not_decoded(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace
) -> None:
    files = kit.write_exam(tmp_path / "exam")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    budget = int(ds.Rows) * int(ds.Columns) - 1
    scorer = ExamScorer(
        tiny_checkpoint, score_floor=0.0, device="cpu", max_pixels=budget
    )
    res = scorer.score(files)
    assert res.scored == [] and [p for p, _ in res.refused] == files
    assert f"max_pixels={budget}" in res.refused[0][1]


def test_missing_model_raises(tmp_path: Path, kit: SimpleNamespace) -> None:
    scorer = ExamScorer(tmp_path / "none.pt", score_floor=0.3, device="cpu")
    with pytest.raises(MammofedError, match="none.pt: model checkpoint unreadable"):
        scorer.score(kit.write_exam(tmp_path / "exam")[:1])


def test_bad_floor_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1.5"):
        ExamScorer(tmp_path / "m.pt", score_floor=1.5)


def _silent_checkpoint(path: Path, seed: int = 2) -> Path:
    """A ``tiny`` detector at 0.4 mm that finds nothing (class logits -50)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    model = build_detector(cfg)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(-50.0)  # type: ignore[union-attr]
    return save_checkpoint(path, model, cfg)


def test_two_models_fuse_and_each_file_is_watched(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace
) -> None:
    files = kit.write_exam(tmp_path / "exam")
    floor = 0.02
    alone = ExamScorer(tiny_checkpoint, score_floor=floor, device="cpu").score(files)
    silent = _silent_checkpoint(tmp_path / "silent.pt")
    pair = ExamScorer([tiny_checkpoint, silent], score_floor=floor, device="cpu")
    fused = pair.score(files)
    assert [s.path for s in fused.scored] == files
    tol = 1.5e-6  # float32 rounding of the fused score
    for a, f in zip(alone.scored, fused.scored, strict=True):
        # a finding only one of two models makes keeps half its score, its box;
        # the floor applies to the fused score. The untrained model's scores
        # nearly tie, so the two lists are matched finding by finding, not by
        # rank (the order of near-ties follows float rounding, which depends on
        # the threads torch runs with)
        kept = [d for d in a.detections if d["score"] / 2 >= floor + tol]
        edge = [d for d in a.detections if abs(d["score"] / 2 - floor) < tol]
        assert len(kept) <= len(f.detections) <= len(kept) + len(edge)
        assert f.detections
        left = kept + edge
        for df in f.detections:
            match = next(
                (
                    da
                    for da in left
                    if da["label"] == df["label"]
                    and df["score"] == pytest.approx(da["score"] / 2, abs=tol)
                    and df["box"] == pytest.approx(da["box"], abs=1e-3)
                ),
                None,
            )
            assert match is not None, f"fused finding {df} has no single-model twin"
            left.remove(match)
        assert all(d in edge for d in left)  # every clear finding was fused
    members = pair.members()
    assert [m["path"] for m in members] == [str(tiny_checkpoint), str(silent)]
    assert pair.model_label() == "models " + "+".join(m["sha256"][:12] for m in members)
    first = pair.model_sha256
    assert len(first) == 64 and first not in {m["sha256"] for m in members}
    # replacing the second model (a new local model) reloads the pair
    _silent_checkpoint(silent, seed=3)
    st = silent.stat()
    os.utime(silent, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    pair.score(files[:1])
    assert pair.members()[1]["sha256"] != members[1]["sha256"]
    assert pair.model_sha256 != first


def test_models_at_different_spacings_are_refused(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.2)
    other = save_checkpoint(tmp_path / "fine.pt", build_detector(cfg), cfg)
    scorer = ExamScorer([tiny_checkpoint, other], score_floor=0.3, device="cpu")
    with pytest.raises(MammofedError, match="fine.pt: works at 0.2 mm"):
        scorer.load()
    with pytest.raises(ValueError, match="at least one model"):
        ExamScorer([], score_floor=0.3)


def test_a_speck_cluster_model_takes_its_clusters_from_the_files_specks(
    tmp_path: Path, kit: SimpleNamespace
) -> None:
    import numpy as np

    from common.imaging.image_io import read_any
    from common.imaging.specks import speck_clusters

    files = kit.write_exam(tmp_path / "exam")
    planted = {}
    for f in files:  # a five-speck cluster (one pixel each) inside each breast
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array.astype(np.int64)
        rows, cols = np.nonzero(arr > arr.mean())
        cy, cx = int(np.median(rows)), int(np.median(cols))
        top = int(arr.max())
        for dy, dx in ((0, 0), (3, 4), (6, -2), (9, 5), (11, 1)):
            arr[cy + dy, cx + dx] = top
        ds.PixelData = arr.astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(f)
        planted[f] = (cx + 2.5, cy + 6.0)  # stored (x, y) of the cluster's middle
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4, speck_clusters=True)
    ck = save_checkpoint(tmp_path / "m.pt", build_detector(cfg), cfg)
    res = ExamScorer(ck, score_floor=0.0, device="cpu").score(files)
    assert [s.path for s in res.scored] == files
    n_found = 0
    for s in res.scored:
        im = read_any(s.path, working_spacing_mm=0.4, specks=True)
        assert im.specks is not None
        boxes, _ = speck_clusters(im.specks, 0.4)
        want = im.geometry.to_stored(boxes) if len(boxes) else np.zeros((0, 4))
        got = np.array(
            [d["box"] for d in s.detections if d["label"] == "calcification"]
        ).reshape(-1, 4)
        # the node's clusters are exactly the specks' (the network's are gone)
        np.testing.assert_allclose(
            got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], atol=0.01
        )
        n_found += len(got)
        # a mark where the cluster is: centred within the FROC hit radius
        # (5 mm = 25 stored px at 0.2 mm) of the planted cluster's middle (its
        # own box, or a better candidate's that suppressed it: one mark each)
        px, py = planted[s.path]
        centres = (got[:, :2] + got[:, 2:]) / 2
        dist = np.hypot(centres[:, 0] - px, centres[:, 1] - py)
        assert len(dist) and dist.min() <= 25.0, (s.path.name, (px, py), got.tolist())
        assert any(d["label"] == "mass" for d in s.detections)  # masses stay
    assert n_found > 0
