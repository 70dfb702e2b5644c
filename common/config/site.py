"""Site configuration: what one hospital (or research set) says about its data.

Loaded with :func:`load_site_config` (strict YAML -> frozen dataclass via
:func:`common.config.load_config`); every error names the file, key and value.

Example (``configs/sites/hospital-a.yaml``)::

    name: hospital-a
    working_spacing_mm: 0.4
    findings: {MASSE: mass, MIKROKALK: calcification}
    workers: 2

A site's patient split is not set here: the federated trainer and
``train-local`` split the cache by its ``split.json`` (the site's
``split.csv``) and, for women it does not list, by the federation's seed
(``client.detector_trainer.training_split``); the checkpoint records that
split and ``mammofed-client evaluate`` scores its test women.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from common.config.dicom_node import DicomNodeConfig
from common.config.loader import bounded, check_plain_name, load_config, path_field
from common.errors import shown
from common.imaging.image import MAX_SPACING_MM, MIN_SPACING_MM
from common.keys import CALCIFICATION, IGNORE, MASS, NONE_FINDING

if TYPE_CHECKING:
    from common.wire.app_signing import AppAgePolicy

#: Default ingest pixel budget (:attr:`SiteConfig.max_pixels`): 32 Mi samples
#: (Rows x Columns x NumberOfFrames x SamplesPerPixel). The largest FFDM
#: detectors give about 29 M (50 um over 24 x 30 cm). Measured: a decode
#: process peaked at 1.2 GiB on a 5792 x 5792 file, the largest accepted
#: (benchmarks/ingest_memory.py; docs/dicom.md, Hostile input).
DEFAULT_MAX_PIXELS = 32 * 2**20
#: Smallest allowed budget: one 64 x 64 image (the reader's minimum size).
MIN_MAX_PIXELS = 64 * 64

#: What a site word may map to.
FindingKind = Literal["mass", "calcification", "ignore", "none"]
FINDING_KINDS: tuple[str, ...] = (MASS, CALCIFICATION, IGNORE, NONE_FINDING)

#: Words every site understands (keys are matched case-insensitively).
DEFAULT_FINDINGS: dict[str, str] = {
    MASS: MASS,
    CALCIFICATION: CALCIFICATION,
    IGNORE: IGNORE,
    NONE_FINDING: NONE_FINDING,
    # mini-MIAS class words
    "circ": MASS,
    "spic": MASS,
    "misc": MASS,
    "calc": CALCIFICATION,
    "arch": IGNORE,
    "asym": IGNORE,
    "norm": NONE_FINDING,
}


def _default_findings() -> dict[str, FindingKind]:
    return dict(DEFAULT_FINDINGS)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SitePrivacy:
    """What this site requires of every federated run it trains in.

    The run's settings (``trainer.options``) are chosen by whoever launches the
    run on the SuperLink; this floor is the site's own, read from its config
    on its own disk, and checked before any of its images is read
    (:func:`client.trainer.check_privacy_floor`).

    Attributes:
        max_epsilon: train only under patient-level DP-SGD
            (``trainer.options.dp``) with a target epsilon
            (``trainer.options.dp_epsilon``) of at most this; ``None``: no floor.
    """

    max_epsilon: float | None = field(default=None, metadata=bounded(0.01, 1000.0))


@dataclass(frozen=True)
class SiteApps:
    """When the federated apps this site runs may have been signed.

    The coordinator signs each app release (``mammofed-server sign-app``);
    Flower runs any release a trusted key ever signed. These limits are the
    site's own (``mammofed-client start`` enforces them in the SuperNode,
    :mod:`client.supernode_main`):

    Attributes:
        signed_after: ISO 8601 date-time with a time zone, quoted in YAML
            (``"2026-12-01T00:00:00Z"``): releases signed before it are
            refused, e.g. every release before a security fix.
        max_age_days: releases signed longer ago are refused, so a signature
            expires and the coordinator re-signs (``sign-app``) what it
            still runs.
    """

    signed_after: str | None = None
    max_age_days: float | None = field(default=None, metadata=bounded(1.0, 36500.0))

    def __post_init__(self) -> None:
        if self.signed_after is not None:
            self.signed_after_unix()  # raises naming the value

    def signed_after_unix(self) -> int | None:
        """``signed_after`` in Unix seconds (``None`` when unset)."""
        import datetime as dt

        if self.signed_after is None:
            return None
        text = self.signed_after.strip().replace("Z", "+00:00")
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            raise ValueError(
                "signed_after: expected an ISO 8601 date-time with a time zone, "
                f'e.g. "2026-12-01T00:00:00Z"; got {shown(self.signed_after)}'
            )
        return int(when.timestamp())

    def policy(self) -> AppAgePolicy:
        """The limits as :class:`common.wire.app_signing.AppAgePolicy`."""
        from common.wire.app_signing import AppAgePolicy

        age = None if self.max_age_days is None else self.max_age_days * 86400.0
        return AppAgePolicy(self.signed_after_unix(), age)


@dataclass(frozen=True)
class SiteConfig:
    """One site's ingest, training and serving settings.

    Attributes:
        name: site name (keys per-site state, appears in reports).
        working_spacing_mm: mm per model-space pixel after resampling.
        default_spacing_mm: stored spacing to assume when a file (or the
            ``images.csv`` sidecar) gives none; ``None`` means refuse such files.
        findings: site words -> ``mass | calcification | ignore | none``; merged
            over :data:`DEFAULT_FINDINGS` (site entries win), keys lower-cased.
        workers: decode processes for ingest (each file is decoded in one of
            them, never in the ingest process).
        progress_every: log a progress line every this many files.
        pixel_dtype: how cache entries store model-space pixels; after a
            change the next ingest decodes every entry stored otherwise again.
        max_pixels: pixel budget checked from the header before decoding:
            a file with Rows x Columns x NumberOfFrames x SamplesPerPixel above
            it, or with more decoded bytes (that product x ceil(BitsAllocated
            / 8)) than ``2 * max_pixels``, is skipped with its reason;
            ``None`` disables the check (not for production).
        decode_timeout_s: a file whose decoding takes longer is skipped and
            its decode process stopped.
        specks: also keep each image's calcification specks, found at the
            stored resolution (``images/<key>.specks.npy``,
            :mod:`common.imaging.specks`), for a model with
            ``speck_clusters``; after turning it on the next ingest decodes
            every entry without them again.
        data_dir: the site's image tree (``SITE_DIR``), if fixed by config.
        cache_dir: the site cache (``CACHE_DIR``), if fixed by config.
        state_dir: per-site federation state (personal layers, EMA, DP
            accountant), used by the federation client.
        adapt: this site's overrides of the client-side adaptation settings
            (:class:`common.detector.adapt.AdaptConfig` field names: ``rampup_steps``,
            ``unsup_weight``, ``score_thresholds``, ``unlabeled_ratio``,
            ``consistency``, ``fewshot_max_labeled``, ``head_only``, ...), on
            top of what the federation's trainer options imply; validated
            when the file is loaded.
        dicom_node: the DICOM storage node of ``mammofed-client serve``
            (:class:`common.config.dicom_node.DicomNodeConfig`); ``None``: no node.
        privacy: this site's own floor for every run it trains in
            (:class:`SitePrivacy`); ``None``: none.
        apps: when the apps this site runs may have been signed
            (:class:`SiteApps`); ``None``: any release a trusted key signed.
    """

    name: str = "site"
    working_spacing_mm: float = field(default=0.4, metadata=bounded(0.05, 5.0))
    default_spacing_mm: float | None = field(
        default=None, metadata=bounded(MIN_SPACING_MM, MAX_SPACING_MM)
    )
    findings: dict[str, FindingKind] = field(default_factory=_default_findings)
    workers: int = field(default=1, metadata=bounded(1, 256))
    progress_every: int = field(default=50, metadata=bounded(1, None))
    pixel_dtype: Literal["uint16", "float16"] = "uint16"
    max_pixels: int | None = field(
        default=DEFAULT_MAX_PIXELS, metadata=bounded(MIN_MAX_PIXELS, None)
    )
    decode_timeout_s: float = field(default=600.0, metadata=bounded(1.0, None))
    specks: bool = False
    data_dir: Path | None = field(default=None, metadata=path_field(must_exist=False))
    cache_dir: Path | None = field(default=None, metadata=path_field(must_exist=False))
    state_dir: Path | None = field(default=None, metadata=path_field(must_exist=False))
    adapt: dict[str, Any] = field(default_factory=dict)
    dicom_node: DicomNodeConfig | None = None
    privacy: SitePrivacy | None = None
    apps: SiteApps | None = None

    def __post_init__(self) -> None:
        try:
            check_plain_name(self.name)  # it names the site's state folder
        except ValueError as exc:
            raise ValueError(f"name: {exc}") from None
        merged: dict[str, str] = dict(DEFAULT_FINDINGS)
        for word, kind in self.findings.items():
            key = str(word).strip().lower()
            if not key:
                raise ValueError(f"findings: empty site word mapped to {kind!r}")
            if kind not in FINDING_KINDS:
                raise ValueError(
                    f"findings.{word}: must be one of {', '.join(FINDING_KINDS)}; "
                    f"got {kind!r}"
                )
            merged[key] = kind
        object.__setattr__(self, "findings", merged)
        if self.adapt:
            from common.detector.adapt.config import validate_overrides

            validate_overrides(self.adapt, "adapt")

    def finding_kind(self, word: str) -> str | None:
        """Map a site word (case-insensitive) to its kind; ``None`` if unknown."""
        return self.findings.get(word.strip().lower())


def load_site_config(path: str | Path | None = None) -> SiteConfig:
    """Load a site YAML; ``None`` gives the defaults.

    Raises:
        ConfigError: naming the file, the key and the bad value.
    """
    if path is None:
        return SiteConfig()
    return load_config(path, SiteConfig)
