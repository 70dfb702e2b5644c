"""The study's scenario is the demo's plus test-only women, nothing else.

The shipped base model (models/demo-base-h.pt) was trained on the demo's
site A, and every regime of the study trains on the demo's training women: a
drift between the two files would silently compare models trained on other
data. The larger test sets are what lets the study's intervals resolve.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from simulation.phantom import load_scenario
from simulation.phantom.generate import plan_site

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "simulation"


def test_study_is_the_demo_plus_test_only_women() -> None:
    demo = load_scenario(CONFIGS / "demo.yaml")
    study = load_scenario(CONFIGS / "study.yaml")
    same = dataclasses.replace(
        study,
        name=demo.name,
        sites=tuple(dataclasses.replace(s, extra_test_women=0) for s in study.sites),
    )
    assert same == demo
    for site in demo.sites:
        plans = plan_site(demo, site)
        assert plan_site(study, study.site(site.name))[: len(plans)] == plans


def test_study_test_sets_are_large_on_the_sites_it_compares() -> None:
    study = load_scenario(CONFIGS / "study.yaml")
    for site in study.sites:
        if site.role == "base":
            continue
        test_women = {p.woman for p in plan_site(study, site) if p.split == "test"}
        assert len(test_women) >= 60, site.name


#: the ``--cases`` pattern of each file's new women (Makefile targets)
CASES = {
    "study-confirm.yaml": r"-01[0-9]{3}$",
    "study-holdout.yaml": r"-03[0-9]{3}$",
    "study-holdout2.yaml": r"-04[0-9]{3}$",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_confirmation_shares_the_training_women_and_not_the_test_women(
    name: str,
) -> None:
    """The confirmation and the holdout score the study's models on women no
    other file draws: the same first women, new extra test women only."""
    study = load_scenario(CONFIGS / "study.yaml")
    confirm = load_scenario(CONFIGS / name)
    moved = dataclasses.replace(
        confirm,
        name=study.name,
        sites=tuple(
            dataclasses.replace(
                s,
                extra_test_from=0,
                extra_test_women=study.site(s.name).extra_test_women,
            )
            for s in confirm.sites
        ),
    )
    assert moved == study
    others = [
        load_scenario(p) for p in sorted(CONFIGS.glob("study*.yaml")) if p.name != name
    ]
    for site in study.sites:
        new = plan_site(confirm, confirm.site(site.name))
        first = [p for p in plan_site(study, site) if p.woman < site.women]
        assert [p for p in new if p.woman < site.women] == first
        extra_new = {p.patient_id for p in new if p.woman >= site.women}
        assert len(extra_new) == confirm.site(site.name).extra_test_women
        for other in others:
            extra_other = {
                p.patient_id
                for p in plan_site(other, other.site(site.name))
                if p.woman >= site.women
            }
            assert not extra_other & extra_new, (site.name, other.name)
        if site.role != "base":
            assert extra_new and all(
                p.split == "test" for p in new if p.woman >= site.women
            )
        # the Makefile's --cases pattern picks out exactly the new women
        pattern = re.compile(CASES[name])
        assert {p.patient_id for p in new if pattern.search(p.patient_id)} == extra_new
