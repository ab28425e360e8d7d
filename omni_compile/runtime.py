"""The site ops the passes rewrite into: ``flashomni::site_attention``, ``site_linear_q``, ``site_linear_o``.

Each is an opaque ``torch.library.custom_op`` taking plain tensors plus ``state`` / ``site`` ids. At run
time it finds the :class:`~omni_compile.state.SiteRecord` and decides which symbols and caches to use, then
calls the ``omni_compile.ops`` kernels. Every decision happens inside the op, so one compiled graph serves
all steps (no recompiles; design.md fact 5) and per-site state never becomes a graph constant (fact 11).

Ordering within a site is carried by data: the q projection feeds the attention, whose output feeds the
output projection. So ``site_linear_q`` for call *n* runs before ``site_attention`` of call *n* (which
counts the call and stores that call's symbols), and ``site_linear_o`` runs after it. Each site keeps its
own counters, so ops of different sites may run in any order.

Today's policy is ``"dense"``: all-compute symbols, so the ops reproduce the model. Issue 4 plugs the
update/dispatch decisions in here (``_symbols_for_*``), without changing the graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .state import SiteRecord, get_state

# ---- policy hooks (dense today) -----------------------------------------------------------------


def _symbols_for_attention(state, site: SiteRecord, q, k):
    B, H, Sq, _ = q.shape
    return state.dense_symbols(B, H, Sq, k.shape[2], q.device)


def _symbols_for_rows(state, site: SiteRecord, batch: int, heads: int, seq_q: int, device):
    """Symbols GEMM-Q/GEMM-O read: the site's latest ones when they fit, else all-compute."""
    sym = site.symbols
    if sym is not None and sym.batch == batch and sym.heads == heads and sym.seq_q == seq_q and sym.device == device:
        return sym
    return state.dense_symbols(batch, heads, seq_q, seq_q, device)


# ---- attention ----------------------------------------------------------------------------------


def _key_valid(mask: torch.Tensor, B: int, H: int, Skv: int):
    """Per (batch, head) boolean validity of keys from a key-padding mask, or None if the mask is an
    additive bias that is not just 0 / very negative (then it cannot be applied by dropping keys)."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, H, 1, Skv)[:, :, 0, :]
    if m.dtype == torch.bool:
        return m
    valid = m > -1e3
    if not bool((m[valid] == 0).all()):
        return None
    return valid


def run_attention(state, site: SiteRecord, q, k, v, mask, scale):
    from omni_compile.ops import sparse_attention

    site.calls += 1
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    if mask is None:
        sym = _symbols_for_attention(state, site, q, k)
        site.symbols = sym
        return sparse_attention(q, k, v, sym, scale)
    valid = _key_valid(mask, B, H, Skv)
    if valid is not None and bool(valid.all()):
        sym = _symbols_for_attention(state, site, q, k)
        site.symbols = sym
        return sparse_attention(q, k, v, sym, scale)
    site.symbols = state.dense_symbols(B, H, Sq, Skv, q.device)
    if valid is None or not bool((valid == valid[:, :1]).all()):
        site.fallbacks += 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).contiguous()
    # key padding: drop the masked keys (per batch item; items with the same mask run together)
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
            site.fallbacks += 1
            mb = mask if mask.dim() < 4 or mask.shape[0] == 1 else mask.index_select(0, idx_b)
            ob = F.scaled_dot_product_attention(qb, k.index_select(0, idx_b), v.index_select(0, idx_b), attn_mask=mb, scale=scale)
        else:
            kb = k.index_select(0, idx_b).index_select(2, keys)
            vvb = v.index_select(0, idx_b).index_select(2, keys)
            sym = state.dense_symbols(qb.shape[0], H, Sq, keys.numel(), q.device)
            ob = sparse_attention(qb.contiguous(), kb, vvb, sym, scale)
        out.index_copy_(0, idx_b, ob.to(out.dtype))
        done |= same
    return out


@torch.library.custom_op("flashomni::site_attention", mutates_args=())
def site_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    state: int,
    site: int,
    scale: Optional[float],
) -> torch.Tensor:
    """Attention of one rewritten site: the symbols the state holds for it decide the work done."""
    st = get_state(state)
    return run_attention(st, st.site(site), q, k, v, mask, scale)


@site_attention.register_fake
def _(q, k, v, mask, state, site, scale):
    B, H, Sq, _ = q.shape
    return q.new_empty(B, H, Sq, v.shape[-1])


# ---- GEMM-Q -------------------------------------------------------------------------------------


@torch.library.custom_op("flashomni::site_linear_q", mutates_args=())
def site_linear_q(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    state: int,
    site: int,
    row_offset: int,
    seq_q: int,
    head_dim: int,
) -> torch.Tensor:
    """q projection of a site: skips the (query block, head) tiles its symbols reuse."""
    from omni_compile.ops import sparse_linear_q

    st = get_state(state)
    rec = st.site(site)
    rec.linear_q_calls += 1
    heads = weight.shape[0] // head_dim
    sym = _symbols_for_rows(st, rec, x.shape[0], heads, seq_q, x.device)
    return sparse_linear_q(x, weight, bias, sym, head_dim, row_offset)


@site_linear_q.register_fake
def _(x, weight, bias, state, site, row_offset, seq_q, head_dim):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])


# ---- GEMM-O -------------------------------------------------------------------------------------


@torch.library.custom_op("flashomni::site_linear_o", mutates_args=())
def site_linear_o(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    state: int,
    site: int,
    row_offset: int,
    col_offset: int,
    seq_q: int,
    head_dim: int,
) -> torch.Tensor:
    """Output projection of a site over its heads (columns ``col_offset:col_offset+H*D`` of ``weight``):
    reduces over computed heads only and adds the cache bias of reused ones."""
    from omni_compile.ops import sparse_linear_o

    st = get_state(state)
    rec = st.site(site)
    rec.linear_o_calls += 1
    width = a.shape[-1]
    w = weight if (col_offset == 0 and weight.shape[1] == width) else weight[:, col_offset:col_offset + width]
    heads = width // head_dim
    sym = _symbols_for_rows(st, rec, a.shape[0], heads, seq_q, a.device)
    return sparse_linear_o(a.contiguous(), w, bias, sym, head_dim, None, row_offset)


@site_linear_o.register_fake
def _(a, weight, bias, state, site, row_offset, col_offset, seq_q, head_dim):
    return a.new_empty(a.shape[0], a.shape[1], weight.shape[0])
