"""``decode_array`` and ``federation-json``: what a site refuses before allocating.

Flower's ``Array.numpy()`` trusts the ``.npy`` header inside the bytes: a
record declaring a (2,) float32 array whose header says ``(10**12,)`` makes
it allocate 4 TB. :func:`decode_array` checks the declaration and the header
against the expected form first. A deeply nested ``federation-json`` raised
``RecursionError`` instead of a :class:`ConfigError`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array

from common.errors import ConfigError
from common.wire.federation import (
    RUN_FEDERATION_JSON,
    WIRE_FLOATS,
    ArrayDecodeError,
    decode_array,
    federation_config_from_run_config,
)

REPO = Path(__file__).resolve().parents[3]


def _npy(shape: tuple[int, ...], descr: str = "<f4", version: int = 1) -> bytes:
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    if version == 1:
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def _array(shape: tuple[int, ...], **kw: Any) -> Array:
    fields: dict[str, Any] = {
        "dtype": "float32",
        "shape": shape,
        "stype": "numpy.ndarray",
        "data": _npy(shape) + np.arange(int(np.prod(shape)), dtype="<f4").tobytes(),
    }
    fields.update(kw)
    return Array(**fields)


@pytest.mark.parametrize(
    "value",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        np.zeros((0, 3), np.float32),
        np.array(2.5, np.float64),
    ],
    ids=["c-order", "fortran-order", "empty", "scalar"],
)
def test_a_well_formed_array_decodes_exactly(value: np.ndarray) -> None:
    got = decode_array("w", Array(value), tuple(value.shape), WIRE_FLOATS)
    np.testing.assert_array_equal(got, value)
    assert got.dtype == value.dtype and got.shape == value.shape
    assert got.flags.writeable and got.flags.c_contiguous


def test_a_version_2_header_decodes() -> None:
    data = _npy((3,), version=2) + np.arange(3, dtype="<f4").tobytes()
    got = decode_array("w", _array((3,), data=data), (3,), WIRE_FLOATS)
    np.testing.assert_array_equal(got, np.arange(3, dtype=np.float32))


@pytest.mark.parametrize(
    ("arr", "said"),
    [
        (
            _array((2,), stype="torch.Tensor", data=b"junk"),
            "array 'w' is serialized as 'torch.Tensor', expected 'numpy.ndarray'",
        ),
        (_array((3,)), "array 'w' has shape (3,), expected (2,)"),
        (
            _array((2,), dtype="float16"),
            "array 'w' has dtype float16, expected float32 or float64",
        ),
        (
            _array((2,), dtype="x" * 500),
            "array 'w' declares an unknown dtype 'xxxxxxxx",
        ),
        (
            _array((2,), data=_npy((10**12,))),
            "array 'w': its bytes hold shape (1000000000000,) and dtype 'float32', "
            "but it declares (2,) and float32",
        ),
        (
            _array((2,), data=_npy((2,), descr=">f4") + b"\0" * 8),
            "array 'w': its bytes hold shape (2,) and dtype '>f4', but it declares",
        ),
        (
            _array((2,), data=_npy((2,), descr="|O")),
            "array 'w': its bytes hold shape (2,) and dtype 'object'",
        ),
        (
            _array((2,), data=_npy((2,)) + b"\0" * 12),
            "array 'w': its bytes hold 12 bytes of values, 8 expected for shape "
            "(2,) and float32",
        ),
        (_array((2,), data=b"junk"), "array 'w': its bytes are not a numpy array"),
        (
            _array((2,), data=b"\x93NUMPY\x09\x00" + b"\0" * 20),
            "array 'w': npy format version (9, 0) not read",
        ),
        (
            _array((2,), data=b"\x93NUMPY\x01\x00\xff\x7f" + b"[" * 32767),
            "array 'w': its bytes are not a numpy array",
        ),
    ],
    ids=[
        "torch-stype", "declared-shape", "float16", "unknown-dtype",
        "header-shape", "header-byte-order", "header-object", "byte-count",
        "junk", "npy-version", "header-too-long",
    ],
)  # fmt: skip
def test_a_malformed_array_is_refused_before_allocating(arr: Array, said: str) -> None:
    with pytest.raises(ArrayDecodeError) as err:
        decode_array("w", arr, (2,), WIRE_FLOATS)
    assert str(err.value).startswith(said)


def test_a_deeply_nested_federation_json_is_a_config_error() -> None:
    deep = "[" * 100000 + "]" * 100000
    with pytest.raises(ConfigError) as err:
        federation_config_from_run_config({RUN_FEDERATION_JSON: deep}, REPO, site=True)
    assert str(err.value) == f"run_config: {RUN_FEDERATION_JSON}: is nested too deeply"


def test_a_federation_json_integer_past_the_digit_limit_is_a_config_error() -> None:
    text = '{"num_rounds": 1' + "0" * 5000 + "}"
    with pytest.raises(ConfigError, match=f"{RUN_FEDERATION_JSON}: is not valid JSON"):
        federation_config_from_run_config({RUN_FEDERATION_JSON: text}, REPO, site=True)
