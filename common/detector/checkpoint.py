"""Self-describing detector checkpoints (local files only).

A checkpoint is a ``torch.save`` dict::

    format: "mammofed-detector/1"
    version: common.__version__ of the writer
    model_config: config_to_dict(ModelConfig)   # rebuilds the model exactly
    classes: list(common.keys.CLASSES)
    working_spacing_mm, image_mean, image_std   # copies, for humans and checks
    state_dict: model weights (CPU tensors)
    optimizer, ema, epoch, extra: optional, for resume

:func:`load_checkpoint` refuses anything that does not fit with
:class:`common.errors.CheckpointMismatch` naming the field and both values.
Files are read with ``torch.load(weights_only=True)``: a checkpoint is data,
never code. A pickle that holds any other object (a crafted file whose
``__reduce__`` would run a command) is refused with
:class:`common.errors.UnsafeCheckpoint` before anything in it is executed.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import __version__
from common.config import config_to_dict, from_mapping
from common.detector.model.config import ModelConfig
from common.errors import (
    CheckpointMismatch,
    ConfigError,
    UnsafeCheckpoint,
    one_line,
    shown,
)
from common.fileio import atomic_write
from common.keys import CLASSES

log = logging.getLogger(__name__)

FORMAT = "mammofed-detector/1"

#: Config fields that must agree for weights to be usable (others, such as
#: score_thresh or weights_path, only change inference or initialisation).
STRUCTURAL_FIELDS: tuple[str, ...] = (
    "arch",
    "norm",
    "fpn_channels",
    "head_convs",
    "num_classes",
    "image_mean",
    "image_std",
    "working_spacing_mm",
    "speck_channel",
    "contralateral",
)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: file it came from.
        model_config: the :class:`ModelConfig` the weights belong to.
        state_dict: model weights (CPU tensors).
        version: writer's ``common.__version__``.
        optimizer, ema: optional state dicts (resume); ``epoch`` last finished
            epoch (``-1`` if none); ``extra`` free-form JSON-like dict.
    """

    path: Path
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    version: str
    optimizer: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None
    epoch: int = -1
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _cpu_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in sd.items()}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: ModelConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    epoch: int = -1,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (+ optional resume state) atomically to ``path``."""
    out = Path(path)
    # weights_path only initialises a fresh model; the file may not exist where
    # the checkpoint is loaded, so it is kept as provenance in ``extra``.
    cfg_dict = config_to_dict(dataclasses.replace(cfg, weights_path=None))
    extra = dict(extra or {})
    if cfg.weights_path is not None:
        extra.setdefault("init_weights_path", str(cfg.weights_path))
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": __version__,
        "model_config": cfg_dict,
        "classes": list(CLASSES),
        "working_spacing_mm": cfg.working_spacing_mm,
        "image_mean": cfg.image_mean,
        "image_std": cfg.image_std,
        "state_dict": _cpu_state(model.state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "ema": _cpu_state(ema.state_dict()) if ema is not None else None,
        "epoch": int(epoch),
        "extra": extra,
    }
    atomic_write(out, lambda fh: torch.save(payload, fh), fsync=False)
    log.info("saved checkpoint %s (epoch %d)", out, epoch)
    return out


def _field(path: Path, payload: dict[str, Any], name: str) -> Any:
    if name not in payload:
        raise CheckpointMismatch(f"{path}: field {name!r} missing")
    return payload[name]


def _shown(value: Any) -> str:
    """``value`` for an error message: its type and a short repr."""
    return f"{type(value).__name__} {shown(value, 60)}"


def _tensors(path: Path, name: str, value: Any) -> dict[str, torch.Tensor]:
    """``value`` when it maps names to tensors, else :class:`CheckpointMismatch`."""
    if not isinstance(value, dict):
        raise CheckpointMismatch(
            f"{path}: field {name!r} must map names to tensors, got {_shown(value)}"
        )
    for key, tensor in value.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointMismatch(
                f"{path}: field {name!r}: entry {key!r} must be a tensor under a "
                f"name, got {_shown(tensor)}"
            )
        # a diverged run's weights load without complaint and then find
        # nothing (or everything): refuse them by name
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
            torch.isfinite(tensor).all()
        ):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointMismatch(
                f"{path}: field {name!r}: entry {key!r} holds {bad} non-finite "
                f"value(s) (NaN or inf) of {tensor.numel()}: the weights of a "
                "diverged run, not a model"
            )
    return value


def _optional_dict(path: Path, payload: dict[str, Any], name: str) -> Any:
    """``payload[name]`` when it is a dict or ``None`` (or absent), else raise."""
    value = payload.get(name)
    if value is not None and not isinstance(value, dict):
        raise CheckpointMismatch(
            f"{path}: field {name!r} must be a mapping, got {_shown(value)}"
        )
    return value


def _unpickler_reason(exc: BaseException) -> str:
    """The unpickler's own reason (``": WeightsUnpickler error: ..."``), or "".

    torch's message around it advises loading with ``weights_only=False``,
    which would run the file's code: never repeated to a user.
    """
    text = str(exc)
    at = text.find("WeightsUnpickler error:")
    if at < 0:
        return ""
    # the reason runs to the blank line before torch's closing advice
    lines = [x.strip() for x in text[at:].split("\n\nCheck the documentation")[0]
             .splitlines()]  # fmt: skip
    return ": " + " ".join(x for x in lines if x)


def load_checkpoint(
    path: str | Path, expected_cfg: ModelConfig | None = None
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` from a LOCAL file.

    Every field is type-checked: ``state_dict`` (and ``ema`` when present)
    map names to tensors, ``optimizer`` and ``extra`` are mappings or absent,
    ``epoch`` is an integer.

    Raises:
        UnsafeCheckpoint: the pickle holds objects other than tensors and
            plain containers (refused before any is built).
        CheckpointMismatch: not a file, not a mammofed checkpoint, other class
            names, a field of the wrong type, or (with ``expected_cfg``) a
            structural config field that differs; the message names the
            file, the field and the value.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointMismatch(f"{p}: checkpoint file does not exist")
    try:
        # weights_only: the unpickler admits tensors and plain containers only,
        # so a crafted file cannot run code here (``torch.load`` docs, "weights
        # only" unpickler); anything else is refused before a byte is used.
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a foreign object in the pickle
        raise UnsafeCheckpoint(
            f"{p}: refused: the file holds objects other than tensors and plain "
            f"containers (a crafted or foreign pickle, or not a checkpoint at "
            f"all){_unpickler_reason(exc)}"
        ) from exc
    except Exception as exc:  # corrupt or foreign file
        if p.stat().st_size == 0:
            what = "an empty file"
        elif not zipfile.is_zipfile(p):
            what = f"not the zip archive torch.save writes ({one_line(exc)})"
        else:
            what = one_line(exc)
        raise CheckpointMismatch(f"{p}: not a readable checkpoint: {what}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload)
        raise CheckpointMismatch(f"{p}: field 'format' is {got!r}, expected {FORMAT!r}")
    raw_classes = _field(p, payload, "classes")
    if not isinstance(raw_classes, list | tuple):
        raise CheckpointMismatch(
            f"{p}: field 'classes' must be a list of class names, got "
            f"{_shown(raw_classes)}"
        )
    classes = list(raw_classes)
    if classes != list(CLASSES):
        raise CheckpointMismatch(
            f"{p}: field 'classes' is {classes!r}, expected {list(CLASSES)!r}"
        )
    try:
        cfg = from_mapping(
            _field(p, payload, "model_config"),
            ModelConfig,
            source=str(p),
            prefix="model_config",
        )
    except ConfigError as exc:
        raise CheckpointMismatch(str(exc)) from exc
    # the top-level copies are what a person reads: one that disagrees with
    # the config the model is built from is a hand-edited or foreign file
    for name in ("working_spacing_mm", "image_mean", "image_std"):
        if name not in payload:
            continue
        copy, used = payload[name], getattr(cfg, name)
        same = (
            list(copy) == list(used)
            if isinstance(copy, list | tuple) and isinstance(used, list | tuple)
            else copy == used
        )
        if not same:
            raise CheckpointMismatch(
                f"{p}: field {name!r} is {_shown(copy)} but 'model_config.{name}' "
                f"is {used!r}: the copy and the config disagree"
            )
    if expected_cfg is not None:
        for name in STRUCTURAL_FIELDS:
            have, want = getattr(cfg, name), getattr(expected_cfg, name)
            if have != want:
                raise CheckpointMismatch(
                    f"{p}: field 'model_config.{name}' is {have!r} in the "
                    f"checkpoint but {want!r} is expected"
                )
    ema = payload.get("ema")
    epoch = payload.get("epoch", -1)
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise CheckpointMismatch(
            f"{p}: field 'epoch' must be an integer, got {_shown(epoch)}"
        )
    return Checkpoint(
        path=p,
        model_config=cfg,
        state_dict=_tensors(p, "state_dict", _field(p, payload, "state_dict")),
        version=str(payload.get("version", "")),
        optimizer=_optional_dict(p, payload, "optimizer"),
        ema=None if ema is None else _tensors(p, "ema", ema),
        epoch=epoch,
        extra=dict(_optional_dict(p, payload, "extra") or {}),
    )


def load_model(
    path: str | Path,
    expected_cfg: ModelConfig | None = None,
    *,
    use_ema: bool = False,
) -> tuple[nn.Module, Checkpoint]:
    """Build the detector recorded in a checkpoint and load its (or EMA) weights.

    The model is returned in eval mode on CPU. ``weights_path`` of the stored
    config is dropped (the checkpoint already holds the weights).

    Raises:
        CheckpointMismatch: as :func:`load_checkpoint`; with ``use_ema``, a
            checkpoint that holds no EMA weights (never the raw ones instead).
    """
    from common.detector.model.registry import build_detector

    ck = load_checkpoint(path, expected_cfg)
    if use_ema and ck.ema is None:
        raise CheckpointMismatch(
            f"{ck.path}: field 'ema' is empty: the checkpoint holds no EMA "
            "weights, so they cannot be used (--ema); leave --ema out to use "
            "its weights"
        )
    cfg = dataclasses.replace(ck.model_config, weights_path=None)
    try:
        model = build_detector(cfg)
    except ConfigError as exc:  # an arch this version has not registered
        raise CheckpointMismatch(
            f"{ck.path}: field 'model_config.{exc.key}': {exc.detail}"
        ) from exc
    state = ck.ema if use_ema and ck.ema is not None else ck.state_dict
    load_weights(model, state, ck.path, cfg.arch)
    model.eval()
    return model, ck


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str
) -> None:
    """Load ``state`` (read from checkpoint ``path``) into ``model``, every key.

    Raises:
        CheckpointMismatch: a key missing or unexpected (the first five named),
            or a tensor that does not fit its parameter (shape).
    """
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatch: one line per parameter
        lines = [x.strip() for x in str(exc).splitlines()[1:] if x.strip()]
        more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
        raise CheckpointMismatch(
            f"{path}: field 'state_dict' does not fit model {arch!r}: "
            f"{'; '.join(lines[:3]) or one_line(exc)}{more}"
        ) from exc
    if missing or unexpected:
        raise CheckpointMismatch(
            f"{path}: field 'state_dict' does not fit model "
            f"{arch!r}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def init_from_checkpoint(model: nn.Module, cfg: ModelConfig, path: str | Path) -> None:
    """Load a pretrained detector's weights from ``path`` into ``model`` (strict).

    Raises:
        CheckpointMismatch: not a mammofed checkpoint, a structural field of
            its model config differs from ``cfg`` (named with both values), or
            its weights do not fit.
    """
    ck = load_checkpoint(path, expected_cfg=cfg)
    load_weights(model, ck.state_dict, ck.path, cfg.arch)
    log.info("detector initialised from %s (%d tensors)", path, len(ck.state_dict))
