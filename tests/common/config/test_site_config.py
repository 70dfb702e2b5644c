"""Site config loading and its errors (file, key, value)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config.site import SiteConfig, load_site_config
from common.errors import ConfigError
from tests.conftest import REPO


def test_defaults_and_mias_words() -> None:
    c = SiteConfig()
    assert c.working_spacing_mm == 0.4 and c.default_spacing_mm is None
    assert [c.finding_kind(w) for w in ("CIRC", "spic", "MISC", "CALC")] == [
        "mass", "mass", "mass", "calcification",
    ]  # fmt: skip
    assert [c.finding_kind(w) for w in ("ARCH", "ASYM", "NORM")] == [
        "ignore",
        "ignore",
        "none",
    ]
    assert c.finding_kind("tumour") is None


@pytest.mark.parametrize("name", ["hospital-a.yaml", "mini-mias.yaml"])
def test_example_configs_load(name: str) -> None:
    c = load_site_config(REPO / "configs" / "sites" / name)
    assert c.name == name.removesuffix(".yaml")


def test_site_words_override_defaults(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nfindings: {ARCH: mass, Herd: mass}\n")
    c = load_site_config(p)
    assert c.finding_kind("arch") == "mass" and c.finding_kind("HERD") == "mass"
    assert c.finding_kind("calc") == "calcification"  # defaults kept


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("working_spacing_mm: -1\n", "working_spacing_mm", "-1"),
        ("working_spacing_mm: fine\n", "working_spacing_mm", "fine"),
        ("findings: {herd: tumour}\n", "findings.herd", "tumour"),
        ("progress_every: 0\n", "progress_every", "0"),
        ("workers: 0\n", "workers", "0"),
        ("wrokers: 2\n", "wrokers", ""),
        ("pixel_dtype: int8\n", "pixel_dtype", "int8"),
        ("name: 'a/b'\n", "<root>", "a/b"),
        ("name: '..'\n", "<root>", ".."),
        ("name: 'a\\b'\n", "<root>", "a"),
    ],
)
def test_bad_config_names_file_key_value(
    tmp_path: Path, text: str, key: str, value: str
) -> None:
    p = tmp_path / "site.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_site_config(p)
    msg = str(exc.value)
    assert str(p) in msg and key in msg and value in msg


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_site_config("/nonexistent/site.yaml")


@pytest.mark.parametrize("key", ["test_fraction", "split_seed"])
def test_split_keys_are_not_site_settings(tmp_path: Path, key: str) -> None:
    """The split is the federation's, recorded in the model (evaluate reads it)."""
    p = tmp_path / "site.yaml"
    p.write_text(f"name: x\n{key}: 1\n")
    with pytest.raises(ConfigError, match=f"{key}: unknown key") as exc:
        load_site_config(p)
    assert str(p) in str(exc.value)
