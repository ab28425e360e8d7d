"""Speed at a quality budget: what a generation did (:func:`trace`), what it costs (:class:`WorkModel`,
:class:`MeasuredCost`), and a search for the fastest setting whose output stays within a budget of the
dense output (:func:`tune`).

    import omni_compile
    result = omni_compile.tune(transformer, generate, calibration_inputs, budget=omni_compile.Budget(psnr=30))
    result.config          # an OmniConfig: the fastest setting found inside the budget
    print(result.report)   # every setting tried: quality, predicted loop cost, the front, the search cost

``generate(model, inp)`` runs one whole generation (a denoising loop) of ``model`` on one calibration
input and returns its output (an image or latent tensor); ``model`` is the transformer, compiled by the
tuner with ``backend="flashomni"``, or the plain module for the dense reference. The tuner compiles once
and switches settings with ``OmniState.configure`` (no recompile), so one candidate costs one generation
per calibration input. docs/runtime.md, "Tuning", describes the search and its cost model.

Nothing here imports the benchmarks or the zoo model (the library's layering).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .schedule import DENSE, DISPATCH, UPDATE, step_action

# ---- what one generation did ---------------------------------------------------------------------


@dataclass
class SiteStep:
    """One attention site at one step of one generation (averaged over CFG streams)."""

    ran: float = 1.0
    """1 when the site ran, 0 when its block was cached (a fraction when streams differ)."""
    density: float = 1.0
    """Fraction of the dense attention work the call did (1 on dense and update steps)."""
    reuse: float = 0.0
    """Fraction of query rows whose tiles were reused."""
    reuse_vision: float = 0.0
    """Fraction of the vision query blocks reused (the policy's choice, independent of the text share)."""
    skip_vision: float = 0.0
    """Fraction of vision key blocks skipped by the computed vision query blocks."""


@dataclass
class Trace:
    """What the sites and blocks of one model did over one generation: per step its action and per site
    what the attention op ran. Made by :func:`trace` from an ``OmniState`` after the generation."""

    steps: int
    actions: List[str]
    sites: List[str]
    """Site names in execution order."""
    site_work: List[int]
    """Dense attention work of one call of each site (``B·H·Sq·Skv``): the weights of density averages."""
    site_block: List[Optional[int]]
    """Block position of each site (None: not in a cacheable block, or block caching off)."""
    cells: List[List[SiteStep]]
    """``cells[step][site]``."""
    blocks: int = 0
    """Blocks found (block caching on), else 0."""

    def attention_work(self, dispatch_only: bool = False) -> float:
        """Fraction of the dense loop's attention work done, cached blocks' sites counting 0."""
        done = total = 0.0
        for s, row in enumerate(self.cells):
            if dispatch_only and self.actions[s] != DISPATCH:
                continue
            for c, w in zip(row, self.site_work):
                done += w * c.ran * c.density
                total += w
        return done / total if total else 1.0

    def cached_share(self) -> float:
        """Share of (site, dispatch step) pairs whose block was cached (did not run)."""
        cells = [c for s, row in enumerate(self.cells) if self.actions[s] == DISPATCH for c in row]
        return sum(1.0 - c.ran for c in cells) / len(cells) if cells else 0.0

    def cycles(self) -> List[Tuple[int, List[SiteStep]]]:
        """``(update step, per-site figures over the dispatch steps that follow it)`` for every update
        followed by at least one dispatch step (:func:`mean_cell`: ``ran`` averaged, the rest over the steps
        the site ran)."""
        out, cur, rows = [], None, []

        def close():
            if cur is not None and rows:
                out.append((cur, [mean_cell([r[i] for r in rows]) for i in range(len(self.sites))]))

        for s, act in enumerate(self.actions):
            if act == UPDATE:
                close()
                cur, rows = s, []
            elif act == DISPATCH and cur is not None:
                rows.append(self.cells[s])
            elif act == DENSE:
                close()
                cur, rows = None, []
        close()
        return out

    def to_dict(self) -> dict:
        return dict(steps=self.steps, actions=self.actions, sites=self.sites, site_work=self.site_work,
                    site_block=self.site_block, blocks=self.blocks,
                    cells=[[dataclasses.astuple(c) for c in row] for row in self.cells])

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        cells = [[SiteStep(*c) for c in row] for row in d["cells"]]
        return cls(d["steps"], list(d["actions"]), list(d["sites"]), list(d["site_work"]), list(d["site_block"]),
                   cells, d.get("blocks", 0))

    @staticmethod
    def mean(traces: Sequence["Trace"]) -> "Trace":
        """The cell-wise :func:`mean_cell` of traces of the same schedule and sites (several generations,
        e.g. chunks of captions); the actions of the first."""
        t0 = traces[0]
        cells = [[mean_cell([t.cells[s][i] for t in traces]) for i in range(len(t0.sites))] for s in range(t0.steps)]
        return Trace(t0.steps, list(t0.actions), list(t0.sites), list(t0.site_work), list(t0.site_block), cells,
                     t0.blocks)


def mean_cell(cells: Sequence[SiteStep]) -> SiteStep:
    """``ran`` averaged over ``cells``; density, reuse and the vision figures averaged over the cells where
    the site ran (weighted by ``ran``), so a cached block's step does not dilute what its site did when it
    ran. A site that never ran keeps the dense figures."""
    ran = sum(c.ran for c in cells)
    if ran == 0:
        return SiteStep(ran=0.0)
    avg = {f.name: sum(getattr(c, f.name) * c.ran for c in cells) / ran for f in dataclasses.fields(SiteStep)
           if f.name != "ran"}
    return SiteStep(ran=ran / len(cells), **avg)


def _vision_figures(site, sym, block_q: int, block_kv: int) -> Tuple[float, float]:
    """(reused share of vision query blocks, skipped share of vision key blocks over computed vision rows)."""
    from .policies import block_text_mask

    reuse, skip = sym.to_dense()
    q_text = block_text_mask(site.segments, sym.seq_q, block_q, reuse.device)
    kv_text = block_text_mask(site.kv_segments or site.segments, sym.seq_kv, block_kv, reuse.device)
    vq, vk = ~q_text, ~kv_text
    nvq, nvk = int(vq.sum()), int(vk.sum())
    if nvq == 0:
        return 0.0, 0.0
    r = reuse[..., vq].float()
    reuse_v = float(r.mean())
    computed = ~reuse[..., vq]  # [B, H, nvq]
    if nvk == 0 or not bool(computed.any()):
        return reuse_v, 0.0
    sk = skip[:, :, vq][..., vk].float().sum(-1)  # [B, H, nvq]
    skip_v = float((sk * computed).sum() / (computed.sum() * nvk))
    return reuse_v, skip_v


def trace(state, generation: Optional[int] = None) -> Trace:
    """The :class:`Trace` of one generation (default: the latest) from ``state.history`` (the symbols each
    attention call ran with) and the block records. Reads symbols back to the host: call it after the
    generation, not inside the loop."""
    hist = state.history
    if not hist:
        raise ValueError("tune.trace: the state has no recorded step (run a generation first)")
    gen = hist[-1].generation if generation is None else generation
    recs = [r for r in hist if r.generation == gen]
    cfg = state.config
    sites = [s for s in state.sites if s.rewritten]
    index = {s.site_id: i for i, s in enumerate(sites)}
    steps = max(r.step for r in recs) + 1
    if state.clock.generation == gen:  # the latest generation: its last call, also when no site ran then
        steps = max(steps, state.clock.step + 1)
    block_of = {}
    for b in getattr(state, "blocks", []) or []:
        if b.cacheable:
            for sid in b.site_ids:
                block_of[sid] = b.order
    work = [0] * len(sites)
    acc: Dict[Tuple[int, int], List[tuple]] = {}
    memo: dict = {}
    streams = {r.stream for r in recs}
    for r in recs:
        i = index.get(r.site_id)
        if i is None:
            continue
        work[i] = max(work[i], r.work)
        if r.action == DISPATCH:
            key = id(r.symbols)
            fig = memo.get(key)
            if fig is None:
                site = sites[i]
                rv, sv = _vision_figures(site, r.symbols, cfg.block_q, cfg.block_kv)
                fig = memo[key] = (r.symbols.density(), r.symbols.reuse_fraction(), rv, sv, r.symbols)
            d, u, rv, sv = fig[:4]
        else:
            d, u, rv, sv = 1.0, 0.0, 0.0, 0.0
        acc.setdefault((r.step, i), []).append((d, u, rv, sv))
    # the schedule's actions: sites of policy "dense" record every step as dense, and a step on which every
    # block was cached records nothing
    actions = schedule(steps, cfg.warmup, cfg.interval, cfg.final_dense if cfg.steps else 0)
    cells = []
    n_streams = max(len(streams), 1)
    for s in range(steps):
        row = []
        for i in range(len(sites)):
            got = acc.get((s, i), [])
            if not got:
                row.append(SiteStep(ran=0.0, density=1.0, reuse=0.0))
                continue
            k = len(got)
            row.append(SiteStep(ran=k / n_streams, density=sum(g[0] for g in got) / k, reuse=sum(g[1] for g in got) / k,
                                reuse_vision=sum(g[2] for g in got) / k, skip_vision=sum(g[3] for g in got) / k))
        cells.append(row)
    return Trace(steps, actions, [s.name for s in sites], work, [block_of.get(s.site_id) for s in sites], cells,
                 len(getattr(state, "blocks", []) or []))


# ---- what a generation costs -----------------------------------------------------------------------


def schedule(steps: int, warmup: int, interval: int, final_dense: int = 0) -> List[str]:
    """The action of every step of a ``steps``-step generation (``schedule.step_action``)."""
    return [step_action(s, warmup, interval, steps, final_dense) for s in range(steps)]


@dataclass(frozen=True)
class WorkModel:
    """A step's cost from the work it does, in units of one dense step of a model whose dense step splits
    into ``attention`` (the attention kernels), ``projections`` (the q and output projections GEMM-Q and
    GEMM-O replace) and the rest, with ``outside`` of it outside the transformer blocks (embeddings, final
    layer). A dispatch step costs ``outside + Σ_blocks ran · (attention · density + projections · (1 −
    reuse) + rest) / blocks``; a dense step 1, an update step ``1 + update`` (pooled scores, policy, caches).
    ``dense_ms`` (one dense step of the rewritten graph) and ``baseline_ms`` (one step of the compiler's own
    dense graph, Inductor) turn the units into milliseconds and a speed-up. The ideal that memory-bound
    launches and host time do not reach (measured: 88–96 % of it, docs/benchmarks.md).

    For a model of another size than the one traced, ``text_share`` (text tokens / all tokens at that
    size) and ``blocks`` re-derive density and reuse from the policy's vision-block choices
    (:meth:`predict`)."""

    attention: float
    projections: float
    outside: float = 0.0
    update: float = 0.03
    dense_ms: float = 1.0
    baseline_ms: float = 1.0
    text_share: Optional[float] = None
    blocks: Optional[int] = None
    name: str = "work model"

    @classmethod
    def flux_h200(cls) -> "WorkModel":
        """FLUX.1-dev at 1024² (4,096 image + 512 text tokens, 57 blocks), bf16 on an H200: a dense step of
        the rewritten graph is 125.9 ms of kernels, attention 31.3, GEMM-Q + GEMM-O 14.5; blocks 122.6 of 123.5
        ms of the split graph; 132.6 ms a step against Inductor's 133.9; an update step +3 % (profiles in
        docs/results/2026-12_h200_flux_e2e.json and 2026-12_h200_flux_blocks_e2e.json)."""
        return cls(attention=31.3 / 125.9, projections=14.5 / 125.9, outside=1 - 122.6 / 123.5, update=0.03,
                   dense_ms=132.6, baseline_ms=133.9, text_share=512 / 4608, blocks=57, name="FLUX.1 1024² (H200 profile)")

    @classmethod
    def hunyuan_h200(cls) -> "WorkModel":
        """HunyuanVideo at 9×90×160 latents (32,400 video + 256 text tokens, 60 blocks), bf16 on an H200: a
        dense step of the rewritten graph is 2127.4 ms of kernels, attention 1431.6, GEMM-Q + GEMM-O 100.9;
        blocks 2134.3 of 2145.7 ms of the split graph; 2178.2 ms a step against Inductor's 2750.5 (the
        rewritten graph drops an all-true text mask); an update step +4 % (docs/results/2026-12_h200_hunyuan_e2e.json,
        2026-11_h100_hunyuan_blocks_e2e.json)."""
        return cls(attention=1431.6 / 2127.4, projections=100.9 / 2127.4, outside=1 - 2134.3 / 2145.7, update=0.04,
                   dense_ms=2178.2, baseline_ms=2750.5, text_share=256 / 32656, blocks=60,
                   name="HunyuanVideo 720p (H200 profile)")

    def site_cost(self, c: SiteStep, resize: bool) -> float:
        rest = 1.0 - self.outside - self.attention - self.projections
        if resize and self.text_share is not None:
            t = self.text_share
            density = t + (1 - t) * (1 - c.reuse_vision) * (t + (1 - t) * (1 - c.skip_vision))
            reuse = (1 - t) * c.reuse_vision
        else:
            density, reuse = c.density, c.reuse
        return c.ran * (self.attention * density + self.projections * (1 - reuse) + rest)

    def step_cost(self, action: str, cells: Sequence[SiteStep], resize: bool = False) -> float:
        if action == DENSE:
            return 1.0
        if action == UPDATE:
            return 1.0 + self.update
        return self.outside + sum(self.site_cost(c, resize) for c in cells) / max(len(cells), 1)

    def loop_cost(self, tr: Trace) -> float:
        """Cost of the traced generation itself, in dense steps (same model, same schedule)."""
        return sum(self.step_cost(a, row) for a, row in zip(tr.actions, tr.cells))

    def dense(self, steps: int) -> float:
        """Cost of a dense generation of ``steps`` steps (the unit: one dense step each)."""
        return float(steps)

    def __call__(self, tr: Trace, config=None) -> float:
        """The tuner's cost of a traced generation: on the traced model itself (:meth:`loop_cost`), or, for a
        model with a size of its own (``blocks``, ``text_share``), the traced choices at that size on the
        traced schedule."""
        if self.blocks is None and self.text_share is None:
            return self.loop_cost(tr)
        return self._resized_cost(tr, tr.actions)

    def predict(self, tr: Trace, steps: int, warmup: int, interval: int, final_dense: int = 0) -> dict:
        """The traced policy's choices replayed on this model's size and a ``steps``-step schedule: each
        dispatch step takes the per-site figures of the traced update cycle at the nearest point of the
        loop (by the update's step / steps), each of this model's ``blocks`` the figures of the traced
        site at the same depth, and density and reuse are re-derived at ``text_share`` from the vision
        choices. Returns ``cost`` (dense steps), ``ms`` and ``speedup`` over the baseline."""
        cost = self._resized_cost(tr, schedule(steps, warmup, interval, final_dense))
        ms = cost * self.dense_ms
        return dict(cost=cost, ms=ms, speedup=steps * self.baseline_ms / ms if ms else float("nan"))

    def _resized_cost(self, tr: Trace, acts: Sequence[str]) -> float:
        steps = len(acts)
        cyc = tr.cycles()
        n_src = len(tr.sites)
        n_dst = self.blocks or n_src
        depth = [min(n_src - 1, int((j + 0.5) * n_src / n_dst)) for j in range(n_dst)]
        cost, last_update = 0.0, None
        for s, a in enumerate(acts):
            if a == UPDATE:
                last_update = s
            if a != DISPATCH or not cyc:
                cost += self.step_cost(a, [])
                continue
            where = (last_update if last_update is not None else s) / steps
            _, figs = min(cyc, key=lambda c: abs(c[0] / tr.steps - where))
            cost += self.step_cost(a, [figs[d] for d in depth], resize=True)
        return cost


# ---- how close to the dense output -----------------------------------------------------------------


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: Optional[float] = None) -> float:
    """PSNR in dB over the whole tensor; the signal range is ``data_range`` (e.g. 1 for images in [0, 1]),
    by default the reference's peak-to-peak range."""
    ref = ref.float()
    mse = float(((x.float() - ref) ** 2).mean())
    rng = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    return float("inf") if mse == 0 else 10 * math.log10(rng * rng / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of images ``[N, C, H, W]`` (or ``[C, H, W]``) against ``ref``: an
    ``window x window`` Gaussian window (``sigma``), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with
    ``L = data_range``, statistics over valid window positions only (no padding), the SSIM map averaged
    over positions, then over channels and images. Computed in fp64 on the inputs' device."""
    x, ref = x.double(), ref.double()
    if x.shape != ref.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.dim() == 3:
        x, ref = x[None], ref[None]
    if x.dim() != 4:
        raise ValueError(f"ssim: needs images [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"ssim: images {h}x{w} are smaller than the {window}x{window} window")
    coords = torch.arange(window, dtype=torch.float64, device=x.device) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(ref * ref) - mu_y * mu_y
    sxy = blur(x * ref) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return float(smap.mean())


@dataclass(frozen=True)
class Budget:
    """The quality a setting must keep against the dense output, on the calibration inputs: PSNR (dB) at
    least ``psnr``, SSIM at least ``ssim`` (image outputs ``[N, C, H, W]`` or ``[C, H, W]`` in
    ``[0, data_range]``), and ``metric(output, dense_output)`` (a user function, higher is better) at least
    ``metric_min``. Judged on the mean over the calibration inputs, or on the worst one with
    ``worst=True``. ``data_range``: the PSNR/SSIM signal range; None takes each dense output's peak-to-peak
    range for PSNR and 1 for SSIM."""

    psnr: Optional[float] = None
    ssim: Optional[float] = None
    metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None
    metric_min: Optional[float] = None
    worst: bool = False
    data_range: Optional[float] = None

    def __post_init__(self):
        if self.psnr is None and self.ssim is None and self.metric is None:
            raise ValueError("Budget needs at least one of psnr, ssim, metric")
        if (self.metric is None) != (self.metric_min is None):
            raise ValueError("Budget.metric and Budget.metric_min go together")

    def measure(self, outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> dict:
        """``{"psnr": ..., "ssim": ..., "metric": ...}`` (the budgeted figures only) over the inputs."""
        agg = min if self.worst else (lambda v: sum(v) / len(v))
        got = {}
        if self.psnr is not None:
            got["psnr"] = agg([psnr(o, r, self.data_range) for o, r in zip(outs, refs)])
        if self.ssim is not None:
            got["ssim"] = agg([ssim(o, r, 1.0 if self.data_range is None else self.data_range)
                               for o, r in zip(outs, refs)])
        if self.metric is not None:
            got["metric"] = agg([float(self.metric(o, r)) for o, r in zip(outs, refs)])
        return got

    def holds(self, got: dict) -> bool:
        return ((self.psnr is None or got["psnr"] >= self.psnr) and (self.ssim is None or got["ssim"] >= self.ssim)
                and (self.metric is None or got["metric"] >= self.metric_min))

    def score(self, got: dict) -> float:
        """How far inside the budget (> 0) or outside (< 0), in units of each limit, the tightest figure."""
        parts = []
        if self.psnr is not None:
            parts.append((got["psnr"] - self.psnr) / 10.0 if math.isfinite(got["psnr"]) else 10.0)
        if self.ssim is not None:
            parts.append((got["ssim"] - self.ssim) / max(1 - self.ssim, 1e-3))
        if self.metric is not None:
            parts.append((got["metric"] - self.metric_min) / max(abs(self.metric_min), 1e-6))
        return min(parts)


# ---- the search space ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One knob of the search: ``field`` (``interval``, ``warmup``, ``tau_q``, ``tau_kv``, ``block_cache``,
    ``final_dense``, ``policy``) and its ``values`` ordered from the most exact to the fastest."""

    field: str
    values: tuple

    def __post_init__(self):
        if not self.values:
            raise ValueError(f"Axis {self.field!r} has no values")


def default_space(block_rules: Sequence = ("change",)) -> Tuple[Axis, ...]:
    """The default search space: the update interval, the warm-up, the attention sites' policy (dense, then
    FlashOmni from mild to aggressive thresholds), whole-block caching (``block_rules``: ``"change"``
    residual-change thresholds, ``"fixed"`` evenly spaced shares) and the final dense steps."""
    from .block_cache import FixedBlocks, ResidualChange
    from .policies import FlashOmni

    blocks: list = [None]
    for rule in block_rules:
        if rule == "fixed":
            blocks += [FixedBlocks(f) for f in (0.2, 0.4, 0.6, 0.8)]
        elif rule == "change":
            blocks += [ResidualChange(t) for t in (0.05, 0.07, 0.1, 0.15, 0.2, 0.3)]
        else:
            raise ValueError(f"default_space: block rule {rule!r} is not 'fixed' or 'change'")
    sites = ("dense", FlashOmni(tau_q=0.3, tau_kv=0.02), FlashOmni(tau_q=0.5, tau_kv=0.05),
             FlashOmni(tau_q=0.8, tau_kv=0.15))
    return (Axis("interval", (1, 2, 3, 4, 5, 6, 8, 10)), Axis("warmup", (10, 8, 6, 4, 3, 2)), Axis("policy", sites),
            Axis("block_cache", tuple(blocks)), Axis("final_dense", (2, 1, 0)))


def config_of(base, space: Sequence[Axis], point: Tuple[int, ...]):
    """The ``OmniConfig`` of a point (one value index per axis) on top of ``base``."""
    from .policies import FlashOmni, resolve_policy

    fields = {a.field: a.values[i] for a, i in zip(space, point)}
    pol = resolve_policy(fields.pop("policy", base.policy))
    tq, tkv = fields.pop("tau_q", None), fields.pop("tau_kv", None)
    if isinstance(pol, FlashOmni) and (tq is not None or tkv is not None):
        pol = dataclasses.replace(pol, tau_q=pol.tau_q if tq is None else tq, tau_kv=pol.tau_kv if tkv is None else tkv)
    return base.replace(policy=pol, **fields)


def nearest_point(base, space: Sequence[Axis]) -> Tuple[int, ...]:
    """The point of ``space`` nearest to ``base`` (each axis: the value equal to base's, else the closest
    number, else the first)."""
    from .policies import resolve_policy

    pol = resolve_policy(base.policy)
    out = []
    for a in space:
        cur = getattr(pol, a.field, None) if a.field in ("tau_q", "tau_kv") else getattr(base, a.field, None)
        if a.field == "policy":
            cur = pol
            idx = next((i for i, v in enumerate(a.values) if resolve_policy(v) == pol), None)
            out.append(0 if idx is None else idx)
            continue
        idx = next((i for i, v in enumerate(a.values) if v == cur), None)
        if idx is None and isinstance(cur, (int, float)):
            nums = [(abs(v - cur), i) for i, v in enumerate(a.values) if isinstance(v, (int, float))]
            idx = min(nums)[1] if nums else 0
        out.append(0 if idx is None else idx)
    return tuple(out)


# ---- the search ------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One setting the search ran: its point, config, quality figures, cost and whether it is inside the
    budget."""

    point: Tuple[int, ...]
    config: object
    quality: dict
    cost: float
    """Predicted (work model) or measured cost of one generation; the dense setting's is ``TuneReport.dense_cost``."""
    holds: bool
    seconds: float
    """Wall time of the trial's calibration runs (the search cost)."""
    work: float = 1.0
    """Fraction of the dense loop's attention work done (cached blocks' sites counting 0)."""


@dataclass
class TuneReport:
    trials: List[Trial]
    budget: Budget
    dense_cost: float
    default_index: int
    """The trial of the starting point (the base config)."""
    best_index: Optional[int]
    seconds: float
    """Wall time of the whole search (reference runs included)."""
    cost_model: str

    @property
    def best(self) -> Optional[Trial]:
        return None if self.best_index is None else self.trials[self.best_index]

    def speedup(self, t: Trial) -> float:
        return self.dense_cost / t.cost if t.cost else float("nan")

    def front(self) -> List[Trial]:
        """The trials no other trial beats on both cost and quality (by :meth:`Budget.score`), cheapest first."""
        pts = sorted(self.trials, key=lambda t: (t.cost, -self.budget.score(t.quality)))
        out, best_q = [], -math.inf
        for t in pts:
            q = self.budget.score(t.quality)
            if q > best_q:
                out.append(t)
                best_q = q
        return out

    def plot(self, width: int = 64, height: int = 16) -> str:
        """A text plot of the trials: speed-up over dense (x) against the budget's first figure (y);
        ``*`` on the front, ``o`` elsewhere, ``S`` the starting point, ``B`` the chosen setting, and the
        budget as a row of ``-``."""
        key = "psnr" if self.budget.psnr is not None else ("ssim" if self.budget.ssim is not None else "metric")
        limit = {"psnr": self.budget.psnr, "ssim": self.budget.ssim, "metric": self.budget.metric_min}[key]
        pts = [(self.speedup(t), t.quality[key]) for t in self.trials]
        ys = [y for _, y in pts if math.isfinite(y)] + [limit]
        xs = [x for x, _ in pts if math.isfinite(x)]
        if not xs:
            return "(nothing to plot)"
        x0, x1 = min(xs + [1.0]), max(xs) * 1.02 + 1e-9
        y0, y1 = min(ys), max(ys) + 1e-9
        grid = [[" "] * width for _ in range(height)]

        def px(x, y):
            y = y if math.isfinite(y) else y1
            return (min(width - 1, int((x - x0) / (x1 - x0) * (width - 1))),
                    min(height - 1, int((y1 - y) / (y1 - y0) * (height - 1))))

        _, ly = px(x0, limit)
        for c in range(width):
            grid[ly][c] = "-"
        front = {id(t) for t in self.front()}
        for i, (t, (x, y)) in enumerate(zip(self.trials, pts)):
            c, r = px(x, y)
            mark = "B" if i == self.best_index else ("S" if i == self.default_index else ("*" if id(t) in front else "o"))
            if grid[r][c] not in "BS":
                grid[r][c] = mark
        lines = [f"{key} {y1:8.2f} |" + "".join(grid[0])]
        lines += ["               |" + "".join(row) for row in grid[1:-1]]
        lines.append(f"{key} {y0:8.2f} |" + "".join(grid[-1]))
        lines.append("               +" + "-" * width)
        lines.append(f"                {x0:<10.2f} speed-up over dense ({self.cost_model}) {x1:>10.2f}")
        return "\n".join(lines)

    def format(self) -> str:
        d = self.trials[self.default_index]
        rows = [f"{len(self.trials)} settings tried in {self.seconds:.0f} s (cost model: {self.cost_model}); budget "
                + ", ".join(f"{k} >= {v}" for k, v in (("psnr", self.budget.psnr), ("ssim", self.budget.ssim),
                                                       ("metric", self.budget.metric_min)) if v is not None)
                + (" (worst input)" if self.budget.worst else " (mean over inputs)")]
        for i, t in enumerate(self.trials):
            tag = "best" if i == self.best_index else ("start" if i == self.default_index else "")
            q = ", ".join(f"{k} {v:.3f}" for k, v in t.quality.items())
            rows.append(f"{tag:5s} {'in ' if t.holds else 'out'}  {self.speedup(t):5.2f}x  work {t.work:.3f}  {q}  "
                        f"[{describe(t.config)}]  {t.seconds:.0f} s")
        b = self.best
        if b is not None:
            rows.append(f"chosen: {self.speedup(b):.2f}x over dense, {self.speedup(b) / self.speedup(d):.2f}x over "
                        f"the starting point ({self.speedup(d):.2f}x)")
        else:
            rows.append("no setting tried holds the budget")
        return "\n".join(rows + ["", self.plot()])

    __str__ = format

    def to_dict(self) -> dict:
        def q(v):
            return v if math.isfinite(v) else str(v)

        return dict(budget={k: v for k, v in dataclasses.asdict(self.budget).items() if k != "metric"},
                    dense_cost=self.dense_cost, default_index=self.default_index, best_index=self.best_index,
                    seconds=self.seconds, cost_model=self.cost_model,
                    trials=[dict(point=list(t.point), config=describe(t.config), quality={k: q(v) for k, v in t.quality.items()},
                                 cost=t.cost, speedup=self.speedup(t), holds=t.holds, seconds=t.seconds, work=t.work)
                            for t in self.trials])


@dataclass
class TuneResult:
    config: object
    """The fastest setting tried inside the budget (the starting point when none was faster, the dense
    policy when none held)."""
    report: TuneReport


def describe(cfg) -> str:
    """The knobs the search moves, in a short line."""
    from .policies import resolve_policy

    parts = [repr(resolve_policy(cfg.policy)), f"interval {cfg.interval}", f"warmup {cfg.warmup}"]
    if cfg.block_cache is not None:
        parts.append(repr(cfg.block_cache))
    if cfg.final_dense:
        parts.append(f"final_dense {cfg.final_dense}")
    return ", ".join(parts)


class _CallTimer:
    """Wall time of every call of a module (synchronising CUDA around each): forward hooks."""

    def __init__(self, module):
        self.times: List[float] = []
        self._t0 = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def close(self):
        for h in self._handles:
            h.remove()


def tune(model, generate: Callable, inputs: Sequence, budget: Budget, *, base=None, space: Optional[Sequence[Axis]] = None,
         cost="measured", max_trials: int = 40, log: Callable[[str], None] = lambda s: None) -> TuneResult:
    """The fastest setting of ``space`` whose outputs on ``inputs`` stay within ``budget`` of the dense
    outputs (module docstring for ``generate``).

    ``base``: the ``OmniConfig`` the search starts from and keeps for every field ``space`` does not move
    (default: the zero-config default). ``cost``: ``"measured"`` (default: the wall time of the model calls
    of each candidate's calibration runs on this device, the first input's runs left out as Triton's
    compile warm-up when there are several) or a :class:`WorkModel` (the work each generation did, from its
    :func:`trace`, priced by the model's dense-step shares: no timing noise; ``WorkModel.flux_h200()`` prices
    a setting at FLUX.1 size). The search: the starting point, then rounds over the axes; on each axis the
    next faster value is tried and kept when it is inside the budget and cheaper; it stops when a round
    keeps nothing or after ``max_trials`` settings. A starting point outside the budget first walks towards
    exactness (the neighbour with the best quality) until it holds.
    """
    from .config import OmniConfig
    from .state import OmniState

    t_start = time.perf_counter()
    base = base or OmniConfig()
    space = tuple(space or default_space())
    inputs = list(inputs)
    if not inputs:
        raise ValueError("tune: needs at least one calibration input")
    refs = [generate(model, x) for x in inputs]
    blocks = next((v for a in space if a.field == "block_cache" for v in a.values if v is not None), None)
    state = OmniState(base.replace(policy="dense", block_cache=base.block_cache or blocks, final_dense=0))
    compiled = torch.compile(model, backend="flashomni", options={"state": state})
    timer = _CallTimer(compiled) if cost == "measured" else None

    # the loop's shape from a run on the timestep clock: steps and calls per step, for final_dense (this
    # first call compiles, split at block borders when the space caches blocks)
    state.configure(steps=None)
    generate(compiled, inputs[0])
    steps, streams = state.clock.step + 1, state.clock.stream + 1
    if any(a.field == "final_dense" for a in space) and base.steps is None:
        base = base.replace(steps=steps, streams=streams)

    def run(cfg) -> Tuple[list, float, List[Trace]]:
        state.configure(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                           if f.name not in ("attention", "gemm_q", "gemm_o", "use_inductor")})
        outs, traces, spent = [], [], []
        for x in inputs:
            if timer is not None:
                timer.times.clear()
            outs.append(generate(compiled, x))
            if timer is not None:
                spent.append(sum(timer.times))
            traces.append(trace(state))
        if timer is not None:
            c = sum(spent[1:]) / (len(spent) - 1) if len(spent) > 1 else spent[0]
        else:
            c = float(cost(Trace.mean(traces), cfg))
        return outs, c, traces

    dense_cfg = base.replace(policy="dense", block_cache=None, final_dense=0)
    _, dense_cost, _ = run(dense_cfg)
    if timer is None:
        dense_cost = float(cost.dense(steps))
    trials: List[Trial] = []
    seen: Dict[Tuple[int, ...], int] = {}
    by_config: Dict[str, int] = {}

    def evaluate(point) -> Trial:
        if point in seen:
            return trials[seen[point]]
        cfg = config_of(base, space, point)
        if repr(cfg) in by_config:  # another point of the same setting (a knob the setting does not read)
            seen[point] = by_config[repr(cfg)]
            return trials[seen[point]]
        t0 = time.perf_counter()
        outs, c, traces = run(cfg)
        got = budget.measure(outs, refs)
        t = Trial(point, cfg, got, c, budget.holds(got), time.perf_counter() - t0,
                  Trace.mean(traces).attention_work())
        seen[point] = by_config[repr(cfg)] = len(trials)
        trials.append(t)
        log(f"tune: {'in ' if t.holds else 'out'} {dense_cost / c:5.2f}x {got} [{describe(cfg)}] {t.seconds:.0f} s")
        return t

    start = nearest_point(base, space)
    cur = evaluate(start)
    default_index = seen[start]
    # outside the budget: walk towards exactness until it holds
    while not cur.holds and len(trials) < max_trials:
        nbrs = [p for p in _moves(cur.point, space, -1) if p not in seen]
        if not nbrs:
            break
        cands = [evaluate(p) for p in nbrs[: max_trials - len(trials)]]
        cur = max(cands, key=lambda t: (t.holds, -t.cost if t.holds else budget.score(t.quality)))
    improved = cur.holds
    while improved and len(trials) < max_trials:
        improved = False
        for p in _moves(cur.point, space, +1):
            if len(trials) >= max_trials:
                break
            t = evaluate(p)
            if t.holds and t.cost < cur.cost:
                cur, improved = t, True
    inside = [i for i, t in enumerate(trials) if t.holds]
    best_index = min(inside, key=lambda i: trials[i].cost) if inside else None
    if timer is not None:
        timer.close()
    report = TuneReport(trials, budget, dense_cost, default_index, best_index, time.perf_counter() - t_start,
                        "measured wall time" if timer is not None else getattr(cost, "name", type(cost).__name__))
    chosen = trials[best_index].config if best_index is not None else dense_cfg
    return TuneResult(chosen, report)


def _moves(point: Tuple[int, ...], space: Sequence[Axis], direction: int) -> List[Tuple[int, ...]]:
    """Points one step along each axis in ``direction`` (+1 faster, -1 more exact)."""
    out = []
    for k, a in enumerate(space):
        j = point[k] + direction
        if 0 <= j < len(a.values):
            out.append(point[:k] + (j,) + point[k + 1:])
    return out


class _CallableModule(types.ModuleType):
    """``omni_compile.tune`` is this module and, called, :func:`tune`: ``omni_compile.tune(...)`` and
    ``omni_compile.tune.Budget`` both work."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
