"""The ``flashomni`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="flashomni")`` works without importing this package. For each graph Dynamo
hands over (the torch-level graph: docs/design.md, "Backend and passes") it

1. finds every SDPA call and classifies it (``passes.find_sites``, ``passes.classify``),
2. walks back to the q/k/v projections and forward to the output projections (``passes.walk``),
3. rewrites supported sites into the site ops (``passes.rewrite`` → ``omni_compile.runtime``) and gives the
   graph a step clock if it takes the model's timestep,
4. hands the graph to Inductor (``compile_fx``), or runs it as is with ``use_inductor=False``.

A graph whose sizes Dynamo made symbolic (a recompile for another resolution or batch size with
``dynamic=None``, or ``dynamic=True``) is specialised here instead: each new set of input shapes gets its
own copy of the graph with those sizes, rewritten and compiled on its first call (as ``dynamic=False``
would), so its sites still run sparse.

Options (``torch.compile(..., options={...})``): any :class:`OmniConfig` field, or ``"state"`` (an
:class:`OmniState`, whose config then applies). Unknown names raise ``ValueError`` before any work. Without
``"state"`` every graph compiled with the same options (one ``torch.compile`` call: the graphs between graph
breaks, recompiles) shares one state, reachable as :func:`omni_compile.last_state`.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from torch import fx

from . import passes as P
from . import runtime  # noqa: F401  (registers the site ops)
from .block_cache import FixedBlocks, build_program
from .config import OmniConfig
from .graphs import GraphRunner
from .passes import SiteOps, _fx
from .state import OmniState, SitePlan, set_last_state, summarize

log = logging.getLogger("omni_compile")

VALID_OPTIONS = OmniConfig.field_names() + ("state",)

#: default states by the options dict of their torch.compile call (``id`` -> (options, state)); the dict is
#: kept so its id is never reused while the entry exists
_DEFAULT_STATES: dict = {}


def _site_ops():
    return SiteOps(
        attention=torch.ops.flashomni.site_attention.default,
        linear_q=torch.ops.flashomni.site_linear_q.default,
        linear_o=torch.ops.flashomni.site_linear_o.default,
        clock=torch.ops.flashomni.step_clock.default,
    )


def resolve_options(options: Optional[dict]) -> OmniState:
    """Validate backend options and return the state to use: the user's, or the default state of these
    options (one per options dict, so every graph of one ``torch.compile`` call shares it)."""
    key = id(options)
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
    hit = _DEFAULT_STATES.get(key)
    if hit is None:
        hit = _DEFAULT_STATES[key] = (options, OmniState(OmniConfig(**opts)))
    return hit[1]


def _example(gm: fx.GraphModule, example_inputs, node: Optional[fx.Node]):
    """The real tensor behind graph input ``node`` at compile time (a placeholder's example input, or the
    attribute a ``get_attr`` reads), or None when only a fake one is known."""
    t = None
    if node is not None and node.op == "placeholder":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        i = placeholders.index(node)
        t = example_inputs[i] if i < len(example_inputs) else None
    elif node is not None and node.op == "get_attr":
        t = gm
        for part in str(node.target).split("."):
            t = getattr(t, part, None)
    return t if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor) else None


def apply_passes(gm: fx.GraphModule, state: OmniState, example_inputs=()) -> list:
    """Find, classify and rewrite the attention sites of ``gm`` in place; returns the site records of the
    modules that run them (made now where the identity weight's example input shows which module)."""
    cfg = state.config
    graph_index = len(state.compiles)
    P.canonicalize_ring(gm)  # diffusers' ring attention -> one SDPA over every rank's keys (passes/cp.py)
    sites = P.find_sites(gm)
    text_len = P.text_lengths(gm)
    if text_len:
        state._text_length = text_len
    elif sites and state._text_length is not None:
        # a graph after a graph break may take the text under a positional name (Wan under context
        # parallelism: diffusers' hook on blocks.0 breaks the frame there): the model's earlier graph saw it
        text_len = state._text_length
    grids: dict = {}
    plans = []
    claimed: dict = {}
    for site in sites:
        plan = SitePlan(name=site.name, batch=site.batch, heads=site.heads, head_dim=site.head_dim,
                        seq_q=site.seq_q, seq_kv=site.seq_kv, mask=site.mask_kind, graph=graph_index)
        walk = cp = None
        if site.reject is None or site.heads:
            cp = _context_parallel(site)
            uly = cp if cp is not None and cp["mode"] == "ulysses" else None
            walk = P.SiteWalk()
            mixing: list = []  # ops that mix the heads of a token: GEMM-Q then skips blocks every head reuses
            walk.q_projections, walk.gemm_q, walk.gemm_q_reason, _ = P.walk_q(site.q, site.heads, site.head_dim,
                                                                            site.seq_q, mixing, uly)
            walk.k_projections = P.walk_kv(site.k, site.heads, site.head_dim, uly)
            walk.v_projections = P.walk_kv(site.v, site.heads, site.head_dim, uly)
            walk.out_projections, walk.gemm_o, walk.gemm_o_reason = P.walk_out(
                site.node, site.heads, site.head_dim, site.seq_q, site.batch, uly)
            for flag, projs in (("gemm_q", walk.q_projections), ("gemm_o", walk.out_projections)):
                if getattr(walk, flag):
                    lins = [p.node for p in projs]
                    if any(n in claimed for n in lins):
                        setattr(walk, flag, False)
                        setattr(walk, flag + "_reason", "projection already rewritten for another site")
                    else:
                        claimed.update({n: site.name for n in lins})
        if cp is not None:
            plan.cp = cp
            plan.kind, plan.segments, plan.kv_segments = P.classify_cp(site, walk, text_len, cp)
            if cp["mode"] == "ulysses":
                # the attention's tokens are every rank's shard, rank-major: this rank's GEMM rows start at
                # rank * S/P of them (a query block may straddle two ranks: the GEMMs mask by row)
                for proj in walk.q_projections + walk.out_projections:
                    if proj.row_offset is not None:
                        proj.row_offset += cp["rank"] * cp["seq_local"]
        elif walk is not None:
            plan.kind, plan.segments, plan.kv_segments = P.classify(site, walk, text_len)
        if walk is not None:
            plan.q_projections = [(p.name, p.row_offset) for p in walk.q_projections]
            plan.out_projections = [(p.name, p.row_offset, p.rows, p.col_offset) for p in walk.out_projections]
            plan.out_features = {}
            for p in walk.out_projections:
                w_shape = _fx.static_shape(_fx.linear_args(p.node)[1])
                if w_shape is not None:
                    plan.out_features[(p.row_offset, p.col_offset)] = (p.rows, w_shape[0])
        else:
            plan.kind = "cross" if site.seq_q != site.seq_kv else "self"
            plan.segments = [("vision", 0, site.seq_q)]
            plan.kv_segments = [("vision", 0, site.seq_kv)]
        if site.batch not in grids:
            grids[site.batch] = P.token_grid(gm, site.batch)
        grid = grids[site.batch]
        if grid is not None and grid[0] * grid[1] * grid[2] == sum(b - a for m, a, b in plan.segments if m == "vision"):
            plan.token_layout = grid
        if site.reject is not None:
            plan.reason = site.reject
        elif cp is not None and cp.get("reason"):
            plan.reason = cp["reason"]
        elif not cfg.attention:
            plan.reason = "attention rewriting disabled (OmniConfig.attention=False)"
        if plan.reason is None:
            plan.rewritten = True
            plan.gemm_q = walk.gemm_q and cfg.gemm_q
            plan.q_mixes_heads = mixing[0] if plan.gemm_q and mixing else None
            plan.gemm_o = walk.gemm_o and cfg.gemm_o
            plan.gemm_q_reason = walk.gemm_q_reason if not walk.gemm_q else (None if cfg.gemm_q else "disabled (OmniConfig.gemm_q=False)")
            plan.gemm_o_reason = walk.gemm_o_reason if not walk.gemm_o else (None if cfg.gemm_o else "disabled (OmniConfig.gemm_o=False)")
        else:
            plan.gemm_q_reason = plan.gemm_o_reason = "site not rewritten"
            log.debug("flashomni: site %s left dense: %s", plan.name, plan.reason)
        ident = P.identity_weight(site, walk)
        if ident is not None:
            plan.identity = next((p.name for projs in (walk.q_projections, walk.k_projections, walk.v_projections)
                                  for p in projs if _fx.linear_args(p.node)[1] is ident), None)
        plans.append((site, walk, state.register(plan), ident))

    ops = _site_ops()
    clock = None
    ts = P.timestep_input(gm) if cfg.attention else None
    if ts is not None:
        # every graph that takes the timestep places the model call, with sites or not: after a graph break
        # the sites may sit in a later graph that never sees the timestep
        clock = P.insert_clock(gm, ts, ops, state.id)
    elif any(plan.rewritten for _, _, plan, _ in plans):
        log.debug("flashomni: graph has no timestep input; its sites follow the clock of another graph")
    records = []
    for site, walk, plan, ident in plans:
        example = _example(gm, example_inputs, ident)
        if ident is None or example is not None:  # else the first call shows which module runs it
            records.append(state.instance(plan, example.data_ptr() if example is not None else None))
        if not plan.rewritten:
            continue
        P.rewrite_attention(gm, site, ops, state.id, plan.plan_id, clock, ident)
        if plan.gemm_q:
            for proj in walk.q_projections:
                P.rewrite_linear_q(gm, proj, site, ops, state.id, plan.plan_id, clock, ident)
        elif plan.gemm_q_reason:
            log.debug("flashomni: site %s: no GEMM-Q: %s", plan.name, plan.gemm_q_reason)
        if plan.gemm_o:
            for proj in walk.out_projections:
                P.rewrite_linear_o(gm, proj, site, ops, state.id, plan.plan_id, clock, ident)
        elif plan.gemm_o_reason:
            log.debug("flashomni: site %s: no GEMM-O: %s", plan.name, plan.gemm_o_reason)
    if clock is not None and not clock.users:
        P.keep_alive(gm, clock)
    gm.graph.lint()
    gm.recompile()
    return records


def _context_parallel(site) -> Optional[dict]:
    """The site's context parallelism (``passes.cp.site_cp``) with the shard sizes the runtime needs:
    ``seq_local`` (each rank's tokens), ``heads_local`` (the heads this rank attends); ``reason`` when the
    ops cannot run it."""
    cp = P.site_cp(site)
    if cp is None:
        return None
    size = cp["size"]
    if cp["mode"] == "ulysses":
        cp.update(seq_local=site.seq_q // size, heads_local=site.heads)
        if site.seq_q % size or site.seq_kv != site.seq_q:
            cp["reason"] = f"context parallel: {site.seq_q} queries, {site.seq_kv} keys do not split over {size} ranks"
    elif cp["mode"] == "ring":
        cp.update(seq_local=site.seq_q, heads_local=site.heads)
        if site.seq_kv != site.seq_q * size:
            cp["reason"] = f"context parallel (ring): {site.seq_kv} keys are not {size} shards of {site.seq_q}"
    else:
        cp["reason"] = "context parallel with both ulysses_degree and ring_degree > 1 is not supported"
    return cp


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _symbolic(gm: fx.GraphModule) -> bool:
    """Whether Dynamo traced ``gm`` with symbolic values: sizes (a recompile with ``dynamic=None``,
    ``dynamic=True``) or numbers it lifted to inputs (``dynamic=True`` makes Python floats, e.g. a dropout
    probability, 0-dim tensor inputs read back with ``.item()``)."""
    for n in gm.graph.nodes:
        v = _fx.example(n)
        if isinstance(v, _SYMBOLIC) or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape)):
            return True
    return False


def _scalar_inputs(gm: fx.GraphModule) -> list:
    """Positions of the 0-dim tensor inputs the graph only reads back as numbers (``.item()``): their values
    are part of a specialisation (the passes check them, e.g. a dropout probability of 0)."""
    out = []
    for i, n in enumerate(x for x in gm.graph.nodes if x.op == "placeholder"):
        v = _fx.example(n)
        if (isinstance(v, torch.Tensor) and v.dim() == 0 and n.users
                and all(u.op == "call_method" and u.target == "item" for u in n.users)):
            out.append(i)
    return out


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
    state.warn_once("autograd", (
        "flashomni: the graph was traced with autograd enabled and inputs or parameters that require grad; the "
        "backend is inference-only, so its attention sites are left dense (plain Inductor, correct gradients). "
        "Run the model under torch.no_grad() or torch.inference_mode() (diffusers pipelines do), or call "
        "model.requires_grad_(False), to get the sparse sites."))
    return True


def flashomni(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None):
    """torch.compile backend: rewrite attention sites into the FlashOmni ops, then compile with Inductor."""
    state = resolve_options(options)
    set_last_state(state)
    if _symbolic(gm):
        return _ShapeSpecialized(gm, state, mode)
    return _compile(gm, example_inputs, state, mode)


def _compile(gm: fx.GraphModule, example_inputs, state: OmniState, mode: Optional[str]):
    """Rewrite and compile one graph of static shapes; returns the callable Dynamo runs."""
    t0 = time.perf_counter()
    n_out = _output_count(gm)
    training = autograd_flows(gm, example_inputs, state)
    records = [] if training else apply_passes(gm, state, example_inputs)
    kept_clock = _output_count(gm) != n_out  # the clock's token is an extra output: stripped below
    t_pass = time.perf_counter() - t0
    graph = len(state.compiles)
    plans = [p for p in state.plans if p.graph == graph]
    if plans:
        log.info("flashomni: %s", summarize(plans))
    else:
        log.info("flashomni: no attention sites; graph left unchanged (compiled as with Inductor)"
                 if state.config.use_inductor else "flashomni: no attention sites; graph left unchanged")
    entry = {"sites": len(plans), "rewritten": sum(p.rewritten for p in plans), "pass_seconds": t_pass}
    state.compiles.append(entry)
    brk = P.graph_break(gm)
    if brk is not None:
        entry["graph_break"] = brk
        if brk["in_attention"]:
            # the attention call after this break runs in no compiled graph: no site ever sees it
            state.warn_once(("graph break", brk["where"]),
                            f"flashomni: Dynamo breaks the graph inside attention code at {brk['where']} "
                            f"({brk['reason']}), so the attention that follows runs outside every compiled graph "
                            f"and stays dense")
    clock = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target is _site_ops().clock), None)
    # CUDA graphs: dispatch steps replayed by the runner (omni_compile.graphs), never Inductor's own capture,
    # which would freeze the runtime's per-step decisions inside the site ops
    graphs = _replays_dispatch_steps(state, mode, bool(plans or clock is not None), example_inputs)
    compiled = None
    if state.config.block_cache is not None and not training:
        compiled = _block_program(gm, state, records, mode, entry)
    if compiled is None and not state.config.use_inductor:
        compiled = gm.forward
        entry["compile_seconds"] = t_pass
    elif compiled is None:
        from torch._inductor.compile_fx import compile_fx  # Inductor's import costs seconds: only when used

        patches = _inductor_patches(mode, plans or clock is not None)
        t1 = time.perf_counter()
        compiled = compile_fx(gm, example_inputs, config_patches=patches) if patches else compile_fx(gm, example_inputs)
        entry["compile_seconds"] = t_pass + time.perf_counter() - t1

    def inner(*args):
        out = compiled(*args)
        return out[:-1] if kept_clock else out

    runner = inner
    if graphs:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        index = placeholders.index(clock.args[0]) if clock is not None else None
        runner = entry["graph_runner"] = GraphRunner(state, inner, index, graph)
    checked = []

    def run(*args):
        out = runner(*args)
        if not checked:
            checked.append(True)
            _check_first_call(state, graph)
        return out

    run._omni_state = state  # keeps the state (looked up by id in the site ops) alive with the graph
    return run


def _replays_dispatch_steps(state: OmniState, mode: Optional[str], has_sites: bool, example_inputs) -> bool:
    """Whether the graph's dispatch steps are replayed from CUDA graphs: asked for (``cuda_graphs``, or
    ``mode="reduce-overhead"``), a graph with site ops or the clock, on CUDA."""
    if not (state.config.cuda_graphs or mode == "reduce-overhead") or not has_sites:
        return False
    if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        state.warn_once("cuda_graphs_cpu", "flashomni: CUDA graphs were asked for (OmniConfig.cuda_graphs or "
                        "mode='reduce-overhead') but the graph's inputs are not on a CUDA device: its steps run "
                        "without them")
        return False
    return True


def _inductor_patches(mode: Optional[str], has_sites: bool) -> Optional[dict]:
    """Inductor's options for ``mode``, without its CUDA graphs when the graph holds site ops (the runner
    replays dispatch steps itself)."""
    if not mode or mode == "default":
        return None
    patches = dict(torch._inductor.list_mode_options(mode))
    if has_sites:
        patches.pop("triton.cudagraphs", None)
    return patches or None


def _output_count(gm: fx.GraphModule) -> int:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    (value,) = out.args
    return len(value) if isinstance(value, (tuple, list)) else 1


class _ShapeSpecialized:
    """The runner of a graph Dynamo traced with symbolic sizes: one static-shape copy per set of input shapes
    (and symbolic-int values), rewritten and compiled on its first call (``_compile``)."""

    def __init__(self, gm: fx.GraphModule, state: OmniState, mode: Optional[str]):
        self.gm, self.state, self.mode = gm, state, mode
        self.compiled: dict = {}
        self.scalars = _scalar_inputs(gm)
        self._omni_state = state

    def __call__(self, *args):
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        key += tuple(float(args[i]) for i in self.scalars)
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = _compile(_specialize(self.gm, args), list(args), self.state, self.mode)
            self.state.compiles[-1]["specialized"] = key
        return fn(*args)


def _specialize(gm: fx.GraphModule, args) -> fx.GraphModule:
    """A copy of ``gm`` whose nodes' example values have the concrete sizes of ``args`` (the passes read
    shapes from them), found by running the graph once on ``args`` (fake propagation cannot follow the
    ``.item()`` calls models make on constant tensors) and keeping a storage-free fake of each value. The
    graph itself still computes its sizes at run time, which now agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(v):
        if not isinstance(v, torch.Tensor):
            return v
        with mode:  # sizes, strides, dtype and device only: a view's base (a complex view of real RoPE pairs) is not needed
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op != "output":
                n.meta["example_value"] = tree_map(fake, out)
            return out

    with torch.no_grad():
        Recorder(copy).run(*args)
    return copy


def _check_first_call(state: OmniState, graph: int) -> None:
    """After a graph's first call: warn when none of its attention sites can run sparse, naming each site
    and why (``state.sites`` and ``state.report()`` say the same)."""
    records = [r for r in state.sites if r.plan.graph == graph]
    if not records or state.config.policy == "dense" or not state.config.attention:  # dense by the user's choice
        return
    if any(r.rewritten and not r.runtime_reason for r in records):
        return
    reasons = "; ".join(f"{r.name}: {r.reason or r.runtime_reason}" for r in records[:8])
    more = f" (and {len(records) - 8} more)" if len(records) > 8 else ""
    hint = f" {runtime.NO_CLOCK_HINT}" if any(r.runtime_reason == runtime.NO_CLOCK for r in records) else ""
    state.warn_once(("no sparse site", graph),
                    f"flashomni: none of the {len(records)} attention sites of this graph can run sparse, so it "
                    f"runs dense: {reasons}{more}.{hint}")


def _block_program(gm: fx.GraphModule, state: OmniState, records: list, mode: Optional[str], entry: dict):
    """Block caching on: split ``gm`` at block borders and return the runner of its regions
    (``omni_compile.block_cache``), each region compiled with Inductor on its first run (or run as FX with
    ``use_inductor=False``); None when the graph has no blocks or no step clock (it is then compiled whole)."""
    t0 = time.perf_counter()
    cfg = state.config
    patches = _inductor_patches(mode, True)

    def compile_region(module: fx.GraphModule, example: list):
        if not cfg.use_inductor:
            return module.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(module, example, config_patches=patches) if patches else compile_fx(module, example)

    if not isinstance(cfg.block_cache, FixedBlocks) and any(_fx.collective(n) for n in gm.graph.nodes):
        entry["blocks_reason"] = (
            "context parallelism: a block-cache rule that reads each rank's own data (ComputedShare, "
            "ResidualChange) may cache a block on one rank and run it on another, whose collectives would then "
            "wait forever; FixedBlocks decides alike on every rank")
        state.warn_once("blocks_cp", f"flashomni: block caching is off for this graph: {entry['blocks_reason']} "
                        "(OmniConfig(block_cache=FixedBlocks(f)) caches under context parallelism)")
        return None
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
