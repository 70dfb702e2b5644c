"""In-process federation: privacy of every client message, resume, bad sites."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from client.app import app, resolve_site
from client.guard import PrivacyGuardError, check_reply
from client.toy import build_toy
from common.errors import ConfigError
from common.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from common.wire.federation import (
    METRIC_WHITELIST,
    NODE_SITE,
    NODE_STATE_DIR,
    PARTITION_ID,
    FederationConfig,
)
from common.wire.runfolder import CHECKPOINT_DIR, ROUNDS_JSONL
from server.checkpoints import CheckpointStore
from server.federation import run_federation
from tests.conftest import LocalGrid, make_contexts

SITES = ["site-a", "site-b"]


def _run(cfg: FederationConfig, tmp_path: Path, **kw) -> tuple[LocalGrid, object]:
    grid = LocalGrid(app, make_contexts(cfg, tmp_path / "state", SITES), **kw)
    return grid, run_federation(grid, cfg, tmp_path / "run")


def test_privacy_every_client_message(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    grid, _ = _run(test_cfg, tmp_path)
    spec = build_toy("site-a", tmp_path / "spec", test_cfg).shared_spec()
    assert not any("bn" in k or k.startswith("features.1.") for k in spec)  # FedBN
    # 2 rounds x 2 phases; no query: the server builds the initial model itself
    assert len(grid.replies) == 2 * 2 * len(SITES)
    seen_types = set()
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        seen_types.add(reply.metadata.message_type)
        assert set(content.keys()) <= {ARRAYS_KEY, METRICS_KEY}
        assert len(content.config_records) == 0
        if ARRAYS_KEY in content:
            arrays = content[ARRAYS_KEY]
            assert {k: tuple(a.shape) for k, a in arrays.items()} == spec
            for a in arrays.values():
                assert np.issubdtype(np.dtype(a.dtype), np.floating)
                assert a.numpy().size < 1000  # weights, never an image batch
        metrics = content[METRICS_KEY]
        assert set(metrics) <= METRIC_WHITELIST and NUM_EXAMPLES in metrics
        for v in metrics.values():
            assert isinstance(v, int | float) and not isinstance(v, bool)
        raw = repr(dict(metrics)) + repr(list(content.keys()))
        assert str(tmp_path) not in raw and "site-a" not in raw
    assert seen_types == {"train", "evaluate"}
    # identical metric keys across sites for each phase
    for phase in ("train", "evaluate"):
        keysets = {
            frozenset(r.content[METRICS_KEY])
            for r in grid.replies
            if r.metadata.message_type == phase
        }
        assert len(keysets) == 1
    # personal state is on the sites' disks and not in any global checkpoint
    ckpt = CheckpointStore(tmp_path / "run" / CHECKPOINT_DIR).latest()
    assert ckpt is not None and ckpt.round == 2 and set(ckpt.arrays) == set(spec)
    for site in SITES:
        with np.load(tmp_path / "state" / site / "personal.npz") as z:
            personal = set(z.files)
        assert personal and not personal & set(ckpt.arrays)
        assert any("running_mean" in k for k in personal)
    lines = (tmp_path / "run" / ROUNDS_JSONL).read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]


def test_guard_refuses_undeclared_content(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from common.wire.federation import arrays_to_record

    tr = build_toy("site-a", tmp_path, test_cfg)
    good = tr.initial_shared()
    ok = RecordDict(
        {
            ARRAYS_KEY: arrays_to_record(good),
            METRICS_KEY: MetricRecord(
                {NUM_EXAMPLES: 3, "train-loss": 0.1, "skipped-steps": 0}
            ),
        }
    )
    check_reply(
        ok,
        site="a",
        shared_spec=tr.shared_spec(),
        metric_names=tr.metric_names("train"),
    )
    cases = [
        RecordDict(
            {
                ARRAYS_KEY: arrays_to_record(
                    {**good, "pixels": np.zeros((4, 4), np.float32)}
                ),
                METRICS_KEY: MetricRecord({NUM_EXAMPLES: 3}),
            }
        ),
        RecordDict(
            {
                ARRAYS_KEY: arrays_to_record(good),
                METRICS_KEY: MetricRecord(
                    {NUM_EXAMPLES: 3, "train-loss": 0.1, "skipped-steps": 0}
                ),
                "config": ConfigRecord({"patient_id": "P001"}),
            }
        ),
        RecordDict(
            {
                ARRAYS_KEY: arrays_to_record(good),
                METRICS_KEY: MetricRecord(
                    {NUM_EXAMPLES: 3, "train-loss": float("nan"), "skipped-steps": 0}
                ),
            }
        ),
        RecordDict(  # finite, but no loss is negative
            {
                ARRAYS_KEY: arrays_to_record(good),
                METRICS_KEY: MetricRecord(
                    {NUM_EXAMPLES: 3, "train-loss": -1.0, "skipped-steps": 0}
                ),
            }
        ),
    ]
    for content in cases:
        with pytest.raises(PrivacyGuardError):
            check_reply(
                content,
                site="a",
                shared_spec=tr.shared_spec(),
                metric_names=tr.metric_names("train"),
            )


def test_resume_continues_from_last_checkpoint(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    one = dataclasses.replace(test_cfg, num_rounds=1)
    _, s1 = _run(one, tmp_path)
    assert s1.last_round == 1
    grid, s2 = _run(test_cfg, tmp_path)
    assert (s2.start_round, s2.last_round) == (1, 2)
    assert not any(m.metadata.message_type == "query" for m in grid.sent)
    assert CheckpointStore(tmp_path / "run" / CHECKPOINT_DIR).rounds() == [0, 1, 2]
    for site in SITES:
        meta = json.loads((tmp_path / "state" / site / "meta.json").read_text())
        assert meta["last_round"] == 2


def test_keep_checkpoints_bounds_the_folder_and_resume_still_works(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(test_cfg, num_rounds=3, keep_checkpoints=2)
    _run(dataclasses.replace(cfg, num_rounds=2), tmp_path)
    store = CheckpointStore(tmp_path / "run" / CHECKPOINT_DIR)
    assert store.rounds() == [0, 1, 2]
    _, summary = _run(cfg, tmp_path)
    assert (summary.start_round, summary.last_round) == (2, 3)
    assert store.rounds() == [0, 2, 3]  # round 0, the model the run started from


def test_poisoned_update_dropped_and_round_kept(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    from common.wire.federation import arrays_to_record, record_to_arrays

    def poison(node: int, reply: Message) -> Message:
        if reply.metadata.message_type != "train":
            return reply
        arrays = record_to_arrays(reply.content[ARRAYS_KEY])
        name = sorted(arrays)[0]
        arrays[name] = arrays[name] * np.float32(1e4)
        reply.content[ARRAYS_KEY] = arrays_to_record(arrays)
        return reply

    cfg = dataclasses.replace(
        test_cfg,
        num_rounds=1,
        participation=dataclasses.replace(test_cfg.participation, min_valid_updates=1),
    )
    _, summary = _run(cfg, tmp_path, tamper=poison)
    line = summary.rounds[0]
    assert line["status"] == "kept-previous"
    assert {r["check"] for r in line["train"]["rejected"]} == {"norm"}
    store = CheckpointStore(tmp_path / "run" / CHECKPOINT_DIR)
    for k, v in store.load(0).arrays.items():
        np.testing.assert_array_equal(store.load(1).arrays[k], v)


def test_resolve_site_variants(test_cfg: FederationConfig, tmp_path: Path) -> None:
    b = resolve_site({NODE_SITE: "h1", NODE_STATE_DIR: str(tmp_path)}, test_cfg)
    assert b.site == "h1" and b.state_dir == tmp_path
    assert resolve_site({PARTITION_ID: 1}, test_cfg).site == "site-b"
    with pytest.raises(ConfigError, match="partition-id"):
        resolve_site({PARTITION_ID: 7}, test_cfg)
    with pytest.raises(ConfigError, match="names no site"):
        resolve_site({"foo": 1}, test_cfg)
    site_yaml = tmp_path / "hosp.yaml"
    site_yaml.write_text(f"name: hosp-x\nstate_dir: {tmp_path / 'st'}\n")
    assert resolve_site({"site-config": str(site_yaml)}, test_cfg).site == "hosp-x"
    site_yaml.write_text("name: hosp-x\n")
    with pytest.raises(ConfigError, match="state_dir"):
        resolve_site({"site-config": str(site_yaml)}, test_cfg)


def test_evaluate_every_skips_evaluation_between_its_rounds(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    part = dataclasses.replace(test_cfg.participation, evaluate_every=2)
    cfg = dataclasses.replace(test_cfg, num_rounds=3, participation=part)
    grid, _ = _run(cfg, tmp_path)
    lines = (tmp_path / "run" / ROUNDS_JSONL).read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    evaluated = [r["round"] for r in rows if r["evaluate_sampled"]]
    assert evaluated == [2, 3]  # every 2nd round, and always the last
    assert not rows[0]["evaluate_aggregated"] and rows[0]["train"]["valid"] == 2
    kinds = [r.metadata.message_type for r in grid.replies]
    assert kinds.count("evaluate") == 2 * len(SITES)
    assert kinds.count("train") == 3 * len(SITES)


def test_evaluate_every_is_at_least_one() -> None:
    from common.config.loader import from_mapping

    raw = {"participation": {"evaluate_every": 0}}
    with pytest.raises(ConfigError, match="evaluate_every"):
        from_mapping(raw, FederationConfig, source="fed.yaml")


def test_cosine_learning_rate_schedule_is_what_the_sites_receive(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    """``trainer.lr_schedule: cosine``: round 1 gets the full rate, the last
    round ``lr_min_factor`` of it, in between a falling half cosine; every
    site gets the same rate in a round."""
    from common.keys import SERVER_ROUND
    from common.wire.federation import LEARNING_RATE

    trainer = dataclasses.replace(
        test_cfg.trainer, lr_schedule="cosine", lr_min_factor=0.2
    )
    cfg = dataclasses.replace(test_cfg, num_rounds=3, trainer=trainer)
    grid, _ = _run(cfg, tmp_path)
    sent: dict[int, list[float]] = {}
    for msg in grid.sent:
        if msg.metadata.message_type == "train":
            rec = msg.content["config"]
            sent.setdefault(int(rec[SERVER_ROUND]), []).append(
                float(rec[LEARNING_RATE])
            )
    lr = test_cfg.trainer.learning_rate
    # cos(pi/2) = 0: round 2 of 3 is halfway, 0.2 + 0.8 / 2 = 0.6
    want = {1: lr, 2: lr * 0.6, 3: lr * 0.2}
    assert sorted(sent) == [1, 2, 3]
    for rnd, rates in sent.items():
        assert len(rates) == len(SITES)
        assert rates == pytest.approx([want[rnd]] * len(SITES))


def test_constant_schedule_sends_the_configured_rate(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    from common.wire.federation import LEARNING_RATE

    grid, _ = _run(test_cfg, tmp_path)
    rates = [
        float(m.content["config"][LEARNING_RATE])
        for m in grid.sent
        if m.metadata.message_type == "train"
    ]
    assert rates and rates == pytest.approx(
        [test_cfg.trainer.learning_rate] * len(rates)
    )
