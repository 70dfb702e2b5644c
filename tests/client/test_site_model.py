"""client.site_model: the one rule that composes a site's own model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.site_model import PERSONAL_HEAD_PREFIX, SiteModel
from client.state import SiteState
from common.detector.model import ModelConfig, Personalization, build_detector
from common.errors import CheckpointMismatch

FEDBN_FEDPER = Personalization(local_norm=True, personal_head=True)


def _site_model(state: SiteState | None, seed: int = 0) -> SiteModel:
    torch.manual_seed(seed)
    model = build_detector(ModelConfig(arch="tiny", fpn_channels=16, head_convs=1))
    return SiteModel(model, FEDBN_FEDPER, state)


def _arrays(sm: SiteModel, keys: list[str]) -> dict[str, np.ndarray]:
    sd = sm.model.state_dict()
    return {k: sd[k].detach().numpy().copy() for k in keys}


def test_compose_takes_shared_then_personal_norms_and_head(tmp_path: Path) -> None:
    site = _site_model(SiteState(tmp_path, "A"), seed=1)
    head = {
        PERSONAL_HEAD_PREFIX + k: v + 1.0
        for k, v in _arrays(site, site.head_keys).items()
    }
    site.save_personal(head)  # the model's norm layers + that head
    norms = _arrays(site, site.personal_keys)
    shared = _arrays(_site_model(None, seed=2), site.shared_keys)
    assert site.check_personal(site.personal() or {}, head=True, what="test")

    model = site.compose(shared)
    sd = model.state_dict()
    for k in set(site.personal_keys) - set(site.head_keys):
        assert np.array_equal(sd[k].numpy(), norms[k]), k
    for k in site.head_keys:  # the personal head (its norms too) wins
        assert np.array_equal(sd[k].numpy(), head[PERSONAL_HEAD_PREFIX + k]), k
    for k in set(site.shared_keys) - set(site.head_keys):
        assert np.array_equal(sd[k].numpy(), shared[k]), k
    sd = site.compose(shared, personal_head=False).state_dict()
    for k in site.head_keys:  # global head; its norm layers stay the site's
        want = shared[k] if k in shared else norms[k]
        assert np.array_equal(sd[k].numpy(), want), k

    # saving without a new head keeps the stored one
    site.save_personal(None)
    kept = site.personal() or {}
    for k, v in head.items():
        assert np.array_equal(kept[k], v), k


def test_global_model_has_no_site_files(tmp_path: Path) -> None:
    g = _site_model(None)
    assert g.personal() is None
    shared = _arrays(_site_model(None, seed=3), g.shared_keys)
    sd = g.compose(shared).state_dict()
    for k, v in shared.items():
        assert np.array_equal(sd[k].numpy(), v), k
    with pytest.raises(ValueError, match="no site state"):
        _ = g.standardizer_path
    site = _site_model(SiteState(tmp_path, "B"))
    assert site.teacher_path == tmp_path / "B" / "teacher.pt"
    assert site.standardizer_path.parent == site.accountant_dir == tmp_path / "B"


def test_incomplete_personal_state_is_named(tmp_path: Path) -> None:
    site = _site_model(SiteState(tmp_path, "C"))
    norms = _arrays(site, site.personal_keys)
    missing = dict(norms)
    gone = missing.pop(site.personal_keys[0])
    assert gone is not None
    with pytest.raises(CheckpointMismatch, match=r"C/personal\.npz: lacks 1"):
        site.check_personal(missing, head=False, what="test")
    half_head = {**norms, PERSONAL_HEAD_PREFIX + site.head_keys[0]: np.zeros(1)}
    with pytest.raises(CheckpointMismatch, match="personal head incomplete"):
        site.check_personal(half_head, head=True, what="test")
    assert not site.check_personal(norms, head=True, what="test")  # no head: global
    with pytest.raises(CheckpointMismatch, match="shared arrays"):
        site.check_shared({}, tmp_path / "round.npz", "test")


def test_another_models_personal_state_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run with another model at a site whose state holds the last run's
    layers failed every round with a size mismatch, until someone moved the
    state folder away."""
    old = _site_model(SiteState(tmp_path, "A"))
    old.save_personal(None)  # FedBN layers of a tiny model, 16 FPN channels
    torch.manual_seed(0)
    wider = build_detector(ModelConfig(arch="tiny", fpn_channels=32, head_convs=1))
    site = SiteModel(wider, FEDBN_FEDPER, SiteState(tmp_path, "A"))
    shared = _arrays(site, site.shared_keys)
    with caplog.at_level("WARNING"):
        assert site.personal() is None
        site.compose(shared)  # the global and default arrays
    assert "personal arrays of another model" in caplog.text
    site.save_personal(None)  # the new run's first committed round
    assert site.personal() is not None


def test_another_models_teacher_is_rebuilt(tmp_path: Path) -> None:
    from common.detector.adapt.config import AdaptConfig
    from common.detector.adapt.teacher import MeanTeacher, load_or_create_teacher

    small = build_detector(ModelConfig(arch="tiny", fpn_channels=16, head_convs=1))
    MeanTeacher(small, 0.99).save(tmp_path / "teacher.pt", step=7)
    wider = build_detector(ModelConfig(arch="tiny", fpn_channels=32, head_convs=1))
    teacher, step = load_or_create_teacher(
        tmp_path / "teacher.pt", wider, AdaptConfig()
    )
    assert step == 0 and teacher is not None
    same, step = load_or_create_teacher(tmp_path / "teacher.pt", small, AdaptConfig())
    assert step == 7
