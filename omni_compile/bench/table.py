"""The quality-and-speed table: one row per setting, its quality on the learned zoo model and its speed at
FLUX.1 and HunyuanVideo size, side by side.

    python -m omni_compile.bench.table --out DIR                       # the table from the saved results
    python -m omni_compile.bench.table --run flux --out DIR            # GPU: time the rows at FLUX.1 size
    python -m omni_compile.bench.table --run hunyuan --out DIR         # GPU: the HunyuanVideo rows

Quality (PSNR, SSIM, object accuracy against the dense images, the work each setting did) comes from a
quality run of ``omni_compile.bench.quality`` (``--quality``, default the file docs/benchmarks.md cites).
Speed comes from ``omni_compile.bench.e2e`` runs at full size with random weights (``--e2e``), where
every data-dependent row is a **recorded-density replay** (``r:<setting>``, :mod:`omni_compile.bench.replay`):
the figures the setting produced on the learned model, per site and update, as content-blind bits of the
same densities, and its block caching as the same share of cached block-steps. ``--run MODEL`` makes that
run (one compile per kind of graph, every row on it) and then writes the table. Beside each measured
speed-up the table prints the work model's ideal (``omni_compile.tune.WorkModel``: the work the row did on
the zoo model, priced by the H200 profile of a dense step at that size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List, Optional

#: the quality runs the table reads by default (docs/results/, named what and where): all 64 evaluation
#: captions for the rows the README quotes, the first 4 for the others (a setting's first row counts)
QUALITY = [os.path.join("docs", "results", "2026-12_cpu_zoo_speed_quality_64.json"),
           os.path.join("docs", "results", "2026-12_cpu_zoo_speed_quality_4.json")]

#: the rows timed at full size, in table order (settings of the quality run); HunyuanVideo's 50 steps take
#: ~1–2 min a row on an H200, so a 10-minute call times the dense baseline and these few
FLUX_ROWS: List[str] = []
HUNYUAN_ROWS: List[str] = []

#: e2e flags per model: FLUX runs all 50 steps twice (synced and pipelined); HunyuanVideo runs its
#: baselines (every step dense: a few steps project exactly) for 3 steps and each row's 50 once
RUN_FLAGS = {"flux": ["--profile", "none"],
             "hunyuan": ["--profile", "none", "--baseline-steps", "3", "--no-pipelined"]}


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return "inf" if isinstance(v, float) and math.isinf(v) else format(v, fmt)


def load_e2e(paths: List[str]) -> Dict[str, dict]:
    """``{model: e2e result}`` of the given ``e2e_<model>.json`` files (a later file of a model wins)."""
    out = {}
    for p in paths:
        with open(p) as f:
            res = json.load(f)
        out[res["model"]] = res
    return out


def speed_of(res: Optional[dict], setting: str) -> dict:
    """The measured speed-up of ``r:<setting>`` in an e2e result (loop and pipelined), None when not run."""
    if not res:
        return {}
    row = next((r for r in res["rows"] if r["name"] == f"r:{setting}"), None)
    if row is None:
        return {}
    return dict(speedup=row.get("speedup"), pipelined=row.get("speedup_pipelined"), projected=row.get("projected"),
                ideal_profile=row.get("ideal_speedup"), dispatch_ms=(row.get("step_ms") or {}).get("dispatch"),
                device=res.get("device"))


def load_quality(paths: List[str]) -> dict:
    """The rows of several quality runs in one table (``meta`` of the first; each row keeps its run's
    caption count; a setting already read is not read again)."""
    out, seen = None, set()
    for p in paths:
        with open(p) as f:
            q = json.load(f)
        for r in q["rows"]:
            r["n_captions"] = q["meta"]["n_captions"]
        if out is None:
            out = dict(meta=q["meta"], rows=[])
        out["rows"] += [r for r in q["rows"] if r["setting"] not in seen]
        seen |= {r["setting"] for r in q["rows"]}
    return out


def markdown(quality: dict, e2e: Dict[str, dict]) -> str:
    meta = quality["meta"]
    rows = quality["rows"]
    flux, hy = e2e.get("flux"), e2e.get("hunyuan")
    lines = [
        "| setting | captions | PSNR dB (worst) | SSIM | object acc. | work: attention (loop) | blocks cached (dispatch) "
        "| FLUX.1 1024²: measured (pipelined) / ideal | HunyuanVideo 720p: measured / ideal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    from .quality import describe

    for r in rows:
        f, h = speed_of(flux, r["setting"]), speed_of(hy, r["setting"])
        fm = (f"{_num(f.get('speedup'), '.2f')} ({_num(f.get('pipelined'), '.2f')})" if f else "—")
        hm = (_num(h.get("speedup"), ".2f") + ("*" if h.get("projected") else "")) if h else "—"
        name = r["setting"] if r["config"] is None else f"{r['setting']}: {describe(r['config'])}"
        lines.append(
            f"| {name} | {r.get('n_captions', meta['n_captions'])} | {_num(r['psnr'], '.2f')} ({_num(r['psnr_min'], '.2f')}) | {r['ssim']:.4f} | "
            f"{r['object_accuracy']:.3f} | {r['density']:.3f} | {r.get('cached_share', 0.0):.2f} | "
            f"{fm} / {_num(r.get('ideal_flux'), '.2f')} | {hm} / {_num(r.get('ideal_hunyuan'), '.2f')} |")
    notes = [f"Quality: the zoo model, the first *captions* evaluation captions, {meta['steps']} steps, batched CFG "
             f"{meta['guidance']:g}, {meta['device']} {meta['dtype']}; against the dense eager images of the same captions."]
    for model, res in (("FLUX.1", flux), ("HunyuanVideo", hy)):
        if res:
            notes.append(f"{model}: {res['device']}, torch {res['torch']}, {res['steps']} steps against Inductor in "
                         f"the same run; rows are recorded-density replays"
                         + (" (`*`: projected from per-action medians)" if res.get("max_steps") else "") + ".")
        else:
            notes.append(f"{model}: not measured yet (`python -m omni_compile.bench.table --run "
                         f"{'flux' if model == 'FLUX.1' else 'hunyuan'}` on a GPU); the ideal column is the work model.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"* {n}" for n in notes) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", nargs="+", default=QUALITY,
                   help="quality.json files of omni_compile.bench.quality (a setting's first row counts)")
    p.add_argument("--e2e", nargs="*", default=[], help="e2e_<model>.json files of replay runs")
    p.add_argument("--run", choices=("flux", "hunyuan"), default=None, help="GPU: time the rows at this size first")
    p.add_argument("--rows", default=None, help="comma-separated settings to time (default: the table's list)")
    p.add_argument("--out", required=True)
    args, extra = p.parse_known_args(argv)
    os.makedirs(args.out, exist_ok=True)
    quality = load_quality(args.quality)
    e2e_files = list(args.e2e)
    if args.run:
        from . import e2e as bench_e2e

        rows = args.rows.split(",") if args.rows else (FLUX_ROWS if args.run == "flux" else HUNYUAN_ROWS)
        rows = rows or [r["setting"] for r in quality["rows"] if r["config"] is not None]
        base = "dense" if args.run == "flux" else "split_dense"
        merged = os.path.join(args.out, "quality_rows.json")  # the replay reads one file
        with open(merged, "w") as f:
            json.dump(quality, f)
        rc = bench_e2e.main(["--model", args.run, "--replay", merged, "--out", args.out,
                             "--configs", ",".join([base] + [f"r:{r}" for r in rows])] + RUN_FLAGS[args.run] + extra)
        e2e_files.append(os.path.join(args.out, f"e2e_{args.run}.json"))
        if rc:
            print(f"e2e returned {rc}")
    # a run's output folder keeps the other model's earlier run: the table shows both
    e2e_files += [os.path.join(args.out, f"e2e_{m}.json") for m in ("flux", "hunyuan")
                  if args.run and m != args.run]
    md = markdown(quality, load_e2e([f for f in e2e_files if os.path.exists(f)]))
    with open(os.path.join(args.out, "speed_quality.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
