"""``SiteDataset``: the site cache as torch datasets (views, splits, folds).

Views (``SiteDataset.view(name)``), all subsets of :attr:`SiteDataset.records`:

* ``all``: every cached image, labels shown where the image is labeled;
* ``train``: every image of a train-split patient (labels shown where labeled);
* ``labeled``: train-split images with box supervision (labeled and not weak);
* ``unlabeled``: train-split images without box supervision (no annotation
  row, or weakly labeled); **labels are never exposed** (empty boxes,
  ``labeled=False``);
* ``test``: test-split images that are fully labeled (the evaluation set);
  test-split images without box labels are in no view but ``all``, so the test
  patients are never trained on.

Split: grouped by patient and deterministic in the seed. When the cache holds
the site's ``split.csv`` (``split.json``), it decides (patients it does not
list fall back to the seeded rule below, with a warning). Otherwise patients
with at least one box-labeled image are stratified by "has a lesion" and a
``test_fraction`` of each stratum (rounded, at least one when the stratum has
two or more patients and the fraction is positive) goes to test; patients with
no box-labeled image always train.

Item: ``(image FloatTensor[1, H, W] in [0, 1] model space, target)``; with
``SiteDataset(contralateral=True)`` ``FloatTensor[2, H, W]``, the second channel
the same woman's other breast (:meth:`SiteDataset.partner_pixels`). Target keys
``boxes`` FloatTensor[N, 4] (model space, ``xmin, ymin, xmax, ymax``),
``labels`` Int64Tensor[N] (index into :data:`common.keys.CLASSES`), ``ignore``
FloatTensor[M, 4] (model space), ``key`` str, ``spacing_mm`` float,
``labeled`` bool, ``patient_id`` str.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import ConfigError, MammofedError
from common.imaging.annotations import ImageTargets
from common.imaging.cache import ANNOTATIONS_JSON, CacheError, SiteCache
from common.imaging.geometry import Geometry
from common.imaging.image import ImageMeta

log = logging.getLogger(__name__)

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


@dataclass(frozen=True)
class ImageRecord:
    """Everything known about one cached image, without its pixels.

    Attributes:
        key: cache key.
        source: file path relative to ``SITE_DIR``.
        patient_id: grouping id (``meta.patient_id``, or ``"key:<key>"`` when
            the file gave none, making the image its own group).
        labeled: has at least one annotation row.
        weak: has an image-level label (no box supervision).
        box_labeled: ``labeled and not weak``: usable for box supervision.
        has_lesion: a mass or calcification is annotated (box or image-level).
        boxes: float32[N, 4] lesion boxes, model space.
        labels: int64[N] class indices.
        ignore: float32[M, 4] ignore regions, model space.
        spacing_mm: mm per model-space pixel.
        geometry: stored -> model mapping.
        meta: header facts.
        split: ``"train"`` or ``"test"``.
    """

    key: str
    source: str
    patient_id: str
    labeled: bool
    weak: bool
    has_lesion: bool
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    spacing_mm: float
    geometry: Geometry
    meta: ImageMeta
    split: str

    @property
    def box_labeled(self) -> bool:
        """Whether the image can supervise boxes (labeled, not weak)."""
        return self.labeled and not self.weak


#: view name -> whether a record is in it (see the module docstring).
_IN_VIEW: dict[str, Callable[[ImageRecord], bool]] = {
    "labeled": lambda r: r.split == "train" and r.box_labeled,
    "unlabeled": lambda r: r.split == "train" and not r.box_labeled,
    "test": lambda r: r.split == "test" and r.box_labeled,
    "train": lambda r: r.split == "train",
    "all": lambda r: True,
}
VIEWS: tuple[str, ...] = tuple(_IN_VIEW)


def _boxes(values: list[list[float]]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 4)


def _check_in_image(path: Path, key: str, t: ImageTargets, g: Geometry) -> None:
    """Raise :class:`CacheError` when a model-space box leaves the model image.

    (``targets_for`` clips every box to it, so only a tampered file does.)
    """
    h, w = g.model_shape
    for name in ("boxes", "ignore"):
        for b in getattr(t, name):
            if not (0 <= b[0] and 0 <= b[1] and b[2] <= w and b[3] <= h):
                raise CacheError(
                    f"{path}: {key}: {name} {b!r}: outside the {w}x{h} model image"
                )


def patient_split(
    patients: dict[str, tuple[bool, bool]], test_fraction: float, seed: int
) -> dict[str, str]:
    """Seeded, stratified patient split.

    Args:
        patients: ``{patient_id: (box_labeled_any, has_lesion_any)}``.
        test_fraction: share of box-labeled patients per stratum sent to test.
        seed: RNG seed; the same inputs and seed give the same split.

    Returns:
        ``{patient_id: "train" | "test"}``.
    """
    out = {p: "train" for p in patients}
    if test_fraction <= 0:
        return out
    rng = np.random.default_rng(seed)
    for lesion in (True, False):
        stratum = sorted(p for p, (bl, les) in patients.items() if bl and les == lesion)
        if not stratum:
            continue
        n_test = int(round(test_fraction * len(stratum)))
        if n_test == 0 and len(stratum) >= 2:
            n_test = 1
        n_test = min(n_test, len(stratum) - 1) if len(stratum) > 1 else n_test
        for i in rng.permutation(len(stratum))[:n_test]:
            out[stratum[int(i)]] = "test"
    return out


class SiteView(Dataset[tuple[torch.Tensor, Target]]):
    """A torch dataset over some records of a :class:`SiteDataset`.

    Items: ``(FloatTensor[1, H, W] in [0, 1], target)`` (see module docstring).
    With ``hide_labels`` every target has empty boxes/labels/ignore and
    ``labeled=False``.
    """

    def __init__(
        self,
        site: SiteDataset,
        indices: Sequence[int],
        *,
        transform: Transform | None = None,
        hide_labels: bool = False,
        name: str = "",
    ) -> None:
        self.site = site
        self.indices = list(indices)
        self.transform = transform
        self.hide_labels = hide_labels
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def records(self) -> list[ImageRecord]:
        """Records of this view, in item order."""
        return [self.site.records[i] for i in self.indices]

    def target(self, i: int) -> Target:
        """Target of item ``i`` without loading pixels."""
        r = self.site.records[self.indices[i]]
        show = r.labeled and not self.hide_labels
        return {
            "boxes": torch.from_numpy(r.boxes.copy() if show else _boxes([])),
            "labels": torch.from_numpy(
                r.labels.copy() if show else np.zeros(0, dtype=np.int64)
            ),
            "ignore": torch.from_numpy(r.ignore.copy() if show else _boxes([])),
            "key": r.key,
            "spacing_mm": float(r.spacing_mm),
            "labeled": bool(show),
            "patient_id": r.patient_id,
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        if not 0 <= i < len(self.indices):
            raise IndexError(f"index {i} out of range for view of {len(self)} items")
        idx = self.indices[i]
        r = self.site.records[idx]
        px = self.site.cache.load_pixels(r.key, r.geometry.model_shape)
        image = torch.from_numpy(px).unsqueeze(0)
        if self.site.contralateral:
            h, w = image.shape[-2:]
            other = self.site.partner_pixels(idx, (int(h), int(w)))
            image = torch.cat([image, torch.from_numpy(other)[None].to(image.dtype)])
        target = self.target(i)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def pair_breasts(records: Sequence[ImageRecord]) -> dict[int, int]:
    """``{i: j}``: record ``j`` is the other breast of record ``i``.

    Same woman (a known ``patient_id``, not a ``key:`` stand-in), same view,
    the other laterality (``L``/``R``); the first such record in order when
    there are several. Records with an unknown laterality or view get none.
    """

    def side(r: ImageRecord) -> tuple[str, str, str] | None:
        lat, view = (r.meta.laterality or "").upper(), (r.meta.view or "").upper()
        if r.patient_id.startswith("key:") or lat not in ("L", "R") or not view:
            return None
        return r.patient_id, view, lat

    sides = [side(r) for r in records]
    first: dict[tuple[str, str, str], int] = {}
    for i, k in enumerate(sides):
        if k is not None:
            first.setdefault(k, i)
    out: dict[int, int] = {}
    for i, k in enumerate(sides):
        if k is not None:
            j = first.get((k[0], k[1], "R" if k[2] == "L" else "L"))
            if j is not None:
                out[i] = j
    return out


#: Share of a site's box-labeled women held out as test women when its cache
#: has no ``split.json`` (the site's ``split.csv``): every trainer, ``train-local``
#: and ``evaluate`` split by it (``client.detector_trainer.training_split``).
DEFAULT_TEST_FRACTION = 0.2


def _check_spacing(root: Path, entries: Sequence[Any], model_mm: float) -> None:
    """Raise ``ConfigError`` unless every entry was made for ``model_mm``."""
    made = sorted({float(e.working_spacing_mm) for e in entries})
    off = [m for m in made if abs(m - float(model_mm)) > 1e-6]
    if off:
        raise ConfigError(
            str(root),
            "working_spacing_mm",
            f"the cache's images were ingested at {', '.join(f'{m:g}' for m in made)}"
            f" mm per pixel, the model works at {float(model_mm):g} mm "
            "(model.working_spacing_mm): ingest into another cache with a site "
            "config of that working_spacing_mm, or set the model to match",
        )


class SiteDataset:
    """A site cache as records, views, a patient-grouped split and k folds.

    Args:
        cache_dir: a folder written by ``mammofed-client ingest``.
        test_fraction: used when the cache holds no site split.
        seed: split seed.
        model_spacing_mm: the ``working_spacing_mm`` of the model that will
            train on or be scored on these images, when known: the cache's
            entries must have been made for it.
        contralateral: every item gets a second channel, the other breast of
            the same woman and view (``ModelConfig.contralateral``; see
            :meth:`partner_pixels`).

    Pixels are read from disk when an item is read (lazy, bounded memory).
    An entry whose JSON is malformed, or that ``manifest.csv`` lists but whose
    JSON is missing, is left out with a logged warning naming it
    (:meth:`SiteCache.iter_entries`, :meth:`SiteCache.missing_entries`).

    Raises:
        MammofedError: the folder holds no cache entries.
        ConfigError: ``model_spacing_mm`` differs from the spacing the
            entries were ingested for (the site config's
            ``working_spacing_mm``): a model told 0.8 mm would otherwise
            train on 0.4 mm pixels, its mm-sized settings off by 2x, silently.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        seed: int = 0,
        model_spacing_mm: float | None = None,
        contralateral: bool = False,
    ) -> None:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        self.cache = SiteCache(cache_dir)
        self.test_fraction = test_fraction
        self.seed = seed
        entries = sorted(self.cache.iter_entries(), key=lambda e: e.source)
        self.cache.missing_entries()  # logs each image the manifest has lost
        if not entries:
            raise MammofedError(
                f"{self.cache.root}: no cache entries (run ingest first)"
            )
        if model_spacing_mm is not None:
            _check_spacing(self.cache.root, entries, model_spacing_mm)
        targets = self.cache.read_annotations()
        site_split = self.cache.read_split()
        pre: list[tuple[Any, ImageTargets, str]] = []
        for e in entries:
            t = targets.get(e.key)
            if t is None:
                log.warning(
                    "%s: no annotation record for %s; unlabeled", cache_dir, e.source
                )
                t = ImageTargets.unlabeled()
            _check_in_image(self.cache.root / ANNOTATIONS_JSON, e.key, t, e.geometry)
            pid = e.meta.patient_id or f"key:{e.key}"
            pre.append((e, t, pid))
        self.split = self._split(pre, site_split)
        self.records: list[ImageRecord] = [
            ImageRecord(
                key=e.key,
                source=e.source,
                patient_id=pid,
                labeled=t.labeled,
                weak=t.weak,
                has_lesion=t.has_lesion,
                boxes=_boxes(t.boxes),
                labels=np.asarray(t.labels, dtype=np.int64).reshape(-1),
                ignore=_boxes(t.ignore),
                spacing_mm=e.spacing_mm,
                geometry=e.geometry,
                meta=e.meta,
                split=self.split[pid],
            )
            for e, t, pid in pre
        ]
        self.contralateral = contralateral
        #: record index -> its other breast's record index (same woman, same
        #: view, the other laterality; the first such image in source order);
        #: empty unless ``contralateral``
        self.partner: dict[int, int] = (
            pair_breasts(self.records) if contralateral else {}
        )
        if contralateral:
            alone = len(self.records) - len(self.partner)
            if alone:
                log.warning(
                    "%s: %d of %d images have no other breast of the same woman "
                    "and view (patient id, laterality and view must be known); "
                    "their contralateral channel is 0",
                    self.cache.root, alone, len(self.records),
                )  # fmt: skip

    def partner_pixels(self, i: int, shape: tuple[int, int]) -> np.ndarray:
        """The other breast of record ``i`` on a ``shape`` grid, float32 in [0, 1].

        The cache stores every breast with its chest wall on the left
        (``Geometry.flip``) and cropped to the breast, so the other side is
        resized (bilinear) onto the image's rows and columns: top edges and
        chest walls aligned, the nipple ends roughly so. Zeros when record
        ``i`` has no partner (:attr:`partner`).
        """
        j = self.partner.get(i)
        if j is None:
            return np.zeros(shape, dtype=np.float32)
        r = self.records[j]
        px = torch.from_numpy(self.cache.load_pixels(r.key, r.geometry.model_shape))
        out = torch.nn.functional.interpolate(
            px.float()[None, None], size=shape, mode="bilinear", align_corners=False
        )[0, 0]
        return out.clamp(0.0, 1.0).numpy()

    def _split(
        self,
        pre: list[tuple[Any, ImageTargets, str]],
        site_split: dict[str, str] | None,
    ) -> dict[str, str]:
        patients: dict[str, tuple[bool, bool]] = {}
        for _, t, pid in pre:
            bl, les = patients.get(pid, (False, False))
            patients[pid] = (bl or (t.labeled and not t.weak), les or t.has_lesion)
        seeded = patient_split(patients, self.test_fraction, self.seed)
        if site_split is None:
            return seeded
        missing = sorted(set(patients) - set(site_split))
        if missing:
            log.warning(
                "%s: %d patients not in the site split (e.g. %s); seeded rule used",
                self.cache.root, len(missing), missing[0],
            )  # fmt: skip
        return {p: site_split.get(p, seeded[p]) for p in patients}

    def __len__(self) -> int:
        return len(self.records)

    def indices(self, name: str) -> list[int]:
        """Record indices of view ``name`` (see module docstring)."""
        if name not in _IN_VIEW:
            raise ValueError(f"unknown view {name!r}; valid views: {', '.join(VIEWS)}")
        return [i for i, r in enumerate(self.records) if _IN_VIEW[name](r)]

    def view(self, name: str, transform: Transform | None = None) -> SiteView:
        """A torch dataset of view ``name`` with an optional box-aware transform."""
        return SiteView(
            self,
            self.indices(name),
            transform=transform,
            hide_labels=name == "unlabeled",
            name=name,
        )

    def subset(
        self,
        indices: Sequence[int],
        transform: Transform | None = None,
        *,
        hide_labels: bool = False,
    ) -> SiteView:
        """A torch dataset of arbitrary record indices (e.g. a fold)."""
        n = len(self.records)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"record indices out of range [0, {n}): {bad[:5]}")
        return SiteView(self, indices, transform=transform, hide_labels=hide_labels)

    def folds(
        self, k: int, seed: int = 0, *, within: Literal["all", "train"] = "all"
    ) -> list[tuple[list[int], list[int]]]:
        """Patient-grouped, lesion-stratified k-fold cross-validation.

        Only box-labeled images take part. Patients are stratified by "has a
        lesion", shuffled with ``seed`` and dealt round-robin into ``k`` folds, so
        fold sizes differ by at most one patient per stratum.

        Args:
            k: number of folds (2 <= k <= number of patients).
            seed: shuffle seed (deterministic).
            within: ``"all"`` uses every box-labeled image, ``"train"`` only the
                train split (keeping the test split untouched).

        Returns:
            ``[(train_indices, val_indices)] * k`` of record indices; every
            patient is in exactly one validation fold.
        """
        idx = [
            i
            for i, r in enumerate(self.records)
            if r.box_labeled and (within == "all" or r.split == "train")
        ]
        by_patient: dict[str, list[int]] = {}
        lesion: dict[str, bool] = {}
        for i in idx:
            r = self.records[i]
            by_patient.setdefault(r.patient_id, []).append(i)
            lesion[r.patient_id] = lesion.get(r.patient_id, False) or r.has_lesion
        if not 2 <= k <= len(by_patient):
            raise ValueError(
                f"k must be in [2, {len(by_patient)}] (box-labeled patients), got {k}"
            )
        rng = np.random.default_rng(seed)
        fold_of: dict[str, int] = {}
        offset = 0
        for les in (True, False):
            stratum = sorted(p for p in by_patient if lesion[p] == les)
            for j, pi in enumerate(rng.permutation(len(stratum))):
                fold_of[stratum[int(pi)]] = (j + offset) % k
            offset += len(stratum)
        return fold_splits(idx, [fold_of[self.records[i].patient_id] for i in idx], k)


def fold_splits(
    items: Sequence[int], fold: Sequence[int], k: int
) -> list[tuple[list[int], list[int]]]:
    """``[(train, val)] * k`` of ``items``: ``items[j]`` validates in fold ``fold[j]``.

    Both lists keep the order of ``items``.
    """
    return [
        (
            [i for i, f in zip(items, fold, strict=True) if f != v],
            [i for i, f in zip(items, fold, strict=True) if f == v],
        )
        for v in range(k)
    ]


def item_targets(dataset: Dataset[Any]) -> list[Target]:
    """Every item's target; no pixels decoded when ``dataset`` has ``target(i)``.

    :class:`SiteView` and the recipe's wrappers offer it; else items are read.
    """
    fn = getattr(dataset, "target", None)
    n = len(dataset)  # type: ignore[arg-type]
    return [fn(i) if callable(fn) else dataset[i][1] for i in range(n)]


def collate(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Detection collate: images keep their own sizes -> ``(images, targets)`` lists."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets
