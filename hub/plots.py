"""Pictures of an adapter's weights, rendered to SVG with matplotlib (Agg, no
display): the singular-value spectrum of every module's ΔW, and the size of the
update (‖ΔW‖_F) per layer and module kind. Input is the analysis job's
per-module summary; no Django here.

Figures are built with the object API (matplotlib.figure.Figure), never pyplot,
so rendering keeps no global state and is safe in any worker process.
"""
from __future__ import annotations

import io
import math
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

# Okabe–Ito: distinguishable with colour-vision deficiencies, readable on white.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#882255"]
TEXT = "#1a1a1a"
LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

# Applied per figure (rc_context), so matplotlib's global settings stay untouched.
STYLE = {
    "svg.fonttype": "none",   # text stays text: smaller files, the page's font, selectable labels
    "svg.hashsalt": "quiver",  # stable element ids: the same analysis renders the same bytes
    "font.size": 9,
    "text.color": TEXT, "axes.labelcolor": TEXT, "xtick.color": TEXT, "ytick.color": TEXT,
    "axes.spines.top": False, "axes.spines.right": False,
}


def module_kind(module_path: str) -> str:
    """The module's own name (q_proj, down_proj, ...), the last part of its path."""
    return module_path.rsplit(".", 1)[-1]


def module_layer(module_path: str) -> int | None:
    """The first number in the path (the block index), None for modules outside the blocks."""
    found = LAYER_INDEX.search(module_path)
    return int(found.group(1)) if found else None


def _colours(kinds: list[str]) -> dict[str, str]:
    return {kind: PALETTE[index % len(PALETTE)] for index, kind in enumerate(kinds)}


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    return buffer.getvalue()


def styled(render):
    """Run a renderer under the plots' style."""

    def run(modules: dict[str, dict]) -> str:
        with matplotlib.rc_context(STYLE):
            return render(modules)

    run.__name__ = run.__qualname__ = render.__name__
    run.__doc__ = render.__doc__
    return run


@styled
def spectrum_svg(modules: dict[str, dict]) -> str:
    """Singular values σᵢ of each module's ΔW against their index (log scale), one
    line per module, coloured by module kind: a flat line is a full-rank update,
    a steep drop an update that lives in a few directions."""
    kinds = sorted({module_kind(path) for path in modules})
    colours = _colours(kinds)
    figure = Figure(figsize=(7.2, 3.4))
    axes = figure.add_subplot()
    for path, module in sorted(modules.items()):
        values = [value for value in module["singular_values"] if value > 0]
        if values:
            axes.plot(range(1, len(values) + 1), values, color=colours[module_kind(path)], alpha=0.75,
                      linewidth=1.2, marker="o", markersize=2.5)
    axes.set_yscale("log")
    axes.set_xlabel("singular value index i")
    axes.set_ylabel(r"$\sigma_i$ of ΔW")
    axes.set_title("Singular-value spectrum, one line per module", loc="left")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(True, which="major", color="#dddddd", linewidth=0.6)
    for kind in kinds:
        axes.plot([], [], color=colours[kind], label=kind, linewidth=2)
    axes.legend(title="module", frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _svg(figure)


def layer_norms(modules: dict[str, dict]) -> dict[str, dict[int | None, float]]:
    """kind → layer → ‖ΔW‖_F over the modules of that kind in that layer."""
    squares: dict[str, dict[int | None, float]] = defaultdict(lambda: defaultdict(float))
    for path, module in modules.items():
        squares[module_kind(path)][module_layer(path)] += module["norm"] ** 2
    return {kind: {layer: math.sqrt(total) for layer, total in by_layer.items()} for kind, by_layer in squares.items()}


@styled
def layer_norms_svg(modules: dict[str, dict]) -> str:
    """Grouped bars: for each layer, the Frobenius norm of the update of each module kind."""
    norms = layer_norms(modules)
    kinds = sorted(norms)
    colours = _colours(kinds)
    layers = sorted({layer for by_layer in norms.values() for layer in by_layer}, key=lambda l: (l is None, l or 0))
    figure = Figure(figsize=(7.2, 3.4))
    axes = figure.add_subplot()
    width = 0.8 / max(len(kinds), 1)
    for index, kind in enumerate(kinds):
        positions = [x + (index - (len(kinds) - 1) / 2) * width for x in range(len(layers))]
        axes.bar(positions, [norms[kind].get(layer, 0.0) for layer in layers], width=width, color=colours[kind],
                 label=kind)
    axes.set_xticks(range(len(layers)), ["other" if layer is None else str(layer) for layer in layers])
    axes.set_xlabel("layer")
    axes.set_ylabel(r"$\|\Delta W\|_F$")
    axes.set_title("Update norm per layer and module", loc="left")
    axes.grid(True, axis="y", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.legend(title="module", frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _svg(figure)


# Plot kind (hub.models.RevisionPlot.Kind) → renderer.
RENDERERS = {"spectrum": spectrum_svg, "layer-norms": layer_norms_svg}
