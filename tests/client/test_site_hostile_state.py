"""A damaged ``pending.json`` or ``personal.npz`` is refused naming file and field.

``SiteState._pending_record`` used to coerce with ``int()``: ``"2"`` and
``1.9`` and ``true`` became rounds, ``Infinity`` raised ``OverflowError`` and
a deeply nested file ``RecursionError`` (both escaped ``SiteStateError``, so
the reply said "site failed", code 199, not "site state unreadable", 102).
``load_personal`` returned arrays holding NaN that ``save_personal`` refuses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from client.app import app
from client.state import PENDING_JSON, PERSONAL_NPZ, SiteState, SiteStateError
from common.keys import ARRAYS_KEY, CONFIG_KEY
from common.wire.faults import SITE_STATE, ModelVersion
from common.wire.federation import (
    FitInstructions,
    arrays_to_record,
    federation_config_to_json,
    load_federation_config,
)
from tests.client.conftest import app_context

REPO = Path(__file__).resolve().parents[2]
TEST_YAML = REPO / "configs" / "federation" / "test.yaml"
NODE = 7
MUST = "must be an integer >= 0, got"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"round": Infinity, "node": 1}', f"field 'round' {MUST} inf"),
        ('{"round": "2", "node": "1"}', f"field 'round' {MUST} '2'"),
        ('{"round": 1.9, "node": 1}', f"field 'round' {MUST} 1.9"),
        ('{"round": true, "node": 1}', f"field 'round' {MUST} True"),
        ('{"round": -1, "node": 1}', f"field 'round' {MUST} -1"),
        ('{"round": 1, "node": "1"}', f"field 'node' {MUST} '1'"),
        ('{"round": 1, "node": 1e999}', f"field 'node' {MUST} inf"),
        ('{"node": 1}', "field 'round' is missing"),
        ('{"round": 1, "node": 1, "committing": 1}', "'committing' must be true or"),
        ("[1, 2]", "is not a JSON object"),
        ("[" * 100000 + "]" * 100000, "unreadable pending round"),
        ('{"round": 1' + "0" * 5000 + ', "node": 1}', "unreadable pending round"),
    ],
    ids=[
        "infinity", "strings", "fraction", "bool", "negative", "node-string",
        "node-overflow", "missing", "committing-int", "list", "deep", "huge-int",
    ],
)  # fmt: skip
def test_a_damaged_pending_record_is_refused_naming_file_and_field(
    tmp_path: Path, text: str, said: str
) -> None:
    state = SiteState(tmp_path, "site-a")
    state.pending_path.write_text(text)
    for read in (state.pending, lambda: state.settle(ModelVersion(2, (1,)))):
        with pytest.raises(SiteStateError) as err:
            read()
        assert str(state.pending_path) in str(err.value)
        assert said in str(err.value)
    # nothing was committed or discarded on the strength of it
    assert state.pending_path.read_text() == text
    assert not state.meta_path.exists()


def test_a_valid_pending_record_still_reads(tmp_path: Path) -> None:
    state = SiteState(tmp_path, "site-a")
    state.begin_round(3, 2**40)
    assert state.pending() == {"round": 3, "node": 2**40}


@pytest.mark.parametrize(
    "text",
    ['{"round": Infinity, "node": 7}', "[" * 100000 + "]" * 100000],
    ids=["infinity", "deep"],
)
def test_the_client_app_replies_state_unreadable_for_a_damaged_pending_record(
    tmp_path: Path, text: str, task_identity: None
) -> None:
    """Code 102 (site state), not 199 (an unexpected failure of the site)."""
    cfg = load_federation_config(TEST_YAML)
    state_dir = tmp_path / "state"
    ctx = app_context(state_dir, federation_config_to_json(cfg), NODE)
    from client.toy import build_toy

    shared = build_toy("x", tmp_path / "unused", cfg).initial_shared()
    (state_dir / "site-a").mkdir(parents=True)
    (state_dir / "site-a" / PENDING_JSON).write_text(text)
    config = FitInstructions.from_federation(cfg, 2).to_config_record()
    for key, value in ModelVersion(1, (NODE,)).to_config().items():
        config[key] = value
    content = RecordDict({ARRAYS_KEY: arrays_to_record(shared), CONFIG_KEY: config})
    reply = app(Message(content, dst_node_id=NODE, message_type="train"), ctx)
    assert reply.has_error() and reply.error.code == SITE_STATE


def test_load_personal_refuses_non_finite_arrays_naming_file_and_array(
    tmp_path: Path,
) -> None:
    """``save_personal`` never writes NaN: one in the file is damage, refused."""
    state = SiteState(tmp_path, "site-a")
    np.savez(
        state.dir / PERSONAL_NPZ,
        **{"bn.weight": np.ones(2), "bn.running_var": np.array([1.0, np.nan])},
    )
    with pytest.raises(SiteStateError) as err:
        state.load_personal()
    message = str(err.value)
    assert str(state.personal_path) in message
    assert "'bn.running_var'" in message and "NaN or Inf" in message


def test_load_personal_still_returns_finite_arrays(tmp_path: Path) -> None:
    state = SiteState(tmp_path, "site-a")
    state.save_personal({"bn.weight": np.arange(3.0), "bn.count": np.array(4)})
    loaded = state.load_personal()
    assert loaded is not None
    np.testing.assert_array_equal(loaded["bn.weight"], np.arange(3.0))
    assert int(loaded["bn.count"]) == 4
