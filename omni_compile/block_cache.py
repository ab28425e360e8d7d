"""Whole-block caching with Taylor forecasting: the caching rules (``OmniConfig.block_cache``), the block
records and the host-side runner of a graph split at block borders.

Rules (one small frozen dataclass each, validated at construction):

* :class:`FixedBlocks` ``(fraction)``: evenly spaced blocks, blind to content (controlled work);
* :class:`ComputedShare` ``(s_q)``: the paper's S_q fallback, blocks whose attention sites compute little;
* :class:`ResidualChange` ``(threshold)``: blocks whose residual barely changes between updates (the
  default rule of ``OmniConfig``).

When ``OmniConfig.block_cache`` is set the backend (after the attention-site passes) splits
Dynamo's graph into regions — prologue, one region per transformer block, glue, epilogue
(``passes.blocks``) — compiles each region (Inductor, or FX with ``use_inductor=False``) and returns a
:class:`BlockProgram` that runs them in order. The prologue holds ``flashomni::step_clock``, so once it has
run the host knows this call's ``(generation, step, stream)`` (``state.clock.position``) without reading
anything from the device. Then, per block region and CFG stream:

* **dense** (warm-up) steps run the block; the last ``taylor_order`` of them (at least one for
  :class:`ResidualChange`) record the residual ``r = output − input`` of each residual stream;
* **update** steps run the block, refresh the Taylor factors of ``r`` (``taylor.refresh``) and decide the
  block's *cache bit* for the following dispatch steps with the rule;
* **dispatch** steps skip the region entirely when the bit is set — each output is
  ``input + taylor.forecast(factors, steps since the update)`` — and run it otherwise (its site ops then
  use their own sparse symbols as usual).

The bit is a Python bool per (block, stream): dispatch steps read nothing from the device. Rules that
look at device values (:class:`ComputedShare`, :class:`ResidualChange`) queue their comparisons during the update call and read all
of them back at its end in one transfer (one host sync per update call).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import fx

from . import taylor
from .ops.symbols import unpack_bits
from .passes import blocks as PB
from .passes.classify import timestep_input
from .passes.rewrite import insert_clock
from .schedule import DENSE, DISPATCH, UPDATE, place_stream

log = logging.getLogger("omni_compile")


# ---- the rules ------------------------------------------------------------------------------------


def _fraction(owner: str, name: str, v) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{owner}.{name} must be a number from 0 to 1, got {v!r}")


@dataclass(frozen=True)
class FixedBlocks:
    """Cache ``round(fraction · n)`` of the graph's ``n`` blocks on dispatch steps, at evenly spaced
    positions ``floor((j + 0.5) · n / k)``, whatever the content: controlled work for benchmarks. Higher is
    faster and less exact. The cached blocks run only on full steps, and their sites then run dense (they
    never dispatch, so they build no symbols or caches)."""

    fraction: float = 0.5
    """Fraction of the blocks cached, from 0 to 1."""

    name = "fixed"

    def __post_init__(self):
        _fraction("FixedBlocks", "fraction", self.fraction)


@dataclass(frozen=True)
class ComputedShare:
    """The paper's S_q fallback: a block is cached until the next update when every attention site in it
    computes at most ``s_q`` of its (query block, head) tiles on dispatch steps (needs a sparse ``policy``
    to have anything to measure). Costs one host read per update call (all blocks' figures in one
    transfer)."""

    s_q: float = 0.3
    """Largest computed share of a block's sites for it to be cached (the paper's 30 %), from 0 to 1; higher
    caches more blocks."""

    name = "sq"

    def __post_init__(self):
        _fraction("ComputedShare", "s_q", self.s_q)


@dataclass(frozen=True)
class ResidualChange:
    """A block is cached until the next update when the relative L1 change of its residual contribution,
    ``mean|r_new − r_old| / mean|r_old|`` per step between its last two observations, is at most
    ``threshold`` (first-block / TeaCache spirit). Costs one host read per update call."""

    threshold: float = 0.1
    """Largest relative change per step for a block to be cached, a finite number, 0 or more; higher caches
    more blocks (faster, staler). On the learned zoo model (28 steps) the blocks change by 0.057–0.10 per
    step between the updates of steps 7–22 and by 0.12–0.36 at the last: 0.1 caches 95 % of the dispatch
    steps' block-steps; 0.05 caches none. Fewer steps mean larger changes per step, so less caching."""

    name = "change"

    def __post_init__(self):
        t = self.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (math.isfinite(t) and t >= 0):
            raise ValueError(f"ResidualChange.threshold must be a finite number, 0 or more, got {t!r}")


#: The rules by the short names ``OmniConfig(block_cache=...)`` accepts.
BLOCK_CACHES = {"fixed": FixedBlocks, "sq": ComputedShare, "change": ResidualChange}


def resolve_block_cache(spec):
    """The rule object ``spec`` names: None (or ``"none"``) for no block caching, a name of
    :data:`BLOCK_CACHES` for that rule with its defaults, or a rule object itself."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, str):
        if spec not in BLOCK_CACHES:
            raise ValueError(f"OmniConfig.block_cache must be None, one of {tuple(BLOCK_CACHES)} or a rule object "
                             f"(FixedBlocks, ComputedShare, ResidualChange), got {spec!r}")
        return BLOCK_CACHES[spec]()
    if isinstance(spec, tuple(BLOCK_CACHES.values())):
        return spec
    raise ValueError(f"OmniConfig.block_cache must be None, one of {tuple(BLOCK_CACHES)} or a rule object "
                     f"(FixedBlocks, ComputedShare, ResidualChange), got {spec!r}")


@dataclass
class BlockStream:
    """Run-time state of one block for one CFG stream (and one input shape): cache bit and residual factors."""

    key: tuple
    generation: int = -1
    step: int = -1
    action: str = DENSE
    cached: Optional[bool] = None
    """The cache bit: skip on dispatch steps (decided on the last update; None before the first)."""
    factors: Optional[list] = None
    """Per residual stream, the Taylor factors ``[f_0, …]`` of ``output − input``."""
    obs_step: Optional[int] = None
    """Step of the last observation of the residuals."""
    update_step: Optional[int] = None
    capped: bool = False
    """The memory cap denied this stream its cache at the last update (the block then runs)."""
    change: Optional[float] = None
    """Relative L1 change per step of the residual at the last update (policy ``"change"``)."""
    computed: Optional[float] = None
    """Largest computed fraction of (query block, head) tiles among the block's sites (policy ``"sq"``)."""
    counts: dict = field(default_factory=lambda: {"dense": 0, "update": 0, "dispatch": 0})
    skipped: int = 0
    """Dispatch steps on which the block did not run (forecast instead)."""

    def clear(self) -> None:
        self.cached = None
        self.factors = None
        self.obs_step = self.update_step = None
        self.capped = False
        self.change = self.computed = None
        self.counts = {"dense": 0, "update": 0, "dispatch": 0}
        self.skipped = 0

    def tensors(self) -> list:
        return [f for fs in (self.factors or []) for f in fs]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class BlockRecord:
    """One transformer block of a compiled graph: what the pass found and its run-time state."""

    name: str
    """Module path (``transformer_blocks.3``)."""
    order: int = 0
    """Position among the blocks of its graph (execution order)."""
    of: int = 0
    """Number of blocks in its graph."""
    streams_found: int = 0
    """Residual streams paired (FLUX/SD3/HunyuanVideo double blocks: 2; single-stream blocks: 1 or 2)."""
    cacheable: bool = False
    reason: Optional[str] = None
    """Why the block is never cached (None when it can be)."""
    site_ids: list = field(default_factory=list)
    """Attention sites inside the block (their ids in the state)."""
    pairs: list = field(default_factory=list)
    """``(output, input)`` node names of the residual streams in the graph (``passes.blocks.Block.streams``)."""
    paired_by: list = field(default_factory=list)
    """How each pair was found: ``"trace"`` (along the residual adds) or ``"shape"`` (the fallback)."""
    block_id: int = -1
    # ---- run-time ----
    region_calls: int = 0
    """Times the block's compiled region ran."""
    skipped_calls: int = 0
    """Times it was skipped (forecast instead), over all streams."""
    streams: dict = field(default_factory=dict)
    """``(stream, input shapes) -> BlockStream``."""

    def reset(self) -> None:
        self.region_calls = self.skipped_calls = 0
        self.streams = {}

    def adopt(self, old: "BlockRecord") -> None:
        self.region_calls, self.skipped_calls, self.streams = old.region_calls, old.skipped_calls, old.streams

    def __repr__(self) -> str:
        status = f"{self.streams_found} stream(s), cacheable" if self.cacheable else f"uncached ({self.reason})"
        return f"<block {self.block_id} {self.name}: {status}>"


# ---- what the rules compute ------------------------------------------------------------------------


def fixed_selection(n: int, fraction: float) -> List[int]:
    """The ``round(fraction · n)`` evenly spaced block positions ``floor((j + 0.5) · n / k)`` (sorted)."""
    return sorted(_fixed_set(n, fraction))


@functools.lru_cache(maxsize=64)
def _fixed_set(n: int, fraction: float) -> frozenset:
    """:func:`fixed_selection` as a set, made once per ``(n, fraction)``: the runner asks per block and call."""
    k = int(round(fraction * n))
    return frozenset(int((j + 0.5) * n / k) for j in range(k)) if k > 0 else frozenset()


def _computed_fraction(sym) -> torch.Tensor:
    """Fraction of (batch item, head, query block) entries a site computes (device tensor, no sync)."""
    reuse = unpack_bits(sym.reuse_bits, sym.num_q_blocks)
    return 1.0 - reuse.float().mean()


# ---- the runner -----------------------------------------------------------------------------------


class _Ref:
    """A value of the original graph, by node name, inside the program's output structure."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class BlockProgram:
    """Runs a graph split at block borders (``passes.blocks.SplitGraph``), skipping cached blocks."""

    def __init__(self, state, split, records: Dict[int, BlockRecord], compile_region, entry: dict):
        self.state = state
        self.split = split
        self.records = records  # region index -> BlockRecord
        self.compile_region = compile_region
        self.compiled: List[Optional[object]] = [None] * len(split.regions)
        self.entry = entry
        self._pending: list = []
        self.output = fx.node.map_aggregate(split.output, lambda n: _Ref(n.name) if isinstance(n, fx.Node) else n)

    # ---- one model call ----
    def __call__(self, *args):
        st = self.state
        env = dict(zip(self.split.placeholders, args))
        ticks, placed = st.clock.ticks, st._hook_tick  # placed: a runner or a hook placed the call already
        self._pending = []
        pos = None
        for r, region in enumerate(self.split.regions):
            rec = self.records.get(r)
            vals = [env[n] for n in region.inputs]
            if rec is None or not rec.cacheable or pos is None:
                outs = self._run(r, vals)
                if rec is not None:
                    rec.region_calls += 1
            else:
                self._run_block(r, region, rec, pos, vals, env)
                outs = None
            if outs is not None:
                env.update(zip(region.outputs, outs))
            for n in region.release:
                env.pop(n, None)
            if r == 0 and (st.clock.ticks != ticks or placed):
                pos = st.clock.position  # the call is placed (by the prologue's clock, or before): blocks may be cached
        if self._pending:
            self._resolve()
        return fx.node.map_aggregate(self.output, lambda n: env[n.name] if isinstance(n, _Ref) else n)

    def _run(self, r: int, vals: list):
        fn = self.compiled[r]
        if fn is None:
            t0 = time.perf_counter()
            fn = self.compiled[r] = self.compile_region(self.split.regions[r].module, vals)
            dt = time.perf_counter() - t0
            self.entry["compile_seconds"] = self.entry.get("compile_seconds", 0.0) + dt
            self.entry.setdefault("region_compile_seconds", []).append(round(dt, 3))
            self.entry["regions_compiled"] = self.entry.get("regions_compiled", 0) + 1
        return fn(*vals)

    def _stream(self, rec: BlockRecord, region, pos, env) -> BlockStream:
        shapes = tuple(tuple(env[i.name].shape) for _, i in region.block.streams)
        return place_stream(rec.streams, (pos.stream, shapes), BlockStream, pos, self.state.config,
                            ready=lambda bs: bs.cached is not None)

    def _run_block(self, r: int, region, rec: BlockRecord, pos, vals: list, env: dict) -> None:
        cfg = self.state.config
        blk = region.block
        bs = self._stream(rec, region, pos, env)
        if bs.action == DISPATCH and bs.cached:
            x = pos.step - bs.update_step
            for (o, i), fs in zip(blk.streams, bs.factors):
                inp = env[i.name]
                coefs = self.state.step_coefs(inp.device) if self.state.in_graph_mode else x
                env[o.name] = taylor.forecast(fs, coefs, inp.dtype, base=inp)
            bs.skipped += 1
            rec.skipped_calls += 1
            return
        rule = cfg.block_cache
        fixed_cached = isinstance(rule, FixedBlocks) and rec.order in _fixed_set(rec.of, rule.fraction)
        # A block the fixed rule caches runs only on full steps (warm-up, updates): its sites would build
        # symbols and caches there for dispatch steps on which they never run. They run dense instead.
        # (The "sq" and "change" rules decide after the block ran, from what its sites built.)
        passive = fixed_cached and bs.action != DISPATCH
        if passive:
            self.state.passive_sites = frozenset(rec.site_ids)
        try:
            if torch.autograd.profiler._is_profiler_enabled:  # label the block for profiles (benchmarks)
                with torch.profiler.record_function(f"flashomni::block {rec.name}"):
                    outs = self._run(r, vals)
            else:
                outs = self._run(r, vals)
        finally:
            if passive:
                self.state.passive_sites = frozenset()
        rec.region_calls += 1
        env.update(zip(region.outputs, outs))
        if isinstance(rule, FixedBlocks) and not fixed_cached:
            if bs.action == UPDATE:  # never cached: keep no residuals
                bs.cached, bs.update_step = False, bs.step
            return
        if bs.action == UPDATE:
            self._observe(rec, bs, blk, env, update=True)
            self._decide(rec, bs, pos)
        elif bs.action == DENSE and self._observe_dense(bs.step):
            self._observe(rec, bs, blk, env, update=False)

    def _observe_dense(self, step: int) -> bool:
        cfg = self.state.config
        window = max(cfg.taylor_order, 1 if isinstance(cfg.block_cache, ResidualChange) else 0)
        # the last warm-up steps only: the final dense steps (OmniConfig.final_dense) come after the last
        # update, with no dispatch step left to forecast for
        return window > 0 and cfg.warmup - 1 - window <= step < cfg.warmup - 1

    def _observe(self, rec: BlockRecord, bs: BlockStream, blk, env: dict, update: bool) -> None:
        st, cfg = self.state, self.state.config
        D = cfg.taylor_order
        # (output, input) per residual stream: the residual output − input is taken inside the refresh, in
        # fp32 per element and rounded once to the storage dtype (the output's)
        res = [(env[o.name], env[i.name]) for o, i in blk.streams]
        keep = D + 1 if update else max(D, 1)
        # warm-up observations reserve what the update will hold, so blocks keep their cache in run order
        need = sum(out.numel() * (D + 1) * out.dtype.itemsize for out, _ in res)
        cap = cfg.max_cache_bytes
        if cap is not None and st.memory_bytes() - bs.memory_bytes() + need > cap:
            bs.factors, bs.obs_step = None, None
            bs.capped = update
            if update:
                bs.change = None
            return
        bs.capped = False
        delta = 0 if bs.obs_step is None or bs.factors is None else bs.step - bs.obs_step
        old = bs.factors
        new = []
        for j, (out, inp) in enumerate(res):
            new.append(taylor.refresh(None if old is None or delta == 0 else old[j], out, delta, D, keep=keep, sub=inp))
        if update and isinstance(cfg.block_cache, ResidualChange):
            bs.change = None
            if old is not None and delta > 0:
                # the new residual is the refreshed f_0 (output − input, rounded once): not taken again
                num = sum((n[0] - f[0].to(n[0].dtype)).abs().sum() for n, f in zip(new, old))
                den = sum(f[0].to(n[0].dtype).abs().sum() for n, f in zip(new, old))
                self._pending.append(("change", bs, num / den.clamp_min(1e-30) / delta))
        bs.factors, bs.obs_step = new, bs.step
        if update:
            bs.update_step = bs.step

    def _decide(self, rec: BlockRecord, bs: BlockStream, pos) -> None:
        cfg = self.state.config
        bs.cached = False
        if bs.capped or bs.factors is None:
            return
        if isinstance(cfg.block_cache, FixedBlocks):
            # _run_block returned before this for the blocks the rule does not pick; the sites of the ones
            # it picks ran passive and built nothing to release
            bs.cached = True
        elif isinstance(cfg.block_cache, ComputedShare):
            fracs = []
            for sid in rec.site_ids:
                site = self.state.sites[sid]
                for key, ss in site.streams.items():
                    if key[0] == pos.stream and ss.update_step == pos.step and ss.symbols is not None:
                        fracs.append(_computed_fraction(ss.symbols))
            if fracs:
                self._pending.append(("sq", bs, torch.stack([f.float() for f in fracs]).max()))
        # ResidualChange: decided in _resolve from the value queued by _observe

    def _resolve(self) -> None:
        """Read every queued comparison back in one transfer (the update call's single extra sync)."""
        cfg = self.state.config
        dev = self._pending[0][2].device
        vals = torch.stack([v.float().reshape(()).to(dev) for _, _, v in self._pending]).tolist()
        self.state.block_host_reads = getattr(self.state, "block_host_reads", 0) + 1
        for (kind, bs, _), v in zip(self._pending, vals):
            if kind == "change":
                bs.change = v
                bs.cached = bool(v <= cfg.block_cache.threshold) and bs.factors is not None and not bs.capped
            else:
                bs.computed = v
                bs.cached = bool(v <= cfg.block_cache.s_q) and bs.factors is not None and not bs.capped
            if bs.cached:
                self._release_site_caches(self._record_of(bs), bs.key[0])
        self._pending = []

    def _record_of(self, bs: BlockStream) -> BlockRecord:
        return next(r for r in self.records.values() if any(s is bs for s in r.streams.values()))

    def _release_site_caches(self, rec: BlockRecord, stream: int) -> None:
        """A block cached until its next update does not run its sites on the dispatch steps in between, so
        the caches those steps would read only hold memory: the GEMM-O cache-bias terms and the reused-row
        masks go (HunyuanVideo size: 0.4 of ~0.6 GB per site at Taylor order 1); the next update rebuilds
        them. The features the next update differences against stay (the GEMM-O input's factors, the
        attention output's factors), so a block that runs again forecasts at full order: dropping them made
        those sites forecast at order 0 for an interval, which on the zoo model took SSIM from 0.89 to 0.69
        with ``ResidualChange(0.07)`` over FlashOmni sites (docs/design.md, "Block caching"). Symbols stay
        (the ``"sq"`` rule reads them)."""
        for sid in rec.site_ids:
            for key, ss in self.state.sites[sid].streams.items():
                if key[0] == stream:
                    ss.reuse_rows = None
                    ss.bias_terms = {}


def build_program(gm: fx.GraphModule, state, records: list, compile_region, entry: dict, ops=None):
    """Find the blocks of ``gm`` (after the site passes), split it and return a :class:`BlockProgram`;
    None (with ``entry["blocks_reason"]``) when the graph has no block or no step clock."""
    blocks = PB.find_blocks(gm)
    if not blocks:
        entry["blocks_reason"] = "no transformer blocks found"
        log.debug("flashomni: %s", entry["blocks_reason"])
        return None
    clock = None
    if ops is not None and ops.clock is not None:
        clock = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.clock), None)
        if clock is None:  # no site was rewritten (e.g. attention=False): the blocks still need the step
            ts = timestep_input(gm)
            if ts is not None:
                clock = insert_clock(gm, ts, ops, state.id)
                gm.graph.lint()
                gm.recompile()
    if clock is None:
        entry["blocks_reason"] = "graph has no timestep input (no step clock): blocks not cached"
        log.debug("flashomni: %s", entry["blocks_reason"])
        return None
    split = PB.split_blocks(gm, blocks, keep=(clock,))
    if split.regions[0].block is not None:
        entry["blocks_reason"] = "the step clock is not in a prologue region"
        return None
    recs: Dict[int, BlockRecord] = {}
    for r, region in enumerate(split.regions):
        blk = region.block
        if blk is None:
            continue
        rec = BlockRecord(name=blk.name, order=blk.index, of=len(blocks), streams_found=len(blk.streams),
                          cacheable=blk.reject is None, reason=blk.reject,
                          pairs=[(o.name, i.name) for o, i in blk.streams], paired_by=list(blk.paired_by))
        rec.site_ids = [s.site_id for s in records if s.name.startswith(blk.name + ".")]
        recs[r] = state.register_block(rec)
    entry["blocks"] = len(blocks)
    entry["blocks_cacheable"] = sum(b.reject is None for b in blocks)
    entry["regions"] = len(split.regions)
    return BlockProgram(state, split, recs, compile_region, entry)
