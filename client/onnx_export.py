"""Portable models: a detector checkpoint as ONNX, its contract, and a runner.

:func:`export_onnx` writes, for ``OUT.onnx``:

* ``OUT.onnx``: the network (input normalization, backbone, FPN, FCOS head)
  as a plain convolutional ONNX graph (opset :data:`DEFAULT_OPSET`). Input
  ``image`` float32[N, 1, H, W], model space in ``[0, 1]``, ``H`` and ``W``
  multiples of :data:`SIZE_DIVISIBLE`; outputs per FPN level ``l`` (strides
  8..128): ``cls_logits_l`` float32[N, C, H_l, W_l], ``bbox_regression_l``
  float32[N, 4, H_l, W_l] (after ReLU, in units of the level's anchor size)
  and ``bbox_ctrness_l`` float32[N, 1, H_l, W_l];
* ``OUT.onnx.contract.json`` (:data:`CONTRACT_FORMAT`): how a file becomes the
  input (reader, crop, flip to the left, resample to the working spacing,
  site standardizer, padding) and how the outputs become boxes in the stored
  pixels of the file (FCOS decoding, score threshold, top-k, per-class NMS,
  ``Geometry.to_stored``), with every number needed;
* ``OUT.onnx.card.json`` / ``.card.md``: the model card
  (:mod:`client.model_card`), whose SHA-256 of the graph and of the contract
  :class:`OnnxDetector` checks before it runs anything.

Box decoding and NMS stay out of the graph (numpy here, the recipe in the
contract): the graph is then a fixed-shape-free stack of Conv / Norm / ReLU /
Resize / Add that every ONNX runtime runs with any image size, without the
data-dependent TopK / NonZero / NonMaxSuppression ops whose support and tie
rules differ between runtimes, and the score floor can be lowered at run time
(FROC sweeps need 0.01) without re-exporting. :func:`postprocess` is
torchvision's ``FCOS.postprocess_detections`` step for step, so the runner's
detections equal the torch model's up to float rounding of the network.

:class:`OnnxDetector` scores files through the same reader as
``mammofed-client predict`` and returns the same detection dicts
(:func:`client.predict.detections_to_stored`: boxes in stored pixels).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from client.export import ExportError, checkpoint_standardizer
from client.model_card import (
    card_paths,
    evaluation_section,
    verify_card,
    write_model_card,
)
from client.predict import stored_records
from common.detector.adapt.standardize import HistogramStandardizer
from common.detector.checkpoint import Checkpoint, load_model
from common.detector.model.fcos import padded_groups
from common.errors import shown
from common.fileio import atomic_write_text, read_json_document
from common.imaging.preprocess import breast_mask, inside_mask
from common.keys import CLASSES

log = logging.getLogger(__name__)

CONTRACT_FORMAT = "mammofed-onnx-contract/1"
#: The format of a contract whose last step is the breast mask: a reader of
#: format 1 refuses it rather than skip the step and return more detections.
CONTRACT_FORMAT_MASKED = "mammofed-onnx-contract/2"
CONTRACT_SUFFIX = ".contract.json"
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 20
#: Batches are padded (right/bottom) to a multiple of this, as torchvision does.
SIZE_DIVISIBLE = 32
INPUT_NAME = "image"
#: Anchor size (model pixels) of FPN levels P3..P7 (torchvision FCOS default).
ANCHOR_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128)
#: Parity of onnxruntime with torch, checked by tests/client/onnx and in docs:
#: boxes within this many STORED pixels, scores within SCORE_TOL.
BOX_TOL_STORED_PX = 0.5
SCORE_TOL = 1e-4


def _output_names(levels: int) -> list[str]:
    names = []
    for lvl in range(levels):
        names += [f"cls_logits_{lvl}", f"bbox_regression_{lvl}", f"bbox_ctrness_{lvl}"]
    return names


def contract_path(onnx_path: str | Path) -> Path:
    """``OUT.onnx.contract.json`` of ``OUT.onnx``."""
    p = Path(onnx_path)
    return p.with_name(p.name + CONTRACT_SUFFIX)


# --- the graph ----------------------------------------------------------------
class HeadGraph(nn.Module):
    """The detector up to its raw head outputs: what the ONNX graph computes.

    Input FloatTensor[N, 1, H, W] in model space, ``[0, 1]``, padded to
    multiples of 32 with ``image_mean`` (which normalizes to 0, as
    torchvision's zero padding of normalized images). Returns per FPN level the
    tuple ``(cls_logits [N, C, h, w], bbox_regression [N, 4, h, w],
    bbox_ctrness [N, 1, h, w])``, flattened over levels. Runs the very modules
    of ``model`` (``backbone``, ``head.classification_head``,
    ``head.regression_head``); re-formed to torchvision's ``[N, HW, K]``
    layout they equal ``FCOSHead``'s outputs (tests/client/onnx/test_parity.py).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # a MammoFCOS: cfg, backbone, head.{classification,regression}_head
        m: Any = model
        self.backbone: nn.Module = m.backbone
        self.cls_head: Any = m.head.classification_head
        self.reg_head: Any = m.head.regression_head
        for name, value in (("mean", m.cfg.image_mean), ("std", m.cfg.image_std)):
            self.register_buffer(
                name, torch.tensor([value], dtype=torch.float32)[:, None, None]
            )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Raw head outputs of every level (see class docstring)."""
        x = (x - self.mean) / self.std
        outs: list[Tensor] = []
        for f in self.backbone(x).values():
            cls = self.cls_head.cls_logits(self.cls_head.conv(f))
            r = self.reg_head.conv(f)
            outs.append(cls)
            outs.append(nn.functional.relu(self.reg_head.bbox_reg(r)))
            outs.append(self.reg_head.bbox_ctrness(r))
        return tuple(outs)


# --- contract -----------------------------------------------------------------
@dataclass(frozen=True)
class Postprocess:
    """Settings of the numpy post-processing (copied from the model config).

    Attributes:
        score_thresh: candidates need ``score > score_thresh`` (strict).
        topk_candidates: most candidates per level before NMS.
        nms_thresh: per-class NMS drops a box whose IoU with a kept box of
            the same class is above this.
        detections_per_img: most detections kept per image after NMS.
    """

    score_thresh: float
    topk_candidates: int
    nms_thresh: float
    detections_per_img: int


def build_contract(ck: Checkpoint, onnx_name: str, opset: int) -> dict[str, Any]:
    """The preprocessing / post-processing contract of a checkpoint's graph."""
    cfg = ck.model_config
    std = checkpoint_standardizer(ck)
    levels = len(ANCHOR_SIZES)
    return {
        "format": CONTRACT_FORMAT_MASKED if cfg.breast_mask else CONTRACT_FORMAT,
        "model_file": onnx_name,
        "opset": opset,
        "classes": list(CLASSES),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 1, "height", "width"],
            "dtype": "float32",
            "value_range": [0.0, 1.0],
            "size_divisible": SIZE_DIVISIBLE,
            "pad": "right and bottom, to the image's height and width rounded "
            f"up to a multiple of {SIZE_DIVISIBLE}; a batch holds images of one "
            "padded size only",
            "pad_value": cfg.image_mean,
            "normalization": "inside the graph: (x - image_mean) / image_std",
            "image_mean": cfg.image_mean,
            "image_std": cfg.image_std,
            "batch_note": "the head's GroupNorm sees the padded map, so a "
            "detection depends on the padded size: padding an image further "
            "(to share a batch with a larger one) changes its scores. Run "
            "images of different padded sizes in separate batches, as the "
            "runner and the torch model do",
        },
        "outputs": [
            {
                "level": lvl,
                "anchor_size": ANCHOR_SIZES[lvl],
                "names": _output_names(levels)[3 * lvl : 3 * lvl + 3],
            }
            for lvl in range(levels)
        ],
        "preprocessing": {
            "reader": "common.imaging.image_io.read_any (DICOM by content; PNG/TIFF "
            "need a spacing)",
            "working_spacing_mm": cfg.working_spacing_mm,
            "steps": [
                "decode to float32 in [0, 1], dense tissue bright (VOI LUT / "
                "window, MONOCHROME1 and INVERSE handled)",
                "crop: the breast's bounding rectangle of stored pixels",
                "flip: mirror left-right when the breast is on the right, so "
                "the chest wall is on the left",
                "resample the crop to the working spacing",
                "site standardizer (when not null) on the model-space pixels",
            ],
            "standardizer": std.to_dict() if std is not None else None,
            "standardizer_rule": "breast pixels (> breast_threshold) mapped "
            "piecewise-linearly from landmarks to standard_scale, end pieces "
            "extended, clipped to [0, 1]; other pixels unchanged",
        },
        "postprocessing": {
            **dataclasses.asdict(
                Postprocess(
                    cfg.score_thresh,
                    cfg.topk_candidates,
                    cfg.nms_thresh,
                    cfg.detections_per_img,
                )
            ),
            "score": "sqrt(sigmoid(cls_logits) * sigmoid(bbox_ctrness))",
            "candidates": "per level, score > score_thresh, best topk_candidates "
            "of the level's flattened (y, x, class) scores",
            "anchor": "level grid cell (y, x) has centre (x * stride_x, "
            "y * stride_y) with stride = padded size // level size (integer)",
            "decode": "box = (cx - r0 * s, cy - r1 * s, cx + r2 * s, cy + r3 * s) "
            "with r = bbox_regression and s = the level's anchor_size",
            "clip": "x to [0, image width], y to [0, image height] (unpadded "
            "model-space size of that image)",
            "nms": "per class, greedy by score, IoU > nms_thresh suppressed; "
            "then the best detections_per_img by score",
            "breast_mask": bool(cfg.breast_mask),
            "breast_mask_rule": "when true, last: drop each detection whose box "
            "centre lies outside common.imaging.preprocess.breast_mask of the "
            "graph's input image (unpadded, after the standardizer)",
        },
        "box_space": {
            "model": "pixel-edge [xmin, ymin, xmax, ymax] in the model-space "
            "image (after crop, flip, resample)",
            "stored": "common.imaging.geometry.Geometry.to_stored: divide by the "
            "resample scale, undo the flip within the crop (x -> crop width - "
            "x), add the crop origin; pixel edges of the file as stored",
        },
        "parity": {
            "box_tol_stored_px": BOX_TOL_STORED_PX,
            "score_tol": SCORE_TOL,
        },
    }


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    onnx: Path
    contract: Path
    card_json: Path
    card_md: Path


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    use_ema: bool = False,
    eval_dir: str | Path | None = None,
) -> OnnxExport:
    """Export a detector checkpoint to ONNX with its contract and model card.

    Args:
        checkpoint: a :mod:`common.detector.checkpoint` file (``mammofed-client export``
            or ``mammofed-sim train`` output).
        out: the ``.onnx`` file to write (replaced if present).
        opset: ONNX opset (11..20).
        use_ema: export the checkpoint's EMA weights.
        eval_dir: optional ``mammofed-client evaluate`` folder for the card.

    Raises:
        ExportError: an output path that is a folder or lacks ``.onnx``, an
            opset out of range, a checkpoint whose model fuses a mirrored view
            (``tta_flip``: the graph and contract do not reproduce it), an
            ``eval_dir`` of another model or weights; CheckpointMismatch: an
            unusable checkpoint, ``use_ema`` without EMA weights.
    """
    out_path = Path(out)
    if out_path.suffix != ".onnx" or out_path.is_dir():
        raise ExportError(f"{out_path}: --onnx must name a file ending in .onnx")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset: must be in [{MIN_OPSET}, {MAX_OPSET}] (the TorchScript "
            f"exporter's range for this graph), got {opset!r}"
        )
    model, ck = load_model(checkpoint, use_ema=use_ema)
    if ck.model_config.contralateral:
        raise ExportError(
            f"{ck.path}: field 'model_config.contralateral' is true: the model "
            "reads each image beside the same woman's other breast, and the "
            "ONNX contract takes one image"
        )
    if ck.model_config.speck_clusters:
        raise ExportError(
            f"{ck.path}: field 'model_config.speck_clusters' is true: its "
            "calcification findings come from specks found at the file's stored "
            "resolution, which the ONNX contract (model-space pixels in, "
            "detections out) does not carry"
        )
    if ck.model_config.tta_flip:
        raise ExportError(
            f"{ck.path}: field 'model_config.tta_flip' is true: the torch model "
            "also detects the up-down mirror of each image and fuses both, which "
            "the ONNX graph and its contract do not reproduce (its detections "
            "would differ from predict's); such a model is not exported"
        )
    # refuse a wrong --eval before writing
    evaluation_section(eval_dir, ck.path, use_ema=use_ema)
    graph = HeadGraph(model).eval()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    names = _output_names(len(ANCHOR_SIZES))
    dummy = torch.full((1, 1, 128, 96), 0.5)
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    axes.update({n: {0: "batch", 2: f"{n}_h", 3: f"{n}_w"} for n in names})
    tmp = out_path.with_name(out_path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # The norm layers' check that a map has more than one value per channel
        # is traced as a constant; it guards errors only, never the data flow.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            (dummy,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency
        )
    tmp.replace(out_path)
    _check_graph(out_path, graph, dummy)
    contract = build_contract(ck, out_path.name, opset)
    cpath = contract_path(out_path)
    atomic_write_text(cpath, json.dumps(contract, indent=2) + "\n")
    jpath, mpath = write_model_card(
        out_path,
        ck,
        kind="onnx",
        extra_files=[cpath],
        eval_dir=eval_dir,
        use_ema=use_ema,
        notes={
            "onnx_opset": opset,
            "ema_weights": use_ema,
            "parity_tolerance": f"boxes within {BOX_TOL_STORED_PX} stored px, "
            f"scores within {SCORE_TOL} of the torch checkpoint",
        },
    )
    log.info("exported %s to %s (contract %s)", ck.path, out_path, cpath.name)
    return OnnxExport(out_path, cpath, jpath, mpath)


def _check_graph(path: Path, graph: nn.Module, x: Tensor) -> None:
    """The ONNX checker and one forward pass against torch (fails loudly)."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in graph(x)]
    for name, a, b in zip(_output_names(len(want) // 3), got, want, strict=True):
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-4):
            diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else math.inf
            raise ExportError(
                f"{path}: output {name!r} of onnxruntime differs from torch "
                f"(shape {a.shape} vs {b.shape}, max |diff| {diff:.3g})"
            )


# --- post-processing (numpy, torchvision's FCOS step for step) ------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy NMS: indices kept, by decreasing score (torchvision.ops.nms rule).

    ``boxes`` float[K, 4] ``[xmin, ymin, xmax, ymax]``; a box is dropped when
    its IoU with an already kept box is above ``iou_thresh``.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            continue
        w = np.maximum(0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0: NaN, kept
            iou = inter / (area[i] + area[rest] - inter)
        suppressed[rest[iou > iou_thresh]] = True
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    outputs: Sequence[np.ndarray],
    padded_shape: tuple[int, int],
    image_shapes: Sequence[tuple[int, int]],
    post: Postprocess,
) -> list[dict[str, np.ndarray]]:
    """Raw graph outputs of a batch -> model-space detections per image.

    Args:
        outputs: the graph's outputs in order (3 per level, see module doc).
        padded_shape: ``(H, W)`` of the batch tensor.
        image_shapes: ``(h, w)`` of every image before padding.
        post: thresholds (:class:`Postprocess`).

    Returns:
        Per image ``boxes`` float32[K, 4] (model-space pixel edges, clipped to
        the image), ``scores`` float32[K], ``labels`` int64[K], by decreasing
        score (as :func:`common.detector.engine.predict_images`).
    """
    levels = len(outputs) // 3
    if levels * 3 != len(outputs) or levels > len(ANCHOR_SIZES):
        raise ValueError(
            f"postprocess: expected 3 outputs per level, got {len(outputs)}"
        )
    ph, pw = padded_shape
    res = []
    for i, (ih, iw) in enumerate(image_shapes):
        all_b, all_s, all_l = [], [], []
        for lvl in range(levels):
            cls, reg, ctr = (outputs[3 * lvl + j][i] for j in range(3))
            k, h, w = cls.shape
            logits = cls.reshape(k, h * w).T  # [HW, K], torchvision's layout
            score = np.sqrt(_sigmoid(logits) * _sigmoid(ctr.reshape(h * w, 1)))
            flat = score.reshape(-1)
            cand = np.nonzero(flat > np.float32(post.score_thresh))[0]
            s = flat[cand]
            top = np.argsort(-s, kind="stable")[: min(len(cand), post.topk_candidates)]
            idx, s = cand[top], s[top]
            cell, labels = idx // k, idx % k
            sy, sx = ph // h, pw // w
            cx = ((cell % w) * sx).astype(np.float32)
            cy = ((cell // w) * sy).astype(np.float32)
            r = reg.reshape(4, h * w).T[cell] * np.float32(ANCHOR_SIZES[lvl])
            b = np.stack([cx - r[:, 0], cy - r[:, 1], cx + r[:, 2], cy + r[:, 3]], 1)
            b[:, 0::2] = np.clip(b[:, 0::2], 0, iw)
            b[:, 1::2] = np.clip(b[:, 1::2], 0, ih)
            all_b.append(b.astype(np.float32))
            all_s.append(s.astype(np.float32))
            all_l.append(labels.astype(np.int64))
        boxes, scores, labels = (np.concatenate(a) for a in (all_b, all_s, all_l))
        keep_parts = []
        for c in np.unique(labels):
            sel = np.nonzero(labels == c)[0]
            keep_parts.append(sel[nms(boxes[sel], scores[sel], post.nms_thresh)])
        keep = np.concatenate(keep_parts) if keep_parts else np.zeros(0, np.int64)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: post.detections_per_img]
        res.append(
            {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
        )
    return res


def pad_batch(
    images: Sequence[np.ndarray], pad_value: float
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Float32[N, 1, H, W] batch (right/bottom padding to multiples of 32)."""
    shapes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    d = SIZE_DIVISIBLE
    ph = int(math.ceil(max(s[0] for s in shapes) / d) * d)
    pw = int(math.ceil(max(s[1] for s in shapes) / d) * d)
    batch = np.full((len(images), 1, ph, pw), pad_value, dtype=np.float32)
    for i, im in enumerate(images):
        h, w = shapes[i]
        batch[i, 0, :h, :w] = np.asarray(im, dtype=np.float32).reshape(h, w)
    return batch, shapes


# --- the runner ---------------------------------------------------------------
class OnnxDetector:
    """Runs an exported ONNX detector with onnxruntime, as ``predict`` runs torch.

    The graph and its contract are checked against the model card's SHA-256
    before the session is created (:func:`client.model_card.verify_card`).
    """

    def __init__(self, onnx_path: str | Path, *, threads: int | None = None) -> None:
        """Load ``onnx_path`` (+ contract, card); ``threads`` for onnxruntime."""
        import onnxruntime as ort

        self.path = Path(onnx_path)
        self.card = verify_card(self.path)
        cpath = contract_path(self.path)
        if cpath.name not in {f.get("name") for f in self.card["files"]}:
            raise ExportError(
                f"{card_paths(self.path)[0]}: field 'files' does not list the "
                f"contract {cpath.name}, so it cannot be trusted"
            )
        self.contract = read_json_document(cpath, "ONNX contract", ExportError)
        c = self.contract
        fmt = c.get("format")
        if fmt not in (CONTRACT_FORMAT, CONTRACT_FORMAT_MASKED):
            raise ExportError(
                f"{cpath}: field 'format' is {shown(fmt)}, expected "
                f"{CONTRACT_FORMAT!r} or {CONTRACT_FORMAT_MASKED!r}"
            )
        try:
            self.working_spacing_mm = float(c["preprocessing"]["working_spacing_mm"])
            self.pad_value = float(c["input"]["pad_value"])
            p = c["postprocessing"]
            self.post = Postprocess(
                float(p["score_thresh"]),
                int(p["topk_candidates"]),
                float(p["nms_thresh"]),
                int(p["detections_per_img"]),
            )
            self.breast_mask = p.get("breast_mask", False)  # format 1: absent
            if self.breast_mask is not (fmt == CONTRACT_FORMAT_MASKED):
                raise TypeError(
                    f"postprocessing.breast_mask is {shown(self.breast_mask)}: "
                    f"format {fmt!r} needs {fmt == CONTRACT_FORMAT_MASKED}"
                )
            std = c["preprocessing"]["standardizer"]
            self.standardizer = (
                HistogramStandardizer.from_dict(std) if std is not None else None
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{cpath}: malformed contract field: {exc!r}") from exc
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.path), opts, providers=["CPUExecutionProvider"]
        )

    def with_score_floor(self, score_floor: float) -> OnnxDetector:
        """Set the score threshold for later calls (as predict's ``--score-floor``)."""
        if not 0.0 <= score_floor <= 1.0:
            raise ValueError(f"score_floor must be in [0, 1], got {score_floor!r}")
        self.post = dataclasses.replace(self.post, score_thresh=float(score_floor))
        return self

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Model-space float32[H, W] -> the graph's image (standardized if any)."""
        if self.standardizer is None:
            return np.asarray(pixels, dtype=np.float32)
        t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        return self.standardizer.apply(t.unsqueeze(0))[0].numpy()

    def detect(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Model-space detections for model-space images, in their order.

        Images of one padded size (:func:`padded_groups`) share a batch, so
        an image's findings do not depend on the images given with it.
        """
        dets: list[dict[str, np.ndarray]] = [{} for _ in images]
        for idx in padded_groups(images, SIZE_DIVISIBLE):
            found = self._detect_batch([images[i] for i in idx])
            for i, d in zip(idx, found, strict=True):
                dets[i] = d
        return dets

    def _detect_batch(
        self, images: Sequence[np.ndarray]
    ) -> list[dict[str, np.ndarray]]:
        """Model-space detections for images run as ONE batch."""
        prepared = [self.prepare(im) for im in images]
        batch, shapes = pad_batch(prepared, self.pad_value)
        outs = self.session.run(None, {INPUT_NAME: batch})
        dets = postprocess(outs, (batch.shape[2], batch.shape[3]), shapes, self.post)
        if self.breast_mask:  # the contract's last step, as MammoFCOS.forward
            for d, im, shape in zip(dets, prepared, shapes, strict=True):
                keep = inside_mask(d["boxes"], *breast_mask(im.reshape(shape)))
                for k in ("boxes", "scores", "labels"):
                    d[k] = d[k][keep]
        return dets

    def predict_files(
        self,
        paths: Sequence[str | Path],
        *,
        batch_size: int = 4,
        default_spacing_mm: float | None = None,
        spacing_mm: float | None = None,
    ) -> list[dict[str, Any]]:
        """One record per readable file, as ``mammofed-client predict`` writes.

        Each record: ``source``, ``sop_instance_uid``, ``laterality``,
        ``box_space`` (``"stored"``), ``stored_shape`` and ``detections``
        (:func:`client.predict.detections_to_stored`, boxes in the file's
        stored pixels). Files are read with :func:`common.imaging.image_io.read_any`
        and scored ``batch_size`` at a time; unreadable files raise.
        """
        return stored_records(
            self.detect,
            paths,
            score_floor=self.post.score_thresh,
            working_spacing_mm=self.working_spacing_mm,
            batch_size=batch_size,
            default_spacing_mm=default_spacing_mm,
            spacing_mm=spacing_mm,
        )


# --- parity -------------------------------------------------------------------
@dataclass(frozen=True)
class Parity:
    """Agreement of two detection lists of one image (stored-space boxes).

    Attributes:
        n_a, n_b: detections in each list; matched: pairs found (same label,
            nearest box); max_box_diff: largest |coordinate difference| of a
            pair (stored px); max_score_diff: largest |score difference|.
    """

    n_a: int
    n_b: int
    matched: int
    max_box_diff: float
    max_score_diff: float

    def within(self, box_tol: float, score_tol: float) -> bool:
        """Same count, every detection paired, differences within tolerance."""
        return (
            self.n_a == self.n_b == self.matched
            and self.max_box_diff <= box_tol
            and self.max_score_diff <= score_tol
        )


def compare_detections(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
) -> Parity:
    """Pair detection dicts (``label``, ``score``, ``box``) greedily by score.

    Each detection of ``a`` (best first) takes the unpaired detection of ``b``
    with the same label whose box is nearest (largest coordinate difference);
    near-equal scores may come in another order, so order alone is not used.
    """
    used = np.zeros(len(b), dtype=bool)
    box_d, score_d, matched = 0.0, 0.0, 0
    bb = np.asarray([d["box"] for d in b], dtype=np.float64).reshape(-1, 4)
    for da in sorted(a, key=lambda d: -float(d["score"])):
        cand = [
            j for j, db in enumerate(b) if not used[j] and db["label"] == da["label"]
        ]
        if not cand:
            continue
        dist = np.abs(bb[cand] - np.asarray(da["box"], dtype=np.float64)).max(axis=1)
        j = cand[int(np.argmin(dist))]
        used[j] = True
        matched += 1
        box_d = max(box_d, float(dist.min()))
        score_d = max(score_d, abs(float(da["score"]) - float(b[j]["score"])))
    return Parity(len(a), len(b), matched, box_d, score_d)


__all__ = [
    "OnnxDetector",
    "OnnxExport",
    "Parity",
    "compare_detections",
    "contract_path",
    "export_onnx",
    "postprocess",
]
