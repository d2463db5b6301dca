"""Self-contained HTML reports: image panels, a metrics table, notes and run metadata.

The report is one HTML file that opens offline: images are embedded as base64 PNG data URIs, the
CSS is inline, and there is no JavaScript and no external URL. Every piece of text passes through
:func:`html.escape`. Files are written atomically (temp file in the same folder + ``os.replace``),
so a reader never sees a half-written report.

Display windows: reconstructions of the same reference should be compared in the same grey window,
so the caller passes one ``vmin``/``vmax`` to all those panels. When a panel has none, its window
is ``[min, 99.5th percentile]`` of its finite values (``[0, 1]`` for a sampling mask).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mediff.errors import MediffError
from mediff.io import atomic_write

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "KINDS",
    "Chart",
    "Panel",
    "histogram_chart",
    "render_panel",
    "save_png",
    "write_report",
]

#: Metric columns (matched case-insensitively) whose best value is the largest / the smallest.
HIGHER_IS_BETTER = {"PSNR", "SSIM", "coverage"}
LOWER_IS_BETTER = {"NMSE", "seconds"}

#: Panel kind -> (colormap, draw a colorbar).
KINDS = {
    "image": ("gray", False),
    "error": ("magma", True),
    "uncertainty": ("viridis", True),
    "mask": ("gray", False),
}

# Decimals for known metric columns (lower-case); other floats use 4 significant digits.
_DECIMALS = {"psnr": 2, "ssim": 4, "nmse": 4, "seconds": 2, "coverage": 3}


@dataclass
class Panel:
    """One figure of the report: a 2D array shown as ``kind`` (see :data:`KINDS`)."""

    title: str
    image: np.ndarray
    kind: str = "image"
    vmin: float | None = None
    vmax: float | None = None
    caption: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown panel kind {self.kind!r}; expected one of {sorted(KINDS)}")


def _as_2d(panel: Panel) -> np.ndarray:
    a = np.asarray(panel.image)
    if np.iscomplexobj(a):
        a = np.abs(a)
    a = np.squeeze(a.astype(np.float64, copy=False))
    if a.ndim != 2 or a.size == 0:
        raise ValueError(
            f"panel {panel.title!r}: image must be a non-empty 2D array, "
            f"got shape {np.shape(panel.image)}"
        )
    return a


def _window(a: np.ndarray, panel: Panel) -> tuple[float, float]:
    """Display window: the caller's vmin/vmax, else [min, 99.5th percentile] of finite values."""
    finite = a[np.isfinite(a)]
    if panel.kind == "mask":
        lo, hi = 0.0, 1.0
    elif finite.size == 0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(finite.min()), float(np.percentile(finite, 99.5))
    lo = lo if panel.vmin is None else float(panel.vmin)
    hi = hi if panel.vmax is None else float(panel.vmax)
    if not hi > lo:  # constant image (or a bad window): widen so imshow does not divide by zero
        hi = lo + (abs(lo) if lo else 1.0)
    return lo, hi


def render_panel(panel: Panel) -> bytes:
    """Render ``panel`` as PNG bytes (about 3x3 inches, title, no ticks, colorbar for maps)."""
    a = _as_2d(panel)
    lo, hi = _window(a, panel)
    cmap, colorbar = KINDS[panel.kind]
    fig = Figure(figsize=(3.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=lo, vmax=hi,
                   interpolation="nearest" if panel.kind == "mask" else "antialiased")
    ax.set_title(panel.title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=7)
    # No "Software" chunk: keeps the PNG deterministic and free of URLs.
    return _png(fig)


@dataclass
class Chart:
    """A figure of the report that is not an image: ready PNG bytes (e.g. :func:`histogram_chart`)."""

    title: str
    png: bytes
    caption: str = ""


def _png(fig: Figure) -> bytes:
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def histogram_chart(title: str, series: dict[str, np.ndarray], xlabel: str, threshold: float | None = None,
                    caption: str = "", bins: int = 40) -> Chart:
    """Overlaid density histograms of named 1D ``series`` on shared bins, with an optional vertical
    ``threshold`` line (e.g. the audit's tau)."""
    values = [np.asarray(v, dtype=float).ravel() for v in series.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(0)])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig = Figure(figsize=(5.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    greys = ["0.15", "0.55", "0.8", "0.35"]
    for k, (name, v) in enumerate(zip(series, values)):
        ax.hist(v[np.isfinite(v)], bins=edges, density=True, histtype="step" if k else "stepfilled",
                color=greys[k % len(greys)], linewidth=1.5, label=f"{name} (n={v.size})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return Chart(title, _png(fig), caption)


def save_png(path: Path, panel: Panel) -> Path:
    """Atomically write ``render_panel(panel)`` to ``path``; returns the path."""
    path = Path(path)
    data = render_panel(panel)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, True, lambda tmp: tmp.write_bytes(data))
    return path


# ---------------------------------------------------------------------------------------------
# Metrics table


def _number(v: object) -> float | None:
    """The value as a float when it is a real number (not bool), else None."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (Real, np.integer, np.floating)):
        return None
    return float(v)


def _format_value(column: str, v: object) -> str:
    if v is None:
        return "&mdash;"
    if isinstance(v, (bool, np.bool_)):
        return html.escape(str(bool(v)))
    if isinstance(v, (Integral, np.integer)):
        return str(int(v))
    x = _number(v)
    if x is None:
        return html.escape(str(v))
    if not math.isfinite(x):
        return html.escape(str(x))
    decimals = _DECIMALS.get(column.lower())
    if decimals is None:
        return f"{x:.4g}"
    if x != 0 and abs(x) < 10.0 ** -decimals:  # e.g. NMSE 2e-5 would print as 0.0000
        return f"{x:.2e}"
    return f"{x:.{decimals}f}"


def _best_rows(rows: list[dict], column: str) -> set[int]:
    """Rows holding the best value of ``column`` (ties all count); empty if it has no direction."""
    key = column.lower()
    if key in {c.lower() for c in HIGHER_IS_BETTER}:
        sign = 1.0
    elif key in {c.lower() for c in LOWER_IS_BETTER}:
        sign = -1.0
    else:
        return set()
    vals = {i: _number(r.get(column)) for i, r in enumerate(rows)}
    vals = {i: sign * x for i, x in vals.items() if x is not None and not math.isnan(x)}
    if len(vals) < 2:  # nothing to compare
        return set()
    best = max(vals.values())
    return {i for i, x in vals.items() if x == best}


def _metrics_html(metrics: list[dict] | dict) -> str:
    rows = [metrics] if isinstance(metrics, dict) else list(metrics)
    if not rows:
        return ""
    columns: list[str] = []
    for r in rows:
        columns += [str(k) for k in r if str(k) not in columns]
    rows = [{str(k): v for k, v in r.items()} for r in rows]
    best = {c: _best_rows(rows, c) for c in columns}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c in columns:
            text = _format_value(c, r.get(c))
            numeric = _number(r.get(c)) is not None
            if i in best[c]:
                text = f"<b>{text}</b>"
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    legend = (
        "<p class=\"legend\">Bold: best value of a column "
        f"(higher is better: {html.escape(', '.join(sorted(HIGHER_IS_BETTER)))}; "
        f"lower is better: {html.escape(', '.join(sorted(LOWER_IS_BETTER)))}).</p>"
    )
    return (
        "<h2>Metrics</h2>\n<table class=\"metrics\"><thead><tr>" + head + "</tr></thead>\n<tbody>\n"
        + "\n".join(body) + "\n</tbody></table>\n" + legend
    )


# ---------------------------------------------------------------------------------------------
# Report

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.3em; }
h2 { font-size: 1.15em; margin-top: 1.5em; border-bottom: 1px solid #ddd; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; flex: 0 1 300px; border: 1px solid #e3e3e3; border-radius: 4px;
         padding: 6px; background: #fafafa; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; margin-top: 4px; }
figcaption .title { font-weight: 600; }
figcaption .caption { color: #555; display: block; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend { font-size: 0.8em; color: #666; }
table.meta td:first-child { font-weight: 600; }
"""


def _panel_html(panel: Panel | Chart) -> str:
    png = panel.png if isinstance(panel, Chart) else render_panel(panel)
    b64 = base64.b64encode(png).decode("ascii")
    title = html.escape(panel.title)
    caption = f'<span class="caption">{html.escape(panel.caption)}</span>' if panel.caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{b64}" alt="{title}">'
        f'<figcaption><span class="title">{title}</span>{caption}</figcaption></figure>'
    )


def write_report(
    path: Path,
    title: str,
    panels: list[Panel | Chart],
    metrics: list[dict] | dict | None = None,
    notes: list[str] | None = None,
    meta: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a self-contained HTML report to ``path`` atomically; returns the path.

    ``metrics``: rows (dicts) for a table, best value per known column in bold; a dict is one row.
    ``notes``: bullet list. ``meta``: key/value table (command, model, seed, versions).
    Raises :class:`MediffError` when ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MediffError(f"report already exists (overwrite disabled): {path}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if panels:
        parts.append('<div class="grid">')
        parts += [_panel_html(p) for p in panels]  # render everything before touching the disk
        parts.append("</div>")
    if metrics:
        parts.append(_metrics_html(metrics))
    if notes:
        parts.append("<h2>Notes</h2>\n<ul>")
        parts += [f"<li>{html.escape(str(n))}</li>" for n in notes]
        parts.append("</ul>")
    if meta:
        parts.append('<h2>Run</h2>\n<table class="meta"><tbody>')
        parts += [
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
            for k, v in meta.items()
        ]
        parts.append("</tbody></table>")
    parts.append("</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, True, lambda tmp: tmp.write_bytes("\n".join(parts).encode("utf-8")))
    return path
