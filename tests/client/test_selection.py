"""client.selection: a site's choice of its own model on its validation women."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.detector_trainer import DetectorTrainer
from client.export import ExportError, export_model
from client.selection import (
    BASE,
    BASE_TUNED,
    GLOBAL,
    NAMES,
    PERSONALIZED,
    Score,
    Selection,
    SelectionStore,
    choose,
    compose_candidate,
    parse_candidates,
    validation_women,
)
from client.site_model import PERSONAL_HEAD_PREFIX
from client.state import SiteState, SiteStateError
from common.config.loader import config_to_dict
from common.detector.checkpoint import load_checkpoint
from common.detector.model import norm_keys
from common.errors import ConfigError
from common.keys import CALCIFICATION, MASS
from common.wire.federation import (
    SELECTED_MODEL,
    FederationConfig,
    FitInstructions,
    PersonalizationConfig,
)
from server.checkpoints import CheckpointStore
from tests.client.conftest import SITE, one_site_config
from tests.conftest import make_site_cache

FEDBN_FEDPER = PersonalizationConfig(local_norm=True, personal_head=True)


def _cfg(
    root: Path, rounds: int = 2, *, select: bool = True, **options: Any
) -> FederationConfig:
    """FedBN + FedPer on the tiny model, the site choosing its model."""
    cfg = one_site_config(
        root, personalization=FEDBN_FEDPER, fpn_channels=16, head_convs=1,
        working_spacing_mm=0.4, select=select, select_head_epochs=2, **options,
    )  # fmt: skip
    return dataclasses.replace(
        cfg,
        num_rounds=rounds,
        trainer=dataclasses.replace(cfg.trainer, learning_rate=3e-3),
    )


def _trainer(root: Path, cfg: FederationConfig, n_patients: int = 8) -> DetectorTrainer:
    cache = root / "cache" / SITE
    if not cache.is_dir():
        make_site_cache(cache, n_patients=n_patients)
    return DetectorTrainer(SITE, root / "state", cfg, data_dir=cache)


def _ins(cfg: FederationConfig, rnd: int) -> FitInstructions:
    return FitInstructions.from_federation(cfg, rnd)


# --- the validation women -------------------------------------------------------
def test_validation_women_are_a_seeded_stratified_part_of_the_women() -> None:
    women = {f"P{i}": i < 6 for i in range(9)}  # 6 with a lesion, 3 without
    held = validation_women(women, 0.25, seed=3)
    assert held == validation_women(women, 0.25, seed=3)  # deterministic
    assert held < set(women)
    lesion = {p for p in held if women[p]}
    assert len(lesion) == 2 and len(held - lesion) == 1  # round(1.5), round(0.75)
    # other seeds draw other women, never a whole stratum
    draws = {validation_women(women, 0.25, seed=s) for s in range(20)}
    assert len(draws) > 1
    assert all(any(women[p] for p in set(women) - d) for d in draws)


def test_at_least_one_validation_woman_from_two_and_none_below() -> None:
    assert validation_women({"P0": True}, 0.25, 0) == frozenset()
    assert validation_women({}, 0.25, 0) == frozenset()
    # two women in two strata of one each: the rule draws nobody; one with a
    # lesion is held out (CPM needs a lesion)
    assert validation_women({"P0": True, "P1": False}, 0.25, 0) == {"P0"}
    assert len(validation_women({"P0": False, "P1": False}, 0.1, 0)) == 1
    with pytest.raises(ValueError, match="fraction"):
        validation_women({"P0": True, "P1": True}, 1.0, 0)


def test_local_training_never_sees_the_validation_women(tmp_path: Path) -> None:
    tr = _trainer(tmp_path, _cfg(tmp_path))
    held = tr.held_out
    # 6 training women (2 of the 8 are test women), all with a lesion
    assert len(held) == 2  # round(0.25 * 6)

    def women(view: Any) -> set[str]:
        return {str(view[i][1]["patient_id"]) for i in range(len(view))}

    train = tr._view("labeled", train=True)
    val = tr.validation_view()
    assert women(val) == held
    assert not women(train) & held
    assert not women(tr._view("train", train=False)) & held
    # together they are the site's labeled women, image for image
    assert len(train) + len(val) == len(tr.dataset.indices("labeled"))
    # without select nothing is held out
    plain = _cfg(tmp_path, select=False)
    other = DetectorTrainer(SITE, tmp_path / "state2", plain, data_dir=tr.data_dir)
    assert other.held_out == frozenset()
    assert len(other._view("labeled", train=False)) == len(
        tr.dataset.indices("labeled")
    )


# --- the rule ---------------------------------------------------------------------
def _s(mass: float | None, calc: float | None = None) -> Score:
    return Score({MASS: mass, CALCIFICATION: calc})


def test_rule_keeps_base_unless_beaten_by_more_than_the_margin() -> None:
    assert choose({BASE: _s(0.4), GLOBAL: _s(0.5)}, 0.0)[0] == GLOBAL
    assert choose({BASE: _s(0.4), GLOBAL: _s(0.5)}, 0.1)[0] == BASE  # not > margin
    assert choose({BASE: _s(0.4), GLOBAL: _s(0.4)}, 0.0)[0] == BASE  # a tie
    assert choose({BASE: _s(0.4), GLOBAL: _s(0.3)}, 0.0)[0] == BASE
    # mean of the classes with a lesion; mass breaks ties between candidates
    scores = {
        BASE: _s(0.2, 0.2),
        GLOBAL: _s(0.2, 0.6),
        PERSONALIZED: _s(0.6, 0.2),
    }
    assert choose(scores, 0.0)[0] == PERSONALIZED
    # equal in both: the simpler candidate (earlier in CANDIDATES)
    assert choose({BASE: _s(0.0), BASE_TUNED: _s(0.5), GLOBAL: _s(0.5)}, 0)[0] == (
        GLOBAL
    )
    # no lesion among the validation women: CPM undefined, base kept
    choice, why = choose({BASE: _s(None), GLOBAL: _s(None)}, 0.0)
    assert choice == BASE and "undefined" in why


def test_candidate_names_are_checked() -> None:
    assert parse_candidates("") == NAMES
    assert parse_candidates("global-tuned, global") == (BASE, GLOBAL, "global-tuned")
    with pytest.raises(ValueError, match=r"unknown candidate 'globl'.*valid: base"):
        parse_candidates("globl")
    cfg = one_site_config(Path("/nonexistent"), select=True, select_candidates="x")
    with pytest.raises(ConfigError, match="select_candidates: unknown candidate 'x'"):
        DetectorTrainer(SITE, Path("/tmp/never"), cfg, data_dir=Path("/tmp"))


def test_a_candidate_the_run_cannot_build_is_refused(tmp_path: Path) -> None:
    cfg = one_site_config(tmp_path, select=True, select_candidates="personalized")
    with pytest.raises(ConfigError, match=r"'personalized'.*personalization is off"):
        DetectorTrainer(SITE, tmp_path / "state", cfg, data_dir=tmp_path)
    cfg = one_site_config(
        tmp_path, select=True, select_candidates="base-tuned", select_head_epochs=0
    )
    with pytest.raises(ConfigError, match="select_head_epochs is 0"):
        DetectorTrainer(SITE, tmp_path / "state", cfg, data_dir=tmp_path)


# --- choosing on real scores --------------------------------------------------------
def _zero_head(trainer: DetectorTrainer, shared: dict[str, np.ndarray]) -> dict:
    """``shared`` with every head tensor zeroed: a head that detects nothing."""
    heads = set(trainer.head_keys)
    return {k: np.zeros_like(v) if k in heads else v for k, v in shared.items()}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Round 1 from a fresh model: the tuned base head finds the lesions."""
    root = tmp_path_factory.mktemp("tuned")
    cfg = _cfg(root, select_candidates="base-tuned")
    tr = _trainer(root, cfg)
    shared0 = tr.initial_shared()
    shared1, _ = tr.fit(shared0, _ins(cfg, 1))
    sel = tr.select(shared1, 1)
    head = SelectionStore(tr.state).load_adapted(BASE_TUNED)
    assert head is not None
    return {"root": root, "shared0": shared0, "sel": sel, "head": head}


def test_a_better_candidate_is_chosen_and_recorded(tuned: dict[str, Any]) -> None:
    sel = tuned["sel"]
    assert sel.choice == BASE_TUNED, sel
    base, best = sel.scores[BASE].value, sel.scores[BASE_TUNED].value
    assert base is not None and best is not None and best > base
    assert sel.validation["women"] == 2 and sel.validation["mass-lesions"] == 2
    state = SiteState(tuned["root"] / "state", SITE)
    assert Selection.read(state.dir / "selection.json") == sel


def test_a_deliberately_bad_candidate_is_not_chosen(
    tuned: dict[str, Any], tmp_path: Path
) -> None:
    """The site receives a good model first; the 'federated' one has no head."""
    cfg = _cfg(tmp_path, select_candidates="global,personalized")
    tr = _trainer(tmp_path, cfg)
    good = {
        **tuned["shared0"],
        **{k: v for k, v in tuned["head"].items() if k in tuned["shared0"]},
    }
    tr.fit(good, _ins(cfg, 1))  # the base: what it received first
    bad = _zero_head(tr, good)
    sel = tr.select(bad, 2)
    assert sel.scores[GLOBAL].value == 0.0
    base = sel.scores[BASE].value
    assert base is not None and base > 0.0
    assert sel.choice not in (GLOBAL, PERSONALIZED)
    assert sel.choice == BASE
    # evaluate reports the choice and scores the chosen (base) model
    m = tr.evaluate(bad, _ins(cfg, 2))
    assert m[SELECTED_MODEL] == NAMES.index(BASE)
    assert SELECTED_MODEL in tr.metric_names("evaluate")
    sd = tr.site_model_for(bad, 2).state_dict()
    base_arrays = SelectionStore(tr.state).load_base()
    assert base_arrays is not None
    for k, v in sd.items():
        assert np.array_equal(v.numpy(), base_arrays[k]), k


def test_fedbn_keeps_the_norm_layers_a_round_trained(tmp_path: Path) -> None:
    """Regression: tuning the personal head reset them to the server's defaults."""
    cfg = _cfg(tmp_path, select=False)
    tr = _trainer(tmp_path, cfg)
    fresh = tr.model.state_dict()
    nk = [k for k in norm_keys(tr.model) if fresh[k].is_floating_point()]
    defaults = {k: fresh[k].numpy().copy() for k in nk}
    tr.site_model.set_defaults(defaults, "test")
    tr.fit(tr.initial_shared(), _ins(cfg, 1))
    personal = tr.site_model.personal()
    assert personal is not None
    means = [k for k in nk if k.endswith("running_mean")]
    assert means
    moved = [k for k in means if not np.allclose(personal[k], defaults[k])]
    assert len(moved) == len(means)


def test_candidates_built_on_the_base_are_scored_once(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, rounds=2)
    tr = _trainer(tmp_path, cfg)
    selector = tr.selector
    assert selector is not None
    scored: list[int] = []
    score = selector.evaluate

    def counting(model: Any, view: Any) -> Any:
        scored.append(1)
        return score(model, view)

    selector.evaluate = counting
    shared1, _ = tr.fit(tr.initial_shared(), _ins(cfg, 1))
    first = tr.select(shared1, 1)
    # round 1 of 2: every candidate but the final round's
    assert set(first.scores) == {
        BASE, GLOBAL, PERSONALIZED, "base-site-stats", BASE_TUNED
    }  # fmt: skip
    assert len(scored) == 5
    shared2, _ = tr.fit(shared1, _ins(cfg, 2))
    last = tr.select(shared2, 2)
    # the final round adds the adapted global candidates; the base ones are
    # the same models on the same women, so their scores are kept
    assert set(last.scores) == set(first.scores) | {"global-site-stats", "global-tuned"}
    assert len(scored) == 5 + 4
    for name in (BASE, "base-site-stats", BASE_TUNED):
        assert last.scores[name] == first.scores[name]
    assert tr.select(shared2, 2) == last and len(scored) == 9  # recorded, not redone


# --- persistence and export ------------------------------------------------------
def _run_with_checkpoints(root: Path, cfg: FederationConfig) -> dict[str, Any]:
    tr = _trainer(root, cfg)
    shared0 = tr.initial_shared()
    shared1, metrics = tr.fit(shared0, _ins(cfg, 1))
    tr.evaluate(shared1, _ins(cfg, 1))  # the site chooses here
    tr.state.record_round(1, "train", dict(metrics))
    assert cfg.run_dir is not None
    store = CheckpointStore(cfg.run_dir / "checkpoints")
    store.save(0, shared0, config=config_to_dict(cfg))
    store.save(1, shared1, config=config_to_dict(cfg))
    return {"trainer": tr, "shared": shared1, "ckdir": store.dir}


def _exported(ckdir: Path, out: Path, state_dir: Path) -> dict[str, torch.Tensor]:
    export_model(ckdir, out, site=SITE, state_dir=state_dir)
    return load_checkpoint(out).state_dict


@pytest.mark.parametrize("choice", [BASE, PERSONALIZED, BASE_TUNED, "global-tuned"])
def test_export_composes_the_choice_the_site_recorded(
    tmp_path: Path, choice: str
) -> None:
    cfg = _cfg(tmp_path, rounds=1)
    run = _run_with_checkpoints(tmp_path, cfg)
    tr: DetectorTrainer = run["trainer"]
    store = SelectionStore(tr.state)
    sel = store.read()
    assert sel is not None and sel.round == 1
    store.write(dataclasses.replace(sel, choice=choice))  # force each choice
    sd = _exported(run["ckdir"], tmp_path / f"{choice}.pt", tmp_path / "state")
    want = compose_candidate(tr.site_model, run["shared"], choice, store).state_dict()
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    # and the parts are the stored ones
    base = store.load_base()
    assert base is not None
    head = next(k for k in tr.head_keys if k.endswith("weight"))
    body = next(k for k in tr.shared_keys if k not in set(tr.head_keys))
    if choice in (BASE, BASE_TUNED):
        assert np.array_equal(sd[body].numpy(), base[body])
    else:
        assert np.array_equal(sd[body].numpy(), run["shared"][body])
    if choice == PERSONALIZED:
        personal = tr.site_model.personal() or {}
        assert np.array_equal(sd[head].numpy(), personal[PERSONAL_HEAD_PREFIX + head])
    if choice in (BASE_TUNED, "global-tuned"):
        adapted = store.load_adapted(choice)
        assert adapted is not None
        assert np.array_equal(sd[head].numpy(), adapted[head])
    ck = load_checkpoint(tmp_path / f"{choice}.pt")
    assert ck.extra["export"]["selection"]["choice"] == choice


def test_the_choice_survives_a_new_trainer(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, rounds=1)
    run = _run_with_checkpoints(tmp_path, cfg)
    sel = SelectionStore(run["trainer"].state).read()
    again = _trainer(tmp_path, cfg)
    assert again.select(run["shared"], None) == sel  # read back, not remade
    assert again.select(run["shared"], 1) == sel


@pytest.mark.parametrize(
    ("edit", "field", "value"),
    [
        ({"choice": "../../etc/passwd"}, "choice", "'../../etc/passwd'"),
        ({"choice": 3}, "choice", "3"),
        ({"round": -1}, "round", "-1"),
        ({"round": True}, "round", "True"),
        ({"margin": "big"}, "margin", "'big'"),
        ({"shared_sha256": "x" * 64}, "shared_sha256", "'xxx"),
        ({"scores": {"base": {"mass": 7.0}}}, "scores.base.mass", "7.0"),
        ({"scores": {"evil": {}}}, "scores", "'evil'"),
        ({"format": "other/1"}, "format", "'other/1'"),
    ],
)
def test_a_hostile_choice_file_is_named_with_its_value(
    tmp_path: Path, edit: dict[str, Any], field: str, value: str
) -> None:
    state = SiteState(tmp_path / "state", SITE)
    good = Selection(1, BASE, "r", 0.0, "0" * 64, {BASE: _s(0.5)}, {"women": 1})
    doc = {**good.to_json(), **edit}
    path = state.dir / "selection.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SiteStateError) as exc:
        SelectionStore(state).read()
    msg = str(exc.value)
    assert str(path) in msg and f"'{field}'" in msg and value in msg, msg


def test_a_corrupt_choice_file_stops_the_export(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, rounds=1)
    run = _run_with_checkpoints(tmp_path, cfg)
    path = run["trainer"].state.dir / "selection.json"
    path.write_text("{not json")
    with pytest.raises(SiteStateError, match=rf"{path}: unreadable site model choice"):
        export_model(run["ckdir"], tmp_path / "o.pt", site=SITE)
    path.unlink()
    with pytest.raises(ExportError, match=rf"{path}: does not exist.*never recorded"):
        export_model(run["ckdir"], tmp_path / "o.pt", site=SITE)


def test_under_dp_the_choice_stays_on_the_site(tmp_path: Path) -> None:
    """docs/privacy.md: the choice is made on noiseless CPMs, so it is not sent."""
    private = _trainer(tmp_path / "dp", _cfg(tmp_path / "dp", dp=True))
    assert private.select_settings is not None
    assert SELECTED_MODEL not in private.metric_names("evaluate")
    plain = _trainer(tmp_path / "plain", _cfg(tmp_path / "plain"))
    assert SELECTED_MODEL in plain.metric_names("evaluate")
