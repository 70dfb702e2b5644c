"""A crafted model file cannot run code: predict, evaluate and train refuse it.

The payload of the crafted files below writes a marker file when unpickled
(``__reduce__`` -> ``pathlib.Path.touch``). The landed loader
(``torch.load(weights_only=False)``) ran it; these tests fail there.
"""

from __future__ import annotations

import dataclasses
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.cli import main as client_main
from common.detector.checkpoint import load_checkpoint, load_model
from common.errors import CheckpointMismatch, UnsafeCheckpoint
from simulation.cli import main as sim_main
from tests.conftest import write_train_yaml


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: stands for any command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _crafted(tmp_path: Path, marker: Path) -> Path:
    """A file with nothing but the payload."""
    p = tmp_path / "crafted.pt"
    torch.save({"format": "mammofed-detector/1", "x": _Payload(marker)}, p)
    return p


def _trojaned(real: Path, tmp_path: Path, marker: Path) -> Path:
    """A REAL checkpoint with the payload hidden in its free-form ``extra``."""
    payload = torch.load(real, weights_only=True)  # our own file: plain data
    payload["extra"] = {"note": _Payload(marker)}
    p = tmp_path / "trojaned.pt"
    torch.save(payload, p)
    return p


def test_a_real_checkpoint_still_loads(tiny_checkpoint):
    model, ck = load_model(tiny_checkpoint)
    assert ck.model_config.arch == "tiny"
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("kind", ["crafted", "trojaned"])
def test_crafted_pickle_is_refused_without_running(tmp_path, tiny_checkpoint, kind):
    marker = tmp_path / "PWNED"
    f = (
        _crafted(tmp_path, marker)
        if kind == "crafted"
        else _trojaned(tiny_checkpoint, tmp_path, marker)
    )
    with pytest.raises(UnsafeCheckpoint, match="refused") as info:
        load_checkpoint(f)
    assert str(f) in str(info.value)
    assert isinstance(info.value, CheckpointMismatch)  # callers' except still fits
    assert not marker.exists(), "the payload ran"


def test_cli_paths_refuse_a_trojaned_checkpoint(tmp_path, tiny_checkpoint, site_cache):
    """predict, evaluate and train --init-checkpoint: exit 2, payload never ran."""
    marker = tmp_path / "PWNED"
    bad = _trojaned(tiny_checkpoint, tmp_path, marker)
    img = tmp_path / "img.png"
    Image.fromarray((np.arange(96 * 96).reshape(96, 96) % 251).astype(np.uint8)).save(
        img
    )
    rc = client_main([
        "predict", "--checkpoint", str(bad), str(img), "--out", str(tmp_path / "p"),
        "--spacing-mm", "0.4",
    ])  # fmt: skip
    assert rc == 2 and not marker.exists()
    rc = client_main([
        "evaluate", "--checkpoint", str(bad), "--cache", str(site_cache),
        "--out", str(tmp_path / "e"),
    ])  # fmt: skip
    assert rc == 2 and not marker.exists()
    cfg = write_train_yaml(tmp_path, [site_cache], init_checkpoint=str(bad))
    rc = sim_main(["train", "--config", str(cfg)])
    assert rc != 0 and not marker.exists()
    assert not list((tmp_path / "run").glob("**/final.pt"))


def test_resume_state_survives_the_safe_loader(tmp_path, tiny_checkpoint):
    """Optimizer, EMA and scheduler state (resume) are plain data: still read."""
    from common.detector.checkpoint import save_checkpoint
    from common.detector.model import ModelConfig, build_detector

    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    model = build_detector(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()  # type: ignore[union-attr]
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    p = save_checkpoint(
        tmp_path / "resume.pt",
        model,
        dataclasses.replace(cfg),
        optimizer=opt,
        ema=model,
        epoch=3,
        extra={"scheduler": sched.state_dict(), "ema_updates": 7},
    )
    ck = load_checkpoint(p)
    assert ck.epoch == 3 and ck.optimizer is not None and ck.ema is not None
    assert ck.extra["ema_updates"] == 7


def _shrunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight cut to its first row: right names, wrong shapes."""
    return {k: v[:1] if v.ndim else v for k, v in state.items()}


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("state_dict", lambda p: {"state_dict": "hello"}),
        ("state_dict", lambda p: {"state_dict": _shrunk(p["state_dict"])}),
        ("epoch", lambda p: {"epoch": "x"}),
        ("extra", lambda p: {"extra": [1, 2, 3]}),
        ("state_dict", lambda p: {"state_dict": _poisoned(p["state_dict"])}),
        ("ema", lambda p: {"ema": _poisoned(p["state_dict"], float("inf"))}),
        ("classes", lambda p: {"classes": "mass"}),
        ("working_spacing_mm", lambda p: {"working_spacing_mm": "x"}),
        ("image_std", lambda p: {"image_std": [9.0]}),
    ],
    ids=[
        "state_dict-is-str",
        "tensor-wrong-shape",
        "epoch-not-int",
        "extra-is-list",
        "weights-nan",
        "ema-inf",
        "classes-is-str",
        "spacing-copy-disagrees",
        "std-copy-disagrees",
    ],
)
def test_malformed_fields_are_a_mismatch_naming_the_file(
    tmp_path, tiny_checkpoint, field, change
):
    """A checkpoint of plain data but the wrong field types or shapes is refused
    with CheckpointMismatch naming the file and the field, never a raw
    TypeError / ValueError / RuntimeError from deep inside torch."""
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload.update(change(payload))
    bad = tmp_path / "malformed.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointMismatch) as info:
        load_model(bad)
    assert not isinstance(info.value, UnsafeCheckpoint)
    assert str(bad) in str(info.value) and f"field {field!r}" in str(info.value)


def _poisoned(state: dict, value: float = float("nan")) -> dict:
    """``state`` with one element of its first floating tensor set to ``value``
    (the weights of a diverged run)."""
    out = dict(state)
    key = next(k for k, t in out.items() if t.is_floating_point())
    out[key] = out[key].clone()
    out[key].view(-1)[0] = value
    return out


def test_poisoned_weights_name_the_tensor_and_the_count(tmp_path, tiny_checkpoint):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["state_dict"] = _poisoned(payload["state_dict"])
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    key = next(k for k, t in payload["state_dict"].items() if t.is_floating_point())
    with pytest.raises(CheckpointMismatch, match=rf"entry '{key}' holds 1 non-finite"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "an empty file"),
        (b"hello world\n", "not the zip archive torch.save writes"),
    ],
    ids=["empty", "text"],
)
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, says):
    f = tmp_path / "model.pt"
    f.write_bytes(content)
    with pytest.raises(CheckpointMismatch, match=says) as info:
        load_checkpoint(f)
    assert str(f) in str(info.value)


def test_refusal_never_advises_loading_with_weights_only_false(tmp_path):
    """torch's message around a refused pickle advises ``weights_only=False``
    (which would run the file): only the unpickler's own reason is kept."""
    f = tmp_path / "model.pt"
    f.write_bytes(bytes(range(256)) * 2)
    with pytest.raises(CheckpointMismatch) as info:
        load_checkpoint(f)
    text = str(info.value)
    assert str(f) in text
    assert "weights_only" not in text and "trusted source" not in text


def test_an_arch_this_version_lacks_names_the_file_and_field(tmp_path, tiny_checkpoint):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["model_config"]["arch"] = "huge"
    bad = tmp_path / "huge.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointMismatch, match="unknown model 'huge'") as info:
        load_model(bad)
    assert f"{bad}: field 'model_config.arch'" in str(info.value)
