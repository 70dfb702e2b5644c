from __future__ import annotations

import pytest
import torch

from common.config import from_mapping
from common.detector.adapt.augment import gamma, sigmoid_lut
from common.detector.adapt.config import AdaptConfig
from common.detector.adapt.standardize import HistogramStandardizer, image_landmarks
from common.errors import ConfigError


def _site_images(n: int, vendor, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.zeros(1, 48, 48)
        tissue = 0.1 + 0.8 * torch.rand(1, 48, 32, generator=g)
        img[:, :, :32] = vendor(tissue)
        out.append(img)
    return out


def test_landmarks_map_to_common_scale() -> None:
    cfg = AdaptConfig(standardize=True)
    imgs = _site_images(8, lambda x: gamma(x, 2.0))
    std = HistogramStandardizer.fit(imgs, cfg)
    assert std.n_images == 8
    mapped = image_landmarks(std.apply(imgs[0]), cfg.percentiles, cfg.breast_threshold)
    assert mapped is not None
    assert torch.allclose(
        mapped, torch.tensor(cfg.standard_scale, dtype=torch.float64), atol=0.03
    )


def test_two_vendors_agree_after_standardization() -> None:
    cfg = AdaptConfig(standardize=True)
    a = _site_images(6, lambda x: gamma(x, 0.6), seed=1)
    b = _site_images(6, lambda x: sigmoid_lut(x, 0.5, 0.8), seed=1)
    sa, sb = HistogramStandardizer.fit(a, cfg), HistogramStandardizer.fit(b, cfg)
    before = (a[0] - b[0]).abs()[:, :, :32].mean()
    after = (sa.apply(a[0]) - sb.apply(b[0])).abs()[:, :, :32].mean()
    assert after < 0.5 * before
    assert after < 0.03


def test_background_unchanged_and_monotone() -> None:
    cfg = AdaptConfig()
    imgs = _site_images(3, lambda x: x)
    std = HistogramStandardizer.fit(imgs, cfg)
    out = std.apply(imgs[0])
    assert torch.equal(out[:, :, 32:], imgs[0][:, :, 32:])
    ramp = torch.linspace(0.05, 1.0, 200)
    mapped = std.apply(ramp)
    assert bool((mapped[1:] >= mapped[:-1]).all())
    assert float(mapped.min()) >= 0 and float(mapped.max()) <= 1


def test_state_round_trip(tmp_path) -> None:
    cfg = AdaptConfig()
    std = HistogramStandardizer.fit(_site_images(3, lambda x: x), cfg)
    path = std.save(tmp_path / "state" / "standardizer.json")
    assert HistogramStandardizer.load(path) == std
    with pytest.raises(ValueError, match="format"):
        HistogramStandardizer.from_dict({"format": "other"})


def test_fit_refuses_empty_images() -> None:
    with pytest.raises(ValueError, match="breast pixels"):
        HistogramStandardizer.fit([torch.zeros(1, 16, 16)], AdaptConfig())


def test_config_validation_names_key() -> None:
    with pytest.raises(ConfigError, match="standard_scale"):
        from_mapping({"standard_scale": [0.1, 0.9]}, AdaptConfig, source="s.yaml")
    with pytest.raises(ConfigError, match="score_thresholds"):
        from_mapping({"score_thresholds": {"tumour": 0.5}}, AdaptConfig)
    cfg = from_mapping({"score_thresholds": {"mass": 0.7}}, AdaptConfig)
    assert cfg.thresholds_by_label()[0] == 0.7
    assert cfg.thresholds_by_label()[1] > 1.0
