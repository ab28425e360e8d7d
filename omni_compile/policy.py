"""Sparsity policies: on update steps, turn pooled attention scores into reuse and skip bits.

A policy is a function ``policy(inp: PolicyInput, config: OmniConfig) -> (reuse, skip)`` returning bool
tensors ``reuse [B, H, nQ]`` and ``skip [B, H, nQ, nK]`` (True = reuse / skip), on the device of the scores.
Policies only read tensors and the site's layout; they import nothing of the runtime but
``omni_compile.ops`` (design.md, dependency direction). Registered by name in :data:`POLICIES`.

The ``"flashomni"`` rule (docs/runtime.md states every choice where the paper is open):

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
from typing import Callable, Dict, Optional, Tuple

import torch

Bits = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class PolicyInput:
    """What a policy may read on an update step."""

    scores: Optional[torch.Tensor]
    """``[B, H, nQ, nK]`` pooled scores on the ``(block_q, block_kv)`` grid (``ops.pooled_scores``)."""
    scores_square: Optional[torch.Tensor]
    """``[B, H, nQ, nQ]`` pooled scores with key blocks of ``block_q`` rows (self/joint sites only, where
    keys are the query tokens): key block ``i`` is query block ``i``. Equals ``scores`` when the block
    sizes match."""
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
    site_id: int = 0
    step: int = 0
    timestep: float = 0.0


def block_text_mask(segments, seq: int, block: int, device=None) -> torch.Tensor:
    """``[ceil(seq/block)]`` bool: block holds at least one token of a ``"text"`` segment."""
    n = -(-seq // block)
    tok = torch.zeros(n * block, dtype=torch.bool)
    for mod, a, b in segments:
        if mod == "text":
            tok[a:b] = True
    return tok.reshape(n, block).any(1).to(device)


def low_tail(score: torch.Tensor, cand: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool mask (shape of ``score [..., n]``): the candidates in the low tail — sorted ascending (stable), a
    candidate is selected when the cumulative score up to and including it is ``<= tau`` × the candidates'
    total. ``cand`` broadcasts against ``score``. ``tau == 0`` selects nothing."""
    cand = cand.expand_as(score)
    if tau <= 0:
        return torch.zeros_like(cand)
    s = torch.where(cand, score.float(), torch.zeros((), device=score.device))
    total = s.sum(-1, keepdim=True)
    key = torch.where(cand, s, torch.full((), float("inf"), device=score.device))
    order = torch.sort(key, dim=-1, stable=True).indices
    cum = torch.gather(s, -1, order).cumsum(-1)
    sel_sorted = (cum <= tau * total) & torch.gather(cand, -1, order)
    sel = torch.zeros_like(cand)
    return sel.scatter(-1, order, sel_sorted)


def skip_tail(scores: torch.Tensor, rows: torch.Tensor, kv_protect: torch.Tensor, tau_kv: float) -> torch.Tensor:
    """``[B, H, nQ, nK]`` bool skip mask: in selected ``rows [B, H, nQ]``, the unprotected key blocks
    (sorted ascending, stable) whose cumulative mass up to and including them is ``<= tau_kv`` — an
    absolute budget, since pooled rows sum to 1. The row's largest block is always kept."""
    B, H, nQ, nK = scores.shape
    if tau_kv <= 0:
        return torch.zeros(B, H, nQ, nK, dtype=torch.bool, device=scores.device)
    cand = (~kv_protect).view(1, 1, 1, nK).expand(B, H, nQ, nK)
    skip = _low_tail_abs(scores.float(), cand, tau_kv)
    top = scores.argmax(-1, keepdim=True)
    skip = skip.scatter(-1, top, False)
    return skip & rows.unsqueeze(-1)


def _low_tail_abs(score: torch.Tensor, cand: torch.Tensor, budget: float) -> torch.Tensor:
    s = torch.where(cand, score, torch.zeros((), device=score.device))
    key = torch.where(cand, s, torch.full((), float("inf"), device=score.device))
    order = torch.sort(key, dim=-1, stable=True).indices
    cum = torch.gather(s, -1, order).cumsum(-1)
    sel_sorted = (cum <= budget) & torch.gather(cand, -1, order)
    return torch.zeros_like(cand).scatter(-1, order, sel_sorted)


def contribution(P: torch.Tensor, from_rows: torch.Tensor) -> torch.Tensor:
    """``C_i = Σ_{j in from_rows} P[j, i]``: ``[B, H, n]`` from ``P [B, H, n, n]``."""
    return (P.float() * from_rows.view(1, 1, -1, 1)).sum(-2)


def guidance(P: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``G_i = Σ_{j in cols} P[i, j] / Σ_{i' in rows} P[i', j]`` for ``i`` in ``rows`` (0 elsewhere):
    ``[B, H, nRows]`` from ``P [B, H, nRows, nCols]``."""
    M = P.float() * rows.view(1, 1, -1, 1) * cols.view(1, 1, 1, -1)
    colsum = M.sum(-2, keepdim=True)
    beta = torch.where(colsum > 0, M / colsum.clamp_min(1e-30), torch.zeros((), device=P.device))
    return beta.sum(-1)


def flashomni(inp: PolicyInput, config) -> Bits:
    """The paper's policy (module docstring)."""
    vis_q = ~inp.q_text
    tau_q = float(config.tau_q)
    if inp.kind == "cross":
        G = guidance(inp.scores, vis_q, torch.ones_like(inp.kv_text))
        reuse = low_tail(G, vis_q, tau_q)
    elif inp.kind == "joint" and 0 < inp.text_q_blocks < inp.q_text.numel():
        P = inp.scores_square
        C = contribution(P, inp.q_text)
        G = guidance(P, vis_q, inp.q_text)
        reuse = low_tail(C, vis_q, tau_q) & low_tail(G, vis_q, tau_q)
    else:  # vision-only self-attention (a text-only site has no candidates)
        C = contribution(inp.scores_square, torch.ones_like(vis_q))
        reuse = low_tail(C, vis_q, tau_q)
    reuse = reuse & vis_q
    rows = ~reuse & vis_q.view(1, 1, -1)
    skip = skip_tail(inp.scores, rows, inp.kv_text, float(config.tau_kv))
    return reuse, skip


def fixed(inp: PolicyInput, config) -> Bits:
    """Content-blind tiles from ``config.seed`` and the site id: per (batch item, head),
    ``round(reuse_fraction * n_vision_q)`` vision query blocks reused; per computed vision query block,
    ``round(skip_fraction * n_vision_kv)`` vision key blocks skipped (at least one key block kept)."""
    B, H = inp.batch, inp.heads
    nQ, nK = inp.q_text.numel(), inp.kv_text.numel()
    g = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + int(inp.site_id))
    q_text, kv_text = inp.q_text.cpu(), inp.kv_text.cpu()
    vis_q = ~q_text
    n_vq = int(vis_q.sum())
    k_reuse = int(round(float(config.reuse_fraction) * n_vq))
    r = torch.rand(B, H, nQ, generator=g).masked_fill(q_text, float("inf"))
    rank = r.argsort(-1).argsort(-1)
    reuse = (rank < k_reuse) & vis_q
    cand = ~kv_text
    n_ck = int(cand.sum())
    k_skip = int(round(float(config.skip_fraction) * n_ck))
    if n_ck == nK:
        k_skip = min(k_skip, nK - 1)
    rk = torch.rand(B, H, nQ, nK, generator=g).masked_fill(kv_text, float("inf"))
    skip = (rk.argsort(-1).argsort(-1) < k_skip) & cand
    skip &= (~reuse & vis_q).unsqueeze(-1)
    dev = inp.q_text.device
    return reuse.to(dev), skip.to(dev)


def dense(inp: PolicyInput, config) -> Bits:
    dev = inp.q_text.device
    nQ, nK = inp.q_text.numel(), inp.kv_text.numel()
    return (torch.zeros(inp.batch, inp.heads, nQ, dtype=torch.bool, device=dev),
            torch.zeros(inp.batch, inp.heads, nQ, nK, dtype=torch.bool, device=dev))


POLICIES: Dict[str, Callable[[PolicyInput, object], Bits]] = {"flashomni": flashomni, "fixed": fixed, "dense": dense}

#: Policies that read pooled scores (the runtime computes them only for these).
NEEDS_SCORES = {"flashomni"}
