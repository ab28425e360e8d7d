"""The ``flashomni`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="flashomni")`` works without importing this package. For each graph Dynamo
hands over (the torch-level graph: docs/design.md, "Backend and passes") it

1. finds every SDPA call and classifies it (``passes.find_sites``, ``passes.classify``),
2. walks back to the q/k/v projections and forward to the output projections (``passes.walk``),
3. rewrites supported sites into the site ops (``passes.rewrite`` → ``omni_compile.runtime``),
4. hands the graph to Inductor (``compile_fx``), or runs it as is with ``use_inductor=False``.

Options (``torch.compile(..., options={...})``): any :class:`OmniConfig` field, or ``"state"`` (an
:class:`OmniState`, whose config then applies). Unknown names raise ``ValueError`` before any work.
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from typing import Optional

import torch
from torch import fx

from .config import OmniConfig
from . import passes as P
from . import runtime  # noqa: F401  (registers the site ops)
from .block_cache import build_program
from .passes import SiteOps, _fx
from .state import OmniState, SiteRecord, set_last_state, summarize

log = logging.getLogger("omni_compile")

VALID_OPTIONS = OmniConfig.field_names() + ("state",)


def _site_ops():
    return SiteOps(
        attention=torch.ops.flashomni.site_attention.default,
        linear_q=torch.ops.flashomni.site_linear_q.default,
        linear_o=torch.ops.flashomni.site_linear_o.default,
        clock=torch.ops.flashomni.step_clock.default,
    )


def resolve_options(options: Optional[dict]) -> OmniState:
    """Validate backend options and return the state to use (the user's, or a new one)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"flashomni: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(VALID_OPTIONS))
    if unknown:
        raise ValueError(
            f"flashomni: unknown option(s) {unknown}; valid options are: {', '.join(VALID_OPTIONS)}"
        )
    opts = dict(options)
    state = opts.pop("state", None)
    if state is not None:
        if not isinstance(state, OmniState):
            raise TypeError(f"flashomni: options['state'] must be an OmniState, got {type(state).__name__}")
        if opts:
            raise ValueError(
                f"flashomni: options {sorted(opts)} given together with 'state'; set them in the state's "
                "OmniConfig instead"
            )
        return state
    return OmniState(OmniConfig(**opts))


def apply_passes(gm: fx.GraphModule, state: OmniState) -> list:
    """Find, classify and rewrite the attention sites of ``gm`` in place; returns their records."""

    cfg = state.config
    sites = P.find_sites(gm)
    if not sites:
        return []
    text_len = P.text_length(gm)
    grids: dict = {}
    plans = []
    claimed: dict = {}
    for site in sites:
        rec = SiteRecord(name=site.name, batch=site.batch, heads=site.heads, head_dim=site.head_dim,
                         seq_q=site.seq_q, seq_kv=site.seq_kv, mask=site.mask_kind)
        walk = None
        if site.reject is None or site.heads:
            walk = P.SiteWalk()
            walk.q_projections, walk.gemm_q, walk.gemm_q_reason, _ = P.walk_q(site.q, site.heads, site.head_dim, site.seq_q)
            walk.k_projections = P.walk_kv(site.k, site.heads, site.head_dim)
            walk.v_projections = P.walk_kv(site.v, site.heads, site.head_dim)
            walk.out_projections, walk.gemm_o, walk.gemm_o_reason = P.walk_out(
                site.node, site.heads, site.head_dim, site.seq_q, site.batch)
            for flag, projs in (("gemm_q", walk.q_projections), ("gemm_o", walk.out_projections)):
                if getattr(walk, flag):
                    lins = [p.node for p in projs]
                    if any(n in claimed for n in lins):
                        setattr(walk, flag, False)
                        setattr(walk, flag + "_reason", "projection already rewritten for another site")
                    else:
                        claimed.update({n: site.name for n in lins})
        if walk is not None:
            rec.kind, rec.segments, rec.kv_segments = P.classify(site, walk, text_len)
            rec.q_projections = [(p.name, p.row_offset) for p in walk.q_projections]
            rec.out_projections = [(p.name, p.row_offset, p.rows, p.col_offset) for p in walk.out_projections]
            rec.out_features = {}
            for p in walk.out_projections:
                w_shape = _fx.static_shape(_fx.linear_args(p.node)[1])
                if w_shape is not None:
                    rec.out_features[(p.row_offset, p.col_offset)] = (p.rows, w_shape[0])
        else:
            rec.kind = "cross" if site.seq_q != site.seq_kv else "self"
            rec.segments = [("vision", 0, site.seq_q)]
            rec.kv_segments = [("vision", 0, site.seq_kv)]
        if site.batch not in grids:
            grids[site.batch] = P.token_grid(gm, site.batch)
        grid = grids[site.batch]
        if grid is not None and grid[0] * grid[1] * grid[2] == sum(b - a for m, a, b in rec.segments if m == "vision"):
            rec.token_layout = grid
        if site.reject is not None:
            rec.reason = site.reject
        elif not cfg.attention:
            rec.reason = "attention rewriting disabled (OmniConfig.attention=False)"
        if rec.reason is None:
            rec.rewritten = True
            rec.gemm_q = walk.gemm_q and cfg.gemm_q
            rec.gemm_o = walk.gemm_o and cfg.gemm_o
            rec.gemm_q_reason = walk.gemm_q_reason if not walk.gemm_q else (None if cfg.gemm_q else "disabled (OmniConfig.gemm_q=False)")
            rec.gemm_o_reason = walk.gemm_o_reason if not walk.gemm_o else (None if cfg.gemm_o else "disabled (OmniConfig.gemm_o=False)")
        else:
            rec.gemm_q_reason = rec.gemm_o_reason = "site not rewritten"
            log.debug("flashomni: site %s left dense: %s", rec.name, rec.reason)
        plans.append((site, walk, state.register(rec)))

    ops = _site_ops()
    clock = None
    if any(rec.rewritten for _, _, rec in plans):
        ts = P.timestep_input(gm)
        if ts is not None:
            clock = P.insert_clock(gm, ts, ops, state.id)
        else:
            log.debug("flashomni: graph has no timestep input; its sites follow the clock of another graph")
    for site, walk, rec in plans:
        if not rec.rewritten:
            continue
        P.rewrite_attention(gm, site, ops, state.id, rec.site_id, clock)
        if rec.gemm_q:
            for proj in walk.q_projections:
                P.rewrite_linear_q(gm, proj, site, ops, state.id, rec.site_id, clock)
        elif rec.gemm_q_reason:
            log.debug("flashomni: site %s: no GEMM-Q: %s", rec.name, rec.gemm_q_reason)
        if rec.gemm_o:
            for proj in walk.out_projections:
                P.rewrite_linear_o(gm, proj, site, ops, state.id, rec.site_id, clock)
        elif rec.gemm_o_reason:
            log.debug("flashomni: site %s: no GEMM-O: %s", rec.name, rec.gemm_o_reason)
    gm.graph.lint()
    gm.recompile()
    return [rec for _, _, rec in plans]


_GRAD_WARNED: "weakref.WeakSet[OmniState]" = weakref.WeakSet()


def autograd_flows(gm: fx.GraphModule, example_inputs, state: OmniState) -> bool:
    """Whether autograd would record through ``gm``: traced with grad enabled and an input or parameter that
    requires grad. Dynamo guards on the grad mode, so the answer holds for every call of the compiled graph.
    The site ops are inference-only (their kernels compute no gradients and their caches outlive the step),
    so such a graph is left unrewritten and compiled as with Inductor alone: correct gradients, no
    sparsity. Warns once per state."""
    if not torch.is_grad_enabled():
        return False
    if not any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs) and not any(
            p.requires_grad for p in gm.parameters()):
        return False
    if state not in _GRAD_WARNED:
        _GRAD_WARNED.add(state)
        warnings.warn(
            "flashomni: the graph was traced with autograd enabled and inputs or parameters that require grad; the "
            "backend is inference-only, so its attention sites are left dense (plain Inductor, correct gradients). "
            "Run the model under torch.no_grad() or torch.inference_mode() (diffusers pipelines do), or call "
            "model.requires_grad_(False), to get the sparse sites.", UserWarning, stacklevel=2)
    return True


def flashomni(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None):
    """torch.compile backend: rewrite attention sites into the FlashOmni ops, then compile with Inductor."""
    state = resolve_options(options)
    set_last_state(state)
    t0 = time.perf_counter()
    training = autograd_flows(gm, example_inputs, state)
    records = [] if training else apply_passes(gm, state)
    t_pass = time.perf_counter() - t0
    if records:
        log.info("flashomni: %s", summarize(records))
    else:
        log.info("flashomni: no attention sites; graph left unchanged (compiled as with Inductor)"
                 if state.config.use_inductor else "flashomni: no attention sites; graph left unchanged")
    entry = {"sites": len(records), "rewritten": sum(r.rewritten for r in records), "pass_seconds": t_pass}
    state.compiles.append(entry)
    if state.config.block_cache is not None and not training:
        program = _block_program(gm, state, records, mode, entry)
        if program is not None:
            return program
    if not state.config.use_inductor:
        compiled = gm.forward
        entry["compile_seconds"] = t_pass
    else:
        from torch._inductor.compile_fx import compile_fx

        patches = None
        if mode and mode != "default":
            patches = torch._inductor.list_mode_options(mode)
        t1 = time.perf_counter()
        compiled = compile_fx(gm, example_inputs, config_patches=patches) if patches else compile_fx(gm, example_inputs)
        entry["compile_seconds"] = t_pass + time.perf_counter() - t1

    def run(*args):
        return compiled(*args)

    run._omni_state = state  # keeps the state (looked up by id in the site ops) alive with the graph
    return run


def _block_program(gm: fx.GraphModule, state: OmniState, records: list, mode: Optional[str], entry: dict):
    """Block caching on: split ``gm`` at block borders and return the runner of its regions
    (``omni_compile.block_cache``), each region compiled with Inductor on its first run (or run as FX with
    ``use_inductor=False``); None when the graph has no blocks or no step clock (it is then compiled whole)."""

    t0 = time.perf_counter()
    cfg = state.config
    patches = torch._inductor.list_mode_options(mode) if mode and mode != "default" else None

    def compile_region(module: fx.GraphModule, example: list):
        if not cfg.use_inductor:
            return module.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(module, example, config_patches=patches) if patches else compile_fx(module, example)

    program = build_program(gm, state, records, compile_region, entry, ops=_site_ops())
    entry["split_seconds"] = time.perf_counter() - t0
    if program is None:
        log.info("flashomni: block caching off for this graph: %s", entry.get("blocks_reason"))
        return None
    log.info("flashomni: %d blocks (%d cacheable), %d regions", entry["blocks"], entry["blocks_cacheable"],
             entry["regions"])
    # with Inductor each region adds its compile time on its first run (BlockProgram._run)
    entry["compile_seconds"] = entry["pass_seconds"] + entry["split_seconds"]
    return program

