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
