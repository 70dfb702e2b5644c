"""Generate phantom sites: plan women and images, render, write DICOM and CSVs.

Output per site (the site contract of docs/architecture.md)::

    OUT/<site>/<PatientID>/<L|R>_<CC|MLO>.dcm
    OUT/<site>/annotations.csv   image,finding,xmin,ymin,xmax,ymax (stored pixels)
    OUT/<site>/split.csv         patient_id,split (train | test)
    OUT/<site>/density.csv       image,density (the woman's BI-RADS a-d, every image)

plus ``OUT/scenario_resolved.yaml`` and ``OUT/_oracle/<site>/annotations.csv``:
every image's true findings (unlabeled ones included), outside the site folder,
read only by the simulation's "centralized oracle" regime (an upper bound a
real federation cannot have). Boxes are pixel edges of the stored DICOM
grid (origin top-left, before any flip; right breasts are stored with the chest
wall on the right). Labeled images without lesions get one ``none`` row;
unlabeled images get no row. Test women are always fully labeled: evaluation
uses their rows as ground truth only, never for training.

Determinism: each image draws from its own generators seeded by
``(scenario seed, site, woman, laterality, view, purpose)``, so files are
byte-identical for any worker count and any subset of sites.
"""

from __future__ import annotations

import csv
import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from common.config import write_resolved
from common.imaging.image import DENSITY_COLUMNS, DENSITY_CSV
from common.keys import (
    ANNOTATION_COLUMNS,
    ANNOTATIONS_CSV,
    CALCIFICATION,
    LEFT,
    MASS,
    NONE_FINDING,
    RIGHT,
    SPLIT_CSV,
    VIEW_CC,
    VIEW_MLO,
)
from common.progress import Eta
from simulation.phantom.acquisition import expose
from simulation.phantom.anatomy import (
    AnatomyMaps,
    BreastSpec,
    WomanSpec,
    build_anatomy,
    canonical_shape,
    draw_breast,
    draw_woman,
)
from simulation.phantom.dicom_writer import ImageIdentity, build_dataset, write_dicom
from simulation.phantom.lesions import (
    LesionSpec,
    RenderedLesion,
    draw_lesion_shape,
    place,
    render_lesion,
)
from simulation.phantom.scenario import Lesions, Scenario, SiteSpec
from simulation.phantom.vendors import Encoded, Voi, encode, present

log = logging.getLogger(__name__)

#: The four images of a screening exam, in InstanceNumber order.
EXAM: tuple[tuple[str, str], ...] = (
    (RIGHT, VIEW_CC),
    (LEFT, VIEW_CC),
    (RIGHT, VIEW_MLO),
    (LEFT, VIEW_MLO),
)
TRAIN = "train"
TEST = "test"
SPLIT_COLUMNS: tuple[str, ...] = ("patient_id", "split")
RESOLVED_SCENARIO = "scenario_resolved.yaml"

#: ``progress(site, done, total)`` callback type.
Progress = Callable[[str, int, int], None]
#: One image's annotation rows: as its site sees them, and the oracle's.
ImageRows = tuple[list[list[str]], list[list[str]]]


@dataclass(frozen=True)
class ImagePlan:
    """One image to generate.

    Attributes:
        site: site name.
        woman: index of the woman in the site.
        patient_id: DICOM PatientID.
        laterality, view: ``"L"``/``"R"`` and ``"CC"``/``"MLO"``.
        instance: InstanceNumber (1..4).
        split: ``"train"`` or ``"test"``.
        labeled: whether annotation rows are written.
        relpath: file path relative to the site folder (POSIX).
    """

    site: str
    woman: int
    patient_id: str
    laterality: str
    view: str
    instance: int
    split: str
    labeled: bool
    relpath: str


@dataclass(frozen=True)
class Finding:
    """A lesion box in stored pixels: ``(xmin, ymin, xmax, ymax)`` integer edges."""

    finding: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class RenderedImage:
    """One rendered image, everything in *stored* orientation (R breasts mirrored).

    Attributes:
        pixels: uint16[H, W] stored values as written to PixelData.
        voi: the VOI written to the file.
        photometric: ``MONOCHROME1`` or ``MONOCHROME2``.
        bits_stored: BitsStored.
        presented: float32[H, W] the vendor's processed image in [0, 1], dense
            bright, before encoding.
        attenuation: float32[H, W] projected log attenuation incl. lesions.
        lesion_attenuation: float32[H, W] the lesions' share of ``attenuation``
            (0 where no lesion).
        findings: lesion boxes in stored pixels.
        mask: bool[H, W] breast region.
        spacing_mm: stored pixel spacing at the breast (what a reader recovers).
        woman, breast: the anatomy draws.
    """

    pixels: np.ndarray
    voi: Voi
    photometric: str
    bits_stored: int
    presented: np.ndarray
    attenuation: np.ndarray
    lesion_attenuation: np.ndarray
    findings: tuple[Finding, ...]
    mask: np.ndarray
    spacing_mm: float
    woman: WomanSpec
    breast: BreastSpec


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


def image_rng(
    scenario: Scenario, site: str, woman: int, *tags: str
) -> np.random.Generator:
    """Generator seeded by ``(seed, site, woman, *tags)``; independent of workers.

    ``woman = -1`` gives site-level generators (splits, label selection).
    """
    ints = [scenario.seed, _key(site), woman + 1, *(_key(t) for t in tags)]
    return np.random.default_rng(np.random.SeedSequence(ints))


def patient_id(site: str, woman: int) -> str:
    """PatientID of a synthetic woman (unique across sites)."""
    return f"PH-{site}-{woman:05d}"


def woman_spec(scenario: Scenario, site_name: str, woman: int) -> WomanSpec:
    """The draws shared by a woman's four images (density a-d, size, thickness)."""
    return draw_woman(scenario.anatomy, image_rng(scenario, site_name, woman, "woman"))


def plan_site(scenario: Scenario, site: SiteSpec) -> list[ImagePlan]:
    """Every image of ``site`` with its split and labeled flag, in file order.

    ``round(test_fraction * women)`` women are test (at least one when the
    fraction is positive, never all); of the training women's images exactly
    ``round(labeled_fraction * n)`` are labeled; test images are always labeled.
    The ``extra_test_women`` (women ``women + extra_test_from`` onwards) are
    all test: they do not move the split or the labels of the first ``women``.
    """
    n = site.women
    order = image_rng(scenario, site.name, -1, "split").permutation(n)
    n_test = round(site.test_fraction * n)
    if site.test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    test = set(int(i) for i in order[:n_test])
    train_imgs = [(w, i) for w in range(n) if w not in test for i in range(len(EXAM))]
    n_lab = round(site.labeled_fraction * len(train_imgs))
    perm = image_rng(scenario, site.name, -1, "labels").permutation(len(train_imgs))
    labeled = {train_imgs[int(i)] for i in perm[:n_lab]}
    plans = []
    for w in site.woman_indices:
        pid = patient_id(site.name, w)
        for i, (lat, view) in enumerate(EXAM):
            is_test = w in test or w >= n
            plans.append(
                ImagePlan(
                    site=site.name,
                    woman=w,
                    patient_id=pid,
                    laterality=lat,
                    view=view,
                    instance=i + 1,
                    split=TEST if is_test else TRAIN,
                    labeled=is_test or (w, i) in labeled,
                    relpath=f"{pid}/{lat}_{view}.dcm",
                )
            )
    return plans


def draw_lesions(
    cfg: Lesions, maps: AnatomyMaps, rng: np.random.Generator
) -> list[LesionSpec]:
    """Draw 0, 1 or 2 lesions and place them inside the breast (not in muscle)."""
    n = 0
    if rng.random() < cfg.prevalence:
        n = 2 if rng.random() < cfg.second_lesion else 1
    # distance to the nearest border a lesion must not cross: skin or chest wall
    x_mm = (np.arange(maps.dist_mm.shape[1], dtype=np.float32) + 0.5) * maps.pitch_mm
    eligible = np.minimum(maps.dist_mm, x_mm[None, :])
    eligible = np.where(maps.muscle_mm > 0, 0.0, eligible)
    taken: list[tuple[float, float, float]] = []
    out = []
    for _ in range(n):
        kind = MASS if rng.random() < cfg.mass_fraction else CALCIFICATION
        diam = cfg.mass_diameter_mm if kind == MASS else cfg.cluster_diameter_mm
        shape = draw_lesion_shape(
            kind, (0.0, 0.0), diam, cfg.margins, cfg.speck_diameter_mm, cfg.specks, rng
        )
        placed = place(shape, eligible, maps.pitch_mm, taken, rng)
        if placed is not None:
            out.append(placed)
    return out


def render_image(
    scenario: Scenario,
    site_name: str,
    woman: int,
    laterality: str,
    view: str,
    *,
    lesions: list[LesionSpec] | None = None,
) -> RenderedImage:
    """Render one image of ``site_name`` deterministically.

    ``lesions`` replaces the drawn lesions (canonical mm, chest wall at x=0)
    when given (``[]`` renders the same image without lesions: anatomy and noise
    draws do not depend on the lesions).
    """
    site = scenario.site(site_name)
    vendor = scenario.vendor_of(site)
    pitch = scenario.stored_pitch_mm(vendor)
    shape = canonical_shape(scenario.anatomy, pitch)
    anatomy = scenario.anatomy
    woman_rng = partial(image_rng, scenario, site.name, woman)
    rng = partial(woman_rng, f"{laterality}{view}")  # this image's draws
    w_spec = woman_spec(scenario, site.name, woman)
    b_spec = draw_breast(anatomy, w_spec, view, rng("a"))
    maps = build_anatomy(anatomy, b_spec, shape, pitch, rng("tissue"))
    if lesions is None:
        lesions = draw_lesions(scenario.lesions, maps, rng("les"))
    les_att = np.zeros(shape, dtype=np.float32)
    rendered: list[RenderedLesion] = []
    for spec in lesions:
        r = render_lesion(spec, shape, pitch)
        if r is None:
            continue
        rendered.append(r)
        sl = np.s_[r.y0 : r.y0 + r.path.shape[0], r.x0 : r.x0 + r.path.shape[1]]
        mu_l = anatomy.mu_per_cm[spec.kind]  # keys "mass" and "calcification"
        path = np.minimum(r.path, maps.tissue_mm[sl])
        les_att[sl] += 0.1 * (mu_l - maps.mu_background[sl]) * path
    att = maps.attenuation + les_att
    det_pitch = scenario.detector_pitch_mm(vendor)
    exposure = expose(att, maps.mask, vendor, det_pitch, rng("noise"))
    img = present(exposure, vendor, pitch)
    enc = encode(img, maps.mask, vendor)
    flip = laterality == RIGHT
    w = shape[1]

    def orient(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[:, ::-1]) if flip else a

    findings = []
    for r in rendered:
        x0, y0, x1, y1 = r.box
        box = (w - x1, y0, w - x0, y1) if flip else r.box
        findings.append(Finding(finding=r.spec.kind, box=box))
    return RenderedImage(
        pixels=orient(enc.pixels),
        voi=enc.voi,
        photometric=enc.photometric,
        bits_stored=enc.bits_stored,
        presented=orient(img),
        attenuation=orient(att),
        lesion_attenuation=orient(les_att),
        findings=tuple(findings),
        mask=orient(maps.mask),
        spacing_mm=pitch,
        woman=w_spec,
        breast=b_spec,
    )


def _annotation_rows(
    plan: ImagePlan, findings: tuple[Finding, ...], *, oracle: bool = False
) -> list[list[str]]:
    if not (plan.labeled or oracle):
        return []
    if not findings:
        return [[plan.relpath, NONE_FINDING, "", "", "", ""]]
    return [[plan.relpath, f.finding, *(str(v) for v in f.box)] for f in findings]


def write_image(scenario: Scenario, plan: ImagePlan, site_dir: Path) -> ImageRows:
    """Render and write one planned image.

    Returns its annotation rows as the site sees them (none when unlabeled) and
    the oracle's rows (always the true findings).
    """
    site = scenario.site(plan.site)
    vendor = scenario.vendor_of(site)
    img = render_image(scenario, plan.site, plan.woman, plan.laterality, plan.view)
    identity = ImageIdentity(
        patient_id=plan.patient_id,
        woman=plan.woman,
        laterality=plan.laterality,
        view=plan.view,
        instance=plan.instance,
        age=int(image_rng(scenario, site.name, plan.woman, "age").integers(40, 76)),
        thickness_mm=img.breast.thickness_mm,
    )
    enc = Encoded(img.pixels, img.voi, img.photometric, img.bits_stored)
    ds = build_dataset(enc, identity, scenario, site, vendor)
    write_dicom(ds, site_dir / plan.relpath)
    return (
        _annotation_rows(plan, img.findings),
        _annotation_rows(plan, img.findings, oracle=True),
    )


#: Folder (under the scenario output) of the oracle's complete annotations.
ORACLE_DIR = "_oracle"


class _LogProgress:
    """A progress line per tenth of each site's images, with the site's ETA."""

    def __init__(self) -> None:
        self._eta: dict[str, tuple[Eta, int]] = {}

    def __call__(self, site: str, done: int, total: int) -> None:
        if site not in self._eta:
            # the clock starts at the site's first report: what was done
            # before it is taken out of the work, not timed
            eta = Eta(max(1, total))
            eta.skip(done)
            self._eta[site] = (eta, done)
        if done == total or done % max(1, total // 10) == 0:
            eta, before = self._eta[site]
            text = eta.reach(done - before)
            log.info("phantom site %s: %d/%d images (%s)", site, done, total, text)


def generate_site(
    scenario: Scenario,
    site_name: str,
    out_dir: str | Path,
    *,
    workers: int = 1,
    progress: Progress | None = None,
) -> Path:
    """Write ``out_dir/<site_name>/`` (DICOM, annotations.csv, split.csv, density.csv).

    Existing files are overwritten with identical content; ``.dcm`` files in the
    site folder that the plan does not produce are removed (the folder belongs
    to the generator). Returns the site folder.
    """
    site = scenario.site(site_name)
    site_dir = Path(out_dir) / site.name
    site_dir.mkdir(parents=True, exist_ok=True)
    plans = plan_site(scenario, site)
    wanted = {site_dir / p.relpath for p in plans}
    for stale in sorted(site_dir.rglob("*.dcm")):
        if stale not in wanted:
            log.info("removing stale file %s", stale)
            stale.unlink()
    write = partial(write_image, scenario, site_dir=site_dir)
    rows: list[ImageRows] = []
    with ExitStack() as stack:
        results: Iterator[ImageRows] = map(write, plans)
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            results = pool.map(write, plans, chunksize=2)
        for r in results:
            rows.append(r)
            if progress:
                progress(site.name, len(rows), len(plans))
    oracle_dir = Path(out_dir) / ORACLE_DIR / site.name
    oracle_dir.mkdir(parents=True, exist_ok=True)
    for folder, which in ((site_dir, 0), (oracle_dir, 1)):
        annotations = [row for r in rows for row in r[which]]
        _write_csv(folder / ANNOTATIONS_CSV, ANNOTATION_COLUMNS, annotations)
    splits = {p.patient_id: p.split for p in plans}
    _write_csv(site_dir / SPLIT_CSV, SPLIT_COLUMNS, list(splits.items()))
    density = {
        w: woman_spec(scenario, site.name, w).density for w in site.woman_indices
    }
    _write_csv(
        site_dir / DENSITY_CSV,
        DENSITY_COLUMNS,
        [(p.relpath, density[p.woman]) for p in plans],
    )
    return site_dir


def _write_csv(
    path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]
) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(header)
        wr.writerows(rows)


def generate_scenario(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    workers: int = 1,
    progress: bool | Progress = True,
    sites: list[str] | None = None,
) -> dict[str, Path]:
    """Generate every site (or the named ``sites``) under ``out_dir``.

    Args:
        scenario: from :func:`simulation.phantom.load_scenario`.
        out_dir: output root; ``out_dir/<site>/`` per site.
        workers: processes rendering images (results do not depend on it).
        progress: ``True`` logs progress lines, ``False`` is silent, or a
            ``progress(site, done, total)`` callback (the CLI draws a bar).
        sites: subset of site names (default: all).

    Returns:
        ``{site name: site folder}`` in scenario order. Idempotent: a second run
        rewrites the same bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(scenario, out, RESOLVED_SCENARIO)
    cb = _LogProgress() if progress is True else progress or None
    names = [s.name for s in scenario.sites] if sites is None else list(sites)
    return {
        name: generate_site(scenario, name, out, workers=workers, progress=cb)
        for name in names
    }
