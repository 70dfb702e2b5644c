"""Typed phantom scenarios and vendor profiles (YAML -> frozen dataclasses).

A *scenario* (``configs/simulation/*.yaml``) names the sites of a one-machine
federation, each with a vendor profile, a number of synthetic women, a labeled
fraction and a held-out test fraction, plus the anatomy and lesion settings
shared by all sites. A *vendor profile* (``configs/simulation/vendors/*.yaml``)
holds the acquisition physics and presentation processing of one synthetic
vendor. Every number that drives an image is in these files or derived from the
scenario ``seed``.

Units: lengths in mm, linear attenuation in 1/cm, pitches in mm per pixel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.config import bounded, load_config, path_field
from common.config.loader import check_plain_name, plain_name
from common.errors import ConfigError
from common.keys import FOR_PROCESSING

#: A ``[low, high]`` pair (fixed-length tuples are checked in ``__post_init__``).
Range = tuple[float, ...]


def _check_pair(key: str, value: tuple[float, ...], increasing: bool = True) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is ``[low, high]``."""
    if len(value) != 2:
        raise ValueError(f"{key} must have 2 items, got {list(value)}")
    if increasing and value[0] > value[1]:
        raise ValueError(f"{key} must be [low, high], got {list(value)}")


@dataclass(frozen=True)
class UnsharpStage:
    """One unsharp-masking scale: ``p += amount * (p - gaussian(p, sigma_mm))``."""

    amount: float = field(metadata=bounded(0.0, 10.0))
    sigma_mm: float = field(metadata=bounded(0.01, 100.0))


@dataclass(frozen=True)
class Processing:
    """Presentation processing applied to the log image (FOR PRESENTATION only).

    Attributes:
        flat_field: fraction of the heel effect removed by flat-field correction.
        equalization: peripheral (thickness) equalization strength, 0 = none.
        equalization_sigma_mm: scale of the low-pass that estimates thickness.
        unsharp: multi-scale unsharp-masking stages, applied in order.
        gamma: power applied to the normalized ``[0, 1]`` image.
        low_percentile, high_percentile: breast percentiles mapped to 0 and 1.
    """

    flat_field: float = field(default=1.0, metadata=bounded(0.0, 1.0))
    equalization: float = field(default=0.0, metadata=bounded(0.0, 1.0))
    equalization_sigma_mm: float = field(default=10.0, metadata=bounded(0.5, 100.0))
    unsharp: tuple[UnsharpStage, ...] = ()
    gamma: float = field(default=1.0, metadata=bounded(0.2, 5.0))
    low_percentile: float = field(default=0.5, metadata=bounded(0.0, 50.0))
    high_percentile: float = field(default=99.5, metadata=bounded(50.0, 100.0))


@dataclass(frozen=True)
class VendorProfile:
    """Acquisition physics and DICOM encoding of one synthetic vendor.

    Attributes:
        name: profile name used by scenarios (``H``, ``V2``...).
        manufacturer: DICOM Manufacturer (names the synthetic profile, never a
            company).
        model_name: DICOM ManufacturerModelName.
        detector: ``direct`` (a-Se) or ``indirect`` (CsI scintillator).
        pixel_pitch_mm: detector pitch at full resolution.
        blur_sigma_mm: Gaussian sigma of the detector MTF, at the detector.
        quanta_per_mm2: detected quanta per mm2 behind the median breast
            attenuation (automatic exposure control target); sets quantum noise.
        electronic_noise: additive Gaussian noise, std in quanta per pixel.
        heel_effect: fractional intensity drop from chest wall to the far edge.
        bits_stored: DICOM BitsStored (12-16).
        presentation_intent: ``FOR PRESENTATION`` or ``FOR PROCESSING``.
        photometric: ``MONOCHROME1`` (high value dark) or ``MONOCHROME2``.
        voi: VOI encoding: ``window`` (linear WindowCenter/Width), ``sigmoid``
            (VOILUTFunction SIGMOID), ``lut`` (VOI LUT Sequence table).
        output_range: fraction of ``[0, 2**bits_stored - 1]`` the breast spans.
        spacing_tags: which spacing attributes are written: ``both``
            (PixelSpacing and ImagerPixelSpacing), ``imager`` (ImagerPixelSpacing
            only) or ``imager_mag`` (ImagerPixelSpacing plus
            EstimatedRadiographicMagnificationFactor).
        magnification: EstimatedRadiographicMagnificationFactor; the spacing at
            the breast is ``pitch / magnification`` (only with ``imager_mag``).
        kvp, anode, filter: exposure facts written to the header.
        processing: presentation processing (ignored for FOR PROCESSING).
    """

    name: str
    manufacturer: str
    model_name: str
    detector: Literal["direct", "indirect"]
    pixel_pitch_mm: float = field(metadata=bounded(0.02, 0.5))
    blur_sigma_mm: float = field(metadata=bounded(0.0, 1.0))
    quanta_per_mm2: float = field(metadata=bounded(10.0, 1e8))
    electronic_noise: float = field(default=2.0, metadata=bounded(0.0, 1e5))
    heel_effect: float = field(default=0.1, metadata=bounded(0.0, 0.5))
    bits_stored: int = field(default=14, metadata=bounded(12, 16))
    presentation_intent: Literal["FOR PRESENTATION", "FOR PROCESSING"] = (
        "FOR PRESENTATION"
    )
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2"
    voi: Literal["window", "sigmoid", "lut"] = "window"
    output_range: tuple[float, ...] = field(
        default=(0.02, 0.9), metadata=bounded(0.0, 1.0)
    )
    spacing_tags: Literal["both", "imager", "imager_mag"] = "both"
    magnification: float = field(default=1.0, metadata=bounded(1.0, 2.0))
    software_version: str = "1.0"
    kvp: float = field(default=28.0, metadata=bounded(20.0, 50.0))
    anode: str = "W"
    filter: str = "RH"
    processing: Processing = field(default_factory=Processing)

    def __post_init__(self) -> None:
        _check_pair("output_range", self.output_range)
        if self.output_range[0] >= self.output_range[1]:
            raise ValueError(
                f"vendor {self.name}: output_range must be increasing, "
                f"got {list(self.output_range)}"
            )
        if self.presentation_intent == FOR_PROCESSING and self.voi != "window":
            raise ValueError(
                f"vendor {self.name}: FOR PROCESSING images use voi 'window', "
                f"got {self.voi!r}"
            )
        if self.magnification != 1.0 and self.spacing_tags != "imager_mag":
            raise ValueError(
                f"vendor {self.name}: magnification {self.magnification} needs "
                "spacing_tags 'imager_mag'"
            )


@dataclass(frozen=True)
class Anatomy:
    """Vendor-independent anatomy settings (one random draw per image).

    Attributes:
        field_mm: ``(height, width)`` of the detector field in mm.
        breast_depth_mm: chest wall to nipple (CC), uniform range.
        breast_half_height_mm: half the breast's extent along the chest wall.
        thickness_mm: compressed thickness range.
        skin_mm: skin thickness.
        beta: 1/f^beta exponent range of the tissue field.
        tissue_layers: independent thresholded layers summed (2.5-D tissue).
        density_probs: probability of BI-RADS density a, b, c, d.
        density_fraction: glandular area fraction range per density (a-d).
        mu_per_cm: linear attenuation near 20 keV of adipose, glandular, skin,
            muscle, mass and calcification tissue.
    """

    field_mm: tuple[float, ...] = field(
        default=(240.0, 180.0), metadata=bounded(20.0, 500.0)
    )
    breast_depth_mm: Range = field(default=(80.0, 140.0), metadata=bounded(10, 400))
    breast_half_height_mm: Range = field(
        default=(60.0, 100.0), metadata=bounded(10, 400)
    )
    thickness_mm: Range = field(default=(35.0, 75.0), metadata=bounded(10.0, 120.0))
    skin_mm: float = field(default=1.5, metadata=bounded(0.1, 5.0))
    beta: Range = field(default=(2.8, 3.2), metadata=bounded(1.0, 5.0))
    tissue_layers: int = field(default=4, metadata=bounded(1, 16))
    density_probs: tuple[float, ...] = field(
        default=(0.1, 0.4, 0.4, 0.1), metadata=bounded(0.0, 1.0)
    )
    density_fraction: tuple[Range, ...] = (
        (0.05, 0.15),
        (0.15, 0.3),
        (0.3, 0.5),
        (0.5, 0.7),
    )
    mu_per_cm: dict[str, float] = field(
        default_factory=lambda: {
            "adipose": 0.46,
            "glandular": 0.80,
            "skin": 0.80,
            "muscle": 0.80,
            "mass": 0.84,
            "calcification": 12.0,
        }
    )

    def __post_init__(self) -> None:
        _check_pair("field_mm", self.field_mm, increasing=False)
        for key in ("breast_depth_mm", "breast_half_height_mm", "thickness_mm", "beta"):
            _check_pair(key, getattr(self, key))
        if len(self.density_probs) != 4 or len(self.density_fraction) != 4:
            raise ValueError(
                "density_probs and density_fraction need 4 entries (a-d), got "
                f"{list(self.density_probs)} and {list(self.density_fraction)}"
            )
        for i, pair in enumerate(self.density_fraction):
            _check_pair(f"density_fraction[{i}]", pair)
        need = {"adipose", "glandular", "skin", "muscle", "mass", "calcification"}
        missing = need - set(self.mu_per_cm)
        extra = set(self.mu_per_cm) - need
        if missing or extra:
            raise ValueError(
                f"mu_per_cm needs exactly {sorted(need)}; missing {sorted(missing)}, "
                f"unknown {sorted(extra)}"
            )
        if abs(sum(self.density_probs) - 1.0) > 1e-6:
            raise ValueError(
                f"density_probs must sum to 1, got {list(self.density_probs)}"
            )


@dataclass(frozen=True)
class Lesions:
    """Lesion prevalence, mix and sizes.

    Attributes:
        prevalence: probability that an image carries at least one lesion.
        second_lesion: probability of a second lesion given one.
        mass_fraction: probability that a lesion is a mass (else a cluster).
        margins: weights of ``circumscribed``, ``lobulated``, ``ill_defined``,
            ``spiculated`` masses.
        mass_diameter_mm: mass diameter range.
        speck_diameter_mm: calcification speck diameter range.
        specks: number of specks per cluster (inclusive range).
        cluster_diameter_mm: diameter of the region holding a cluster.
    """

    prevalence: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    second_lesion: float = field(default=0.2, metadata=bounded(0.0, 1.0))
    mass_fraction: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    margins: dict[str, float] = field(
        default_factory=lambda: {
            "circumscribed": 1.0,
            "lobulated": 1.0,
            "ill_defined": 1.0,
            "spiculated": 1.0,
        }
    )
    mass_diameter_mm: Range = field(default=(5.0, 30.0), metadata=bounded(1.0, 80.0))
    speck_diameter_mm: Range = field(default=(0.1, 0.6), metadata=bounded(0.05, 3.0))
    specks: tuple[int, ...] = field(default=(3, 20), metadata=bounded(1, 100))
    cluster_diameter_mm: Range = field(default=(5.0, 15.0), metadata=bounded(1.0, 50.0))

    def __post_init__(self) -> None:
        from simulation.phantom.lesions import MARGINS

        for key in ("mass_diameter_mm", "speck_diameter_mm", "cluster_diameter_mm"):
            _check_pair(key, getattr(self, key))
        _check_pair("specks", self.specks)

        unknown = set(self.margins) - set(MARGINS)
        if unknown:
            raise ValueError(
                f"unknown mass margin(s) {sorted(unknown)}; valid: {list(MARGINS)}"
            )
        if sum(self.margins.values()) <= 0:
            raise ValueError(f"margins weights must sum > 0, got {self.margins}")


@dataclass(frozen=True)
class SiteSpec:
    """One synthetic hospital.

    Attributes:
        name: site name (folder name under the output dir): a plain name, no
            ``/`` or backslash, not ``.`` or ``..``.
        vendor: vendor profile name (a file stem under ``vendors_dir``).
        role: free text role (``base``, ``few-shot``, ``semi-supervised``...).
        women: number of synthetic women (4 images each: L/R x CC/MLO).
        labeled_fraction: fraction of the *training* women's images labeled.
        test_fraction: fraction of women held out as test (always labeled).
        extra_test_women: test-only women added after the first ``women``
            (they are drawn like every other woman, from their own index). The
            first ``women``, their split and their labels do not change, so a
            study can score on a larger test set with a model trained on the
            smaller scenario (``configs/simulation/study.yaml``).
        extra_test_from: the extra test women are women number
            ``women + extra_test_from`` onwards (default 0: right after the
            first ``women``). A second scenario with the same first ``women``
            and another offset scores the same models on test women no one
            has seen (``configs/simulation/study-confirm.yaml``).
    """

    name: str = field(metadata=plain_name())
    vendor: str = field(metadata=plain_name())
    role: str = ""
    women: int = field(default=10, metadata=bounded(1, 100000))
    labeled_fraction: float = field(default=1.0, metadata=bounded(0.0, 1.0))
    test_fraction: float = field(default=0.25, metadata=bounded(0.0, 1.0))
    extra_test_women: int = field(default=0, metadata=bounded(0, 100000))
    extra_test_from: int = field(default=0, metadata=bounded(0, 100000))

    def __post_init__(self) -> None:
        try:
            check_plain_name(self.name)
        except ValueError as exc:
            raise ValueError(f"name: {exc}") from None

    @property
    def all_women(self) -> int:
        """``women`` plus ``extra_test_women``: how many women the site writes."""
        return self.women + self.extra_test_women

    @property
    def woman_indices(self) -> list[int]:
        """Every woman the site writes, by the index her draws derive from."""
        first = self.women + self.extra_test_from
        return [*range(self.women), *range(first, first + self.extra_test_women)]


@dataclass(frozen=True)
class Scenario:
    """A whole synthetic federation.

    Attributes:
        name: scenario name.
        seed: root seed; every random draw derives from it.
        working_spacing_mm: the spacing the detector works at (mm per model pixel).
        pixel_scale: multiplier on each vendor's pitch for the stored images
            (1 = realistic; the demo stores coarser images).
        vendors_dir: folder of vendor profile YAML files (relative to the file).
        sites: the sites, in order.
        anatomy, lesions: shared settings.
        vendor_profiles: resolved profiles by name, filled by
            :func:`load_scenario` from ``vendors_dir`` (may also be given inline).
    """

    name: str
    seed: int
    working_spacing_mm: float = field(metadata=bounded(0.01, 5.0))
    sites: tuple[SiteSpec, ...]
    vendors_dir: Path = field(
        default=Path("vendors"), metadata=path_field(must_exist=False)
    )
    pixel_scale: float = field(default=1.0, metadata=bounded(1.0, 20.0))
    anatomy: Anatomy = field(default_factory=Anatomy)
    lesions: Lesions = field(default_factory=Lesions)
    vendor_profiles: dict[str, VendorProfile] = field(default_factory=dict)

    def site(self, name: str) -> SiteSpec:
        """The site called ``name``; ``KeyError`` naming the valid ones."""
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {[s.name for s in self.sites]}")

    def vendor_of(self, site: SiteSpec) -> VendorProfile:
        """The resolved vendor profile of ``site``."""
        return self.vendor_profiles[site.vendor]

    def stored_pitch_mm(self, vendor: VendorProfile) -> float:
        """Spacing of the stored pixels at the breast (mm), what a reader recovers."""
        return vendor.pixel_pitch_mm * self.pixel_scale / vendor.magnification

    def detector_pitch_mm(self, vendor: VendorProfile) -> float:
        """Spacing of the stored pixels at the detector (ImagerPixelSpacing)."""
        return vendor.pixel_pitch_mm * self.pixel_scale


def load_vendor(path: str | Path) -> VendorProfile:
    """Load one vendor profile YAML file."""
    return load_config(path, VendorProfile)


def load_scenario(path: str | Path) -> Scenario:
    """Load a scenario YAML file and resolve its vendor profiles.

    Vendor profiles come from ``vendors_dir/<vendor>.yaml`` for every vendor a site
    names (inline ``vendor_profiles`` entries take precedence). Errors
    (:class:`common.errors.ConfigError`) name the file, key and bad value.
    """
    p = Path(path)
    scenario = load_config(p, Scenario)
    src = str(p)
    names = [s.name for s in scenario.sites]
    if not names:
        raise ConfigError(src, "sites", "must list at least one site")
    if len(set(names)) != len(names):
        raise ConfigError(src, "sites", f"site names must be unique, got {names}")
    profiles = dict(scenario.vendor_profiles)
    for i, site in enumerate(scenario.sites):
        if site.vendor in profiles:
            continue
        vpath = scenario.vendors_dir / f"{site.vendor}.yaml"
        if not vpath.is_file():
            raise ConfigError(
                src,
                f"sites[{i}].vendor",
                f"no vendor profile {site.vendor!r} (looked for {vpath})",
            )
        profile = load_vendor(vpath)
        if profile.name != site.vendor:
            raise ConfigError(
                str(vpath), "name", f"must equal the file stem {site.vendor!r}"
            )
        profiles[site.vendor] = profile
    return dataclasses.replace(scenario, vendor_profiles=profiles)
