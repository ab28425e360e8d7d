"""Attention masks at run time: how a site's mask factors into work the sparse ops can do.

The passes accept any mask that broadcasts to ``[B, H, Sq, Skv]`` (docs/passes.md). Boolean masks keep the
``True`` keys; additive masks keep the keys whose value is above ``-1e3`` (the ``-inf`` / ``-10000`` /
``finfo.min`` of diffusers pipelines drop a key) and add the value to the kept keys' logits.

The ops run one key set per launch, the same for every query row and head, with no bias. A mask is brought
to that form by factoring it (:func:`analyse`), once per mask tensor per model call:

* **row classes**: the query rows whose mask row equals the *dominant* row (a candidate row matched by most
  rows: a vision token's row in every joint layout) run through the ops; the other rows — pad queries of an
  outer-product mask ``q_valid x k_valid`` (HunyuanVideo's token refiner, HunyuanVideo 1.5), causal text
  rows (OmniGen) — are recomputed exactly with PyTorch's SDPA on those rows alone and written back. A
  key-padding mask expanded over queries (Lumina-Next) has one class.
* **item groups**: batch items whose dominant rows keep the same keys with the same values run together
  (batched CFG: the negative prompt keeps fewer text tokens than the prompt);
* **bias groups**: kept keys whose additive value differs from the dominant value (Chroma's float 0/1
  outer product adds 1 to the prompt and image keys and 0 to pad keys) are attended separately, densely,
  and merged with the ops' output through the log-sum-exp: attention over a union of key sets with a
  constant bias per set is the softmax-weighted merge of the attention over each set.

A mask the factoring cannot express (rows that differ per head, the dominant class holding less than half
the rows, more than :data:`MAX_BIAS_VALUES` distinct kept values) is None: the site runs PyTorch's SDPA
with the mask as given (``padded_attention``). Everything is read from the device in one transfer per
mask and model call (the candidate row and which rows match it), cached for the other sites that read the
same mask tensor.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .ops import sparse_attention

#: Kept keys may carry at most this many distinct additive values (one for the ops, the rest merged).
MAX_BIAS_VALUES = 4
#: An additive value at or below this drops the key.
DROP = -1e3


@dataclass
class ItemGroup:
    """Batch items that attend the same keys in their dominant rows."""

    items: Optional[list]
    """Batch indices (host ints), or None: every item."""
    keys: Optional[torch.Tensor]
    """Indices of the keys the ops attend (on the mask's device), or None: every key."""
    kept: torch.Tensor
    """Host bool ``[Skv]``: the keys the ops attend."""
    extra: list = field(default_factory=list)
    """``(key indices on the device, offset)``: kept keys whose additive value is the ops' keys' plus
    ``offset``; attended densely and merged by log-sum-exp."""

    def kv_segments(self, segments: list) -> list:
        """The modality segments of the attended keys, from ``segments`` over all keys."""
        return kept_segments(segments, self.kept)


@dataclass
class MaskPlan:
    """How one mask runs (module docstring): item groups through the ops, minor rows through SDPA."""

    groups: list
    rows: Optional[tuple] = None
    """``(batch index, row index)`` host tensors of the query rows outside the dominant class, or None."""

    @property
    def simple(self) -> bool:
        """One key set for every item and row, no bias: what a single launch of the ops runs."""
        return self.rows is None and len(self.groups) == 1 and not self.groups[0].extra

    @property
    def drops_nothing(self) -> bool:
        """The mask changes nothing (every key kept with one value, every row alike): ignore it."""
        return self.simple and self.groups[0].keys is None

    @property
    def signature(self) -> tuple:
        """Which items attend which keys: symbols made for one plan serve another only if these agree."""
        return tuple((None if g.items is None else tuple(g.items), bytes(g.kept.numpy())) for g in self.groups)


def as4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def kept_segments(segments: list, kept: torch.Tensor) -> list:
    """``(modality, start, stop)`` of the keys ``kept`` (host bool) leaves, renumbered over those keys."""
    n_all = int(kept.numel())
    text = torch.zeros(n_all, dtype=torch.bool)
    for m, a, b in segments:
        if m == "text":
            text[a:b] = True
    kept_text = text[kept].tolist()
    n = len(kept_text)
    segs, start = [], 0
    for i in range(1, n + 1):
        if i == n or kept_text[i] != kept_text[start]:
            segs.append(("text" if kept_text[start] else "vision", start, i))
            start = i
    return segs


_CACHE: dict = {}


def analyse(mask: torch.Tensor, B: int, H: int, Sq: int, Skv: int) -> Optional[MaskPlan]:
    """Factor ``mask`` (broadcastable to ``[B, H, Sq, Skv]``) into a :class:`MaskPlan`, or None when the ops
    cannot express it (module docstring). One host read per mask tensor and model call: the plan is
    cached for as long as the same tensor object, unmodified, reaches other sites."""
    hit = _CACHE.get(id(mask))
    try:
        version = mask._version
    except RuntimeError:  # an inference tensor (torch.inference_mode) has no version counter
        version = None
    key = (version, B, H, Sq, Skv)
    if hit is not None and hit[0]() is mask and hit[1] == key:
        return hit[2]
    plan = _analyse(as4d(mask), B, H, Sq, Skv)
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[id(mask)] = (weakref.ref(mask), key, plan)
    return plan


def _candidate(m: torch.Tensor, row: int):
    """The mask rows equal to row ``row`` of each (item, head): ``(candidate [Bm, Hm, Skv], same [Bm, Hm, Sq])``."""
    cand = m[:, :, row:row + 1, :]
    return cand[:, :, 0, :], (m == cand).all(-1)


def _analyse(m: torch.Tensor, B: int, H: int, Sq: int, Skv: int) -> Optional[MaskPlan]:
    if m.shape[-1] == 1 and Skv > 1:
        m = m.expand(*m.shape[:-1], Skv)
    Sqm = m.shape[2]
    rows = [Sqm // 2] + ([0, Sqm - 1] if Sqm > 2 else [])
    best = None
    for r in rows:
        cand, same = _candidate(m, r)
        # one transfer: the candidate row and which rows match it
        host = torch.cat([cand.reshape(-1).float(), same.reshape(-1).float()]).cpu()
        n_cand = cand.numel()
        c_host = host[:n_cand].reshape(cand.shape)
        s_host = host[n_cand:].reshape(same.shape).bool()
        share = float(s_host.float().mean())
        if best is None or share > best[2]:
            best = (c_host, s_host, share)
        if share > 0.5:
            break
    cand, same, share = best
    if share <= 0.5:
        return None  # no row class holds most rows (causal attention): nothing to factor
    Bm, Hm = cand.shape[:2]
    if Hm > 1 and not (bool((cand == cand[:, :1]).all()) and bool((same == same[:, :1]).all())):
        return None  # keys or rows differ per head: the ops drop the same keys for every head
    cand, same = cand[:, 0], same[:, 0]  # [Bm, Skv], [Bm, Sqm]
    boolean = m.dtype == torch.bool
    kept = cand > 0.5 if boolean else cand > DROP
    patterns: dict = {}
    for b in range(Bm):
        if boolean:
            sig = (tuple(kept[b].tolist()), ())
        else:
            sig = (tuple(kept[b].tolist()), tuple(cand[b][kept[b]].tolist()))
        patterns.setdefault(sig, []).append(b)
    groups = []
    for (kept_sig, values), items in patterns.items():
        k = torch.tensor(kept_sig, dtype=torch.bool)
        if not bool(k.any()):
            return None  # the dominant rows keep no key: SDPA's own semantics
        extra = []
        main = k
        if values:
            vals = torch.tensor(values)
            distinct = torch.unique(vals)
            if len(distinct) > MAX_BIAS_VALUES:
                return None
            counts = torch.stack([(vals == d).sum() for d in distinct])
            v_main = float(distinct[int(counts.argmax())])
            full = torch.full((Skv,), float("nan"))
            full[k] = vals
            main = full == v_main
            for d in distinct.tolist():
                if d != v_main:
                    extra.append((torch.nonzero(full == d).squeeze(1).to(m.device), float(d - v_main)))
        keys = None if bool(main.all()) else torch.nonzero(main).squeeze(1).to(m.device)
        groups.append(ItemGroup(None if Bm == 1 or len(patterns) == 1 else items, keys, main, extra))
    minor = None
    if not bool(same.all()):
        b_idx, r_idx = torch.nonzero(~same, as_tuple=True)
        if Bm == 1 and B > 1:  # a mask shared by every item: its minor rows are every item's
            n = len(r_idx)
            b_idx, r_idx = torch.arange(B).repeat_interleave(n), r_idx.repeat(B)
        minor = (b_idx, r_idx)
    return MaskPlan(groups, minor)


# ---- running a plan ------------------------------------------------------------------------------


def _dense_lse(q, k, v, scale):
    """Exact attention with its natural-log log-sum-exp ``[B, H, Sq]`` (fp32): the small key sets merged
    by :func:`merge`."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.softmax(s, dim=-1) @ v.float()
    return out, lse


def merge(parts: list):
    """Attention over the union of key sets from each set's ``(out, lse)`` (fp32), lse offsets included:
    ``sum_i exp(lse_i - L) out_i`` with ``L = logsumexp_i lse_i``. Rows where every part is empty (lse
    -inf everywhere) get zeros."""
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    out = 0
    for o, lse in parts:
        w = torch.exp(lse - safe).unsqueeze(-1)
        out = out + torch.where(torch.isfinite(lse).unsqueeze(-1), w * o.float(), 0.0)
    return out


def run_plan(plan: MaskPlan, q, k, v, mask: torch.Tensor, scale: Optional[float], attend: Callable):
    """Attention of ``q, k, v [B, H, S, D]`` under ``mask`` as ``plan`` factors it. ``attend(group, index,
    q, k, v, need_lse)`` runs the ops for one item group on its keys (``index``: the group's position in
    ``plan.groups``) and returns ``out`` or ``(out, lse)``. Returns ``out [B, H, Sq, D]`` in q's dtype."""
    B, H, Sq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = None
    for gi, g in enumerate(plan.groups):
        items = None if g.items is None else torch.tensor(g.items, device=q.device)
        qg, kg, vg = (t if items is None else t.index_select(0, items) for t in (q, k, v))
        ks, vs = (kg, vg) if g.keys is None else (kg.index_select(2, g.keys), vg.index_select(2, g.keys))
        if g.extra:
            o, lse = attend(g, gi, qg, ks, vs, True)
            parts = [(o.float(), lse.float())]
            for idx, offset in g.extra:
                oe, le = _dense_lse(qg, kg.index_select(2, idx), vg.index_select(2, idx), scale)
                parts.append((oe, le + offset))
            o = merge(parts).to(q.dtype)
        else:
            o = attend(g, gi, qg, ks, vs, False)
        if items is None:
            out = o
        else:
            if out is None:
                out = torch.empty(B, H, Sq, D, dtype=q.dtype, device=q.device)
            out.index_copy_(0, items, o.to(out.dtype))
    if plan.rows is not None:
        out = minor_rows(out, q, k, v, mask, scale, plan.rows)
    return out


def minor_rows(out, q, k, v, mask, scale, rows):
    """``out`` with the query rows ``rows = (batch, row)`` recomputed exactly by PyTorch's SDPA under their
    own mask rows (rows no key is kept for keep SDPA's semantics)."""
    b_idx, r_idx = rows
    m = as4d(mask)
    for b in torch.unique(b_idx).tolist():
        r = r_idx[b_idx == b].to(q.device)
        mb = m[b if m.shape[0] > 1 else 0].index_select(1, r).unsqueeze(0)  # [1, Hm, n, Skv]
        orow = F.scaled_dot_product_attention(q[b:b + 1].index_select(2, r), k[b:b + 1], v[b:b + 1], attn_mask=mb,
                                              scale=scale)
        out[b].index_copy_(1, r, orow[0].to(out.dtype))
    return out


def padded_attention(q, k, v, mask: torch.Tensor, scale, dense_symbols: Callable, dense: Callable):
    """Exact attention under ``mask`` (the site's dense path): ``(out [B, H, Sq, D], fallbacks)``. A mask
    :func:`analyse` factors runs its item groups through ``dense(q, k, v)`` (the ops with all-compute
    symbols, or SDPA) and merges bias groups and minor rows as :func:`run_plan` says; a mask it cannot
    factor runs PyTorch's SDPA with the mask itself (its own semantics), counted in ``fallbacks``."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    plan = analyse(mask, B, H, Sq, Skv)
    if plan is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).contiguous(), 1

    def attend(g, gi, qg, kg, vg, need_lse):
        if not need_lse:
            return dense(qg.contiguous(), kg, vg)
        sym = dense_symbols(qg.shape[0], H, Sq, kg.shape[2], q.device)
        return sparse_attention(qg.contiguous(), kg, vg, sym, scale, return_lse=True)

    return run_plan(plan, q, k, v, mask, scale, attend), 0


def stitch(symbols: list, plan: MaskPlan, batch: int):
    """One ``Symbols`` over the whole batch from each item group's (``symbols[i]`` for ``plan.groups[i]``):
    the groups' reuse bits in batch order, and skip bits over the longest group's key blocks (blocks a
    group does not have are marked skipped). What GEMM-Q, GEMM-O and the report read; the attention of
    each group runs with its own."""
    from .ops import Symbols

    if len(symbols) == 1 and plan.groups[0].items is None:
        return symbols[0]
    first = symbols[0]
    longest = max(symbols, key=lambda s: s.seq_kv)
    nQ, nK = first.num_q_blocks, longest.num_kv_blocks
    reuse = torch.zeros(batch, first.heads, nQ, dtype=torch.bool, device=first.device)
    skip = torch.ones(batch, first.heads, nQ, nK, dtype=torch.bool, device=first.device)
    for sym, g in zip(symbols, plan.groups):
        r, k = sym.to_dense()
        items = torch.tensor(g.items if g.items is not None else range(batch), device=first.device)
        reuse[items] = r
        skip[items, :, :, : k.shape[-1]] = k
    return Symbols.from_dense(reuse, skip, first.block_q, first.block_kv, first.seq_q, longest.seq_kv,
                              share_dense=True)
