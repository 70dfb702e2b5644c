"""Contact sheet: one image per vendor and view with lesion boxes drawn.

Images are rendered in memory (the same deterministic content the files hold)
and displayed through the VOI and photometric interpretation the files carry,
so the sheet shows what a viewer would show. Boxes are in stored pixels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from common.keys import LEFT, MASS, RIGHT, VIEW_CC, VIEW_MLO  # noqa: E402
from simulation.phantom.generate import RenderedImage, render_image  # noqa: E402
from simulation.phantom.scenario import Scenario  # noqa: E402
from simulation.phantom.vendors import display  # noqa: E402

log = logging.getLogger(__name__)

#: Women searched per site for an image that carries a lesion.
_SEARCH_WOMEN = 6
_COLORS = {MASS: "#ff5533"}
_DEFAULT_COLOR = "#33ccff"


def pick_image(
    scenario: Scenario, site_name: str, view: str
) -> tuple[RenderedImage, str]:
    """The first image of ``site_name`` in ``view`` that has a lesion.

    Searches women ``0.._SEARCH_WOMEN-1`` and both breasts; falls back to woman 0's
    left breast. Returns the image and a caption.
    """
    n = min(scenario.site(site_name).women, _SEARCH_WOMEN)
    for w in range(n):
        for lat in (LEFT, RIGHT):
            img = render_image(scenario, site_name, w, lat, view)
            if img.findings:
                return img, f"woman {w} {lat} {view}"
    return render_image(scenario, site_name, 0, LEFT, view), f"woman 0 L {view}"


def write_preview(scenario: Scenario, path: str | Path) -> Path:
    """Write the contact sheet PNG (rows: CC, MLO; columns: one site per vendor)."""
    seen: dict[str, str] = {}
    for s in scenario.sites:
        seen.setdefault(s.vendor, s.name)
    cols = list(seen.items())
    fig, axes = plt.subplots(
        2, len(cols), figsize=(3.2 * len(cols), 8.0), squeeze=False
    )
    for j, (vendor_name, site_name) in enumerate(cols):
        vendor = scenario.vendor_profiles[vendor_name]
        for i, view in enumerate((VIEW_CC, VIEW_MLO)):
            img, caption = pick_image(scenario, site_name, view)
            ax = axes[i][j]
            shown = display(img.pixels, img.voi, img.photometric)
            ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos")
            for f in img.findings:
                x0, y0, x1, y1 = f.box
                color = _COLORS.get(f.finding, _DEFAULT_COLOR)
                box = Rectangle(
                    (x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.0, ec=color
                )
                ax.add_patch(box)
            ax.set_title(
                f"{vendor.manufacturer} (site {site_name})\n{caption}", fontsize=8
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"phantom scenario {scenario.name}: red = mass, blue = calcification cluster",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    log.info("wrote preview %s", out)
    return out
