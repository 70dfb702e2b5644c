"""Encoding + viewer display: dense stays bright for every VOI and photometric."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simulation.phantom import Scenario
from simulation.phantom.vendors import display, encode


@pytest.mark.parametrize("voi", ["window", "sigmoid", "lut"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_display_is_monotone_in_density(
    test_scenario: Scenario, voi: str, photometric: str
) -> None:
    vendor = dataclasses.replace(
        test_scenario.vendor_profiles["V3"], voi=voi, photometric=photometric
    )
    x = np.linspace(0.0, 1.0, 200, dtype=np.float32)[None, :].repeat(3, axis=0)
    mask = np.ones_like(x, dtype=bool)
    mask[:, :20] = False  # background
    enc = encode(x, mask, vendor)
    d = display(enc.pixels, enc.voi, enc.photometric)[1]
    breast = d[20:]
    assert np.all(np.diff(breast) >= -1e-6), "denser must not display darker"
    assert breast[-1] - breast[0] > 0.5
    assert d[:20].max() < breast.min() - 0.03, "background darker than any breast"


def test_lut_needs_12_bits(test_scenario: Scenario) -> None:
    vendor = dataclasses.replace(
        test_scenario.vendor_profiles["V3"], voi="lut", bits_stored=14
    )
    with pytest.raises(ValueError, match="bits_stored <= 12"):
        encode(np.zeros((4, 4), np.float32), np.ones((4, 4), bool), vendor)
