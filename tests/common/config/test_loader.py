from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from common.config import (
    bounded,
    config_to_dict,
    load_config,
    path_field,
    write_resolved,
)
from common.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    lr: float = field(default=0.1, metadata=bounded(0.0, 1.0))
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    rounds: int = field(default=3, metadata=bounded(1, 100))
    inner: Inner = field(default_factory=Inner)
    sizes: tuple[int, ...] = (1, 2)
    data: Path | None = field(default=None, metadata=path_field(must_exist=True))
    extra: dict[str, float] = field(default_factory=dict)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_valid_config_loads_with_defaults_and_nested(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    p = _write(tmp_path, "name: x\ninner: {lr: 0.5, mode: b}\nsizes: [3, 4]\ndata: d\n")
    cfg = load_config(p, Outer)
    assert cfg.name == "x" and cfg.rounds == 3
    assert cfg.inner == Inner(lr=0.5, mode="b")
    assert cfg.sizes == (3, 4)
    assert cfg.data == tmp_path / "d"
    out = write_resolved(cfg, tmp_path / "out")
    assert "lr: 0.5" in out.read_text()
    assert config_to_dict(cfg)["data"] == str(tmp_path / "d")


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        ("name: x\nroundz: 3\n", "roundz", "unknown key"),
        ("rounds: 3\n", "name", "required"),
        ("name: x\nrounds: three\n", "rounds", "'three'"),
        ("name: x\nrounds: 0\n", "rounds", ">= 1"),
        ("name: x\ninner: {lr: 2.0}\n", "inner.lr", "<= 1.0"),
        ("name: x\ninner: {mode: c}\n", "inner.mode", "'c'"),
        ("name: x\nsizes: [1, x]\n", "sizes[1]", "'x'"),
        ("name: x\ndata: nowhere\n", "data", "does not exist"),
        ("name: x\nrounds: true\n", "rounds", "True"),
        ("name: x\nextra: {a: z}\n", "extra.a", "'z'"),
    ],
)
def test_bad_values_name_file_key_and_value(
    tmp_path: Path, text: str, key: str, needle: str
) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(p, Outer)
    msg = str(exc.value)
    assert str(p) in msg
    assert f": {key}:" in msg
    assert needle in msg


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml", Outer)
    p = _write(tmp_path, "name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, Outer)
    p = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p, Outer)


@dataclass(frozen=True)
class Pair:
    pair: tuple[float, int] = (1.0, 2)


def test_fixed_length_tuple_converts_each_item_with_its_type(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "pair: [140, 3]\n"), Pair)
    assert cfg.pair == (140.0, 3)
    with pytest.raises(ConfigError, match=r"pair\[1\]"):
        load_config(_write(tmp_path, "pair: [1.0, 2.5]\n"), Pair)
    with pytest.raises(ConfigError, match="2 items"):
        load_config(_write(tmp_path, "pair: [1.0]\n"), Pair)
