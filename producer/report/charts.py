"""Charts as inline SVG strings, made in Python: no JavaScript, no fonts or files fetched.
Every label is escaped here; callers pass plain text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 350
ROW_H = 22
PLOT_H = 120
COLOURS = ("#3b6ea8", "#e08a2c", "#5a9e5a", "#b04a5a")


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: float
    note: str = ""  # shown after the bar instead of the value


@dataclass(frozen=True, slots=True)
class Series:
    """Values of one distribution (a histogram's bars share bins across series)."""

    name: str
    values: Sequence[float]


@dataclass(frozen=True, slots=True)
class Point:
    label: str  # on the x axis, for the first and last points
    value: float


def _svg(height: int, body: str, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}"><title>{escape(title)}</title>{body}</svg>'
    )


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 11) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'fill="#333">{escape(text)}</text>'
    )


def bar_chart(title: str, bars: Sequence[Bar], empty: str = "nothing to show") -> str:
    """Horizontal bars, one row each, scaled to the largest value."""
    if not bars:
        return _svg(30, _text(4, 20, empty), title)
    top = max(b.value for b in bars) or 1.0
    label_w, bar_w = 100, WIDTH - 100 - 80
    parts = []
    for row, bar in enumerate(bars):
        y = row * ROW_H + 4
        length = bar_w * bar.value / top
        parts.append(_text(label_w - 6, y + 14, bar.label, "end"))
        parts.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{ROW_H - 8}" fill="{COLOURS[0]}"/>'
        )
        parts.append(_text(label_w + length + 4, y + 14, bar.note or f"{bar.value:g}"))
    return _svg(len(bars) * ROW_H + 8, "".join(parts), title)


def histogram(title: str, series: Sequence[Series], bins: int = 12, unit: str = "") -> str:
    """The series' distributions over shared bins, side by side per bin, with a legend."""
    values = [v for s in series for v in s.values]
    if not values:
        return _svg(30, _text(4, 20, "no values"), title)
    low, high = min(values), max(values)
    step = (high - low) / bins if high > low else 1.0
    counts = [[0] * bins for _ in series]
    for s, row in zip(series, counts, strict=True):
        for v in s.values:
            row[min(bins - 1, int((v - low) / step))] += 1
    top = max(max(row) for row in counts) or 1
    left, base = 34, PLOT_H + 20
    slot = (WIDTH - left - 10) / bins
    width = max(1.0, (slot - 4) / len(series))
    parts = [f'<line x1="{left}" y1="{base}" x2="{WIDTH - 10}" y2="{base}" stroke="#999"/>']
    parts.append(_text(left - 4, 28, str(top), "end"))
    for i, row in enumerate(counts):
        for b, n in enumerate(row):
            h = PLOT_H * n / top
            x = left + b * slot + 2 + i * width
            parts.append(
                f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{width:.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[i % len(COLOURS)]}"><title>{escape(series[i].name)}: {n}</title></rect>'
            )
    parts.append(_text(left, base + 14, f"{low:.3g}{unit}"))
    parts.append(_text(WIDTH - 10, base + 14, f"{high:.3g}{unit}", "end"))
    for i, s in enumerate(series):
        x = left + 10 + i * 120
        parts.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{COLOURS[i % len(COLOURS)]}"/>')
        parts.append(_text(x + 14, 15, f"{s.name} ({len(s.values)})"))
    return _svg(base + 20, "".join(parts), title)


def column_chart(title: str, points: Sequence[Point], unit: str = "") -> str:
    """One column per point, evenly spaced, the y axis from zero to the largest value (a
    column, not a line, so that a job written within one bucket still shows)."""
    if not points:
        return _svg(30, _text(4, 20, "nothing written yet"), title)
    top = max(p.value for p in points) or 1.0
    left, base = 50, PLOT_H + 10
    slot = (WIDTH - left - 10) / len(points)
    parts = [f'<line x1="{left}" y1="{base}" x2="{WIDTH - 10}" y2="{base}" stroke="#999"/>']
    for i, p in enumerate(points):
        h = PLOT_H * p.value / top
        parts.append(
            f'<rect x="{left + i * slot + 1:.1f}" y="{base - h:.1f}" width="{max(1.0, slot - 2):.1f}" '
            f'height="{h:.1f}" fill="{COLOURS[0]}">'
            f"<title>{escape(p.label)}: {p.value:.4g}{escape(unit)}</title></rect>"
        )
    parts += [
        _text(left - 4, base - PLOT_H + 4, f"{top:.4g}{unit}", "end"),
        _text(left - 4, base, "0", "end"),
        _text(left, base + 14, points[0].label),
        _text(WIDTH - 10, base + 14, points[-1].label, "end"),
    ]
    return _svg(base + 20, "".join(parts), title)
