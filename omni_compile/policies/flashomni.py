"""``flashomni`` — the paper's multi-granularity policy (FlashOmni, "One Engine, Many Strategies").

On update steps, from block-pooled attention scores (docs/runtime.md states every choice where the paper is
open):

* **Blocks and modality.** A query (key) block is *text* when it holds at least one text token. Text query
  blocks are never reused and never skip keys (FlashOmni's reference toy prunes vision rows only); text
  key blocks are never skipped (the prompt's few blocks carry the conditioning).
* **Joint sites** (text + vision in one sequence), on the pooled scores ``P`` over a square grid (key blocks
  of ``block_q`` rows, so key block ``i`` is query block ``i``; rows softmaxed over key blocks):

  - vision→text contribution ``C_i = Σ_{j text} P[j, i]`` — how much vision block ``i`` feeds the text;
  - text→vision guidance ``G_i = Σ_{j text} P[i, j] / Σ_{i' vision} P[i', j]`` — the column-normalised
    share of text block ``j``'s attention from vision rows that goes to block ``i``, summed over ``j``;
  - reused: vision blocks in the low tail of **both**: sorted ascending, a block is in a metric's tail
    when the cumulative sum up to and including it is ``<= tau_q`` times the metric's total over vision
    blocks.
* **Self-attention without text** (vision only): the same tail rule on the column mass
  ``C_i = Σ_j P[j, i]`` (how much block ``i`` contributes to all queries).
* **Cross-attention** (vision queries, text keys): the tail rule on the guidance ``G`` alone.
* **Key skipping** (every kind): per computed vision query block, over the pooled scores on the
  ``(block_q, block_kv)`` grid, non-text key blocks sorted ascending are skipped while their cumulative
  mass is ``<= tau_kv``; the row's largest block is always kept. Kept blocks carry ``>= 1 - tau_kv``.

Decisions are per (batch item, head): the symbol format is per head and a batched-CFG call carries cond and
uncond items with their own bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from omni_compile.ops import Symbols
from omni_compile.ops.flashomni_policy import MODES, flashomni_decision, flashomni_mode
from omni_compile.ops.flashomni_policy import flashomni_symbols as fused

from .base import BasePolicy, Bits, PolicyFallback, PolicyInput, _check_fraction, runs_own_call


def flashomni(inp: PolicyInput, config=None, tau_q: float = 0.5, tau_kv: float = 0.05) -> Bits:
    """The paper's policy (module docstring) in PyTorch ops, with thresholds ``tau_q`` / ``tau_kv``."""
    mode = flashomni_mode(inp.kind, inp.text_q_blocks, inp.num_q_blocks)
    return flashomni_decision(inp.scores, inp.scores_square, inp.q_text, inp.kv_text, mode, tau_q, tau_kv)


def flashomni_symbols(inp: PolicyInput, allow_reuse: bool = True, tau_q: float = 0.5, tau_kv: float = 0.05):
    """The policy's symbols from ``ops.flashomni_symbols`` (two Triton launches on CUDA, the PyTorch ops
    elsewhere): the bits of :func:`flashomni`, packed, with the attention's key lists decoded. No
    :func:`~.base.finalize`: the decision meets the runtime's contract by construction (tested)."""
    return fused_symbols(inp, flashomni_mode(inp.kind, inp.text_q_blocks, inp.num_q_blocks), tau_q, tau_kv,
                         allow_reuse)


def fused_symbols(inp: PolicyInput, mode: int, tau_q: float, tau_kv: float, allow_reuse: bool = True):
    """``ops.flashomni_symbols``' outputs on ``inp``'s scores as a ``Symbols`` object (its masks as the
    dense view, its key lists as ``kv_schedule``): the flashomni decision of form ``mode`` with these
    thresholds (also ``topk``'s mass mode: ``tau_q = 0``)."""
    square = None if mode == MODES["cross"] else inp.scores_square
    reuse, skip, reuse_bits, skip_bits, idx, cnt = fused(inp.scores, square, inp.q_text, inp.kv_text, mode, tau_q,
                                                         tau_kv, allow_reuse)
    return Symbols.from_decoded(reuse_bits, skip_bits, inp.block_q, inp.block_kv, inp.seq_q, inp.seq_kv,
                                (reuse, skip), (idx, cnt))


@dataclass(frozen=True, repr=False)
class FlashOmni(BasePolicy):
    """The paper's policy: ``OmniConfig(policy=FlashOmni(tau_q=0.5, tau_kv=0.05))``; ``policy="flashomni"``
    is this with its defaults."""

    tau_q: float = 0.5
    """Caching threshold: vision query blocks are reused, lowest metric first (vision→text contribution and
    text→vision guidance), while their cumulative share stays ``<= tau_q``. Higher reuses more (faster,
    staler); 0 reuses nothing. Number from 0 to 1."""
    tau_kv: float = 0.05
    """Skipping threshold: per computed query block, key blocks are skipped, smallest pooled attention mass
    first, while their cumulative mass stays ``<= tau_kv``, so kept blocks carry ``>= 1 - tau_kv`` of the
    estimated mass. Higher skips more (faster, less exact); 0 turns skipping off. The paper uses 0.05
    (HunyuanVideo), its FLUX prototype 0.15. Number from 0 to less than 1."""

    ramp: float = 0.0
    """Threshold ramp: both thresholds are scaled by ``((step + 1) / steps) ** ramp`` at the update of step
    ``step`` of a ``steps``-step loop, so early updates (where features still move fast) reuse and skip
    less and late ones up to the full thresholds. The paper ramps its thresholds up with an unpublished
    formula; its prototypes scale by ``(t / 50) ** 2`` (``ramp=2``). 0 (default): no ramp. Needs the loop's
    length, ``OmniConfig.steps`` (the counted clock); without it the site runs dense, saying why. Number from
    0 to 8."""

    name = "flashomni"
    needs_scores = True

    def __post_init__(self):
        _check_fraction("FlashOmni", "tau_q", self.tau_q)
        _check_fraction("FlashOmni", "tau_kv", self.tau_kv)
        if self.tau_kv >= 1:
            raise ValueError(f"FlashOmni.tau_kv must be a number from 0 to less than 1, got {self.tau_kv!r}")
        r = self.ramp
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r <= 8:
            raise ValueError(f"FlashOmni.ramp must be a number from 0 to 8, got {r!r}")

    def __repr__(self) -> str:
        ramp = f", ramp={self.ramp!r}" if self.ramp else ""
        return f"FlashOmni(tau_q={self.tau_q!r}, tau_kv={self.tau_kv!r}{ramp})"

    def thresholds(self, inp: PolicyInput, config) -> tuple:
        """``(tau_q, tau_kv)`` at this update: the knobs, scaled by the ramp when there is one."""
        if not self.ramp:
            return float(self.tau_q), float(self.tau_kv)
        steps = getattr(config, "steps", None)
        if steps is None:
            raise PolicyFallback("FlashOmni(ramp=...) needs the loop's length: set OmniConfig.steps")
        f = min(1.0, (inp.step + 1) / steps) ** float(self.ramp)
        return float(self.tau_q) * f, float(self.tau_kv) * f

    def __call__(self, inp: PolicyInput, config) -> Bits:
        return flashomni(inp, config, *self.thresholds(inp, config))

    def symbols(self, inp: PolicyInput, config, allow_reuse: bool = True):
        """The fused path (:func:`flashomni_symbols`); None for a subclass that overrides ``__call__``,
        whose bits the fused kernels do not make."""
        if not runs_own_call(self, FlashOmni):
            return None
        return flashomni_symbols(inp, allow_reuse, *self.thresholds(inp, config))
