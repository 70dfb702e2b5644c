"""Settings of the site's DICOM storage node (``mammofed-client serve``).

The ``dicom_node`` section of a site config (:class:`common.config.site.SiteConfig`)::

    dicom_node:
      ae_title: MAMMOFED              # this node's AE title
      port: 11112                     # where it listens (host: 0.0.0.0)
      allowed_calling_aes: [MG_ROOM1, PACS]
      destination: {ae_title: PACS, host: pacs.local, port: 104}
      queue_dir: /data/hospital-a/dicom-outbox

Every value is checked when the file is loaded; a bad one raises
:class:`common.errors.ConfigError` naming the file, ``dicom_node`` and the
sub-key with the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.config.loader import bounded, path_field

#: Longest AE title (PS3.5 table 6.2-1, VR AE: 16 bytes).
AE_TITLE_MAX = 16


def check_ae_title(value: str, key: str) -> str:
    """A valid AE title, leading/trailing spaces removed.

    PS3.5 VR AE: 1 to 16 characters of the default repertoire (printable
    ASCII), no backslash, no control characters, not all spaces.

    Raises:
        ValueError: naming ``key`` and the value.
    """
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be a string, got {value!r}")
    title = value.strip()
    if not 1 <= len(title) <= AE_TITLE_MAX:
        raise ValueError(
            f"{key}: an AE title has 1 to {AE_TITLE_MAX} characters "
            f"(spaces around it ignored), got {value!r}"
        )
    bad = [c for c in title if not (" " <= c <= "~") or c == "\\"]
    if bad:
        raise ValueError(
            f"{key}: an AE title is printable ASCII without backslash, "
            f"got {value!r} (bad character {bad[0]!r})"
        )
    return title


def _check_host(value: str, key: str) -> None:
    if not value.strip() or any(c.isspace() for c in value):
        raise ValueError(f"{key}: must be a host name or address, got {value!r}")


@dataclass(frozen=True)
class DicomDestination:
    """Where CAD SR results go by C-STORE (a PACS or workstation).

    Attributes:
        ae_title: the destination's (called) AE title.
        host: its host name or IP address.
        port: its TCP port.
    """

    ae_title: str
    host: str
    port: int = field(metadata=bounded(1, 65535))

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "ae_title"))
        _check_host(self.host, "host")


@dataclass(frozen=True)
class DicomNodeConfig:
    """The storage node: who may send, where results go, how they are retried.

    Attributes:
        allowed_calling_aes: calling AE titles whose associations are accepted;
            any other is rejected (A-ASSOCIATE-RJ, calling AE title not
            recognized). At least one.
        destination: where each exam's Mammography CAD SR is sent.
        queue_dir: persistent outbox; an SR is written here before any
            sending and stays (``failed/`` after ``max_attempts``) until the
            destination confirms it.
        ae_title: this node's AE title.
        host: listen address (``0.0.0.0``: every interface).
        port: listen port.
        incoming_dir: where received images are written, one folder per
            study; must lie inside the site's ``data_dir`` so that every
            ingest keeps them (``None``: ``<data_dir>/incoming``).
        checkpoint: the site's current model (``mammofed-client export``);
            ``serve --checkpoint`` overrides it. Re-read when the file changes.
        fuse_with: further models run on every exam beside ``checkpoint``,
            their findings fused with its findings (weighted box fusion,
            :mod:`common.detector.ensemble`): the recommended regime is the
            federation's personalized model plus that model fine-tuned on the
            site's labels and the site's local-only model.
            They must share its working spacing. ``serve --checkpoint`` given
            more than once replaces ``checkpoint`` and these together.
        exam_settle_s: an exam is complete once no association that sent its
            images is open and no image of it arrived for this long.
        exam_idle_s: an exam is complete after this long without a new image
            even while its association stays open.
        score_floor: detections scoring below it are left out of the SR.
        presentation_states: also send one Grayscale Softcopy Presentation
            State per scored image (:mod:`client.gsps`: the findings scoring
            at least ``score_floor`` as marks any PACS viewer draws) to the
            same destination, beside the SR.
        retry_interval_s: wait before the first retry of a failed send.
        retry_backoff: each further wait is multiplied by this (1: fixed).
        retry_max_interval_s: longest wait between two attempts.
        max_attempts: sends tried before the SR is moved to ``failed/``.
        timeout_s: network timeout (connect, association, DIMSE) of one send.
        max_instance_mb: an association that sends more than this many MiB
            towards one instance is aborted, and nothing of it is kept
            (pynetdicom holds a received data set in memory, whole, before
            the node sees it; a 2-D mammogram is at most about 50 MiB).
        min_free_mb: an image is refused (C-STORE status 0xA700, out of
            resources) while the disk holding ``incoming_dir`` has less free
            space than this, in MiB, so that a sender cannot fill the disk the
            outbox and the cache need (0: never refused for space).
    """

    allowed_calling_aes: tuple[str, ...]
    destination: DicomDestination
    queue_dir: Path = field(metadata=path_field(must_exist=False))
    ae_title: str = "MAMMOFED"
    host: str = "0.0.0.0"
    port: int = field(default=11112, metadata=bounded(1, 65535))
    incoming_dir: Path | None = field(
        default=None, metadata=path_field(must_exist=False)
    )
    checkpoint: Path | None = field(default=None, metadata=path_field(must_exist=False))
    fuse_with: tuple[Path, ...] = ()
    exam_settle_s: float = field(default=2.0, metadata=bounded(0.0, 3600.0))
    exam_idle_s: float = field(default=120.0, metadata=bounded(0.1, 86400.0))
    score_floor: float = field(default=0.3, metadata=bounded(0.0, 1.0))
    presentation_states: bool = False
    retry_interval_s: float = field(default=30.0, metadata=bounded(0.01, 86400.0))
    retry_backoff: float = field(default=2.0, metadata=bounded(1.0, 10.0))
    retry_max_interval_s: float = field(
        default=3600.0, metadata=bounded(0.01, 604800.0)
    )
    max_attempts: int = field(default=20, metadata=bounded(1, 100000))
    timeout_s: float = field(default=30.0, metadata=bounded(0.1, 3600.0))
    max_instance_mb: float = field(default=512.0, metadata=bounded(0.01, 1e6))
    min_free_mb: float = field(default=1024.0, metadata=bounded(0.0, 1e9))

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "ae_title"))
        _check_host(self.host, "host")
        if not self.allowed_calling_aes:
            raise ValueError(
                "allowed_calling_aes: list at least one calling AE title "
                "(an empty list would accept anyone), got []"
            )
        titles = tuple(
            check_ae_title(t, f"allowed_calling_aes[{i}]")
            for i, t in enumerate(self.allowed_calling_aes)
        )
        object.__setattr__(self, "allowed_calling_aes", titles)
        if self.retry_max_interval_s < self.retry_interval_s:
            raise ValueError(
                f"retry_max_interval_s: must be >= retry_interval_s "
                f"({self.retry_interval_s}), got {self.retry_max_interval_s}"
            )
        if self.exam_idle_s < self.exam_settle_s:
            raise ValueError(
                f"exam_idle_s: must be >= exam_settle_s ({self.exam_settle_s}), "
                f"got {self.exam_idle_s}"
            )
