"""Same scenario and seed -> byte-identical files, for any worker count."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from simulation.phantom import Scenario, generate_scenario


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_any_workers(
    test_scenario: Scenario, generated: dict[str, Path], tmp_path: Path
) -> None:
    again = generate_scenario(
        test_scenario, tmp_path, workers=2, progress=False, sites=["A", "B"]
    )
    for site in ("A", "B"):
        first, second = _tree(generated[site]), _tree(again[site])
        assert first.keys() == second.keys()
        assert len([k for k in first if k.endswith(".dcm")]) == 4 * (
            test_scenario.site(site).women
        )
        for name in first:
            assert first[name] == second[name], f"{site}/{name} differs"


def test_rerun_is_idempotent_and_removes_stale_files(
    test_scenario: Scenario, tmp_path: Path
) -> None:
    out = generate_scenario(test_scenario, tmp_path, progress=False, sites=["B"])
    before = _tree(out["B"])
    stale = out["B"] / "PH-B-99999" / "L_CC.dcm"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    generate_scenario(test_scenario, tmp_path, progress=False, sites=["B"])
    assert not stale.exists()
    assert _tree(out["B"]) == before


def test_other_seed_other_bytes(test_scenario: Scenario, tmp_path: Path) -> None:
    a = generate_scenario(test_scenario, tmp_path / "a", progress=False, sites=["B"])
    other = dataclasses.replace(test_scenario, seed=test_scenario.seed + 1)
    b = generate_scenario(other, tmp_path / "b", progress=False, sites=["B"])
    ta, tb = _tree(a["B"]), _tree(b["B"])
    dcm = [k for k in ta if k.endswith(".dcm")]
    assert dcm and all(ta[k] != tb[k] for k in dcm)


def test_extra_test_women_keep_the_first_women_split_labels_and_bytes(
    test_scenario: Scenario, generated: dict[str, Path], tmp_path: Path
) -> None:
    from simulation.phantom.generate import plan_site

    site = test_scenario.site("B")
    bigger = dataclasses.replace(site, extra_test_women=2)
    more = dataclasses.replace(
        test_scenario,
        sites=tuple(bigger if s.name == "B" else s for s in test_scenario.sites),
    )
    before, after = plan_site(test_scenario, site), plan_site(more, bigger)
    assert after[: len(before)] == before  # same women, split and labels
    extra = after[len(before) :]
    assert len(extra) == 4 * 2 and {p.woman for p in extra} == {
        site.women,
        site.women + 1,
    }
    assert all(p.split == "test" and p.labeled for p in extra)
    out = generate_scenario(more, tmp_path, progress=False, sites=["B"])
    old, new = _tree(generated["B"]), _tree(out["B"])
    dcm = [k for k in old if k.endswith(".dcm")]
    assert all(new[k] == old[k] for k in dcm)  # the first women's files unchanged
    assert len([k for k in new if k.endswith(".dcm")]) == len(dcm) + 8
    split = (out["B"] / "split.csv").read_text()
    assert f"PH-B-{site.women + 1:05d},test" in split
