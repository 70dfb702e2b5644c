from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from common.imaging.dicom import _voi_lut


def test_voi_lut_data_stored_as_ow_bytes_is_decoded() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    lut = np.array([0, 100, 200, 65535], dtype="<u2")
    item.LUTData = lut.tobytes()
    out = _voi_lut(np.array([0.0, 1.0, 2.0, 3.0, 9.0]), item, "x.dcm")
    assert np.allclose(out, [0, 100 / 65535, 200 / 65535, 1.0, 1.0])
