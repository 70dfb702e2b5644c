"""The regime table: one line per regime, laid over the study's federation config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.wire.federation import load_federation_config
from server.strategies import build_strategy
from simulation import regimes as R
from simulation.run import RunRequest, regime_config

REPO = Path(__file__).resolve().parents[2]
FEDERATION = REPO / "configs" / "federation" / "sim-test.yaml"


def _req(tmp_path: Path) -> RunRequest:
    return RunRequest(
        scenario=tmp_path / "s.yaml",
        federation=FEDERATION,
        out=tmp_path / "out",
        fedprox_mu=0.05,
        dp_epsilon=3.0,
    )


def test_table_is_the_one_list_of_regimes() -> None:
    assert R.ORDER == tuple(r.name for r in R.TABLE)
    assert len(set(R.ORDER)) == len(R.ORDER)
    assert R.CENTRAL | R.FEDERATED | R.ENSEMBLE == set(R.ORDER)
    assert not R.CENTRAL & R.FEDERATED and not R.ENSEMBLE & (R.CENTRAL | R.FEDERATED)
    for r in R.TABLE:  # a regime is central, federated or an ensemble, one only
        assert [r.train_on is not None, r.strategy is not None, bool(r.members)].count(
            True
        ) == 1, r.name
        # an ensemble's members are trained regimes listed before it
        for m in r.members:
            assert R.ORDER.index(m) < R.ORDER.index(r.name)
            assert not R.REGIMES[m].members
        # a tuned regime starts each site from a federated regime listed before it
        if r.tune_from is not None:
            assert r.train_on == "each" and r.tune_from in R.FEDERATED, r.name
            assert R.ORDER.index(r.tune_from) < R.ORDER.index(r.name)
        # a self-trained regime's teachers are listed before it
        if r.pseudo_from is not None:
            assert r.train_on == "each", r.name
            assert R.ORDER.index(r.pseudo_from) < R.ORDER.index(r.name)


def test_an_ensemble_brings_its_members() -> None:
    assert R.with_members([R.BASE, R.PERSONALIZED_DP_LOCAL, R.ORACLE]) == (
        R.BASE,
        R.LOCAL_ONLY,
        R.PERSONALIZED_DP,
        R.PERSONALIZED_DP_LOCAL,
        R.ORACLE,
    )
    assert R.with_members([R.ORACLE, R.BASE]) == (R.BASE, R.ORACLE)
    # and through a tuned member, the federated regime it starts from
    assert R.with_members([R.PERSONALIZED_DP_TUNED_LOCAL]) == (
        R.LOCAL_ONLY,
        R.PERSONALIZED_DP,
        R.PERSONALIZED_DP_TUNED,
        R.PERSONALIZED_DP_TUNED_LOCAL,
    )
    assert R.REGIMES[R.PERSONALIZED_DP_TUNED].lr_factor == 0.3
    # the same recipe without DP (stop 33)
    assert R.with_members([R.PERSONALIZED_TUNED_LOCAL]) == (
        R.LOCAL_ONLY,
        R.PERSONALIZED,
        R.PERSONALIZED_TUNED,
        R.PERSONALIZED_TUNED_LOCAL,
    )
    tuned = R.REGIMES[R.PERSONALIZED_TUNED]
    assert tuned.tune_from == R.PERSONALIZED and tuned.lr_factor == 0.3
    assert R.REGIMES[R.LOCAL_ONLY].lr_factor == 1.0
    with pytest.raises(KeyError):
        R.with_members(["no-such-regime"])


def test_self_training_brings_its_teachers_and_its_two_versions() -> None:
    """The self-trained tuned model needs the three models that label its
    site's images; its labeled-only and all-labels versions start from the
    same federated model (stop 43)."""
    pseudo = R.REGIMES[R.PERSONALIZED_SSL_TUNED_PSEUDO]
    assert pseudo.pseudo_from == R.PERSONALIZED_SSL_TUNED_LOCAL
    assert R.with_members([R.PERSONALIZED_SSL_TUNED_PSEUDO_LOCAL_FEWSHOT]) == (
        R.LOCAL_ONLY,
        R.PERSONALIZED_SSL,
        R.PERSONALIZED_SSL_TUNED,
        R.PERSONALIZED_SSL_TUNED_LOCAL,
        R.PERSONALIZED_SSL_TUNED_PSEUDO,
        R.PERSONALIZED_SSL_TUNED_PSEUDO_LOCAL_FEWSHOT,
    )
    labeled = R.REGIMES[R.PERSONALIZED_SSL_TUNED]
    ceiling = R.REGIMES[R.PERSONALIZED_SSL_TUNED_ALL_LABELS]
    for r in (pseudo, ceiling):
        assert r.tune_from == labeled.tune_from == R.PERSONALIZED_SSL
        assert r.lr_factor == labeled.lr_factor and r.options == labeled.options
    assert ceiling.all_labels and not labeled.all_labels and not pseudo.all_labels
    with pytest.raises(ValueError, match="pseudo_from needs a regime that trains"):
        R.Regime("x", strategy="fedavg", pseudo_from=R.LOCAL_ONLY)


@pytest.mark.parametrize("name", sorted(R.FEDERATED))
def test_federated_regime_config_follows_its_table_line(
    tmp_path: Path, name: str
) -> None:
    base = load_federation_config(FEDERATION)
    spec = R.REGIMES[name]
    cfg = regime_config(base, name, _req(tmp_path), tmp_path / "run", ["A", "B"])
    assert cfg.strategy.name == spec.strategy
    assert cfg.personalization == spec.personalization
    for k, v in spec.options.items():
        assert cfg.trainer.options[k] == v, (name, k)
    # the study's own options stay unless the regime sets them
    for k, v in base.trainer.options.items():
        if k not in spec.options and k not in spec.from_request:
            assert cfg.trainer.options[k] == v
    assert cfg.sites == ("A", "B") and cfg.participation.min_available_nodes == 2
    assert cfg.state_dir == tmp_path / "run" / name / "site-state"
    build_strategy(cfg)  # every federated line names a registered strategy


def test_request_values_reach_their_regimes_only(tmp_path: Path) -> None:
    base = load_federation_config(FEDERATION)
    req = _req(tmp_path)

    def cfg(name: str):  # noqa: ANN202
        return regime_config(base, name, req, tmp_path / "run", ["A"])

    assert cfg(R.FEDPROX).strategy.proximal_mu == 0.05
    assert cfg(R.FEDAVG).strategy.proximal_mu == 0.0
    dp = cfg(R.PERSONALIZED_DP).trainer.options
    assert dp["dp"] is True and dp["dp_epsilon"] == 3.0 and dp["ssl"] is False
    assert "dp_epsilon" not in cfg(R.PERSONALIZED).trainer.options
    assert cfg(R.FEDTRIMMEDAVG).strategy.name == "fedtrimmedavg"
    assert R.REGIMES[R.PERSONALIZED_DP].private
    assert not any(R.REGIMES[r].private for r in R.ORDER if r != R.PERSONALIZED_DP)


def test_the_federation_files_strategy_settings_reach_every_regime(
    tmp_path: Path,
) -> None:
    """A study's server optimizer settings were replaced by the defaults."""
    base = load_federation_config(FEDERATION)
    tuned = dataclasses.replace(
        base, strategy=dataclasses.replace(base.strategy, eta=0.01, trim_beta=0.2)
    )
    req = _req(tmp_path)

    def strategy(name: str):  # noqa: ANN202
        return regime_config(tuned, name, req, tmp_path / "run", ["A"]).strategy

    assert strategy(R.FEDADAM).eta == 0.01
    assert strategy(R.FEDTRIMMEDAVG).trim_beta == 0.2
    assert strategy(R.FEDPROX).proximal_mu == 0.05 and strategy(R.FEDPROX).eta == 0.01
    assert strategy(R.PERSONALIZED).proximal_mu == 0.0


def test_central_regime_is_not_a_federation(tmp_path: Path) -> None:
    base = load_federation_config(FEDERATION)
    for name in (*sorted(R.CENTRAL), "no-such-regime"):
        with pytest.raises(ConfigError, match="--regime"):
            regime_config(base, name, _req(tmp_path), tmp_path / "run", ["A"])


def test_a_head_only_regime_needs_the_base_model(tmp_path: Path) -> None:
    import dataclasses

    from simulation.run import run_study

    assert R.REGIMES[R.LOCAL_HEAD].head_only and R.LOCAL_HEAD in R.CENTRAL
    assert not R.REGIMES[R.LOCAL_ONLY].head_only
    req = dataclasses.replace(
        _req(tmp_path), regimes=(R.PERSONALIZED_DP_LOCAL_HEAD,), start_from_base=False
    )
    # refused before any site is generated or trained, naming the regime
    with pytest.raises(ConfigError, match="local-head tunes the base model"):
        run_study(req)
    assert not (tmp_path / "out" / "data").exists()


def test_a_study_with_central_regimes_refuses_standardize_before_any_work(
    tmp_path: Path,
) -> None:
    """Central training does not standardize: refused by name, not ignored."""
    import dataclasses

    import yaml

    from simulation.run import run_study

    doc = yaml.safe_load(FEDERATION.read_text())
    doc.setdefault("trainer", {}).setdefault("options", {})["standardize"] = True
    fed = tmp_path / "fed.yaml"
    fed.write_text(yaml.safe_dump(doc))
    req = dataclasses.replace(_req(tmp_path), federation=fed, regimes=(R.LOCAL_ONLY,))
    with pytest.raises(ConfigError, match=r"fed.yaml: trainer.options.standardize"):
        run_study(req)
    assert not (tmp_path / "out" / "data").exists()


def test_every_regime_has_a_study_eta_weight() -> None:
    """The study's ETA weighs each regime left; unmeasured ones by their kind."""
    from simulation.run import MEASURED_WEIGHT, regime_weight

    assert set(MEASURED_WEIGHT) <= set(R.REGIMES)
    w = {r.name: regime_weight(r) for r in R.TABLE}
    assert all(0 < v < 10 for v in w.values())
    assert w[R.LOCAL_ONLY] == 1.0 and w[R.BASE] < w[R.LOCAL_ONLY] < w[R.ORACLE]
    assert w[R.FEDAVGM] == w[R.FEDAVG]  # unmeasured federated, shared model
    assert w[R.PERSONALIZED_STATS] == w[R.PERSONALIZED]
    assert w[R.PERSONALIZED_ALL_LABELS] == w[R.PERSONALIZED]
    assert w[R.PERSONALIZED_DP_TUNED] == 1.0  # central, each site
    assert w[R.PERSONALIZED_DP_TUNED_SSL] == 2.0
    assert w[R.RECOMMENDED] < 0.2  # an ensemble only fuses detections
    # a reused regime is only copied and re-scored
    assert regime_weight(R.REGIMES[R.PERSONALIZED_DP], reused=True) < 0.1


def test_fedprox_mu_flag_reaches_the_fedprox_regime_and_refuses_non_positive() -> None:
    import argparse

    from simulation.commands import run as run_cmd

    parser = argparse.ArgumentParser()
    run_cmd.add_arguments(parser)
    need = ["--scenario", "s.yaml", "--federation", "f.yaml", "--out", "o"]
    assert parser.parse_args(need).fedprox_mu == 0.01
    assert parser.parse_args([*need, "--fedprox-mu", "0.2"]).fedprox_mu == 0.2
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args([*need, "--fedprox-mu", bad])


def test_a_reused_regime_must_have_been_trained_with_this_runs_flag_values(
    tmp_path: Path,
) -> None:
    """--reuse: --fedprox-mu and --dp-epsilon are not in configs/federation.yaml,
    so they are checked against the regime's own resolved config."""
    from common.config.loader import write_resolved
    from common.wire import runfolder as RF
    from simulation.run import check_requested

    base = load_federation_config(FEDERATION)
    req = _req(tmp_path)  # fedprox_mu 0.05, dp_epsilon 3
    prior = tmp_path / "prior"
    for name in (R.FEDPROX, R.PERSONALIZED_DP):
        cfg = regime_config(base, name, req, prior, ["A"])
        write_resolved(cfg, prior / name / RF.SERVER_DIR)
    for name in (R.FEDPROX, R.PERSONALIZED_DP, R.FEDAVG):  # FedAvg takes no flag
        check_requested(prior, R.REGIMES[name], req)
    with pytest.raises(ConfigError, match=r"strategy\.proximal_mu.*0\.05.*0\.2"):
        check_requested(
            prior, R.REGIMES[R.FEDPROX], dataclasses.replace(req, fedprox_mu=0.2)
        )
    dp = R.REGIMES[R.PERSONALIZED_DP]
    with pytest.raises(ConfigError, match=r"options\.dp_epsilon.*--dp-epsilon"):
        check_requested(prior, dp, dataclasses.replace(req, dp_epsilon=8.0))
    resolved = prior / R.FEDPROX / RF.SERVER_DIR / "resolved_config.yaml"
    # a hostile or broken file: refused by name, never taken as a match
    for text, field in (
        ("strategy: [1, 2\n", "<file>"),  # not YAML
        ("strategy: [0.05]\n", "strategy.proximal_mu"),  # not a mapping
        ("strategy: {proximal_mu: '0.05'}\n", "strategy.proximal_mu"),  # a string
    ):
        resolved.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(field)):
            check_requested(prior, R.REGIMES[R.FEDPROX], req)
    resolved.unlink()
    with pytest.raises(ConfigError, match="resolved_config.yaml"):
        check_requested(prior, R.REGIMES[R.FEDPROX], req)


def test_the_unlab_members_run_the_unlabeled_images_without_the_loss() -> None:
    """``local-only-unlab`` and ``personalized-ssl-tuned-unlab``: central
    semi-supervision with the consistency loss's weight at 0 (the unlabeled
    images shape the norm statistics only), fused as the recommended recipe."""
    from client.detector_trainer import DetectorOptions
    from simulation.run import central_ssl

    assert R.with_members([R.PERSONALIZED_SSL_TUNED_LOCAL_UNLAB]) == (
        R.PERSONALIZED_SSL,
        R.LOCAL_ONLY_UNLAB,
        R.PERSONALIZED_SSL_TUNED_UNLAB,
        R.PERSONALIZED_SSL_TUNED_LOCAL_UNLAB,
    )
    members = R.REGIMES[R.PERSONALIZED_SSL_TUNED_LOCAL_UNLAB].members
    assert members == (
        R.PERSONALIZED_SSL, R.PERSONALIZED_SSL_TUNED_UNLAB, R.LOCAL_ONLY_UNLAB
    )  # fmt: skip
    for name, lr in ((R.LOCAL_ONLY_UNLAB, 1.0), (R.PERSONALIZED_SSL_TUNED_UNLAB, 0.3)):
        spec = R.REGIMES[name]
        assert spec.kind == "central" and spec.ssl and spec.lr_factor == lr
        cfg = central_ssl(spec, DetectorOptions(), seed=4)
        assert cfg is not None and cfg.ssl_enabled
        assert cfg.unsup_weight == 0.0 and cfg.rampup_steps == 0 and cfg.seed == 4
    assert R.REGIMES[R.PERSONALIZED_SSL_TUNED_UNLAB].tune_from == R.PERSONALIZED_SSL


def test_the_few_shot_rule_is_the_trainers_and_picks_the_few_shot_site(
    tmp_path: Path,
) -> None:
    """``personalized-ssl+tuned+local-unless-fewshot``: a site with few
    labeled images and none unlabeled runs its tuned model alone; a site with
    unlabeled images, or with enough labels, fuses the three."""
    from common.detector.adapt import AdaptConfig, few_labels
    from simulation.run import fewshot_sites
    from tests.conftest import make_site_cache, make_ssl_site_cache

    cfg = AdaptConfig(fewshot_max_labeled=10)
    assert few_labels(9, 0, cfg, ssl=True)
    assert not few_labels(10, 0, cfg, ssl=True)  # the limit is exclusive
    assert not few_labels(2, 5, cfg, ssl=True)  # it learns from unlabeled images
    assert few_labels(2, 5, cfg, ssl=False)  # ... only when semi-supervised

    spec = R.REGIMES[R.PERSONALIZED_SSL_TUNED_LOCAL_FEWSHOT]
    assert spec.members == R.REGIMES[R.PERSONALIZED_SSL_TUNED_LOCAL].members
    assert spec.fewshot_members == (R.PERSONALIZED_SSL_TUNED,)
    assert R.with_members([spec.name])[-1] == spec.name
    caches = {
        "B": make_site_cache(tmp_path / "B", n_patients=3),  # labeled only
        "C": make_ssl_site_cache(tmp_path / "C", n_labeled=2, n_unlabeled=3),
    }
    fed = load_federation_config(FEDERATION)
    assert fewshot_sites(spec, fed, caches) == {"B"}
    # the member's own options win over the federation file's, as in a run
    many = dataclasses.replace(
        fed,
        trainer=dataclasses.replace(
            fed.trainer, options={**fed.trainer.options, "fewshot": False}
        ),
    )
    assert R.REGIMES[R.PERSONALIZED_SSL].options["fewshot"] is True  # it wins
    assert fewshot_sites(spec, many, caches) == {"B"}
    # a federated member that trains every layer (fewshot off): no few-shot site
    fedavg = R.Regime("x", members=(R.FEDAVG, R.LOCAL_ONLY))
    assert fewshot_sites(fedavg, fed, caches) == set()
    assert fewshot_sites(R.Regime("y", members=(R.LOCAL_ONLY,)), fed, caches) == set()
    with pytest.raises(ValueError, match="fewshot_members"):
        R.Regime("z", members=(R.LOCAL_ONLY,), fewshot_members=(R.ORACLE,))
