"""``OmniState``: the attention sites of compiled graphs and everything they carry across steps.

A state is made by the user (``OmniState(OmniConfig(...))`` passed as ``options={"state": state}``) or by
the backend (reachable with :func:`omni_compile.last_state`). The rewritten graphs name a state and a
site by integer ids (``state_id``, ``site_id``); the site ops look both up here at run time, so symbols,
caches and step counters live in Python/device memory owned by the state, never as graph constants —
one compiled graph serves every denoising step without recompiling.

Site records are keyed by name (module path): compiling the same model again (a recompile, a graph
break) reuses the record and its id.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Optional

from .config import OmniConfig

_IDS = itertools.count(1)
_STATES: "weakref.WeakValueDictionary[int, OmniState]" = weakref.WeakValueDictionary()
_LAST: Optional["OmniState"] = None
_LOCK = threading.Lock()


@dataclass
class SiteRecord:
    """One attention site: what the passes found and did, and its run-time state."""

    name: str
    """Module path of the attention module (``transformer_blocks.3.attn``)."""
    kind: str = "self"
    """``"joint"`` (text+vision in one sequence), ``"self"`` or ``"cross"`` (keys from other tokens)."""
    rewritten: bool = False
    reason: Optional[str] = None
    """Why the site was left dense (None when rewritten)."""
    gemm_q: bool = False
    gemm_o: bool = False
    gemm_q_reason: Optional[str] = None
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
    """``None`` or ``"key_padding"`` (masked keys are dropped before the attention op)."""
    q_projections: list = field(default_factory=list)
    """``(module path, row_offset)`` of each q projection (row_offset None where GEMM-Q is not valid)."""
    out_projections: list = field(default_factory=list)
    """``(module path, row_offset, rows, col_offset)`` of each output projection found."""
    site_id: int = -1
    # ---- run-time state (the runtime of issue 4 extends this) ----
    calls: int = 0
    """Attention calls run through the site op."""
    linear_q_calls: int = 0
    linear_o_calls: int = 0
    fallbacks: int = 0
    """Calls that fell back to dense PyTorch attention (mask the ops cannot express)."""
    symbols: object = None
    """Symbols of the latest attention call (``omni_compile.ops.Symbols``)."""

    @property
    def text_tokens(self) -> int:
        return sum(b - a for m, a, b in self.segments if m == "text")

    def __repr__(self) -> str:
        flags = []
        if self.gemm_q:
            flags.append("GEMM-Q")
        if self.gemm_o:
            flags.append("GEMM-O")
        status = ("rewritten " + "+".join(flags)) if self.rewritten else f"dense ({self.reason})"
        return f"<site {self.site_id} {self.name} {self.kind}: {status}>"


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
        self._by_name: dict = {}
        self.compiles: list = []
        """One dict per backend call: sites found/rewritten, pass and compile seconds."""
        self._dense_symbols: dict = {}
        _STATES[self.id] = self

    # ---- sites ----------------------------------------------------------------------------------
    def register(self, record: SiteRecord) -> SiteRecord:
        """Add a site (or refresh the record of the same name) and return the stored record."""
        old = self._by_name.get(record.name)
        if old is not None:
            record.site_id = old.site_id
            for f in ("calls", "linear_q_calls", "linear_o_calls", "fallbacks", "symbols"):
                setattr(record, f, getattr(old, f))
            self.sites[old.site_id] = record
        else:
            record.site_id = len(self.sites)
            self.sites.append(record)
        self._by_name[record.name] = record
        return record

    def site(self, key) -> SiteRecord:
        """A site by id (int) or name (str)."""
        if isinstance(key, int):
            return self.sites[key]
        return self._by_name[key]

    def reset(self) -> None:
        """Forget run-time state (symbols, counters); the sites found at compile time stay."""
        for s in self.sites:
            s.calls = s.linear_q_calls = s.linear_o_calls = s.fallbacks = 0
            s.symbols = None
        self._dense_symbols.clear()

    # ---- symbols --------------------------------------------------------------------------------
    def dense_symbols(self, batch: int, heads: int, seq_q: int, seq_kv: int, device):
        """All-compute symbols for a shape (cached: building them costs a few small allocations)."""
        from omni_compile.ops import Symbols

        key = (batch, heads, seq_q, seq_kv, str(device))
        sym = self._dense_symbols.get(key)
        if sym is None:
            sym = Symbols.dense(batch, heads, seq_q, seq_kv, self.config.block_q, self.config.block_kv, device=device)
            self._dense_symbols[key] = sym
        return sym

    # ---- reporting ------------------------------------------------------------------------------
    def summary(self) -> str:
        return summarize(self.sites)

    def __repr__(self) -> str:
        return f"OmniState(id={self.id}, policy={self.config.policy!r}, {self.summary()})"


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
