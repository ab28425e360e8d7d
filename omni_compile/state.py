"""``OmniState``: the attention sites of compiled graphs and everything they carry across steps.

A state is made by the user (``OmniState(OmniConfig(...))`` passed as ``options={"state": state}``) or by
the backend (one default state per set of options, shared by every graph compiled with them, reachable
with :func:`omni_compile.last_state`). The rewritten graphs name a state and a site plan by integer ids
(``state_id``, ``plan_id``); the site ops look both up here at run time, so symbols, caches and step
counters live in Python/device memory owned by the state, never as graph constants — one compiled graph
serves every denoising step without recompiling.

Two kinds of site objects:

* a :class:`SitePlan` is what the passes found for one attention call of one compiled graph (kind,
  token segments, GEMM-Q / GEMM-O, shapes). Every compile adds its own plans: graphs of the same model
  for other resolutions, batch sizes or after a recompile never overwrite each other's;
* a :class:`SiteRecord` is one attention *module* at run time (what ``state.sites`` lists): its streams,
  caches and counters, and the plan of the graph that ran it last. A module is known by its site name and
  the storage of its q projection's weight, which the ops receive as an argument: graphs that share code
  between modules (regional compilation, where every transformer block runs one compiled graph) still
  give each module its own record, and two models on one state keep their caches apart.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import OmniConfig, unmatched_override_patterns
from .ops import Symbols
from .passes.classify import TIMESTEP_NAMES
from .report import Report, build_report
from .schedule import DISPATCH, StepClock, config_action

_IDS = itertools.count(1)
_STATES: "weakref.WeakValueDictionary[int, OmniState]" = weakref.WeakValueDictionary()
_LAST: Optional["OmniState"] = None
_LOCK = threading.Lock()


class FlashOmniWarning(UserWarning):
    """What the backend warns about: sites that cannot run sparse, settings that match nothing. Filter
    them with ``warnings.filterwarnings("ignore", category=omni_compile.FlashOmniWarning)``."""


@dataclass
class SitePlan:
    """What the passes found for one attention call of one compiled graph (static: it never changes)."""

    name: str
    """Module path of the attention module (``transformer_blocks.3.attn``), relative to the compiled module."""
    kind: str = "self"
    """``"joint"`` (text+vision in one sequence), ``"self"`` or ``"cross"`` (keys from other tokens)."""
    rewritten: bool = False
    reason: Optional[str] = None
    """Why the site was left dense (None when rewritten)."""
    gemm_q: bool = False
    gemm_o: bool = False
    gemm_q_reason: Optional[str] = None
    q_mixes_heads: Optional[str] = None
    """With GEMM-Q: the op on the q chain that mixes the heads of a token (``"rms_norm over 3072 features
    spans heads"``); GEMM-Q then skips only the query blocks every head reuses. None: the chain is
    per-(token, head) local."""
    gemm_o_reason: Optional[str] = None
    segments: list = field(default_factory=list)
    """``(modality, start, stop)`` over the query sequence, modality ``"text"`` or ``"vision"``."""
    kv_segments: list = field(default_factory=list)
    """Same over the key sequence (equals ``segments`` except for cross-attention)."""
    batch: int = 0
    heads: int = 0
    head_dim: int = 0
    seq_q: int = 0
    seq_kv: int = 0
    mask: Optional[str] = None
    """``None``, ``"key_padding"`` (``[B|1, H|1, 1, Skv]``) or ``"rows"`` (a mask with a query axis); the
    runtime factors either into what the ops run (``omni_compile.masks``)."""
    q_projections: list = field(default_factory=list)
    """``(module path, row_offset)`` of each q projection (row_offset None where GEMM-Q is not valid)."""
    out_projections: list = field(default_factory=list)
    """``(module path, row_offset, rows, col_offset)`` of each output projection found."""
    out_features: dict = field(default_factory=dict)
    """``(row_offset, col_offset) -> (rows, out_features)`` of each GEMM-O projection (cache sizing)."""
    token_layout: Optional[tuple] = None
    """``(frames, height, width)`` of the vision tokens as the passes inferred it from a conv patch
    embedding (None when the model does not show it; ``OmniConfig.token_layout`` then supplies it)."""
    identity: Optional[str] = None
    """The projection whose weight tells modules apart at run time (``"…to_q"``); None: the site name alone."""
    cp: Optional[dict] = None
    """Context parallelism (diffusers' ``enable_parallelism``) as the passes found it, else None:
    ``{"mode": "ulysses" | "ring", "size": P, "group": process-group name, "rank": r, "seq_local": tokens
    per rank, "heads_local": heads this rank attends}``. Ulysses: the plan's ``heads`` are this rank's H/P
    over all ``seq_q`` tokens (rank-major); ring: all heads over this rank's ``seq_q`` queries and all
    ``seq_kv`` keys."""
    plan_id: int = -1
    graph: int = -1
    """Index of the compile (``OmniState.compiles``) that made this plan."""

    @property
    def text_tokens(self) -> int:
        return sum(b - a for m, a, b in self.segments if m == "text")


class SiteRecord:
    """One attention module at run time: its :class:`SitePlan` (the latest graph's; every static field of
    the plan reads through, e.g. ``record.kind``) and its run-time state."""

    def __init__(self, name: str, plan: SitePlan, key: tuple, site_id: int):
        self.name = name
        """Module path (the plan's name, or the module's path in the model given to
        :meth:`OmniState.attach`; ``name[k]`` for the k-th module a shared graph ran)."""
        self.plan = plan
        self.key = key
        """``(plan name, storage of the identity weight)``: how the state finds this module."""
        self.site_id = site_id
        """Index in ``OmniState.sites``."""
        self.calls = 0
        """Attention calls run through the site op."""
        self.linear_q_calls = 0
        self.linear_o_calls = 0
        self.fallbacks = 0
        """Calls that fell back to dense PyTorch attention (mask the ops cannot express)."""
        self.symbols = None
        """Symbols of the latest attention call (``omni_compile.ops.Symbols``)."""
        self.streams: dict = {}
        """Run-time state per stream: ``(stream, batch, seq_q) -> SiteStream`` (see ``omni_compile.runtime``)."""
        self.runtime_reason: Optional[str] = None
        """Why the runtime ran this site dense although the policy is sparse (None when it did not)."""
        self.last_tick = -1
        """The clock tick of this module's latest attention call (a second call in one tick means two modules
        share it, which the runtime then runs dense)."""
        self.shared = False
        """Several modules run this record (no identity weight tells them apart): it runs dense."""

    def __getattr__(self, attr):
        # the plan's static fields (kind, segments, gemm_o, ...) read through
        if attr.startswith("__") or attr == "plan":
            raise AttributeError(attr)
        return getattr(self.plan, attr)

    def reset(self) -> None:
        self.calls = self.linear_q_calls = self.linear_o_calls = self.fallbacks = 0
        self.symbols = None
        self.streams = {}
        self.runtime_reason = None
        self.last_tick = -1
        self.shared = False

    def __repr__(self) -> str:
        flags = []
        if self.gemm_q:
            flags.append("GEMM-Q")
        if self.gemm_o:
            flags.append("GEMM-O")
        status = ("rewritten " + "+".join(flags)) if self.rewritten else f"dense ({self.reason})"
        if self.rewritten and self.runtime_reason:
            status += f", at run time: {self.runtime_reason}"
        return f"<site {self.site_id} {self.name} {self.kind}: {status}>"


@dataclass
class SiteStream:
    """Run-time state of one site for one stream (and one input shape): symbols, caches, step position.

    Caches (each a list of Taylor factors ``[f_0, …]``, see ``omni_compile.taylor``):

    * ``out_factors``: the attention output ``[B, H, S, D]`` (sites without GEMM-O: reused tiles are
      filled with its forecast), observed at ``out_step``;
    * ``a_factors[(row_offset, col_offset)]``: the GEMM-O input ``[B, rows, H*D]``, orders ``< D`` only
      (kept to difference against at the next full step), observed at ``a_step[...]``;
    * ``bias_terms[(row_offset, col_offset)]``: GEMM-O cache-bias terms ``[B, rows, C_out]``, one per
      order, the projections of the ``a`` factors over the reused heads; None when no reused tile falls
      in the projection's rows.
    """

    key: tuple
    generation: int = -1
    step: int = -1
    action: str = "dense"
    symbols: object = None
    """Symbols the dispatch steps read (built on the last update)."""
    gemm_symbols: object = None
    """Under Ulysses context parallelism: the reuse bits of every head of the group, gathered on the update
    step, which this rank's GEMM-Q / GEMM-O read for its token shard (``omni_compile.cp``); None otherwise."""
    update_step: Optional[int] = None
    capped: bool = False
    """The memory cap denied this stream its caches at the last update (no reused tiles)."""
    out_factors: Optional[list] = None
    out_step: Optional[int] = None
    reuse_rows: Optional[object] = None
    """``[B, H, S, 1]`` bool: rows of reused tiles (sites without GEMM-O)."""
    a_factors: dict = field(default_factory=dict)
    a_step: dict = field(default_factory=dict)
    bias_terms: dict = field(default_factory=dict)
    features: Optional[tuple] = None
    """``(step, block means [B, H, nQ, D] fp32)`` of the attention output at the last full step, and
    ``features_prev`` at the one before (only for policies that declare ``needs_features``)."""
    features_prev: Optional[tuple] = None
    counts: dict = field(default_factory=lambda: {"dense": 0, "update": 0, "dispatch": 0})
    """Steps of each kind this stream ran (per generation, reset with the caches)."""
    sparse_calls: dict = field(default_factory=lambda: {"attention": 0, "linear_q": 0, "linear_o": 0})
    """Op calls that ran with the stored (sparse) symbols, on dispatch steps."""
    group_symbols: Optional[list] = None
    """Under a mask whose item groups attend different keys (``omni_compile.masks``): each group's symbols,
    on its own keys (``symbols`` then stitches them over the batch for GEMM-Q, GEMM-O and the report)."""
    mask_signature: Optional[tuple] = None
    """Which items attended which keys at the update (``MaskPlan.signature``); None without a mask."""
    q_symbols: object = None
    """GEMM-Q's symbols when the q chain mixes heads (``SitePlan.q_mixes_heads``): blocks every head reuses."""

    def gemm_view(self):
        """The symbols GEMM-Q and GEMM-O read: ``gemm_symbols`` under Ulysses, else the attention's."""
        return self.symbols if self.gemm_symbols is None else self.gemm_symbols

    def clear(self) -> None:
        self.symbols = None
        self.group_symbols = self.mask_signature = self.q_symbols = self.gemm_symbols = None
        self.update_step = None
        self.capped = False
        self.out_factors = self.out_step = self.reuse_rows = None
        self.a_factors, self.a_step, self.bias_terms = {}, {}, {}
        self.features = self.features_prev = None
        self.counts = {"dense": 0, "update": 0, "dispatch": 0}
        self.sparse_calls = {"attention": 0, "linear_q": 0, "linear_o": 0}

    def tensors(self) -> list:
        """Every tensor this stream holds (caches and symbol bits)."""
        out = []
        held: list = []
        for sym in [self.symbols, self.q_symbols, *(self.group_symbols or [])]:
            if sym is not None and all(sym is not h for h in held):  # one group's symbols may be the stitched ones
                held.append(sym)
                out += [sym.reuse_bits, sym.skip_bits]
        if self.gemm_symbols is not None:
            out.append(self.gemm_symbols.reuse_bits)  # its skip bits are the shared all-compute ones
        if self.reuse_rows is not None:
            out.append(self.reuse_rows)
        for f in (self.features, self.features_prev):
            if f is not None:
                out.append(f[1])
        for fs in [self.out_factors, *self.a_factors.values(), *self.bias_terms.values()]:
            if fs:
                out += list(fs)
        return out

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _register(items: list, by_name: dict, record, id_attr: str):
    """Store ``record`` in ``items`` under its name: in the place (and with the id) of the record of the same
    name, whose run-time state it adopts, or appended with a new id."""
    old = by_name.get(record.name)
    if old is not None:
        setattr(record, id_attr, getattr(old, id_attr))
        record.adopt(old)
        items[getattr(old, id_attr)] = record
    else:
        setattr(record, id_attr, len(items))
        items.append(record)
    by_name[record.name] = record
    return record


class OmniState:
    """Sites, symbols and caches of one compiled model (see the module docstring)."""

    def __init__(self, config: Optional[OmniConfig] = None):
        if config is None:
            config = OmniConfig()
        if not isinstance(config, OmniConfig):
            raise TypeError(f"OmniState needs an OmniConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.id = next(_IDS)
        self.sites: list = []
        """One :class:`SiteRecord` per attention module seen (compiled, or first run)."""
        self._by_key: dict = {}
        self.plans: list = []
        """Every :class:`SitePlan` of every compiled graph, by ``plan_id``."""
        self.compiles: list = []
        """One dict per backend call: sites found/rewritten, pass and compile seconds."""
        self._dense_symbols: dict = {}
        self.clock = StepClock()
        """Turns the timesteps of successive model calls into (generation, step, stream) positions."""
        self.history: list = []
        """One :class:`StepRecord` per (site, stream, step) run through the attention op, for the current
        generation and the one before it (older ones are dropped when a generation starts)."""
        self.blocks: list = []
        """Transformer blocks found when block caching is on (``omni_compile.block_cache.BlockRecord``)."""
        self._blocks_by_name: dict = {}
        self.passive_sites: frozenset = frozenset()
        """Ids of the sites that run dense in the current model call whatever the step (set by the block
        runner around a block that block caching skips on every dispatch step)."""
        self._names: dict = {}
        """Weight storage -> module path, from :meth:`attach` (names the modules of shared graphs)."""
        self._hook_tick = False
        """A forward hook (:meth:`attach`) or a graph runner placed the current call (the graphs' own clocks
        then skip it)."""
        self._warned: set = set()
        self._text_length = None  # the text stream (passes.text_lengths) of the last graph that took the text
        """The text length the latest graph with a named text input showed (``backend.apply_passes``)."""
        self._coefs: dict = {}
        self.in_graph_mode = False
        _STATES[self.id] = self

    # ---- sites ----------------------------------------------------------------------------------
    def register(self, plan: SitePlan) -> SitePlan:
        """Add a compiled graph's site plan; returns it with its ``plan_id``."""
        plan.plan_id = len(self.plans)
        self.plans.append(plan)
        return plan

    def instance(self, plan: SitePlan, storage: Optional[int] = None) -> SiteRecord:
        """The module that runs ``plan`` with identity weight at ``storage`` (its data pointer; None: the plan
        has no identity weight, and its name alone tells modules apart), made on first sight."""
        key = (plan.name, storage)
        rec = self._by_key.get(key)
        if rec is None:
            name = self._names.get(storage) or plan.name
            taken = sum(1 for r in self.sites if r.key[0] == plan.name)
            if taken and name == plan.name:
                name = f"{plan.name}[{taken}]"
            rec = SiteRecord(name, plan, key, len(self.sites))
            self.sites.append(rec)
            self._by_key[key] = rec
        rec.plan = plan
        return rec

    def site(self, key) -> SiteRecord:
        """A site by id (int) or name (str)."""
        if isinstance(key, int):
            return self.sites[key]
        for rec in self.sites:
            if rec.name == key:
                return rec
        raise KeyError(key)

    def reset(self) -> None:
        """Forget run-time state (symbols, caches, counters, the clock, the history): the next call starts
        a new generation from a dense step. The sites found at compile time stay."""
        for s in self.sites:
            s.reset()
        self._dense_symbols.clear()
        self.passive_sites = frozenset()
        self.clock.reset()
        self.history = []
        self._hook_tick = False
        for b in self.blocks:
            b.reset()

    # ---- the clock ------------------------------------------------------------------------------
    def attach(self, model):
        """Place every call of ``model`` in the denoising loop from its ``timestep`` argument, and name the
        modules of graphs it runs by their paths in ``model``: what a model whose blocks alone are compiled
        needs (diffusers' ``compile_repeated_blocks``: no compiled graph sees the timestep, and one graph runs
        every block). A forward pre-hook reads the timestep on the host (one device sync per call, as the
        graphs' own clock does). Returns the hook's handle (``handle.remove()`` detaches)."""
        import inspect

        from torch import nn

        if not isinstance(model, nn.Module):
            raise TypeError(f"OmniState.attach needs an nn.Module, got {type(model).__name__}")
        params = list(inspect.signature(model.forward).parameters)
        names = [n for n in TIMESTEP_NAMES if n in params]
        if not names:
            raise ValueError(f"OmniState.attach: {type(model).__name__}.forward takes none of {TIMESTEP_NAMES}; "
                             f"its arguments are {params}")
        arg, pos = names[0], params.index(names[0])
        self.name_modules(model)

        def tick(module, args, kwargs):
            t = kwargs.get(arg, args[pos] if pos < len(args) else None)
            if t is not None:
                self.place_call(t)
                self._hook_tick = True

        return model.register_forward_pre_hook(tick, with_kwargs=True)

    def name_modules(self, model) -> None:
        """Name the attention modules of ``model`` by their paths in it, whichever graph runs them: where a
        graph's root is a part of the model (a graph break at a hooked block, as diffusers' context-parallel
        split hooks make for Wan; regional compilation) the passes see only paths within that part.
        :meth:`attach` does this too."""
        for mod_name, mod in model.named_modules():
            for leaf, p in mod.named_parameters(recurse=False):
                if leaf == "weight":
                    self._names[p.data_ptr()] = mod_name.rsplit(".", 1)[0] if "." in mod_name else mod_name
        for rec in self.sites:  # modules already seen take their paths
            path = self._names.get(rec.key[1])
            if path:
                rec.name = path

    def place_call(self, timestep) -> None:
        """Place a model call in the loop (``self.clock.position``): from its timestep (a tensor or number;
        the first value counts; one host read), or with ``OmniConfig.steps`` set from call counts, reading
        nothing (the timestep is checked once its copy reaches the host, never on a dispatch step)."""
        cfg = self.config
        gen = self.clock.generation
        if cfg.steps is None:
            if isinstance(timestep, torch.Tensor):
                timestep = float(timestep.reshape(-1)[0]) if timestep.numel() else 0.0
            pos = self.clock.tick(float(timestep), cfg.streams)  # streams: the bound on calls at one timestep
        else:
            pos = self.clock.tick_counted(cfg.steps, cfg.streams)
            if isinstance(timestep, torch.Tensor):
                _check_timestep_later(self.clock, pos, timestep,
                                      drain=config_action(cfg, pos.step) != DISPATCH)
        if pos.generation != gen:
            self.new_generation()
        if self.clock.ticks == 2:  # every graph of the model has run once: warn about what matched nothing
            unmatched = unmatched_override_patterns(cfg, [s.name for s in self.sites])
            if unmatched:
                self.warn_once("overrides", f"flashomni: OmniConfig.overrides patterns {unmatched} match none of the "
                               f"{len(self.sites)} attention sites (e.g. {[s.name for s in self.sites[:3]]}); their "
                               "settings apply nowhere")

    # ---- dispatch steps from CUDA graphs (omni_compile.graphs) ----------------------------------
    def set_step_coefs(self, x: float, args=()) -> None:
        """Write this step's Taylor coefficients ``[1, x, x²/2]`` into the device tensor the kernels read in
        graph mode (:meth:`step_coefs`), on the device of the first tensor in ``args``, without a sync."""
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"),
                      torch.device("cpu"))
        host = torch.tensor([1.0, x, x * x / 2], dtype=torch.float32, pin_memory=device.type == "cuda")
        self.step_coefs(device).copy_(host, non_blocking=True)

    def step_coefs(self, device) -> torch.Tensor:
        """``[1, x, x²/2]`` (fp32) on ``device``: the Taylor coefficients of the current dispatch step, which
        the ops read from memory in graph mode so a captured graph serves every dispatch step."""
        device = torch.device(device)
        buf = self._coefs.get(device)
        if buf is None:
            buf = self._coefs[device] = torch.zeros(3, dtype=torch.float32, device=device)
        return buf

    @contextlib.contextmanager
    def graph_mode(self):
        """Inside: dispatch steps take their Taylor coefficients from :meth:`step_coefs` (the runner of a
        captured graph sets them before every call)."""
        old, self.in_graph_mode = self.in_graph_mode, True
        try:
            yield
        finally:
            self.in_graph_mode = old

    def warn_once(self, key, message: str) -> None:
        """One :class:`FlashOmniWarning` per ``key`` and state."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, FlashOmniWarning, stacklevel=3)

    def configure(self, **changes) -> "OmniState":
        """Change the config without recompiling: ``state.configure(policy="topk", interval=3)``. The
        changes are validated (``ValueError`` as at construction), ``config`` is replaced and the run-time
        state is reset (the next call starts a new generation). Compiled graphs stay valid — policies and
        thresholds are read inside the site ops — except for the compile-time fields ``attention``,
        ``gemm_q``, ``gemm_o`` and ``use_inductor``, which raise ``ValueError`` once a graph was compiled,
        and ``block_cache``, which may be switched on only if the graph was compiled with it (split into
        block regions).
        Returns the state."""
        unknown = sorted(set(changes) - set(OmniConfig.field_names()))
        if unknown:
            raise ValueError(f"OmniState.configure: unknown field(s) {unknown}; valid: {', '.join(OmniConfig.field_names())}")
        new = self.config.replace(**changes)
        fixed = sorted(k for k in ("attention", "gemm_q", "gemm_o", "use_inductor", "cuda_graphs")
                       if getattr(new, k) != getattr(self.config, k))
        if fixed and self.compiles:
            raise ValueError(f"OmniState.configure: {fixed} are fixed when the graph is compiled; compile again "
                             "(torch._dynamo.reset()) to change them")
        # a graph compiled with a rule was split, or refused with the reason (blocks_reason): switching rules is
        # harmless either way; one compiled without a rule was never split, so a rule cannot take effect
        if (new.block_cache is not None and self.compiles
                and not any(e.get("regions") or e.get("blocks_reason") for e in self.compiles)):
            raise ValueError("OmniState.configure: block caching needs a graph split at block borders, which is "
                             "decided at compile time; compile with OmniConfig(block_cache=...) set (switching it "
                             "to None afterwards is allowed: every block then runs)")
        self.config = new
        self.reset()
        return self

    def new_generation(self) -> None:
        """Drop every stream's symbols and caches (the clock began a new generation), and the step
        history of generations before the one that just ended: ``report()`` after a generation still sees
        it, while a long-running process does not accumulate records (each holds its step's symbols)
        without bound."""
        for s in self.sites:
            s.streams = {}
            s.last_tick = -1
        for b in self.blocks:
            b.streams = {}
        if self.history:
            last = self.history[-1].generation
            self.history = [r for r in self.history if r.generation >= last]

    def register_block(self, record):
        """Add a block record (or refresh the record of the same name, keeping its run-time state)."""
        return _register(self.blocks, self._blocks_by_name, record, "block_id")

    def block(self, key):
        """A block record by id (int) or name (str)."""
        return self.blocks[key] if isinstance(key, int) else self._blocks_by_name[key]

    # ---- symbols --------------------------------------------------------------------------------
    def dense_symbols(self, batch: int, heads: int, seq_q: int, seq_kv: int, device):
        """All-compute symbols for a shape (cached: building them costs a few small allocations)."""

        key = (batch, heads, seq_q, seq_kv, str(device))
        sym = self._dense_symbols.get(key)
        if sym is None:
            sym = Symbols.dense(batch, heads, seq_q, seq_kv, self.config.block_q, self.config.block_kv, device=device)
            self._dense_symbols[key] = sym
        return sym

    # ---- memory and reporting -------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held by every site's caches and symbols, over all streams."""
        return (sum(st.memory_bytes() for s in self.sites for st in s.streams.values())
                + sum(bs.memory_bytes() for b in self.blocks for bs in b.streams.values()))

    def report(self) -> "Report":
        """Per-site and per-step figures: density of attention work, reused fraction, cache bytes."""

        return build_report(self)

    def summary(self) -> str:
        return summarize(self.sites)

    def __repr__(self) -> str:
        return f"OmniState(id={self.id}, policy={self.config.policy!r}, {self.summary()})"


@dataclass
class StepRecord:
    """What one site did for one stream at one step (figures computed lazily by ``report()``)."""

    generation: int
    step: int
    stream: int
    site_id: int
    action: str
    symbols: object
    """Symbols the attention ran with (dense ones on dense/update steps)."""
    work: int
    """Dense attention work of the call, ``B * H * Sq * Skv`` (the weight of its density)."""


def summarize(sites) -> str:
    """``"57 attention sites, 57 rewritten (19 joint, 38 self); GEMM-Q 57, GEMM-O 57"``."""
    if not sites:
        return "no attention sites"
    rw = [s for s in sites if s.rewritten]
    kinds = [f"{sum(s.kind == k for s in rw)} {k}" for k in ("joint", "self", "cross") if any(s.kind == k for s in rw)]
    kinds_s = f" ({', '.join(kinds)})" if kinds else ""
    n = len(sites)
    return (
        f"{n} attention site{'s' if n != 1 else ''}, {len(rw)} rewritten{kinds_s}; "
        f"GEMM-Q {sum(s.gemm_q for s in sites)}, GEMM-O {sum(s.gemm_o for s in sites)}"
    )


def get_state(state_id: int) -> OmniState:
    st = _STATES.get(state_id)
    if st is None:
        raise RuntimeError(
            f"flashomni: state {state_id} no longer exists (the OmniState used at compile time was freed)"
        )
    return st


def set_last_state(state: OmniState) -> None:
    global _LAST
    with _LOCK:
        _LAST = state


def last_state() -> Optional[OmniState]:
    """The state used by the most recent ``flashomni`` compile (None before any)."""
    return _LAST


def _check_timestep_later(clock, pos, timestep: torch.Tensor, drain: bool) -> None:
    """Queue the counted position's timestep for :meth:`StepClock.check` (on CUDA copied to pinned host memory
    without blocking) and, when ``drain``, check every queued one whose copy has landed, oldest first. The
    caller drains on dense and update steps only, so a dispatch step reads nothing."""
    t = timestep.reshape(-1)[:1]
    if t.numel():
        if t.is_cuda:
            host = torch.empty(1, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = t.clone(), None
        clock.pending.append((pos, host, done))
    while drain and clock.pending and (clock.pending[0][2] is None or clock.pending[0][2].query()):
        p, h, _ = clock.pending.popleft()
        clock.check(p, float(h))
