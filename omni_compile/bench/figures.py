"""Every figure of the project, drawn with Pillow alone (no matplotlib).

* charts: line, dashed, dot and bar series on linear or log axes, horizontal reference lines and a
  legend, several panels to one PNG. A chart is data (:class:`Chart` of :class:`Series`); :func:`save`
  lays the panels out in a grid and returns each panel's :class:`Frame`, the map from data to pixels, so
  a test can look at the pixel where a value was drawn;
* the benchmarks' figures (:func:`bench_charts` for ``bench.png``, :func:`e2e_charts` for
  ``e2e_<model>.png``), each one PNG of panels built from the saved JSON alone, so ``--replot FILE.json``
  redraws it on any machine; the targets are drawn as dashed reference lines;
* the zoo's figures: the training loss curve (:func:`plot_loss`) and captioned image grids
  (:func:`caption_grid`).

Values that cannot be drawn (NaN, inf; zero or negative on a log axis) are left out: a line breaks there
instead of dropping to an axis, so a missing anchor (FlexAttention has no reuse rows) never reads as a
measured zero.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

Color = Tuple[int, int, int]

# matplotlib's tab10 order: distinguishable, and what readers of plots expect
PALETTE: Tuple[Color, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                              (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
GRID: Color = (228, 228, 228)
STYLES = ("line", "dashed", "dots", "bars")
MARKED_POINTS = 60  # a line of more points gets no dot per point (they would merge into a thick line)


@dataclass
class Series:
    """One data series. ``style``: ``"line"`` (solid, with a dot per point up to :data:`MARKED_POINTS`), ``"dashed"``, ``"dots"`` (points
    alone) or ``"bars"`` (one bar per x; several bar series of a chart stand side by side).
    ``color`` None takes the chart's next palette colour."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "line"
    color: Optional[Color] = None

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"Series style {self.style!r}: expected one of {STYLES}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Series {self.label!r}: {len(self.x)} x values but {len(self.y)} y values")


@dataclass
class Chart:
    """One panel. ``hlines``: ``(y, label, color)`` reference lines (a target, an anchor), drawn dashed
    across the panel and named in the legend. ``xticks``: ``(x, text)`` labels instead of numbers (bar
    charts of named settings). ``xlim`` / ``ylim``: fixed ranges instead of the data's (a log axis' limits
    must be positive)."""

    title: str
    series: List[Series] = field(default_factory=list)
    xlabel: str = ""
    ylabel: str = ""
    log_x: bool = False
    log_y: bool = False
    hlines: List[Tuple[float, str, Optional[Color]]] = field(default_factory=list)
    xticks: Optional[List[Tuple[float, str]]] = None
    xlim: Optional[Tuple[float, float]] = None
    ylim: Optional[Tuple[float, float]] = None
    bars_overlay: bool = False  # bar series share each x position (one series per x) instead of side by side


def drawable(v, log: bool) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log)


def nice_ticks(lo: float, hi: float, target: int = 5) -> List[float]:
    """Ticks ``k * step`` covering ``[lo, hi]`` (to a billionth of a step: float noise does not add a tick)
    with ``step`` 1, 2 or 5 times a power of ten, about ``target`` of them (a range flat to 7 significant
    digits gets a unit-wide range around the value)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks needs a finite range, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo < 1e-7 * max(1.0, abs(lo), abs(hi)):  # flat (to 7 digits): a unit around it
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    digits = max(0, 1 - math.floor(math.log10(step)))  # 0.1 * 3 shows as 0.3
    return [round(k * step, digits) for k in range(first, last + 1)]


def log_ticks(lo: float, hi: float) -> List[float]:
    """Decades covering ``[lo, hi]`` (both > 0); with 1, 2, 5 in each decade when there are fewer than three."""
    e0, e1 = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    if e1 == e0:
        e1 += 1
    if e1 - e0 >= 3:
        return [10.0 ** e for e in range(e0, e1 + 1)]
    ticks = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in (1, 2, 5)]
    below = [t for t in ticks if t <= lo * (1 + 1e-9)]
    above = [t for t in ticks if t >= hi * (1 - 1e-9)]
    return [t for t in ticks if (below and t >= below[-1]) and (above and t <= above[0])]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


@dataclass
class Frame:
    """The data-to-pixel map of one drawn panel: the plot area ``(x0, y0)``–``(x1, y1)`` in image pixels
    and the data range on each axis (tick-rounded)."""

    x0: int
    y0: int
    x1: int
    y1: int
    xlim: Tuple[float, float]
    ylim: Tuple[float, float]
    log_x: bool = False
    log_y: bool = False

    def _frac(self, v: float, lim, log: bool) -> float:
        if log:
            return (math.log10(v) - math.log10(lim[0])) / (math.log10(lim[1]) - math.log10(lim[0]))
        return (v - lim[0]) / (lim[1] - lim[0])

    def to_px(self, x: float, y: float) -> Tuple[float, float]:
        fx, fy = self._frac(x, self.xlim, self.log_x), self._frac(y, self.ylim, self.log_y)
        return self.x0 + (self.x1 - self.x0) * fx, self.y1 - (self.y1 - self.y0) * fy


def _ticks(lo: float, hi: float, log: bool) -> List[float]:
    return log_ticks(lo, hi) if log else nice_ticks(lo, hi)


def _range(values: List[float], fixed, log: bool) -> Tuple[Tuple[float, float], List[float]]:
    if fixed is not None:
        lo, hi = fixed
        if log and not (lo > 0 and hi > 0):
            raise ValueError(f"a log axis needs positive limits, got {fixed}")
        return (lo, hi), [t for t in _ticks(lo, hi, log) if lo - 1e-12 <= t <= hi + 1e-12]
    if not values:
        lo, hi = (1.0, 10.0) if log else (0.0, 1.0)
    else:
        lo, hi = min(values), max(values)
    if log and hi <= lo * (1 + 1e-9):
        lo, hi = lo / 2, hi * 2
    # a little room so a series along the range's end is not drawn on the frame
    if log:
        pad = 10 ** (0.02 * (math.log10(hi) - math.log10(lo)))
        lo, hi = lo / pad, hi * pad
    else:
        pad = 0.02 * (hi - lo)
        lo, hi = (lo - pad if lo - pad >= 0 or lo < 0 else 0.0), hi + pad
    ticks = _ticks(lo, hi, log)
    return (ticks[0], ticks[-1]), ticks


def _dashed(d, pts, color, width=2, dash=7, gap=5):
    for (ax, ay), (bx, by) in zip(pts, pts[1:]):
        length = math.hypot(bx - ax, by - ay)
        pos = 0.0
        while pos < length:
            end = min(pos + dash, length)
            d.line([(ax + (bx - ax) * pos / length, ay + (by - ay) * pos / length),
                    (ax + (bx - ax) * end / length, ay + (by - ay) * end / length)], fill=color, width=width)
            pos = end + gap


def _runs(points, frame: Frame):
    """Pixel polylines of the drawable points, split where one is not drawable."""
    run, out = [], []
    for x, y in points:
        if drawable(x, frame.log_x) and drawable(y, frame.log_y):
            run.append(frame.to_px(x, y))
        elif run:
            out.append(run)
            run = []
    if run:
        out.append(run)
    return out


def draw_chart(d, chart: Chart, box: Tuple[int, int, int, int], font) -> Frame:
    """Draw ``chart`` into the pixel box ``(left, top, right, bottom)`` of the ImageDraw ``d``."""
    left, top, right, bottom = box
    legend_w = 150 if (chart.series or chart.hlines) else 0
    x0, y0, x1, y1 = left + 62, top + 34, right - 12 - legend_w, bottom - 40
    colors = iter(PALETTE)
    series = [(s, s.color or next(colors)) for s in chart.series]
    bars = [s for s, _ in series if s.style == "bars"]
    xs = [v for s in chart.series for v in s.x if drawable(v, chart.log_x)]
    if chart.xticks:
        xs += [v for v, _ in chart.xticks]
    ys = [v for s in chart.series for v in s.y if drawable(v, chart.log_y)]
    ys += [v for v, _, _ in chart.hlines if drawable(v, chart.log_y)]
    if bars and not chart.log_y:
        ys.append(0.0)  # bars stand on zero
    (xlo, xhi), xt = _range(xs, chart.xlim, chart.log_x)
    if bars and chart.xlim is None:
        xlo, xhi = min(xs) - 0.6, max(xs) + 0.6  # room for the outer bars
        xt = [t for t in xt if xlo <= t <= xhi]
    (ylo, yhi), yt = _range(ys, chart.ylim, chart.log_y)
    frame = Frame(x0, y0, x1, y1, (xlo, xhi), (ylo, yhi), chart.log_x, chart.log_y)

    d.text((left + 4, top + 4), chart.title, fill="black", font=font)
    for t in yt:
        _, py = frame.to_px(xlo, t)
        d.line([x0, py, x1, py], fill=GRID)
        d.text((left + 2, py - 6), _fmt(t), fill="black", font=font)
    labels = chart.xticks if chart.xticks else [(t, _fmt(t)) for t in xt]
    for t, text in labels:
        if not drawable(t, chart.log_x):
            continue
        px, _ = frame.to_px(t, ylo)
        d.line([px, y1, px, y1 + 4], fill="black")
        d.text((px - 3 * len(text), y1 + 6), text, fill="black", font=font)
    d.rectangle([x0, y0, x1, y1], outline="black")
    if chart.xlabel:
        d.text(((x0 + x1) // 2 - 3 * len(chart.xlabel), y1 + 22), chart.xlabel, fill="black", font=font)
    if chart.ylabel:
        d.text((left + 4, top + 18), chart.ylabel, fill=(90, 90, 90), font=font)

    legend = []
    for y, label, color in chart.hlines:
        color = color or (90, 90, 90)
        if drawable(y, chart.log_y):
            _, py = frame.to_px(xlo, y)
            _dashed(d, [(x0, py), (x1, py)], color, width=1)
        legend.append((label, color, "dashed"))
    side = 1 if chart.bars_overlay else max(1, len(bars))
    width = (x1 - x0) / max(1, len({v for s in bars for v in s.x})) * 0.8 / side
    for s, color in series:
        legend.append((s.label, color, s.style))
        if s.style == "bars":
            k = 0 if chart.bars_overlay else bars.index(s)
            base = frame.to_px(xlo, max(ylo, 0.0) if not chart.log_y else ylo)[1]
            for x, y in zip(s.x, s.y):
                if drawable(x, chart.log_x) and drawable(y, chart.log_y):
                    px, py = frame.to_px(x, y)
                    bx = px - width * side / 2 + k * width
                    d.rectangle([bx + 1, min(py, base), bx + width - 1, max(py, base)], fill=color)
            continue
        for run in _runs(zip(s.x, s.y), frame):
            if s.style == "line" and len(run) > 1:
                d.line(run, fill=color, width=2)
            elif s.style == "dashed" and len(run) > 1:
                _dashed(d, run, color)
            if s.style == "dots" or len(run) == 1 or (s.style == "line" and len(s.x) <= MARKED_POINTS):
                for px, py in run:
                    d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    ly = y0
    for label, color, style in legend:
        lx = x1 + 10
        if style == "bars":
            d.rectangle([lx, ly + 3, lx + 14, ly + 11], fill=color)
        elif style == "dashed":
            _dashed(d, [(lx, ly + 7), (lx + 18, ly + 7)], color, dash=5, gap=3)
        else:
            d.line([lx, ly + 7, lx + 18, ly + 7], fill=color, width=2 if style == "line" else 1)
            d.ellipse([lx + 6, ly + 4, lx + 12, ly + 10], fill=color)
        d.text((lx + 24, ly + 1), label[:22], fill="black", font=font)
        ly += 15
    return frame


def save(charts: Sequence[Chart], path: str, cols: int = 2, size: Tuple[int, int] = (640, 360)) -> List[Frame]:
    """Draw ``charts`` as a grid of ``cols`` panels of ``size`` pixels each into the PNG ``path`` (folders
    made as needed); returns each panel's :class:`Frame` in order. Needs Pillow (a dependency of this
    package)."""
    from PIL import Image, ImageDraw, ImageFont

    if not charts:
        raise ValueError("save needs at least one chart")
    cols = max(1, min(cols, len(charts)))
    rows = math.ceil(len(charts) / cols)
    w, h = size
    img = Image.new("RGB", (cols * w, rows * h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    frames = []
    for i, chart in enumerate(charts):
        r, c = divmod(i, cols)
        frames.append(draw_chart(d, chart, (c * w, r * h, (c + 1) * w, (r + 1) * h), font))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    img.save(path)
    return frames


__all__ = ["Chart", "Series", "Frame", "PALETTE", "save", "draw_chart", "nice_ticks", "log_ticks"]


# ---- the benchmarks' figures ---------------------------------------------------------------------------
GREY = (110, 110, 110)


def _by(rows, key):
    out: Dict = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _sorted_xy(rows, x, y):
    pts = sorted((r[x], r.get(y, float("nan"))) for r in rows)
    return [p[0] for p in pts], [p[1] for p in pts]


def _attention_charts(rows) -> List[Chart]:
    plain = [r for r in rows if r["part"] == "attention" and not r.get("varied") and r["reuse"] == 0.0]
    mixed = [r for r in rows if r["part"] == "attention" and r["reuse"] > 0.0]
    if not plain and not mixed:
        return []
    tf = Chart("attention: TFLOP/s on kept blocks", xlabel="density (kept fraction)", ylabel="TFLOP/s",
               hlines=[(550.0, "target (S >= 16K)", GREY)])
    sp = Chart("attention: speedup over its own dense", xlabel="density", ylabel="x own dense", log_x=True, log_y=True)
    fx = Chart("attention vs FlexAttention, same block mask", xlabel="density", ylabel="x Flex",
               hlines=[(1.3, "target 1.3x", GREY), (1.0, "parity", (190, 190, 190))])
    dens = sorted({r["density"] for r in plain + mixed if r["density"] > 0})
    if dens:
        sp.series += [Series("ideal 1/d", dens, [1 / d for d in dens], "dashed", GREY),
                      Series("target 0.9/d", dens, [0.9 / d for d in dens], "dashed", (190, 190, 190))]
    for i, (S, rs) in enumerate(sorted(_by(plain, "S").items())):
        c = PALETTE[i % len(PALETTE)]
        tf.series.append(Series(f"S={S}", *_sorted_xy(rs, "density", "tflops"), "line", c))
        tf.series.append(Series(f"S={S} Flex", *_sorted_xy(rs, "density", "flex_tflops"), "dashed", c))
        tf.series.append(Series(f"S={S} cuDNN dense", [1.0], [rs[0].get("cudnn_tflops", float("nan"))], "dots", c))
        sp.series.append(Series(f"S={S}", *_sorted_xy(rs, "density", "speedup_vs_own_dense"), "line", c))
        fx.series.append(Series(f"S={S}", *_sorted_xy(rs, "density", "vs_flex"), "line", c))
        ms = [r for r in mixed if r["S"] == S]
        if ms:
            sp.series.append(Series(f"S={S} with reuse", *_sorted_xy(ms, "density", "speedup_vs_own_dense"), "dots",
                                    tuple(min(255, v + 70) for v in c)))
    return [tf, sp, fx]


def _gemm_charts(rows) -> List[Chart]:
    gemm = [r for r in rows if r["part"] == "gemm"]
    if not gemm:
        return []
    speed = Chart("GEMM-Q (dashed) / GEMM-O: speedup over cuBLAS", xlabel="reuse fraction", ylabel="x F.linear")
    q = Chart("GEMM-Q GPU time / (computed fraction x cuBLAS)", xlabel="reuse fraction", ylabel="lower is better",
              hlines=[(1.1, "target 1.1", GREY), (1.0, "1:1", (190, 190, 190))])
    o = Chart("GEMM-O (with cache bias): fraction of ideal", xlabel="reuse fraction", ylabel="of 1/f; dots: of floor",
              hlines=[(0.9, "target 90 %", GREY)])
    for i, M in enumerate(sorted({r["M"] for r in gemm})):
        c, shape = PALETTE[i % len(PALETTE)], f"M={M}"
        mine = [r for r in gemm if r["M"] == M]
        for op, label, style in (("gemm_q", "", "line"), ("gemm_q unfilled", " unfilled", "dashed")):
            # the target's range is f >= 0.25; the runtime's sites run the unfilled form
            rs = [dict(r, graph_over_f=r["graph_ms"] / (r["computed"] * r["cublas_ms"]))
                  for r in mine if r["op"] == op and r["computed"] >= 0.25]
            if rs:
                q.series.append(Series(shape + label, *_sorted_xy(rs, "reuse", "graph_over_f"), style, c))
        for op, style in (("gemm_q", "dashed"), ("gemm_o", "line")):
            rs = [r for r in mine if r["op"] == op]
            if rs:
                speed.series.append(Series(f"{op[-1].upper()} {shape}", *_sorted_xy(rs, "reuse", "speedup"), style, c))
        rs = [r for r in mine if r["op"] == "gemm_o"]
        if rs:
            o.series += [Series(f"{shape} GPU time", *_sorted_xy(rs, "reuse", "graph_of_ideal"), "line", c),
                         Series(f"{shape} wall", *_sorted_xy(rs, "reuse", "of_ideal"), "dashed", c)]
            if any("graph_of_floor" in r for r in rs):  # the memory-aware bound, in results that carry it
                o.series.append(Series(f"{shape} of floor", *_sorted_xy(rs, "reuse", "graph_of_floor"), "dots", c))
            speed.series.append(Series(f"ideal {shape}", *_sorted_xy(rs, "reuse", "ideal"), "dots", c))
    return [ch for ch in (speed, q, o) if ch.series]


def _symbols_chart(rows) -> List[Chart]:
    sym = [r for r in rows if r["part"] == "symbols"]
    pooled = [r for r in rows if r["part"] == "pooled"]
    if not sym and not pooled:
        return []
    ch = Chart("update-step overhead / one dense attention", xlabel="S (tokens)", ylabel="% of cuDNN", log_y=True,
               hlines=[(5.0, "target 5 %", GREY)])
    for label, rs, key, style, c in (("symbols (GPU time)", sym, "graph_fraction", "line", PALETTE[0]),
                                     ("symbols (wall)", sym, "fraction", "dashed", PALETTE[0]),
                                     ("pooled alone (GPU)", pooled, "graph_fraction", "line", PALETTE[1])):
        if rs:
            x, y = _sorted_xy(rs, "S", key)
            ch.series.append(Series(label, x, [100 * v for v in y], style, c))
    ch.xticks = [(s, str(s)) for s in sorted({r["S"] for r in sym + pooled})]
    return [ch]


def bench_charts(rows) -> List[Chart]:
    """The panels of ``bench.png`` for the parts present in ``rows`` (``omni_compile.bench`` rows)."""
    return _attention_charts(rows) + _gemm_charts(rows) + _symbols_chart(rows)


def e2e_charts(res: dict) -> List[Chart]:
    """The panels of ``e2e_<model>.png`` from a ``bench_e2e`` result: per-step wall time of the synced loop,
    per-step GPU time of the pipelined loop, and each setting's speedup beside its ideal."""
    rows = res["rows"]
    wall = Chart(f"{res.get('model', '')}: step wall time (synced loop)", xlabel="step", ylabel="ms")
    gpu = Chart(f"{res.get('model', '')}: step GPU time (pipelined loop)", xlabel="step", ylabel="ms")
    speed = Chart("speedup over Inductor dense", ylabel="x", hlines=[(1.0, "Inductor", (190, 190, 190))])
    names = [r["name"] for r in rows]
    for i, r in enumerate(rows):
        c = PALETTE[i % len(PALETTE)]
        for chart, key in ((wall, "times_ms"), (gpu, "pipelined_gpu_ms")):
            ys = r.get(key) or []
            if ys:
                chart.series.append(Series(r["name"], list(range(len(ys))), ys, "line", c))
    for label, key, c in (("synced", "speedup", PALETTE[0]), ("pipelined", "speedup_pipelined", PALETTE[1]),
                          ("ideal", "ideal_speedup", GREY)):
        ys = [r.get(key) if r.get(key) is not None else float("nan") for r in rows]
        if any(isinstance(v, (int, float)) and math.isfinite(v) for v in ys):
            speed.series.append(Series(label, list(range(len(rows))), ys, "bars", c))
    speed.xticks = [(i, n) for i, n in enumerate(names)]
    return [c for c in (wall, gpu, speed) if c.series]


def write(charts: List[Chart], path: str, cols: int = 2) -> bool:
    """Save ``charts`` to ``path``; False (with a note on stderr) when there is nothing to draw or Pillow is
    missing (the device machine installs this package without its dependencies), so a benchmark that
    measured everything never fails on its figure."""
    if not charts:
        return False
    try:
        save(charts, path, cols=cols)
    except ImportError as e:
        print(f"plots skipped ({path}): {e} (pip install pillow)", file=sys.stderr)
        return False
    return True


# ---- the zoo's figures -------------------------------------------------------------------------------------


def plot_loss(csv_path: str, png_path: str, title: str = "training loss", width: int = 720, height: int = 420) -> None:
    """Loss (log scale) vs step from ``loss.csv`` (columns ``step``, ``loss``); non-positive or non-finite
    losses are left out."""
    steps, losses = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["loss"] and math.isfinite(float(row["loss"])) and float(row["loss"]) > 0:
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    chart = Chart(title, [Series("loss", steps, losses, "line")], xlabel="step", ylabel="loss (log)", log_y=True)
    save([chart], png_path, cols=1, size=(width, height))


def caption_grid(images, captions: Sequence[str], png_path: str, cols: int = 4, scale: int = 4,
                 extra_lines: Sequence[str] = ()) -> None:
    """Images ``[N, 3, H, W]`` in [0, 1] (tensor or array) with each caption under its image (split at the
    comma, one object per line); ``extra_lines`` per image (e.g. detector verdicts) go below."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    n, _, h, w = arr.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    tile_w, img_h = w * scale, h * scale
    text_h = 14 * (2 + (1 if extra_lines else 0)) + 6
    pad = 6
    canvas = Image.new("RGB", (cols * (tile_w + pad) + pad, rows * (img_h + text_h + pad) + pad), "white")
    d = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = pad + c * (tile_w + pad), pad + r * (img_h + text_h + pad)
        tile = Image.fromarray((np.clip(arr[i].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8))
        canvas.paste(tile.resize((tile_w, img_h), Image.NEAREST), (x, y))
        lines: List[str] = [p.strip() for p in captions[i].split(",")] or [""]
        if extra_lines:
            lines = lines + [extra_lines[i]]
        for j, line in enumerate(lines):
            d.text((x + 2, y + img_h + 3 + 14 * j), line, fill="black", font=font)
    canvas.save(png_path)

