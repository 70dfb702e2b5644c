"""What a hostile (or buggy) coordinator can make a site's ClientApp do.

The hospital runs only the app the coordinator signed, but whoever launches a
run chooses its ``run_config`` and every message: these tests send such
messages and configs to the real ClientApp (or the piece that reads them) and
check that the site's own state, folders and privacy floor hold.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import app, resolve_site
from client.state import PENDING_JSON, SiteState, SiteStateError
from common.errors import ConfigError
from common.keys import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from common.wire.faults import SITE_CONFIG, SITE_STATE, ModelVersion
from common.wire.federation import (
    NODE_DATA_DIR,
    NODE_SITE,
    NODE_SITE_CONFIG,
    NODE_STATE_DIR,
    RUN_FEDERATION_JSON,
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


def _context(cfg: FederationConfig, state_dir: Path) -> Context:
    return app_context(state_dir, federation_config_to_json(cfg), NODE)


def _initial(cfg: FederationConfig, tmp_path: Path) -> dict[str, np.ndarray]:
    from client.toy import build_toy

    return build_toy("x", tmp_path / "unused", cfg).initial_shared()


def _msg(
    cfg: FederationConfig,
    arrays: dict[str, np.ndarray],
    rnd: int,
    version: ModelVersion,
    kind: str = "train",
) -> Message:
    config = FitInstructions.from_federation(cfg, rnd).to_config_record()
    for key, value in version.to_config().items():
        config[key] = value
    content = RecordDict({ARRAYS_KEY: arrays_to_record(arrays), CONFIG_KEY: config})
    return Message(content, dst_node_id=NODE, message_type=kind)


def _personal(state_dir: Path) -> dict[str, np.ndarray]:
    with np.load(state_dir / "site-a" / "personal.npz") as z:
        return {k: z[k].copy() for k in z.files}


# --- 1. finite but absurd global arrays must not poison the personal state -------
def test_huge_global_arrays_never_leave_non_finite_personal_state(
    tmp_path: Path,
) -> None:
    """Global arrays of 1e30 (finite, so accepted on the wire) make every
    forward overflow: BatchNorm's running statistics (FedBN: personal, never
    sent) become NaN while every step is skipped and the reply stays valid. A
    server that then says it kept the update must not get that NaN committed
    into the site's personal state (from there on no step of any round would
    train again)."""
    cfg, state = _cfg(), tmp_path / "state"
    ctx = _context(cfg, state)
    shared = _initial(cfg, tmp_path)
    reply = app(_msg(cfg, shared, 1, ModelVersion(0, ())), ctx)
    assert not reply.has_error()
    reply = app(_msg(cfg, shared, 2, ModelVersion(1, (NODE,))), ctx)  # commits 1
    assert not reply.has_error()
    before = _personal(state)
    assert all(np.isfinite(v).all() for v in before.values())

    huge = {
        k: np.where(v == 0, 1e30, v * 1e30).astype(v.dtype) for k, v in shared.items()
    }
    reply = app(_msg(cfg, huge, 3, ModelVersion(2, (NODE,))), ctx)  # commits 2
    after_two = _personal(state)
    # the server claims it kept round 3's update (its evaluate message says so)
    app(_msg(cfg, shared, 3, ModelVersion(3, (NODE,)), "evaluate"), ctx)
    kept = _personal(state)
    bad = sorted(k for k, v in kept.items() if not np.isfinite(v).all())
    assert bad == [], f"non-finite personal arrays committed: {bad}"
    assert reply.has_error() and reply.error.code == SITE_STATE
    for k, v in after_two.items():  # round 3 changed nothing of the site's
        np.testing.assert_array_equal(kept[k], v)
    # and the site trains normally again on a sane model
    reply = app(_msg(cfg, shared, 4, ModelVersion(3, ())), ctx)
    assert not reply.has_error()
    assert reply.content[METRICS_KEY]["skipped-steps"] == 0


def test_save_personal_names_the_non_finite_array(tmp_path: Path) -> None:
    state = SiteState(tmp_path, "site-a")
    with pytest.raises(SiteStateError, match=r"'bn\.running_var'.*NaN or Inf"):
        state.save_personal(
            {"bn.weight": np.ones(2), "bn.running_var": np.array([1.0, np.inf])}
        )
    assert not state.personal_path.exists()


# --- 2. a round the site failed is never committed, whatever the server says -----
def test_a_round_that_failed_on_the_site_is_discarded_not_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Personal files written during a round whose handler then failed (here:
    a failure after the trainer stored its state) sit under ``pending/``; the
    site replied an error, so nothing of that round may become its state, even
    when the next message claims the server aggregated this node's update."""
    from client.toy import ToyTrainer

    cfg, state_dir = _cfg(), tmp_path / "state"
    ctx = _context(cfg, state_dir)
    shared = _initial(cfg, tmp_path)
    assert not app(_msg(cfg, shared, 1, ModelVersion(0, ())), ctx).has_error()
    assert not app(_msg(cfg, shared, 2, ModelVersion(1, (NODE,))), ctx).has_error()

    real_fit = ToyTrainer.fit

    def fit_then_fail(self: ToyTrainer, shared: Any, config: Any) -> Any:
        real_fit(self, shared, config)  # personal state written (pending)
        raise RuntimeError("disk full after the personal state was written")

    monkeypatch.setattr(ToyTrainer, "fit", fit_then_fail)
    reply = app(_msg(cfg, shared, 3, ModelVersion(2, (NODE,))), ctx)
    assert reply.has_error()
    before = _personal(state_dir)  # round 2, committed by that message
    monkeypatch.setattr(ToyTrainer, "fit", real_fit)
    assert not (state_dir / "site-a" / PENDING_JSON).exists()
    # the hostile claim: round 3 was aggregated with this node's update
    app(_msg(cfg, shared, 3, ModelVersion(3, (NODE,)), "evaluate"), ctx)
    after = _personal(state_dir)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
    meta = SiteState(state_dir, "site-a").read_meta()
    assert meta["committed_round"] == 2 and 3 in meta["discarded_rounds"]


# --- 3. the run may not choose the site's folders --------------------------------
def test_the_run_may_not_choose_a_site_state_dir(tmp_path: Path) -> None:
    """A node named by ``site`` without its own ``state-dir`` took the run's
    ``state_dir``: the launcher could point it at a fresh folder (a DP
    accountant with nothing spent) or write the site's state anywhere."""
    cfg = dataclasses.replace(_cfg(), state_dir=tmp_path / "run-chosen")
    with pytest.raises(ConfigError, match="state-dir"):
        resolve_site({NODE_SITE: "h1"}, cfg)
    b = resolve_site({NODE_SITE: "h1", NODE_STATE_DIR: str(tmp_path / "own")}, cfg)
    assert b.state_dir == tmp_path / "own"


def test_the_run_may_not_choose_the_images_of_a_configured_site(
    tmp_path: Path,
) -> None:
    """A site config without ``cache_dir``/``data_dir`` made the detector read
    ``<trainer.options.cache_root>/<site>``: a folder the launcher names."""
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(f"name: site-a\nstate_dir: {tmp_path / 'state'}\n")
    base = load_federation_config(REPO / "configs" / "federation" / "sim-demo.yaml")
    elsewhere = tmp_path / "another-cache"
    trainer = dataclasses.replace(
        base.trainer, options={**base.trainer.options, "cache_root": str(elsewhere)}
    )
    cfg = dataclasses.replace(base, trainer=trainer)
    with pytest.raises(ConfigError, match="cache_root") as err:
        resolve_site({NODE_SITE_CONFIG: str(site_yaml)}, cfg)
    assert str(elsewhere) in str(err.value) and "site.yaml" in str(err.value)
    # a site config naming its cache keeps it, whatever the run's cache_root
    own = tmp_path / "own-cache"
    site_yaml.write_text(
        f"name: site-a\nstate_dir: {tmp_path / 'state'}\ncache_dir: {own}\n"
    )
    assert resolve_site({NODE_SITE_CONFIG: str(site_yaml)}, cfg).data_dir == own
    # nor of a node named by the site and state-dir keys: data-dir is required
    node = {NODE_SITE: "site-a", NODE_STATE_DIR: str(tmp_path / "state")}
    with pytest.raises(ConfigError, match="data-dir: missing for site 'site-a'") as e:
        resolve_site(node, cfg)
    assert str(elsewhere) in str(e.value)
    node[NODE_DATA_DIR] = str(own)
    assert resolve_site(node, cfg).data_dir == own
    assert resolve_site(node | {NODE_DATA_DIR: ""}, base).data_dir is None


# --- 4. the run's delta may not void the site's epsilon floor ---------------------
class _Women:
    """A labeled view of ``n`` women, one image each (targets only)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def target(self, i: int) -> dict[str, Any]:
        return {"patient_id": f"w{i}"}

    def __getitem__(self, i: int) -> Any:
        raise AssertionError("no image may be read: the round is refused first")


def _private_round(tmp_path: Path, **options: Any) -> Any:
    from client.detector_trainer import DetectorOptions, PrivateRound

    opts = DetectorOptions(dp=True, **options)
    return PrivateRound(
        torch.nn.Linear(1, 1),
        opts,
        tmp_path,
        planned_rounds=3,
        device=torch.device("cpu"),
        site="site-a",
    )


def test_a_run_delta_of_one_half_is_refused(tmp_path: Path) -> None:
    """``dp_delta: 0.5`` passes the site's ``privacy.max_epsilon`` floor (it
    checks epsilon only), yet (8, 0.5)-DP allows publishing half the women's
    data outright: the site refuses a delta of at least 1/n (n = its women)."""
    from common.detector.dp import PrivacyError

    rnd = _private_round(tmp_path, dp_delta=0.5, dp_epsilon=8.0)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyError, match=r"trainer\.options\.dp_delta = 0\.5"):
        rnd(_Women(20), opt, None, FitInstructions(server_round=1))
    assert not (tmp_path / "dp_accountant.json").exists()


def test_a_stored_plan_with_a_void_delta_is_refused(tmp_path: Path) -> None:
    """The plan's delta is kept for the life of the accountant: one run that
    planned at delta 0.4 would void every later run's epsilon."""
    from common.detector.dp import (
        DP_ACCOUNTANT_JSON,
        DPPlan,
        PrivacyAccountant,
        PrivacyError,
    )

    acc = PrivacyAccountant(tmp_path / DP_ACCOUNTANT_JSON)
    acc.plan = DPPlan(
        target_epsilon=8.0,
        delta=0.4,
        noise_multiplier=0.5,
        sample_rate=0.4,
        planned_steps=9,
        max_grad_norm=1.0,
        patients_per_step=8,
        n_patients=20,
    )
    acc.save()
    rnd = _private_round(tmp_path)  # the run asks the default delta
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stored = r"dp_accountant\.json: the stored DP plan's delta 0\.4 is not below"
    with pytest.raises(PrivacyError, match=stored):
        rnd(_Women(20), opt, None, FitInstructions(server_round=1))


def test_the_default_and_a_small_delta_are_accepted(tmp_path: Path) -> None:
    from client.detector_trainer import check_dp_delta
    from common.detector.dp import DP_ACCOUNTANT_JSON, DPPlan, PrivacyAccountant

    # a plan at the default delta of 10 women stays valid once the site has 13
    acc = PrivacyAccountant(tmp_path / DP_ACCOUNTANT_JSON)
    acc.plan = DPPlan(8.0, 1 / 10**1.1, 0.9, 0.8, 9, 1.0, 8, 10)
    acc.save()
    assert check_dp_delta(_private_round(tmp_path).dp, 13) == 1 / 10**1.1

    for explicit in (0.0, 1e-5):
        rnd = _private_round(tmp_path / str(explicit), dp_delta=explicit)
        assert check_dp_delta(rnd.dp, 20) < 1 / 20
    assert check_dp_delta(_private_round(tmp_path / "one").dp, 1) < 1.0


# --- 5. the run config is no oracle of the site's files ---------------------------
@pytest.mark.parametrize("key", ["initial_arrays", "initial_checkpoint"])
def test_server_only_paths_of_the_run_are_not_probed_on_the_site(
    tmp_path: Path, key: str
) -> None:
    """``initial_arrays``/``initial_checkpoint`` seed the server's round 0 and
    must exist where loaded. Checked on the site, they told the launcher
    whether any path exists on the hospital's disk (error SITE_CONFIG or a
    normal reply), e.g. a folder named by a patient id."""
    cfg, state = _cfg(), tmp_path / "state"
    shared = _initial(cfg, tmp_path)
    secret = tmp_path / "dicom" / "P-00417"
    secret.mkdir(parents=True)
    outcomes = []
    for probe in (secret, tmp_path / "dicom" / "P-99999"):
        data = json.loads(federation_config_to_json(cfg))
        data[key] = str(probe)
        ctx = _context(cfg, state)
        ctx.run_config[RUN_FEDERATION_JSON] = json.dumps(data)
        reply = app(_msg(cfg, shared, 1, ModelVersion(0, ())), ctx)
        outcomes.append(reply.error.code if reply.has_error() else "ok")
    assert outcomes == ["ok", "ok"]


# --- a message whose personalization split is not the site's run config -----------
@pytest.mark.parametrize("field", ["local_norm", "personal_head"])
def test_a_round_with_another_personalization_split_is_refused_by_the_app(
    tmp_path: Path, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Checked in the ClientApp for every trainer (was: by the toy trainer only)."""
    cfg = _cfg()
    ctx = _context(cfg, tmp_path / "state")
    flipped = dataclasses.replace(
        cfg,
        personalization=dataclasses.replace(
            cfg.personalization, **{field: not getattr(cfg.personalization, field)}
        ),
    )
    reply = app(_msg(flipped, _initial(cfg, tmp_path), 1, ModelVersion(0, ())), ctx)
    # the reply names no detail (no free text leaves the site); the log does
    assert reply.has_error() and reply.error.code == SITE_CONFIG
    assert "local-norm/personal-head" in caplog.text
    assert "the site's run config says" in caplog.text
    assert not (tmp_path / "state" / "site-a" / "personal.npz").exists()
