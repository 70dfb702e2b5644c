from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.detector.adapt.config import AdaptConfig
from common.detector.adapt.teacher import (
    ConsistencyLoss,
    MeanTeacher,
    UnlabeledImages,
    load_or_create_teacher,
    local_round,
    pseudo_labels,
    rampup_weight,
)
from common.imaging.data import collate


class _Raises(dict):
    """A target that fails the test when anything reads it."""

    def __getitem__(self, key: str) -> Any:
        raise AssertionError(f"unlabeled target read: {key!r}")

    def get(self, key: str, default: Any = None) -> Any:
        raise AssertionError(f"unlabeled target read: {key!r}")

    def __iter__(self):
        raise AssertionError("unlabeled target iterated")

    def keys(self):
        raise AssertionError("unlabeled target keys read")


def test_teacher_is_exact_ema_of_student() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = MeanTeacher(student, decay=0.9)
    t0 = {k: v.clone() for k, v in teacher.module.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(5, 3))  # moves BN running stats
    teacher.update(student)
    for name, s in student.named_parameters():
        expected = 0.9 * t0[name] + 0.1 * s.detach()
        assert torch.allclose(teacher.module.state_dict()[name], expected, atol=1e-7)
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)
    assert teacher.updates == 1
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())


def test_pseudo_labels_respect_per_class_thresholds() -> None:
    det = {
        "boxes": torch.arange(20, dtype=torch.float32).reshape(5, 4),
        "scores": torch.tensor([0.9, 0.5, 0.49, 0.7, 0.69]),
        "labels": torch.tensor([0, 0, 0, 1, 1]),
    }
    (out,) = pseudo_labels([det], thresholds=(0.5, 0.7))
    assert out["labels"].tolist() == [0, 0, 1]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.5, 0.7])
    assert torch.equal(out["boxes"], det["boxes"][[0, 1, 3]])
    (none,) = pseudo_labels([det], thresholds=(1.0, 1.0))
    assert none["boxes"].shape == (0, 4)


def test_rampup_weight() -> None:
    cfg = AdaptConfig(rampup_steps=100, unsup_weight=2.0)
    ws = [rampup_weight(s, cfg) for s in (0, 25, 50, 100, 1000)]
    assert ws == sorted(ws)
    assert ws[0] == pytest.approx(2.0 * torch.e**-5)
    assert ws[-1] == ws[-2] == 2.0
    assert rampup_weight(0, AdaptConfig(rampup_steps=0, unsup_weight=0.5)) == 0.5


def _loaders(toy, n_unlabeled: int = 2):
    labeled = DataLoader(toy, batch_size=2, collate_fn=collate)
    unl = [([toy[i][0]], [_Raises()]) for i in range(n_unlabeled)]
    return labeled, unl


@pytest.mark.parametrize("mode", ["pseudo_boxes", "dense", "paste"])
def test_local_round_never_reads_unlabeled_targets(tiny_model, toy, mode) -> None:
    cfg = AdaptConfig(
        consistency=mode,
        ema_decay=0.5,
        rampup_steps=0,
        score_thresholds={"mass": 0.0, "calcification": 0.0},
        unlabeled_ratio=2,
    )
    teacher = MeanTeacher(tiny_model, cfg.ema_decay)
    before = copy.deepcopy(teacher.state_dict())
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    labeled, unl = _loaders(toy)
    stats = local_round(
        tiny_model, teacher, labeled, unl, opt, cfg, step=7, max_steps=2, lesions=toy
    )
    assert stats.steps == 2 and stats.step == 9
    assert stats.unlabeled_images == 4 and stats.labeled_images == 4
    assert stats.unsup_loss > 0
    after = teacher.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_unlabeled_only_round_and_wrapper(tiny_model, toy) -> None:
    cfg = AdaptConfig(rampup_steps=0)
    teacher = MeanTeacher(tiny_model, 0.9)
    ds = UnlabeledImages(toy)
    _, target = ds[0]
    with pytest.raises(RuntimeError, match="must not be read"):
        target["boxes"]
    loader = DataLoader(ds, batch_size=3, collate_fn=collate)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    stats = local_round(tiny_model, teacher, None, loader, opt, cfg)
    assert stats.steps == 2 and stats.labeled_images == 0
    assert stats.unlabeled_images == 6


def test_ssl_off_is_plain_supervised(tiny_model, toy) -> None:
    cfg = AdaptConfig(ssl_enabled=False)
    teacher = MeanTeacher(tiny_model, 0.9)
    labeled, unl = _loaders(toy)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    stats = local_round(tiny_model, teacher, labeled, unl, opt, cfg)
    assert stats.unlabeled_images == 0 and stats.unsup_loss == 0.0
    assert stats.steps == 3


def test_unsup_weight_zero_keeps_the_passes_and_drops_the_gradient(
    tiny_model, toy
) -> None:
    """``unsup_weight`` 0 (``trainer.options.ssl_unsup_weight``) is the control
    of what the unlabeled images give through the norm statistics alone: the
    student still runs them (its BatchNorm running statistics move), but its
    parameters end where supervised training alone puts them; weight 1 moves
    them elsewhere."""

    def run(**kw: Any) -> tuple[dict[str, torch.Tensor], Any]:
        model = copy.deepcopy(tiny_model)
        cfg = AdaptConfig(consistency="dense", rampup_steps=0, **kw)
        teacher = MeanTeacher(model, 0.9)
        labeled, unl = _loaders(toy)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        stats = local_round(model, teacher, labeled, unl, opt, cfg)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats

    off, _ = run(ssl_enabled=False)
    zero, stats0 = run(unsup_weight=0.0)
    one, stats1 = run(unsup_weight=1.0)
    assert stats0.unlabeled_images == stats1.unlabeled_images > 0
    assert stats0.unsup_loss > 0 and stats0.unsup_weight == 0.0
    params = {k for k, _ in tiny_model.named_parameters()}
    stats_keys = [k for k in off if k.endswith("running_mean")]
    assert params and stats_keys
    assert all(torch.allclose(zero[k], off[k], atol=1e-7) for k in params)
    assert any(not torch.allclose(zero[k], off[k]) for k in stats_keys)
    assert any(not torch.allclose(one[k], off[k], atol=1e-6) for k in params)


def test_teacher_state_round_trip_and_sync(tmp_path, tiny_model) -> None:
    cfg = AdaptConfig(ema_decay=0.8)
    path = tmp_path / "site" / "teacher.pt"
    teacher, step = load_or_create_teacher(path, tiny_model, cfg)
    assert step == 0
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)
    teacher.update(tiny_model)
    teacher.save(path, step=42)
    again, step = load_or_create_teacher(path, tiny_model, cfg)
    assert step == 42 and again.updates == 1
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    key = "backbone.body.conv1.weight"
    n = again.sync_shared(tiny_model, [key])
    assert n == 1
    assert torch.equal(again.state_dict()[key], tiny_model.state_dict()[key])
    head = "head.classification_head.cls_logits.weight"
    assert not torch.equal(again.state_dict()[head], tiny_model.state_dict()[head])
    with pytest.raises(KeyError):
        again.sync_shared(tiny_model, ["nope"])


class _Recorder(nn.Module):
    """A fake student that records what the consistency loss feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[list[torch.Tensor], list[dict]]] = []

    def forward(self, images, targets):
        self.calls.append((images, targets))
        z = self.w * 0 + 1.0
        return {"classification": z, "bbox_regression": 5 * z, "bbox_ctrness": 7 * z}


def test_pseudo_boxes_thresholded_and_moved_with_strong_view(
    tiny_model, make_blob
) -> None:
    blob_image = make_blob

    box = [10.0, 12.0, 26.0, 30.0]
    images = [blob_image(64, [box], seed=s, level=1.0) for s in range(6)]
    cfg = AdaptConfig(
        consistency="pseudo_boxes",
        score_thresholds={"mass": 0.5, "calcification": 0.5},
    )
    teacher = MeanTeacher(tiny_model, 0.9)

    def fake_detect(ims):
        # weak view may be flipped: find the blob where the teacher "sees" it
        out = []
        for im in ims:
            ys, xs = torch.nonzero(im[0] > 0.95, as_tuple=True)
            b = [
                float(xs.min()),
                float(ys.min()),
                float(xs.max()) + 1,
                float(ys.max()) + 1,
            ]
            out.append(
                {
                    "boxes": torch.tensor([b, [0.0, 0.0, 8.0, 8.0]]),
                    "scores": torch.tensor([0.9, 0.4]),
                    "labels": torch.tensor([0, 1]),
                }
            )
        return out

    teacher.detect = fake_detect  # type: ignore[method-assign]
    rec = _Recorder()
    loss, per_image = ConsistencyLoss(teacher, cfg)(rec, images)
    assert float(loss.detach()) == 1.0  # only the classification term by default
    ((strong, targets),) = rec.calls
    kept = 0
    for im, t in zip(strong, targets, strict=True):
        assert t["labels"].tolist() in ([0], [])  # score 0.4 < 0.5 never kept
        if t["boxes"].shape[0]:
            kept += 1
            x1, y1, x2, y2 = t["boxes"][0].tolist()
            inner = im[0, int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
            assert float(inner.mean()) > float(im[0].mean()), "box misses the blob"
    assert kept >= 5 and per_image == kept / len(images)


def test_paste_mode_trains_pasted_lesions_and_ignores_unsure_findings(
    tiny_model, toy, make_blob
) -> None:
    """Pasted labeled lesions are targets, unsure teacher findings ignored."""
    images = [make_blob(64, [], seed=s) for s in range(6)]
    cfg = AdaptConfig(
        consistency="paste",
        score_thresholds={"mass": 0.5, "calcification": 0.5},
        paste_ignore_score=0.3,
    )
    teacher = MeanTeacher(tiny_model, 0.9)

    def fake_detect(ims):
        return [
            {
                "boxes": torch.tensor(
                    [[30.0, 30, 40, 40], [2.0, 2, 10, 10], [20.0, 50, 26, 58]]
                ),
                "scores": torch.tensor([0.9, 0.35, 0.1]),
                "labels": torch.tensor([0, 1, 0]),
            }
            for _ in ims
        ]

    teacher.detect = fake_detect  # type: ignore[method-assign]
    rec = _Recorder()
    loss, per_image = ConsistencyLoss(teacher, cfg, lesions=toy)(rec, images)
    assert float(loss.detach()) == 13.0  # every FCOS term: pasted boxes are exact
    assert per_image == 1.0  # the one confident finding is the pseudo box
    ((strong, targets),) = rec.calls
    pasted = 0
    for t in targets:
        assert t["ignore"].shape == (1, 4)  # 0.35: ignored; 0.1: background
        assert t["labels"].tolist().count(1) == 0  # the calcification was unsure
        pasted += len(t["labels"]) - 1  # the toy bank holds masses only
    assert pasted >= 6, "lesions from the labeled images were pasted"
    with pytest.raises(ValueError, match="paste.*labeled images"):
        ConsistencyLoss(teacher, cfg)
