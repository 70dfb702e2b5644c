"""The shift is real: a simple image statistic separates the vendors.

Features of the *displayed* image inside the breast (what a reader gives the
model after VOI and photometric handling): mean, standard deviation, skewness
and the share of high-frequency energy. A nearest-centroid rule, leave-one-out,
must tell the four demo vendors apart from these, and the between-vendor
spread of the features must exceed the within-vendor spread.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from simulation.phantom import Scenario, render_image
from simulation.phantom.filters import gaussian_blur
from simulation.phantom.vendors import display

SITES = ("A", "B", "C", "D")
PER_VENDOR = 5


def _features(scenario: Scenario, site: str, woman: int) -> np.ndarray:
    img = render_image(scenario, site, woman, "L", "CC")
    d = display(img.pixels, img.voi, img.photometric).astype(np.float64)
    v = d[img.mask]
    mean, std = v.mean(), v.std()
    skew = ((v - mean) ** 3).mean() / max(std, 1e-9) ** 3
    sigma = 0.5 / img.spacing_mm  # 0.5 mm high-pass, independent of the pitch
    hp = (d - gaussian_blur(d.astype(np.float32), sigma))[img.mask]
    return np.array([mean, std, skew, hp.std() / max(std, 1e-9)])


def _dataset(scenario: Scenario) -> tuple[np.ndarray, np.ndarray]:
    x, y = [], []
    for k, site in enumerate(SITES):
        for w in range(PER_VENDOR):
            x.append(_features(scenario, site, w))
            y.append(k)
    return np.array(x), np.array(y)


def _loo_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    z = (x - x.mean(0)) / x.std(0)
    hits = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        cents = np.array([z[keep & (y == k)].mean(0) for k in np.unique(y)])
        hits += int(np.argmin(((cents - z[i]) ** 2).sum(1)) == y[i])
    return hits / len(y)


def test_simple_statistics_separate_vendors(demo_scenario: Scenario) -> None:
    # coarser pixels keep the test fast; the processing chain is unchanged
    sc = dataclasses.replace(demo_scenario, pixel_scale=8.0)
    x, y = _dataset(sc)
    assert _loo_accuracy(x, y) >= 0.9
    z = (x - x.mean(0)) / x.std(0)
    cents = np.array([z[y == k].mean(0) for k in range(len(SITES))])
    within = np.mean(
        [np.linalg.norm(z[y == k] - cents[k], axis=1).mean() for k in range(len(SITES))]
    )
    between = np.mean(
        [np.linalg.norm(cents[i] - cents[j]) for i in range(4) for j in range(i + 1, 4)]
    )
    assert between > 2 * within, (between, within)


def test_same_vendor_is_not_separable(demo_scenario: Scenario) -> None:
    """Negative control: four 'sites' of the same vendor cannot be told apart."""
    sites = tuple(dataclasses.replace(s, vendor="H") for s in demo_scenario.sites)
    sc = dataclasses.replace(demo_scenario, pixel_scale=8.0, sites=sites)
    x, y = _dataset(sc)
    assert _loo_accuracy(x, y) < 0.7
