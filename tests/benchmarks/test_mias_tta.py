"""benchmarks.mias_tta: every view's findings come back in the input's pixels."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from benchmarks.mias_tta import ARMS, MultiView, arm_model
from common.detector.model import ModelConfig, build_detector


class BrightSpot(nn.Module):
    """Finds the brightest pixel of each image: a 10 px box around it."""

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        out = []
        for im in images:
            h, w = im.shape[-2:]
            idx = int(im[0].flatten().argmax())
            y, x = idx // w, idx % w
            out.append(
                {
                    "boxes": torch.tensor([[x - 5.0, y - 5.0, x + 5.0, y + 5.0]]),
                    "scores": torch.tensor([0.8]),
                    "labels": torch.tensor([0]),
                }
            )
        return out


@pytest.mark.parametrize("scales", [[1.0], [0.5, 1.0, 2.0]])
def test_views_are_mapped_back_and_agree(scales: list[float]) -> None:
    im = torch.zeros(1, 80, 60)
    im[0, 20:24, 40:44] = 1.0  # a bright square near the top
    out = MultiView(BrightSpot(), scales, True, 0.4)([im])[0]
    # every view finds the square, so they fuse into one finding at full score
    assert len(out["scores"]) == 1
    assert float(out["scores"][0]) == pytest.approx(0.8)
    cx = float(out["boxes"][0, 0] + out["boxes"][0, 2]) / 2
    cy = float(out["boxes"][0, 1] + out["boxes"][0, 3]) / 2
    assert abs(cx - 42) <= 2.5 and abs(cy - 22) <= 2.5, out["boxes"]


def test_a_finding_of_one_view_only_keeps_half_its_score() -> None:
    # the flip maps the brightest row 10 onto row 69: a second finding that the
    # plain view does not make, and the plain view's own finding the flip lacks
    im = torch.zeros(1, 80, 60)
    im[0, 10, 30] = 1.0
    im[0, 70, 10] = 1.0  # as bright: argmax picks the first in each view
    out = MultiView(BrightSpot(), [1.0], True, 0.4)([im])[0]
    assert sorted(out["scores"].tolist()) == [pytest.approx(0.4)] * 2


def test_arms_set_the_models_flip_and_refuse_an_unknown_one() -> None:
    model = build_detector(ModelConfig(arch="tiny"))
    assert arm_model(model, "flip", [1.0]) is model and model.cfg.tta_flip
    assert arm_model(model, "plain", [1.0]) is model and not model.cfg.tta_flip
    wrapped = arm_model(model, "scales-flip-wbf", [0.9, 1.0])
    assert isinstance(wrapped, MultiView) and wrapped.scales == (0.9, 1.0)
    assert not model.cfg.tta_flip  # the views do the flipping
    assert set(ARMS) == {"plain", "flip", "flip-wbf", "scales-flip-wbf"}
    with pytest.raises(ValueError, match="no test-time augmentation arm 'rot90'"):
        arm_model(model, "rot90", [1.0])


def test_checkpoint_mode_emits_flip_minus_plain_per_cache(tmp_path) -> None:  # noqa: ANN001
    import json

    from benchmarks.mias_tta import main
    from common.detector.checkpoint import save_checkpoint
    from tests.conftest import make_site_cache

    cfg = ModelConfig(arch="tiny", score_thresh=0.0)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, build_detector(cfg), cfg)
    caches = [make_site_cache(tmp_path / name, n_patients=5) for name in ("A", "B")]
    argv = ["--checkpoint", str(ck), "--cache", *map(str, caches), "--n-boot", "20"]
    assert main([*argv, "--results", str(tmp_path / "r")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "mias_tta.jsonl").open()]
    got = {(r["figure"], r["context"]["site"]) for r in rows}
    assert got == {
        (f"flip-minus-plain-cpm-{c}", s)
        for c in ("mass", "calcification")
        for s in ("A", "B")
    }
    with pytest.raises(SystemExit):  # the two modes do not mix
        main([*argv, "--run", str(tmp_path)])


def test_a_run_without_its_fold_models_is_refused_by_name(tmp_path) -> None:  # noqa: ANN001
    import shutil

    from benchmarks.mias_tta import predict_run
    from tests.conftest import make_site_cache, write_train_yaml

    cache = make_site_cache(tmp_path / "site", n_patients=5)
    run = tmp_path / "run"
    (run / "fold-0").mkdir(parents=True)
    (run / "fold-1").mkdir()
    shutil.copy(write_train_yaml(tmp_path, [cache]), run / "resolved_config.yaml")
    with pytest.raises(ValueError, match=r"without a model: \['fold-0', 'fold-1'\]"):
        predict_run(run, ARMS, [1.0])
