"""Engine: EMA exactness, non-finite skip, predict/evaluate, fit/resume, sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from common.detector.checkpoint import load_checkpoint, load_model, save_checkpoint
from common.detector.engine import (
    evaluate_detailed,
    fit,
    predict_images,
    seed_everything,
)
from common.detector.model import ModelConfig, build_detector
from common.detector.recipe import ModelEMA, train_one_epoch
from common.detector.sampling import balanced_sampler, lesion_flags, lesion_weights
from common.errors import CheckpointMismatch
from common.imaging.data import collate
from common.keys import CPM_CALCIFICATION, CPM_MASS, CPM_MEAN, NUM_EXAMPLES

from .conftest import square_image

BOX = [40.0, 48.0, 72.0, 80.0]


class SquareSet(torch.utils.data.Dataset):
    """n images: even ones hold a bright 'mass' square, odd ones are normal."""

    def __init__(self, n: int = 4, size: int = 96) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        lesion = i % 2 == 0
        img = (
            square_image(self.size, box=(40, 48, 72, 80))
            if lesion
            else (0.1 * torch.rand(1, self.size, self.size))
        )
        boxes = torch.tensor([BOX]) if lesion else torch.zeros((0, 4))
        return img, {
            "boxes": boxes,
            "labels": torch.zeros(len(boxes), dtype=torch.int64),
            "ignore": torch.zeros((0, 4)),
            "key": f"img{i}",
            "spacing_mm": 0.4,
            "labeled": True,
            "patient_id": f"p{i}",
        }


def tiny(**kw):
    torch.manual_seed(0)
    return build_detector(ModelConfig(arch="tiny", **kw))


def loader(n=4, bs=2):
    return torch.utils.data.DataLoader(SquareSet(n), batch_size=bs, collate_fn=collate)


def test_ema_update_is_exact():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(student, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()
    student(torch.randn(8, 3))  # changes BN buffers
    ema.update(student)
    s = student.state_dict()
    for name, p in ema.module.named_parameters():
        expected = 0.9 * before[name] + 0.1 * s[name]
        assert torch.allclose(p, expected, atol=0, rtol=1e-6), name
    for name, b in ema.module.named_buffers():
        assert torch.equal(b, s[name]), name
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(student, decay=1.5)


def test_nonfinite_loss_skips_step_and_keeps_weights():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(model, images, targets):
        return torch.tensor(float("nan"))

    stats = train_one_epoch(
        model, loader(), opt, extra_loss_fn=nan_loss, progress=False
    )
    assert stats.skipped_steps == 2 and stats.steps == 0 and stats.images == 4
    assert math.isnan(stats.mean_loss)
    after = model.state_dict()
    for k, v in before.items():
        if "running_" in k or "num_batches" in k:
            continue  # BN statistics move in any forward pass in train mode
        assert torch.equal(v, after[k]), k
    # a finite run takes steps and changes weights
    stats = train_one_epoch(model, loader(), opt, grad_clip=1.0, progress=False)
    assert stats.steps == 2 and stats.skipped_steps == 0
    assert math.isfinite(stats.mean_loss)
    assert not torch.equal(
        before["head.classification_head.cls_logits.weight"],
        model.state_dict()["head.classification_head.cls_logits.weight"],
    )


def test_predict_format():
    model = tiny()
    out = predict_images(model, [SquareSet(3)[i][0] for i in range(3)], "cpu")
    assert len(out) == 3
    for o in out:
        assert o["boxes"].ndim == 2 and o["boxes"].shape[1] == 4
        assert len(o["scores"]) == len(o["labels"]) == len(o["boxes"])
        assert np.all(np.diff(o["scores"]) <= 0)
        assert o["boxes"].max() <= 96 and o["boxes"].min() >= 0


def test_evaluate_metrics_keys_and_plot(tmp_path):
    model = tiny()
    res = evaluate_detailed(model, SquareSet(4), "cpu", n_boot=20, plot_dir=tmp_path)
    m = res.metrics
    assert m[NUM_EXAMPLES] == 4
    assert 0.0 <= m[CPM_MASS] <= 1.0
    assert math.isnan(m[CPM_CALCIFICATION])  # no calcification in the set
    assert m[CPM_MEAN] == m[CPM_MASS]
    assert "sens-mass-at-0.125" in m and "ap-mass" in m
    # each image carries its woman, so intervals resample women
    assert [im.case for im in res.images] == [f"p{i}" for i in range(4)]
    assert (tmp_path / "froc-mass.png").is_file()
    assert (tmp_path / "froc-calcification.png").is_file()
    js = res.to_json()
    json.dumps(js)  # NaN replaced by None
    assert js["metrics"][CPM_CALCIFICATION] is None


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    cfg = ModelConfig(arch="tiny", fpn_channels=32)
    model = tiny(fpn_channels=32)
    opt = torch.optim.AdamW(model.parameters())
    p = save_checkpoint(tmp_path / "c.pt", model, cfg, optimizer=opt, epoch=3)
    ck = load_checkpoint(p, cfg)
    assert ck.epoch == 3 and ck.model_config == cfg and ck.optimizer is not None
    m2, _ = load_model(p)
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    x = [torch.rand(1, 64, 64)]
    model.eval()
    with torch.no_grad():
        a, b = model(x)[0], m2(x)[0]
    assert torch.equal(a["scores"], b["scores"])
    other = ModelConfig(arch="tiny", fpn_channels=64)
    with pytest.raises(CheckpointMismatch, match=r"fpn_channels.*32.*64"):
        load_checkpoint(p, other)
    with pytest.raises(CheckpointMismatch, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointMismatch, match="format"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_fit_resumes(tmp_path):
    seed_everything(0)
    cfg = ModelConfig(arch="tiny")
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recs = fit(
        model,
        cfg,
        opt,
        loader(2, 2),
        epochs=1,
        out_dir=tmp_path,
        progress=False,
        ema=ModelEMA(model, 0.9),
    )
    assert [r["epoch"] for r in recs] == [0]
    model2 = tiny()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    recs2 = fit(
        model2,
        cfg,
        opt2,
        loader(2, 2),
        epochs=2,
        out_dir=tmp_path,
        progress=False,
        ema=ModelEMA(model2, 0.9),
        eval_fn=lambda m, epoch: {"x": float(epoch)},
    )
    assert [r["epoch"] for r in recs2] == [1]
    assert recs2[0]["eval"] == {"x": 1.0}  # the resumed epoch's own number
    lines = (tmp_path / "epochs.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [0, 1]
    assert load_checkpoint(tmp_path / "last.pt").ema is not None


def test_balanced_sampler():
    flags = [True] + [False] * 9
    w = lesion_weights(flags, 0.5)
    assert float(w[0]) == pytest.approx(0.5)
    assert float(w[1:].sum()) == pytest.approx(0.5)
    s = balanced_sampler(flags, 0.5, num_samples=4000, seed=1)
    draws = list(s)
    frac = sum(1 for i in draws if i == 0) / len(draws)
    assert 0.45 < frac < 0.55
    assert draws == list(balanced_sampler(flags, 0.5, num_samples=4000, seed=1))
    # degenerate groups fall back to uniform
    assert torch.allclose(
        lesion_weights([False] * 4, 0.5), torch.full((4,), 0.25, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="lesion_prob"):
        lesion_weights(flags, 1.5)
    assert lesion_flags(SquareSet(4)) == [True, False, True, False]


def test_ema_warmup_forgets_the_random_start():
    """With warm-up the EMA tracks a student that moved far from its start."""
    student = torch.nn.Linear(4, 1)
    with torch.no_grad():
        student.weight.zero_()  # the "random" start
    plain = ModelEMA(student, decay=0.999)
    warm = ModelEMA(student, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        student.weight.fill_(1.0)
    for _ in range(575):
        plain.update(student)
        warm.update(student)
    assert warm.current_decay() == pytest.approx(576 / 585)
    w_plain = plain.module.weight.detach()
    w_warm = warm.module.weight.detach()
    # plain keeps 0.999**575 = 56% of the start; warm-up keeps almost none of it
    assert (w_plain - 1).abs().min() > 0.5
    assert (w_warm - 1).abs().max() < 1e-3
