"""``OmniState.report()``: per-site and per-step figures of the update–dispatch runtime.

Figures are computed here, lazily, from the symbols each attention call ran with (``state.history``):
the ops never read a density back to the host while the loop runs.

* **density**: fraction of the dense attention work (query rows × keys, over batch and heads) done —
  1 on dense and update steps, ``Symbols.density()`` on dispatch steps; per step it is the work-weighted
  mean over sites.
* **reused**: fraction of query rows (× heads × batch) whose tiles were reused.
* **cache bytes**: what each site's streams hold now (``SiteStream.memory_bytes``).

Under context parallelism every rank has its own state, and so its own report: its sites' work (Ulysses:
the heads it attends; ring: its queries) and the caches it holds (its rows of each GEMM-O input and
output); ``cp`` says which rank of how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .schedule import config_action


@dataclass
class Report:
    sites: List[dict] = field(default_factory=list)
    steps: List[dict] = field(default_factory=list)
    memory_bytes: int = 0
    blocks: List[dict] = field(default_factory=list)
    """Per transformer block (block caching on): streams found, cacheable or why not, region runs,
    cached dispatch steps (skipped, over all CFG streams), cache bytes."""

    def density(self) -> float:
        """Work-weighted attention density over every step (the attention of a block that block caching
        skipped counts as work not done)."""
        w = sum(s["work"] for s in self.steps)
        return sum(s["density"] * s["work"] for s in self.steps) / w if w else 1.0

    @property
    def cp(self) -> Optional[dict]:
        """``{"mode", "size", "rank"}`` of the first context-parallel site, None without parallelism."""
        return next(({k: s["cp"][k] for k in ("mode", "size", "rank")} for s in self.sites if s.get("cp")), None)

    def format(self, max_steps: int = 60) -> str:
        lines = []
        if self.cp:
            lines.append(f"context parallel ({self.cp['mode']}): rank {self.cp['rank']} of {self.cp['size']}; "
                         "densities and caches of this rank")
        lines.append("site                                      kind   upd  disp dense  density  reused  cache MiB")
        for s in self.sites:
            c = s["counts"]
            lines.append(
                f"{s['name'][:41]:41s} {s['kind']:6s} {c['update']:4d} {c['dispatch']:5d} {c['dense']:5d}"
                f"  {s['density']:7.3f}  {s['reused']:6.3f}  {s['cache_bytes'] / 2**20:9.3f}"
                + (f"  ({s['note']})" if s.get("note") else "")
            )
        lines.append("")
        lines.append("gen step stream action     density  reused  in cached blocks")
        for s in self.steps[:max_steps]:
            lines.append(f"{s['generation']:3d} {s['step']:4d} {s['stream']:6d} {s['action']:9s}  {s['density']:7.3f}  "
                         f"{s['reused']:6.3f}  {s.get('cached', 0.0):6.3f}")
        if len(self.steps) > max_steps:
            lines.append(f"... {len(self.steps) - max_steps} more steps")
        if self.blocks:
            lines.append("")
            lines.append("block                                     streams  runs  cached  cache MiB")
            for b in self.blocks:
                lines.append(f"{b['name'][:41]:41s} {b['streams']:7d} {b['runs']:5d} {b['cached_steps']:7d}"
                             f"  {b['cache_bytes'] / 2**20:9.3f}" + (f"  ({b['reason']})" if b.get("reason") else ""))
        lines.append(f"cache memory: {self.memory_bytes / 2**20:.3f} MiB; overall density {self.density():.3f}")
        return "\n".join(lines)

    __str__ = format


def build_report(state) -> Report:
    memo: Dict[int, tuple] = {}

    def figures(sym):
        hit = memo.get(id(sym))
        if hit is None:
            hit = memo[id(sym)] = (sym.density(), sym.reuse_fraction())
        return hit

    per_site: Dict[int, list] = {}
    per_step: Dict[tuple, list] = {}
    for r in state.history:
        d, u = (1.0, 0.0) if r.action != "dispatch" else figures(r.symbols)
        per_site.setdefault(r.site_id, []).append((d, u, r.work, r.action))
        per_step.setdefault((r.generation, r.step, r.stream), []).append((d, u, r.work, r.action))

    rep = Report(memory_bytes=state.memory_bytes())
    for s in state.sites:
        rows = per_site.get(s.site_id, [])
        w = sum(x[2] for x in rows)
        counts = {"dense": 0, "update": 0, "dispatch": 0}
        for x in rows:
            counts[x[3]] += 1
        rep.sites.append({
            "name": s.name, "kind": s.kind, "site_id": s.site_id, "rewritten": s.rewritten,
            "gemm_q": s.gemm_q, "gemm_o": s.gemm_o, "counts": counts,
            "density": sum(x[0] * x[2] for x in rows) / w if w else 1.0,
            "reused": sum(x[1] * x[2] for x in rows) / w if w else 0.0,
            "cache_bytes": sum(st.memory_bytes() for st in s.streams.values()),
            "streams": len(s.streams),
            "note": s.reason if not s.rewritten else s.runtime_reason,
            "cp": s.cp,
        })
    for b in getattr(state, "blocks", []):
        rep.blocks.append({
            "name": b.name, "block_id": b.block_id, "streams": b.streams_found, "cacheable": b.cacheable,
            "reason": b.reason, "runs": b.region_calls, "cached_steps": b.skipped_calls,
            "cache_bytes": sum(bs.memory_bytes() for bs in b.streams.values()),
        })
    # Sites inside a block that block caching skipped record nothing on that step: their attention work is
    # the step's full work (the most any step of that stream recorded) less what was recorded, done at
    # density 0; a step on which every block was cached records nothing at all and still counts.
    full: Dict[tuple, int] = {}
    for (g, _, stream), rows in per_step.items():
        full[(g, stream)] = max(full.get((g, stream), 0), sum(x[2] for x in rows))
    if getattr(state, "blocks", None):
        for g, stream in list(full):
            last = max(k[1] for k in per_step if k[0] == g)
            if state.clock.generation == g:
                last = max(last, state.clock.step)
            for step in range(last + 1):
                per_step.setdefault((g, step, stream), [])
    for key in sorted(per_step):
        rows = per_step[key]
        w = sum(x[2] for x in rows)
        total = max(full.get((key[0], key[2]), 0), w)
        acts = {x[3] for x in rows}
        if not rows:
            action = config_action(state.config, key[1])
        else:
            action = acts.pop() if len(acts) == 1 else "mixed"
        rep.steps.append({
            "generation": key[0], "step": key[1], "stream": key[2], "action": action, "work": total,
            "density": sum(x[0] * x[2] for x in rows) / total if total else 1.0,
            "reused": sum(x[1] * x[2] for x in rows) / total if total else 0.0,
            "sites": len(rows),
            "cached": (total - w) / total if total else 0.0,
        })
    return rep
