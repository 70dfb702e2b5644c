"""Model cards for the .pt and .onnx exports: hashes, training, CPM, unknowns."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks.synthetic import spread_model
from client.cli import main as client_main
from client.evaluate import evaluate_checkpoint
from client.export import ExportError
from client.model_card import UNKNOWN, card_paths, verify_card
from client.onnx_export import OnnxDetector, contract_path, export_onnx
from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig
from common.errors import CheckpointMismatch
from common.fileio import sha256_file
from common.keys import CLASSES, NUM_EXAMPLES
from common.wire.federation import (
    PersonalizationConfig,
)
from common.wire.runfolder import ROUNDS_JSONL
from tests.client.conftest import SITE, one_site_config, train_one_round
from tests.conftest import make_site_cache


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One round of one standardizing FedBN+FedPer site, with its run records."""
    root = tmp_path_factory.mktemp("fed")
    cfg = one_site_config(
        root, name="card-test",
        personalization=PersonalizationConfig(local_norm=True, personal_head=True),
        max_steps=1, head_epochs=1, standardize=True, eval_view="all",
    )  # fmt: skip
    r = train_one_round(root, cfg)
    assert cfg.run_dir is not None
    line = {"round": 1, "train": {"valid": 1, "per_node": {"7": r.metrics}}}
    (cfg.run_dir / ROUNDS_JSONL).write_text(json.dumps(line) + "\n")
    examples = int(r.metrics[NUM_EXAMPLES])
    return {
        "ckdir": r.ckdir,
        "cache": r.cache,
        "examples": examples,
        "rounds": cfg.run_dir / ROUNDS_JSONL,
    }


def test_a_torn_or_hostile_rounds_line_costs_that_line_only(fed_run, tmp_path):
    rounds = fed_run["rounds"]
    good = rounds.read_text()
    hostile = {"round": 0, "train": {"valid": "many", "per_node": {"7": {}}}}
    try:
        rounds.write_text(json.dumps(hostile) + "\n" + good + '{"round": 1, "tr\n')
        out = tmp_path / "model.pt"
        args = ["export", "--checkpoint", str(fed_run["ckdir"]), "--out", str(out)]
        assert client_main([*args, "--site-name", SITE]) == 0
        tr = verify_card(out)["training"]
        assert tr["nodes_per_round"] == {"min": 1, "max": 1}
        assert tr["examples_last_round_per_node"] == [fed_run["examples"]]
    finally:
        rounds.write_text(good)


def test_export_writes_cards_for_pt_and_onnx(fed_run, tmp_path, write_exam):
    out = tmp_path / "model.pt"
    onnx_path = tmp_path / "model.onnx"
    rc = client_main(
        ["export", "--checkpoint", str(fed_run["ckdir"]), "--out", str(out),
         "--site-name", SITE, "--onnx", str(onnx_path)]
    )  # fmt: skip
    assert rc == 0
    examples = fed_run["examples"]
    pt_card = verify_card(out)
    assert pt_card["model"]["kind"] == "torch-checkpoint"
    assert pt_card["files"][0]["sha256"] == sha256_file(out)
    tr = pt_card["training"]
    assert tr["sites"] == [SITE] and tr["site"] == SITE and tr["round"] == 1
    assert tr["site_train_rounds"] == 1 and tr["site_images_seen"] == examples
    assert tr["nodes_per_round"] == {"min": 1, "max": 1}
    assert tr["examples_last_round_per_node"] == [examples]
    assert pt_card["evaluation"].startswith("none given")
    assert pt_card["model"]["standardizer"] is True

    onnx_card = verify_card(onnx_path)
    assert [f["name"] for f in onnx_card["files"]] == [
        "model.onnx",
        "model.onnx.contract.json",
    ]
    assert onnx_card["source_checkpoint"]["sha256"] == sha256_file(out)
    for key in ("mammofed", "torch", "flwr", "onnxruntime"):
        assert onnx_card["software"][key] not in ("", "absent")
    md = card_paths(onnx_path)[1].read_text()
    assert "## Intended use" in md and "Not a medical device" in md
    assert sha256_file(onnx_path) in md
    contract = json.loads(contract_path(onnx_path).read_text())
    assert contract["preprocessing"]["standardizer"] is not None
    assert contract["classes"] == list(CLASSES)
    # the exported site model runs in onnxruntime
    docs = OnnxDetector(onnx_path).with_score_floor(0.0).predict_files(write_exam())
    assert len(docs) == 4 and all(d["box_space"] == "stored" for d in docs)


def test_eval_folder_puts_cpm_with_intervals_in_the_card(fed_run, tmp_path):
    out = tmp_path / "model.pt"
    args = ["export", "--checkpoint", str(fed_run["ckdir"]), "--out", str(out),
            "--site-name", SITE]  # fmt: skip
    assert client_main(args) == 0
    ev = tmp_path / "eval"
    evaluate_checkpoint(out, fed_run["cache"], ev, view="all", n_boot=20, device="cpu")
    onnx_path = tmp_path / "m.onnx"
    rc = client_main(
        ["export-onnx", "--checkpoint", str(out), "--out", str(onnx_path),
         "--eval", str(ev)]
    )  # fmt: skip
    assert rc == 0
    card = verify_card(onnx_path)
    e = card["evaluation"]
    assert e["same_model"] is True and e["n_images"] == 12
    mass = e["classes"]["mass"]
    assert mass["n_lesions"] == 6 and mass["cpm"] is not None
    lo, hi = mass["cpm_ci95"]
    assert lo <= mass["cpm"] <= hi
    md = card_paths(onnx_path)[1].read_text()
    assert "mass: CPM" in md and "95% bootstrap CI" in md
    # the .pt export with the same --eval gets the same section
    assert client_main([*args, "--eval", str(ev)]) == 0
    assert verify_card(out)["evaluation"]["classes"] == e["classes"]


def test_eval_of_another_model_is_refused(fed_run, make_checkpoint, tmp_path, capsys):
    other = make_checkpoint("other.pt")
    ev = tmp_path / "eval"
    evaluate_checkpoint(other, fed_run["cache"], ev, view="all", n_boot=0, device="cpu")
    ck = make_checkpoint("mine.pt", score_thresh=0.02)
    rc = client_main(
        ["export-onnx", "--checkpoint", str(ck), "--out", str(tmp_path / "m.onnx"),
         "--eval", str(ev)]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "metrics.json: field 'checkpoint' names" in err and "different model" in err
    rc = client_main(
        ["export-onnx", "--checkpoint", str(ck), "--out", str(tmp_path / "n.onnx"),
         "--eval", str(tmp_path / "nowhere")]
    )  # fmt: skip
    assert rc == 2
    assert "nowhere: does not exist; --eval takes" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "n.onnx").exists()


def test_checkpoint_without_provenance_says_unknown(make_checkpoint, tmp_path):
    """A bare checkpoint: training facts read 'unknown', nothing is invented."""
    exp = export_onnx(make_checkpoint(), tmp_path / "m.onnx")
    card = json.loads(exp.card_json.read_text())
    tr = card["training"]
    assert tr["source"] == "checkpoint (not a federation export)"
    assert tr["caches"] == UNKNOWN and tr["images"] == UNKNOWN
    assert tr["train_config"] == UNKNOWN and tr["epochs"] == UNKNOWN
    assert "- images: unknown" in exp.card_md.read_text()


def test_export_command_line_mistakes(fed_run, tmp_path, capsys):
    rc = client_main(
        ["export", "--checkpoint", str(fed_run["ckdir"]), "--out",
         str(tmp_path / "m.pt"), "--site-name", SITE, "--onnx", str(tmp_path / "m.txt")]
    )  # fmt: skip
    assert rc == 2
    assert "--onnx: must end in .onnx" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def _eval(ck, cache, out, **kw):
    return evaluate_checkpoint(
        ck, cache, out, view="all", n_boot=0, device="cpu", gallery_missed=0,
        gallery_fp=0, **kw,
    )  # fmt: skip


def test_eval_of_models_run_together_is_refused(make_checkpoint, tmp_path):
    """A fused ensemble's CPM is not a single model's, in new and old results."""
    cache = make_site_cache(tmp_path / "cache")
    a = make_checkpoint("a.pt")
    b = make_checkpoint("b.pt", score_thresh=0.02)
    doc = _eval([a, b], cache, tmp_path / "pair")
    assert doc["checkpoint"] == [str(a), str(b)] and len(doc["checkpoint_sha256"]) == 2
    for ck in (a, b):
        with pytest.raises(ExportError, match="'checkpoint' names 2 models scored"):
            export_onnx(ck, tmp_path / "m.onnx", eval_dir=tmp_path / "pair")
    # a result written before the field was a list: one joined string
    path = tmp_path / "pair" / "metrics.json"
    old = {k: v for k, v in doc.items() if k not in ("checkpoint_sha256", "use_ema")}
    path.write_text(json.dumps({**old, "checkpoint": f"{a}, {b}"}))
    with pytest.raises(ExportError, match="'checkpoint' names 2 models scored"):
        export_onnx(a, tmp_path / "m.onnx", eval_dir=tmp_path / "pair")
    assert not (tmp_path / "m.onnx").exists()
    # an old single-model result still works, and so does a moved-away file:
    # the recorded SHA-256 identifies the evaluated model
    path.write_text(json.dumps({**old, "checkpoint": str(a)}))
    card = json.loads(
        export_onnx(a, tmp_path / "m.onnx", eval_dir=path.parent).card_json.read_text()
    )
    assert card["evaluation"]["same_model"] is True
    assert card["evaluation"]["ema_weights"] == UNKNOWN
    copy = tmp_path / "copy.pt"
    copy.write_bytes(a.read_bytes())
    _eval(copy, cache, tmp_path / "copy")
    copy.unlink()
    exp = export_onnx(a, tmp_path / "c.onnx", eval_dir=tmp_path / "copy")
    assert json.loads(exp.card_json.read_text())["evaluation"]["same_model"] is True


def test_eval_of_other_weights_is_refused(tmp_path):
    """The card's CPM is of the exported weights: EMA or not, as evaluated."""
    cache = make_site_cache(tmp_path / "cache")
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    ck = save_checkpoint(
        tmp_path / "m.pt", spread_model(cfg), cfg, ema=spread_model(cfg, seed=7)
    )
    assert _eval(ck, cache, tmp_path / "ema", use_ema=True)["use_ema"] is True
    assert _eval(ck, cache, tmp_path / "raw")["use_ema"] is False
    with pytest.raises(ExportError, match="field 'use_ema' is true"):
        export_onnx(ck, tmp_path / "a.onnx", eval_dir=tmp_path / "ema")
    with pytest.raises(ExportError, match="field 'use_ema' is false"):
        export_onnx(ck, tmp_path / "a.onnx", use_ema=True, eval_dir=tmp_path / "raw")
    assert not (tmp_path / "a.onnx").exists()
    exp = export_onnx(ck, tmp_path / "a.onnx", use_ema=True, eval_dir=tmp_path / "ema")
    card = json.loads(exp.card_json.read_text())
    assert card["evaluation"]["ema_weights"] is True
    assert card["notes"]["ema_weights"] is True


def test_ema_of_a_checkpoint_without_ema_is_refused(make_checkpoint, tmp_path, capsys):
    ck = make_checkpoint("noema.pt")
    with pytest.raises(CheckpointMismatch, match=r"noema\.pt: field 'ema' is empty"):
        export_onnx(ck, tmp_path / "m.onnx", use_ema=True)
    assert not (tmp_path / "m.onnx").exists()
    cache = make_site_cache(tmp_path / "cache")
    for argv in (
        ["evaluate", "--cache", str(cache), "--out", str(tmp_path / "e")],
        ["predict", str(tmp_path / "none.png"), "--out", str(tmp_path / "p")],
    ):
        rc = client_main([*argv, "--checkpoint", str(ck), "--ema", "--device", "cpu"])
        assert rc == 2
        assert "noema.pt: field 'ema' is empty" in capsys.readouterr().err
