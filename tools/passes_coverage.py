"""The coverage table of docs/passes.md: every family of ``tests/_tiny_families.py`` through the check of
``tests/_coverage.py`` (one compile per family: dense equals eager, then a six-step sparse loop with the
pipeline's own timesteps, CFG form and masks).

    python tools/passes_coverage.py                 # print the table and the test's expectations
    python tools/passes_coverage.py --write         # also replace the table in docs/passes.md
    python tools/passes_coverage.py flux2 prx       # some families only (nothing is written)

Runs on CPU (Triton's interpreter); about two minutes for every family on two cores.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(ROOT, "tests"))

import _coverage as C  # noqa: E402
import _tiny_families as TF  # noqa: E402

DOC = os.path.join(ROOT, "docs", "passes.md")
BEGIN, END = "<!-- coverage table: tools/passes_coverage.py -->", "<!-- end of coverage table -->"


def _short(reason: str) -> str:
    """A reason without its site (or ``graph:`` / ``loop:``) prefix and FX node names (``(add_3)``)."""
    reason = reason.split(": ", 1)[1] if ": " in reason else reason
    return re.sub(r" \((?=[a-z_\d]*[_\d])[a-z_\d]+\)", "", reason)


def status(row: C.Row) -> str:
    if row.error:
        return "error: " + row.error[:120]
    if row.dispatch_sites:
        return f"sparse ({row.dispatch_sites}/{row.rewritten} sites)"
    return "dense"


def notes(row: C.Row) -> str:
    """What keeps sites dense or without GEMM-Q/GEMM-O, each distinct reason once with its count."""
    seen: dict = {}
    for r in row.reasons:
        key = _short(r)
        seen[key] = seen.get(key, 0) + 1
    if row.sdpa_calls > row.sites:
        seen[f"{row.sdpa_calls - row.sites} of {row.sdpa_calls} SDPA calls run in no compiled graph"] = 1
    return "; ".join(f"{n}x {k}" if n > 1 else k for k, n in seen.items()) or "—"


def table(rows) -> str:
    lines = [
        "| family (class) | pipeline: timestep, CFG | SDPA sites | rewritten | GEMM-Q / q proj. | GEMM-O | sparse loop | "
        "left dense / without GEMM-Q or GEMM-O, and why |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        m = TF.META[r.family]
        lines.append(
            f"| {r.family} (`{m.cls}`) | `{m.timestep_arg}` = {m.convert}, {m.direction}; CFG {m.cfg} | "
            f"{r.sdpa_calls} | {r.rewritten} | {r.gemm_q}/{r.q_projections} | {r.gemm_o} | {status(r)} | {notes(r)} |")
    n = len(rows)
    sparse = sum(1 for r in rows if r.dispatch_sites)
    with_q = [r for r in rows if r.q_projections]
    full_q = sum(1 for r in with_q if r.gemm_q == r.q_projections)
    lines += ["", f"{sparse} of {n} families run sparse; GEMM-Q on every q projection in {full_q} of the "
                  f"{len(with_q)} families whose attention has one."]
    return "\n".join(lines)


def expectations(rows) -> str:
    out = ["EXPECTED = {"]
    for r in rows:
        out.append(f"    {r.family!r}: ({r.sdpa_calls}, {r.rewritten}, {r.q_projections}, {r.gemm_q}, {r.gemm_o}, "
                   f"{r.dispatch_sites}),")
    out.append("}")
    return "\n".join(out)


def write(text: str) -> None:
    doc = open(DOC).read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC} has no coverage table markers ({BEGIN!r} ... {END!r})")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(DOC, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="*", help="default: every family")
    ap.add_argument("--write", action="store_true", help="replace the table in docs/passes.md")
    args = ap.parse_args(argv)
    names = args.families or TF.FAMILIES
    t0 = time.perf_counter()
    rows = []
    for name in names:
        r = C.check_family(name)
        rows.append(r)
        print(f"{name:18s} {status(r):22s} sites {r.sites}/{r.sdpa_calls} rewritten {r.rewritten} GEMM-Q {r.gemm_q} "
              f"GEMM-O {r.gemm_o}  {r.seconds:.1f} s", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    print()
    print(expectations(rows))
    print(f"\n{len(rows)} families in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.write:
        if args.families:
            raise SystemExit("--write needs every family (no names)")
        write(text)


if __name__ == "__main__":
    main()
