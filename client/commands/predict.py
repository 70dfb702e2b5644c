"""``mammofed-client predict``: detect lesions in DICOM / PNG / TIFF files.

``--format json`` (default) writes one JSON and one overlay PNG per image;
``--format sr`` also writes one DICOM Mammography CAD SR per exam
(``OUT/<StudyInstanceUID>.sr.dcm``, DICOM inputs grouped by study);
``--format gsps`` one Grayscale Softcopy Presentation State per DICOM image
(``OUT/<SOPInstanceUID>.pr.dcm``: marks any PACS viewer draws);
``--format sr+gsps`` both.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.cli import folder_arg

NAME = "predict"
HELP = (
    "run a detector checkpoint on image files (JSON in stored pixels + overlay; "
    "--format sr adds a DICOM Mammography CAD SR per exam, gsps a presentation "
    "state per image, sr+gsps both)"
)

#: ``client.predict.FORMATS`` and ``client.dicom_derived.DEFAULT_SCORE_FLOOR``, repeated
#: so that ``--help`` imports no torch (a test keeps them equal).
FORMATS = ("json", "sr", "gsps", "sr+gsps")
SR_DISPLAY_FLOOR = 0.3

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-client predict``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        action="append",
        help="model file; give it again to run several models together, their "
        "findings fused (the recommended regime: the federation's personalized "
        "model, that model fine-tuned here and the site's own; "
        "docs/federation.md)",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="files or folders")
    parser.add_argument("--out", required=True, type=folder_arg, help="output folder")
    parser.add_argument(
        "--score-floor", type=_unit, default=0.01, help="drop detections below"
    )
    parser.add_argument(
        "--spacing-mm",
        type=float,
        default=None,
        help="stored pixel spacing of PNG/TIFF research images (mm)",
    )
    parser.add_argument(
        "--default-spacing-mm",
        type=float,
        default=None,
        help="fallback spacing for DICOM files without one (mm)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda...")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument("--no-overlay", action="store_true", help="JSON only")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=FORMATS[0],
        help="json: JSON (+ overlay) per image; sr: also one Mammography CAD SR "
        "per exam, OUT/<StudyInstanceUID>.sr.dcm; gsps: also one Grayscale "
        "Softcopy Presentation State per DICOM image (marks a PACS viewer draws), "
        "OUT/<SOPInstanceUID>.pr.dcm; sr+gsps: both",
    )
    parser.add_argument(
        "--sr-display-floor",
        type=_unit,
        default=SR_DISPLAY_FLOOR,
        help="in the SR, findings scoring at least this are 'Presentation "
        "Required', lower ones 'Presentation Optional'; the presentation states "
        "draw only the findings scoring at least this",
    )


def _unit(text: str) -> float:
    """A score in [0, 1] (argparse type)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= x <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return x


def run(args: argparse.Namespace) -> int:
    """Predict; exit 0 when every input (and SR) was written, 1 when some were not."""
    from client.predict import FORMAT_GSPS, FORMAT_SR, FORMAT_SR_GSPS, predict_paths

    res = predict_paths(
        args.checkpoint,
        args.paths,
        args.out,
        score_floor=args.score_floor,
        spacing_mm=args.spacing_mm,
        default_spacing_mm=args.default_spacing_mm,
        device=args.device,
        use_ema=args.ema,
        overlay=not args.no_overlay,
        output_format=args.format,
        sr_display_floor=args.sr_display_floor,
    )
    log.info("%d images written, %d skipped", len(res.written), len(res.skipped))
    if args.format in (FORMAT_SR, FORMAT_SR_GSPS):
        log.info(
            "%d CAD SR files written, %d inputs without SR",
            len(res.sr_written),
            len(res.sr_skipped),
        )
    if args.format in (FORMAT_GSPS, FORMAT_SR_GSPS):
        log.info(
            "%d presentation states written, %d inputs without one",
            len(res.gsps_written),
            len(res.gsps_skipped),
        )
    if not res.written and not res.skipped:
        log.error("no image files found in %s", [str(p) for p in args.paths])
        return 1
    return 1 if res.skipped or res.sr_skipped or res.gsps_skipped else 0
