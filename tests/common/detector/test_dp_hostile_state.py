"""A damaged DP accountant file is refused, never coerced into a smaller budget.

``PrivacyAccountant._load`` used to pass every value through ``float()`` /
``int()``: a step count of ``0.9`` became 0 steps (the budget spent was
understated), ``"5"`` became 5, ``true`` a sample rate of 1, a string of
rounds a list of its letters, and ``Infinity`` steps escaped as an
``OverflowError`` naming no file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from common.detector.dp import (
    DP_ACCOUNTANT_JSON,
    DPPlan,
    PrivacyAccountant,
    PrivacyError,
)

PLAN: dict[str, Any] = {
    "target_epsilon": 8.0,
    "delta": 0.01,
    "noise_multiplier": 1.1,
    "sample_rate": 0.1,
    "planned_steps": 9,
    "max_grad_norm": 1.0,
    "patients_per_step": 8,
    "n_patients": 20,
}


def _doc(**fields: Any) -> str:
    doc: dict[str, Any] = {"mechanism": "rdp", "history": [[1.0, 0.01, 3]]}
    doc.update(fields)
    return json.dumps(doc)


STEPS = "steps must be an integer >= 0, got"
SIGMA = "noise multiplier must be a finite number > 0, got"
RATE = "sample rate must be a finite number in (0, 1], got"
RDP = '{"mechanism": "rdp", "history": '
#: (id, file text, what the message must say after the file's name)
CASES: list[tuple[str, str, str]] = [
    ("steps-fraction", _doc(history=[[1.0, 0.01, 0.9]]), f"history[0] {STEPS} 0.9"),
    ("steps-string", _doc(history=[[1.0, 0.01, "5"]]), f"history[0] {STEPS} '5'"),
    (
        "steps-bool",
        _doc(history=[[1, 0.1, 2], [1, 0.1, True]]),
        f"history[1] {STEPS} True",
    ),
    ("steps-negative", _doc(history=[[1.0, 0.01, -1]]), f"history[0] {STEPS} -1"),
    ("steps-infinity", RDP + "[[1.0, 0.01, Infinity]]}", f"history[0] {STEPS} inf"),
    ("all-bools", _doc(history=[[True, True, True]]), f"history[0] {SIGMA} True"),
    ("sigma-string", _doc(history=[["1.0", 0.01, 3]]), f"history[0] {SIGMA} '1.0'"),
    ("sigma-overflow", RDP + "[[1e999, 0.01, 3]]}", f"history[0] {SIGMA} inf"),
    ("sigma-huge-int", RDP + "[[1" + "0" * 400 + ", 0.01, 3]]}", f"history[0] {SIGMA}"),
    ("rate-bool", _doc(history=[[1.0, True, 3]]), f"history[0] {RATE} True"),
    ("rate-zero", _doc(history=[[1.0, 0.0, 3]]), f"history[0] {RATE} 0.0"),
    ("short-entry", _doc(history=[[1.0, 0.01]]), "got [1.0, 0.01] (not a valid step)"),
    (
        "history-object",
        _doc(history={"a": 1}),
        "'history' must be a list, got {'a': 1}",
    ),
    ("history-missing", '{"mechanism": "rdp"}', "'history' must be a list, got None"),
    (
        "rounds-string",
        _doc(rounds="abc"),
        "'rounds' must be a list of objects, got 'abc'",
    ),
    ("rounds-numbers", _doc(rounds=[1, 2]), "'rounds' must be a list of objects"),
    ("plan-string", _doc(plan="yes"), "'plan' must be an object or null, got 'yes'"),
    (
        "plan-bool-int",
        _doc(plan={**PLAN, "planned_steps": True}),
        "plan planned_steps must be an integer >= 1, got True",
    ),
    (
        "plan-fraction-int",
        _doc(plan={**PLAN, "n_patients": 20.5}),
        "plan n_patients must be an integer >= 1, got 20.5",
    ),
    (
        "plan-string-float",
        _doc(plan={**PLAN, "noise_multiplier": "1.1"}),
        "plan noise_multiplier must be a finite number > 0, got '1.1'",
    ),
    (
        "plan-rate-above-1",
        _doc(plan={**PLAN, "sample_rate": 1.5}),
        "plan sample_rate must be a finite number > 0 and <= 1, got 1.5",
    ),
    (
        "plan-bool-float",
        _doc(plan={**PLAN, "delta": True}),
        "plan delta must be a finite number > 0 and <= 1, got True",
    ),
    (
        "plan-missing-field",
        _doc(plan={k: v for k, v in PLAN.items() if k != "delta"}),
        "lacks ['delta']",
    ),
    ("mechanism", _doc(mechanism="prv"), "field 'mechanism' is 'prv', expected 'rdp'"),
    ("deep", "[" * 100000 + "]" * 100000, "is nested too deeply"),
]


@pytest.mark.parametrize(
    ("text", "said"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_damaged_accountant_is_refused_naming_file_field_and_value(
    tmp_path: Path, text: str, said: str
) -> None:
    path = tmp_path / DP_ACCOUNTANT_JSON
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PrivacyError) as err:
        PrivacyAccountant(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert said in message
    assert "unreadable DP accountant" in message


def test_a_well_formed_accountant_still_loads_exactly(tmp_path: Path) -> None:
    """What :meth:`PrivacyAccountant.save` writes loads back unchanged."""
    path = tmp_path / DP_ACCOUNTANT_JSON
    acc = PrivacyAccountant(path)
    acc.plan = DPPlan(**PLAN)
    acc.history = [(1.1, 0.1, 4), (1.1, 0.1, 0)]
    acc.rounds = [{"label": "round 1", "steps": 4, "epsilon": 0.5}]
    acc.save()
    again = PrivacyAccountant(path)
    assert again.history == acc.history and again.steps == 4
    assert again.plan == acc.plan and again.rounds == acc.rounds
    # integers where floats are expected are JSON numbers all the same
    text = _doc(history=[[1, 1, 2]], plan={**PLAN, "target_epsilon": 8})
    path.write_text(text, encoding="utf-8")
    loaded = PrivacyAccountant(path)
    assert loaded.history == [(1.0, 1.0, 2)]
    assert loaded.plan is not None and loaded.plan.target_epsilon == 8.0


def test_plan_ranges_cover_every_plan_field() -> None:
    from common.detector.dp import _PLAN_RANGES

    assert list(_PLAN_RANGES) == [f.name for f in dataclasses.fields(DPPlan)]
