"""Site-local intensity standardization (Nyúl–Udupa histogram landmarks).

Fit on the site's own images: for every image, the chosen percentiles of its
breast pixels (model-space pixels above ``breast_threshold``) are its
landmarks; the site's landmarks are their mean over images. Applying maps
every breast pixel piecewise-linearly from the site landmarks to the common
scale (``AdaptConfig.standard_scale``, defined by the scenario or server
config), extending the end segments linearly and clipping to ``[0, 1]``;
background pixels are left unchanged. The fitted state stays in the site's
state dir (:meth:`HistogramStandardizer.save`); nothing of it is ever sent.

Images are FloatTensor[1, H, W] (or [H, W]) in ``[0, 1]``, model space. The
mapping is monotone increasing and moves no pixel, so boxes are untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.detector.adapt.config import AdaptConfig
from common.fileio import atomic_write_text, read_json_document

log = logging.getLogger(__name__)

_FORMAT = "mammofed-histogram-landmarks/1"


def image_landmarks(
    image: Tensor, percentiles: tuple[float, ...], breast_threshold: float
) -> Tensor | None:
    """Percentiles (FloatTensor[P], float64) of the breast pixels of one image.

    Returns ``None`` when the image has fewer than 16 breast pixels.
    """
    x = image.reshape(-1).to(torch.float64)
    x = x[x > breast_threshold]
    if x.numel() < 16:
        return None
    q = torch.tensor(percentiles, dtype=torch.float64) / 100.0
    return torch.quantile(x, q)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear ``xp -> fp`` with linear extrapolation of the end pieces."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    t = (x - x0) / (x1 - x0).clamp(min=1e-12)
    return y0 + t * (y1 - y0)


def _strictly_increasing(v: Tensor, eps: float = 1e-6) -> Tensor:
    """Nudge equal neighbours apart (flat histograms give repeated landmarks)."""
    out = v.clone()
    for i in range(1, out.numel()):
        if out[i] <= out[i - 1]:
            out[i] = out[i - 1] + eps
    return out


@dataclass(frozen=True)
class HistogramStandardizer:
    """Fitted landmarks of one site and the common scale they map to.

    Attributes:
        percentiles: percentiles used as landmarks (strictly increasing).
        landmarks: the site's mean landmark intensities, one per percentile.
        standard_scale: the common scale values, one per percentile.
        breast_threshold: pixels above this are breast.
        n_images: how many images the fit used.
    """

    percentiles: tuple[float, ...]
    landmarks: tuple[float, ...]
    standard_scale: tuple[float, ...]
    breast_threshold: float
    n_images: int

    @staticmethod
    def fit(images: Iterable[Tensor], cfg: AdaptConfig) -> HistogramStandardizer:
        """Fit on the site's own images (FloatTensor[1, H, W] in [0, 1]).

        Raises:
            ValueError: when no image has enough breast pixels.
        """
        found = [
            image_landmarks(img, cfg.percentiles, cfg.breast_threshold)
            for img in images
        ]
        rows = [lm for lm in found if lm is not None]
        skipped = len(found) - len(rows)
        if not rows:
            raise ValueError(
                "HistogramStandardizer.fit: no image has breast pixels above "
                f"breast_threshold={cfg.breast_threshold!r} ({skipped} skipped)"
            )
        if skipped:
            log.warning("standardizer fit skipped %d near-empty images", skipped)
        mean = _strictly_increasing(torch.stack(rows).mean(dim=0))
        log.info("standardizer fitted on %d images", len(rows))
        return HistogramStandardizer(
            percentiles=tuple(cfg.percentiles),
            landmarks=tuple(float(v) for v in mean),
            standard_scale=tuple(cfg.standard_scale),
            breast_threshold=cfg.breast_threshold,
            n_images=len(rows),
        )

    def apply(self, image: Tensor) -> Tensor:
        """Map the breast pixels of ``image`` to the common scale (same shape)."""
        xp = torch.tensor(self.landmarks, dtype=torch.float64)
        fp = torch.tensor(self.standard_scale, dtype=torch.float64)
        x = image.to(torch.float64)
        mapped = _interp(x.reshape(-1), xp, fp).reshape(x.shape).clamp(0, 1)
        out = torch.where(x > self.breast_threshold, mapped, x)
        return out.to(image.dtype)

    def __call__(
        self, image: Tensor, target: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        """Dataset-view transform: standardize the image, pass the target on."""
        return self.apply(image), target

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (for the site state dir only)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"format": _FORMAT, **d}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> HistogramStandardizer:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed state."""
        if data.get("format") != _FORMAT:
            raise ValueError(
                f"standardizer state: format must be {_FORMAT!r}, "
                f"got {data.get('format')!r}"
            )
        try:
            p = tuple(float(v) for v in data["percentiles"])
            lm = tuple(float(v) for v in data["landmarks"])
            sc = tuple(float(v) for v in data["standard_scale"])
            thr = float(data["breast_threshold"])
            n = int(data["n_images"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"standardizer state: malformed ({exc})") from exc
        if not len(p) == len(lm) == len(sc) >= 2:
            raise ValueError(
                "standardizer state: percentiles, landmarks and standard_scale "
                f"differ in length ({len(p)}, {len(lm)}, {len(sc)})"
            )
        return HistogramStandardizer(p, lm, sc, thr, n)

    def save(self, path: str | Path) -> Path:
        """Write the state as JSON (atomically) and return the path."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1), fsync=False)
        return Path(path)

    @staticmethod
    def load(path: str | Path) -> HistogramStandardizer:
        """Read a state written by :meth:`save`."""
        data = read_json_document(path, "standardizer state", ValueError)
        return HistogramStandardizer.from_dict(data)
