"""One recipe: a federated round of one site is a central epoch (same seed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from client.detector_trainer import DetectorOptions, make_detector_trainer
from client.local_training import train_central
from common.config.loader import from_mapping
from common.detector.recipe import Recipe, guarded_step
from common.wire.federation import FitInstructions, load_federation_config
from tests.conftest import REPO, make_site_cache


def _central(cache: Path, fed, seed: int) -> dict[str, torch.Tensor]:
    opts = from_mapping(dict(fed.trainer.options), DetectorOptions, source="test")
    model = train_central(
        [cache], opts, epochs=1, lr=fed.trainer.learning_rate,
        batch_size=fed.trainer.batch_size, seed=seed, device=torch.device("cpu"),
        label="central",
    )  # fmt: skip
    return model.state_dict()


def test_federated_round_equals_central_epoch(tmp_path: Path) -> None:
    cache = make_site_cache(tmp_path / "siteA")
    base = load_federation_config(REPO / "configs" / "federation" / "sim-test.yaml")
    # the model at the spacing make_site_cache ingested at (sim-test.yaml: 0.8 mm)
    options = {
        **base.trainer.options,
        "fewshot": False,
        "max_steps": 3,
        "working_spacing_mm": 0.4,
    }
    fed = dataclasses.replace(
        base, seed=7, trainer=dataclasses.replace(base.trainer, options=options)
    )
    trainer = make_detector_trainer("siteA", tmp_path / "state", fed, cache)
    start = trainer.initial_shared()
    # the ClientApp's call: trainer.fit(global arrays, the round's instructions)
    sent, metrics = trainer.fit(start, FitInstructions.from_federation(fed, 1))
    assert metrics["skipped-steps"] == 0
    central = _central(cache, fed, seed=7)
    assert set(sent) <= set(central)
    moved = [k for k in sent if not torch.equal(torch.as_tensor(start[k]), central[k])]
    assert moved, "training changed nothing"
    for k, v in sent.items():
        assert torch.equal(torch.as_tensor(v), central[k]), k
    # another seed draws other batches: the equality above is not a tautology
    other = _central(cache, fed, seed=8)
    assert any(not torch.equal(torch.as_tensor(v), other[k]) for k, v in sent.items())


def test_guarded_step_skips_non_finite() -> None:
    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = Recipe(lr=0.1).optimizer(model.parameters())
    params = list(model.parameters())
    opt.zero_grad(set_to_none=True)
    loss = model(torch.tensor([[float("inf"), 1.0]])).sum()
    assert not guarded_step(loss, opt, params, 10.0)
    assert all(map(torch.equal, before, model.parameters()))
    assert all(p.grad is None for p in params)
    opt.zero_grad(set_to_none=True)
    assert guarded_step(model(torch.ones(1, 2)).sum(), opt, params, 10.0)
    assert not all(map(torch.equal, before, model.parameters()))


def test_recipe_schedule() -> None:
    model = torch.nn.Linear(2, 1)
    constant = Recipe(lr=0.5)
    assert constant.scheduler(constant.optimizer(model.parameters()), 10) is None
    r = Recipe(lr=1.0, schedule="warmup_cosine", warmup_steps=2)
    opt = r.optimizer(model.parameters())
    sched = r.scheduler(opt, total_steps=6)
    assert sched is not None
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[3] < 1.0 and lrs[-1] < lrs[3]


@pytest.mark.parametrize(
    "fields", [{"schedule": "warmup_cosine", "warmup_steps": 2}, {"ema_decay": 0.99}]
)
def test_train_epochs_refuses_a_schedule_or_ema_it_would_not_run(fields) -> None:
    """The round/site-alone path is constant-rate, EMA-free: refused, not ignored."""
    from common.detector.recipe import train_epochs

    model = torch.nn.Linear(2, 1)
    recipe = Recipe(lr=0.1, **fields)
    with pytest.raises(ValueError, match=r"train_epochs \(site A\): recipe.schedule="):
        train_epochs(
            model, [], recipe, recipe.optimizer(model.parameters()), epochs=1,
            steps=1, seed=0, device=torch.device("cpu"), label="site A",
        )  # fmt: skip
