"""ONNX parity and CPU speed: onnxruntime vs torch on the same checkpoint.

Measured, not asserted. The model is the committed mini-MIAS recipe's
(``configs/real/mini-mias.yaml`` model section: ``small`` body, BatchNorm,
0.4 mm working spacing). No trained checkpoint is committed, so the weights are
random with the head's convolutions drawn from N(0, 0.1) and the class bias at
-1 (scores spread over (0, 1) as a trained model's; at torchvision's
initialisation every location scores about 0.07 and the ranking is noise).

Figures (one JSON line each, ``benchmarks/results/onnx_parity.jsonl``):

* per file set (``real-vendor``: the readable vendor DICOM files of
  ``../shared/data/dicom``; ``synthetic-exam``: one woman's four views of the
  ``benchmark`` phantom scenario, site A, full detector resolution, since no
  real four-view exam is available): ``max_box_diff_stored_px``,
  ``max_score_diff``, ``images_count_mismatch`` between ``mammofed-client
  predict`` (torch) and :class:`client.onnx_export.OnnxDetector` at the default
  score floor 0.01; the baseline is torch against itself (a second run);
* ``seconds_per_exam_torch`` / ``seconds_per_exam_onnxruntime``: the four
  model-space views as ``predict`` gives them (forward + post-processing,
  decoding excluded; one pass per padded size, so that an image's findings do
  not depend on its batch), median of ``--repeats`` after one warm-up,
  ``--threads`` threads each; ``seconds_per_exam_torch_one_padded_batch``, the
  baseline: torch with the four views padded into one batch, as before stop
  48; and ``seconds_per_exam_read`` (the shared DICOM reading) for scale.

Run: ``.venv/bin/python -m benchmarks.onnx_parity [--repeats 5] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torchvision.models.detection import FCOS

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, rounded  # noqa: E402
from benchmarks.synthetic import spread_model  # noqa: E402
from client.onnx_export import (  # noqa: E402
    OnnxDetector,
    compare_detections,
    export_onnx,
)
from client.predict import predict_paths  # noqa: E402
from common.config import from_mapping  # noqa: E402
from common.detector.checkpoint import load_model, save_checkpoint  # noqa: E402
from common.detector.engine import predict_images  # noqa: E402
from common.detector.model import ModelConfig  # noqa: E402
from common.imaging.image_io import read_any  # noqa: E402

BENCH = "onnx_parity"
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "real" / "mini-mias.yaml"
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
#: Readable vendor files and the spacing a site config would give those lacking one.
REAL_FILES: tuple[tuple[str, float | None], ...] = (
    ("fo-dicom/OutOfBoundsOverlay.dcm", None),
    ("nema-wg04/MG1_J2KI.dcm", 0.05),
)
FLOOR = 0.01


def recipe_model() -> ModelConfig:
    raw = yaml.safe_load(RECIPE.read_text())["model"]
    return from_mapping(raw, ModelConfig, source=str(RECIPE), prefix="model")


def torch_docs(ck: Path, files: list[Path], out: Path, spacing: float | None) -> list:
    res = predict_paths(
        ck,
        files,
        out,
        score_floor=FLOOR,
        device="cpu",
        overlay=False,
        default_spacing_mm=spacing,
    )
    if res.skipped:
        raise SystemExit(f"torch predict skipped {res.skipped}")
    return [json.loads(p.read_text()) for p in res.written]


def parity(a_docs: list[dict], b_docs: list[dict]) -> dict[str, Any]:
    box, score, mismatch, n = 0.0, 0.0, 0, 0
    for a, b in zip(a_docs, b_docs, strict=True):
        p = compare_detections(a["detections"], b["detections"])
        box, score = max(box, p.max_box_diff), max(score, p.max_score_diff)
        mismatch += int(not p.n_a == p.n_b == p.matched)
        n += p.n_a
    return {"box": box, "score": score, "mismatch": mismatch, "detections": n}


def synthetic_exam(folder: Path) -> list[Path]:
    """One woman's four views (benchmark scenario, site A, full resolution)."""
    from simulation.phantom import load_scenario, plan_site
    from simulation.phantom.generate import write_image

    scenario = load_scenario(REPO / "configs" / "simulation" / "benchmark.yaml")
    plans = [p for p in plan_site(scenario, scenario.site("A")) if p.woman == 0]
    for p in plans:
        write_image(scenario, p, folder)
    return [folder / p.relpath for p in plans]


def emit_parity(
    name: str,
    files: list[Path],
    ck: Path,
    det: OnnxDetector,
    spacing: float | None,
    tmp: Path,
    ctx: dict[str, Any],
) -> None:
    want = torch_docs(ck, files, tmp / f"{name}-t1", spacing)
    again = torch_docs(ck, files, tmp / f"{name}-t2", spacing)
    got = det.predict_files(files, default_spacing_mm=spacing)
    for label, ref in (("onnxruntime", got), ("torch-repeat", again)):
        p = parity(want, ref)
        extra = {
            **ctx,
            "files": name,
            "compared": label,
            "images": len(files),
            "detections": p["detections"],
            "score_floor": FLOOR,
        }
        emit(
            BENCH, "max_box_diff_stored_px", rounded(p["box"], 6) or 0.0, "px", **extra
        )
        emit(BENCH, "max_score_diff", rounded(p["score"], 8) or 0.0, "1", **extra)
        emit(BENCH, "images_count_mismatch", p["mismatch"], "images", **extra)


def emit_speed(
    files: list[Path],
    ck: Path,
    det: OnnxDetector,
    repeats: int,
    threads: int,
    ctx: dict[str, Any],
) -> None:
    t0 = time.perf_counter()
    images = [read_any(f, working_spacing_mm=det.working_spacing_mm) for f in files]
    read_s = time.perf_counter() - t0
    shapes = [list(im.pixels.shape) for im in images]
    model, _ = load_model(ck)
    tensors = [torch.from_numpy(np.ascontiguousarray(im.pixels))[None] for im in images]
    pixels = [im.pixels for im in images]

    def run_torch() -> None:
        with torch.no_grad():
            predict_images(model, tensors, "cpu")

    def run_torch_one_batch() -> None:
        # the baseline: before stop 48 the four views were one padded batch;
        # now each padded size is its own pass (MammoFCOS._detect)
        with torch.no_grad():
            FCOS.forward(model, tensors)

    def run_ort() -> None:
        det.detect(pixels)

    extra = {**ctx, "model_shapes": shapes, "threads": threads, "repeats": repeats}
    for label, fn in (
        ("torch", run_torch),
        ("torch_one_padded_batch", run_torch_one_batch),
        ("onnxruntime", run_ort),
    ):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        emit(
            BENCH,
            f"seconds_per_exam_{label}",
            statistics.median(times),
            "s",
            min_s=min(times),
            max_s=max(times),
            **extra,
        )
    emit(BENCH, "seconds_per_exam_read", read_s, "s", **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-synthetic", action="store_true", help="real files only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = recipe_model()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        ck = save_checkpoint(tmp / "model.pt", spread_model(cfg), cfg)
        exp = export_onnx(ck, tmp / "model.onnx")
        det = OnnxDetector(exp.onnx, threads=args.threads).with_score_floor(FLOOR)
        import onnxruntime

        ctx = {
            "model": f"{cfg.arch} {cfg.norm} fpn{cfg.fpn_channels} "
            f"head{cfg.head_convs} @ {cfg.working_spacing_mm} mm",
            "weights": "random, spread head (no committed checkpoint)",
            "recipe": "configs/real/mini-mias.yaml",
            "onnxruntime": onnxruntime.__version__,
            "onnx_bytes": exp.onnx.stat().st_size,
        }
        for rel, spacing in REAL_FILES:
            f = SHARED_DICOM / rel
            if not f.is_file():
                print(f"skipped {f}: not found", file=sys.stderr)
                continue
            emit_parity(f"real-vendor:{rel}", [f], ck, det, spacing, tmp, ctx)
        if not args.no_synthetic:
            exam = synthetic_exam(tmp / "exam")
            ctx_s = {**ctx, "exam": "benchmark scenario site A woman 0 (4 views)"}
            emit_parity("synthetic-exam", exam, ck, det, None, tmp, ctx_s)
            emit_speed(exam, ck, det, args.repeats, args.threads, ctx_s)


if __name__ == "__main__":
    main()
