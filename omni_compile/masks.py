"""Attention masks at run time: what a site's mask leaves of the keys, and the dense path for masks the
sparse ops cannot express in one launch.

The passes accept *key-padding* masks (``[B|1, H|1, 1, Skv]``: one validity per key, the same for every
query; docs/passes.md). Boolean masks keep the ``True`` keys; additive masks keep the keys whose bias is
0 and drop those far below it (``<= -1e3``, the ``-inf`` / ``-10000`` of diffusers pipelines). Other
biases cannot be applied by dropping keys: such a site runs PyTorch's SDPA with the mask as given.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .ops import sparse_attention


def key_valid(mask: torch.Tensor, B: int, H: int, Skv: int):
    """``(valid, expressible)``: per (batch, head) boolean validity of keys from a key-padding mask, and a
    device flag, False where the mask is an additive bias that is not just 0 / very negative (it cannot
    be applied by dropping keys then). Nothing is read back here: callers read what they need at once."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, H, 1, Skv)[:, :, 0, :]
    if m.dtype == torch.bool:
        return m, torch.ones((), dtype=torch.bool, device=m.device)
    valid = m > -1e3
    return valid, ((m == 0) | ~valid).all()


def kept_keys(kv_segments, mask: torch.Tensor, B: int, H: int, Skv: int):
    """What a key-padding ``mask`` leaves of the keys, when every batch item and head keeps the same ones:
    ``"all"`` (the mask drops nothing: ignore it), or ``(index [n] on the mask's device, kv_segments of
    the kept keys)`` (``kv_segments``: the site's ``(modality, start, stop)`` over all keys). None when the
    ops cannot express it (an additive bias that is not 0 / -inf, keys that differ per item or head, or no
    key kept): the caller runs :func:`padded_attention`. Costs one host read of the mask per call, the
    flags and the kept keys in one transfer."""
    valid, expressible = key_valid(mask, B, H, Skv)
    first = valid[:1, :1]
    uniform = (valid == first).all()
    flags_and_keys = torch.cat([torch.stack([expressible, uniform]), first.reshape(Skv)]).cpu()
    if not bool(flags_and_keys[0]) or not bool(flags_and_keys[1]):
        return None
    keep_cpu = flags_and_keys[2:]
    n = int(keep_cpu.sum())
    if n == Skv:
        return "all"
    if n == 0:
        return None
    text = torch.zeros(Skv, dtype=torch.bool)
    for m, a, b in kv_segments:
        if m == "text":
            text[a:b] = True
    kept_text = text[keep_cpu].tolist()
    segs, start = [], 0
    for i in range(1, n + 1):
        if i == n or kept_text[i] != kept_text[start]:
            segs.append(("text" if kept_text[start] else "vision", start, i))
            start = i
    return keep_cpu.nonzero().squeeze(1).to(mask.device), segs


def padded_attention(q, k, v, mask: torch.Tensor, scale, dense_symbols: Callable, dense: Callable):
    """Exact attention under ``mask`` (the site's dense path): ``(out [B, H, Sq, D], fallbacks)``. A mask
    that drops nothing runs ``dense(q, k, v)``; a key-padding mask runs the ops on each group of batch items
    that keep the same keys (``dense_symbols(B, H, Sq, Skv, device)`` gives their all-compute symbols); a
    mask the ops cannot express, or a group that keeps no key, runs PyTorch's SDPA with the mask itself
    (its own semantics), counted in ``fallbacks``."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    valid, expressible = key_valid(mask, B, H, Skv)
    expressible, all_kept, per_item = torch.stack([expressible, valid.all(), (valid == valid[:, :1]).all()]).tolist()
    if expressible and all_kept:
        return dense(q, k, v), 0
    if not expressible or not per_item:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).contiguous(), 1
    # key padding: drop the masked keys (per batch item; items with the same mask run together)
    fallbacks = 0
    out = torch.empty(B, H, Sq, D, dtype=q.dtype, device=q.device)
    vb = valid[:, 0, :]
    done = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        if done[b]:
            continue
        same = (vb == vb[b]).all(dim=1).cpu()
        same &= ~done
        idx_b = same.nonzero().squeeze(1).to(q.device)
        keys = vb[b].nonzero().squeeze(1)
        qb = q.index_select(0, idx_b)
        if keys.numel() == 0:  # every key masked: keep SDPA's own semantics
            fallbacks += 1
            mb = mask if mask.dim() < 4 or mask.shape[0] == 1 else mask.index_select(0, idx_b)
            ob = F.scaled_dot_product_attention(qb, k.index_select(0, idx_b), v.index_select(0, idx_b), attn_mask=mb,
                                                scale=scale)
        else:
            kb = k.index_select(0, idx_b).index_select(2, keys)
            vvb = v.index_select(0, idx_b).index_select(2, keys)
            sym = dense_symbols(qb.shape[0], H, Sq, keys.numel(), q.device)
            ob = sparse_attention(qb.contiguous(), kb, vvb, sym, scale)
        out.index_copy_(0, idx_b, ob.to(out.dtype))
        done |= same
    return out, fallbacks
