"""tinymoe.plotting.agg_figure: an Agg-canvas figure of the asked size, without pyplot."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tinymoe.plotting import agg_figure  # noqa: E402


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_figure_has_an_agg_canvas_the_size_and_the_layout_asked():
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    fig = agg_figure(3.0, 2.0, dpi=50, layout="constrained")
    assert isinstance(fig.canvas, FigureCanvasAgg)
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    fig.subplots().plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert _png_size(buf.getvalue()) == (150, 100)                  # 3 x 2 inches at 50 dpi
    plain = agg_figure(2.0, 1.0)                                     # matplotlib's defaults
    assert plain.dpi == rcParams["figure.dpi"] and plain.get_layout_engine() is None


def test_drawing_a_figure_does_not_import_pyplot():
    code = ("import io, sys\n"
            "from tinymoe.plotting import agg_figure\n"
            "fig = agg_figure(2, 1)\n"
            "fig.subplots().plot([0, 1])\n"
            "fig.savefig(io.BytesIO(), format='png')\n"
            "print('matplotlib.pyplot' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
