from __future__ import annotations

import json
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
from common.config.loader import check_bounds, check_plain_name, plain_name
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
    for text in ("", "\n", "# only a comment\n", "---\n"):
        p = _write(tmp_path, text)
        with pytest.raises(ConfigError, match="holds no settings") as info:
            load_config(p, Outer)
        assert str(p) in str(info.value)


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


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name: x\ninner: {lr: .nan}\n", "inner.lr"),
        ("name: x\ninner: {lr: .inf}\n", "inner.lr"),
        ("name: x\ninner: {lr: -.inf}\n", "inner.lr"),
        ("name: x\nextra: {a: .nan}\n", "extra.a"),
        ("name: x\nextra: {a: 1" + "0" * 400 + "}\n", "extra.a"),
    ],
)
def test_non_finite_floats_are_refused(tmp_path: Path, text: str, key: str) -> None:
    # NaN passes both ``v < lo`` and ``v > hi``: it must be refused before them.
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"cfg.yaml: {key}: must be a finite"):
        load_config(p, Outer)


def test_check_bounds_refuses_nan() -> None:
    with pytest.raises(ConfigError, match="lr: must be a finite number, got nan"):
        check_bounds(Inner, "lr", float("nan"), "server", "lr")


@pytest.mark.parametrize(
    ("loader", "text", "key"),
    [
        ("site", "working_spacing_mm: .nan\n", "working_spacing_mm"),
        ("site", "decode_timeout_s: .inf\n", "decode_timeout_s"),
        ("site", "adapt: {unsup_weight: .nan}\n", "adapt.unsup_weight"),
        ("fed", "trainer: {learning_rate: .nan}\n", "trainer.learning_rate"),
        (
            "fed",
            "validation: {max_relative_update_norm: .nan}\n",
            "validation.max_relative_update_norm",
        ),
        ("fed", "validation: {clip_factor: .inf}\n", "validation.clip_factor"),
        (
            "fed",
            "participation: {fraction_train: .nan}\n",
            "participation.fraction_train",
        ),
    ],
)
def test_shipped_config_classes_refuse_non_finite(
    tmp_path: Path, loader: str, text: str, key: str
) -> None:
    from common.config.site import load_site_config
    from common.wire.federation import load_federation_config

    load = load_site_config if loader == "site" else load_federation_config
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(p)
    assert str(p) in str(exc.value)
    assert key in str(exc.value)
    assert "must be a finite number" in str(exc.value)


def _bomb(levels: int = 9) -> str:
    """A "billion laughs" document: ``levels`` nested lists of 9 aliases each."""
    lines = ["  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "name: x\nbogus:\n" + "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_expansion(tmp_path: Path) -> None:
    # Under an unknown key so that, without the alias check, the load ends fast
    # with "unknown key" instead of expanding 9**9 items.
    p = _write(tmp_path, _bomb())
    with pytest.raises(ConfigError, match=r"cfg.yaml: <file>: .*alias \*a0"):
        load_config(p, Outer)
    p = _write(tmp_path, "name: &n x\ninner: {mode: *n}\n")
    with pytest.raises(ConfigError, match="aliases are not allowed"):
        load_config(p, Outer)


def test_long_values_are_shortened_in_errors(tmp_path: Path) -> None:
    p = _write(tmp_path, "name: [" + "x" * 100_000 + "]\n")
    with pytest.raises(ConfigError, match="name: must be a string") as exc:
        load_config(p, Outer)
    assert len(str(exc.value)) < 500


def test_not_utf8_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "cfg.yaml"
    p.write_bytes(b"name: h\xf6spital\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: <file>: is not UTF-8"):
        load_config(p, Outer)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name: a\nname: b\n", "name"),
        ("name: x\ninner: {lr: 0.1, mode: a, lr: 0.2}\n", "inner.lr"),
        ("name: x\nextra:\n  1: 1.0\n  1: 2.0\n", "extra.1"),
    ],
)
def test_repeated_key_is_refused(tmp_path: Path, text: str, key: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"cfg.yaml: {key}: is given twice"):
        load_config(p, Outer)


def test_too_deep_or_too_long_is_a_config_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "name: x\nsizes: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(p, Outer)
    p = _write(tmp_path, "name: x\nrounds: " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, Outer)


@dataclass(frozen=True)
class Named:
    names: tuple[str, ...] = field(default=(), metadata=plain_name())


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "a/b", "/abs", "../up", "a\\b", " a", "a\x00b"]
)
def test_plain_name_refuses_path_like_names(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "cfg.yaml"
    p.write_text(f"names: [ok, {json.dumps(bad)}]\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: names: must be a plain"):
        load_config(p, Named)
    with pytest.raises(ValueError, match="plain name"):
        check_plain_name(bad)
    assert load_config(_write(tmp_path, "names: [A, site-2, b.c]\n"), Named).names == (
        "A",
        "site-2",
        "b.c",
    )


# --- --set KEY=VALUE (apply_settings) -------------------------------------------


def test_parse_setting_reads_the_value_as_yaml():
    from common.config.loader import parse_setting

    assert parse_setting("a.b=0") == (("a", "b"), 0)
    assert parse_setting("a=0.5") == (("a",), 0.5)
    assert parse_setting("a=true") == (("a",), True)
    assert parse_setting("a=null") == (("a",), None)
    assert parse_setting("a=[1, 2]") == (("a",), [1, 2])
    assert parse_setting("a=cosine") == (("a",), "cosine")
    assert parse_setting("a=x=y") == (("a",), "x=y")  # the first = splits
    # a float without a dot is a number (YAML 1.2), as in a config file
    assert parse_setting("a=1e-3") == (("a",), 0.001)
    assert parse_setting("a=-2E4") == (("a",), -20000.0)
    assert parse_setting("a=1e3x") == (("a",), "1e3x")


def test_a_float_without_a_dot_is_a_number_in_a_file(tmp_path):
    import yaml

    cfg = load_config(_write(tmp_path, "name: 1e3x\ninner: {lr: 5e-2}\n"), Outer)
    assert cfg.inner.lr == 0.05 and cfg.name == "1e3x"
    # plain PyYAML reads it as a string: the loader's own rule, not the default
    assert yaml.safe_load("lr: 5e-2") == {"lr": "5e-2"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.b", r"--set: a.b: expected KEY=VALUE"),
        ("=1", r"--set: '': expected a dotted path"),
        ("a..b=1", r"--set: 'a..b': expected a dotted path"),
        ("a b=1", r"--set: 'a b': expected a dotted path"),
        ("a=", r"--set: a: has no value \(write null to unset it\)"),
        ("a=[1, 2", r"--set: a: value is not valid YAML"),
        ("a=[&x 1, *x]", r"--set: a: value is not valid YAML: .*aliases are not"),
    ],
)
def test_parse_setting_refuses_what_it_cannot_read(text, message):
    from common.config.loader import parse_setting

    with pytest.raises(ConfigError, match=message):
        parse_setting(text)


def test_apply_settings_sets_nested_keys_and_validates_like_the_file(tmp_path):
    from common.config import apply_settings

    cfg = load_config(_write(tmp_path, "name: x\nextra: {k: 1.0}\n"), Outer)
    assert apply_settings(cfg, []) is cfg
    got = apply_settings(
        cfg, ["inner.lr=0.5", "inner.mode=b", "extra.j=2", "sizes=[4]", "rounds=7"]
    )
    assert got == Outer(
        name="x", rounds=7, inner=Inner(lr=0.5, mode="b"), sizes=(4,),
        extra={"k": 1.0, "j": 2.0},
    )  # fmt: skip
    assert cfg.inner.lr == 0.1  # the loaded config is not changed
    for settings, message in [
        (["inner.lr=2"], r"--set: inner.lr: must be <= 1"),
        (["inner.mode=c"], r"--set: inner.mode:"),
        (["inner.lrr=0.5"], r"--set: inner.lrr: unknown key"),
        (["rounds=many"], r"--set: rounds:"),
        (["rounds.x=1"], r"--set: rounds.x: rounds is 3, not a section"),
        (["rounds=2", "rounds=3"], r"--set: rounds: is set twice"),
        (["extra.j=.nan"], r"--set: extra.j"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_settings(cfg, settings)
    # a relative path set on the command line is the working directory's
    (tmp_path / "d").mkdir()
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert apply_settings(cfg, ["data=d"]).data == Path("d")
        with pytest.raises(ConfigError, match=r"--set: data: .*(exist|not found)"):
            apply_settings(cfg, ["data=missing"])
    finally:
        os.chdir(here)
