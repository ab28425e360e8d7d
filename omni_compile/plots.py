"""The benchmarks' figures: ``bench.png`` from ``omni_compile.bench``'s rows and ``e2e_<model>.png`` from
``omni_compile.bench_e2e``'s result, each one PNG of panels (:mod:`omni_compile.charts`).

One PNG per benchmark rather than one per panel: the device machine returns at most 8 files a call.
Each figure is built from the saved JSON alone, so ``--replot FILE.json`` redraws it (and its tables) on
any machine, without a GPU.

Every target of issue #6 that a panel can show is drawn on it as a dashed reference line (550 TFLOP/s,
1.3x FlexAttention, 0.9 / d, the ideal GEMM speedup, 5 % of a dense attention).
"""

from __future__ import annotations

import math
import sys
from typing import Dict, List

from .charts import PALETTE, Chart, Series, save

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
            if any("graph_of_floor" in r for r in rs):  # runs since session 14: the memory-aware bound too
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
