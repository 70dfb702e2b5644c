"""mammofed-sim train on synthetic site caches: outputs, resume, config errors."""

from __future__ import annotations

import json

import pytest

from common.config import load_config
from common.detector.checkpoint import load_checkpoint, save_checkpoint
from common.detector.model import build_detector
from common.errors import ConfigError
from common.keys import CPM_MASS
from simulation.cli import main as sim_main
from simulation.train import TrainConfig
from tests.conftest import REPO, make_site_cache, write_train_yaml


def test_sim_train_writes_outputs_and_resumes(tmp_path, site_cache):
    site_b = make_site_cache(tmp_path / "siteB", n_patients=3)
    cfg_path = write_train_yaml(tmp_path, [site_cache, site_b], ema_decay=0.9)
    assert sim_main(["train", "--config", str(cfg_path)]) == 0
    run = tmp_path / "run"
    for name in ("resolved_config.yaml", "last.pt", "final.pt", "epochs.jsonl"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"siteA", "siteB"}
    m = metrics["siteA"]["metrics"]
    assert 0.0 <= m[CPM_MASS] <= 1.0
    assert (run / "siteA" / "froc-mass.png").is_file()
    lines = (run / "epochs.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["steps"] >= 1
    ck = load_checkpoint(run / "final.pt")
    assert ck.model_config.arch == "tiny" and ck.extra["ema"] is True
    # resume: a second call with 2 epochs trains only epoch 1
    assert sim_main(["train", "--config", str(cfg_path), "--epochs", "2"]) == 0
    epochs = [
        json.loads(s)["epoch"] for s in (run / "epochs.jsonl").read_text().splitlines()
    ]
    assert epochs == [0, 1]


def test_final_model_records_its_split_and_evaluate_keeps_to_it(tmp_path, site_cache):
    """``final.pt`` names the women it trained on: ``evaluate`` scores the
    others, and a model trained on the whole cache has none there to score
    (once it fell back to the default split and scored training women)."""
    from client.evaluate import NothingToEvaluate, evaluate_checkpoint
    from common.imaging.data import SiteDataset

    cfg_path = write_train_yaml(tmp_path, [site_cache], test_fraction=0.5, split_seed=3)
    assert sim_main(["train", "--config", str(cfg_path)]) == 0
    ck = load_checkpoint(tmp_path / "run" / "final.pt")
    assert ck.extra["split"] == {"seed": 3, "test_fraction": 0.5}
    res = evaluate_checkpoint(
        tmp_path / "run" / "final.pt", site_cache, tmp_path / "ev", n_boot=5
    )
    held = SiteDataset(site_cache, test_fraction=0.5, seed=3)
    assert res["split"]["source"] == "checkpoint"
    assert res["n_images"] == len(held.indices("test"))
    whole = write_train_yaml(
        tmp_path, [site_cache], test_fraction=0.0, out_dir=str(tmp_path / "all")
    )
    assert sim_main(["train", "--config", str(whole)]) == 0
    final = tmp_path / "all" / "final.pt"
    assert len(load_checkpoint(final).extra["trained_keys"]) == 12
    with pytest.raises(NothingToEvaluate, match="12 of the 12 images"):
        evaluate_checkpoint(final, site_cache, tmp_path / "e2")
    # a cache of other women (mini-MIAS's unseen women, say): every one is a test
    # woman, scored with the default view
    other = make_site_cache(tmp_path / "other", n_patients=3, key_prefix="o")
    res = evaluate_checkpoint(final, other, tmp_path / "e3", n_boot=5)
    assert res["view"] == "unseen" and res["n_images"] == 6
    # a folder of the training women and two new ones: the new ones only
    mixed = make_site_cache(tmp_path / "mixed", n_patients=8)
    res = evaluate_checkpoint(final, mixed, tmp_path / "e5", n_boot=5)
    assert res["n_images"] == 4
    # an older model that records no training images: refused, with the way out
    ck = load_checkpoint(final)
    extra = {k: v for k, v in ck.extra.items() if k != "trained_keys"}
    save_checkpoint(tmp_path / "old.pt", build_detector(ck.model_config),
                    ck.model_config, extra=extra)  # fmt: skip
    with pytest.raises(NothingToEvaluate, match="--view all"):
        evaluate_checkpoint(tmp_path / "old.pt", other, tmp_path / "e4")


def test_train_config_errors_name_key(tmp_path, site_cache):
    p = write_train_yaml(tmp_path, [tmp_path / "nope"])
    with pytest.raises(ConfigError, match=r"train\.yaml.*caches\[0\].*nope"):
        load_config(p, TrainConfig)
    p = write_train_yaml(tmp_path, [site_cache], lesion_prob=2.0)
    with pytest.raises(ConfigError, match="lesion_prob"):
        load_config(p, TrainConfig)
    p = write_train_yaml(tmp_path, [site_cache], model={"arch": "resnet7"})
    assert sim_main(["train", "--config", str(p)]) == 2


@pytest.mark.parametrize(
    "name",
    [
        "real/mini-mias.yaml",
        "real/mini-mias-gpu.yaml",
        "train/base-site-a.yaml",
        "train/smoke-tiny.yaml",
    ],
)
def test_shipped_train_configs_validate(tmp_path, site_cache, name):
    from common.config import from_mapping, load_yaml

    data = load_yaml(REPO / "configs" / name)
    data["caches"] = [str(site_cache)]  # the real caches need an ingest first
    cfg = from_mapping(data, TrainConfig, source=name, base_dir=tmp_path)
    assert cfg.model.working_spacing_mm == 0.4
    if name == "real/mini-mias.yaml":  # the lesion recipe
        assert cfg.augment.paste and cfg.model.speck_channel
    assert cfg.epochs >= 1
