"""Model cards: what an exported model is, where it came from, how good it is.

Every exported model file ``M`` (a ``.pt`` checkpoint from ``mammofed-client
export`` or an ``.onnx`` graph from ``mammofed-client export-onnx`` /
``export --onnx``) gets two files beside it:

* ``M.card.json`` (:data:`CARD_FORMAT`): the files of the model with their
  SHA-256 (the model file first, then e.g. the ONNX preprocessing contract),
  the source checkpoint and its hash, the date, the software versions, what is
  known of the training (federation run, round, sites, images seen) and, when
  an evaluation folder is given, its CPM per class with the 95% bootstrap
  interval; anything not recorded anywhere reads :data:`UNKNOWN`, never a
  guess;
* ``M.card.md``: the same for people, with the intended use and the limits.

:func:`verify_card` re-hashes the files a card lists and raises
:class:`ModelIntegrityError` on any difference, so a file changed after export
is refused (the ONNX runner calls it before loading a graph).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from client.evaluate import METRICS_JSON
from client.export import EXTRA_EXPORT, EXTRA_STANDARDIZER, ExportError
from client.state import META_JSON
from common import __version__
from common.cli import package_version
from common.detector.checkpoint import Checkpoint
from common.errors import MammofedError
from common.fileio import (
    atomic_write_text,
    read_json_document,
    sha256_file,
)
from common.keys import CLASSES, NUM_EXAMPLES
from common.wire.runfolder import ROUNDS_JSONL, iter_round_rows

log = logging.getLogger(__name__)

#: ``extra`` key of a ``train-local`` checkpoint (:mod:`client.local_training`).
EXTRA_LOCAL_MODEL = "local_model"
CARD_FORMAT = "mammofed-model-card/1"
CARD_JSON_SUFFIX = ".card.json"
CARD_MD_SUFFIX = ".card.md"
#: The value of every card field that no file records.
UNKNOWN = "unknown"
#: Distributions whose versions a card records.
CARD_PACKAGES = ("mammofed", "torch", "torchvision", "flwr", "onnx", "onnxruntime")

INTENDED_USE = (
    "Research on federated detection of masses and calcification clusters in "
    "screening mammograms: candidate boxes with scores for a reader or a study "
    "to review, on images of the kind (vendor, view, processing) the model was "
    "trained and evaluated on. Not a medical device: not cleared for clinical "
    "use, and no output may be used for diagnosis or to decide care."
)
LIMITATIONS = (
    "Scores rank candidates; they are not calibrated probabilities of cancer.",
    "Quality is known only as far as the evaluation section states; vendors, "
    "views and populations outside the training sites are untested.",
    "Images must be prepared exactly as the preprocessing contract (or "
    "common.imaging.image_io.read_any) does: crop, flip to the left, resample to the "
    "working spacing; a standardizer, when present, belongs to one site.",
    "Boxes are axis-aligned rectangles in the stored pixels of the source "
    "file; a calcification box covers a cluster, not single specks.",
    "Architectural distortion and asymmetry are not detected.",
)


class ModelIntegrityError(MammofedError):
    """A model file that does not match its card (changed, missing, no card)."""


def card_paths(model_path: str | Path) -> tuple[Path, Path]:
    """``(M.card.json, M.card.md)`` of the model file ``M``."""
    p = Path(model_path)
    return p.with_name(p.name + CARD_JSON_SUFFIX), p.with_name(p.name + CARD_MD_SUFFIX)


def software_versions() -> dict[str, str]:
    """Installed versions of :data:`CARD_PACKAGES` (``absent`` if not installed)."""
    out = {"python": platform.python_version(), "common.__version__": __version__}
    return {**out, **{name: package_version(name) for name in CARD_PACKAGES}}


# --- training -----------------------------------------------------------------
def _read_file(path: Path, parse: Callable[[str], Any] = json.loads) -> Any:
    """``parse`` of the file's text, or ``None`` (logged) when it is unreadable."""
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.warning("%s: unreadable, left out of the model card: %s", path, exc)
        return None


def _count(row: object, key: str) -> int | None:
    """``row[key]`` when it is a count (an int >= 0), else ``None``."""
    value = row.get(key) if isinstance(row, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _federation_training(export: Mapping[str, Any]) -> dict[str, Any]:
    """What the export provenance, its round file, rounds.jsonl and the site say."""
    copied = ("run", "round", "kind", "strategy", "personalization", "head")
    out: dict[str, Any] = {
        "source": "federated run (mammofed-client export)",
        **{k: export.get(k, UNKNOWN) for k in copied},
        "sites": UNKNOWN,
        "nodes_per_round": UNKNOWN,
        "examples_last_round_per_node": UNKNOWN,
        "site": export.get("site") or UNKNOWN,
        "site_train_rounds": UNKNOWN,
        "site_images_seen": UNKNOWN,
    }
    round_file = export.get("round_file")
    rnd = export.get("round")
    if isinstance(round_file, str) and Path(round_file).is_file():
        meta = _read_file(Path(round_file))
        sites = meta.get("config", {}).get("sites") if isinstance(meta, dict) else None
        if sites:  # simulation names its sites; a deployment does not record them
            out["sites"] = list(sites)
        rounds_path = Path(round_file).parent.parent / ROUNDS_JSONL
        # a torn or edited line costs that line only (iter_round_rows)
        lines = [
            r
            for r in iter_round_rows(rounds_path)
            if isinstance(rnd, int) and r["round"] <= rnd
        ]
        valid = [v for r in lines if (v := _count(r.get("train"), "valid")) is not None]
        if valid:
            out["nodes_per_round"] = {"min": min(valid), "max": max(valid)}
            per_node = lines[-1].get("train", {}).get("per_node", {})
            per_node = per_node if isinstance(per_node, dict) else {}
            counts = sorted(
                n
                for m in per_node.values()
                if (n := _count(m, NUM_EXAMPLES)) is not None
            )
            if counts:
                out["examples_last_round_per_node"] = counts
    state_dir, site = export.get("state_dir"), export.get("site")
    if isinstance(state_dir, str) and isinstance(site, str):
        meta_path = Path(state_dir) / site / META_JSON
        meta = _read_file(meta_path) if meta_path.is_file() else None
        if isinstance(meta, dict):
            trains = [
                h
                for h in meta.get("history", [])
                if isinstance(h, dict)
                and h.get("phase") == "train"
                and (not isinstance(rnd, int) or int(h.get("round", 0)) <= rnd)
            ]
            if trains:
                out["site_train_rounds"] = len(trains)
                out["site_images_seen"] = sum(
                    int(h.get(NUM_EXAMPLES, 0)) for h in trains
                )
    return out


def _central_training(ck: Checkpoint) -> dict[str, Any]:
    """What a checkpoint of ``mammofed-sim train`` (or unknown origin) records."""
    out: dict[str, Any] = {
        "source": "checkpoint (not a federation export)",
        "epochs": ck.epoch + 1 if ck.epoch >= 0 else UNKNOWN,
        "train_config": ck.extra.get("train_config", UNKNOWN),
        "caches": UNKNOWN,
        "images": UNKNOWN,
    }
    cfg_path = ck.extra.get("train_config")
    if isinstance(cfg_path, str) and Path(cfg_path).is_file():
        cfg = _read_file(Path(cfg_path), yaml.safe_load)
        if isinstance(cfg, dict) and isinstance(cfg.get("caches"), list):
            out["caches"] = [str(c) for c in cfg["caches"]]
    return out


def _local_training(local: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``mammofed-client train-local`` checkpoint records (``local_model``)."""
    copied = (
        "site", "cache_dir", "init", "init_sha256", "epochs", "head_only",
        "seed", "learning_rate", "lr_factor", "batch_size",
    )  # fmt: skip
    return {
        "source": "site's own model (mammofed-client train-local)",
        **{k: local.get(k, UNKNOWN) for k in copied},
        # self-training (--pseudo-label-with): the models that labeled its
        # unlabeled women, the thresholds and the counts; None: not used
        "pseudo_labels": local.get("pseudo_labels"),
    }


def training_section(ck: Checkpoint) -> dict[str, Any]:
    """The card's ``training`` section from what the checkpoint and its run record."""
    export = ck.extra.get(EXTRA_EXPORT)
    if isinstance(export, Mapping):
        return _federation_training(export)
    local = ck.extra.get(EXTRA_LOCAL_MODEL)
    if isinstance(local, Mapping):
        return _local_training(local)
    return _central_training(ck)


# --- evaluation ---------------------------------------------------------------
def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _evaluated_files(path: Path, doc: Mapping[str, Any]) -> list[str]:
    """The checkpoints scored together, from field ``checkpoint`` of metrics.json.

    A list since evaluate records one; before, one string, several models
    joined by ``", "`` (split unless the string names an existing file).
    """
    evaluated = doc.get("checkpoint")
    if isinstance(evaluated, str):
        if Path(evaluated).is_file() or ", " not in evaluated:
            return [evaluated]
        return evaluated.split(", ")
    if (
        isinstance(evaluated, list)
        and evaluated
        and all(isinstance(e, str) for e in evaluated)
    ):
        return list(evaluated)
    raise ExportError(
        f"{path}: field 'checkpoint' must name the evaluated model file(s), got "
        f"{evaluated!r}"
    )


def evaluation_section(
    eval_dir: str | Path | None, checkpoint: str | Path, *, use_ema: bool = False
) -> dict[str, Any] | None:
    """CPM with 95% intervals from a ``mammofed-client evaluate`` output folder.

    The evaluation must be of ``checkpoint`` alone (field ``checkpoint`` of
    ``metrics.json`` names one file), of the same file (the SHA-256 it records
    in ``checkpoint_sha256``, or the evaluated file's own while it exists; an
    older result whose file is gone is marked unverified) and of the same
    weights (field ``use_ema`` equal to ``use_ema``; unknown in older results).

    Raises:
        ExportError: no ``metrics.json``, a malformed one, or the evaluation of
            several models run together, of another model or of its other
            weights (EMA or not); the message names the file and field.
    """
    if eval_dir is None:
        return None
    path = Path(eval_dir)
    if path.is_dir():
        path = path / METRICS_JSON
    if not path.is_file():
        raise ExportError(
            f"{path}: does not exist; --eval takes the output folder of "
            "'mammofed-client evaluate' (it holds metrics.json)"
        )
    doc = read_json_document(path, "evaluation result", ExportError)
    if not isinstance(doc.get("classes"), dict):
        raise ExportError(
            f"{path}: field 'classes' is missing or not a mapping; not a "
            "'mammofed-client evaluate' result"
        )
    files = _evaluated_files(path, doc)
    if len(files) > 1:
        raise ExportError(
            f"{path}: field 'checkpoint' names {len(files)} models scored together "
            f"(findings fused: {', '.join(files)}), not {checkpoint} alone; "
            "evaluate this model alone first"
        )
    evaluated = files[0]
    sums = doc.get("checkpoint_sha256")
    recorded = sums[0] if isinstance(sums, list) and len(sums) == 1 else None
    if recorded is None and Path(evaluated).is_file():
        recorded = sha256_file(evaluated)
    match: bool | str = "unverified (the evaluated file no longer exists)"
    if recorded is not None:
        if recorded != sha256_file(checkpoint):
            raise ExportError(
                f"{path}: field 'checkpoint' names {evaluated}, a different model "
                f"from {checkpoint} (SHA-256 differs); evaluate this model first"
            )
        match = True
    ema = doc.get("use_ema", UNKNOWN)
    if isinstance(ema, bool) and ema != use_ema:
        which = {True: "EMA weights (--ema)", False: "raw weights (no --ema)"}
        raise ExportError(
            f"{path}: field 'use_ema' is {str(ema).lower()}: the evaluation scored "
            f"the {which[ema]} of {evaluated}, but this model is made of its "
            f"{which[use_ema]}; evaluate those weights first"
        )
    classes: dict[str, Any] = {}
    for name in CLASSES:
        r = doc["classes"].get(name)
        if not isinstance(r, dict):
            raise ExportError(f"{path}: field 'classes.{name}' is missing")
        ci = r.get("cpm_ci95")
        classes[name] = {
            "cpm": _num(r.get("cpm")),
            "cpm_ci95": [_num(ci[0]), _num(ci[1])] if isinstance(ci, list) else None,
            "n_lesions": r.get("n_lesions"),
            "n_images": r.get("n_images"),
        }
    return {
        "result_file": str(path.resolve()),
        "evaluated_checkpoint": evaluated,
        "same_model": match,
        "ema_weights": ema,
        "data": doc.get("site", UNKNOWN),
        "view": doc.get("view", UNKNOWN),
        "n_images": doc.get("n_images", UNKNOWN),
        "classes": classes,
        "cpm_mean": _num((doc.get("metrics") or {}).get("cpm-mean")),
    }


# --- the card -----------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return "unknown" if v is None else str(v)


def card_markdown(card: Mapping[str, Any]) -> str:
    """The human-readable card (Markdown) of a card dict."""
    m = card["model"]
    lines = [
        f"# Model card: {m['file']}",
        "",
        f"- kind: {m['kind']}; architecture {m['arch']} ({m['norm']} norm, FPN "
        f"{m['fpn_channels']} channels, {m['head_convs']} head convs)",
        f"- classes: {', '.join(m['classes'])}; working spacing "
        f"{m['working_spacing_mm']} mm; site standardizer: "
        f"{'yes' if m['standardizer'] else 'no'}",
        f"- created (UTC): {card['created_utc']}",
        f"- software: {_fmt(card['software'])}",
        "",
        "## Files (SHA-256)",
        "",
    ]
    lines += [
        f"- `{f['name']}` ({f['bytes']} bytes): `{f['sha256']}`" for f in card["files"]
    ]
    src = card["source_checkpoint"]
    lines += [
        f"- source checkpoint `{src['path']}`: `{src['sha256']}` (written by "
        f"mammofed {src['written_by']})",
        "",
        "## Training",
        "",
    ]
    lines += [f"- {k}: {_fmt(v)}" for k, v in card["training"].items()]
    lines += ["", "## Evaluation", ""]
    ev = card["evaluation"]
    if isinstance(ev, dict):
        lines.append(
            f"- data: {ev['data']} (view {ev['view']}, {_fmt(ev['n_images'])} images); "
            f"same model as evaluated: {ev['same_model']}; EMA weights "
            f"evaluated: {_fmt(ev.get('ema_weights', UNKNOWN))}"
        )
        for name, r in ev["classes"].items():
            ci = r["cpm_ci95"]
            ci_s = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "none"
            lines.append(
                f"- {name}: CPM {_fmt(r['cpm'])} (95% bootstrap CI {ci_s}), "
                f"{_fmt(r['n_lesions'])} lesions in {_fmt(r['n_images'])} images"
            )
        lines.append(f"- mean CPM: {_fmt(ev['cpm_mean'])}")
    else:
        lines.append(f"- {ev}")
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Limits", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    if card.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in card["notes"].items()]
    return "\n".join(lines) + "\n"


def write_model_card(
    model_path: str | Path,
    ck: Checkpoint,
    *,
    kind: str,
    extra_files: Sequence[str | Path] = (),
    eval_dir: str | Path | None = None,
    use_ema: bool = False,
    notes: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``M.card.json`` and ``M.card.md`` beside ``model_path``; returns them.

    Args:
        model_path: the exported model file.
        ck: the checkpoint it was made from (``ck.path`` is hashed too).
        kind: ``"torch-checkpoint"`` or ``"onnx"``.
        extra_files: files that belong to the model (same folder), hashed too.
        eval_dir: optional ``mammofed-client evaluate`` output folder.
        use_ema: the model is made of the checkpoint's EMA weights (the
            evaluation must have scored those).
        notes: free-form JSON-safe facts added under ``notes`` (e.g. the
            ONNX parity tolerance).
    """
    model = Path(model_path)
    files = [model, *map(Path, extra_files)]
    cfg = ck.model_config
    card = {
        "format": CARD_FORMAT,
        "model": {
            "file": model.name,
            "kind": kind,
            "arch": cfg.arch,
            "norm": cfg.norm,
            "fpn_channels": cfg.fpn_channels,
            "head_convs": cfg.head_convs,
            "working_spacing_mm": cfg.working_spacing_mm,
            "classes": list(CLASSES),
            "standardizer": EXTRA_STANDARDIZER in ck.extra,
            "breast_mask": cfg.breast_mask,
            "speck_clusters": cfg.speck_clusters,
        },
        "files": [
            {"name": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size}
            for f in files
        ],
        "source_checkpoint": {
            "path": str(ck.path.resolve()),
            "sha256": sha256_file(ck.path),
            "written_by": ck.version or UNKNOWN,
        },
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "software": software_versions(),
        "training": training_section(ck),
        "evaluation": evaluation_section(eval_dir, ck.path, use_ema=use_ema)
        or "none given (no --eval folder)",
        "intended_use": INTENDED_USE,
        "limitations": list(LIMITATIONS),
        "notes": dict(notes or {}),
    }
    jpath, mpath = card_paths(model_path)
    atomic_write_text(jpath, json.dumps(card, indent=2) + "\n")
    atomic_write_text(mpath, card_markdown(card))
    log.info("model card %s (+ %s)", jpath, mpath.name)
    return jpath, mpath


def verify_card(model_path: str | Path) -> dict[str, Any]:
    """Check every file a model's card lists against its SHA-256; return the card.

    Raises:
        ModelIntegrityError: no card, an unreadable card, a card of another
            file, a listed file missing, or a hash that differs (the file was
            changed after export).
    """
    model = Path(model_path)
    jpath, _ = card_paths(model)
    if not jpath.is_file():
        raise ModelIntegrityError(
            f"{jpath}: model card does not exist; {model.name} cannot be checked "
            "and is refused (export it with mammofed-client, which writes the card)"
        )
    card = read_json_document(
        jpath, "model card", ModelIntegrityError, format_id=CARD_FORMAT
    )
    files = card.get("files")
    if not isinstance(files, list) or not files or files[0].get("name") != model.name:
        raise ModelIntegrityError(
            f"{jpath}: field 'files' does not list {model.name} first; the card "
            "belongs to another model"
        )
    for entry in files:
        f = model.with_name(str(entry.get("name")))
        if not f.is_file():
            raise ModelIntegrityError(f"{f}: listed in {jpath.name} but missing")
        have = sha256_file(f)
        if have != entry.get("sha256"):
            raise ModelIntegrityError(
                f"{f}: SHA-256 {have} differs from {entry.get('sha256')} in "
                f"{jpath.name} (field 'files'); the file was changed after export "
                "and is refused"
            )
    return card
