"""The site's own model (``mammofed-client train-local``): the study's local-only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from client.cli import main
from client.detector_trainer import detector_options
from client.export import load_detector
from client.local_training import train_central, train_local_model
from client.model_card import write_model_card
from common.config.loader import config_to_dict
from common.config.site import load_site_config
from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig, build_detector, head_keys
from common.errors import CheckpointMismatch, ConfigError, MammofedError
from common.fileio import sha256_file
from common.wire.federation import load_federation_config
from tests.client.conftest import one_site_config
from tests.conftest import make_site_cache


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(site YAML, federation YAML, base model) of one tiny site on CPU."""
    cache = make_site_cache(tmp_path / "cache", n_patients=4)
    site = tmp_path / "site.yaml"
    site.write_text(f"name: site-b\ncache_dir: {cache}\n")
    fed = tmp_path / "federation.yaml"
    doc = config_to_dict(one_site_config(tmp_path, paste=True, min_box_mm=12.0))
    fed.write_text(yaml.safe_dump(doc))
    opts = detector_options(load_federation_config(fed), str(fed))
    torch.manual_seed(7)
    base = save_checkpoint(
        tmp_path / "base.pt", build_detector(opts.model_config()), opts.model_config()
    )
    return site, fed, base


def test_the_site_model_is_the_studys_local_only_model(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    site_yaml, fed_yaml, base = setup
    site, fed = load_site_config(site_yaml), load_federation_config(fed_yaml)
    out = train_local_model(site, fed, init=base, out=tmp_path / "m" / "local.pt")
    model, ck, _ = load_detector(out, torch.device("cpu"))
    record = ck.extra["local_model"]
    assert record["site"] == "site-b" and record["epochs"] == 1
    assert record["init_sha256"] == sha256_file(base)
    assert (tmp_path / "m" / "local.pt.resolved.yaml").is_file()
    # its model card tells what train-local recorded, not "unknown"
    card_json, _ = write_model_card(out, ck, kind="torch-checkpoint")
    training = json.loads(card_json.read_text())["training"]
    assert training["source"] == "site's own model (mammofed-client train-local)"
    assert training["epochs"] == record["epochs"] and training["site"] == "site-b"
    assert training["init_sha256"] == record["init_sha256"]
    # the study's local-only regime on the same cache: the very same weights
    opts = detector_options(fed, str(fed_yaml))
    assert site.cache_dir is not None
    study = train_central(
        [site.cache_dir], opts, epochs=1, lr=fed.trainer.learning_rate,
        batch_size=fed.trainer.batch_size, seed=fed.seed,
        device=torch.device("cpu"), label="local-only", init=base,
    )  # fmt: skip
    want = study.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k].cpu()), k
    # and it moved away from the base model
    base_sd = load_detector(base, torch.device("cpu"))[0].state_dict()
    assert any(not torch.equal(v, base_sd[k]) for k, v in want.items())


def test_the_command_writes_a_model_and_refuses_bad_inputs(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    site_yaml, fed_yaml, base = setup
    out = tmp_path / "local.pt"
    argv = ["train-local", "--site-config", str(site_yaml), "--federation"]
    argv += [str(fed_yaml), "--init", str(base), "--out", str(out)]
    assert main(argv) == 0 and out.is_file()
    site, fed = load_site_config(site_yaml), load_federation_config(fed_yaml)
    # a base model of another architecture: refused, naming the field
    other = ModelConfig(arch="small", working_spacing_mm=0.4)
    wrong = save_checkpoint(tmp_path / "wrong.pt", build_detector(other), other)
    with pytest.raises(CheckpointMismatch, match="arch"):
        train_local_model(site, fed, init=wrong, out=tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="epochs: must be >= 1, got 0"):
        train_local_model(site, fed, init=base, out=tmp_path / "x.pt", epochs=0)
    no_cache = tmp_path / "nocache.yaml"
    no_cache.write_text("name: site-b\n")
    with pytest.raises(ConfigError, match="cache_dir: required"):
        train_local_model(
            load_site_config(no_cache), fed, init=base, out=tmp_path / "x.pt"
        )
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"name: site-b\ncache_dir: {tmp_path / 'none'}\n")
    with pytest.raises(MammofedError, match="no cache entries"):
        train_local_model(
            load_site_config(empty), fed, init=base, out=tmp_path / "x.pt"
        )
    assert not (tmp_path / "x.pt").exists()


def test_site_alone_training_refuses_the_standardize_option_it_does_not_apply(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    site_yaml, fed_yaml, base = setup
    doc = yaml.safe_load(fed_yaml.read_text())
    doc["trainer"].setdefault("options", {})["standardize"] = True
    fed_yaml.write_text(yaml.safe_dump(doc))
    site, fed = load_site_config(site_yaml), load_federation_config(fed_yaml)
    with pytest.raises(ConfigError, match="trainer.options.standardize: true"):
        train_local_model(site, fed, init=base, out=tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    opts = detector_options(fed, str(fed_yaml))
    assert site.cache_dir is not None
    with pytest.raises(ConfigError, match="local-only: trainer.options.standardize"):
        train_central(
            [site.cache_dir], opts, epochs=1, lr=1e-3, batch_size=2, seed=0,
            device=torch.device("cpu"), label="local-only", init=base,
        )  # fmt: skip


def test_head_only_tunes_the_head_and_keeps_every_other_tensor_of_the_base(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    site_yaml, fed_yaml, base = setup
    site, fed = load_site_config(site_yaml), load_federation_config(fed_yaml)
    out = train_local_model(
        site, fed, init=base, out=tmp_path / "head.pt", head_only=True
    )
    model, ck, _ = load_detector(out, torch.device("cpu"))
    assert ck.extra["local_model"]["head_only"] is True
    base_model = load_detector(base, torch.device("cpu"))[0]
    base_sd, sd = base_model.state_dict(), model.state_dict()
    head = set(head_keys(model))
    moved = {k for k, v in sd.items() if not torch.equal(v, base_sd[k])}
    assert moved and moved <= head, sorted(moved - head)[:5]
    # the backbone's BatchNorm statistics stayed the base's (eval mode)
    stats = [k for k in sd if k.endswith("running_mean") and k not in head]
    assert stats and all(torch.equal(sd[k], base_sd[k]) for k in stats)
    # the command's flag reaches it
    argv = ["train-local", "--site-config", str(site_yaml), "--federation"]
    argv += [str(fed_yaml), "--init", str(base), "--out", str(tmp_path / "c.pt")]
    assert main([*argv, "--head-only"]) == 0
    c_sd = load_detector(tmp_path / "c.pt", torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in c_sd.items())


def test_lr_factor_scales_the_learning_rate_as_the_tuned_regime_does(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    """``--lr-factor 0.3``: the study's personalized-dp-tuned training, same weights."""
    site_yaml, fed_yaml, base = setup
    site, fed = load_site_config(site_yaml), load_federation_config(fed_yaml)
    argv = ["train-local", "--site-config", str(site_yaml), "--federation"]
    argv += [str(fed_yaml), "--init", str(base), "--out", str(tmp_path / "t.pt")]
    assert main([*argv, "--lr-factor", "0.3"]) == 0
    model, ck, _ = load_detector(tmp_path / "t.pt", torch.device("cpu"))
    record = ck.extra["local_model"]
    assert record["lr_factor"] == 0.3
    assert record["learning_rate"] == pytest.approx(0.3 * fed.trainer.learning_rate)
    opts = detector_options(fed, str(fed_yaml))
    assert site.cache_dir is not None
    study = train_central(
        [site.cache_dir], opts, epochs=1, lr=0.3 * fed.trainer.learning_rate,
        batch_size=fed.trainer.batch_size, seed=fed.seed,
        device=torch.device("cpu"), label="tuned", init=base,
    )  # fmt: skip
    want = study.state_dict()
    assert all(torch.equal(v, want[k].cpu()) for k, v in model.state_dict().items())
    full = train_local_model(site, fed, init=base, out=tmp_path / "full.pt")
    full_sd = load_detector(full, torch.device("cpu"))[0].state_dict()
    assert any(not torch.equal(v, full_sd[k]) for k, v in want.items())
    for bad in (0.0, -1.0, float("nan"), 11.0):
        with pytest.raises(ConfigError, match="lr_factor: must be in"):
            train_local_model(
                site, fed, init=base, out=tmp_path / "x.pt", lr_factor=bad
            )
    assert not (tmp_path / "x.pt").exists()


def _partly_labeled_cache(root: Path) -> Path:
    """8 women, 2 images each; women 4-7 carry no annotation (unlabeled)."""
    from common.imaging.annotations import ImageTargets
    from tests.conftest import LESION, _image, write_site_cache

    def targets(p: int, j: int) -> ImageTargets:
        if p >= 4:
            return ImageTargets(False, False, False, [], [], [], [], [], [])
        if j == 0:
            b = [list(LESION)]
            return ImageTargets(True, False, True, b, b, [0], [], [], [])
        return ImageTargets(True, False, False, [], [], [], [], [], [])

    split = {f"P{p}": "train" for p in range(8)}
    return write_site_cache(
        root,
        8,
        lambda p, j: _image(2 * p + j, f"P{p}", j == 0 and p < 4),
        targets,
        split,
    )


def test_semi_supervised_tuning_uses_the_unlabeled_images_and_only_them(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    """``ssl``: the teacher's consistency on the unlabeled women moves the model;
    without unlabeled women it is exactly the supervised training."""
    from common.detector.adapt.config import AdaptConfig
    from common.imaging.data import SiteDataset

    _, fed_yaml, base = setup
    fed = load_federation_config(fed_yaml)
    opts = detector_options(fed, str(fed_yaml))
    cache = _partly_labeled_cache(tmp_path / "partly")
    ds = SiteDataset(cache, seed=fed.seed)
    assert len(ds.view("unlabeled")) == 8 and len(ds.view("labeled")) == 8
    kw = dict(
        epochs=2, lr=fed.trainer.learning_rate, batch_size=2, seed=fed.seed,
        device=torch.device("cpu"), init=base,
    )  # fmt: skip
    ssl = AdaptConfig(rampup_steps=0, seed=fed.seed)

    def weights(caches: list[Path], label: str, cfg: AdaptConfig | None) -> dict:
        m = train_central(caches, opts, label=label, ssl=cfg, **kw)  # type: ignore[arg-type]
        return {k: v.clone() for k, v in m.state_dict().items()}

    sup = weights([cache], "sup", None)
    semi = weights([cache], "semi", ssl)
    again = weights([cache], "semi", ssl)
    assert any(not torch.equal(v, sup[k]) for k, v in semi.items())
    assert all(torch.equal(v, again[k]) for k, v in semi.items())  # seeded
    # switched off in the config: the supervised weights
    off = weights([cache], "off", AdaptConfig(ssl_enabled=False, seed=fed.seed))
    assert all(torch.equal(v, sup[k]) for k, v in off.items())
    # a fully labeled site has no unlabeled images: supervised, same weights
    full = make_site_cache(tmp_path / "full", n_patients=4)
    a = weights([full], "full", None)
    b = weights([full], "full", ssl)
    assert all(torch.equal(v, a[k]) for k, v in b.items())
    # the loss's weight at 0 (the ``-unlab`` regimes): the unlabeled images
    # run through the model and move its norm statistics, nothing else; every
    # parameter is the supervised one to the bit, so the two differ only in
    # the statistics their evaluation normalizes with
    unlab = weights([cache], "unlab", AdaptConfig(rampup_steps=0, unsup_weight=0.0))
    params = {k for k, _ in build_detector(opts.model_config()).named_parameters()}
    stats = [k for k in sup if k.endswith(("running_mean", "running_var"))]
    assert params and stats
    assert all(torch.equal(unlab[k], sup[k]) for k in params)
    assert any(not torch.equal(unlab[k], sup[k]) for k in stats)
    with pytest.raises(MammofedError, match="head-only training takes no semi"):
        train_central([cache], opts, label="x", ssl=ssl, head_only=True, **kw)  # type: ignore[arg-type]


def test_self_training_labels_the_unlabeled_women_with_the_sites_models(
    tmp_path: Path, setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``train-local --pseudo-label-with``: the given models label the site's
    unlabeled training images, which then train the model beside the labeled
    ones; the checkpoint records what labeled them; bad inputs are refused."""
    _, fed_yaml, base = setup
    fed = load_federation_config(fed_yaml)
    opts = detector_options(fed, str(fed_yaml))
    cache = _partly_labeled_cache(tmp_path / "partly")
    site_yaml = tmp_path / "partly.yaml"
    site_yaml.write_text(f"name: site-c\ncache_dir: {cache}\n")
    # a teacher that sees a lesion everywhere: its class logits' bias raised
    eager = build_detector(opts.model_config())
    eager.load_state_dict(load_detector(base, torch.device("cpu"))[0].state_dict())
    with torch.no_grad():
        eager.head.classification_head.cls_logits.bias.fill_(4.0)  # type: ignore[union-attr]
    teacher = save_checkpoint(tmp_path / "teacher.pt", eager, opts.model_config())
    argv = ["train-local", "--site-config", str(site_yaml), "--federation"]
    argv += [str(fed_yaml), "--init", str(base)]
    plain, selft = tmp_path / "plain.pt", tmp_path / "self.pt"
    assert main([*argv, "--out", str(plain)]) == 0
    assert main([*argv, "--out", str(selft), "--pseudo-label-with", str(teacher)]) == 0
    ck = load_detector(selft, torch.device("cpu"))[1]
    rec = ck.extra["local_model"]["pseudo_labels"]
    assert rec["models"] == {str(teacher): sha256_file(teacher)}
    assert rec["images"] == 8 and rec["images_with_boxes"] == 8  # the 8 unlabeled
    assert rec["ignore_threshold"] == 0.2 and rec["ignore_regions"] >= 0
    # the model card says what labeled them
    card_json, card_md = write_model_card(selft, ck, kind="torch-checkpoint")
    assert json.loads(card_json.read_text())["training"]["pseudo_labels"] == rec
    assert sha256_file(teacher) in card_md.read_text()
    assert rec["boxes"]["mass"] > 0 and rec["keep_threshold"] == 0.5
    assert (
        load_detector(plain, torch.device("cpu"))[1].extra["local_model"][
            "pseudo_labels"
        ]
        is None
    )
    a = load_detector(plain, torch.device("cpu"))[0].state_dict()
    b = load_detector(selft, torch.device("cpu"))[0].state_dict()
    assert any(not torch.equal(v, b[k]) for k, v in a.items())  # they taught it
    # thresholds out of order: refused before any training
    bad = [*argv, "--out", str(tmp_path / "x.pt"), "--pseudo-label-with", str(teacher)]
    assert main([*bad, "--pseudo-keep", "0.1", "--pseudo-ignore", "0.3"]) != 0
    said = capsys.readouterr().err
    assert "--pseudo-keep/--pseudo-ignore" in said and "ignore 0.3, keep 0.1" in said
    # a teacher that works at another spacing: refused, naming it and the field
    other_cfg = dataclasses.replace(opts.model_config(), working_spacing_mm=0.8)
    other = save_checkpoint(tmp_path / "other.pt", build_detector(other_cfg), other_cfg)
    with pytest.raises(
        CheckpointMismatch, match="other.pt: field 'working_spacing_mm'"
    ):
        train_local_model(
            load_site_config(site_yaml), fed, init=base, out=tmp_path / "x.pt",
            pseudo_label_with=[other],
        )  # fmt: skip
    assert not (tmp_path / "x.pt").exists()
