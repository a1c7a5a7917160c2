"""One matplotlib figure on an Agg canvas, without pyplot.

Every figure tinymoe draws (the routing analysis, the training curves) is made here:
matplotlib's object API (``Figure`` + ``FigureCanvasAgg``) instead of ``pyplot``, so
drawing a PNG never switches the caller's backend, opens a window, or registers the
figure in pyplot's global list of open figures (which would keep it alive until closed).
matplotlib is imported when the first figure is made, so importing tinymoe does not need it.
"""
from __future__ import annotations

from typing import Any

__all__ = ["agg_figure"]


def agg_figure(width: float, height: float, *, dpi: float | None = None,
               layout: str | None = None) -> Any:
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches drawn by an Agg canvas.

    ``dpi`` and ``layout`` (``"constrained"``, ``"tight"`` or None) are passed to
    ``Figure``; None keeps matplotlib's default (``rcParams["figure.dpi"]``, no layout
    engine). Save it with ``fig.savefig(path_or_file, format="png")``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (only when drawing)
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)                        # attaches itself to fig (fig.canvas)
    return fig
