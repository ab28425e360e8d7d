"""``OmniConfig``: every knob of the ``flashomni`` backend, each with its trade-off.

A config is immutable (a frozen dataclass): make a new one with ``config.replace(...)``, or change a
state's with ``OmniState.configure(...)``. Invalid values raise ``ValueError`` at construction, naming the
field and its valid range. Each knob has one home: the sparsity strategy's own thresholds live on its
policy object (``FlashOmni(tau_q=...)``, ``Fixed(reuse=...)``; ``omni_compile.policies``), the block-caching
rule's on its object (``FixedBlocks(0.5)``, ``ComputedShare(0.3)``, ``ResidualChange(0.1)``;
``omni_compile.block_cache``), everything about the schedule and the compiled graph here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import types
from dataclasses import dataclass
from typing import Optional

from .block_cache import ResidualChange, resolve_block_cache
from .policies import resolve_policy

#: Fields ``OmniConfig.overrides`` may set per site. The others are global: they fix the compiled graph
#: (``attention``, ``gemm_q``, ``gemm_o``, ``use_inductor``, ``block_cache``), the symbol grid (``block_q``,
#: ``block_kv``), the cache layout and the warm-up observations (``taylor_order``, ``warmup``), the clock
#: (``steps``, ``streams``, ``final_dense``) or a budget over all sites (``max_cache_mb``).
SITE_FIELDS = ("policy", "interval")


@dataclass(frozen=True)
class OmniConfig:
    policy: object = "flashomni"
    """How symbols are chosen on update steps: a registered name, a policy object
    (``omni_compile.policies``: ``FlashOmni(tau_q=..., tau_kv=...)``, ``Fixed(reuse=..., skip=...)``,
    ``Window(size=...)``, ``TopK(mass=...)``, ``Broadcast()``, ``TaylorSeer(fraction=...)`` or a user policy
    following the protocol in docs/policies.md), or a tuple of those whose bits are OR-ed
    (``("window", "flashomni")``). A name selects the registered object with its default knobs
    (``omni_compile.policies.POLICIES``). Every strategy runs on the same ops and compiled graph;
    docs/policies.md compares them. ``"flashomni"`` (default): the paper's policy — vision query blocks that
    feed the text little and are little guided by it are reused, and per computed query block the key
    blocks with the least pooled attention mass are skipped; adapts to the content, costs one pooled-score
    estimate per site per update. ``"dense"``: every tile computed — the rewritten graph then equals the
    model (equivalence tests, the quality reference). ``"fixed"``: content-blind tiles at a controlled
    density for benchmarks (worse quality than ``"flashomni"`` at the same density)."""

    block_cache: object = ResidualChange(0.1)
    """Whole-block caching (docs/runtime.md, "Block caching"): on dispatch steps a block whose bit is set
    does not run at all; its outputs are its inputs plus the Taylor forecast of its residual contribution
    (output − input per residual stream) stored on the last update. The rule that sets the bits, per block
    and CFG stream on every update: ``ResidualChange(threshold)`` (default, ``ResidualChange(0.1)``: blocks
    whose residual changed by at most 10 % per step between their last two observations, first-block /
    TeaCache spirit; with the default policy on the learned zoo model it caches 96 % of the block-steps of
    dispatch steps and keeps 39.8 dB and SSIM 0.982 against the dense images, docs/benchmarks.md);
    ``FixedBlocks(fraction)`` (evenly
    spaced blocks, blind to content: controlled work for benchmarks); ``ComputedShare(s_q)`` (the paper's
    S_q fallback: blocks whose attention sites compute little); None (the graph is not split, only the
    attention sites are sparse). The names ``"fixed"``, ``"sq"`` and ``"change"`` select those with their
    defaults. Skipped blocks save all their kernels (GEMMs included: the coarse granularity is where
    FLUX-size speed comes from) at the price of forecast error; the rule keeps the residuals of every block
    (``taylor_order + 1`` tensors of each residual stream's shape: ~3 GB at FLUX.1 1024², ~24 GB at
    HunyuanVideo 720p, bf16, order 1; ``max_cache_mb`` caps them). Splitting the graph at block borders
    costs one compiled region per block and is fixed at compile time; a graph without blocks or without the
    timestep (a block compiled alone) is compiled whole, and its attention sites still run the policy."""

    block_q: int = 128
    """Query rows per symbol block. Larger blocks mean fewer symbols and better kernel efficiency, but
    coarser caching decisions (a whole block of tokens is reused or computed together). Power of two,
    16 to 256."""

    block_kv: int = 128
    """Key rows per symbol block. Larger blocks skip work in bigger, more efficient chunks, but drop
    more useful keys with each skipped block. Power of two, 16 to 256."""

    use_inductor: bool = True
    """Compile the rewritten graph with Inductor (``compile_fx``) so everything around the sites is fused
    as with the default backend. ``False`` runs the rewritten FX graph as is: compiles in well under a
    second instead of 8–30 s on a small CPU, but runs unfused (for tests and debugging)."""

    attention: bool = True
    """Rewrite attention calls into the sparse attention op. Off leaves every site dense and untouched
    (then GEMM-Q/GEMM-O are off too, since their savings come from the attention symbols)."""

    gemm_q: bool = True
    """Rewrite q projections into GEMM-Q where the prologue is per-(token, head) local: reused tiles
    are not projected. Off computes q densely (slightly slower, identical output)."""

    gemm_o: bool = True
    """Rewrite output projections into GEMM-O: reduce only over computed heads and add a cache bias
    for the reused ones. Off keeps the dense projection; the runtime must then keep the attention
    output itself for reused tiles (more memory: ``taylor_order + 1`` tensors of ``[B, H, S, D]`` per
    site instead of ``taylor_order + 1`` of ``[B, S, C]`` plus ``taylor_order`` of ``[B, S, H*D]``)."""

    cuda_graphs: bool = False
    """Replay dispatch steps from CUDA graphs (``omni_compile.graphs``): between two updates every dispatch
    step runs the same kernels, so after one ordinary dispatch step the next is captured and the rest
    replayed, with no per-kernel host work. Pair it with ``steps`` (the counted clock) for dispatch steps
    that read nothing on the host. Needs CUDA (ignored elsewhere); graphs whose sites read an attention
    mask on the host, or follow per-site intervals, run as usual. ``torch.compile(..., mode=
    "reduce-overhead")`` without options turns it on. Fixed at compile time."""

    interval: int = 5
    """Steps between two update steps (N in the paper; 6 for HunyuanVideo, 5 in the FLUX prototype).
    The ``interval - 1`` steps in between are dispatch steps that reuse the symbols and caches: larger
    means more steps run sparse (faster) but symbols and forecasts go staler (lower quality). ``1``
    makes every step an update step (dense output). Integer, 1 to 1000."""

    warmup: int = 8
    """Steps at the start of each generation that run dense (W in the paper, 8); the last of them
    (step ``warmup - 1``) is the first update step. More warm-up protects the early, fast-changing
    steps that set the image layout, at the cost of fewer sparse steps. Integer, 1 to 1000."""

    final_dense: int = 0
    """Steps at the end of each generation that run dense (the paper's final dense step): the last
    denoising steps set fine detail, and a dense step there removes the forecast error the dispatch steps
    before it left in the latent, at the cost of those steps' savings. Needs the loop's length
    (``steps``, the counted clock); 0 (default) runs none. Integer, 0 to 1000."""

    taylor_order: int = 1
    """Order D of the Taylor forecast of reused tiles between updates (finite differences of the
    features at the last D + 1 full steps). 0 reuses the last value as is; 1 (paper's HunyuanVideo) and
    2 (FLUX prototype) extrapolate the trend — better quality at longer intervals, but each order adds
    a cache tensor per site (memory) and one more term to add on dispatch steps; high orders can
    overshoot when features change irregularly. Integer, 0 to 2."""

    max_cache_mb: Optional[float] = None
    """Cap on the memory the runtime's caches may hold (MiB, all sites and streams). A site whose
    caches would exceed it on an update step gets no reused tiles until its next update (it still skips
    key blocks): memory is bounded, speed and quality degrade gracefully for the sites served last.
    None: no cap. A finite number, 0 or more, or None."""

    token_layout: Optional[tuple] = None
    """``(frames, height, width)`` (or ``(height, width)``) of the vision tokens, in the order the model
    lays them out, for policies that need it (``"window"``). The passes infer it from a conv patch
    embedding (SD3, PixArt, DiT, CogVideoX, HunyuanVideo, Wan); models that pack latents before the
    transformer (FLUX, LTX) need it here — for FLUX at H×W pixels, ``(1, H // 16, W // 16)``. A layout that
    does not match a site's vision token count is not used (the site falls back to dense with the reason).
    Positive ints."""

    overrides: Optional[dict] = None
    """Per-site settings: ``{pattern: {field: value}}`` with ``fnmatch`` patterns on the site name (module
    path, e.g. ``"transformer_blocks.0.*"``, ``"single_transformer_blocks.3*"``); a site takes every
    matching entry in order (later ones win). E.g. ``{"transformer_blocks.0.*": {"policy": "dense"}}``
    keeps the first block exact (quality where early layers matter, at the cost of its share of the
    work); ``{"single_transformer_blocks.*": {"policy": FlashOmni(tau_q=0.3)}}`` gives those sites other
    thresholds. Settable fields: ``policy``, ``interval`` (the rest are global)."""

    steps: Optional[int] = None
    """How the runtime places a model call in the denoising loop. None (default): from the call's
    timestep — one that moves on in the loop's direction (falling or rising, learned from the first two
    steps) is the next step, an equal one the next CFG stream, one that turns back a new generation
    (docs/runtime.md has every rule); it works with any loop but reads the timestep on the host every call, which waits for
    the GPU when the timestep is on it (one device sync per call: the host cannot queue the next step
    while the GPU runs this one, which costs time when a step's host work is close to its GPU time, as
    at FLUX size). An integer: the loop's number of denoising steps; calls are placed by counting them
    (``streams`` calls per step, a new generation every ``steps`` steps or at ``OmniState.reset()``) and
    nothing is read, so the host runs ahead freely. The timesteps are still checked once their copies
    reach the host without blocking: a loop that does not match raises ``RuntimeError`` up to a few calls
    late. Policies then see ``timestep`` as NaN. Integer, 1 or more, or None."""

    streams: int = 1
    """Model calls per denoising step (2 for a pipeline that runs the conditional and unconditional passes
    as two calls; 1 when CFG is batched into one call or absent). With ``steps`` set the counted clock
    places calls by it. With ``steps=None`` the timestep clock takes up to ``max(8, streams)`` calls at one
    timestep as the streams of one step and starts a new generation at the next one (a new image at the
    same timestep), so only pipelines with more than 8 calls per step need to set it. Integer, 1 to 16."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        resolve_policy(self.policy)  # ValueError "OmniConfig.policy must be one of ..." when unknown
        object.__setattr__(self, "block_cache", resolve_block_cache(self.block_cache))
        self._validate_layout_and_overrides()
        for name in ("block_q", "block_kv"):
            v = getattr(self, name)
            if not _is_int(v) or v < 16 or v > 256 or v & (v - 1):
                raise ValueError(f"OmniConfig.{name} must be a power of two from 16 to 256, got {v!r}")
        for name in ("use_inductor", "attention", "gemm_q", "gemm_o", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"OmniConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name, lo, hi in (("interval", 1, 1000), ("warmup", 1, 1000), ("taylor_order", 0, 2)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo or v > hi:
                raise ValueError(f"OmniConfig.{name} must be an integer from {lo} to {hi}, got {v!r}")
        m = self.max_cache_mb
        if m is not None and (not _is_number(m) or not math.isfinite(m) or m < 0):
            raise ValueError(f"OmniConfig.max_cache_mb must be None or a finite number, 0 or more, got {m!r}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise ValueError(f"OmniConfig.steps must be None or an integer, 1 or more, got {self.steps!r}")
        if not _is_int(self.final_dense) or not 0 <= self.final_dense <= 1000:
            raise ValueError(f"OmniConfig.final_dense must be an integer from 0 to 1000, got {self.final_dense!r}")
        if self.final_dense and self.steps is None:
            raise ValueError("OmniConfig.final_dense needs the loop's length: set OmniConfig.steps (the counted "
                             "clock) to the number of denoising steps")
        if not _is_int(self.streams) or not 1 <= self.streams <= 16:
            raise ValueError(f"OmniConfig.streams must be an integer from 1 to 16, got {self.streams!r}")

    def _validate_layout_and_overrides(self) -> None:
        t = self.token_layout
        if t is not None:
            ok = isinstance(t, (tuple, list)) and len(t) in (2, 3) and all(_is_int(v) and v >= 1 for v in t)
            if not ok:
                raise ValueError(f"OmniConfig.token_layout must be None or (frames, height, width) / (height, width) "
                                 f"of positive ints, got {t!r}")
            object.__setattr__(self, "token_layout", (1,) * (3 - len(t)) + tuple(t))
        o = self.overrides
        if o is None:
            return
        if not isinstance(o, (dict, types.MappingProxyType)):
            raise ValueError(f"OmniConfig.overrides must be None or a dict {{pattern: {{field: value}}}}, got {o!r}")
        frozen = {}
        for pat, fields in o.items():
            if not isinstance(pat, str) or not isinstance(fields, (dict, types.MappingProxyType)):
                raise ValueError(f"OmniConfig.overrides entries must be str pattern -> dict of fields, got {pat!r}: {fields!r}")
            bad = sorted(set(fields) - set(SITE_FIELDS))
            if bad:
                raise ValueError(f"OmniConfig.overrides[{pat!r}]: {bad} cannot be set per site; valid fields: "
                                 f"{', '.join(SITE_FIELDS)} (a policy's own knobs go on its object, e.g. "
                                 "{'policy': FlashOmni(tau_q=0.3)})")
            try:
                dataclasses.replace(self, overrides=None, **fields)
            except ValueError as e:
                raise ValueError(f"OmniConfig.overrides[{pat!r}]: {e}") from None
            frozen[pat] = types.MappingProxyType(dict(fields))
        # read-only copies: a config never changes after it is made (the runtime caches what it derives)
        object.__setattr__(self, "overrides", types.MappingProxyType(frozen))

    def for_site(self, name: str) -> "OmniConfig":
        """The effective config of the site named ``name``: every matching ``overrides`` entry applied in
        order (``fnmatch`` on the module path); ``overrides`` is None in the result. ``self`` when none match."""
        if not self.overrides:
            return self
        merged: dict = {}
        for pat, fields in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat):
                merged.update(fields)
        return dataclasses.replace(self, overrides=None, **merged) if merged else self

    @property
    def max_cache_bytes(self) -> Optional[int]:
        return None if self.max_cache_mb is None else int(self.max_cache_mb * 2**20)

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "OmniConfig":
        return dataclasses.replace(self, **changes)


def unmatched_override_patterns(config: OmniConfig, site_names) -> list:
    """The patterns of ``config.overrides`` that match none of ``site_names`` (module paths, as
    :meth:`OmniConfig.for_site` matches them: ``fnmatch``, case-sensitive), in the order given. The backend
    warns about them once, at the first call: a misspelt pattern (``"transformer_block.0.*"``) would
    otherwise leave its sites on the global settings without a word."""
    if not config.overrides:
        return []
    names = list(site_names)
    return [p for p in config.overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
