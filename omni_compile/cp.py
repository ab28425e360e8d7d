"""The runtime under context parallelism (diffusers' ``enable_parallelism``): what a rank exchanges.

The passes describe a context-parallel site in ``SitePlan.cp`` (``passes/cp.py``). Every rank runs the
same graph, so every rank reaches the same site ops in the same order; the collectives here are issued
inside the update step's ``site_attention`` on every rank alike (the step's action is a function of the
step index, which the clock derives from the replicated timestep or from call counts). Dispatch steps
exchange nothing.

* **Ulysses**: rank r attends heads ``[r·H/P, (r+1)·H/P)`` over all tokens, so its policy decides their
  bits from its own pooled scores (per head, as without parallelism). Its GEMM-Q and GEMM-O run over its
  own S/P tokens with all H heads: they need every rank's reuse bits for those rows. One
  ``all_gather_into_tensor`` of the packed reuse bits per site and update step (:func:`gather_reuse`,
  ``B·H·⌈nQ/8⌉`` bytes: 120 B per site for FLUX.1 at 1024²), in rank order, which is head order.
* **ring**: rank r attends its own S/P queries with all heads over every rank's keys (``site_attention``
  over the gathered keys: ``passes.cp.canonicalize_ring``). Its bits are its own; no exchange for the
  GEMMs. A policy that reads pooled scores sees all queries of the site, as without parallelism
  (:func:`ring_symbols`): the ranks' score rows are all-gathered (one collective per site and update step),
  the policy runs on the whole grid, and each rank keeps its rows.
"""

from __future__ import annotations

from typing import Optional

import torch


def _group(plan):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(plan.cp["group"])


def _all_gather(plan, t: torch.Tensor) -> torch.Tensor:
    """``[P, *t.shape]``: ``t`` of every rank of the site's group, in rank order."""
    import torch.distributed as dist

    t = t.contiguous()
    size = plan.cp["size"]
    # gathered along dim 0 (the form every backend takes, gloo included), then split by rank
    out = torch.empty((size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name of torch >= 2.13
    gather(out, t, group=_group(plan))
    return out.view((size,) + tuple(t.shape))


def ulysses(plan) -> bool:
    return plan.cp is not None and plan.cp["mode"] == "ulysses"


def ring(plan) -> bool:
    return plan.cp is not None and plan.cp["mode"] == "ring"


def head_offset(plan) -> tuple:
    """``(first head, all heads)`` of the site's attention on this rank (Ulysses: a slice of the heads)."""
    if ulysses(plan):
        return plan.cp["rank"] * plan.heads, plan.heads * plan.cp["size"]
    return 0, plan.heads


def gather_reuse(state, plan, sym):
    """The symbols this rank's GEMM-Q / GEMM-O read under Ulysses: the reuse bits ``[B, H/P, ⌈nQ/8⌉]`` of
    every rank concatenated along heads (rank order is head order) into ``[B, H, ⌈nQ/8⌉]``, over the
    attention's ``seq_q`` (all tokens, rank-major; the GEMMs take their rows at their ``row_offset``).
    Skip bits are the all-compute ones: the GEMMs read reuse bits only."""
    from omni_compile.ops import Symbols

    parts = _all_gather(plan, sym.reuse_bits)  # [P, B, H/P, nb]
    reuse = torch.cat(tuple(parts), dim=1)
    B, H = reuse.shape[:2]
    skip = state.dense_symbols(B, H, sym.seq_q, sym.seq_kv, reuse.device).skip_bits
    return Symbols(reuse, skip, sym.block_q, sym.block_kv, sym.seq_q, sym.seq_kv)


def ring_rows(plan, block_q: int) -> Optional[str]:
    """Why the policy cannot see the whole site under ring (None when it can): each rank's queries must be
    whole query blocks, so that the ranks' score rows stack into the site's block grid."""
    if plan.seq_q % block_q:
        return (f"ring context parallelism: each rank's {plan.seq_q} queries are not whole blocks of "
                f"block_q={block_q}, so the ranks' pooled scores do not form one grid")
    return None


def ring_q_text(state, plan, q_text: torch.Tensor) -> torch.Tensor:
    """``[P·nQ]``: the text flags of the query blocks of every rank (each rank's queries are laid out like
    this rank's), cached per plan so policies that memoise by the tensor (``fixed``) find it again."""
    cache = state.__dict__.setdefault("_cp_q_text", {})
    key = (plan.plan_id, id(q_text))
    hit = cache.get(key)
    if hit is None or hit[0] is not q_text:
        hit = cache[key] = (q_text, q_text.repeat(plan.cp["size"]))
    return hit[1]


def ring_gather(plan, scores, square, change):
    """The pooled scores ``[B, H, nQ, ·]`` (and ``square``, ``change [B, H, nQ]``) of every rank stacked
    along query blocks in rank order: one all-gather of their concatenation."""
    parts = [t for t in (scores, square, change) if t is not None]
    if not parts:
        return scores, square, change
    widths = [t.shape[-1] if t.dim() == 4 else 1 for t in parts]
    flat = torch.cat([t.float() if t.dim() == 4 else t.float().unsqueeze(-1) for t in parts], dim=-1)
    got = _all_gather(plan, flat)  # [P, B, H, nQ, W]
    P, B, H, nQ, W = got.shape
    whole = got.permute(1, 2, 0, 3, 4).reshape(B, H, P * nQ, W)
    outs, off = [], 0
    for t, w in zip(parts, widths):
        piece = whole[..., off:off + w]
        outs.append((piece if t.dim() == 4 else piece.squeeze(-1)).to(t.dtype).contiguous())
        off += w
    it = iter(outs)
    return tuple(next(it) if t is not None else None for t in (scores, square, change))


def ring_local(plan, sym):
    """This rank's rows of symbols decided for every rank's queries (:func:`ring_symbols`)."""
    from omni_compile.ops import Symbols

    reuse, skip = sym.to_dense()
    nq = reuse.shape[-1] // plan.cp["size"]
    r = plan.cp["rank"]
    rows = slice(r * nq, (r + 1) * nq)
    return Symbols.from_dense(reuse[:, :, rows].contiguous(), skip[:, :, rows].contiguous(), sym.block_q,
                              sym.block_kv, plan.seq_q, sym.seq_kv, share_dense=True)
