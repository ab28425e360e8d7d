"""Independent fp64 golden results and dtype-tied tolerances for the op tests.

The golden functions expand block symbols to element masks and compute in float64; they share no code
with ``omni_compile.ops`` beyond ``Symbols.to_dense``.
"""

import contextlib

import torch
import torch.nn.functional as F

from omni_compile.ops import kernel_backend
from omni_compile.ops._common import tensor_memory_accelerator

EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def element_keep(symbols):
    """[B,H,Sq,Skv] bool: key column kept for query row (and the row's tile computed)."""
    reuse, skip = symbols.to_dense()
    keep = ~skip & ~reuse.unsqueeze(-1)
    rows = torch.arange(symbols.seq_q) // symbols.block_q
    cols = torch.arange(symbols.seq_kv) // symbols.block_kv
    return keep.cpu()[:, :, rows][:, :, :, cols]


def golden_attention(q, k, v, symbols, scale=None):
    """fp64 masked attention; rows with no kept key (or reused) are 0, lse -inf."""
    q64, k64, v64 = (t.detach().cpu().double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = element_keep(symbols)
    s = (q64 @ k64.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = p @ v64
    return out, lse


def dtype_attention(q, k, v, symbols, scale=None):
    """The same function through PyTorch's own SDPA in the input dtype: its error vs the golden sets the
    tolerance (the kernel may be a few times worse than the dtype's own rounding, not more)."""
    keep = element_keep(symbols).to(q.device)
    has = keep.any(-1, keepdim=True)
    mask = keep | ~has  # rows with no key attend everywhere here and are zeroed below (avoids NaN)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(has, out, torch.zeros((), dtype=out.dtype, device=out.device))


def max_err(a, b):
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item() if a.numel() else 0.0


def tolerance(ref_err, dtype, magnitude):
    """A few times the dtype's own error, plus one unit of output rounding at the output's scale."""
    return 4.0 * ref_err + 2.0 * EPS[dtype] * max(1.0, magnitude)


IMPLS = ["reference", "triton", "triton-tma"]
#: also with descriptors built in the kernels: the attention kernel's warp-specialized form and the
#: persistent GEMMs on Hopper
DEVICE_TMA_IMPLS = IMPLS + ["triton-device-tma"]
#: the attention tests also run the in-kernel-descriptor tile grid, which the persistent kernel replaces
#: wherever a query block is one tile (most of the drawn shapes)
ATTENTION_IMPLS = DEVICE_TMA_IMPLS + ["triton-device-tma-grid"]


@contextlib.contextmanager
def impl_context(impl):
    """``reference``: the fp32 PyTorch path; ``triton``: the kernels with plain pointer loads;
    ``triton-tma``: the kernels loading through tensor descriptors where the inputs qualify;
    ``triton-device-tma``: descriptors built inside the kernels (the warp-specialized and persistent
    attention, the persistent GEMMs where their shape conditions hold); ``triton-device-tma-grid``: the
    same with the persistent attention off (its one-program-per-tile grid)."""
    if impl == "reference":
        with kernel_backend("reference"):
            yield
        return
    tma = {"triton-tma": "on", "triton-device-tma": "device", "triton-device-tma-grid": "device"}.get(impl, "off")
    from omni_compile.ops import attention

    persistent = attention._PERSISTENT
    attention._PERSISTENT = persistent and impl != "triton-device-tma-grid"
    try:
        with kernel_backend("triton"), tensor_memory_accelerator(tma):
            yield
    finally:
        attention._PERSISTENT = persistent


def poison_like(t, where_mask):
    """Copy of ``t`` with NaN where ``where_mask`` (broadcastable) is True."""
    return torch.where(where_mask, torch.full_like(t, float("nan")), t)


nullcontext = contextlib.nullcontext


# ---- the flashomni policy's decision, in float64 with its boundary cases marked -----------------------

#: a running sum this close to its budget (relative to the row's total), or two neighbours across the cut
#: this close (relative to their values), is a boundary case: fp32 sums in another order may put the block
#: on either side. Several times fp32's rounding of a few-hundred-term sum.
TAIL_MARGIN = 1e-5


def golden_tail(x, cand, budget, total):
    """``(selected, uncertain)`` of the low tail in float64: candidates sorted ascending (stable), selected
    while the running sum is ``<= budget [..., 1]``. ``uncertain [...]`` marks rows where a running sum
    lies within ``TAIL_MARGIN × total`` of the budget, where the last selected and first unselected values
    lie within ``TAIL_MARGIN`` of each other (their fp32 order may swap), or where a value is NaN."""
    x = x.double()
    cand = cand.expand_as(x)
    key = torch.where(cand, x, float("inf"))
    order = torch.sort(key, dim=-1, stable=True).indices
    xs = torch.gather(torch.where(cand, x, 0.0), -1, order)
    cs = torch.gather(cand, -1, order)
    cum = xs.cumsum(-1)
    sel_sorted = (cum <= budget) & cs
    sel = torch.zeros_like(cand).scatter(-1, order, sel_sorted)
    tol = TAIL_MARGIN * total.abs()
    near_budget = (((cum - budget).abs() <= tol) & cs).any(-1)
    cut = sel_sorted[..., :-1] & ~sel_sorted[..., 1:] & cs[..., 1:]
    near_tie = (cut & ((xs[..., 1:] - xs[..., :-1]).abs() <= TAIL_MARGIN * xs[..., 1:].abs())).any(-1)
    nan = (torch.isnan(x) & cand).any(-1) | torch.isnan(budget.squeeze(-1))
    return sel, near_budget | near_tie | nan


def golden_flashomni(scores, square, q_text, kv_text, mode, tau_q, tau_kv):
    """``(reuse, skip, reuse_uncertain [B, H], skip_uncertain [B, H, nQ])`` of the flashomni decision
    (docs/runtime.md) in float64; mode 0 joint, 1 self, 2 cross."""
    S = scores.detach().cpu().double()
    P = S if square is None else square.detach().cpu().double()
    qt, kt = q_text.cpu(), kv_text.cpu()
    vis = ~qt
    B, H, nQ, nK = S.shape

    def tail(x):
        xv = torch.where(vis, x, 0.0)
        total = xv.sum(-1, keepdim=True)
        if tau_q <= 0:
            return torch.zeros_like(x, dtype=torch.bool), torch.zeros(x.shape[:-1], dtype=torch.bool)
        return golden_tail(x, vis, tau_q * total, total)

    def guid(M, rows, cols):
        M = M * rows.view(1, 1, -1, 1) * cols.view(1, 1, 1, -1)
        colsum = M.sum(-2, keepdim=True)
        return torch.where(colsum > 0, M / colsum.clamp_min(1e-300), 0.0).sum(-1)

    if mode == 2:
        reuse, unc = tail(guid(S, vis, torch.ones(nK, dtype=torch.bool)))
    elif mode == 0:
        (rc, uc), (rg, ug) = tail((P * qt.view(1, 1, -1, 1)).sum(-2)), tail(guid(P, vis, qt))
        reuse, unc = rc & rg, uc | ug
    else:
        reuse, unc = tail(P.sum(-2))
    reuse = reuse & vis
    rows = ~reuse & vis.view(1, 1, -1)
    if tau_kv <= 0:
        skip = torch.zeros(B, H, nQ, nK, dtype=torch.bool)
        sunc = torch.zeros(B, H, nQ, dtype=torch.bool)
    else:
        ones = torch.ones(B, H, nQ, 1, dtype=torch.float64)
        skip, sunc = golden_tail(S, ~kt.view(1, 1, 1, -1), tau_kv * ones, ones)
        skip = skip.scatter(-1, S.argmax(-1, keepdim=True), False) & rows.unsqueeze(-1)
    return reuse, skip, unc, sunc
