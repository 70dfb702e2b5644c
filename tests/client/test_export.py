"""mammofed-client export: a federation round + a site's state -> a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from client.cli import main as client_main
from client.detector_trainer import DetectorTrainer
from client.evaluate import evaluate_checkpoint
from client.export import (
    ExportError,
    ExportNeeds,
    checkpoint_standardizer,
    export_model,
)
from client.predict import detections_to_stored, predict_paths
from client.site_model import PERSONAL_HEAD_PREFIX, STANDARDIZER_FILE
from client.state import PENDING_DIR, PENDING_JSON, PERSONAL_NPZ, SiteState
from common.config.loader import config_to_dict
from common.detector.checkpoint import load_checkpoint, load_model
from common.detector.engine import predict_images
from common.detector.model import head_keys, norm_keys
from common.errors import CheckpointMismatch, ConfigError, MammofedError
from common.imaging.image_io import read_any
from common.wire.federation import (
    FederationConfig,
    PersonalizationConfig,
)
from server.checkpoints import CheckpointStore
from tests.client.conftest import SITE, one_site_config, train_one_round


def _fed_cfg(
    root: Path,
    *,
    strategy: str = "personalized",
    local_norm: bool = True,
    personal_head: bool = True,
    standardize: bool = True,
    trainer: str = "detector",
) -> FederationConfig:
    return one_site_config(
        root, name="export-test", strategy=strategy, trainer=trainer,
        personalization=PersonalizationConfig(
            local_norm=local_norm, personal_head=personal_head
        ),
        max_steps=1, head_epochs=1, standardize=standardize, eval_view="all",
    )  # fmt: skip


@dataclass
class Run:
    cfg: FederationConfig
    cache: Path
    trainer: DetectorTrainer
    shared: dict[str, np.ndarray]  # global shared arrays of round 1
    composed: dict[str, torch.Tensor]  # the site's own model after round 1
    ckdir: Path
    state_dir: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """FedBN + FedPer + standardize, one round of one site, no Flower."""
    root = tmp_path_factory.mktemp("fed")
    r = train_one_round(root, _fed_cfg(root))
    model = r.trainer.compose(r.shared)
    composed = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Run(r.cfg, r.cache, r.trainer, r.shared, composed, r.ckdir, root / "state")


def _export(r: Run, out: Path, *extra: str) -> int:
    return client_main(
        ["export", "--checkpoint", str(r.ckdir), "--out", str(out), *extra]
    )


def _copy_round(
    src: Path,
    dst: Path,
    *,
    meta: Any = None,
    arrays: Any = None,
) -> Path:
    """Copy round 1 of ``src`` to ``dst``, optionally editing meta / arrays."""
    dst.mkdir(parents=True)
    doc = json.loads((src / "round-00001.json").read_text())
    with np.load(src / "round-00001.npz") as z:
        arr = {k: z[k] for k in z.files}
    if meta is not None:
        meta(doc)
    if arrays is not None:
        arrays(arr)
        doc["array_names"] = list(arr)
    np.savez(dst / "round-00001.npz", **arr)
    (dst / "round-00001.json").write_text(json.dumps(doc))
    return dst / "round-00001.json"


def _copy_state(r: Run, dst: Path) -> Path:
    shutil.copytree(r.state_dir / SITE, dst / SITE)
    return dst


def _png(path: Path) -> Path:
    """A right breast with a bright lesion (stored pixels, 0.2 mm)."""
    px = np.zeros((200, 160), np.uint8)
    px[20:180, 60:160] = 120
    px[100:120, 80:100] = 250
    Image.fromarray(px).save(path)
    return path


# --- the personalized model ---------------------------------------------------
def test_site_export_equals_composed_model(run, tmp_path):
    out = tmp_path / "siteA.pt"
    state = str(run.state_dir)
    assert _export(run, out, "--site-name", SITE, "--state-dir", state) == 0
    ck = load_checkpoint(out)
    assert set(ck.state_dict) == set(run.composed)
    for k, v in run.composed.items():
        assert torch.equal(ck.state_dict[k], v), k
    # really personal: the stored personal head, not the global one
    personal = SiteState(run.state_dir, SITE).load_personal()
    assert personal is not None
    hk = head_keys(run.trainer.model)[0]
    np.testing.assert_array_equal(
        ck.state_dict[hk].numpy(), personal[PERSONAL_HEAD_PREFIX + hk]
    )
    assert not np.array_equal(ck.state_dict[hk].numpy(), run.shared[hk])
    info = ck.extra["export"]
    assert info["kind"] == "site" and info["site"] == SITE and info["round"] == 1
    assert info["strategy"] == "personalized" and info["head"] == "personal"
    assert info["site_last_round"] == 1 and info["standardized"] is True
    assert ck.model_config == run.trainer.opts.model_config()
    std = run.trainer.standardizer()
    assert std is not None and ck.extra["standardizer"] == std.to_dict()
    model, _ = load_model(out)
    assert not model.training


def test_site_config_and_run_state_dir_default(run, tmp_path):
    # --site-name without --state-dir: the run's recorded state_dir
    assert _export(run, tmp_path / "a.pt", "--site-name", SITE) == 0
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: {SITE}\nstate_dir: {run.state_dir}\n")
    assert _export(run, tmp_path / "b.pt", "--site-config", str(site_yaml)) == 0
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    for k, v in run.composed.items():
        assert torch.equal(a.state_dict[k], v) and torch.equal(b.state_dict[k], v)


def test_predict_and_evaluate_apply_the_standardizer(run, tmp_path):
    out = tmp_path / "m.pt"
    export_model(run.ckdir, out, site=SITE, state_dir=run.state_dir)
    std = checkpoint_standardizer(load_checkpoint(out))
    assert std is not None
    src = _png(tmp_path / "r.png")
    res = predict_paths(out, [src], tmp_path / "pred", spacing_mm=0.2, device="cpu")
    assert [p.name for p in res.written] == ["r.json"]
    doc = json.loads((tmp_path / "pred" / "r.json").read_text())
    # the composed model on the standardized image gives the same detections
    image = read_any(src, working_spacing_mm=0.4, spacing_mm=0.2)
    raw = torch.from_numpy(np.ascontiguousarray(image.pixels)).unsqueeze(0)
    standardized = std.apply(raw)
    assert not torch.equal(raw, standardized)
    model = run.trainer.compose(run.shared)
    old = model.score_thresh
    try:
        model.score_thresh = 0.01
        dets = predict_images(model, [standardized], "cpu")[0]
        raw_dets = predict_images(model, [raw], "cpu")[0]
    finally:
        model.score_thresh = old
    expected = detections_to_stored(dets, image.geometry, score_floor=0.01)
    assert doc["detections"] and doc["detections"] == expected
    unstandardized = detections_to_stored(raw_dets, image.geometry, score_floor=0.01)
    assert doc["detections"] != unstandardized  # the standardizer was applied
    # evaluate: same metrics as the site's own (standardized) evaluation
    ev = evaluate_checkpoint(
        out, run.cache, tmp_path / "eval", view="all", n_boot=0, device="cpu"
    )
    mine = run.trainer.evaluate_detailed(run.shared).to_json()
    assert ev["metrics"] == mine["metrics"]


def test_predict_cli_with_exported_model(run, tmp_path):
    out = tmp_path / "m.pt"
    export_model(run.ckdir, out, site=SITE, state_dir=run.state_dir)
    src = _png(tmp_path / "r.png")
    rc = client_main([
        "predict", "--checkpoint", str(out), str(src), "--out",
        str(tmp_path / "p"), "--spacing-mm", "0.2", "--device", "cpu", "--no-overlay",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "p" / "r.json").read_text())
    assert doc["detections"] and doc["checkpoint"] == str(out)


# --- the global model ---------------------------------------------------------
def test_global_only_under_fedbn_needs_a_site(run, tmp_path, capsys):
    assert _export(run, tmp_path / "g.pt", "--global-only") == 2
    err = capsys.readouterr().err
    assert "round-00001.json" in err and "config.personalization.local_norm" in err
    assert not (tmp_path / "g.pt").exists()


def test_global_only_with_site_takes_only_its_norm_layers(run, tmp_path):
    out = tmp_path / "g.pt"
    rc = _export(run, out, "--global-only", "--site-name", SITE)
    assert rc == 0
    ck = load_checkpoint(out)
    personal = SiteState(run.state_dir, SITE).load_personal()
    assert personal is not None
    norms = set(norm_keys(run.trainer.model))
    assert norms and not norms & set(run.shared)
    for k, v in ck.state_dict.items():
        if k in run.shared:  # global weights and the GLOBAL head
            assert np.array_equal(v.numpy(), run.shared[k]), k
        else:  # the site's FedBN norm layers (head GroupNorms too), counters
            assert np.array_equal(v.numpy(), personal[k]), k
    assert ck.extra["export"]["kind"] == "global"
    assert ck.extra["export"]["head"] == "global"
    assert ck.extra["export"]["norm"] == "site"
    load_model(out)


def test_global_only_fedavg_run_needs_no_site(tmp_path, run):
    cfg = _fed_cfg(
        tmp_path,
        strategy="fedavg",
        local_norm=False,
        personal_head=False,
        standardize=False,
    )
    trainer = DetectorTrainer(SITE, tmp_path / "state", cfg, data_dir=run.cache)
    shared = trainer.initial_shared()
    store = CheckpointStore(tmp_path / "ck")
    store.save(0, shared, config=config_to_dict(cfg))
    store.save(1, shared, config=config_to_dict(cfg))
    npz2, _ = store.paths(2)
    store.save(2, shared, config=config_to_dict(cfg))
    npz2.unlink()  # round 2 incomplete: the folder means round 1
    out = tmp_path / "g.pt"
    res = export_model(store.dir, out, global_only=True)
    assert res.round == 1 and res.kind == "global" and not res.standardized
    model, ck = load_model(out)
    for k, v in shared.items():
        assert np.array_equal(ck.state_dict[k].numpy(), v), k
    assert ck.extra["export"]["site"] is None
    # an explicit round file works too
    assert export_model(store.paths(0)[1], out, global_only=True).round == 0


# --- errors name the file and the field ----------------------------------------
def test_missing_round_files(run, tmp_path):
    with pytest.raises(MammofedError, match=r"round-00007\.json: round file does"):
        export_model(run.ckdir / "round-00007.json", tmp_path / "x.pt", site=SITE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MammofedError, match="empty: no complete round checkpoint"):
        export_model(tmp_path / "empty", tmp_path / "x.pt", site=SITE)
    j = _copy_round(run.ckdir, tmp_path / "c")
    j.with_suffix(".npz").unlink()
    with pytest.raises(MammofedError, match=r"round-00001\.npz: round arrays file"):
        export_model(j, tmp_path / "x.pt", site=SITE)
    j2 = _copy_round(run.ckdir, tmp_path / "d", meta=lambda d: d.pop("config"))
    with pytest.raises(MammofedError, match=r"round-00001\.json: field 'config'"):
        export_model(j2, tmp_path / "x.pt", site=SITE)


def test_non_detector_run_is_refused(run, tmp_path, capsys):
    def toy(doc: dict) -> None:
        doc["config"]["trainer"] = {"name": "toy", "options": {}}

    j = _copy_round(run.ckdir, tmp_path / "toy", meta=toy)
    with pytest.raises(ConfigError, match=r"round-00001\.json: config\.trainer\.name"):
        export_model(j, tmp_path / "x.pt", site=SITE, state_dir=run.state_dir)
    out = str(tmp_path / "x.pt")
    rc = client_main(
        ["export", "--checkpoint", str(j), "--out", out, "--site-name", SITE]
    )
    assert rc == 2 and "'toy'" in capsys.readouterr().err


def test_arrays_that_do_not_fit_the_model(run, tmp_path):
    key = head_keys(run.trainer.model)[0]

    def shrink(arr: dict) -> None:
        arr[key] = arr[key][:1]

    j = _copy_round(run.ckdir, tmp_path / "bad", arrays=shrink)
    with pytest.raises(CheckpointMismatch, match=rf"round-00001\.npz: array '{key}'"):
        export_model(j, tmp_path / "x.pt", site=SITE, state_dir=run.state_dir)

    def stranger(arr: dict) -> None:
        arr["not.a.layer"] = np.zeros(3, np.float32)

    j = _copy_round(run.ckdir, tmp_path / "odd", arrays=stranger)
    with pytest.raises(CheckpointMismatch, match="'not.a.layer' is not a tensor"):
        export_model(j, tmp_path / "x.pt", site=SITE, state_dir=run.state_dir)
    # a personal array of the wrong shape
    state = _copy_state(run, tmp_path / "state")
    st = SiteState(state, SITE)
    personal = st.load_personal()
    assert personal is not None
    nk = next(k for k in norm_keys(run.trainer.model) if k.endswith("weight"))
    personal[nk] = np.zeros(1, np.float32)
    st.save_personal(personal)
    with pytest.raises(CheckpointMismatch, match=rf"personal\.npz: array '{nk}'"):
        export_model(run.ckdir, tmp_path / "x.pt", site=SITE, state_dir=state)


def test_site_without_personal_state(run, tmp_path, capsys):
    state = str(run.state_dir)
    rc = _export(run, tmp_path / "x.pt", "--site-name", "siteB", "--state-dir", state)
    assert rc == 2
    err = capsys.readouterr().err
    assert "siteB" in err and "never trained in this run" in err
    # the folder exists (e.g. a meta file) but personal.npz does not
    (tmp_path / "state" / "siteC").mkdir(parents=True)
    (tmp_path / "state" / "siteC" / "meta.json").write_text("{}")
    with pytest.raises(MammofedError, match=r"siteC/personal\.npz: does not exist"):
        export_model(
            run.ckdir, tmp_path / "x.pt", site="siteC", state_dir=tmp_path / "state"
        )
    # a standardized run whose site state lost its standardizer
    state = _copy_state(run, tmp_path / "s2")
    (state / SITE / STANDARDIZER_FILE).unlink()
    with pytest.raises(MammofedError, match=r"standardizer\.json: does not exist"):
        export_model(run.ckdir, tmp_path / "x.pt", site=SITE, state_dir=state)
    assert not (tmp_path / "x.pt").exists()


def test_command_line_mistakes(run, tmp_path, capsys):
    assert _export(run, tmp_path / "x.pt") == 2
    assert "--global-only" in capsys.readouterr().err
    rc = _export(run, tmp_path / "x.pt", "--state-dir", str(run.state_dir))
    assert rc == 2 and "--state-dir" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_library_errors_say_what_is_missing_not_which_flag(run, tmp_path):
    out = tmp_path / "x.pt"
    with pytest.raises(ExportNeeds) as need:
        export_model(run.ckdir, out)
    assert need.value.what == "site" and "--" not in str(need.value)
    with pytest.raises(ExportNeeds) as need:
        export_model(run.ckdir, out, global_only=True)  # FedBN: a site must lend
    assert need.value.what == "lending-site" and "--" not in str(need.value)
    with pytest.raises(MammofedError, match="plain word: '../x'"):
        export_model(run.ckdir, out, site="../x", state_dir=run.state_dir)
    (tmp_path / "d").mkdir()
    with pytest.raises(ExportError, match="d: is a folder"):
        export_model(run.ckdir, tmp_path / "d", site=SITE, state_dir=run.state_dir)
    assert not out.exists()


# --- a last round that no server message settled ------------------------------
def _pending_state(run: Run, dst: Path, node: int) -> Path:
    """A copy of the site's state whose round 1 is still pending for ``node``:
    its personal layers in ``pending/``, none committed (the state a site has
    when the run sent it no message after its last round)."""
    state = _copy_state(run, dst)
    site = state / SITE
    (site / PENDING_DIR).mkdir()
    os.replace(site / PERSONAL_NPZ, site / PENDING_DIR / PERSONAL_NPZ)
    (site / PENDING_JSON).write_text(json.dumps({"round": 1, "node": node}))
    return state


def _round_kept_by(run: Run, dst: Path, nodes: list[int] | None) -> Path:
    def version(doc: dict[str, Any]) -> None:
        if nodes is not None:
            doc["metrics"]["model"] = {"round": 1, "nodes": nodes}

    return _copy_round(run.ckdir, dst, meta=version)


def test_pending_last_round_is_committed_when_the_round_file_kept_it(
    run, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="client.export")
    state = _pending_state(run, tmp_path / "s", node=7)
    round_file = _round_kept_by(run, tmp_path / "ck", nodes=[3, 7])
    export_model(round_file, tmp_path / "a.pt", site=SITE, state_dir=state)
    ck = load_checkpoint(tmp_path / "a.pt")
    for k, v in run.composed.items():
        assert torch.equal(ck.state_dict[k], v), k
    s = SiteState(state, SITE)
    assert s.pending() is None and (state / SITE / PERSONAL_NPZ).is_file()
    assert "kept its update: committed" in caplog.text


@pytest.mark.parametrize("nodes", [[3], None, ["7"]])
def test_pending_last_round_is_kept_pending_when_not_shown_kept(
    run, tmp_path, caplog, nodes
):
    """Another node's update, no version saved, or a malformed one: the
    pending round is neither taken nor thrown away, and the export says so."""
    state = _pending_state(run, tmp_path / "s", node=7)
    round_file = _round_kept_by(run, tmp_path / "ck", nodes=nodes)
    # nothing was ever committed in this copy: the export has no personal state
    with pytest.raises(MammofedError, match=r"personal\.npz: does not exist"):
        export_model(round_file, tmp_path / "a.pt", site=SITE, state_dir=state)
    assert SiteState(state, SITE).pending() == {"round": 1, "node": 7}
    assert (state / SITE / PENDING_DIR / PERSONAL_NPZ).is_file()
    assert "does not list this node (7)" in caplog.text
