"""Generic, strict conversion of plain mappings into frozen dataclasses.

Rules (each violation raises :class:`common.errors.ConfigError` naming the source
file, the dotted key path and the offending value):

* unknown keys are errors; missing keys without a default are errors;
* types are checked: ``int``, ``float`` (ints accepted), ``bool``, ``str``,
  ``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``list[X]``,
  ``dict[str, X]``, ``pathlib.Path`` and nested dataclasses;
* ranges come from field metadata: ``field(metadata=bounded(lo, hi))``;
  ``float`` values must be finite (``.nan`` and ``.inf`` are refused);
* names used as one folder or file name are marked
  ``field(metadata=plain_name())``: not empty, not ``.`` or ``..``, no ``/``,
  backslash or NUL, no surrounding spaces;
* files must be UTF-8; YAML aliases (``*name``) and repeated keys are refused
  (aliases let a small file expand into a huge value, "billion laughs");
* values are shortened in error messages (:mod:`reprlib`);
* paths marked ``path_field(must_exist=True)`` must exist; relative paths are
  resolved against the config file's folder.

Command lines change a loaded config with :func:`apply_settings`
(``--set trainer.options.ssl_unsup_weight=0``): the value is read as YAML
(with the file's rules), the result is validated like the file, and what was
set is part of the resolved config written next to the results.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from common.errors import ConfigError, shown
from common.keys import RESOLVED_CONFIG_YAML

T = TypeVar("T")

_MIN = "min"
_MAX = "max"
_MUST_EXIST = "must_exist"
_PLAIN_NAME = "plain_name"


def bounded(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    """Field metadata for an inclusive numeric range ``lo <= value <= hi``."""
    return {_MIN: lo, _MAX: hi}


def path_field(must_exist: bool = True) -> dict[str, Any]:
    """Field metadata for a path that must (or need not) exist when loaded."""
    return {_MUST_EXIST: must_exist}


def plain_name() -> dict[str, Any]:
    """Field metadata for a name used as one folder or file name (a site name)."""
    return {_PLAIN_NAME: True}


def check_plain_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one plain folder or file name.

    Refused: empty, ``.``, ``..``, a ``/``, backslash or NUL anywhere (so no
    absolute path either), spaces around it.
    """
    if (
        not name
        or name in (".", "..")
        or any(c in name for c in "/\\\0")
        or name.strip() != name
    ):
        raise ValueError(
            "must be a plain name (not empty, '.' or '..'; no '/', '\\', NUL or "
            f"surrounding spaces), got {shown(name)}"
        )


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases.

    An alias repeats its anchor's value without copying it, so nine nested
    levels of nine aliases make a file of a few hundred bytes that every walk
    over the value (validation, ``repr``) expands a billion-fold. No config
    needs them; refused before anything is built.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"found alias *{event.anchor}: aliases are not allowed in config "
                "files (write the value out)",
                event.start_mark,
            )
        return super().compose_node(parent, index)


# YAML 1.1 (PyYAML) reads a float without a dot, ``1e-3``, as a string;
# YAML 1.2 and anyone writing a learning rate mean the number
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _check_unique_keys(
    loader: _ConfigLoader, node: yaml.Node, source: str, key: str
) -> None:
    """Raise ``ConfigError`` for a mapping key given twice anywhere in ``node``."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(loader, item, source, f"{key}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            name: Any = "<<"
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != (
                "tag:yaml.org,2002:merge"
            ):
                name = loader.construct_object(key_node)
                first = seen.setdefault(name, key_node)
                if first is not key_node:
                    raise ConfigError(
                        source,
                        _join(key, str(name)),
                        f"is given twice (lines {first.start_mark.line + 1} and "
                        f"{key_node.start_mark.line + 1})",
                    )
            _check_unique_keys(loader, value_node, source, _join(key, str(name)))


def _parse_yaml(text: str, source: str) -> Any:
    """The one YAML document in ``text``, read with :class:`_ConfigLoader`."""
    loader = _ConfigLoader(text)
    loader.name = source  # YAML error marks name the file
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(loader, node, source, "")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), "<file>", "does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(p), "<file>", f"is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    try:
        data = _parse_yaml(text, str(p))
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int too long
        raise ConfigError(str(p), "<file>", f"is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(str(p), "<file>", "is nested too deeply") from None
    if data is None:
        # an empty file (or comments only) is a mistake, not "all defaults":
        # a site would be named "site", a federation run on defaults
        raise ConfigError(
            str(p), "<file>", "holds no settings (empty, or comments only)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            str(p), "<root>", f"must be a mapping, got {type(data).__name__}"
        )
    return data


def load_config(path: str | Path, cls: type[T]) -> T:
    """Load a YAML file into the frozen dataclass ``cls``, validating everything."""
    p = Path(path)
    return from_mapping(load_yaml(p), cls, source=str(p), base_dir=p.resolve().parent)


def from_mapping(
    data: Mapping[str, Any],
    cls: type[T],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    prefix: str = "",
) -> T:
    """Convert ``data`` into the dataclass ``cls``; validate keys, types, ranges."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(
            source, prefix or "<root>", f"must be a mapping, got {shown(data)}"
        )
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(prefix, str(unknown[0]))
        raise ConfigError(
            source, key, f"unknown key (valid keys: {', '.join(sorted(fields))})"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if (
                f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                raise ConfigError(source, key, "is required but missing")
            continue
        value = _convert(data[name], hints[name], source, key, base_dir)
        _check_meta(value, f.metadata, source, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(source, prefix or "<root>", str(exc)) from exc


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_bounds(cls: type, name: str, value: Any, source: str, key: str) -> None:
    """Check ``value`` against the ``bounded`` range of field ``name`` of ``cls``.

    The range a config file's value must keep, applied to the same setting
    received another way (e.g. a server message); errors name ``source``,
    ``key`` and the value.

    Raises:
        ConfigError: ``value`` is outside the range.
        KeyError: ``cls`` has no field ``name`` (a programming error).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_meta(value, fields[name].metadata, source, key)


def _check_meta(value: Any, meta: Mapping[str, Any], source: str, key: str) -> None:
    if value is None:
        return
    lo, hi = meta.get(_MIN), meta.get(_MAX)
    values = value if isinstance(value, tuple | list) else (value,)
    for v in values:
        if isinstance(v, int | float) and not isinstance(v, bool):
            if isinstance(v, float) and not math.isfinite(v):  # NaN passes < and >
                raise ConfigError(source, key, f"must be a finite number, got {v!r}")
            if lo is not None and v < lo:
                raise ConfigError(source, key, f"must be >= {lo}, got {shown(v)}")
            if hi is not None and v > hi:
                raise ConfigError(source, key, f"must be <= {hi}, got {shown(v)}")
        if meta.get(_PLAIN_NAME) and isinstance(v, str):
            try:
                check_plain_name(v)
            except ValueError as exc:
                raise ConfigError(source, key, str(exc)) from None
    if meta.get(_MUST_EXIST) and isinstance(value, Path) and not value.exists():
        raise ConfigError(source, key, f"path does not exist: {shown(str(value))}")


#: scalar type -> (what a value may be, what the error says it must be).
_SCALARS: dict[Any, tuple[type | tuple[type, ...], str]] = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    str: (str, "a string"),
    Path: ((str, Path), "a path string"),
}


def _convert(value: Any, tp: Any, source: str, key: str, base_dir: Path | None) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # ``X | None``: X's own error names the inner key
            return _convert(value, options[0], source, key, base_dir)
        for arg in options:
            try:
                return _convert(value, arg, source, key, base_dir)
            except ConfigError:
                pass
        raise ConfigError(
            source, key, f"has the wrong type: {shown(value)} (expected {_name(tp)})"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                source,
                key,
                f"must be one of {', '.join(map(repr, args))}; got {shown(value)}",
            )
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_mapping(value, tp, source=source, base_dir=base_dir, prefix=key)
    if origin in (tuple, list) and not isinstance(value, list | tuple):
        raise ConfigError(source, key, f"must be a list, got {shown(value)}")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(
                _convert(v, args[0], source, f"{key}[{i}]", base_dir)
                for i, v in enumerate(value)
            )
        if len(args) != len(value):
            raise ConfigError(
                source, key, f"must have {len(args)} items, got {shown(value)}"
            )
        return tuple(
            _convert(v, a, source, f"{key}[{i}]", base_dir)
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is list:
        return [
            _convert(v, args[0], source, f"{key}[{i}]", base_dir)
            for i, v in enumerate(value)
        ]
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"must be a mapping, got {shown(value)}")
        kt, vt = args if args else (str, Any)
        return {
            _convert(k, kt, source, key, base_dir): _convert(
                v, vt, source, f"{key}.{k}", base_dir
            )
            for k, v in value.items()
        }
    if tp in _SCALARS:
        kinds, what = _SCALARS[tp]
        ok = isinstance(value, kinds) and (tp is bool or not isinstance(value, bool))
        if not ok:
            raise ConfigError(source, key, f"must be {what}, got {shown(value)}")
        if tp is float:
            try:
                number = float(value)
            except OverflowError:  # an int past the float range
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(
                    source, key, f"must be a finite number, got {shown(value)}"
                )
            return number
        if tp is Path:
            p = Path(value).expanduser()
            return base_dir / p if not p.is_absolute() and base_dir is not None else p
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported by the loader")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def config_to_dict(cfg: Any) -> Any:
    """YAML-safe form of a config dataclass (paths as str, tuples as lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {
            f.name: config_to_dict(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
        }
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def replace_validated(cfg: T, source: str, **changes: Any) -> T:
    """``cfg`` with ``changes`` applied and validated like a loaded file.

    :func:`dataclasses.replace` would skip the bounds, types and path checks of
    :func:`from_mapping`; this goes through them again (command-line flags
    that override a loaded config). ``source`` names where the changes came
    from in the error (e.g. ``"mammofed-sim train flags"``); relative paths
    are taken as given (relative to the working directory).

    Raises:
        ConfigError: a change names an unknown field or breaks a rule.
    """
    if not changes:
        return cfg
    data = config_to_dict(cfg)
    for key, value in changes.items():
        data[key] = config_to_dict(value)
    return from_mapping(data, type(cfg), source=source)


_SETTING_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_setting(text: str, source: str = "--set") -> tuple[tuple[str, ...], Any]:
    """``"a.b.c=VALUE"`` -> ``(("a", "b", "c"), value)``, ``VALUE`` read as YAML.

    ``VALUE`` follows a config file's rules (one document, no aliases):
    ``0`` is an int, ``0.5`` a float, ``true`` a bool, ``null`` none,
    ``[1, 2]`` a list, anything else a string.

    Raises:
        ConfigError: no ``=``, a key that is not dotted names, an empty value
            or one that is not valid YAML; the message names the setting.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(
            source,
            key or "<empty>",
            f"expected KEY=VALUE (e.g. trainer.options.ssl_unsup_weight=0), "
            f"got {shown(text)}",
        )
    if not _SETTING_KEY.fullmatch(key):
        raise ConfigError(
            source,
            shown(key),
            "expected a dotted path of names (letters, digits, _), e.g. "
            "trainer.options.ssl_unsup_weight",
        )
    if not raw.strip():
        raise ConfigError(source, key, "has no value (write null to unset it)")
    where = f"{source} {key}"
    try:
        value = _parse_yaml(raw, where)
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(source, key, f"value is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(source, key, "value is nested too deeply") from None
    return tuple(key.split(".")), value


def apply_settings(cfg: T, settings: Sequence[str], source: str = "--set") -> T:
    """``cfg`` with each ``KEY=VALUE`` of ``settings`` set, validated again.

    A key walks into nested sections (``trainer.options.ssl_unsup_weight``);
    a missing or empty (``null``) section on the way is created, so the
    validation that follows names a key no section has. Everything is checked
    as in a file (unknown keys, types, bounds); relative paths are taken as
    given (relative to the working directory, as :func:`replace_validated`).
    ``source`` names where the settings came from in errors.

    Raises:
        ConfigError: a setting that does not parse (:func:`parse_setting`),
            a key given twice, a key below a value that is not a section, or
            a result the config's rules refuse.
    """
    if not settings:
        return cfg
    data = config_to_dict(cfg)
    seen: set[tuple[str, ...]] = set()
    for text in settings:
        parts, value = parse_setting(text, source)
        key = ".".join(parts)
        if parts in seen:
            raise ConfigError(source, key, "is set twice")
        seen.add(parts)
        node = data
        for i, name in enumerate(parts[:-1]):
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    source,
                    key,
                    f"{'.'.join(parts[: i + 1])} is {shown(child)}, not a section "
                    "with keys",
                )
            node = child
        node[parts[-1]] = value
    return from_mapping(data, type(cfg), source=source)


def write_resolved(
    cfg: Any, out_dir: str | Path, name: str = RESOLVED_CONFIG_YAML
) -> Path:
    """Write the resolved config next to results; returns the file written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
