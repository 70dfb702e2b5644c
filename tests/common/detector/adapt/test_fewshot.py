from __future__ import annotations

import copy

import pytest
import torch

from common.detector.adapt.config import AdaptConfig
from common.detector.adapt.fewshot import (
    choose_head_only,
    fewshot_frozen_keys,
    finetune_head,
    frozen,
    grouped_folds,
)
from common.detector.model import Personalization, head_keys


def test_choose_head_only() -> None:
    cfg = AdaptConfig(fewshot_max_labeled=30)
    assert choose_head_only(29, cfg)
    assert not choose_head_only(30, cfg)
    assert not choose_head_only(5, AdaptConfig(head_only=False))
    assert choose_head_only(500, AdaptConfig(head_only=True))
    assert not choose_head_only(5, cfg, override=False)


def test_grouped_folds_keep_women_apart() -> None:
    pids = ["a", "a", "b", "c", "c", "c", "d"]
    folds = grouped_folds(pids, 3, seed=1)
    seen_val: list[int] = []
    for train, val in folds:
        assert not {pids[i] for i in train} & {pids[i] for i in val}
        seen_val += val
    assert sorted(seen_val) == list(range(len(pids)))
    with pytest.raises(ValueError):
        grouped_folds(pids, 5)


def test_frozen_key_set(tiny_model) -> None:
    keys = fewshot_frozen_keys(tiny_model, Personalization())
    head = set(head_keys(tiny_model))
    assert keys and not set(keys) & head
    assert set(keys) | head == set(tiny_model.state_dict())
    with frozen(tiny_model, keys) as trainable:
        names = {n for n, _ in tiny_model.named_parameters()}
        assert set(trainable) == names - set(keys)
        for n, p in tiny_model.named_parameters():
            assert p.requires_grad == (n not in keys)
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_head_only_freezes_exactly_the_shared_keys(tiny_model, toy) -> None:
    cfg = AdaptConfig(
        fewshot_max_epochs=2,
        fewshot_patience=1,
        fewshot_folds=2,
        fewshot_lr=0.01,
        fewshot_batch_size=3,
    )
    shared = fewshot_frozen_keys(tiny_model, Personalization())
    before = copy.deepcopy(tiny_model.state_dict())
    stats = finetune_head(tiny_model, toy, shared, cfg)
    assert stats.head_only and stats.n_patients == 3
    assert len(stats.fold_best_epochs) == 2 and stats.epochs >= 1
    after = tiny_model.state_dict()
    for k in shared:  # params and BN buffers of the shared layers
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in head_keys(tiny_model) if not torch.equal(before[k], after[k])]
    assert changed
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_fedbn_norms_train_in_head_only(tiny_model, toy) -> None:
    cfg = AdaptConfig(fewshot_max_epochs=1, fewshot_folds=2, fewshot_batch_size=3)
    pers = Personalization(local_norm=True)
    shared = fewshot_frozen_keys(tiny_model, pers)
    bn = "backbone.body.bn1.running_mean"
    assert bn not in shared
    before = tiny_model.state_dict()[bn].clone()
    finetune_head(tiny_model, toy, shared, cfg)
    assert not torch.equal(before, tiny_model.state_dict()[bn])


def test_full_finetune_moves_backbone(tiny_model, toy) -> None:
    cfg = AdaptConfig(
        fewshot_max_epochs=1, fewshot_folds=2, head_only=False, fewshot_batch_size=3
    )
    shared = fewshot_frozen_keys(tiny_model, Personalization())
    key = "backbone.body.conv1.weight"
    before = tiny_model.state_dict()[key].clone()
    stats = finetune_head(tiny_model, toy, shared, cfg)
    assert not stats.head_only and stats.frozen_params == 0
    assert not torch.equal(before, tiny_model.state_dict()[key])
