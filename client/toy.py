"""A small real trainer for the federation plumbing (tests, demos).

Model: two conv blocks with BatchNorm and a linear ``head`` (2 classes) on
``16 x 16`` one-channel images. Data: synthetic, generated per site from the
site name and the run seed; class 1 images carry a bright blob. Every site has
its own intensity gain/offset and noise level (a "vendor" feature shift), which
is what FedBN is meant to absorb.

Personalization: with ``local_norm`` every BatchNorm parameter and running
statistic stays on the site; with ``personal_head`` the ``head`` does. Integer
buffers (``num_batches_tracked``) are never shared. Personal arrays live in
:class:`client.state.SiteState` so a restarted client continues where it was.
"""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.state import SiteState
from client.trainer import Arrays, Metrics, register_trainer
from common.detector.model.toy import ToyNet, ToyOptions, toy_shared_keys
from common.keys import NUM_EXAMPLES, SKIPPED_STEPS, TRAIN_LOSS
from common.wire.federation import (
    ACCURACY,
    EVAL_LOSS,
    FederationConfig,
    FitInstructions,
    spec_of,
)

log = logging.getLogger(__name__)

IMAGE_SIZE = 16
TRAIN_METRICS: tuple[str, ...] = (NUM_EXAMPLES, TRAIN_LOSS, SKIPPED_STEPS)
EVAL_METRICS: tuple[str, ...] = (NUM_EXAMPLES, EVAL_LOSS, ACCURACY)


def site_seed(site: str, seed: int) -> int:
    """Deterministic per-site seed from the site name and the run seed."""
    return (zlib.crc32(site.encode()) ^ (seed * 7919)) & 0x7FFFFFFF


def synthetic_site_data(
    site: str, seed: int, n: int, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 1, 16, 16]`` and labels ``[n]`` for ``site``'s ``split``.

    The site's gain, offset and noise come from its name, so every split of a
    site shares its shift, and different sites differ.
    """
    base = site_seed(site, seed)
    shift = np.random.default_rng(base)
    gain = shift.uniform(0.6, 1.4)
    offset = shift.uniform(-0.2, 0.2)
    noise = shift.uniform(0.05, 0.15)
    rng = np.random.default_rng(base + (1 if split == "train" else 2))
    labels = rng.integers(0, 2, size=n)
    imgs = rng.normal(0.3, noise, size=(n, 1, IMAGE_SIZE, IMAGE_SIZE))
    for i in np.flatnonzero(labels):
        y, x = rng.integers(2, IMAGE_SIZE - 5, size=2)
        imgs[i, 0, y : y + 4, x : x + 4] += 0.6
    imgs = np.clip(imgs * gain + offset, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(imgs), torch.from_numpy(labels.astype(np.int64))


class ToyTrainer:
    """:class:`client.trainer.LocalTrainer` over :class:`ToyNet` and synthetic data.

    ``trainer.options``: :class:`common.detector.model.toy.ToyOptions`.
    """

    def __init__(
        self, site: str, state_dir: Path, fed_cfg: FederationConfig, **_: Any
    ) -> None:
        opts = ToyOptions.parse(fed_cfg.trainer.options)
        self.site = site
        self.seed = fed_cfg.seed
        self.personalization = fed_cfg.personalization
        self.state = SiteState(state_dir, site)
        torch.set_num_threads(opts.threads)
        torch.manual_seed(fed_cfg.seed)  # same initial model on every site
        self.model = ToyNet(opts.channels)
        self._initial = {
            k: v.detach().cpu().numpy().copy()
            for k, v in self.model.state_dict().items()
        }
        n = opts.num_examples
        self.train_x, self.train_y = synthetic_site_data(site, self.seed, n, "train")
        self.test_x, self.test_y = synthetic_site_data(
            site, self.seed, max(n // 2, 8), "test"
        )
        self._shared_keys = toy_shared_keys(
            self.model,
            local_norm=self.personalization.local_norm,
            personal_head=self.personalization.personal_head,
        )

    def shared_spec(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the shared arrays."""
        return spec_of({k: self._initial[k] for k in self._shared_keys})

    def metric_names(self, phase: str) -> tuple[str, ...]:
        """Metric names of ``train`` / ``evaluate`` replies."""
        return TRAIN_METRICS if phase == "train" else EVAL_METRICS

    def initial_shared(self) -> Arrays:
        """Shared arrays of the seeded initial model."""
        return {k: self._initial[k].copy() for k in self._shared_keys}

    # --- state -------------------------------------------------------------
    def _check_instructions(self, config: FitInstructions) -> None:
        config.check_split(self.personalization, f"site {self.site}")

    def _load(self, shared: Arrays) -> None:
        personal = self.state.load_personal() or {}
        full: dict[str, torch.Tensor] = {}
        for key, init in self._initial.items():
            if key in self._shared_keys:
                full[key] = torch.from_numpy(np.asarray(shared[key], dtype=init.dtype))
            elif key in personal:
                full[key] = torch.from_numpy(personal[key].astype(init.dtype))
            else:
                full[key] = torch.from_numpy(init.copy())
        self.model.load_state_dict(full)

    # --- protocol ------------------------------------------------------------
    def fit(self, shared: Arrays, config: FitInstructions) -> tuple[Arrays, Metrics]:
        """Local SGD for ``config.local_epochs`` epochs (+ FedProx term if mu > 0)."""
        self._check_instructions(config)
        self._load(shared)
        params = dict(self.model.named_parameters())
        global_params = {
            k: torch.from_numpy(np.asarray(shared[k])).clone()
            for k in self._shared_keys
            if k in params
        }
        opt = torch.optim.SGD(self.model.parameters(), lr=config.learning_rate)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(
            site_seed(self.site, self.seed) + config.server_round
        )
        n = len(self.train_y)
        self.model.train()
        total, count, skipped = 0.0, 0, 0
        for _ in range(config.local_epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                opt.zero_grad()
                loss = loss_fn(self.model(self.train_x[idx]), self.train_y[idx])
                if config.proximal_mu > 0:
                    prox = sum(
                        ((params[k] - g) ** 2).sum() for k, g in global_params.items()
                    )
                    loss = loss + (config.proximal_mu / 2.0) * prox
                if not torch.isfinite(loss):
                    skipped += 1
                    continue
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        arrays = {
            k: v.detach().cpu().numpy().copy()
            for k, v in self.model.state_dict().items()
        }
        self.state.save_personal(
            {k: v for k, v in arrays.items() if k not in self._shared_keys}
        )
        metrics: Metrics = {
            NUM_EXAMPLES: n,
            TRAIN_LOSS: total / count if count else math.nan,
            SKIPPED_STEPS: skipped,
        }
        return {k: arrays[k] for k in self._shared_keys}, metrics

    @torch.no_grad()
    def evaluate(self, shared: Arrays, config: FitInstructions) -> Metrics:
        """Loss and accuracy of global shared + personal state on the test split."""
        self._check_instructions(config)
        self._load(shared)
        self.model.eval()
        logits = self.model(self.test_x)
        loss = nn.functional.cross_entropy(logits, self.test_y)
        acc = (logits.argmax(1) == self.test_y).float().mean()
        return {
            NUM_EXAMPLES: len(self.test_y),
            EVAL_LOSS: float(loss),
            ACCURACY: float(acc),
        }


#: The ``toy`` trainer's registry factory (its ``data_dir`` and
#: ``adapt_overrides`` keywords are ignored).
build_toy = register_trainer("toy")(ToyTrainer)
