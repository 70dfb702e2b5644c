"""Server arrays and run configs a site must refuse as bad instructions (code 100).

``_received_shared`` used to decode every array with Flower's
``Array.numpy()`` before any check: another serialization raised
``TypeError`` and an ``.npy`` header declaring ``(10**12,)`` values
``MemoryError``; a deeply nested ``federation-json`` raised
``RecursionError``. All ended as code 199 ("site failed") instead of a
:class:`ConfigError` naming the message, the array and what was expected.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from client.app import _received_shared, app
from client.site_model import SiteModel
from common.detector.model import Personalization
from common.errors import ConfigError
from common.keys import ARRAYS_KEY, CONFIG_KEY, PERSONAL_DEFAULTS_KEY
from common.wire.faults import SITE_CONFIG, ModelVersion
from common.wire.federation import (
    FederationConfig,
    FitInstructions,
    arrays_to_record,
    federation_config_to_json,
    load_federation_config,
)
from tests.client.conftest import app_context

REPO = Path(__file__).resolve().parents[2]
TEST_YAML = REPO / "configs" / "federation" / "test.yaml"
NODE = 7


pytestmark = pytest.mark.usefixtures("task_identity")


def _cfg() -> FederationConfig:
    return load_federation_config(TEST_YAML)


def _context(state_dir: Path, run_json: str) -> Context:
    return app_context(state_dir, run_json, NODE)


def _shared(cfg: FederationConfig, tmp_path: Path) -> dict[str, np.ndarray]:
    from client.toy import build_toy

    return build_toy("x", tmp_path / "unused", cfg).initial_shared()


def _message(cfg: FederationConfig, record: ArrayRecord) -> Message:
    config = FitInstructions.from_federation(cfg, 1).to_config_record()
    for key, value in ModelVersion(0, ()).to_config().items():
        config[key] = value
    content = RecordDict({ARRAYS_KEY: record, CONFIG_KEY: config})
    return Message(content, dst_node_id=NODE, message_type="train")


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _lying(name: str, shape: tuple[int, ...], **kw: Any) -> Array:
    """An array record entry declaring ``shape`` float32, with ``kw`` overrides."""
    fields: dict[str, Any] = {
        "dtype": "float32",
        "shape": shape,
        "stype": "numpy.ndarray",
        "data": _npy_header(shape) + b"\0" * (4 * int(np.prod(shape))),
    }
    fields.update(kw)
    return Array(**fields)


class _SpecTrainer:
    """A trainer stub declaring the shapes of ``shared`` (no site model)."""

    site_model = None

    def __init__(self, shared: dict[str, np.ndarray]) -> None:
        self.spec = {k: tuple(int(d) for d in v.shape) for k, v in shared.items()}

    def shared_spec(self) -> dict[str, tuple[int, ...]]:
        return dict(self.spec)


def _bad_cases(shared: dict[str, np.ndarray]) -> list[tuple[str, Array, str]]:
    name = next(iter(shared))
    shape = tuple(shared[name].shape)
    return [
        (
            "torch-stype",
            _lying(name, shape, stype="torch.Tensor", data=b"junk"),
            f"array {name!r} is serialized as 'torch.Tensor', expected 'numpy.ndarray'",
        ),
        (
            "header-too-big",
            _lying(name, shape, data=_npy_header((10**12,))),
            f"array {name!r}: its bytes hold shape (1000000000000,) and dtype "
            f"'float32', but it declares {shape} and float32",
        ),
        (
            "wrong-shape",
            Array(np.zeros((99,), np.float32)),
            f"array {name!r} has shape (99,), expected {shape}",
        ),
        (
            "float16",
            Array(np.zeros(shape, np.float16)),
            f"array {name!r} has dtype float16, expected float32 or float64",
        ),
        (
            "unknown-dtype",
            _lying(name, shape, dtype="no-such-type"),
            f"array {name!r} declares an unknown dtype 'no-such-type'",
        ),
        (
            "short-bytes",
            _lying(name, shape, data=_npy_header(shape) + b"\0\0"),
            f"array {name!r}: its bytes hold 2 bytes of values",
        ),
        (
            "junk-bytes",
            _lying(name, shape, data=b"junk"),
            f"array {name!r}: its bytes are not a numpy array",
        ),
        (
            "nan",
            Array(np.full(shape, np.nan, np.float32)),
            f"array {name!r} has NaN or Inf values",
        ),
    ]


@pytest.mark.parametrize(
    "case",
    [
        "torch-stype",
        "header-too-big",
        "wrong-shape",
        "float16",
        "unknown-dtype",
        "short-bytes",
        "junk-bytes",
        "nan",
    ],
)
def test_a_malformed_global_array_is_bad_server_instructions(
    tmp_path: Path, case: str
) -> None:
    cfg = _cfg()
    shared = _shared(cfg, tmp_path)
    (_, bad, said) = next(c for c in _bad_cases(shared) if c[0] == case)
    record = arrays_to_record(shared)
    record[next(iter(shared))] = bad
    msg = _message(cfg, record)
    with pytest.raises(ConfigError) as err:
        _received_shared(msg, _SpecTrainer(shared))  # type: ignore[arg-type]
    assert str(err.value).startswith(f"server message: {ARRAYS_KEY}: {said}")
    state_dir = tmp_path / "state"
    reply = app(msg, _context(state_dir, federation_config_to_json(cfg)))
    assert reply.has_error() and reply.error.code == SITE_CONFIG
    assert not (state_dir / "site-a" / "pending.json").exists()


def test_unknown_and_missing_global_arrays_are_named(tmp_path: Path) -> None:
    cfg = _cfg()
    shared = _shared(cfg, tmp_path)
    first = next(iter(shared))
    record = arrays_to_record({k: v for k, v in shared.items() if k != first})
    record["extra"] = Array(np.zeros(2, np.float32))
    reply = app(
        _message(cfg, record), _context(tmp_path / "s", federation_config_to_json(cfg))
    )
    assert reply.has_error() and reply.error.code == SITE_CONFIG
    with pytest.raises(ConfigError, match=r"unknown \['extra'\], missing \[") as err:
        _received_shared(_message(cfg, record), _SpecTrainer(shared))  # type: ignore[arg-type]
    assert repr(first) in str(err.value)


def test_well_formed_global_arrays_decode_exactly(tmp_path: Path) -> None:
    cfg = _cfg()
    shared = _shared(cfg, tmp_path)
    msg = _message(cfg, arrays_to_record(shared))
    got = _received_shared(msg, _SpecTrainer(shared))  # type: ignore[arg-type]
    assert list(got) == list(shared)
    for k, v in shared.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype and got[k].flags.writeable


# --- personal defaults ------------------------------------------------------------
def _site_trainer() -> Any:
    """A trainer stub with a real :class:`SiteModel` (FedBN: BatchNorm personal)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    site_model = SiteModel(model, Personalization(local_norm=True), None)
    sd = model.state_dict()

    class _Trainer:
        def __init__(self) -> None:
            self.site_model = site_model

        def shared_spec(self) -> dict[str, tuple[int, ...]]:
            return {k: tuple(sd[k].shape) for k in site_model.shared_keys}

    return _Trainer()


def _defaults_message(trainer: Any, defaults: ArrayRecord) -> Message:
    sd = trainer.site_model.model.state_dict()
    shared = {k: sd[k].numpy().copy() for k in trainer.site_model.shared_keys}
    msg = _message(_cfg(), arrays_to_record(shared))
    msg.content[PERSONAL_DEFAULTS_KEY] = defaults
    return msg


@pytest.mark.parametrize(
    ("array", "said"),
    [
        (
            _lying("1.running_mean", (3,), stype="torch.Tensor", data=b"junk"),
            "array '1.running_mean' is serialized as 'torch.Tensor'",
        ),
        (
            _lying("1.running_mean", (3,), data=_npy_header((10**12,))),
            "array '1.running_mean': its bytes hold shape (1000000000000,)",
        ),
        (
            Array(np.zeros(5, np.float32)),
            "array '1.running_mean' has shape (5,), expected (3,)",
        ),
    ],
    ids=["torch-stype", "header-too-big", "wrong-shape"],
)
def test_malformed_personal_defaults_are_bad_server_instructions(
    array: Array, said: str
) -> None:
    trainer = _site_trainer()
    msg = _defaults_message(trainer, ArrayRecord({"1.running_mean": array}))
    with pytest.raises(ConfigError) as err:
        _received_shared(msg, trainer)
    assert str(err.value).startswith(f"server message: personal defaults: {said}")
    assert trainer.site_model.defaults == {}


def test_personal_defaults_name_only_float_personal_arrays() -> None:
    trainer = _site_trainer()
    for name in ("0.weight", "1.num_batches_tracked", "nope"):
        record = ArrayRecord({name: Array(np.zeros(3, np.float32))})
        with pytest.raises(ConfigError, match="is not a personal norm array"):
            _received_shared(_defaults_message(trainer, record), trainer)
    good = ArrayRecord({"1.running_var": Array(np.full(3, 2.0, np.float32))})
    _received_shared(_defaults_message(trainer, good), trainer)
    np.testing.assert_array_equal(trainer.site_model.defaults["1.running_var"], 2.0)


# --- the run config ---------------------------------------------------------------
def test_a_deeply_nested_federation_json_is_bad_instructions(tmp_path: Path) -> None:
    cfg = _cfg()
    msg = _message(cfg, arrays_to_record(_shared(cfg, tmp_path)))
    deep = "[" * 100000 + "]" * 100000
    reply = app(msg, _context(tmp_path / "state", deep))
    assert reply.has_error() and reply.error.code == SITE_CONFIG
    # and a parseable one too deep for the checks is refused the same way
    data = json.loads(federation_config_to_json(cfg))
    data["trainer"]["options"]["x"] = json.loads("[" * 900 + "]" * 900)
    reply = app(msg, _context(tmp_path / "state", json.dumps(data)))
    assert reply.has_error() and reply.error.code == SITE_CONFIG
