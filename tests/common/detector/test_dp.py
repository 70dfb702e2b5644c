"""Patient-level DP-SGD (common.detector.dp) and the personalized-dp regime."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from common.detector.dp import (
    DP_ACCOUNTANT_JSON,
    DPSettings,
    PatientDPSGD,
    PrivacyAccountant,
    calibrate_noise,
    clip_gradient_,
    default_delta,
    detection_loss,
    dp_sgd_step,
    patient_gradient,
)
from common.errors import ConfigError
from common.keys import (
    ARRAYS_KEY,
    DP_EPSILON,
    METRICS_KEY,
    NUM_EXAMPLES,
    SKIPPED_STEPS,
    TRAIN_LOSS,
)
from common.wire.federation import (
    METRIC_WHITELIST,
    FederationConfig,
    FitInstructions,
    ParticipationConfig,
    PersonalizationConfig,
    StrategyConfig,
    TrainerConfig,
    ValidationConfig,
)
from tests.conftest import REPO, make_site_cache

SITES = ["siteA", "siteB"]


# --- a tiny model whose loss is a plain function of one woman's images -----------
class TinyNet(nn.Module):
    """conv + BatchNorm + linear; ``model(images, targets)`` -> scalar loss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 1)

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]]) -> Tensor:
        x = torch.stack(images)
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        y = torch.stack([t["y"] for t in targets]).reshape(-1, 1)
        return ((self.fc(x) - y) ** 2).mean()


def tiny_loss(model: nn.Module, images: list[Tensor], targets: list[Any]) -> Tensor:
    return model(images, targets)  # type: ignore[no-any-return]


def women(n_images: list[int], seed: int = 0) -> list[tuple[list[Tensor], list[Any]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(n_images):
        ims = [torch.rand(1, 6, 6, generator=g) * (1 + 3 * k) for _ in range(n)]
        tg = [{"y": torch.tensor(5.0 * (k + 1))} for _ in range(n)]
        out.append((ims, tg))
    return out


class WomenDataset:
    """Items ``(image, target)``; ``target(i)["patient_id"]`` groups them."""

    def __init__(self, batches: list[tuple[list[Tensor], list[Any]]]) -> None:
        self.items = [
            (im, {**t, "patient_id": f"P{k}", "boxes": torch.zeros(0, 4)})
            for k, (ims, tg) in enumerate(batches)
            for im, t in zip(ims, tg, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        return self.items[i]

    def target(self, i: int) -> dict[str, Any]:
        return self.items[i][1]


def _clipped_by_hand(
    model: nn.Module, batch: tuple[list[Tensor], list[Any]], c: float
) -> list[Tensor]:
    m = copy.deepcopy(model)
    m.zero_grad()
    m(*batch).backward()
    grads = [p.grad.detach().clone() for p in m.parameters()]
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    return [g * min(1.0, c / (norm + 1e-6)) for g in grads]


def test_zero_noise_update_is_mean_scaled_sum_of_clipped_patient_gradients() -> None:
    torch.manual_seed(0)
    model = TinyNet().train()
    batches = women([1, 3, 2])
    norms = []
    for b in batches:
        grads = _clipped_by_hand(model, b, float("inf"))
        norms.append(math.sqrt(sum(float((g**2).sum()) for g in grads)))
    c = sorted(norms)[1]  # the largest woman is clipped, the smallest is not
    expected_bs = 2.5
    by_hand = [
        sum(gs)
        for gs in zip(*(_clipped_by_hand(model, b, c) for b in batches), strict=True)
    ]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = dp_sgd_step(
        model,
        opt,
        batches,
        max_grad_norm=c,
        noise_multiplier=0.0,
        expected_batch_size=expected_bs,
        loss_fn=tiny_loss,
    )
    assert stats.patients == 3 and stats.images == 6 and stats.skipped == 0
    assert stats.clipped == 1
    for p, b, g in zip(model.parameters(), before, by_hand, strict=True):
        torch.testing.assert_close(
            b - p.detach(), g / expected_bs, rtol=1e-5, atol=1e-7
        )


def test_every_patient_gradient_is_clipped_on_the_detector() -> None:
    from common.detector.model import ModelConfig, build_detector

    torch.manual_seed(0)
    model = build_detector(ModelConfig(arch="tiny", fpn_channels=16, head_convs=1))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    c = 1e-3
    g = torch.Generator().manual_seed(1)
    for n_images in (1, 2):
        images = [torch.rand(1, 64, 64, generator=g) for _ in range(n_images)]
        targets = [
            {
                "boxes": torch.tensor([[10.0, 12.0, 30.0, 34.0]]),
                "labels": torch.tensor([0]),
            }
            for _ in images
        ]
        grads, loss = patient_gradient(model, params, (images, targets), detection_loss)
        assert grads is not None and math.isfinite(loss)
        before = clip_gradient_(grads, c)
        after = math.sqrt(sum(float((x**2).sum()) for x in grads))
        assert before > c  # the bound was active
        assert after <= c * (1 + 1e-6)


def test_noise_has_the_right_standard_deviation_and_empty_draws_add_it() -> None:
    model = nn.Linear(1000, 1000, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sigma, c, bs = 1.5, 0.4, 2.0
    dp_sgd_step(
        model,
        opt,
        [],  # an empty Poisson draw: still a noisy step
        max_grad_norm=c,
        noise_multiplier=sigma,
        expected_batch_size=bs,
        loss_fn=tiny_loss,
        generator=torch.Generator().manual_seed(123),
    )
    noise = -model.weight.detach().double().flatten() * bs
    n = noise.numel()
    assert n == 1_000_000
    assert abs(float(noise.std()) / (sigma * c) - 1) < 0.01  # SE about 0.07 %
    assert abs(float(noise.mean())) < 5 * sigma * c / math.sqrt(n)


def test_accountant_matches_opacus_and_survives_on_disk(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    acc = PrivacyAccountant(tmp_path / DP_ACCOUNTANT_JSON)
    steps = [(1.1, 0.1)] * 3 + [(0.9, 0.25)] * 2 + [(1.1, 0.1)]
    for sigma, q in steps:
        ref.step(noise_multiplier=sigma, sample_rate=q)
        acc.step(sigma, q)
    delta = 1e-4
    assert acc.history == ref.history
    assert acc.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-12)
    acc.save()
    again = PrivacyAccountant(tmp_path / DP_ACCOUNTANT_JSON)
    assert again.history == ref.history and again.steps == 6
    assert again.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-12)
    # the budget an extra step would spend, without taking it
    ref.step(noise_multiplier=0.9, sample_rate=0.25)
    assert again.epsilon_after(delta, 0.9, 0.25, 1) == pytest.approx(
        ref.get_epsilon(delta), rel=1e-9
    )
    assert again.steps == 6


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[1]", "not a JSON object"),
        ('{"mechanism": "rdp", "history": [[NaN, 0.1, 5]]}', "not a valid step"),
        ('{"mechanism": "rdp", "history": [[1.0, 2.0, 5]]}', "not a valid step"),
        ('{"mechanism": "rdp", "history": [], "plan": {"bogus": 1}}', "bogus"),
        ("\udcff", "unreadable"),
    ],
    ids=["list", "nan-sigma", "rate-above-1", "plan-fields", "not-utf8"],
)
def test_a_malformed_accountant_is_refused_naming_it(
    tmp_path: Path, text: str, said: str
) -> None:
    """The spent budget must be known: a malformed file is a PrivacyError
    (the site stops training under DP), never a crash or a NaN epsilon that
    no budget check would ever stop."""
    from common.detector.dp import PrivacyError

    path = tmp_path / DP_ACCOUNTANT_JSON
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(PrivacyError, match="unreadable DP accountant") as err:
        PrivacyAccountant(path)
    assert str(path) in str(err.value) and said in str(err.value)


def test_calibrated_noise_reaches_the_target_and_delta_default() -> None:
    sigma = calibrate_noise(4.0, 1e-3, 0.2, 50)
    acc = PrivacyAccountant(Path("/nonexistent/dp.json"))
    acc.step(sigma, 0.2, 50)
    assert 3.98 <= acc.epsilon(1e-3) <= 4.0
    assert default_delta(100) == pytest.approx(100**-1.1)
    assert default_delta(1) == pytest.approx(2**-1.1)  # one woman: weak, logged


def test_budget_stop_and_restart_continue_the_same_budget(tmp_path: Path) -> None:
    data = WomenDataset(women([1, 2, 1, 3, 2, 1]))
    settings = DPSettings(target_epsilon=3.0, max_grad_norm=1.0, patients_per_step=2)

    def one_round(seed: int) -> tuple[Any, list[Tensor], list[Tensor]]:
        torch.manual_seed(0)
        model = TinyNet()
        # a new instance each round: what a restarted daemon does
        dp = PatientDPSGD(
            settings,
            tmp_path,
            planned_rounds=2,
            seed=seed,
            loss_fn=tiny_loss,
            prepare=lambda targets, device: targets,
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        r = dp.run_round(model, opt, data, epochs=1)
        return r, before, [p.detach().clone() for p in model.parameters()]

    r1, b1, a1 = one_round(1)
    assert r1.trained and r1.steps == 3 and 0 < r1.epsilon < 3.0
    assert any(not torch.equal(x, y) for x, y in zip(b1, a1, strict=True))
    r2, _, _ = one_round(2)
    assert r2.trained and r1.epsilon < r2.epsilon <= 3.0
    assert r2.epsilon >= 3.0 - 0.02  # the plan spends the whole budget
    acc = PrivacyAccountant(tmp_path / DP_ACCOUNTANT_JSON)
    assert acc.steps == 6 and acc.plan is not None
    assert acc.epsilon(acc.plan.delta) == pytest.approx(r2.epsilon)
    r3, b3, a3 = one_round(3)
    assert not r3.trained and "budget" in r3.reason
    assert r3.epsilon == pytest.approx(r2.epsilon)
    assert all(torch.equal(x, y) for x, y in zip(b3, a3, strict=True))
    assert PrivacyAccountant(tmp_path / DP_ACCOUNTANT_JSON).steps == 6


# --- the detector trainer under DP ---------------------------------------------
def dp_config(tmp_path: Path, **over: Any) -> FederationConfig:
    options: dict[str, Any] = {
        "arch": "tiny",
        "fpn_channels": 16,
        "head_convs": 1,
        "working_spacing_mm": 0.4,
        "max_steps": 2,
        "head_epochs": 1,
        "threads": 1,
        "cache_root": str(tmp_path / "cache"),
        "dp": True,
        "dp_epsilon": 4.0,
        "dp_patients_per_step": 2,
    }
    options.update(over.pop("options", {}))
    pers = over.pop("personalization", PersonalizationConfig(True, True))
    return FederationConfig(
        name="dp",
        num_rounds=over.pop("num_rounds", 2),
        seed=0,
        strategy=StrategyConfig(name="personalized"),
        participation=ParticipationConfig(
            min_train_nodes=2,
            # the synthetic sites have no calcification: CPM would be NaN
            fraction_evaluate=0.0,
            min_evaluate_nodes=0,
            min_available_nodes=2,
            wait_for_nodes_s=0.5,
        ),
        validation=ValidationConfig(max_relative_update_norm=50.0),
        trainer=TrainerConfig(
            name="detector",
            local_epochs=1,
            learning_rate=1e-3,
            batch_size=2,
            options=options,
        ),
        personalization=pers,
        sites=tuple(SITES),
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
    )


def test_batchnorm_without_local_norm_is_refused(tmp_path: Path) -> None:
    from client.detector_trainer import DetectorTrainer

    cache = make_site_cache(tmp_path / "cache" / "siteA", n_patients=3)
    cfg = dp_config(tmp_path, personalization=PersonalizationConfig(False, True))
    with pytest.raises(ConfigError) as err:
        DetectorTrainer("siteA", tmp_path / "state", cfg, cache)
    msg = str(err.value)
    for field in (
        "trainer.options.dp",
        "personalization.local_norm",
        "trainer.options.norm",
    ):
        assert field in msg
    # GroupNorm has no running statistics: allowed without FedBN
    group = dp_config(
        tmp_path,
        personalization=PersonalizationConfig(False, True),
        options={"norm": "group"},
    )
    DetectorTrainer("siteA", tmp_path / "state", group, cache)
    with pytest.raises(ConfigError, match="trainer.options.ssl"):
        DetectorTrainer(
            "siteA", tmp_path / "state", dp_config(tmp_path, options={"ssl": True})
        )


def test_dp_metric_only_when_dp_is_on(tmp_path: Path) -> None:
    from client.detector_trainer import TRAIN_METRICS, DetectorTrainer

    cache = make_site_cache(tmp_path / "cache" / "siteA", n_patients=3)
    on = DetectorTrainer("siteA", tmp_path / "s1", dp_config(tmp_path), cache)
    off = DetectorTrainer(
        "siteA", tmp_path / "s2", dp_config(tmp_path, options={"dp": False}), cache
    )
    assert on.metric_names("train") == (*TRAIN_METRICS, DP_EPSILON)
    assert off.metric_names("train") == TRAIN_METRICS
    assert DP_EPSILON in METRIC_WHITELIST
    assert on.metric_names("evaluate") == off.metric_names("evaluate")


def test_a_dp_round_that_drew_no_woman_keeps_nan_and_sends_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its loss is undefined: the site's history says NaN, never a made-up 0.

    (Poisson draws from OS entropy make this rare and unseeded in a real run;
    the federated test below met it in CI once.)"""
    from client.detector_trainer import DetectorTrainer
    from common.detector.dp import DPRoundResult, PatientDPSGD
    from common.keys import SKIPPED_STEPS, TRAIN_LOSS
    from common.wire.federation import FitInstructions

    def empty_round(self, *args: Any, **kwargs: Any) -> DPRoundResult:
        return DPRoundResult(trained=True, epsilon=0.5, delta=1e-3, steps=2)

    monkeypatch.setattr(PatientDPSGD, "run_round", empty_round)
    cfg = dp_config(tmp_path)
    cache = make_site_cache(tmp_path / "cache" / "siteA", n_patients=3)
    trainer = DetectorTrainer("siteA", tmp_path / "state", cfg, cache)
    shared = trainer.initial_shared()
    _, metrics = trainer.fit(shared, FitInstructions.from_federation(cfg, 1))
    assert metrics[TRAIN_LOSS] == 0.0 and metrics[SKIPPED_STEPS] == 0  # sent
    assert math.isnan(trainer.withheld[TRAIN_LOSS])  # kept on the site


def test_federated_dp_rounds_send_only_declared_arrays_and_whitelisted_metrics(
    tmp_path: Path,
) -> None:
    from flwr.app import MetricRecord, RecordDict
    from opacus.accountants import RDPAccountant

    from client.app import app
    from client.detector_trainer import DetectorTrainer
    from client.guard import check_reply
    from common.wire.federation import arrays_to_record
    from server.checkpoints import CheckpointStore
    from server.federation import run_federation
    from tests.conftest import LocalGrid, make_contexts

    for site in SITES:
        make_site_cache(tmp_path / "cache" / site, n_patients=4)
    cfg = dp_config(tmp_path)
    grid = LocalGrid(app, make_contexts(cfg, tmp_path / "state", SITES))
    t0 = time.perf_counter()
    run_federation(grid, cfg, tmp_path / "run")
    seconds = time.perf_counter() - t0
    spec = DetectorTrainer("siteA", tmp_path / "spec", cfg).shared_spec()
    trains = 0
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        assert set(content.keys()) <= {ARRAYS_KEY, METRICS_KEY}
        assert len(content.config_records) == 0
        if ARRAYS_KEY in content:
            assert {k: tuple(a.shape) for k, a in content[ARRAYS_KEY].items()} == spec
        metrics = content[METRICS_KEY]
        assert set(metrics) <= METRIC_WHITELIST
        if reply.metadata.message_type == "train":
            trains += 1
            assert DP_EPSILON in metrics
            # data-dependent statistics outside the guarantee are not sent
            assert metrics[TRAIN_LOSS] == 0.0 and metrics[SKIPPED_STEPS] == 0
    assert trains == 2 * len(SITES)
    # the server accepted every DP update (whitelist, uniform keys, norm bound)
    lines = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    for line in map(json.loads, lines):
        assert line["status"] == "aggregated" and not line["train"]["rejected"]
        assert all(DP_EPSILON in m for m in line["train"]["per_node"].values())
    # each site's accountant: on disk, Opacus' epsilon, within the target
    for site in SITES:
        acc = PrivacyAccountant(tmp_path / "state" / site / DP_ACCOUNTANT_JSON)
        assert acc.plan is not None and acc.steps == 2 * 2  # 2 rounds x max_steps
        ref = RDPAccountant()
        ref.history = list(acc.history)
        eps = ref.get_epsilon(acc.plan.delta)
        assert 0 < eps <= 4.0
        history = json.loads((tmp_path / "state" / site / "meta.json").read_text())[
            "history"
        ]
        sent = [h[DP_EPSILON] for h in history if h["phase"] == "train"]
        assert len(sent) == 2 and sent[0] < sent[1]
        # ... but kept, true, in the site's own history: a positive loss, or NaN
        # for a round whose Poisson draws (OS entropy) took no woman, never 0
        kept = [h[TRAIN_LOSS] for h in history if h["phase"] == "train"]
        assert all(x > 0 or math.isnan(x) for x in kept), kept
        assert sent[1] == pytest.approx(eps)
    # round 3 is beyond the plan: the site replies the global unchanged
    last = CheckpointStore(tmp_path / "run" / "checkpoints").latest()
    assert last is not None and last.round == 2
    trainer = DetectorTrainer("siteA", tmp_path / "state", cfg)
    out, metrics = trainer.fit(last.arrays, FitInstructions.from_federation(cfg, 3))
    assert set(metrics) == set(trainer.metric_names("train"))
    assert metrics[NUM_EXAMPLES] == 1
    for k, v in out.items():
        np.testing.assert_array_equal(v, last.arrays[k])
    check_reply(
        RecordDict(
            {ARRAYS_KEY: arrays_to_record(out), METRICS_KEY: MetricRecord(metrics)}
        ),
        site="siteA",
        shared_spec=trainer.shared_spec(),
        metric_names=trainer.metric_names("train"),
    )
    print(f"2 DP rounds, 2 sites: {seconds:.1f} s")


def test_run_study_personalized_dp_writes_the_dp_record(tmp_path: Path) -> None:
    from common.wire import runfolder as RF
    from simulation import regimes as R
    from simulation.report import write_report
    from simulation.run import RunRequest, run_study

    req = RunRequest(
        scenario=REPO / "configs" / "simulation" / "test.yaml",
        federation=REPO / "configs" / "federation" / "sim-test.yaml",
        out=tmp_path / "run",
        regimes=(R.PERSONALIZED_DP,),
        data=tmp_path / "data",
        workers=1,
        n_boot=0,
        dp_epsilon=6.0,
    )
    out = run_study(req)
    data = json.loads((out / R.PERSONALIZED_DP / RF.METRICS_JSON).read_text())
    assert data["regime"] == R.PERSONALIZED_DP and data["sites"]
    dp = data["dp"]
    assert dp["epsilon"] == 6.0 and 0 < dp["delta"] < 1
    assert set(dp["spent"]) == set(dp["sites"]) and dp["spent"]
    assert all(0 < e <= 6.0 for e in dp["spent"].values())
    assert json.loads((out / RF.RUN_JSON).read_text())["dp_epsilon"] == 6.0
    rows = [
        json.loads(x)
        for x in (out / R.PERSONALIZED_DP / RF.ROUNDS_JSONL).read_text().splitlines()
    ]
    assert any(DP_EPSILON in r for r in rows)
    md = write_report([out], tmp_path / "report").read_text()
    assert "personalized-dp: patient-level DP-SGD at epsilon 6" in md
