"""Detection-level ensemble of several detectors on the same images.

A site that keeps more than one model (its federated, personalized model and
the one it trained alone, say) can run both and fuse their findings. Per
image and class, detections of all models are grouped greedily in decreasing
score: a detection joins the first group whose centre lies within reach
(``max(half the group's box diagonal, 5 mm)``, the evaluation's hit rule,
``common.detector.froc``) and that holds no detection of its own model yet;
otherwise it opens a group. A group becomes one detection: its box is the
score-weighted mean of its members' boxes, its score the sum of their scores
over the number of models (a finding only one model makes keeps 1/M of its
score). This is weighted box fusion (Solovyev et al., 2021) with the FROC hit
radius in place of an IoU threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from common.detector.froc import FrocImage, centres_and_reach_mm


def _fuse_class(
    boxes: list[np.ndarray], scores: list[np.ndarray], spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fused ``(boxes float[G, 4], scores float[G])`` of one class, M models."""
    m = len(boxes)
    model = np.concatenate([np.full(len(s), i) for i, s in enumerate(scores)])
    all_boxes = np.concatenate(boxes).reshape(-1, 4)
    all_scores = np.concatenate(scores)
    order = np.argsort(-all_scores, kind="stable")
    centres, reaches = centres_and_reach_mm(all_boxes, spacing_mm)
    # a group's centre and reach are its first (highest-scoring) member's
    groups: list[list[int]] = []
    for i in order:
        joined = False
        for members in groups:
            if any(model[j] == model[i] for j in members):
                continue
            lead = members[0]
            if np.linalg.norm(centres[i] - centres[lead]) <= reaches[lead]:
                members.append(int(i))
                joined = True
                break
        if not joined:
            groups.append([int(i)])
    out_boxes = np.zeros((len(groups), 4))
    out_scores = np.zeros(len(groups))
    for g, members in enumerate(groups):
        w = all_scores[members]
        weights = w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / len(w))
        out_boxes[g] = (all_boxes[members] * weights[:, None]).sum(axis=0)
        out_scores[g] = w.sum() / m
    return out_boxes, out_scores


def fuse_detections(
    models: Sequence[Mapping[str, np.ndarray]], spacing_mm: float
) -> dict[str, np.ndarray]:
    """One image's detections of every model, fused.

    Each model's detections are ``boxes``, ``scores`` and ``labels``, as
    ``common.detector.engine.predict_images`` returns them; ``spacing_mm``:
    mm per pixel of the boxes' space (the reach is in mm). Returns the same
    three keys, in decreasing score.
    """
    if not models:
        raise ValueError("fuse_detections: no model's detections given")
    labels = [np.asarray(d["labels"], np.int64).reshape(-1) for d in models]
    boxes = [np.asarray(d["boxes"], np.float64).reshape(-1, 4) for d in models]
    scores = [np.asarray(d["scores"], np.float64).reshape(-1) for d in models]
    out_b, out_s, out_l = [], [], []
    for label in sorted(set(np.concatenate(labels).tolist())):
        b, s = _fuse_class(
            [bx[lb == label] for bx, lb in zip(boxes, labels, strict=True)],
            [sc[lb == label] for sc, lb in zip(scores, labels, strict=True)],
            spacing_mm,
        )
        out_b.append(b)
        out_s.append(s)
        out_l.append(np.full(len(s), label, dtype=np.int64))
    all_s = np.concatenate(out_s) if out_s else np.zeros(0)
    order = np.argsort(-all_s, kind="stable")
    return {
        "boxes": (np.concatenate(out_b) if out_b else np.zeros((0, 4)))[order],
        "scores": all_s[order],
        "labels": (np.concatenate(out_l) if out_l else np.zeros(0, np.int64))[order],
    }


#: How far two records' lesion boxes may differ and still be one image's (px):
#: the rounding of a stored record (0.005) with room for float error.
_GT_ATOL = 0.006


def fuse_images(models: Sequence[FrocImage]) -> FrocImage:
    """One scored image (:class:`FrocImage`) of every model, fused.

    Raises:
        ValueError: no model, or the records are not of one image (key,
            spacing or ground truth differ).
    """
    if not models:
        raise ValueError("fuse_images: no model's detections given")
    first = models[0]
    for other in models[1:]:
        # a record read back from detections.json has its boxes rounded to
        # 0.01 px (FrocImage.to_json): the same lesion within that
        if (
            other.key != first.key
            or other.spacing_mm != first.spacing_mm
            or other.gt_boxes.shape != first.gt_boxes.shape
            or not np.array_equal(other.gt_labels, first.gt_labels)
            or not np.allclose(other.gt_boxes, first.gt_boxes, rtol=0, atol=_GT_ATOL)
        ):
            raise ValueError(
                f"fuse_images: {first.key!r} and {other.key!r} are not the same "
                "image (key, spacing or ground truth differ)"
            )
    fused = fuse_detections(
        [
            {"boxes": im.det_boxes, "scores": im.det_scores, "labels": im.det_labels}
            for im in models
        ],
        first.spacing_mm,
    )
    return FrocImage(
        key=first.key,
        spacing_mm=first.spacing_mm,
        gt_boxes=first.gt_boxes,
        gt_labels=first.gt_labels,
        ignore_boxes=first.ignore_boxes,
        det_boxes=fused["boxes"],
        det_scores=fused["scores"],
        det_labels=fused["labels"],
        case=first.case,
    )


def fuse(models: Sequence[Sequence[FrocImage]]) -> list[FrocImage]:
    """Every image of the first model's list fused with the same key's others.

    Raises:
        ValueError: the models scored other image sets (the keys named).
    """
    if not models:
        raise ValueError("fuse: no model's detections given")
    by_key = [{im.key: im for im in images} for images in models]
    keys = [im.key for im in models[0]]
    for i, d in enumerate(by_key[1:], start=1):
        if set(d) != set(keys):
            only = sorted(set(d) ^ set(keys))[:3]
            raise ValueError(
                f"fuse: model {i} scored other images than model 0 "
                f"({len(d)} and {len(keys)} images; e.g. {only})"
            )
    return [fuse_images([d[k] for d in by_key]) for k in keys]
