"""Synthetic multi-vendor mammography sites (the phantom).

Public API (stable; the simulation, the demo and tests call these):

* :func:`load_scenario` ``(path) -> Scenario``: a scenario YAML with its vendor
  profiles resolved. ``Scenario.working_spacing_mm`` is the scenario-level working
  spacing; ``Scenario.sites`` lists :class:`SiteSpec` (``name``, ``vendor``,
  ``role``, ``women``, ``labeled_fraction``, ``test_fraction``).
* :func:`generate_scenario` ``(scenario, out_dir, *, workers=1, progress=True)
  -> dict[site name, Path]``: writes ``out_dir/<site>/`` (DICOM files,
  ``annotations.csv``, ``split.csv``) deterministically.
* :func:`render_image`: one image in memory (tests, benchmarks, preview).
"""

from simulation.phantom.generate import (
    RenderedImage,
    generate_scenario,
    generate_site,
    plan_site,
    render_image,
)
from simulation.phantom.scenario import (
    Scenario,
    SiteSpec,
    VendorProfile,
    load_scenario,
    load_vendor,
)

__all__ = [
    "RenderedImage",
    "Scenario",
    "SiteSpec",
    "VendorProfile",
    "generate_scenario",
    "generate_site",
    "load_scenario",
    "load_vendor",
    "plan_site",
    "render_image",
]
