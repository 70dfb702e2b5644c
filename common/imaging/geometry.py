"""The one place that maps coordinates between a file's pixel grid and the model's.

Coordinate convention (both spaces): continuous pixel-edge coordinates, origin at
the top-left corner of the top-left pixel, ``x`` to the right (columns), ``y``
down (rows). Pixel ``(row r, col c)`` covers ``[c, c+1) x [r, r+1)``. A box is
``[xmin, ymin, xmax, ymax]`` with ``xmin < xmax``, ``ymin < ymax``.

*Stored space* is the grid of the file as stored (DICOM Rows x Columns, before any
flip). *Model space* is the grid of the array the detector sees. The steps, in
order: crop (a rectangle of stored pixels), optional horizontal flip of the crop
(so the breast sits on the left), resample of the crop to ``model_shape``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Crop, flip and scale from stored space to model space.

    Attributes:
        stored_shape: ``(rows, cols)`` of the stored image.
        crop: ``(x0, y0, x1, y1)`` integer pixel edges in stored space,
            ``0 <= x0 < x1 <= cols``, ``0 <= y0 < y1 <= rows``.
        flip: whether the cropped image is mirrored left-right.
        model_shape: ``(rows, cols)`` of the model-space image; the scale factors
            are ``model_shape / crop size`` per axis.
    """

    stored_shape: tuple[int, int]
    crop: tuple[int, int, int, int]
    flip: bool
    model_shape: tuple[int, int]

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.crop
        rows, cols = self.stored_shape
        if not (0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows):
            raise ValueError(
                f"Geometry crop {self.crop} does not fit "
                f"stored shape {self.stored_shape}"
            )
        if self.model_shape[0] < 1 or self.model_shape[1] < 1:
            raise ValueError(
                f"Geometry model_shape must be positive, got {self.model_shape}"
            )

    @classmethod
    def identity(cls, shape: tuple[int, int]) -> Geometry:
        """No crop, no flip, no scale."""
        rows, cols = int(shape[0]), int(shape[1])
        return cls((rows, cols), (0, 0, cols, rows), False, (rows, cols))

    @property
    def crop_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the cropped region in stored pixels."""
        x0, y0, x1, y1 = self.crop
        return (y1 - y0, x1 - x0)

    @property
    def scale(self) -> tuple[float, float]:
        """``(sx, sy)``: model pixels per stored pixel along x and y."""
        ch, cw = self.crop_shape
        return (self.model_shape[1] / cw, self.model_shape[0] / ch)

    def to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Map boxes float[N, 4] from stored space to model space."""
        x0, y0, _, _ = self.crop
        sx, sy = self.scale
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - [x0, y0, x0, y0]
        return self._flip_crop(b) * [sx, sy, sx, sy]

    def to_stored(self, boxes: np.ndarray) -> np.ndarray:
        """Map boxes float[N, 4] from model space back to stored space."""
        x0, y0, _, _ = self.crop
        sx, sy = self.scale
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / [sx, sy, sx, sy]
        return self._flip_crop(b) + [x0, y0, x0, y0]

    def _flip_crop(self, b: np.ndarray) -> np.ndarray:
        """Boxes in crop pixels mirrored left-right when :attr:`flip` (else as is)."""
        if not self.flip:
            return b
        out = b.copy()
        out[:, [0, 2]] = self.crop_shape[1] - b[:, [2, 0]]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists of ints and a bool)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            stored_shape=(int(d["stored_shape"][0]), int(d["stored_shape"][1])),
            crop=tuple(int(v) for v in d["crop"]),  # type: ignore[arg-type]
            flip=bool(d["flip"]),
            model_shape=(int(d["model_shape"][0]), int(d["model_shape"][1])),
        )
