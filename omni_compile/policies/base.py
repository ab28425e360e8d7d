"""The policy protocol, what a policy may read (:class:`PolicyInput`), the registry, and shared helpers.

A **policy** turns what an update step knows about one attention site into symbols for the dispatch steps
that follow: bool tensors ``reuse [B, H, nQ]`` (True = the (query block, head) tile is reused from the
cache) and ``skip [B, H, nQ, nK]`` (True = that key block is left out of the tile's softmax). It is any
object with

* ``name`` — a short string (reports, ``site.runtime_reason``);
* ``needs_scores`` — the runtime computes block-pooled attention scores for it (``PolicyInput.scores``);
  costs one ``pooled_scores`` pass per site per update;
* ``needs_features`` — the runtime keeps the block means of the attention output at the last two full
  steps and hands the per-(query block, head) change to it (``PolicyInput.change``);
* ``reuses_text`` — it may reuse query blocks that hold text tokens. When False the runtime clears such
  bits (so a buggy policy cannot produce a wrong output) and skips the cache bias of projections whose
  rows are all text;
* ``__call__(inp: PolicyInput, config: OmniConfig) -> (reuse, skip)`` on the device of ``inp.q_text``;
* optionally ``symbols(inp, config, allow_reuse) -> Symbols or None``: the packed symbols made directly
  (fused kernels), which must equal what :func:`policy_symbols` makes of ``__call__``'s bits; None falls
  back to that path.

A policy that cannot run at a site raises :class:`PolicyFallback`; the runtime then keeps that site dense
and says why in ``site.runtime_reason``. Policies import nothing of the runtime (design.md, dependency
direction): only torch and this module.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch

Bits = Tuple[torch.Tensor, torch.Tensor]


class PolicyFallback(Exception):
    """Raised by a policy that cannot run at a site (the message says why); the site runs dense."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the vision tokens of a site's query sequence sit on the (frame, row, column) grid: tokens
    ``start … start + frames·height·width - 1`` are the grid in row-major (frame, row, column) order.
    For self/joint sites the keys are the same sequence."""

    frames: int
    height: int
    width: int
    start: int = 0
    kv_start: Optional[int] = None
    """Where the grid starts in the key sequence actually attended (differs from ``start`` when a
    key-padding mask dropped keys before it); None: ``start``."""

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclass
class PolicyInput:
    """What a policy may read on an update step (one site, one stream)."""

    scores: Optional[torch.Tensor]
    """``[B, H, nQ, nK]`` pooled scores on the ``(block_q, block_kv)`` grid (``ops.pooled_scores``: rows are
    softmaxed over key blocks, so each row sums to 1). None unless the policy declares ``needs_scores``."""
    scores_square: Optional[torch.Tensor]
    """``[B, H, nQ, nQ]`` pooled scores with key blocks of ``block_q`` rows (self/joint sites only, where
    keys are the query tokens): key block ``i`` is query block ``i``. Equals ``scores`` when the block
    sizes match; None for cross sites and when scores are not needed."""
    kind: str
    """``"joint"``, ``"self"`` or ``"cross"``."""
    q_text: torch.Tensor
    """``[nQ]`` bool: query block holds a text token."""
    kv_text: torch.Tensor
    """``[nK]`` bool: key block (``block_kv`` grid) holds a text token."""
    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    block_q: int
    block_kv: int
    text_q_blocks: int = 0
    """How many query blocks are text (a host int: policies branch on it without a device sync)."""
    text_kv_blocks: Optional[int] = None
    """How many key blocks hold a text token, as a host int (the runtime sets it); None where unknown,
    and a policy then reads ``kv_text`` (a device read-back)."""
    site_id: int = 0
    step: int = 0
    timestep: float = 0.0
    """The call's timestep (NaN under the counted clock, ``OmniConfig.steps``: it is not read then)."""
    site_name: str = ""
    """Module path of the site (``transformer_blocks.3.attn``)."""
    layout: Optional[TokenLayout] = None
    """Token layout of the vision tokens when known (inferred by the passes, or ``OmniConfig.token_layout``)."""
    layout_reason: str = "the token layout of this site is unknown"
    """Why ``layout`` is None (for a policy's :class:`PolicyFallback` message)."""
    change: Optional[torch.Tensor] = None
    """``[B, H, nQ]`` float: relative change per step of the block-mean attention output between the last
    two full steps, ``‖m_now − m_prev‖ / (‖m_prev‖ + 1e-6) / Δsteps`` over the head dim (``needs_features``
    policies only; None when fewer than two full steps were observed)."""
    head_offset: int = 0
    """Index of this call's first head among the site's: under Ulysses context parallelism a rank attends
    heads ``head_offset … head_offset + heads - 1`` of ``heads_total`` (content-blind policies draw per
    head of the whole site, so the ranks' bits differ as a single process's would)."""
    heads_total: int = 0
    """Heads of the whole site (``heads`` without context parallelism; 0: unknown, read as ``heads``)."""
    notes: List[str] = field(default_factory=list)
    """Remarks a policy leaves for ``site.runtime_reason`` (e.g. a composed member that fell back)."""

    @property
    def num_q_blocks(self) -> int:
        return self.q_text.numel()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_text.numel()

    @property
    def device(self) -> torch.device:
        return self.q_text.device


@runtime_checkable
class Policy(Protocol):
    """The protocol (module docstring). Subclass :class:`BasePolicy` for the defaults."""

    name: str
    needs_scores: bool
    needs_features: bool
    reuses_text: bool

    def __call__(self, inp: PolicyInput, config) -> Bits:  # pragma: no cover - protocol
        ...


class BasePolicy(abc.ABC):
    """Defaults for the protocol's declarations: reads nothing beyond the layout, never reuses text. A
    subclass must define ``__call__`` (instantiating one that does not raises ``TypeError``)."""

    name = "policy"
    needs_scores = False
    needs_features = False
    reuses_text = False

    @abc.abstractmethod
    def __call__(self, inp: PolicyInput, config) -> Bits:
        """``(reuse [B, H, nQ], skip [B, H, nQ, nK])`` bool tensors for this update (module docstring)."""

    def __or__(self, other):
        return Compose(self, other)


# ---- registry ---------------------------------------------------------------------------------------

POLICIES: Dict[str, object] = {}
"""Registered policies by name (``OmniConfig(policy=name)``)."""


def register_policy(name: str, policy, replace: bool = False):
    """Register ``policy`` under ``name`` so ``OmniConfig(policy=name)`` selects it. Returns the policy.
    A name already taken raises ``ValueError`` unless ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")
    check_policy(policy)
    if name in POLICIES and not replace and POLICIES[name] is not policy:
        raise ValueError(f"a policy named {name!r} is already registered (pass replace=True to replace it)")
    POLICIES[name] = policy
    return policy


def check_policy(policy) -> None:
    """Raise ``TypeError`` unless ``policy`` follows the protocol (callable, with the declarations)."""
    if not callable(policy):
        raise TypeError(f"a policy must be callable as policy(inp, config), got {type(policy).__name__}")
    for attr, typ in (("name", str), ("needs_scores", bool), ("needs_features", bool), ("reuses_text", bool)):
        if not isinstance(getattr(policy, attr, None), typ):
            raise TypeError(f"policy {policy!r} lacks the attribute {attr!r} ({typ.__name__}); subclass "
                            "omni_compile.policies.BasePolicy or set it")


def resolve_policy(spec):
    """The policy object for ``OmniConfig.policy``: a registered name, a policy object, or a tuple/list of
    those (composed by OR, :class:`Compose`). Unknown names raise ``ValueError``."""
    if isinstance(spec, str):
        p = POLICIES.get(spec)
        if p is None:
            raise ValueError(f"OmniConfig.policy must be one of {tuple(POLICIES)} or a policy object, got {spec!r}")
        return p
    if isinstance(spec, (tuple, list)):
        if not spec:
            raise ValueError("OmniConfig.policy: an empty tuple composes nothing")
        return spec[0] if len(spec) == 1 and not isinstance(spec[0], (str, tuple, list)) else Compose(*spec)
    try:
        check_policy(spec)
    except TypeError as e:
        raise ValueError(f"OmniConfig.policy must be one of {tuple(POLICIES)} or a policy object: {e}") from None
    return spec


def policy_name(spec) -> str:
    """A printable name for a policy spec (name, object or tuple)."""
    try:
        return resolve_policy(spec).name
    except (ValueError, TypeError):
        return repr(spec)


# ---- composition ------------------------------------------------------------------------------------


class Compose(BasePolicy):
    """OR of several policies' bits: a tile is reused when any member reuses it, a key block skipped when
    any member skips it (``Compose(Window(size=(1, 8, 8)), "flashomni")`` or ``policy=("window",
    "flashomni")``). Reused tiles carry no skip bits. A computed row whose key blocks all end up skipped
    (the members' kept sets do not intersect) keeps one: the one with the largest pooled score when scores
    were computed, else the block holding the row's first query token (block 0 for cross-attention) —
    :func:`keep_one_key`. A member that raises :class:`PolicyFallback` contributes no bits (its reason
    goes to ``site.runtime_reason``); if every member falls back, the composition does."""

    def __init__(self, *policies):
        if not policies:
            raise ValueError("Compose needs at least one policy")
        self.policies = tuple(resolve_policy(p) for p in policies)
        self.name = "+".join(p.name for p in self.policies)
        self.needs_scores = any(p.needs_scores for p in self.policies)
        self.needs_features = any(p.needs_features for p in self.policies)
        self.reuses_text = any(p.reuses_text for p in self.policies)

    def __call__(self, inp: PolicyInput, config) -> Bits:
        reuse = skip = None
        fell = []
        for p in self.policies:
            try:
                r, s = p(inp, config)
            except PolicyFallback as e:
                fell.append(f"{p.name}: {e}")
                continue
            reuse = r if reuse is None else reuse | r
            skip = s if skip is None else skip | s
        if reuse is None:
            raise PolicyFallback("; ".join(fell))
        if fell:
            inp.notes.append("composed member(s) fell back and add no bits: " + "; ".join(fell))
        return reuse, _skip_of_computed_rows(skip, reuse, inp)

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.policies)) + ")"

    def __eq__(self, other) -> bool:
        return isinstance(other, Compose) and self.policies == other.policies

    __hash__ = None


# ---- helpers shared by the strategies -------------------------------------------------------------


def no_bits(inp: PolicyInput) -> Bits:
    """All-compute bits (nothing reused, nothing skipped)."""
    B, H, nQ, nK = inp.batch, inp.heads, inp.num_q_blocks, inp.num_kv_blocks
    return (torch.zeros(B, H, nQ, dtype=torch.bool, device=inp.device),
            torch.zeros(B, H, nQ, nK, dtype=torch.bool, device=inp.device))


def keep_one_key(skip: torch.Tensor, reuse: torch.Tensor, inp: PolicyInput) -> torch.Tensor:
    """``skip`` with one key block un-skipped in every computed row that skips them all: the row's
    largest pooled score when ``inp.scores`` is there, else the block holding the row's first query token
    (self/joint; block 0 for cross). No host sync."""
    return _unskip_empty_rows(skip, skip.all(-1) & ~reuse, inp)


def _skip_of_computed_rows(skip: torch.Tensor, reuse: torch.Tensor, inp: PolicyInput) -> torch.Tensor:
    """``skip`` without bits on reused tiles and with one key block kept in every computed row (as
    :func:`keep_one_key`): what :class:`Compose` and :func:`finalize` hand on. Reused rows lose their skip
    bits first, so a row that still skips every key block is a computed one."""
    skip = skip > reuse.unsqueeze(-1)  # skip & ~reuse in one op (bools: True > False only)
    return _unskip_empty_rows(skip, skip.all(-1), inp)


def _unskip_empty_rows(skip: torch.Tensor, empty: torch.Tensor, inp: PolicyInput) -> torch.Tensor:
    """``skip`` with the picked key block (:func:`keep_one_key`) cleared in the rows ``empty [B, H, nQ]``
    marks, which must skip every key block. As ``empty & one-hot(pick)`` lies inside ``skip``, clearing is
    an exclusive or: two ops with a cached one-hot table when there are no scores (instead of a zero fill,
    a scatter, a negation and an and)."""
    B, H, nQ, nK = skip.shape
    if inp.scores is not None:
        onehot = inp.scores.argmax(-1, keepdim=True) == _key_positions(nK, skip.device)  # [B, H, nQ, nK]
    else:
        onehot = _diagonal_onehot(nQ, nK, inp.block_q, inp.block_kv, inp.kind == "cross", skip.device)
    return skip ^ (empty.unsqueeze(-1) & onehot)


def _key_positions(nK: int, device) -> torch.Tensor:
    """``[nK]`` int64 ``0 … nK-1`` on ``device``, made once."""
    from omni_compile.ops._common import device_constant

    return device_constant(("key_positions", nK), device, lambda: torch.arange(nK))


def _diagonal_onehot(nQ: int, nK: int, block_q: int, block_kv: int, cross: bool, device) -> torch.Tensor:
    """``[nQ, nK]`` bool: True at the key block holding each query block's first token (block 0 for cross
    attention), made once per shape and device."""
    from omni_compile.ops._common import device_constant

    def build():
        pick = torch.zeros(nQ, dtype=torch.long) if cross else (torch.arange(nQ) * block_q // block_kv).clamp_max(nK - 1)
        return pick.unsqueeze(-1) == torch.arange(nK)

    return device_constant(("diagonal_onehot", nQ, nK, block_q, block_kv, cross), device, build)


def finalize(policy, inp: PolicyInput, reuse: torch.Tensor, skip: torch.Tensor) -> Bits:
    """Check a policy's output and enforce the contract the runtime relies on: shapes and dtypes, no text
    row reused unless ``reuses_text``, no skip bits on reused tiles, a kept key block in every computed row."""
    B, H, nQ, nK = inp.batch, inp.heads, inp.num_q_blocks, inp.num_kv_blocks
    name = getattr(policy, "name", repr(policy))
    for what, t, shape in (("reuse", reuse, (B, H, nQ)), ("skip", skip, (B, H, nQ, nK))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or tuple(t.shape) != shape:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"policy {name!r} returned {what} as {got}; expected a bool tensor of shape {list(shape)}")
    dev = inp.device
    if reuse.device != dev or skip.device != dev:
        reuse, skip = reuse.to(dev), skip.to(dev)
    if not getattr(policy, "reuses_text", False):
        reuse = reuse > inp.q_text.view(1, 1, nQ)  # reuse & ~text in one op (bools: True > False only)
    return reuse, _skip_of_computed_rows(skip, reuse, inp)


def run_policy(policy, inp: PolicyInput, config) -> Bits:
    """A policy's bits as the runtime takes them: called and :func:`finalize`-d."""
    policy = resolve_policy(policy)
    return finalize(policy, inp, *policy(inp, config))


def policy_symbols(policy, inp: PolicyInput, config, allow_reuse: bool = True):
    """What the runtime does with a policy on an update step: its symbols (``ops.Symbols``, with the masks
    kept as their dense view). A policy with a ``symbols(inp, config, allow_reuse)`` method makes them
    itself (the ``flashomni`` policy's fused kernels) unless that returns None; any other is called,
    :func:`finalize`-d and packed. ``allow_reuse=False`` clears the reuse bits after the decision: the rows
    the policy would reuse are computed, without skip bits. Raises :class:`PolicyFallback` as the policy
    does."""
    policy = resolve_policy(policy)
    make = getattr(policy, "symbols", None)
    if make is not None:
        out = make(inp, config, allow_reuse)
        if out is not None:
            return out
    return symbols_from_call(policy, inp, config, allow_reuse)


def runs_own_call(policy, cls) -> bool:
    """Whether ``policy`` runs ``cls.__call__`` itself: a subclass that overrides it makes other bits, so a
    ``symbols`` shortcut of ``cls`` (fused kernels, a memo) must not stand in for them."""
    return type(policy).__call__ is cls.__call__


def symbols_from_call(policy, inp: PolicyInput, config, allow_reuse: bool = True):
    """:func:`policy_symbols` without the policy's own ``symbols``: called, :func:`finalize`-d, packed."""
    from omni_compile.ops import Symbols

    reuse, skip = finalize(policy, inp, *policy(inp, config))
    if not allow_reuse:
        reuse = torch.zeros_like(reuse)
    # the masks are this call's own (finalize made them): the symbols keep them as their dense view
    return Symbols.from_dense(reuse, skip, inp.block_q, inp.block_kv, inp.seq_q, inp.seq_kv, share_dense=True)


def block_text_mask(segments, seq: int, block: int, device=None) -> torch.Tensor:
    """``[ceil(seq/block)]`` bool: block holds at least one token of a ``"text"`` segment."""
    n = -(-seq // block)
    tok = torch.zeros(n * block, dtype=torch.bool)
    for mod, a, b in segments:
        if mod == "text":
            tok[a:b] = True
    return tok.reshape(n, block).any(1).to(device)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, nQ, D]`` fp32 means of ``x [B, H, S, D]`` over blocks of ``block`` rows (the last one partial)."""
    B, H, S, D = x.shape
    n = -(-S // block)
    pad = n * block - S
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.reshape(B, H, n, block, D).sum(3)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts.view(1, 1, n, 1)


def feature_change(now: torch.Tensor, prev: torch.Tensor, steps: int) -> torch.Tensor:
    """``[B, H, nQ]``: ``‖now − prev‖ / (‖prev‖ + 1e-6) / steps`` over the last axis (block means)."""
    return (now - prev).norm(dim=-1) / (prev.norm(dim=-1) + 1e-6) / max(1, int(steps))


def _check_fraction(owner: str, name: str, v, lo_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0.0 < v if lo_open else 0.0 <= v) and v <= 1.0
    if not ok:
        raise ValueError(f"{owner}.{name} must be a number from {'more than ' if lo_open else ''}0 to 1, got {v!r}")

