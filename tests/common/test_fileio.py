"""common.fileio: atomic writes, .npz arrays and log tails."""

from __future__ import annotations

import numpy as np
import pytest

from common.fileio import atomic_write_text, load_arrays, save_arrays, tail_text


def test_atomic_text_and_arrays_round_trip(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x\n", fsync=False)
    assert (tmp_path / "a.txt").read_text() == "x\n"
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0)}
    save_arrays(tmp_path / "a.npz", arrays)
    back = load_arrays(tmp_path / "a.npz")
    assert set(back) == {"w", "b"}
    np.testing.assert_array_equal(back["w"], arrays["w"])
    assert back["w"].dtype == np.float32


def test_tail_text_last_lines_or_a_note(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(50)))
    assert tail_text(log, 3) == "line 47\nline 48\nline 49"
    missing = tmp_path / "none.log"
    assert tail_text(missing) == f"({missing} not written)"
    assert tail_text(missing, missing="(no log)") == "(no log)"


def test_read_json_document_checks_format_and_shape(tmp_path):
    import pytest

    from common.fileio import read_json_document

    good = tmp_path / "a.json"
    good.write_text('{"format": "x/1", "v": 2}')
    assert read_json_document(good, "card", KeyError, format_id="x/1")["v"] == 2
    with pytest.raises(KeyError, match="field 'format' is 'x/1', expected 'y/1'"):
        read_json_document(good, "card", KeyError, format_id="y/1")
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="b.json: unreadable card"):
        read_json_document(bad, "card", ValueError)
    arr = tmp_path / "c.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ValueError, match="card is not a JSON object"):
        read_json_document(arr, "card", ValueError)
    with pytest.raises(ValueError, match="field 'format' is 'list'"):
        read_json_document(arr, "card", ValueError, format_id="x/1")


def test_a_truncated_or_corrupt_npz_is_a_value_error(tmp_path):
    """numpy reports a broken zip as BadZipFile / EOFError / zlib.error: every
    caller catches OSError and ValueError, so load_arrays turns them into one."""
    good = tmp_path / "a.npz"
    save_arrays(good, {"w": np.arange(1000, dtype=np.float32)})
    data = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    for bad in (cut, junk):
        with pytest.raises(ValueError):
            load_arrays(bad)


@pytest.mark.parametrize(
    "content", [b"hello, not an archive\n", b"\x80\x04K\x01."], ids=["text", "pickle"]
)
def test_a_file_numpy_would_unpickle_is_refused_without_pickle_advice(
    tmp_path, content
):
    p = tmp_path / "round-1.npz"
    p.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable .npz") as info:
        load_arrays(p)
    assert "allow_pickle" not in str(info.value)
