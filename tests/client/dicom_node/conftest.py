"""Fixtures: synthetic MG exams and a CT image (pydicom), a tiny checkpoint,
a site config with a DICOM node on free ports, and DCMTK process helpers.

Every process a test starts goes through :func:`started`, which stops it in a
``finally`` even when the test fails.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import generate_uid

from benchmarks import synthetic
from tests.client.conftest import add_study, write_study
from tests.conftest import REPO  # noqa: F401 (kit.REPO, the cwd of serve_cmd)

ROWS, COLS = 256, 200
SPACING_MM = 0.2
SENDER_AE = "MG_ROOM1"
NODE_AE = "MAMMOFED"
DEST_AE = "PACS"


@functools.cache
def dcmtk_tool(name: str) -> str | None:
    """The absolute path of DCMTK's ``name``, or None.

    pynetdicom installs apps of the same names (``storescu``, ``storescp``,
    ``echoscu``) into the virtualenv, so with the virtualenv first on ``PATH``
    a bare ``storescu`` is pynetdicom's: the library the node itself is built
    on, which would test the node against itself. Only a binary whose
    ``--version`` names DCMTK counts.
    """
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for d in dict.fromkeys(dirs):
        exe = Path(d or ".") / name
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            continue
        try:
            out = subprocess.run(
                [str(exe), "--version"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return str(exe)
    return None


def have_dcmtk() -> bool:
    """DCMTK's storescu and storescp are installed (not pynetdicom's)."""
    return dcmtk_tool("storescu") is not None and dcmtk_tool("storescp") is not None


needs_dcmtk = pytest.mark.skipif(
    not have_dcmtk(),
    reason="DCMTK storescu/storescp not installed (apt-get install dcmtk)",
)


def write_exam(folder: Path, study_uid: str | None = None) -> list[Path]:
    """A four-view MG exam (one study, 256x200 px at 0.2 mm, no two pixel arrays
    alike) in ``folder``."""
    exam = write_study(
        folder, rows=ROWS, cols=COLS, spacing_mm=SPACING_MM, study_uid=study_uid,
        unique_pixels=True,
    )  # fmt: skip
    return [im.path for im in exam]


def write_ct(path: Path) -> Path:
    """A small CT image (CT Image Storage, Modality CT)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_mammo(
        path, rows=ROWS, cols=COLS, modality="CT", sop_class=synthetic.CT_IMAGE,
        body_part="CHEST",
    )  # fmt: skip
    add_study(path, generate_uid(), generate_uid(), 1, unique_pixels=True)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    """Block until something listens on 127.0.0.1:port."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``cond`` until true; fail the test naming ``what`` otherwise."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def started(
    cmd: Sequence[str], log_path: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (output to ``log_path``); terminate, then kill, on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def serve_cmd(site_config: Path) -> list[str]:
    """``mammofed-client serve`` in a fresh interpreter (run it with cwd=REPO)."""
    return [sys.executable, "-m", "client.cli", "serve", "--site-config",
            str(site_config), "--device", "cpu"]  # fmt: skip


def storescp_cmd(port: int, out_dir: Path) -> list[str]:
    """DCMTK storescp as the results destination (AE ``PACS``), files in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = dcmtk_tool("storescp")
    assert exe is not None, "DCMTK storescp not installed"
    return [exe, "-aet", DEST_AE, "-od", str(out_dir), "-v", str(port)]


def storescu(
    port: int, files: Sequence[Path], calling: str = SENDER_AE
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` in one association with DCMTK storescu (verbose output)."""
    exe = dcmtk_tool("storescu")
    assert exe is not None, "DCMTK storescu not installed"
    return subprocess.run(
        [exe, "-v", "-aet", calling, "-aec", NODE_AE, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def site_yaml(
    root: Path, node_port: int, dest_port: int, checkpoint: Path, **node: object
) -> Path:
    """A site config under ``root`` with a DICOM node on 127.0.0.1:node_port."""
    opts = {
        "exam_settle_s": 0.5,
        "exam_idle_s": 30,
        "score_floor": 0.01,
        "retry_interval_s": 0.5,
        "retry_backoff": 1.0,
        "max_attempts": 100,
        "timeout_s": 5,
    }
    opts.update(node)
    extra = "".join(f"  {k}: {v}\n" for k, v in opts.items())
    text = (
        "name: site-a\n"
        f"data_dir: {root / 'data'}\n"
        f"cache_dir: {root / 'cache'}\n"
        "dicom_node:\n"
        f"  ae_title: {NODE_AE}\n"
        "  host: 127.0.0.1\n"
        f"  port: {node_port}\n"
        f"  allowed_calling_aes: [{SENDER_AE}]\n"
        f"  destination: {{ae_title: {DEST_AE}, host: 127.0.0.1, port: {dest_port}}}\n"
        f"  queue_dir: {root / 'outbox'}\n"
        f"  checkpoint: {checkpoint}\n" + extra
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    path = root / "site.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """This module's helpers (test modules cannot import a conftest by name)."""
    return SimpleNamespace(**{k: v for k, v in globals().items() if k[0] != "_"})
