"""The site ops the passes rewrite into, and the update–dispatch runtime behind them.

Ops: ``flashomni::step_clock(timestep, state)`` (once per model call: places it in the denoising loop,
``omni_compile.schedule``), ``flashomni::site_attention``, ``site_linear_q``, ``site_linear_o``. Each is an
opaque op (schema + one Python kernel, :class:`_SiteOp`) taking plain tensors plus ``state`` / ``site`` ids and the clock's
output; at run time it finds the :class:`~omni_compile.state.SiteRecord`, the stream's
:class:`~omni_compile.state.SiteStream`, and what this step does. Every decision happens inside the ops,
so one compiled graph serves all steps (no recompiles) and per-site state never becomes a graph constant
(docs/design.md, "Runtime and clock").

What a site does at each step (``policy`` other than ``"dense"``; docs/runtime.md):

* **dense** (warm-up): everything computed; the last ``taylor_order`` warm-up steps record the features
  the first update's finite differences need.
* **update**: q, attention and output projection computed densely (the output is exact); the policy turns
  pooled scores into new symbols; caches refresh — Taylor factors of the GEMM-O input and, per order, the
  cache-bias term (the projection of that factor over the heads the new symbols reuse); or, for sites
  without GEMM-O, the Taylor factors of the attention output.
* **dispatch**: GEMM-Q skips reused tiles, attention skips reused tiles and skipped key blocks, GEMM-O
  reduces over computed heads and adds the forecast bias ``Σ_i term_i · x^i / i!`` (``x`` = steps since the
  update) — no dense projection pass; sites without GEMM-O fill reused tiles with the forecast attention
  output instead (the attention op returns zeros there).

Ordering within a site is carried by data: the clock feeds every site op; the q projection feeds the
attention, whose output feeds the output projection. So for one model call ``site_linear_q`` runs before
``site_attention`` (which builds the update step's symbols) and ``site_linear_o`` after it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cp, masks, taylor
from .ops import Symbols, pooled_scores, sparse_attention, sparse_linear_o, sparse_linear_q
from .ops.attention import heads_inner_empty
from .ops.linear_o import cache_bias_prechecked, sparse_linear_o_prechecked
from .policies import (PolicyFallback, PolicyInput, TokenLayout, block_means, block_text_mask, feature_change,
                       policy_symbols, resolve_policy)
from .schedule import DENSE, DISPATCH, UPDATE, place_stream
from .state import SiteRecord, SiteStream, StepRecord, get_state

# ---- op registration -----------------------------------------------------------------------------

_LIB = torch.library.Library("flashomni", "FRAGMENT")


class _SiteOp:
    """A ``flashomni::`` op defined from a schema with one Python kernel for every backend
    (``CompositeExplicitAutograd``) and a fake kernel, instead of ``torch.library.custom_op``.

    The site ops run once per site and model call, from the compiled graph, on the host: ``custom_op`` puts a
    Python autograd layer, a redispatch and an aliasing check in front of the kernel (~22 µs a call under
    ``no_grad`` on this repo's CPU, against ~3.6 µs through the C++ dispatcher straight to the kernel) —
    FLUX-size has 57 sites x 3 ops + the clock per step. The kernels are inference-only and return fresh
    tensors (never an input or a view of one), which is what the schema without alias annotations says."""

    def __init__(self, schema: str, fn):
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        self.name, self.fn = f"flashomni::{name}", fn
        self.__doc__ = fn.__doc__

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def register_fake(self, fake):
        torch.library.register_fake(self.name, fake, lib=_LIB)
        return fake


def site_op(schema: str):
    return lambda fn: _SiteOp(schema, fn)


# ---- the clock -----------------------------------------------------------------------------------


@site_op("step_clock(Tensor timestep, int state) -> Tensor")
def step_clock(timestep: torch.Tensor, state: int) -> torch.Tensor:
    """Place this model call in the denoising loop: from its timestep (one host read of one value, a
    device sync when the timestep is on the GPU), or with ``OmniConfig.steps`` set from call counts (no
    read; the timestep is checked once its copy reaches the host). Returns a token of zeros (``[3]``
    int64 on the timestep's device) that the site ops take as an input, so they run after it; it is
    filled on the device (a host-to-device copy from pageable memory would wait for the GPU as well)."""
    st = get_state(state)
    if st._hook_tick:  # the model's forward hook or the graph's runner placed this call already
        st._hook_tick = False
    else:
        st.place_call(timestep)
    return torch.zeros(3, dtype=torch.int64, device=timestep.device)


@step_clock.register_fake
def _(timestep, state):
    return timestep.new_empty(3, dtype=torch.int64)


# ---- where a site stands -------------------------------------------------------------------------

NO_CLOCK = ("no timestep reached the runtime (no compiled graph takes the model's timestep input), so steps "
            "and CFG streams cannot be told apart: sites run dense")
NO_CLOCK_HINT = ("Where only parts of the model are compiled (diffusers' compile_repeated_blocks), call "
                 "state.attach(model) so the model's calls place the steps (docs/runtime.md, \"Graphs, modules and shapes\").")
SHARED = ("one compiled site runs several modules and no weight tells them apart, so their caches would mix: "
          "dense")


def stream_for(state, site: SiteRecord, batch: int, seq_q: int) -> Optional[SiteStream]:
    """The site's stream state for the current model call, with this step's action decided (once per
    step; every op of the site in the call reads the same). None: run dense (policy ``"dense"``, no
    clock, or a site the runtime does not make sparse)."""
    cfg, policy = site_policy(state, site)
    if policy.name == "dense" or site.site_id in state.passive_sites:
        return None  # passive: inside a block that block caching skips on every dispatch step
    if site.shared:
        return None
    fell = _policy_fallbacks(state).get(site.site_id)
    if fell is not None:
        site.runtime_reason = fell
        site.streams.clear()  # drop what the failed update cached
        return None
    pos = state.clock.position
    if pos is None:
        site.runtime_reason = NO_CLOCK
        return None
    return place_stream(site.streams, (pos.stream, batch, seq_q), SiteStream, pos, cfg,
                        ready=lambda ss: ss.symbols is not None)


def _observe_on_dense_step(cfg, step: int) -> bool:
    """Warm-up steps whose features the first update's differences need (the last ``taylor_order``; not
    the final dense steps, after which nothing is forecast)."""
    return cfg.taylor_order > 0 and cfg.warmup - 1 - cfg.taylor_order <= step < cfg.warmup - 1


def _fits(state, ss: SiteStream, extra: int) -> bool:
    cap = state.config.max_cache_bytes
    return cap is None or state.memory_bytes() + extra <= cap


def _cache_estimate(state, site: SiteRecord, batch: int, heads: int, seq_q: int, head_dim: int, itemsize: int) -> int:
    """Upper bound of what a stream of this site holds after an update (caches, symbols excluded)."""
    D = state.config.taylor_order
    if site.gemm_o:
        heads = cp.head_offset(site.plan)[1]  # the GEMM-O input holds every head (Ulysses: of this rank's rows)
        total = 0
        for (ro, _), (rows, cout) in site.out_features.items():
            total += D * batch * rows * heads * head_dim * itemsize
            if not _no_bias_terms(state, site, ro, rows):
                total += (D + 1) * batch * rows * cout * itemsize
        return total
    return (D + 1) * batch * heads * seq_q * head_dim * itemsize + batch * heads * seq_q


def _layout(state, plan, device, kv_segments=None, seq_kv=None):
    """``(q_text [nQ], kv_text [nK], text query blocks, text key blocks)`` of a site, cached.
    ``kv_segments`` / ``seq_kv`` describe the keys actually attended when a mask dropped some (an item
    group of :func:`omni_compile.masks.analyse`)."""
    kv_segments = plan.kv_segments if kv_segments is None else kv_segments
    seq_kv = plan.seq_kv if seq_kv is None else seq_kv
    cache = state.__dict__.setdefault("_layouts", {})
    key = (plan.plan_id, str(device), state.config.block_q, state.config.block_kv, seq_kv, tuple(kv_segments))
    hit = cache.get(key)
    if hit is None:
        cfg = state.config
        # built on the host, so the text-block counts are read there, before the masks go to the device
        q_text = block_text_mask(plan.segments, plan.seq_q, cfg.block_q)
        kv_text = block_text_mask(kv_segments, seq_kv, cfg.block_kv)
        hit = cache[key] = (q_text.to(device), kv_text.to(device), int(q_text.sum()), int(kv_text.sum()))
    return hit


def _rows_all_text(site: SiteRecord, row_offset: int, rows: int) -> bool:
    covered = 0
    for m, a, b in site.segments:
        if m == "text":
            covered += max(0, min(b, row_offset + rows) - max(a, row_offset))
    return covered == rows


def _no_bias_terms(state, site: SiteRecord, row_offset: int, rows: int) -> bool:
    """A projection over text rows only needs no cache bias when the site's policy declares it never
    reuses text rows (``reuses_text`` False; the runtime clears such bits, ``policies.finalize``)."""
    _, policy = site_policy(state, site)
    return not policy.reuses_text and _rows_all_text(site, row_offset, rows)


def site_policy(state, site: SiteRecord):
    """``(effective OmniConfig, policy object)`` of a site: ``config.for_site(site.name)`` (per-site
    overrides) and its resolved policy, computed once per site and config (cached on the state)."""
    cache = state.__dict__.setdefault("_site_policies", {})
    hit = cache.get((site.site_id, site.name))
    if hit is None or hit[0] is not state.config:

        if hit is not None and hit[0] is not state.config:
            cache.clear()
            _policy_fallbacks(state).clear()
        cfg = state.config.for_site(site.name)
        hit = cache[(site.site_id, site.name)] = (state.config, cfg, resolve_policy(cfg.policy))
    return hit[1], hit[2]


def _policy_fallbacks(state) -> dict:
    """``site_id -> reason`` of sites whose policy raised ``PolicyFallback`` (dense until the config changes)."""
    return state.__dict__.setdefault("_policy_fallbacks", {})


def _token_layout(state, site: SiteRecord, cfg, kv_segments, seq_kv):
    """``(TokenLayout or None, reason)``: the vision tokens' grid (``OmniConfig.token_layout``, else what the
    passes inferred) placed on the site's query sequence (one contiguous vision segment of that size) and,
    for self/joint sites, on the keys actually attended."""

    grid = cfg.token_layout or site.token_layout
    if grid is None:
        return None, ("the passes could not infer it (no conv patch embedding in the graph: FLUX/LTX pack "
                      "latents before the transformer); give OmniConfig(token_layout=(frames, height, width))")
    f, h, w = grid
    vis = [(a, b) for m, a, b in site.segments if m == "vision"]
    if len(vis) != 1 or vis[0][1] - vis[0][0] != f * h * w:
        n = sum(b - a for a, b in vis)
        return None, (f"token layout {tuple(grid)} holds {f * h * w} tokens but the site's queries have {n} vision "
                      f"tokens in {len(vis)} segment(s)")
    start = vis[0][0]
    kv_start = start
    if site.kind != "cross" and kv_segments is not None:
        kvis = [(a, b) for m, a, b in kv_segments if m == "vision"]
        if len(kvis) != 1 or kvis[0][1] - kvis[0][0] != f * h * w:
            return None, "the attention mask drops vision keys, so the key grid is not the query grid"
        kv_start = kvis[0][0]
    return TokenLayout(f, h, w, start, kv_start), ""


def _observe_features(state, site: SiteRecord, ss, out, step: int) -> None:
    """Block means of the attention output on full steps, for policies that declare ``needs_features``
    (the last warm-up step and every update; the previous observation is kept to difference against)."""
    if ss is None:
        return
    cfg, policy = site_policy(state, site)
    if not policy.needs_features or (ss.action != UPDATE and step < cfg.warmup - 2):
        return

    ss.features_prev = ss.features
    ss.features = (step, block_means(out, cfg.block_q))


def make_symbols(state, site: SiteRecord, q, k, scale, step: int, timestep: float, allow_reuse: bool = True,
                 kv_segments=None, k_square=None):
    """Run the configured policy on an update step and pack its bits (``omni_compile.policy``).
    ``kv_segments``: the modality segments of ``k`` when it is not the site's full key sequence (keys
    dropped by a key-padding mask); ``k_square``: the full key sequence then, for the scores on the square
    (query block = key block) grid that joint/self metrics read."""


    cfg, policy = site_policy(state, site)
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    q_text, kv_text, n_text, n_text_kv = _layout(state, site.plan, q.device, kv_segments,
                                                 Skv if kv_segments is not None else None)
    scores = square = None
    if policy.needs_scores:
        scores = pooled_scores(q, k, cfg.block_q, cfg.block_kv, scale)
        if site.kind != "cross":
            if k_square is not None:
                square = pooled_scores(q, k_square, cfg.block_q, cfg.block_q, scale)
            else:
                square = scores if cfg.block_q == cfg.block_kv else pooled_scores(q, k, cfg.block_q, cfg.block_q, scale)
    layout, layout_reason = _token_layout(state, site, cfg, kv_segments, Skv)
    change = None
    if policy.needs_features:
        pos = state.clock.position
        ss = site.streams.get((pos.stream, B, Sq)) if pos is not None else None
        if ss is not None and ss.features is not None and ss.features_prev is not None:
            (s1, now), (s0, prev) = ss.features, ss.features_prev
            change = feature_change(now, prev, s1 - s0)
    h0, heads_total = cp.head_offset(site.plan)
    ring = cp.ring(site.plan)
    why = None
    if ring:
        # the policy sees every rank's queries, as without parallelism; this rank keeps its rows below
        why = cp.ring_rows(site.plan, cfg.block_q)
        if why is None:
            scores, square, change = cp.ring_gather(site.plan, scores, square, change)
            q_text, n_text, Sq = cp.ring_q_text(state, site.plan, q_text), n_text * site.cp["size"], Sq * site.cp["size"]
        elif not (policy.needs_scores or policy.needs_features):
            ring = why = None  # a content-blind policy decides on this rank's queries alone
        layout, layout_reason = None, "ring context parallelism: each rank's vision tokens are one range of the keys"
    inp = PolicyInput(scores=scores, scores_square=square, kind=site.kind, q_text=q_text, kv_text=kv_text,
                      batch=B, heads=H, seq_q=Sq, seq_kv=Skv, block_q=cfg.block_q, block_kv=cfg.block_kv,
                      text_q_blocks=n_text, text_kv_blocks=n_text_kv, site_id=site.site_id, step=step,
                      timestep=timestep, site_name=site.name, layout=layout, layout_reason=layout_reason or "",
                      change=change, head_offset=h0, heads_total=heads_total)
    try:
        if why is not None:
            raise PolicyFallback(why)
        sym = policy_symbols(policy, inp, cfg, allow_reuse)
        if ring:
            sym = cp.ring_local(site.plan, sym)
    except PolicyFallback as e:
        reason = f"policy {policy.name!r} cannot run here: {e}: dense"
        _policy_fallbacks(state)[site.site_id] = site.runtime_reason = reason
        return state.dense_symbols(B, H, q.shape[2], Skv, q.device)
    if inp.notes:
        site.runtime_reason = "; ".join(inp.notes)
    return sym


def _record(state, site: SiteRecord, action: str, sym, work: int) -> None:
    pos = state.clock.position
    if pos is not None:
        state.history.append(StepRecord(pos.generation, pos.step, pos.stream, site.site_id, action, sym, work))


# ---- attention ----------------------------------------------------------------------------------


def _dense_attention(state, q, k, v, scale):
    """Exact attention for dense and update steps. On CUDA PyTorch's SDPA (cuDNN on Hopper) is faster
    than the Triton kernel with all-compute symbols (0.72x cuDNN dense, docs/benchmarks.md); elsewhere
    the ops' own path keeps CPU runs on the reference."""
    if q.is_cuda:
        # no .contiguous(): for heads-inner queries SDPA returns the heads-inner layout the site op reports
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    B, H, Sq, _ = q.shape
    return sparse_attention(q, k, v, state.dense_symbols(B, H, Sq, k.shape[2], q.device), scale, heads_inner=True)


def _dense_linear(state, x, weight, bias, head_dim, row_offset, seq_q, kind):
    """Exact projection for dense and update steps: cuBLAS on CUDA (faster than the sparse GEMMs with
    all-compute symbols), the ops' reference path elsewhere."""
    if x.is_cuda:
        return F.linear(x, weight, bias)

    heads = (weight.shape[0] if kind == "q" else x.shape[-1]) // head_dim
    dense = state.dense_symbols(x.shape[0], heads, seq_q, seq_q, x.device)
    if kind == "q":
        return sparse_linear_q(x, weight, bias, dense, head_dim, row_offset)
    return sparse_linear_o(x, weight, bias, dense, head_dim, None, row_offset)


def run_attention(state, site: SiteRecord, q, k, v, mask, scale):
    site.calls += 1
    ticks = state.clock.ticks
    if ticks and site.last_tick == ticks and site.key[1] is None and not site.shared:
        # a second attention call in one model call: several modules run this site and no weight tells them
        # apart, so their caches would mix
        site.shared = True
        site.runtime_reason = SHARED
        site.streams.clear()
        state.warn_once(("shared", site.name), f"flashomni: site {site.name}: {SHARED}")
    site.last_tick = ticks
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    plan = None
    if mask is not None:
        # what the ops run of the mask (omni_compile.masks): item groups on their kept keys, bias groups and
        # minor rows merged around them; None: masked SDPA
        plan = masks.analyse(mask, B, H, Sq, Skv)
        if plan is not None and plan.drops_nothing:
            mask = plan = None
    ss = stream_for(state, site, B, Sq)
    if ss is None or (mask is not None and plan is None and ss.action != DISPATCH):
        if ss is not None:
            site.runtime_reason = MASK_DENSE
            if ss.action == UPDATE:
                ss.symbols = ss.gemm_symbols = None  # nothing to dispatch with: the next step updates again
        return _run_attention_dense(state, site, q, k, v, mask, scale)
    cfg = state.config
    dense = state.dense_symbols(B, H, Sq, Skv, q.device)
    step = ss.step
    if ss.action == DISPATCH:
        sym = ss.symbols
        if mask is None and sym.seq_kv == Skv and ss.mask_signature is None:
            site.symbols = sym
            ss.sparse_calls["attention"] += 1
            out = sparse_attention(q, k, v, sym, scale, heads_inner=True)
            _record(state, site, DISPATCH, sym, B * H * Sq * Skv)
        elif plan is not None and plan.signature == ss.mask_signature:
            site.symbols = sym
            ss.sparse_calls["attention"] += 1
            groups = ss.group_symbols
            out = masks.run_plan(plan, q, k, v, mask, scale, lambda g, i, qg, kg, vg, lse: sparse_attention(
                qg, kg, vg, groups[i], scale, return_lse=lse, heads_inner=not lse))
            _record(state, site, DISPATCH, sym, B * H * Sq * sym.seq_kv)
        else:
            # the mask changed since the update (other kept keys): exact attention for this call; GEMM-O
            # still ignores the reused tiles and the forecast below still fills them
            site.fallbacks += 1
            out = _run_attention_dense(state, site, q, k, v, mask, scale)
        if ss.out_factors is not None:
            x = state.step_coefs(out.device) if state.in_graph_mode else step - ss.out_step
            fc = taylor.forecast(ss.out_factors, x, out.dtype)
            out = torch.where(ss.reuse_rows, fc, out)
        return out
    site.symbols = dense
    if mask is None:
        out = _dense_attention(state, q, k, v, scale)
    else:
        out = masks.run_plan(plan, q, k, v, mask, scale, _dense_group(state, scale))
    _observe_features(state, site, ss, out, step)  # policies that declare needs_features (taylorseer)
    if ss.action == UPDATE:
        cap = cfg.max_cache_bytes
        # the estimate walks every site's caches (state.memory_bytes()): only with a cap to check
        ss.capped = cap is not None and _over_cap(state, site, ss, cap, B, H, Sq, D, out.element_size())
        if ss.capped:
            ss.out_factors = ss.out_step = ss.reuse_rows = None
            ss.a_factors, ss.a_step, ss.bias_terms = {}, {}, {}
        pos = state.clock.position
        old_symbols = ss.symbols
        if plan is None:
            ss.symbols = make_symbols(state, site, q, k, scale, step, pos.timestep, allow_reuse=not ss.capped)
            ss.group_symbols = ss.mask_signature = None
        else:
            # one set of symbols per item group, on the keys it attends; stitched over the batch for the GEMMs
            ss.group_symbols = []
            for g in plan.groups:
                items = None if g.items is None else torch.tensor(g.items, device=q.device)
                qg, kg = (q, k) if items is None else (q.index_select(0, items), k.index_select(0, items))
                ss.group_symbols.append(make_symbols(
                    state, site, qg, kg if g.keys is None else kg.index_select(2, g.keys), scale, step, pos.timestep,
                    allow_reuse=not ss.capped, kv_segments=g.kv_segments(site.kv_segments),
                    k_square=None if g.keys is None else kg))
            ss.symbols = masks.stitch(ss.group_symbols, plan, B)
            ss.mask_signature = plan.signature
        ss.symbols.prefetch_schedules(old_symbols)  # the dispatch steps will decode the same schedules
        if cp.ulysses(site.plan) and (site.gemm_q or site.gemm_o):
            # every rank reaches this on every update step (the action is a function of the step): the
            # collective pairs up across ranks; dispatch steps exchange nothing
            ss.gemm_symbols = cp.gather_reuse(state, site.plan, ss.symbols)
        ss.q_symbols = _all_heads(ss.gemm_view()) if site.q_mixes_heads else None
        ss.update_step = step
        if not site.gemm_o and not ss.capped:
            _observe_output(cfg, ss, out, step)
            reuse, _ = ss.symbols.to_dense()
            ss.reuse_rows = reuse.repeat_interleave(cfg.block_q, dim=-1)[..., :Sq].unsqueeze(-1)
    elif not site.gemm_o and _observe_on_dense_step(cfg, step):
        if ss.out_factors is not None or _fits(state, ss, out.numel() * out.element_size() * cfg.taylor_order):
            _observe_output(cfg, ss, out, step)
            ss.out_factors = ss.out_factors[: cfg.taylor_order]  # the forecast needs all orders only after updates
    _record(state, site, ss.action, dense, B * H * Sq * Skv)
    return out


MASK_DENSE = ("attention mask the ops cannot express (no row class holds most query rows, or keys that differ "
              "per head): dense")


def _dense_group(state, scale):
    """Exact attention of one item group of a mask plan (``masks.run_plan``'s ``attend``): the ops with
    all-compute symbols where the log-sum-exp is needed for a merge, else :func:`_dense_attention`."""

    def attend(g, i, qg, kg, vg, need_lse):
        if not need_lse:
            return _dense_attention(state, qg.contiguous(), kg, vg, scale)
        B, H, Sq, _ = qg.shape
        return sparse_attention(qg.contiguous(), kg, vg, state.dense_symbols(B, H, Sq, kg.shape[2], qg.device), scale,
                                return_lse=True)

    return attend


def _all_heads(sym):
    """Symbols for GEMM-Q of a site whose q chain mixes heads (a norm over all heads of a token): a query
    block counts as reused only where every head reuses it, so the tokens GEMM-Q leaves unwritten are ones
    no head computes."""
    reuse, skip = sym.to_dense()
    every = reuse.all(dim=1, keepdim=True).expand_as(reuse).contiguous()
    return Symbols.from_dense(every, torch.zeros_like(skip), sym.block_q, sym.block_kv, sym.seq_q, sym.seq_kv,
                              share_dense=True)


def _over_cap(state, site: SiteRecord, ss: SiteStream, cap: int, B: int, H: int, Sq: int, D: int, itemsize: int) -> bool:
    """Whether this update's caches would take the state past ``max_cache_mb`` (those it replaces freed)."""
    need = _cache_estimate(state, site, B, H, Sq, D, itemsize)
    old = ss.memory_bytes() - (0 if ss.symbols is None else ss.symbols.reuse_bits.numel() + ss.symbols.skip_bits.numel())
    return state.memory_bytes() - old + need > cap


def _observe_output(cfg, ss: SiteStream, out, step: int) -> None:
    delta = 0 if ss.out_step is None else step - ss.out_step
    ss.out_factors = taylor.refresh(ss.out_factors, out, delta, cfg.taylor_order)
    ss.out_step = step


def _run_attention_dense(state, site: SiteRecord, q, k, v, mask, scale):
    """Dense attention through the ops (policy "dense", no clock, masked sites)."""
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    site.symbols = state.dense_symbols(B, H, Sq, Skv, q.device)
    _record(state, site, DENSE, site.symbols, B * H * Sq * Skv)
    if mask is None:
        return _dense_attention(state, q, k, v, scale)
    out, fell = masks.padded_attention(q, k, v, mask, scale, state.dense_symbols,
                                       lambda q_, k_, v_: _dense_attention(state, q_, k_, v_, scale))
    site.fallbacks += fell
    return out


@site_op("site_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, int state, int site, float? scale, Tensor? clock=None, Tensor? ident=None) -> Tensor")
def site_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    state: int,
    site: int,
    scale: Optional[float],
    clock: Optional[torch.Tensor] = None,
    ident: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of one rewritten site: the step's action and the stream's symbols decide the work done.
    The output is laid out heads-inner (``[B, S, H, D]`` in memory), as the fake kernel says: the model
    reads it back as ``out.transpose(1, 2).flatten(2)``, which is then a view, not a copy. ``site`` is the
    plan id; ``ident`` the weight that tells the module running it apart (``site_record``)."""
    st = get_state(state)
    return _heads_inner(run_attention(st, site_record(st, site, ident), q, k, v, mask, scale))


def site_record(st, plan_id: int, ident: Optional[torch.Tensor]) -> SiteRecord:
    """The module running plan ``plan_id`` in this call: one record per identity weight (its storage), so
    a graph that several modules run (regional compilation) keeps their caches apart."""
    return st.instance(st.plans[plan_id], None if ident is None else ident.data_ptr())


def _heads_inner(out: torch.Tensor) -> torch.Tensor:
    """``out`` itself when it already has the heads-inner strides (the sparse kernel writes them, cuDNN and
    flash SDPA return them for heads-inner queries), else a heads-inner copy: the compiled graph relies
    on the strides the fake kernel reported."""

    B, H, S, D = out.shape
    if out.stride() == (S * H * D, D, H * D, 1):
        return out
    return heads_inner_empty(B, H, S, D, out).copy_(out)


@site_attention.register_fake
def _(q, k, v, mask, state, site, scale, clock=None, ident=None):

    B, H, Sq, _ = q.shape
    return heads_inner_empty(B, H, Sq, v.shape[-1], q)


# ---- GEMM-Q -------------------------------------------------------------------------------------


@site_op("site_linear_q(Tensor x, Tensor weight, Tensor? bias, int state, int site, int row_offset, int seq_q, int head_dim, Tensor? clock=None, Tensor? ident=None) -> Tensor")
def site_linear_q(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    state: int,
    site: int,
    row_offset: int,
    seq_q: int,
    head_dim: int,
    clock: Optional[torch.Tensor] = None,
    ident: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q projection of a site: on dispatch steps skips the (query block, head) tiles its symbols reuse."""
    st = get_state(state)
    rec = site_record(st, site, ident)
    rec.linear_q_calls += 1
    ss = stream_for(st, rec, x.shape[0], seq_q)
    x = x if x.stride(-1) == 1 else x.contiguous()  # a permuted residual stream (Sana) reaches the GEMM as a view
    if ss is not None and ss.action == DISPATCH:
        ss.sparse_calls["linear_q"] += 1
        # the attention skips reused tiles and the chain to it is per-(token, head) local (the passes
        # proved it), so those tiles need not be written; a chain that mixes the heads of a token (a norm
        # across heads) leaves only the blocks every head reuses unwritten (ss.q_symbols)
        sym = ss.q_symbols if rec.q_mixes_heads else ss.gemm_view()
        return sparse_linear_q(x, weight, bias, sym, head_dim, row_offset, fill_reused=False)
    return _dense_linear(st, x, weight, bias, head_dim, row_offset, seq_q, "q")


@site_linear_q.register_fake
def _(x, weight, bias, state, site, row_offset, seq_q, head_dim, clock=None, ident=None):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])


# ---- GEMM-O -------------------------------------------------------------------------------------


@site_op("site_linear_o(Tensor a, Tensor weight, Tensor? bias, int state, int site, int row_offset, int col_offset, int seq_q, int head_dim, Tensor? clock=None, Tensor? ident=None) -> Tensor")
def site_linear_o(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    state: int,
    site: int,
    row_offset: int,
    col_offset: int,
    seq_q: int,
    head_dim: int,
    clock: Optional[torch.Tensor] = None,
    ident: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Output projection of a site over its heads (columns ``col_offset:col_offset+H*D`` of ``weight``):
    on dispatch steps reduces over computed heads only and adds the forecast cache bias of reused ones."""
    st = get_state(state)
    cfg = st.config
    rec = site_record(st, site, ident)
    rec.linear_o_calls += 1
    width = a.shape[-1]
    w = weight if (col_offset == 0 and weight.shape[1] == width) else weight[:, col_offset:col_offset + width]
    a = a.contiguous()
    B = a.shape[0]
    ss = stream_for(st, rec, B, seq_q)
    key = (row_offset, col_offset)
    if ss is not None and ss.action == DISPATCH:

        ss.sparse_calls["linear_o"] += 1
        terms = ss.bias_terms.get(key) or []
        # the forecast Σ term_i x^i / i! is summed inside the kernel, as it loads the bias tiles; every
        # argument was built here on the update step (cache_bias_for's outputs, this site's symbols), so
        # the public wrapper's checks are skipped: a quarter of the call's host time at FLUX size
        scales = (st.step_coefs(a.device) if st.in_graph_mode
                  else taylor.coefficients(len(terms), ss.step - ss.update_step))
        return sparse_linear_o_prechecked(a, w, bias, ss.gemm_view(), head_dim, terms, scales, row_offset)
    out = _dense_linear(st, a, w, bias, head_dim, row_offset, seq_q, "o")
    if ss is None:
        return out
    D = cfg.taylor_order
    if ss.action == UPDATE and not ss.capped and ss.symbols is not None:
        old_step = ss.a_step.get(key)
        factors = taylor.refresh(ss.a_factors.get(key), a, 0 if old_step is None else ss.step - old_step, D)
        if _no_bias_terms(st, rec, row_offset, a.shape[1]):
            ss.bias_terms[key] = None  # these policies never reuse text rows: nothing to add back
        else:
            # every argument was built here (the refreshed factors are fresh contiguous tensors of a's
            # shape, the symbols this update's): the public wrapper's checks are skipped, as on dispatch steps
            ss.bias_terms[key] = [cache_bias_prechecked(f.contiguous(), w, ss.gemm_view(),
                                                        head_dim, row_offset) for f in factors]
        _keep_a(ss, key, factors[:D])
    elif ss.action == DENSE and _observe_on_dense_step(cfg, ss.step):
        old = ss.a_factors.get(key)
        if old is not None or _fits(st, ss, a.numel() * a.element_size() * D):
            old_step = ss.a_step.get(key)
            factors = taylor.refresh(old, a, 0 if old_step is None else ss.step - old_step, D)
            _keep_a(ss, key, factors[:D])
    if key in ss.a_factors:
        ss.a_step[key] = ss.step
    return out


def _keep_a(ss: SiteStream, key, factors) -> None:
    if factors:
        ss.a_factors[key] = factors
    else:
        ss.a_factors.pop(key, None)


@site_linear_o.register_fake
def _(a, weight, bias, state, site, row_offset, col_offset, seq_q, head_dim, clock=None, ident=None):
    return a.new_empty(a.shape[0], a.shape[1], weight.shape[0])
