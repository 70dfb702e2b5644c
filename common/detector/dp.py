"""Patient-level DP-SGD for the lesion detector: one woman per microbatch.

Privacy unit: **one woman** (every image of hers at the site). The mechanism is
DP-SGD (Abadi et al. 2016) with Poisson sampling over the site's labeled
training women and an RDP accountant:

1. each step includes every woman independently with probability
   ``q = min(1, patients_per_step / n_patients)`` (an empty draw is still a
   step: it adds noise and is accounted);
2. for each sampled woman, the gradient of the detection loss over *her*
   images (one forward, train augmentation) is taken over every trainable
   parameter and its global L2 norm clipped to ``C`` (``max_grad_norm``;
   factor ``min(1, C / (norm + 1e-6))``, as Opacus does);
3. the clipped gradients are summed, Gaussian noise ``N(0, sigma^2 C^2)`` is
   added to every coordinate, the result is divided by the expected number of
   women per step ``q * n`` and the optimizer steps on it.

Why microbatches and not Opacus' per-sample hooks: torchvision's FCOS loss
couples the images of a batch (its classification loss is normalized by the
number of foreground locations of the whole batch, the transform pads the batch
to a common size), so hook-based per-sample gradients are not the gradients of
per-woman losses. Computing each woman's gradient in her own forward is exact
for any model. It also makes BatchNorm in train mode compatible: a forward only
ever sees one woman's images, so her gradient depends on her data alone.
BatchNorm *running statistics* are accumulated without noise, so they must
stay on the site (FedBN); the detector trainer refuses DP otherwise.

Opacus is used for accounting only: :class:`PrivacyAccountant` keeps the
``(noise_multiplier, sample_rate, steps)`` history of Opacus'
``RDPAccountant`` in ``<site state>/dp_accountant.json`` (written atomically),
so a restarted daemon continues the same budget, and
:func:`calibrate_noise` is Opacus' ``get_noise_multiplier``.

The noise and the Poisson draws come from generators seeded from the operating
system's entropy (``secrets``), never from the run's seed: the server knows
that seed, and noise it can regenerate protects nothing. Pass ``seed`` only in
tests.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.detector.recipe import targets_to_device
from common.errors import MammofedError, shown
from common.fileio import atomic_write_text
from common.imaging.data import item_targets

log = logging.getLogger(__name__)

#: The site's accountant file (``<state_dir>/<site>/``).
DP_ACCOUNTANT_JSON = "dp_accountant.json"
#: Accounting mechanism (Opacus' name).
MECHANISM = "rdp"
#: Added to the norm before the clip factor (Opacus' constant).
CLIP_EPS = 1e-6

#: ``loss_fn(model, images, targets) -> scalar Tensor`` of one woman's batch.
LossFn = Callable[[nn.Module, list[Tensor], list[dict[str, Any]]], Tensor]
#: ``regularizer(model) -> scalar Tensor``: a data-independent term (FedProx)
#: whose gradient is added after the noise (post-processing).
Regularizer = Callable[[nn.Module], Tensor]
#: One woman's microbatch: images FloatTensor[1, H_i, W_i] and their targets.
Batch = tuple[list[Tensor], list[dict[str, Any]]]
#: ``prepare(targets, device) -> targets`` the loss takes (boxes and labels on
#: the device for the detector).
PrepareTargets = Callable[[list[dict[str, Any]], torch.device], list[Any]]


class PrivacyError(MammofedError):
    """A DP setting that cannot be honoured (budget too small, bad state file)."""


# --- settings -------------------------------------------------------------------
@dataclass(frozen=True)
class DPSettings:
    """What a site promises: the target budget and the DP-SGD knobs.

    Attributes:
        target_epsilon: the site's total epsilon over every round it trains
            (across daemon restarts and runs that share its state dir).
        max_grad_norm: clipping bound ``C`` of each woman's gradient (L2 over
            every trainable parameter).
        patients_per_step: expected women per step (``q = k / n``).
        delta: target delta; ``0`` means :func:`default_delta` of the site's
            number of labeled training women.
    """

    target_epsilon: float = 8.0
    max_grad_norm: float = 1.0
    patients_per_step: int = 8
    delta: float = 0.0

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ValueError(
                f"target_epsilon: must be > 0, got {self.target_epsilon!r}"
            )
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: must be > 0, got {self.max_grad_norm!r}")
        if self.patients_per_step < 1:
            raise ValueError(
                f"patients_per_step: must be >= 1, got {self.patients_per_step!r}"
            )
        if not 0.0 <= self.delta < 1.0:
            raise ValueError(f"delta: must be in [0, 1), got {self.delta!r}")


def default_delta(n_patients: int) -> float:
    """``delta = 1 / n ** 1.1`` with ``n = max(n_patients, 2)``.

    Below ``1 / n`` as DP needs (a mechanism that publishes one random woman's
    data in full has ``delta = 1 / n``). A site with a single woman gets
    ``2 ** -1.1`` (about 0.47): no meaningful guarantee, and it is logged.
    """
    n = max(int(n_patients), 2)
    if n_patients < 10:
        log.warning(
            "DP: only %d training women: delta = %.3g is a weak guarantee",
            n_patients,
            n**-1.1,
        )
    return float(n**-1.1)


def sample_rate(patients_per_step: int, n_patients: int) -> float:
    """Poisson rate ``q = min(1, patients_per_step / n_patients)``."""
    if n_patients <= 0:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    return min(1.0, patients_per_step / n_patients)


def steps_per_epoch(n_patients: int, patients_per_step: int, max_steps: int = 0) -> int:
    """``ceil(n / k)`` steps (one expected pass over the women), capped."""
    steps = max(1, math.ceil(n_patients / patients_per_step))
    return min(steps, max_steps) if max_steps > 0 else steps


def poisson_sample(n: int, q: float, rng: np.random.Generator) -> list[int]:
    """Indices ``i < n`` each drawn independently with probability ``q``."""
    return [int(i) for i in np.flatnonzero(rng.random(n) < q)]


def patient_groups(view: Any) -> list[list[int]]:
    """Item indices of ``view`` grouped by woman (the target's ``patient_id``).

    Groups are ordered by patient id; targets are read without pixels where
    ``view`` offers ``target(i)`` (:func:`common.imaging.data.item_targets`).
    """
    by: dict[str, list[int]] = {}
    for i, t in enumerate(item_targets(view)):
        by.setdefault(str(t["patient_id"]), []).append(i)
    return [by[p] for p in sorted(by)]


# --- the DP-SGD step ------------------------------------------------------------
def detection_loss(
    model: nn.Module, images: list[Tensor], targets: list[dict[str, Any]]
) -> Tensor:
    """Sum of the detector's train-mode losses on one microbatch."""
    losses = model(images, targets)
    return sum(losses.values(), torch.zeros((), device=images[0].device))


def patient_gradient(
    model: nn.Module, params: Sequence[Tensor], batch: Batch, loss_fn: LossFn
) -> tuple[list[Tensor] | None, float]:
    """Gradient of one woman's loss w.r.t. ``params`` (``None`` if not finite).

    Parameters the loss does not use get a zero gradient. ``.grad`` fields are
    left alone.
    """
    images, targets = batch
    loss = loss_fn(model, list(images), list(targets)).float()
    value = float(loss.detach())
    if not math.isfinite(value):
        return None, value
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    out = [
        torch.zeros_like(p) if g is None else g.detach()
        for p, g in zip(params, grads, strict=True)
    ]
    return out, value


def clip_gradient_(grads: Sequence[Tensor], max_norm: float) -> float:
    """Scale ``grads`` in place to global L2 norm ``<= max_norm``; return the old norm.

    Factor ``min(1, max_norm / (norm + 1e-6))`` (Opacus' rule).
    """
    if not grads:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm(2) for g in grads])))
    if math.isfinite(norm):
        factor = min(1.0, max_norm / (norm + CLIP_EPS))
        if factor < 1.0:
            for g in grads:
                g.mul_(factor)
    return norm


@dataclass
class DPStepStats:
    """One DP-SGD step.

    Attributes:
        patients: women in the draw; losses: their losses (finite ones);
        skipped: women whose loss or gradient was not finite (contributed
        nothing); clipped: women whose gradient norm exceeded ``C``;
        max_norm: the largest gradient norm before clipping; images: images
        of the women in the draw.
    """

    patients: int = 0
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    clipped: int = 0
    max_norm: float = 0.0
    images: int = 0


def dp_sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    loss_fn: LossFn = detection_loss,
    generator: torch.Generator | None = None,
    regularizer: Regularizer | None = None,
) -> DPStepStats:
    """One DP-SGD step over ``batches`` (one per sampled woman; may be empty).

    Sets every trainable parameter's ``.grad`` to ``(sum_i clip_C(g_i) +
    N(0, sigma^2 C^2)) / expected_batch_size`` (plus the gradient of
    ``regularizer``, which sees no data) and calls ``optimizer.step()``. The
    model must already be in the mode it trains in (``model.train()``).
    """
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    params = [p for p in model.parameters() if p.requires_grad]
    summed = [torch.zeros_like(p) for p in params]
    stats = DPStepStats(patients=len(batches))
    for batch in batches:
        stats.images += len(batch[0])
        grads, loss = patient_gradient(model, params, batch, loss_fn)
        if grads is None:
            stats.skipped += 1
            log.warning("DP step: a woman's loss is not finite (%s); skipped", loss)
            continue
        norm = clip_gradient_(grads, max_grad_norm)
        if not math.isfinite(norm):
            stats.skipped += 1
            log.warning("DP step: a woman's gradient norm is not finite; skipped")
            continue
        stats.losses.append(loss)
        stats.clipped += int(norm > max_grad_norm)
        stats.max_norm = max(stats.max_norm, norm)
        for s, g in zip(summed, grads, strict=True):
            s.add_(g)
    std = float(noise_multiplier) * float(max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    for p, s in zip(params, summed, strict=True):
        if std > 0:
            z = torch.randn(
                s.shape, generator=generator, device=s.device, dtype=s.dtype
            )
            s.add_(z, alpha=std)
        p.grad = s.div_(float(expected_batch_size))
    if regularizer is not None:
        regularizer(model).backward()
    optimizer.step()
    return stats


# --- accounting -------------------------------------------------------------------
def _opacus_rdp(history: Sequence[tuple[float, float, int]]) -> Any:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Noise multiplier reaching ``(target_epsilon, delta)`` after ``steps`` steps.

    Opacus' ``get_noise_multiplier`` with its RDP accountant (the epsilon of
    the returned sigma is within 0.01 below the target).
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=MECHANISM,
            )
        )
    except ValueError as exc:
        raise PrivacyError(
            f"no noise multiplier reaches epsilon {target_epsilon} at delta "
            f"{delta:.3g} with sample rate {sample_rate:.3g} over {steps} steps: {exc}"
        ) from exc


@dataclass(frozen=True)
class DPPlan:
    """The noise a site committed to at its first DP round (kept on disk).

    Attributes:
        target_epsilon, delta: the budget the noise was calibrated for.
        noise_multiplier: sigma (noise std = sigma * max_grad_norm).
        sample_rate: ``q`` at planning time.
        planned_steps: ``num_rounds x steps per round`` at planning time.
        max_grad_norm, patients_per_step, n_patients: the settings then.
    """

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    max_grad_norm: float
    patients_per_step: int
    n_patients: int


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite JSON number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        out = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return out if math.isfinite(out) else None


def _count(value: Any, low: int) -> int | None:
    """``value`` when it is a JSON integer (not a bool) ``>= low``, else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    return value if ok else None


def _history_of(
    history: Any, damaged: Callable[[str], PrivacyError]
) -> list[tuple[float, float, int]]:
    """The accountant's ``history`` as ``(sigma, q, steps)`` tuples, checked.

    Each entry must be ``[noise_multiplier, sample_rate, steps]`` with a
    finite ``noise_multiplier > 0``, a finite ``sample_rate`` in ``(0, 1]``
    and an integer ``steps >= 0``: a NaN sigma would make every epsilon NaN
    (a NaN budget is never spent), and a coerced step count understates it.
    Raises ``damaged(detail)`` naming the entry index and the value.
    """
    if not isinstance(history, list):
        raise damaged(f"field 'history' must be a list, got {shown(history)}")
    out: list[tuple[float, float, int]] = []
    for i, entry in enumerate(history):
        where = f"history[{i}]"
        if not isinstance(entry, list) or len(entry) != 3:
            raise damaged(
                f"{where} must be [noise_multiplier, sample_rate, steps], "
                f"got {shown(entry)} (not a valid step)"
            )
        s, q, n = entry
        sigma, rate, steps = _finite(s), _finite(q), _count(n, 0)
        if sigma is None or not sigma > 0:
            why = f"noise multiplier must be a finite number > 0, got {shown(s)}"
        elif rate is None or not 0 < rate <= 1:
            why = f"sample rate must be a finite number in (0, 1], got {shown(q)}"
        elif steps is None:
            why = f"steps must be an integer >= 0, got {shown(n)}"
        else:
            out.append((sigma, rate, steps))
            continue
        raise damaged(f"{where} {why} (not a valid step)")
    return out


#: ``DPPlan`` field -> (integer?, lowest value, lowest excluded?, highest or None).
_PLAN_RANGES: dict[str, tuple[bool, float, bool, float | None]] = {
    "target_epsilon": (False, 0.0, True, None),
    "delta": (False, 0.0, True, 1.0),
    "noise_multiplier": (False, 0.0, True, None),
    "sample_rate": (False, 0.0, True, 1.0),
    "planned_steps": (True, 1, False, None),
    "max_grad_norm": (False, 0.0, True, None),
    "patients_per_step": (True, 1, False, None),
    "n_patients": (True, 1, False, None),
}


def _plan_of(plan: Any, damaged: Callable[[str], PrivacyError]) -> DPPlan | None:
    """The accountant's ``plan`` (``None`` when null), every field checked.

    An object with exactly :class:`DPPlan`'s fields: the integers real JSON
    integers, the others finite numbers (never bools or strings), each in its
    range (``delta`` and ``sample_rate`` at most 1, the rest positive).
    Raises ``damaged(detail)`` naming the field and the value.
    """
    if plan is None:
        return None
    if not isinstance(plan, dict):
        raise damaged(f"field 'plan' must be an object or null, got {shown(plan)}")
    unknown = sorted(str(k) for k in set(plan) - set(_PLAN_RANGES))
    missing = [k for k in _PLAN_RANGES if k not in plan]
    if unknown or missing:
        raise damaged(
            f"field 'plan' has unknown fields {shown(unknown)} and lacks "
            f"{shown(missing)}"
        )
    values: dict[str, Any] = {}
    for key, (integer, low, open_low, high) in _PLAN_RANGES.items():
        raw = plan[key]
        value: float | int | None = _count(raw, int(low)) if integer else _finite(raw)
        if value is not None and not integer:
            above = value > low if open_low else value >= low
            value = value if above and (high is None or value <= high) else None
        if value is None:
            kind = "an integer" if integer else "a finite number"
            bound = f">= {int(low)}" if integer else f"> {low:g}"
            bound += f" and <= {high:g}" if high is not None else ""
            raise damaged(f"plan {key} must be {kind} {bound}, got {shown(raw)}")
        values[key] = value
    return DPPlan(**values)


class PrivacyAccountant:
    """One site's RDP accountant, persisted as JSON at ``path``.

    The file holds ``{"mechanism": "rdp", "history": [[sigma, q, steps],
    ...], "plan": DPPlan, "epsilon": spent, "rounds": [...]}``; ``history`` is
    exactly Opacus' ``RDPAccountant.history`` and :meth:`epsilon` is Opacus'
    ``get_epsilon`` of it. A missing file is an empty history.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.history: list[tuple[float, float, int]] = []
        self.plan: DPPlan | None = None
        self.rounds: list[dict[str, Any]] = []
        # Opacus' RDP of a subsampled Gaussian costs ~0.1-0.5 s per call on CPU
        self._memo: dict[tuple[Any, ...], float] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        """Read :attr:`path`, refusing anything :meth:`save` would not write.

        Every value is checked for its JSON type and range (never coerced: a
        ``"5"`` or a ``true`` is not a number, a ``0.9`` no step count), so a
        damaged file never understates the budget spent.

        Raises:
            PrivacyError: the file is unreadable, not JSON, nested too deeply,
                or a field is malformed; the message names the file, the
                field (``history[i] steps``...) and the value.
        """
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError, OverflowError) as exc:
            # ValueError: bad UTF-8, bad JSON, an integer past the digit limit
            what = "is nested too deeply" if isinstance(exc, RecursionError) else exc
            raise self._damaged(f"not readable JSON ({what})") from exc
        if not isinstance(data, dict):
            raise self._damaged(f"not a JSON object, got {type(data).__name__}")
        if data.get("mechanism") != MECHANISM:
            raise self._damaged(
                f"field 'mechanism' is {shown(data.get('mechanism'))}, "
                f"expected {MECHANISM!r}"
            )
        self.history = _history_of(data.get("history"), self._damaged)
        self.plan = _plan_of(data.get("plan"), self._damaged)
        rounds = data.get("rounds", [])
        if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
            raise self._damaged(
                f"field 'rounds' must be a list of objects, got {shown(rounds)}"
            )
        self.rounds = rounds

    def _damaged(self, detail: str) -> PrivacyError:
        """The error for a damaged accountant file: ``detail`` and what it costs."""
        return PrivacyError(
            f"{self.path}: {detail}; unreadable DP accountant: the spent budget "
            "is unknown, so this site cannot train under DP until it is fixed"
        )

    @property
    def steps(self) -> int:
        """Steps accounted so far."""
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, n: int = 1) -> None:
        """Account ``n`` steps at ``(noise_multiplier, sample_rate)``."""
        acc = _opacus_rdp(self.history)
        for _ in range(int(n)):
            acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        self.history = [(float(s), float(q), int(k)) for s, q, k in acc.history]

    def _epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        if not history:
            return 0.0
        key = (tuple(history), float(delta))
        if key not in self._memo:
            eps = _opacus_rdp(history).get_epsilon(delta=delta)
            self._memo[key] = float(eps)
        return self._memo[key]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        return self._epsilon(self.history, delta)

    def epsilon_after(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon if ``steps`` more steps at ``(sigma, q)`` were taken."""
        extra = [(noise_multiplier, sample_rate, int(steps))] if steps > 0 else []
        return self._epsilon(self.history + extra, delta)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to :attr:`path`."""
        delta = self.plan.delta if self.plan is not None else None
        return {
            "mechanism": MECHANISM,
            "history": [list(h) for h in self.history],
            "plan": asdict(self.plan) if self.plan is not None else None,
            "steps": self.steps,
            "epsilon": self.epsilon(delta) if delta is not None else 0.0,
            "rounds": self.rounds[-1000:],
        }

    def save(self) -> None:
        """Write the accountant atomically (fsynced)."""
        atomic_write_text(self.path, json.dumps(self.to_dict(), indent=1))


def read_accountant(site_state_dir: str | Path) -> dict[str, Any] | None:
    """Summary of a site's accountant (``None`` when it never trained under DP).

    ``{"epsilon", "delta", "target_epsilon", "noise_multiplier", "sample_rate",
    "steps", "n_patients"}``.
    """
    path = Path(site_state_dir) / DP_ACCOUNTANT_JSON
    if not path.is_file():
        return None
    acc = PrivacyAccountant(path)
    if acc.plan is None:
        return None
    p = acc.plan
    return {
        "epsilon": acc.epsilon(p.delta),
        "delta": p.delta,
        "target_epsilon": p.target_epsilon,
        "noise_multiplier": p.noise_multiplier,
        "sample_rate": p.sample_rate,
        "steps": acc.steps,
        "n_patients": p.n_patients,
    }


# --- one site's private rounds ---------------------------------------------------
@dataclass(frozen=True)
class DPRoundResult:
    """What :meth:`PatientDPSGD.run_round` did.

    Attributes:
        trained: ``False`` when the next round would exceed the budget (nothing
            was trained; ``reason`` says why).
        steps: DP-SGD steps taken; women: women drawn over all steps;
        images: their images; mean_loss: mean loss of the drawn women (NaN if
        none); skipped: women skipped for a non-finite loss or gradient;
        clipped: women whose gradient was clipped; epsilon: budget spent after
        the round; delta: its delta; expected_women: ``steps * q * n`` (the
        plan, not the draw); seconds: wall time.
    """

    trained: bool
    epsilon: float
    delta: float
    steps: int = 0
    women: int = 0
    images: int = 0
    mean_loss: float = float("nan")
    skipped: int = 0
    clipped: int = 0
    expected_women: float = 0.0
    seconds: float = 0.0
    reason: str = ""


class PatientDPSGD:
    """DP-SGD rounds of one site: Poisson draws of women, accounting, budget stop.

    Args:
        settings: target budget and DP-SGD knobs.
        state_dir: the site's own state folder (``SiteState.dir``); the
            accountant lives in ``state_dir / DP_ACCOUNTANT_JSON``.
        planned_rounds: rounds the noise is calibrated for (the run's
            ``num_rounds``); with ``steps`` per round the plan is
            ``planned_rounds * steps`` steps.
        device: where the model is.
        loss_fn: loss of one woman's microbatch (the detection loss).
        prepare: maps a microbatch's dataset targets to what ``loss_fn`` takes
            (default: boxes and labels on ``device``).
        seed: ``None`` (default) seeds noise and sampling from OS entropy;
            tests only may fix it.
    """

    def __init__(
        self,
        settings: DPSettings,
        state_dir: str | Path,
        *,
        planned_rounds: int,
        device: torch.device | str = "cpu",
        loss_fn: LossFn = detection_loss,
        prepare: PrepareTargets = targets_to_device,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.accountant_path = Path(state_dir) / DP_ACCOUNTANT_JSON
        self.planned_rounds = max(1, int(planned_rounds))
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        self.prepare = prepare
        s = secrets.randbits(63) if seed is None else int(seed)
        self._rng = np.random.default_rng(s)
        self._gen = torch.Generator(device=self.device).manual_seed(s)

    def accountant(self) -> PrivacyAccountant:
        """The site's accountant as stored now."""
        return PrivacyAccountant(self.accountant_path)

    def _plan(self, acc: PrivacyAccountant, n: int, q: float, steps: int) -> DPPlan:
        st = self.settings
        delta = st.delta or default_delta(n)
        if acc.plan is None:
            total = self.planned_rounds * steps
            sigma = calibrate_noise(st.target_epsilon, delta, q, total)
            acc.plan = DPPlan(
                target_epsilon=st.target_epsilon,
                delta=delta,
                noise_multiplier=sigma,
                sample_rate=q,
                planned_steps=total,
                max_grad_norm=st.max_grad_norm,
                patients_per_step=st.patients_per_step,
                n_patients=n,
            )
            log.info(
                "DP plan: epsilon %.3g at delta %.3g over %d steps (q = %.3g, "
                "%d women, C = %.3g): noise multiplier %.4g",
                st.target_epsilon, delta, total, q, n, st.max_grad_norm, sigma,
            )  # fmt: skip
        else:
            p = acc.plan
            if (p.target_epsilon, p.sample_rate, p.max_grad_norm) != (
                st.target_epsilon,
                q,
                st.max_grad_norm,
            ):
                log.warning(
                    "%s: settings differ from the stored DP plan (epsilon %g, q %.3g, "
                    "C %g); the plan's noise multiplier %.4g and delta %.3g are kept, "
                    "and the budget stop uses the configured epsilon %g",
                    self.accountant_path, p.target_epsilon, p.sample_rate,
                    p.max_grad_norm, p.noise_multiplier, p.delta, st.target_epsilon,
                )  # fmt: skip
        return acc.plan

    def run_round(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Any,
        *,
        epochs: int = 1,
        max_steps: int = 0,
        regularizer: Regularizer | None = None,
        label: str = "",
    ) -> DPRoundResult:
        """Train one round on ``dataset`` (items ``(image, target)``, one per image).

        ``epochs * steps_per_epoch(n, k, max_steps)`` steps, or none when they
        would take the spent epsilon above the target: then the model is left
        untouched and ``trained`` is ``False``. The accountant is saved after
        the round.
        """
        t0 = time.perf_counter()
        groups = patient_groups(dataset)
        n = len(groups)
        if n == 0:
            raise PrivacyError(f"{label}: no labeled training women for DP-SGD")
        st = self.settings
        q = sample_rate(st.patients_per_step, n)
        per_epoch = steps_per_epoch(n, st.patients_per_step, max_steps)
        steps = max(1, int(epochs)) * per_epoch
        acc = self.accountant()
        plan = self._plan(acc, n, q, steps)
        sigma, delta = plan.noise_multiplier, plan.delta
        spent = acc.epsilon(delta)
        after = acc.epsilon_after(delta, sigma, q, steps)
        if after > st.target_epsilon * (1.0 + 1e-9):
            reason = (
                f"DP budget: {steps} more steps would spend epsilon {after:.3f} > "
                f"target {st.target_epsilon:g} (spent {spent:.3f} at delta "
                f"{delta:.3g}); the site trains no more"
            )
            return DPRoundResult(
                trained=False,
                epsilon=spent,
                delta=delta,
                seconds=time.perf_counter() - t0,
                reason=reason,
            )
        model.train()
        expected = q * n
        done: list[DPStepStats] = []
        for _ in range(steps):
            chosen = poisson_sample(n, q, self._rng)
            batches = [self._batch(dataset, groups[j]) for j in chosen]
            s = dp_sgd_step(
                model,
                optimizer,
                batches,
                max_grad_norm=st.max_grad_norm,
                noise_multiplier=sigma,
                expected_batch_size=expected,
                loss_fn=self.loss_fn,
                generator=self._gen,
                regularizer=regularizer,
            )
            acc.step(sigma, q)
            done.append(s)
        eps = acc.epsilon(delta)
        acc.rounds.append({"label": label, "steps": steps, "epsilon": eps})
        acc.save()
        losses = [x for s in done for x in s.losses]
        r = DPRoundResult(
            trained=True,
            epsilon=eps,
            delta=delta,
            steps=steps,
            women=sum(s.patients for s in done),
            images=sum(s.images for s in done),
            mean_loss=float(np.mean(losses)) if losses else float("nan"),
            skipped=sum(s.skipped for s in done),
            clipped=sum(s.clipped for s in done),
            expected_women=steps * expected,
            seconds=time.perf_counter() - t0,
        )
        log.info(
            "%s DP round: %d steps, %d women drawn (%d clipped, %d skipped), "
            "epsilon %.3f of %g at delta %.3g (sigma %.4g, q %.3g)",
            label, steps, r.women, r.clipped, r.skipped, eps, st.target_epsilon,
            delta, sigma, q,
        )  # fmt: skip
        return r

    def _batch(self, dataset: Any, indices: Sequence[int]) -> Batch:
        items = [dataset[i] for i in indices]
        images = [im.to(self.device) for im, _ in items]
        targets = self.prepare([t for _, t in items], self.device)
        return images, list(targets)
