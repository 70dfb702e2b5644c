"""End to end: phantom -> ingest -> central and federated regimes -> report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.detector.model import build_detector, norm_keys
from common.wire import runfolder as RF
from common.wire.federation import load_federation_config
from server.checkpoints import CheckpointStore
from simulation import regimes as R
from simulation.report import write_report
from simulation.run import RunRequest, run_study

REPO = Path(__file__).resolve().parents[2]
SCENARIO = REPO / "configs" / "simulation" / "test.yaml"
FEDERATION = REPO / "configs" / "federation" / "sim-test.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=out / "run",
        regimes=(R.BASE, R.LOCAL_HEAD, R.FEDAVG, R.PERSONALIZED, R.ORACLE),
        data=out / "data",
        workers=1,
        n_boot=20,
    )
    return run_study(req)


@pytest.mark.slow
def test_every_regime_writes_per_site_metrics(study: Path) -> None:
    for regime in (R.BASE, R.LOCAL_HEAD, R.FEDAVG, R.PERSONALIZED, R.ORACLE):
        data = json.loads((study / regime / RF.METRICS_JSON).read_text())
        assert data["regime"] == regime
        # sites A and C have test women in the test scenario
        assert {"A", "C"} <= set(data["sites"])
        for site in data["sites"].values():
            for cls in ("mass", "calcification"):
                c = site["classes"][cls]
                assert set(c) >= {"cpm", "cpm_ci95", "sensitivity_at_fp", "ap", "curve"}
        # every scored image kept, and re-scoring it gives the written CPM
        from common.detector.froc import froc_class
        from simulation.report import load_detections

        dets = load_detections(study / regime / RF.DETECTIONS_JSON)
        assert set(dets) == set(data["sites"])
        for name, images in dets.items():
            assert len(images) == data["sites"][name]["n_images"]
            assert all(im.case.startswith(f"PH-{name}-") for im in images)
            want = data["sites"][name]["classes"]["mass"]["cpm"]
            got = froc_class(images, 0).cpm
            assert (want is None and math.isnan(got)) or got == pytest.approx(want)


@pytest.mark.slow
def test_federated_rounds_log_bytes_and_personal_state_stays_on_site(
    study: Path,
) -> None:
    rows = [
        json.loads(x)
        for x in (study / R.PERSONALIZED / RF.ROUNDS_JSONL).read_text().splitlines()
    ]
    assert rows and all(r["bytes_sent"] > 0 for r in rows if "bytes_sent" in r)
    fed = load_federation_config(FEDERATION)
    from client.detector_trainer import DetectorOptions

    opts = DetectorOptions(**dict(fed.trainer.options))
    model = build_detector(opts.model_config())
    sd = model.state_dict()
    nkeys = set(norm_keys(model))
    last = CheckpointStore(study / R.PERSONALIZED / "server" / "checkpoints").latest()
    assert last is not None and last.round == 1
    # FedBN: no norm layer reached the server; the sent bytes are the shared
    # float32 arrays plus a small per-array header (numpy's .npy format).
    assert not nkeys & set(last.arrays)
    shared_bytes = sum(np.asarray(v).nbytes for v in last.arrays.values())
    overhead = 256 * len(last.arrays)
    for r in rows:
        if "bytes_sent" in r:
            assert shared_bytes <= r["bytes_sent"] <= shared_bytes + overhead
    # each site keeps its norm layers and personal head on its own disk
    for site in ("A", "B", "C"):
        npz = np.load(study / R.PERSONALIZED / "site-state" / site / "personal.npz")
        assert nkeys <= set(npz.files)
        assert any(k.startswith("personal-head/") for k in npz.files)
        k = sorted(nkeys)[0]
        assert npz[k].shape == tuple(sd[k].shape)


@pytest.mark.slow
def test_report_from_study(study: Path, tmp_path: Path) -> None:
    md = write_report([study], tmp_path / "report")
    text = md.read_text()
    assert "## CPM: mass" in text and "| A |" in text
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["regimes"] == [
        R.BASE,
        R.LOCAL_HEAD,
        R.FEDAVG,
        R.PERSONALIZED,
        R.ORACLE,
    ]


@pytest.mark.slow
def test_detector_clients_send_only_declared_arrays_and_whitelisted_metrics(
    study: Path, tmp_path: Path
) -> None:
    """Privacy by construction, with the real detector trainer on phantom DICOM."""
    from flwr.app import Context, Message

    from client.app import app
    from client.detector_trainer import DetectorTrainer
    from common.wire.federation import (
        METRIC_WHITELIST,
        RUN_FEDERATION_JSON,
        federation_config_to_json,
    )
    from server.federation import run_federation
    from simulation.grid import InProcessGrid
    from simulation.run import regime_config

    caches = {s: study.parent / "data" / "cache" / s for s in ("A", "B", "C")}
    base = load_federation_config(FEDERATION)
    req = RunRequest(SCENARIO, FEDERATION, tmp_path)
    fed = regime_config(base, R.PERSONALIZED, req, tmp_path, list(caches))
    sent: list[Message] = []

    def spy(msg: Message, ctx: Context) -> Message:
        reply = app(msg, ctx)
        sent.append(reply)
        return reply

    grid = InProcessGrid(
        spy,
        {
            100 + i: (s, str(fed.state_dir), str(c))
            for i, (s, c) in enumerate(caches.items())
        },
        {RUN_FEDERATION_JSON: federation_config_to_json(fed)},
    )
    assert fed.run_dir is not None and fed.state_dir is not None
    run_federation(grid, fed, fed.run_dir)
    trainer = DetectorTrainer("A", fed.state_dir, fed, caches["A"])
    spec = trainer.shared_spec()
    assert not set(spec) & set(norm_keys(trainer.model))  # FedBN: norms stay home
    n_arrays = 0
    assert len(sent) >= 6  # query + train and evaluate from every site
    for reply in sent:
        assert not reply.has_error(), reply.error
        content = reply.content
        assert not content.config_records  # no strings, paths or identifiers
        for record in content.array_records.values():
            assert {k: tuple(a.shape) for k, a in record.items()} == spec
            n_arrays += 1
        for record in content.metric_records.values():
            assert set(record) <= METRIC_WHITELIST
            assert all(isinstance(v, int | float) for v in record.values())
    assert n_arrays >= 3


def test_a_run_where_no_round_aggregated_is_an_error(tmp_path: Path) -> None:
    from common.errors import MammofedError
    from simulation.run import _require_an_aggregated_round

    fail = {
        "check": "client-error",
        "node": 7,
        "reason": "site B: data dir data/B does not exist",
    }
    kept = {"status": "kept-previous", "train": {"failed": [fail], "rejected": []}}
    rows = [{"round": r, **kept} for r in (1, 2)]
    (tmp_path / "rounds.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    with pytest.raises(MammofedError, match=r"\[fedavg\] no round aggregated") as exc:
        _require_an_aggregated_round("fedavg", tmp_path)
    assert "round 1 train node 7 (client-error): site B: data dir" in str(exc.value)
    # one aggregated round is enough (a bad round keeps the previous model)
    rows.append({"round": 3, "status": "aggregated", "train": {}})
    (tmp_path / "rounds.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    _require_an_aggregated_round("fedavg", tmp_path)
    with pytest.raises(MammofedError, match="no failure was recorded"):
        _require_an_aggregated_round("fedavg", tmp_path / "missing")


@pytest.mark.slow
def test_personal_head_benchmark_rescored_stored_arm_matches_the_run(
    study: Path, tmp_path: Path
) -> None:
    """benchmarks.personal_head: 'stored' reproduces metrics.json; arms pair."""
    from benchmarks import personal_head as ph

    site_state = study / R.PERSONALIZED / "site-state"
    before = {p: p.read_bytes() for p in site_state.rglob("personal.npz")}
    ph.main(
        ["--run", str(study), "--data", str(study.parent / "data")]
        + ["--ft-epochs", "1", "--norms-from", "A", "--n-boot", "20"]
        + ["--results", str(tmp_path)]
    )
    rows = [
        json.loads(x)
        for x in (tmp_path / "personal_head.jsonl").read_text().splitlines()
    ]
    data = json.loads((study / R.PERSONALIZED / RF.METRICS_JSON).read_text())
    stored = {
        r["context"]["site"]: r["value"]
        for r in rows
        if r["figure"] == "stored-cpm-mass"
    }
    assert set(stored) == set(data["sites"])
    for site, v in stored.items():
        want = data["sites"][site]["classes"]["mass"]["cpm"]
        assert (want is None and math.isnan(v)) or v == pytest.approx(want)
    figures = {(r["context"]["site"], r["figure"]) for r in rows}
    for site in stored:
        for arm in ("global", "global-ft1", "stored-site-stats"):
            assert (site, f"{arm}-minus-stored-cpm-mass") in figures
    # another site's norms are tried on every site but that one
    assert ("C", "norms-A-cpm-mass") in figures
    assert ("A", "norms-A-cpm-mass") not in figures
    # nothing of the run's site state was touched
    assert {p: p.read_bytes() for p in site_state.rglob("personal.npz")} == before


@pytest.mark.slow
def test_compare_runs_pairs_two_regime_folders(study: Path, tmp_path: Path) -> None:
    from benchmarks import compare_runs

    same = compare_runs.compare(study / R.PERSONALIZED, study / R.PERSONALIZED)
    assert same and all(r["diff"] == 0 or math.isnan(r["diff"]) for r in same)
    rows = compare_runs.compare(study / R.FEDAVG, study / R.PERSONALIZED, n_boot=50)
    data = {
        r: json.loads((study / r / RF.METRICS_JSON).read_text())
        for r in (R.FEDAVG, R.PERSONALIZED)
    }
    for row in rows:
        want_a = data[R.FEDAVG]["sites"][row["site"]]["classes"][row["class"]]["cpm"]
        want_b = data[R.PERSONALIZED]["sites"][row["site"]]["classes"][row["class"]]
        assert row["cpm_a"] == (None if want_a is None else round(want_a, 4))
        assert row["cpm_b"] == (
            None if want_b["cpm"] is None else round(want_b["cpm"], 4)
        )
    compare_runs.main(
        ["--a", str(study / R.FEDAVG), "--b", str(study / R.PERSONALIZED)]
        + ["--results", str(tmp_path), "--n-boot", "20"]
    )
    lines = (tmp_path / "compare_runs.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    assert json.loads(lines[0])["context"]["seconds_a"] is not None
    # several runs per side pool over seeds; the same run twice pools to 0
    twice = [study / R.FEDAVG, study / R.FEDAVG]
    pooled = compare_runs.compare(twice, [study / R.PERSONALIZED] * 2, n_boot=50)
    for one, two in zip(rows, pooled, strict=True):
        assert two["n_runs"] == 2 and two["cpm_a"] == one["cpm_a"]
        assert two["diff"] == pytest.approx(one["diff"]) or math.isnan(one["diff"])
    with pytest.raises(ValueError, match="not paired"):
        compare_runs.compare(twice, [study / R.PERSONALIZED])


@pytest.mark.slow
def test_seed_and_rounds_flags_are_validated_and_recorded(
    study: Path, tmp_path: Path
) -> None:
    import yaml

    from common.errors import ConfigError

    def req(**kw) -> RunRequest:
        return RunRequest(
            scenario=SCENARIO,
            federation=FEDERATION,
            out=tmp_path / "run",
            regimes=(R.BASE,),
            data=study.parent / "data",
            workers=1,
            n_boot=0,
            **kw,
        )

    with pytest.raises(ConfigError, match=r"run flags: num_rounds: must be >= 1"):
        run_study(req(rounds=0))
    out = run_study(req(seed=7))
    resolved = yaml.safe_load((out / "configs" / "federation.yaml").read_text())
    assert resolved["seed"] == 7
    # another seed, the same test images: the runs can be paired
    from simulation.report import load_detections

    a = load_detections(study / R.BASE / RF.DETECTIONS_JSON)
    b = load_detections(out / R.BASE / RF.DETECTIONS_JSON)
    assert {s: sorted(i.key for i in v) for s, v in a.items()} == {
        s: sorted(i.key for i in v) for s, v in b.items()
    }


@pytest.mark.slow
def test_seed_spread_summarises_runs_and_ratios(study: Path, tmp_path: Path) -> None:
    from benchmarks import seed_spread

    runs = [
        (R.PERSONALIZED, study / R.PERSONALIZED),
        (R.PERSONALIZED, study / R.FEDAVG),  # a stand-in for a second seed
        (R.ORACLE, study / R.ORACLE),
    ]
    table = seed_spread.cpms(runs)
    data = {
        r: json.loads((study / r / RF.METRICS_JSON).read_text())
        for r in (R.PERSONALIZED, R.FEDAVG)
    }
    for site, classes in table[R.PERSONALIZED].items():
        got = classes["mass"]
        want = [data[r]["sites"][site]["classes"]["mass"]["cpm"] for r in data]
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            assert (w is None and math.isnan(g)) or g == pytest.approx(w)
    s = seed_spread.summary([0.2, 0.4, float("nan")])
    assert s["mean"] == pytest.approx(0.3) and s["n"] == 2
    assert (s["min"], s["max"]) == (0.2, 0.4)
    argv = [f"--run={r}={p}" for r, p in runs]
    seed_spread.main(
        [*argv, "--ratio", "personalized/oracle", "--results", str(tmp_path)]
    )
    lines = [
        json.loads(x) for x in (tmp_path / "seed_spread.jsonl").read_text().splitlines()
    ]
    figures = {d["figure"] for d in lines}
    assert {"personalized-cpm-mass", "oracle-cpm-mass"} <= figures
    assert "personalized-over-oracle-cpm-mass" in figures


@pytest.mark.slow
def test_two_phase_every_regime_starts_from_the_base_model(study: Path) -> None:
    """The base model is written first and is every federated run's round 0."""
    import dataclasses

    from common.detector.model.initial import checkpoint_arrays
    from simulation.run import BASE_MODEL, regime_config

    base = study / R.BASE / BASE_MODEL
    assert base.is_file()
    fed = load_federation_config(FEDERATION)
    req = RunRequest(SCENARIO, FEDERATION, study)
    for regime in (R.FEDAVG, R.PERSONALIZED):
        cfg = regime_config(fed, regime, req, study, ["A", "B", "C"])
        cfg = dataclasses.replace(cfg, initial_checkpoint=base)
        shared, defaults = checkpoint_arrays(base, cfg)
        store = CheckpointStore(study / regime / "server" / "checkpoints")
        first = store.load(0).arrays
        assert set(first) == set(shared)
        assert all(np.array_equal(first[k], shared[k]) for k in shared)
        assert bool(defaults) == (regime == R.PERSONALIZED)  # FedBN norms


@pytest.mark.slow
def test_parallel_seeds_match_the_same_seeds_run_one_after_another(
    study: Path, tmp_path: Path
) -> None:
    """``--parallel``: seeds in worker processes give what a lone run of each gives."""
    from simulation.run import run_seeds

    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=tmp_path / "par",
        regimes=(R.BASE,),
        data=study.parent / "data",
        workers=1,
        n_boot=0,
        threads=1,
    )
    runs = run_seeds(req, (5, 6), parallel=2)
    assert runs == [tmp_path / "par" / "seed-5", tmp_path / "par" / "seed-6"]
    alone = run_study(
        RunRequest(**{**req.__dict__, "out": tmp_path / "alone", "seed": 6})
    )
    par = (runs[1] / R.BASE / RF.DETECTIONS_JSON).read_text()
    assert par == (alone / R.BASE / RF.DETECTIONS_JSON).read_text()
    import yaml

    for run, seed in zip(runs, (5, 6), strict=True):
        fed = yaml.safe_load((run / "configs" / "federation.yaml").read_text())
        assert fed["seed"] == seed and fed["trainer"]["options"]["threads"] == 1


@pytest.mark.slow
def test_reuse_reads_scored_regimes_and_refuses_another_runs_settings(
    study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--reuse``: a regime the earlier run scored is read, the rest trained."""
    import dataclasses

    from common.errors import ConfigError
    from simulation.run import BASE_MODEL

    base = study / R.BASE / BASE_MODEL
    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=tmp_path / "more",
        regimes=(R.BASE, R.FEDAVG, R.LOCAL_ONLY),
        data=study.parent / "data",
        workers=1,
        n_boot=20,
        base_checkpoint=base,
        reuse=(study,),
    )
    more = run_study(req)
    run = RF.read_record(RF.StudyRun, more / RF.RUN_JSON)
    # base and fedavg come from the earlier run; local-only was not in it
    assert run.reused == {R.BASE: str(study), R.FEDAVG: str(study)}
    # not trained here: no server; its per-round rows copied for the report
    assert not (more / R.FEDAVG / "server").exists()
    assert (more / R.FEDAVG / RF.ROUNDS_JSONL).read_bytes() == (
        study / R.FEDAVG / RF.ROUNDS_JSONL
    ).read_bytes()
    assert (more / R.LOCAL_ONLY / RF.METRICS_JSON).is_file()
    for regime in (R.BASE, R.FEDAVG):
        assert (more / regime / RF.DETECTIONS_JSON).read_text() == (
            study / regime / RF.DETECTIONS_JSON
        ).read_text()
        theirs = json.loads((study / regime / RF.METRICS_JSON).read_text())
        ours = json.loads((more / regime / RF.METRICS_JSON).read_text())
        for site, m in ours["sites"].items():
            for cls in ("mass", "calcification"):
                assert (
                    m["classes"][cls]["cpm"]
                    == theirs["sites"][site]["classes"][cls]["cpm"]
                )
    # a report over both runs counts the copied regimes once (one seed each)
    from simulation.report import collect

    data = collect([study, more])
    assert len(data["seed_metrics"][R.FEDAVG]) == 1
    assert len(data["detections"][R.FEDAVG]) == 1
    assert len(collect([more])["seed_metrics"][R.FEDAVG]) == 1
    # without --base-checkpoint the earlier run's base model is taken
    again = run_study(
        dataclasses.replace(
            req, out=tmp_path / "again", base_checkpoint=None, regimes=(R.FEDAVG,)
        )
    )
    assert RF.read_record(RF.StudyRun, again / RF.RUN_JSON).reused == {
        R.FEDAVG: str(study)
    }
    # the command line: --reuse repeatable, the report written at the end
    from simulation.cli import main as sim_main

    argv = ["run", "--scenario", str(SCENARIO), "--federation", str(FEDERATION)]
    argv += ["--data", str(study.parent / "data"), "--out", str(tmp_path / "cli")]
    argv += ["--regime", R.FEDAVG, "--n-boot", "0", "--workers", "1"]
    monkeypatch.chdir(tmp_path)  # a relative --reuse is recorded absolute
    assert sim_main([*argv, "--reuse", "more", "--reuse", str(study)]) == 0
    cli = RF.read_record(RF.StudyRun, tmp_path / "cli" / RF.RUN_JSON)
    # the first --reuse run that scored the regime gives it
    assert cli.reused == {R.FEDAVG: str((tmp_path / "more").resolve())}
    assert (tmp_path / "cli" / "report" / "report.md").is_file()
    # a report made from elsewhere still counts the copied regime once
    monkeypatch.chdir(REPO)
    data = collect([tmp_path / "more", tmp_path / "cli"])
    assert len(data["seed_metrics"][R.FEDAVG]) == 1
    # other settings (another seed), another base model, or no run folder: refused
    with pytest.raises(ConfigError, match="federation.yaml"):
        run_study(dataclasses.replace(req, out=tmp_path / "seed", seed=5))
    import torch

    from client.detector_trainer import detector_options
    from common.detector.checkpoint import init_from_checkpoint, save_checkpoint

    opts = detector_options(load_federation_config(FEDERATION), str(FEDERATION))
    model = build_detector(opts.model_config())
    init_from_checkpoint(model, opts.model_config(), base)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    other = save_checkpoint(tmp_path / "other-base.pt", model, opts.model_config())
    with pytest.raises(ConfigError, match="base/model.pt"):
        run_study(dataclasses.replace(req, out=tmp_path / "b2", base_checkpoint=other))
    # an earlier run whose settings file is broken: refused, naming the file
    bad = tmp_path / "bad"
    (bad / RF.CONFIGS_DIR).mkdir(parents=True)
    (bad / RF.RUN_JSON).write_bytes((study / RF.RUN_JSON).read_bytes())
    for name in ("scenario.yaml", "federation.yaml"):
        (bad / RF.CONFIGS_DIR / name).write_bytes(
            (study / RF.CONFIGS_DIR / name).read_bytes()
        )
    (bad / RF.CONFIGS_DIR / "federation.yaml").write_text("trainer: [\n")
    with pytest.raises(ConfigError, match=r"bad/configs/federation.yaml.*not valid"):
        run_study(dataclasses.replace(req, out=tmp_path / "b3", reuse=(bad,)))
    with pytest.raises(ConfigError, match="run.json"):
        run_study(dataclasses.replace(req, out=tmp_path / "r", reuse=(tmp_path / "x",)))


@pytest.mark.slow
def test_set_changes_the_federation_config_and_is_recorded(
    study: Path, tmp_path: Path
) -> None:
    """``--set KEY=VALUE``: one option tried without a copy of the file; the
    run's resolved config holds it, so ``--reuse`` pairs only runs with the
    same settings, and a mistyped option stops the run before any work."""
    import dataclasses

    import yaml

    from common.errors import ConfigError
    from simulation.cli import main as sim_main
    from simulation.run import BASE_MODEL

    argv = ["run", "--scenario", str(SCENARIO), "--federation", str(FEDERATION)]
    argv += ["--data", str(study.parent / "data"), "--n-boot", "0", "--workers", "1"]
    argv += ["--base-checkpoint", str(study / R.BASE / BASE_MODEL)]
    out = tmp_path / "set"
    setting = ["--set", "trainer.options.ssl_unsup_weight=0.25"]
    setting += ["--set", "trainer.learning_rate=0.002"]
    assert sim_main([*argv, "--out", str(out), "--regime", R.BASE, *setting]) == 0
    resolved = yaml.safe_load((out / RF.CONFIGS_DIR / "federation.yaml").read_text())
    assert resolved["trainer"]["options"]["ssl_unsup_weight"] == 0.25
    assert resolved["trainer"]["learning_rate"] == 0.002
    plain = yaml.safe_load((study / RF.CONFIGS_DIR / "federation.yaml").read_text())
    del resolved["trainer"]["options"]["ssl_unsup_weight"]
    assert plain["trainer"]["learning_rate"] != 0.002
    resolved["trainer"]["learning_rate"] = plain["trainer"]["learning_rate"]
    assert resolved == plain  # nothing else changed
    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=tmp_path / "pair",
        regimes=(R.FEDAVG,),
        data=study.parent / "data",
        workers=1,
        n_boot=0,
        base_checkpoint=study / R.BASE / BASE_MODEL,
        reuse=(study,),
        settings=("trainer.options.ssl_unsup_weight=0.25",),
    )
    with pytest.raises(ConfigError, match="federation.yaml.*other settings"):
        run_study(req)
    for settings, message in [
        (
            ("trainer.options.ssl_unsup_wieght=0",),
            r"with --set: trainer.options.ssl_unsup_wieght: unknown key",
        ),
        (("strategy.server_lr=0",), r"mammofed-sim run --set: strategy.server_lr"),
        (("trainer.options=3",), r"mammofed-sim run --set: trainer.options"),
        # set by the run or a regime itself: recorded and then overridden
        (
            ("num_rounds=2",),
            r"--set: num_rounds: is set by the run itself \(give --rounds",
        ),
        (
            ("seed=3",),
            r"--set: seed: is set by the run itself \(give --seed or --seeds",
        ),
        (("personalization.local_norm=false",), r"--set: personalization.local_norm:"),
        (
            ("trainer.options.fedprox_mu=1",),
            r"--set: trainer.options.fedprox_mu: unknown",
        ),
        (("strategy.name=fedprox",), r"--set: strategy.name: is set by the run itself"),
        # what only a regime's sites or the model registry would have found
        (("trainer.options.fpn_channels=0",), r"with --set: trainer.options"),
        (("trainer.options.arch=nope",), r"with --set: trainer.options.*nope"),
        (
            ("trainer.options.reestimate_norm=true",),
            r"with --set: trainer.options.reestimate_norm: .*\(regime fedavg\)",
        ),
    ]:
        bad = tmp_path / "bad"
        with pytest.raises(ConfigError, match=message):
            run_study(dataclasses.replace(req, out=bad, reuse=(), settings=settings))
        assert not (bad / RF.RUN_JSON).exists()  # refused before any work
    # a regime's own option: refused only when that regime runs
    w0 = ("trainer.options.ssl_unsup_weight=0",)
    unlab = dataclasses.replace(
        req, out=tmp_path / "u", reuse=(), settings=w0, regimes=(R.LOCAL_ONLY_UNLAB,)
    )
    with pytest.raises(ConfigError, match=r"regime local-only-unlab sets trainer"):
        run_study(unlab)
    from simulation.run import check_settings

    check_settings(w0, R.with_members((R.PERSONALIZED_SSL, R.RECOMMENDED)))
    # with seeds side by side: refused before any site is made, and whole
    from simulation.run import run_seeds

    fresh = dataclasses.replace(
        req, out=tmp_path / "s", data=tmp_path / "s-data", reuse=(), settings=("x=1",)
    )
    with pytest.raises(ConfigError, match=r"--set: x: unknown key"):
        run_seeds(fresh, (0, 1), parallel=2)
    assert not (tmp_path / "s-data").exists()


@pytest.mark.slow
def test_tuned_regime_starts_from_each_sites_federated_model(
    study: Path, tmp_path: Path
) -> None:
    """Fine-tuning after federation: each site starts from personalized-dp's
    final model of that site, also when that regime was read from another run;
    an ensemble fuses a member read back (--reuse) with one trained here."""
    import dataclasses

    import torch

    from client.detector_trainer import detector_options
    from common.detector.checkpoint import init_from_checkpoint, load_checkpoint
    from common.errors import MammofedError
    from simulation.run import BASE_MODEL, _evaluate_on, trained_in, tuned_start

    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=tmp_path / "fed",
        # local-head read from the fixture's run, personalized-dp trained here
        regimes=(R.PERSONALIZED_DP_LOCAL_HEAD,),
        data=study.parent / "data",
        workers=1,
        n_boot=0,
        base_checkpoint=study / R.BASE / BASE_MODEL,
        reuse=(study,),
    )
    fed = run_study(req)
    assert RF.read_record(RF.StudyRun, fed / RF.RUN_JSON).reused == {
        R.LOCAL_HEAD: str(study)
    }
    pair = json.loads(
        (fed / R.PERSONALIZED_DP_LOCAL_HEAD / RF.METRICS_JSON).read_text()
    )
    assert {"A", "C"} <= set(pair["sites"])
    # personalized-dp read from that run, the tuned regime trained from it
    tuned = run_study(
        dataclasses.replace(
            req,
            out=tmp_path / "tuned",
            regimes=(R.PERSONALIZED_DP_TUNED_PAIR,),
            reuse=(fed,),
        )
    )
    run = RF.read_record(RF.StudyRun, tuned / RF.RUN_JSON)
    assert run.reused == {R.PERSONALIZED_DP: str(fed)}
    assert run.regimes == [
        R.PERSONALIZED_DP,
        R.PERSONALIZED_DP_TUNED,
        R.PERSONALIZED_DP_TUNED_PAIR,
    ]
    assert trained_in(tuned, R.PERSONALIZED_DP) == fed
    fcfg = load_federation_config(FEDERATION)
    opts = detector_options(fcfg, str(FEDERATION))
    cfg = opts.model_config()
    dp_metrics = json.loads((fed / R.PERSONALIZED_DP / RF.METRICS_JSON).read_text())
    for site in ("A", "C"):
        start = tuned / R.PERSONALIZED_DP_TUNED / "start" / f"{site}.pt"
        # exported as the site exports it, from the run that trained it
        export = load_checkpoint(start).extra["export"]
        assert export["run"] == R.PERSONALIZED_DP and export["site"] == site
        trained = (fed / R.PERSONALIZED_DP).resolve()
        assert export["round_file"].startswith(str(trained / "server"))
        assert export["state_dir"] == str(trained / "site-state")
        # the start is the site's personalized-dp model: it scores the same
        model = build_detector(cfg)
        init_from_checkpoint(model, cfg, start)
        got = _evaluate_on(
            model,
            study.parent / "data" / "cache" / site,
            fcfg.seed,
            0,
            torch.device("cpu"),
        )
        assert got is not None
        want = dp_metrics["sites"][site]["classes"]["mass"]["cpm"]
        assert got.metrics["cpm-mass"] == pytest.approx(want, abs=1e-9)
    # every site was tuned and scored; the pair fused both
    for regime in (R.PERSONALIZED_DP_TUNED, R.PERSONALIZED_DP_TUNED_PAIR):
        data = json.loads((tuned / regime / RF.METRICS_JSON).read_text())
        assert {"A", "C"} <= set(data["sites"])
    # a source run that kept no checkpoint is refused, naming the folder
    gone = tmp_path / "gone"
    (gone / R.PERSONALIZED_DP).mkdir(parents=True)
    (gone / RF.RUN_JSON).write_bytes((fed / RF.RUN_JSON).read_bytes())
    spec = R.REGIMES[R.PERSONALIZED_DP_TUNED]
    with pytest.raises(MammofedError, match="gone/personalized-dp/server/checkpoints"):
        tuned_start(spec, "A", gone, tmp_path)
    # a site that never trained in that run: refused, naming its state folder
    with pytest.raises(MammofedError, match="personalized-dp/site-state/Z"):
        tuned_start(spec, "Z", fed, tmp_path)
    # 'reused' records that go round in a circle are refused
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / RF.RUN_JSON).write_text(
        json.dumps(
            {
                **json.loads((fed / RF.RUN_JSON).read_text()),
                "reused": {R.PERSONALIZED_DP: str(loop)},
            }
        )
    )
    with pytest.raises(MammofedError, match="circle"):
        trained_in(loop, R.PERSONALIZED_DP)


@pytest.mark.slow
def test_all_labels_regime_trains_on_every_woman_and_scores_the_same_test_women(
    study: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """personalized-all-labels: the sites train on the complete annotations
    (the partly labeled site on more images), and are scored on the same test
    women as personalized, so the two pair image by image."""
    import logging
    import re

    from common.detector.froc import pooled_paired_cpm_difference
    from common.imaging.data import SiteDataset
    from simulation.report import load_detections
    from simulation.run import BASE_MODEL

    data = study.parent / "data"
    fed = load_federation_config(FEDERATION)
    labeled = {
        kind: len(SiteDataset(data / kind / "C", seed=fed.seed).view("labeled"))
        for kind in ("cache", "oracle")
    }
    assert labeled["oracle"] > labeled["cache"]
    caplog.set_level(logging.INFO, logger="client.detector_trainer")
    run = run_study(
        RunRequest(
            scenario=SCENARIO,
            federation=FEDERATION,
            out=tmp_path / "all",
            regimes=(R.PERSONALIZED_ALL_LABELS,),
            data=data,
            workers=1,
            n_boot=0,
            base_checkpoint=study / R.BASE / BASE_MODEL,
        )
    )
    said = r"site C round \d+: loss \S+ over (\d+) examples"
    seen = {int(m.group(1)) for m in re.finditer(said, caplog.text)}
    # the ceiling regime's site C trained on every training image, labeled
    assert seen == {labeled["oracle"]}
    ours = load_detections(run / R.PERSONALIZED_ALL_LABELS / RF.DETECTIONS_JSON)
    theirs = load_detections(study / R.PERSONALIZED / RF.DETECTIONS_JSON)
    assert set(ours) == set(theirs)
    for site in ours:
        keys = sorted(im.key for im in ours[site])
        assert keys == sorted(im.key for im in theirs[site])
        gt = {im.key: im.gt_boxes.tolist() for im in theirs[site]}
        assert all(im.gt_boxes.tolist() == gt[im.key] for im in ours[site])
        pooled_paired_cpm_difference([theirs[site]], [ours[site]], 0, n_boot=5)


@pytest.mark.slow
def test_self_training_labels_a_sites_unlabeled_women_with_its_own_models(
    study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """personalized-ssl-tuned-pseudo: the site's three models (kept by the
    run) label its unlabeled training images, which join its labeled ones;
    the all-labels version trains on the oracle's labels; a central teacher
    that was not kept is refused, naming the file (stop 43)."""
    import torch

    import simulation.run as run_mod
    from client.export import load_detector
    from common.errors import MammofedError
    from common.imaging.data import SiteDataset
    from simulation.report import load_detections
    from simulation.run import BASE_MODEL
    from simulation.selftrain import central_model_path, teacher_paths

    data = study.parent / "data"
    fed = load_federation_config(FEDERATION)
    trained: dict[str, tuple[int, list[int]]] = {}
    real = run_mod.train_central

    def spy(caches: list[Path], *a: Any, label: str, **kw: Any) -> Any:
        n = sum(len(SiteDataset(c, seed=fed.seed).view("labeled")) for c in caches)
        trained[label] = (n, [len(p) for p in kw.get("pseudo", ())])
        return real(caches, *a, label=label, **kw)

    monkeypatch.setattr(run_mod, "train_central", spy)
    out = run_study(
        RunRequest(
            scenario=SCENARIO,
            federation=FEDERATION,
            out=tmp_path / "self",
            regimes=(
                R.PERSONALIZED_SSL_TUNED_PSEUDO,
                R.PERSONALIZED_SSL_TUNED_ALL_LABELS,
            ),
            data=data,
            workers=1,
            n_boot=0,
            base_checkpoint=study / R.BASE / BASE_MODEL,
        )
    )
    sites = ["A", "B", "C", "D", "E"]
    unlabeled = {
        s: len(SiteDataset(data / "cache" / s, seed=fed.seed).view("unlabeled"))
        for s in sites
    }
    assert unlabeled["C"] > 0 and unlabeled["A"] == 0
    for s in sites:
        own = len(SiteDataset(data / "cache" / s, seed=fed.seed).view("labeled"))
        every = len(SiteDataset(data / "oracle" / s, seed=fed.seed).view("labeled"))
        # labeled-only, self-trained (its unlabeled images pseudo-labeled), all labels
        assert trained[f"{R.PERSONALIZED_SSL_TUNED}/{s}"] == (own, [])
        pseudo = [unlabeled[s]] if unlabeled[s] else []
        assert trained[f"{R.PERSONALIZED_SSL_TUNED_PSEUDO}/{s}"] == (own, pseudo)
        assert trained[f"{R.PERSONALIZED_SSL_TUNED_ALL_LABELS}/{s}"] == (every, [])
        # every per-site model is kept and loads
        for regime in (R.LOCAL_ONLY, R.PERSONALIZED_SSL_TUNED_PSEUDO):
            load_detector(central_model_path(out, regime, s), torch.device("cpu"))
    rec = json.loads(
        (out / R.PERSONALIZED_SSL_TUNED_PSEUDO / "pseudo-C.json").read_text()
    )
    assert rec["images"] == unlabeled["C"] and rec["keep_threshold"] == 0.5
    assert [Path(p).name for p in rec["teachers"]] == [
        "personalized-ssl-C.pt",
        "C.pt",
        "C.pt",
    ]
    assert Path(rec["teachers"][2]).parent.parent.name == R.LOCAL_ONLY
    # the boxes are scored against the phantom's truth of those very images
    oracle = SiteDataset(data / "oracle" / "C", seed=fed.seed)
    mine = SiteDataset(data / "cache" / "C", seed=fed.seed).view("unlabeled")
    keys = {mine.target(i)["key"] for i in range(len(mine))}
    view = oracle.view("all")
    truth = [view.target(i) for i in range(len(view)) if view.target(i)["key"] in keys]
    assert rec["quality"]["images_matched"] == len(truth) == unlabeled["C"]
    n_mass = sum(int((t["labels"] == 0).sum()) for t in truth)
    assert rec["quality"]["mass"]["lesions"] == n_mass
    assert not (out / R.PERSONALIZED_SSL_TUNED_PSEUDO / "pseudo-A.json").exists()
    # scored on the same test women as the labeled-only version
    ours = load_detections(out / R.PERSONALIZED_SSL_TUNED_PSEUDO / RF.DETECTIONS_JSON)
    theirs = load_detections(out / R.PERSONALIZED_SSL_TUNED / RF.DETECTIONS_JSON)
    for s in ours:
        assert sorted(i.key for i in ours[s]) == sorted(i.key for i in theirs[s])
    # a teacher that a run did not keep: refused, naming the file
    old = tmp_path / "old"
    (old / R.LOCAL_ONLY).mkdir(parents=True)
    (old / RF.RUN_JSON).write_bytes((out / RF.RUN_JSON).read_bytes())
    spec = R.REGIMES[R.PERSONALIZED_SSL_TUNED_PSEUDO]
    with pytest.raises(MammofedError, match=r"old/local-only/models/C.pt: missing"):
        teacher_paths(spec, "C", {R.LOCAL_ONLY: old}, out)
