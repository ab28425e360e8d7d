"""The figures (:mod:`omni_compile.bench.figures`): the chart drawer draws each value where its frame says
and leaves out what cannot be drawn, and the benchmarks' ``--replot`` rebuilds a saved run's tables exactly
and its figure."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from omni_compile.bench import e2e as bench_e2e
from omni_compile.bench import figures
from omni_compile.bench import kernels as bench
from omni_compile.bench.figures import PALETTE, Chart, Series, log_ticks, nice_ticks, save

DATA = os.path.join(os.path.dirname(__file__), "data")
RED, GREEN = (250, 0, 0), (0, 200, 0)


def _pixel(path, xy):
    return Image.open(path).convert("RGB").getpixel((round(xy[0]), round(xy[1])))


def _mantissa_ok(step: float) -> bool:
    m = step / 10 ** math.floor(math.log10(step) + 1e-12)
    return any(abs(m - v) < 1e-6 for v in (1, 2, 5, 10))


@settings(deadline=None, max_examples=200)
@given(lo=st.floats(-1e6, 1e6), span=st.floats(0, 1e6), target=st.integers(2, 8))
def test_nice_ticks_cover_the_range_in_round_steps(lo, span, target):
    hi = lo + span
    t = nice_ticks(lo, hi, target)
    steps = [b - a for a, b in zip(t, t[1:])]
    assert len(t) >= 2 and all(s > 0 for s in steps)
    assert t[0] <= lo + 1e-9 * steps[0] and t[-1] >= hi - 1e-9 * steps[0]  # covers the range (float noise aside)
    assert max(steps) - min(steps) <= 1e-6 * max(steps)  # evenly spaced
    assert _mantissa_ok(steps[0])
    assert len(t) <= 2 * target + 3


@settings(deadline=None, max_examples=200)
@given(lo=st.floats(1e-6, 1e6), ratio=st.floats(1.0, 1e6))
def test_log_ticks_cover_the_range_at_1_2_5(lo, ratio):
    hi = lo * ratio
    t = log_ticks(lo, hi) if hi > lo * (1 + 1e-9) else log_ticks(lo / 2, hi * 2)
    assert t == sorted(t) and t[0] > 0 and len(t) >= 2
    assert t[0] <= lo * (1 + 1e-9) or hi <= lo * (1 + 1e-9)
    assert t[-1] >= hi * (1 - 1e-9) or hi <= lo * (1 + 1e-9)
    for v in t:
        assert _mantissa_ok(v)


def test_each_point_is_drawn_where_its_frame_maps_it(tmp_path):
    path = str(tmp_path / "c.png")
    chart = Chart("t", [Series("a", [0.0, 2.0, 5.0], [1.0, 3.0, -2.0], "dots", RED)], ylim=(-4.0, 4.0))
    (frame,) = save([chart], path, size=(400, 300))
    for x, y in ((0.0, 1.0), (2.0, 3.0), (5.0, -2.0)):
        assert _pixel(path, frame.to_px(x, y)) == RED
    # the frame maps the limits onto the plot area's edges
    assert frame.to_px(frame.xlim[0], -4.0) == (frame.x0, frame.y1)
    assert frame.to_px(frame.xlim[1], 4.0) == (frame.x1, frame.y0)


def test_a_missing_value_breaks_the_line_instead_of_drawing_through_it(tmp_path):
    path = str(tmp_path / "c.png")
    ch = Chart("t", [Series("a", [0, 1, 2, 3, 4], [1.0, 1.0, float("nan"), 1.0, 1.0], "line", RED)], ylim=(0.0, 2.0))
    (frame,) = save([ch], path, size=(400, 300))
    assert _pixel(path, frame.to_px(0.5, 1.0)) == RED  # a segment between drawable points
    assert _pixel(path, frame.to_px(3.5, 1.0)) == RED
    for x in (1.5, 2.0, 2.5):  # nothing where the NaN stands, nor on either side of it
        assert _pixel(path, frame.to_px(x, 1.0)) != RED


def test_log_axes_space_decades_equally_and_leave_out_nonpositive_values(tmp_path):
    path = str(tmp_path / "c.png")
    ch = Chart("t", [Series("a", [1, 2, 3, 4], [0.01, 0.1, 0.0, 1.0], "dots", RED)], log_y=True)
    (frame,) = save([ch], path, size=(400, 300))
    y = [frame.to_px(1, v)[1] for v in (0.01, 0.1, 1.0)]
    assert y[0] > y[1] > y[2] and abs((y[0] - y[1]) - (y[1] - y[2])) < 1e-6
    assert frame.ylim[0] <= 0.01 and frame.ylim[1] >= 1.0 and frame.ylim[0] > 0
    with pytest.raises(ValueError, match="positive"):
        save([Chart("t", [Series("a", [1], [1.0])], log_y=True, ylim=(0.0, 1.0))], path)


def test_bars_stand_on_zero_side_by_side(tmp_path):
    path = str(tmp_path / "c.png")
    ch = Chart("t", [Series("a", [0, 1], [2.0, 4.0], "bars", RED), Series("b", [0, 1], [3.0, 1.0], "bars", GREEN)])
    (frame,) = save([ch], path, size=(500, 300))
    assert frame.ylim[0] <= 0.0
    # series a left of each x, b right of it; each bar filled from zero to its value
    for x, ya, yb in ((0, 2.0, 3.0), (1, 4.0, 1.0)):
        px, _ = frame.to_px(x, 0)
        assert _pixel(path, (px - 10, frame.to_px(x, ya / 2)[1])) == RED
        assert _pixel(path, (px + 10, frame.to_px(x, yb / 2)[1])) == GREEN
        assert _pixel(path, (px + 10, frame.to_px(x, yb * 1.5)[1])) != GREEN  # above its top: empty


def test_series_are_checked():
    with pytest.raises(ValueError, match="style"):
        Series("a", [1], [1], "area")
    with pytest.raises(ValueError, match="2 x values but 1"):
        Series("a", [1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        save([], "x.png")


# ---- the benchmarks' figures -------------------------------------------------------------------


def _attention_row(S, keep, tflops, reuse=0.0):
    """A row with every field the markdown table reads (timings made up: only the drawing is checked)."""
    return dict(part="attention", S=S, keep=keep, reuse=reuse, varied=False, density=keep * (1 - reuse), tflops=tflops,
                flex_tflops=0.7 * tflops, cudnn_tflops=600.0, speedup_vs_own_dense=1 / keep, vs_flex=1 / 0.7,
                ms=1.0, graph_ms=1.0, cudnn_ms=1.0, flash_ms=1.0, flex_ms=1.0, vs_cudnn=1.0, err=0.0, ok=True)


def test_bench_figure_puts_each_measured_row_at_its_value(tmp_path):
    rows = [_attention_row(S, d, t) for S, pts in ((4608, ((1.0, 500.0), (0.5, 450.0), (0.2, 400.0))),
                                                    (16896, ((1.0, 560.0), (0.5, 540.0), (0.2, 520.0))))
            for d, t in pts]
    rows.append(dict(part="symbols", S=4608, fraction=0.5, graph_fraction=0.1))
    charts = figures.bench_charts(rows)
    titles = [c.title for c in charts]
    assert titles[0].startswith("attention: TFLOP/s") and titles[-1].startswith("update-step overhead")
    assert not any("GEMM" in t for t in titles)  # no gemm rows, no gemm panels
    frames = save(charts, str(tmp_path / "bench.png"))
    for i, S in enumerate((4608, 16896)):  # series colours follow S
        for r in rows[3 * i:3 * i + 3]:
            assert _pixel(str(tmp_path / "bench.png"), frames[0].to_px(r["density"], r["tflops"])) == PALETTE[i]
    target = [h for h in charts[-1].hlines if h[0] == 5.0]
    assert target, "the 5 % target is drawn"
    sym = next(s for s in charts[-1].series if s.label.startswith("symbols (GPU"))
    assert sym.y == [10.0]  # graph_fraction in percent


def test_bench_replot_rebuilds_the_saved_tables_exactly(tmp_path):
    """A saved H200 symbol-generation run replotted: the same markdown tables as the run printed."""
    src = os.path.join(DATA, "symbols_bench_h200.json")
    assert bench.main(["--replot", src, "--out", str(tmp_path)]) == 0
    got = open(tmp_path / "bench.md").read().split("\n", 2)[2]
    with open(os.path.join(DATA, "symbols_bench_h200.md")) as f:
        assert got.strip() == f.read().strip()
    assert Image.open(tmp_path / "bench.png").size[0] > 0


def test_bench_replot_later_files_replace_their_parts(tmp_path):
    a = dict(env={"device": "a"}, rows=[_attention_row(4608, 1.0, 500.0),
                                        dict(part="pooled", S=4608, ms=1.0, graph_ms=1.0, cudnn_ms=1.0, fraction=0.5,
                                             graph_fraction=0.5, err=0.0, ok=True)])
    b = dict(env={"device": "b"}, rows=[dict(part="pooled", S=4608, ms=2.0, graph_ms=2.0, cudnn_ms=1.0,
                                             fraction=0.25, graph_fraction=0.25, err=0.0, ok=True)])
    for name, d in (("a.json", a), ("b.json", b)):
        with open(tmp_path / name, "w") as f:
            json.dump(d, f)
    assert bench.main(["--replot", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "o")]) == 0
    md = open(tmp_path / "o" / "bench.md").read()
    assert "| 4608 | 2.0000 |" in md and "| 4608 | 1.0000 |" not in md  # b's pooled row replaced a's
    assert "### Attention" in md  # a's other part kept


def test_e2e_replot_rebuilds_the_saved_table_and_draws_each_step(tmp_path):
    src = os.path.join(DATA, "flux_e2e_h200.json")
    assert bench_e2e.main(["--replot", src, "--out", str(tmp_path)]) == 0
    with open(os.path.join(DATA, "flux_e2e_h200.md")) as f:
        assert open(tmp_path / "e2e_flux.md").read() == f.read()
    with open(src) as f:
        res = json.load(f)
    charts = figures.e2e_charts(res)
    frames = save(charts, str(tmp_path / "e.png"))
    wall = charts[0]
    assert [s.label for s in wall.series] == [r["name"] for r in res["rows"]]
    last = wall.series[-1]  # drawn last, so on top everywhere
    for step in (10, 12, 40):
        assert _pixel(str(tmp_path / "e.png"), frames[0].to_px(step, last.y[step])) == last.color
    speed = charts[-1]
    ideal = next(s for s in speed.series if s.label == "ideal")
    agg = [r["name"] for r in res["rows"]].index("aggressive")
    assert ideal.y[agg] == pytest.approx(res["rows"][agg]["ideal_speedup"])
    assert math.isnan(ideal.y[0])  # the baseline has no ideal: no bar


def test_a_figure_without_pillow_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)
    ok = figures.write([Chart("t", [Series("a", [1], [1.0])])], str(tmp_path / "x.png"))
    assert ok is False and not (tmp_path / "x.png").exists()
    assert "pip install pillow" in capsys.readouterr().err
    assert figures.write([], str(tmp_path / "y.png")) is False
