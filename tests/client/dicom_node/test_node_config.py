"""The ``dicom_node`` section of a site config, and what DicomNode requires."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.dicom_node import DicomNode
from common.config.dicom_node import DicomNodeConfig, check_ae_title
from common.config.site import load_site_config
from common.errors import ConfigError, MammofedError
from tests.conftest import REPO

GOOD = """\
name: s
data_dir: {root}/data
cache_dir: {root}/cache
dicom_node:
  ae_title: MAMMOFED
  port: 11112
  allowed_calling_aes: [MG_ROOM1, PACS]
  destination: {{ae_title: PACS, host: pacs.local, port: 104}}
  queue_dir: outbox
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return p


def test_example_config_has_a_valid_node() -> None:
    cfg = load_site_config(REPO / "configs" / "sites" / "hospital-a.yaml")
    node = cfg.dicom_node
    assert node is not None
    assert node.ae_title == "MAMMOFED" and 1 <= node.port <= 65535
    assert "MG_ROOM1" in node.allowed_calling_aes
    assert node.destination.ae_title == "PACS"


def test_good_section_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_site_config(_write(tmp_path, GOOD.format(root=tmp_path)))
    node = cfg.dicom_node
    assert node is not None
    assert node.allowed_calling_aes == ("MG_ROOM1", "PACS")
    assert node.queue_dir == tmp_path / "outbox"  # relative to the config file
    assert node.incoming_dir is None and node.max_attempts >= 1
    assert load_site_config(None).dicom_node is None


@pytest.mark.parametrize(
    ("old", "new", "key", "value"),
    [
        ("ae_title: MAMMOFED", "ae_title: ABCDEFGHIJKLMNOPQ", "ae_title",
         "ABCDEFGHIJKLMNOPQ"),
        ("ae_title: MAMMOFED", "ae_title: 'A\\B'", "ae_title", "A\\\\B"),
        ("ae_title: MAMMOFED", "ae_title: '   '", "ae_title", "'   '"),
        ("ae_title: MAMMOFED", "ae_title: 'MAMMÖ'", "ae_title", "MAMMÖ"),
        ("port: 11112", "port: 0", "dicom_node.port", "0"),
        ("port: 11112", "port: 70000", "dicom_node.port", "70000"),
        ("[MG_ROOM1, PACS]", "[]", "allowed_calling_aes", "[]"),
        ("[MG_ROOM1, PACS]", "[MG_ROOM1, 'TOO_LONG_AE_TITLE_X']",
         "allowed_calling_aes[1]", "TOO_LONG_AE_TITLE_X"),
        ("port: 104", "port: 65536", "dicom_node.destination.port", "65536"),
        ("{ae_title: PACS,", "{ae_title: '',", "dicom_node.destination", "''"),
        ("host: pacs.local", "host: 'pacs local'", "host", "pacs local"),
        ("queue_dir: outbox", "queue_dir: outbox\n  max_attempts: 0",
         "dicom_node.max_attempts", "0"),
        ("queue_dir: outbox", "queue_dir: outbox\n  retry_interval_s: 0",
         "dicom_node.retry_interval_s", "0"),
        ("queue_dir: outbox", "queue_dir: outbox\n  exam_idle_s: 1\n"
         "  exam_settle_s: 5", "exam_idle_s", "1"),
        ("queue_dir: outbox", "queue_dir: outbox\n  min_free_mb: -1",
         "dicom_node.min_free_mb", "-1"),
        ("queue_dir: outbox", "queue_dir: outbox\n  presentation_states: maybe",
         "dicom_node.presentation_states", "maybe"),
        ("queue_dir: outbox", "queue_dir: outbox\n  retrys: 3",
         "dicom_node.retrys", ""),
        ("  queue_dir: outbox\n", "", "dicom_node.queue_dir", ""),
    ],
)  # fmt: skip
def test_bad_values_name_file_key_value(
    tmp_path: Path, old: str, new: str, key: str, value: str
) -> None:
    text = GOOD.format(root=tmp_path)
    assert old in text
    path = _write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg and value in msg, msg


def test_ae_title_is_stripped_and_checked() -> None:
    assert check_ae_title("  PACS ", "k") == "PACS"
    with pytest.raises(ValueError, match="k: .*'\\\\t'"):
        check_ae_title("A\tB", "k")


def test_node_needs_folders_and_a_model(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.format(root=tmp_path))
    cfg = load_site_config(path)
    with pytest.raises(ConfigError, match="dicom_node.checkpoint: no model"):
        DicomNode(cfg, source=str(path))
    no_data = _write(tmp_path, GOOD.format(root=tmp_path).replace("data_dir", "#"))
    with pytest.raises(ConfigError, match="data_dir: required by dicom_node"):
        DicomNode(load_site_config(no_data), checkpoint=tmp_path / "m.pt")
    outside = GOOD.format(root=tmp_path) + f"  incoming_dir: {tmp_path / 'elsewhere'}\n"
    with pytest.raises(ConfigError, match="incoming_dir: must lie inside data_dir"):
        DicomNode(load_site_config(_write(tmp_path, outside)), checkpoint="m.pt")


def test_fuse_with_adds_models_and_the_command_line_replaces_them(
    tmp_path: Path,
) -> None:
    text = (
        GOOD.format(root=tmp_path) + "  checkpoint: fed.pt\n  fuse_with: [local.pt]\n"
    )
    cfg = load_site_config(_write(tmp_path, text))
    node = DicomNode(cfg)
    # relative paths resolve against the site config's folder, in order
    assert node.scorer.checkpoints == [tmp_path / "fed.pt", tmp_path / "local.pt"]
    node = DicomNode(cfg, checkpoint=[tmp_path / "a.pt", tmp_path / "b.pt"])
    assert node.scorer.checkpoints == [tmp_path / "a.pt", tmp_path / "b.pt"]
    assert DicomNode(cfg, checkpoint="c.pt").scorer.checkpoints == [Path("c.pt")]
    orphan = GOOD.format(root=tmp_path) + "  fuse_with: [local.pt]\n"
    with pytest.raises(ConfigError, match="checkpoint: missing while fuse_with"):
        DicomNode(load_site_config(_write(tmp_path, orphan)))
    bad = GOOD.format(root=tmp_path) + "  checkpoint: a.pt\n  fuse_with: local.pt\n"
    with pytest.raises(ConfigError, match="fuse_with: must be a list"):
        load_site_config(_write(tmp_path, bad))


def test_the_node_scores_under_the_sites_pixel_budget(tmp_path: Path) -> None:
    """Received images are decoded for scoring under ``max_pixels`` (was: 32 Mi)."""
    text = "max_pixels: 1000000\n" + GOOD.format(root=tmp_path) + "  checkpoint: m.pt\n"
    node = DicomNode(load_site_config(_write(tmp_path, text)))
    assert node.scorer.max_pixels == 1_000_000
    unbounded = (
        "max_pixels: null\n" + GOOD.format(root=tmp_path) + "  checkpoint: m.pt\n"
    )
    assert (
        DicomNode(load_site_config(_write(tmp_path, unbounded))).scorer.max_pixels
        is None
    )


def test_serve_takes_checkpoint_more_than_once() -> None:
    import argparse

    from client.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(
        ["--site-config", "s.yaml", "--checkpoint", "a.pt", "--checkpoint", "b.pt"]
    )
    assert args.checkpoint == [Path("a.pt"), Path("b.pt")]


def test_node_config_is_frozen() -> None:
    cfg = DicomNodeConfig(
        allowed_calling_aes=("A",),
        destination=load_site_config(
            REPO / "configs/sites/hospital-a.yaml"
        ).dicom_node.destination,  # type: ignore[union-attr]
        queue_dir=Path("q"),
    )
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


def test_start_without_model_fails_before_opening_anything(tmp_path: Path) -> None:
    cfg = load_site_config(_write(tmp_path, GOOD.format(root=tmp_path)))
    node = DicomNode(cfg, checkpoint=tmp_path / "missing.pt")
    with pytest.raises(MammofedError, match="missing.pt: model checkpoint unreadable"):
        node.start()
    assert not (tmp_path / "outbox").exists()
    assert not (tmp_path / "data" / "incoming").exists()
    with pytest.raises(RuntimeError, match="not started"):
        _ = node.port
