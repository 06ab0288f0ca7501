"""Inline SVG charts for the report: stacked histograms with threshold lines, bar charts.

No JavaScript and no external resources: every chart is a plain <svg> element whose text
(labels, tooltips) goes through `html.escape(..., quote=True)`. Histograms are accumulated on a
fine fixed grid while the parquet files stream by (memory does not grow with the run), and are
re-binned to a readable number of bars, cropped to where the data and the threshold are.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

WIDTH = 580
HEIGHT = 240
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 56, 16, 28, 40



def _svg_open(chart_id: str, title: str) -> list:
    return [f'<svg class="chart" id="{esc(chart_id)}" role="img" width="{WIDTH}" '
            f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" aria-label="{esc(title)}">',
            f'<title>{esc(title)}</title>']



def _stacked_bar(left: float, width: float, segments, sy, tip: str) -> list:
    """One bar of (colour, count) segments stacked from 0, each with the bar's tooltip."""
    parts, bottom = [], 0
    for colour, count in segments:
        if not count:
            continue
        top = bottom + count
        parts.append(f'<rect x="{left:.1f}" y="{sy(top):.1f}" width="{width:.1f}" '
                     f'height="{sy(bottom) - sy(top):.1f}" fill="{colour}">'
                     f'<title>{esc(tip)}</title></rect>')
        bottom = top
    return parts

def _y_grid(ticks, sy, x0: float, x1: float) -> list:
    """Horizontal grid lines with their tick labels on the y axis."""
    parts = []
    for t in ticks:
        y = sy(t)
        parts.append(f'<line class="grid" x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{esc(fmt_num(t))}</text>')
    return parts

# Characters that would be invisible or act on the page: controls (NUL, ESC, C1; tab and
# newline stay), lone surrogates, line/paragraph separators, and the bidi controls of
# "Trojan Source" (U+202E and friends), which reorder the text around them.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029"
                        r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """Untrusted text with those characters written out as `\\u202e`, so they show."""
    return _INVISIBLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def esc(value) -> str:
    return html.escape(visible("" if value is None else str(value)), quote=True)


def fmt_num(value: float, digits: int = 3) -> str:
    """Short, stable number text: 5, 5.25, 0.99, 1.2e-05."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.{digits}g}"
    return text


@dataclass
class FineHistogram:
    """Counts per series on a fixed fine grid over [lo, hi]; out-of-range values are clipped."""

    lo: float
    hi: float
    n_bins: int
    series: Tuple[str, ...]
    counts: Dict[str, np.ndarray] = field(default_factory=dict)
    clipped: int = 0
    data_min: float = math.inf
    data_max: float = -math.inf

    _edges: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        for name in self.series:
            self.counts.setdefault(name, np.zeros(self.n_bins, dtype=np.int64))

    @property
    def total(self) -> int:
        return int(sum(int(c.sum()) for c in self.counts.values()))

    def add(self, name: str, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not len(values):
            return
        self.data_min = min(self.data_min, float(values.min()))
        self.data_max = max(self.data_max, float(values.max()))
        self.clipped += int(((values < self.lo) | (values > self.hi)).sum())
        idx = self._bin_of(np.clip(values, self.lo, self.hi))
        self.counts[name] += np.bincount(idx, minlength=self.n_bins)

    @property
    def edges(self) -> np.ndarray:
        """The fine grid's n_bins + 1 edges (rounded to 9 decimals, so round numbers are
        exact). Bin i holds edges[i] <= v < edges[i + 1], the last one v == hi too: numpy's
        `histogram` rule, so a view's bars count what np.histogram counts on its edges."""
        if self._edges is None:
            steps = np.arange(self.n_bins + 1, dtype=np.float64) / self.n_bins
            self._edges = np.round(self.lo + (self.hi - self.lo) * steps, 9)
            self._edges[0], self._edges[-1] = self.lo, self.hi
        return self._edges

    def _bin_of(self, values) -> np.ndarray:
        idx = np.searchsorted(self.edges, values, side="right") - 1
        return np.clip(idx, 0, self.n_bins - 1).astype(np.int64)

    def view(self, min_span: float, include: Sequence[Optional[float]] = (),
             max_bars: int = 50) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """Re-bin to at most `max_bars` bars of a round width over the data's extent.

        The extent covers the data and the `include` values (e.g. a threshold) and is at least
        `min_span` wide; bar edges fall on multiples of the bar width, so a threshold that is a
        round number sits on an edge. Returns (edges, counts per series).
        """
        fine_w = (self.hi - self.lo) / self.n_bins
        points = [v for v in include if v is not None and math.isfinite(v)]
        if self.total:
            points += [self.data_min, self.data_max]
        if not points:
            points = [self.lo, self.hi]
        lo_raw = max(self.lo, min(points))
        hi_raw = min(self.hi, max(points))
        if hi_raw - lo_raw < min_span:
            mid = (lo_raw + hi_raw) / 2
            lo_raw, hi_raw = max(self.lo, mid - min_span / 2), min(self.hi, mid + min_span / 2)
        bar_w = _nice_step((hi_raw - lo_raw) / max_bars, fine_w)
        group = max(1, int(round(bar_w / fine_w)))
        # The fine bins of the extent's ends, by the rule `add` bins with: the bars hold
        # every value of the data (and the threshold's bin).
        first = int(self._bin_of(lo_raw)) // group * group
        last = min(self.n_bins, (int(self._bin_of(hi_raw)) // group + 1) * group)
        n_bars = max(1, math.ceil((last - first) / group))
        # Bar edges are fine-grid edges (the last one capped at hi).
        edges = self.edges[np.minimum(first + group * np.arange(n_bars + 1), self.n_bins)]
        out = {}
        for name, counts in self.counts.items():
            sel = counts[first:first + n_bars * group]
            sel = np.pad(sel, (0, n_bars * group - len(sel)))
            out[name] = sel.reshape(n_bars, group).sum(axis=1)
        return edges, out


def _nice_step(raw: float, unit: float) -> float:
    """The smallest 1/2/2.5/5 x 10^k step >= raw that is a whole multiple of `unit`."""
    raw = max(raw, unit)
    mag = 10 ** math.floor(math.log10(raw))
    for scale in (mag, mag * 10):
        for m in (1, 2, 2.5, 5, 10):
            step = m * scale
            ratio = step / unit
            if step >= raw * (1 - 1e-9) and abs(ratio - round(ratio)) < 1e-6:
                return step
    return math.ceil(raw / unit) * unit


@dataclass
class Threshold:
    value: float
    label: str
    kind: str          # a CSS-safe word: aesthetic, nsfw, eps


def _nice_ticks(vmax: float, n: int = 4) -> List[int]:
    """Whole-number ticks (counts) from 0 to just above vmax."""
    if vmax <= 0:
        return [0]
    raw = max(1.0, vmax / n)
    mag = 10 ** math.floor(math.log10(raw))
    step = int(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))
    top = math.ceil(vmax / step) * step
    return list(range(0, top + 1, step))


def histogram_svg(edges: np.ndarray, counts: Dict[str, np.ndarray], colors: Dict[str, str],
                  *, title: str, x_label: str, thresholds: Sequence[Threshold] = (),
                  chart_id: str = "") -> str:
    """A stacked histogram (series stacked in `colors` order) with dashed threshold lines."""
    names = [n for n in colors if n in counts]
    n_bars = len(edges) - 1
    stacked = np.zeros(n_bars, dtype=np.int64)
    for name in names:
        stacked = stacked + counts[name]
    ymax = max(1, int(stacked.max()) if n_bars else 1)
    ticks = _nice_ticks(ymax)
    ytop = max(ticks[-1], ymax)
    x0, x1 = _MARGIN_LEFT, WIDTH - _MARGIN_RIGHT
    y0, y1 = HEIGHT - _MARGIN_BOTTOM, _MARGIN_TOP
    lo, hi = float(edges[0]), float(edges[-1])
    span = (hi - lo) or 1.0

    def sx(v: float) -> float:
        return x0 + (v - lo) / span * (x1 - x0)

    def sy(v: float) -> float:
        return y0 - v / ytop * (y0 - y1)

    parts = _svg_open(chart_id, title) + _y_grid(ticks, sy, x0, x1)
    # bars
    for i in range(n_bars):
        left, right = sx(edges[i]), sx(edges[i + 1])
        w = max(0.5, right - left - 1)
        tip = [f"{fmt_num(float(edges[i]))} – {fmt_num(float(edges[i + 1]))}"]
        for name in names:
            c = int(counts[name][i])
            tip.append(f"{name}: {c}")
        parts += _stacked_bar(left + 0.5, w, [(colors[n], int(counts[n][i])) for n in names],
                              sy, "; ".join(tip))
    # x axis
    parts.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>')
    for v in _x_ticks(lo, hi):
        x = sx(v)
        parts.append(f'<line class="axis" x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{y0 + 16}" '
                     f'text-anchor="middle">{esc(fmt_num(v))}</text>')
    parts.append(f'<text class="axis-label" x="{(x0 + x1) / 2:.1f}" y="{HEIGHT - 6}" '
                 f'text-anchor="middle">{esc(x_label)}</text>')
    # thresholds
    for th in thresholds:
        if th.value is None or not (lo - 1e-12 <= th.value <= hi + 1e-12):
            continue
        x = sx(th.value)
        anchor = "end" if x > (x0 + x1) / 2 else "start"
        dx = -4 if anchor == "end" else 4
        parts.append(f'<line class="threshold threshold-{esc(th.kind)}" '
                     f'data-threshold="{esc(fmt_num(th.value, 6))}" x1="{x:.1f}" y1="{y1 - 8}" '
                     f'x2="{x:.1f}" y2="{y0}"/>')
        parts.append(f'<text class="threshold-label" x="{x + dx:.1f}" y="{y1 - 12 + 8:.1f}" '
                     f'text-anchor="{anchor}">{esc(th.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _x_ticks(lo: float, hi: float, n: int = 6) -> List[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], start
    while v <= hi + 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def bars_svg(values: Sequence[Dict[str, int]], colors: Dict[str, str], *, title: str,
             x_label: str, labels: Sequence[str] = (), chart_id: str = "") -> str:
    """One stacked bar per item (e.g. per cluster, largest first)."""
    n = len(values)
    totals = [sum(v.get(name, 0) for name in colors) for v in values]
    ymax = max([1] + totals)
    ticks = _nice_ticks(ymax)
    ytop = max(ticks[-1], ymax)
    x0, x1 = _MARGIN_LEFT, WIDTH - _MARGIN_RIGHT
    y0, y1 = HEIGHT - _MARGIN_BOTTOM, _MARGIN_TOP
    slot = (x1 - x0) / max(1, n)

    def sy(v: float) -> float:
        return y0 - v / ytop * (y0 - y1)

    parts = _svg_open(chart_id, title) + _y_grid(ticks, sy, x0, x1)
    for i, item in enumerate(values):
        left = x0 + i * slot
        w = max(0.5, slot - (1 if slot > 3 else 0))
        label = labels[i] if i < len(labels) else str(i)
        tip = "; ".join([label] + [f"{name}: {item.get(name, 0)}" for name in colors])
        parts += _stacked_bar(left, w, [(colors[n], int(item.get(n, 0))) for n in colors],
                              sy, tip)
    parts.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>')
    parts.append(f'<text class="axis-label" x="{(x0 + x1) / 2:.1f}" y="{HEIGHT - 6}" '
                 f'text-anchor="middle">{esc(x_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def legend_html(colors: Dict[str, str], labels: Optional[Dict[str, str]] = None) -> str:
    labels = labels or {}
    items = "".join(f'<span class="key"><span class="swatch" style="background:{c}"></span>'
                    f'{esc(labels.get(n, n))}</span>' for n, c in colors.items())
    return f'<div class="legend">{items}</div>'
