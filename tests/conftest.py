"""Fixtures and helpers that the tests of several packages share.

The shared real data, one torch thread, a tiny checkpoint, tiny synthetic site
caches and a training config over them, an in-process federation grid, the
tests' federation for real Flower processes and their teardown. Test modules
import the helpers with ``from tests.conftest import ...``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Context, Message, RecordDict

from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig, build_detector
from common.imaging.annotations import ImageTargets
from common.imaging.cache import SiteCache
from common.imaging.geometry import Geometry
from common.imaging.image import ImageMeta, MammoImage
from common.wire.federation import (
    NODE_DATA_DIR,
    NODE_SITE,
    NODE_STATE_DIR,
    RUN_FEDERATION_JSON,
    FederationConfig,
    federation_config_to_json,
    load_federation_config,
)
from simulation.grid import InProcessGrid

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
#: The small federation of the tests (two sites, tiny toy model).
TEST_YAML = REPO / "configs" / "federation" / "test.yaml"
#: Side of the images of :func:`make_site_cache`, and the box of its masses.
SIZE = 96
LESION = [40.0, 48.0, 64.0, 72.0]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests needing it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """One torch thread from the start (the machine's cores are shared)."""
    torch.set_num_threads(1)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """An untrained ``tiny`` detector at 0.4 mm (seed 0; scores above 0.01)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    return save_checkpoint(tmp_path / "tiny.pt", build_detector(cfg), cfg)


def _image(i: int, pid: str, lesion: bool) -> MammoImage:
    rng = np.random.default_rng(i)
    px = (0.1 * rng.random((SIZE, SIZE))).astype(np.float32)
    if lesion:
        x0, y0, x1, y1 = (int(v) for v in LESION)
        px[y0:y1, x0:x1] = 0.9
    meta = ImageMeta(
        source=f"{i}.dcm", sop_instance_uid=f"1.{i}", patient_id=pid, manufacturer="A",
        model="m", view="CC", laterality="L", laterality_source="ImageLaterality",
        stored_spacing_mm=0.4, spacing_source="PixelSpacing",
        presentation_intent=None, photometric="MONOCHROME2", rows=SIZE, cols=SIZE,
    )  # fmt: skip
    return MammoImage(px, 0.4, Geometry.identity((SIZE, SIZE)), meta)


def write_site_cache(
    root: Path,
    n_patients: int,
    image: Callable[[int, int], MammoImage],
    targets: Callable[[int, int], ImageTargets],
    split: dict[str, str] | None = None,
    key_prefix: str = "k",
) -> Path:
    """A site cache at ``root`` of 2 images per patient ``p``: image ``j`` of
    ``p`` is ``image(p, j)``, key ``k{2p+j:03d}`` (another ``key_prefix``:
    other files), with ``targets(p, j)``."""
    c = SiteCache(root)
    labels: dict[str, ImageTargets] = {}
    for p in range(n_patients):
        for j in range(2):
            i = 2 * p + j
            key = f"{key_prefix}{i:03d}"
            c.write(
                key, image(p, j), source=f"{i:03d}.dcm", size=1, mtime_ns=1,
                working_spacing_mm=0.4,
            )  # fmt: skip
            labels[key] = targets(p, j)
    c.write_annotations(labels)
    c.write_split(split)
    return root


def make_site_cache(root: Path, n_patients: int = 6, key_prefix: str = "k") -> Path:
    """A site cache at ``root``: 2 images per patient, the first with a mass
    (keys ``key_prefix`` + number: another prefix makes other women's files)."""

    def targets(p: int, j: int) -> ImageTargets:
        if j == 0:
            b = [list(LESION)]
            return ImageTargets(True, False, True, b, b, [0], [], [], [])
        return ImageTargets(True, False, False, [], [], [], [], [], [])

    def image(p: int, j: int) -> MammoImage:
        return _image(2 * p + j, f"P{p}", j == 0)

    return write_site_cache(root, n_patients, image, targets, key_prefix=key_prefix)


def make_ssl_site_cache(root: Path, n_labeled: int = 2, n_unlabeled: int = 2) -> Path:
    """A site cache for semi-supervision: ``n_labeled`` labeled women (a mass
    on each first image) and then ``n_unlabeled`` women without labels."""

    def targets(p: int, j: int) -> ImageTargets:
        if p >= n_labeled:
            return ImageTargets(False, False, False, [], [], [], [], [], [])
        b = [list(LESION)] if j == 0 else []
        return ImageTargets(True, False, j == 0, b, b, [0] if b else [], [], [], [])

    def image(p: int, j: int) -> MammoImage:
        return _image(2 * p + j, f"P{p}", j == 0)

    return write_site_cache(root, n_labeled + n_unlabeled, image, targets)


@pytest.fixture
def sync_shared_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``MeanTeacher.sync_shared`` calls (the teacher still syncs)."""
    from common.detector.adapt.teacher import MeanTeacher

    calls: list[int] = []
    real = MeanTeacher.sync_shared

    def spy(self, student, keys):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(self, student, keys)

    monkeypatch.setattr(MeanTeacher, "sync_shared", spy)
    return calls


def write_train_yaml(tmp_path: Path, caches: list[Path], **kw: Any) -> Path:
    """``tmp_path/train.yaml``: 1 epoch of ``tiny`` on ``caches``; ``kw`` overrides."""
    doc = {
        "caches": [str(c) for c in caches],
        "out_dir": str(tmp_path / "run"),
        "model": {"arch": "tiny", "working_spacing_mm": 0.4},
        "epochs": 1,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 1,
        "lesion_prob": 0.5,
        "n_boot": 10,
        "device": "cpu",
        "test_fraction": 0.34,
        **kw,
    }
    p = tmp_path / "train.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.fixture
def site_cache(tmp_path: Path) -> Path:
    """:func:`make_site_cache` with 6 patients at ``tmp_path/siteA``."""
    return make_site_cache(tmp_path / "siteA")


class LocalGrid(InProcessGrid):
    """The in-process grid over given contexts, keeping what was sent and received.

    ``tamper(node_id, reply) -> reply`` lets a test corrupt one node's update.
    """

    def __init__(
        self,
        app: Any,
        contexts: dict[int, Context],
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        super().__init__(app, {}, {})
        self.contexts = contexts
        self.tamper = tamper
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = []
        for msg in messages:
            for reply in super().send_and_receive([msg], timeout=timeout):
                self.sent.append(msg)
                if self.tamper is not None and not reply.has_error():
                    reply = self.tamper(msg.metadata.dst_node_id, reply)
                self.replies.append(reply)
                out.append(reply)
        return out


def make_contexts(
    cfg: FederationConfig, state_dir: Path, sites: list[str]
) -> dict[int, Context]:
    """``{node_id: Context}`` of one node per site (ids 100, 101, ...).

    Where the run sets ``trainer.options.cache_root``, each node names its own
    ``data-dir`` there (``<cache_root>/<site>``), as a deployed node must.
    """
    run_config = {RUN_FEDERATION_JSON: federation_config_to_json(cfg)}
    root = cfg.trainer.options.get("cache_root")

    def node_config(site: str) -> dict[str, Any]:
        out: dict[str, Any] = {NODE_SITE: site, NODE_STATE_DIR: str(state_dir)}
        if root:
            out[NODE_DATA_DIR] = str(Path(str(root)) / site)
        return out

    return {
        100 + i: Context(
            run_id=1,
            node_id=100 + i,
            node_config=node_config(site),
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for i, site in enumerate(sites)
    }


def loopback_config(tmp_path: Path, **changes: Any) -> FederationConfig:
    """:data:`TEST_YAML` for real Flower processes: no state folder, no
    evaluation, and the initial model from ``tmp_path/init.npz`` (saves one
    ClientApp start, a query round trip); ``changes`` replace fields."""
    from client.toy import build_toy

    cfg = load_federation_config(TEST_YAML)
    cfg = dataclasses.replace(
        cfg,
        state_dir=None,
        participation=dataclasses.replace(
            cfg.participation, fraction_evaluate=0.0, min_evaluate_nodes=0
        ),
        **changes,
    )
    init = build_toy("init", tmp_path / "init-state", cfg).initial_shared()
    np.savez(tmp_path / "init.npz", **init)
    return dataclasses.replace(cfg, initial_arrays=tmp_path / "init.npz")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_groups_gone(groups: list[int], timeout_s: float = 15.0) -> None:
    """Each process group (id = its leader's pid) is gone; killed members may
    take a moment to be reaped by init."""
    deadline = time.monotonic() + timeout_s
    while any(_group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_group_alive(g) for g in groups), "processes left running"


@pytest.fixture
def flower_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to append started Flower processes to (each in its own group).

    Teardown, also when the test failed: stop every group (SIGTERM, then
    SIGKILL), wait for grandchildren to go, and fail if any group is left.
    """
    from server.process import stop_process

    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    # start_new_session: each group id is its leader's pid, even once it exited
    groups = [proc.pid for proc in procs]
    for proc in procs:
        stop_process(proc)
    for pgid in groups:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
    assert_groups_gone(groups)


# --- DICOM validators nobody here wrote (dicom3tools, DCMTK) ----------------------
#: Skip a test where dicom3tools' dciodvfy is missing (``.ci/run`` installs it).
needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dicom3tools' dciodvfy not installed (apt-get install dicom3tools)",
)


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run an external validator; its output as text (never raises on status)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def error_lines(text: str) -> list[str]:
    """The lines of a dciodvfy report that start with ``Error``."""
    return [ln for ln in text.splitlines() if ln.startswith("Error")]
