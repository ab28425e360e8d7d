"""``flashomni::taylor_sum`` and ``flashomni::taylor_refresh``: the runtime's Taylor-cache arithmetic in one
pass over memory each.

The runtime keeps features as Taylor factors ``[f_0, f_1, …]`` (``omni_compile.taylor``): on a full step
it refreshes them from a new observation, on a dispatch step a cached block's output is its input plus the
forecast ``Σ c_i f_i``. Written as PyTorch ops these are several elementwise passes each (a subtraction, a
copy and a subtraction plus an in-place division per order for the refresh; a sum and an addition for the
forecast), each reading and writing whole ``[B, S, C]`` tensors: at FLUX size about 4 ms of every update
step and 2 ms of every dispatch step with half of the blocks cached. Each op here reads every input once
and writes every output once, computing in fp32 and rounding once per stored value.

* ``taylor_sum(factors, coefs, base)``: ``base + Σ_i coefs[i] · factors[i]`` (``base`` optional), in the
  factors' dtype.
* ``taylor_refresh(new, sub, old, delta)``: the factors after observing ``new − sub`` (``sub`` optional)
  ``delta`` steps after the observation that gave ``old``: ``f_0 = new − sub`` rounded to the storage
  dtype, then ``f_{i+1} = (f_i − old_i) / delta`` from the *stored* (rounded) ``f_i``, so the factors are
  exactly the finite differences of what is kept. Returns ``1 + len(old)`` fresh tensors.

Both take equally shaped contiguous tensors of one float dtype and at most three factors (Taylor order
2). The references are the fp32 PyTorch versions; the Triton kernels run on CUDA and, under
``TRITON_INTERPRET=1``, on CPU tensors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, cdiv, inference_only, op_for_call, use_triton
from ._launch import launch

MAX_FACTORS = 3
_BLOCK = 2048


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------
def taylor_sum_reference(factors: Sequence[torch.Tensor], coefs, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 ``base + Σ coefs[i] · factors[i]``, rounded once to the factors' dtype. ``coefs``: numbers, or
    an fp32 tensor read on the device (the first ``len(factors)`` entries)."""
    acc = torch.zeros(factors[0].shape, dtype=torch.float32, device=factors[0].device) if base is None else base.float()
    for i, f in enumerate(factors):
        c = coefs[i] if isinstance(coefs, torch.Tensor) else float(coefs[i])
        acc = acc + c * f.float()
    return acc.to(factors[0].dtype)


def taylor_refresh_reference(new: torch.Tensor, sub: Optional[torch.Tensor], old: Sequence[torch.Tensor],
                             delta: float) -> List[torch.Tensor]:
    """fp32 differences, each factor rounded to ``new.dtype`` once, the next one taken from the rounded value;
    fresh tensors (``f_0`` is a copy of ``new``, never ``new`` itself)."""
    f = [new.to(new.dtype, copy=True) if sub is None else (new.float() - sub.float()).to(new.dtype)]
    for o in old:
        f.append(((f[-1].float() - o.float()) / float(delta)).to(new.dtype))
    return f


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _taylor_sum_kernel(Out, Base, F0, F1, F2, c0, c1, c2, Coefs, n,
                       N: tl.constexpr, HAS_BASE: tl.constexpr, COEFS_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(cdiv(n, BLOCK),)``; all tensors flat, contiguous, ``n`` elements; ``N`` factors are read
    (the pointers past them are dummies). ``COEFS_IN_MEMORY``: the coefficients are read from ``Coefs``
    (fp32) instead of ``c0``..``c2`` (a captured graph then serves every step)."""
    if COEFS_IN_MEMORY:
        c0 = tl.load(Coefs)
        if N > 1:
            c1 = tl.load(Coefs + 1)
        if N > 2:
            c2 = tl.load(Coefs + 2)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    acc = c0 * tl.load(F0 + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BASE:
        acc += tl.load(Base + offs, mask=m, other=0.0).to(tl.float32)
    if N > 1:
        acc += c1 * tl.load(F1 + offs, mask=m, other=0.0).to(tl.float32)
    if N > 2:
        acc += c2 * tl.load(F2 + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=m)


@triton.jit
def _taylor_refresh_kernel(New, Sub, Old0, Old1, Out0, Out1, Out2, inv_delta, n,
                           N_OLD: tl.constexpr, HAS_SUB: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(cdiv(n, BLOCK),)``; all tensors flat, contiguous, ``n`` elements. Writes ``Out0`` and, for
    each of the ``N_OLD`` old factors, the next order from the rounded value just stored."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    f = tl.load(New + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_SUB:
        f -= tl.load(Sub + offs, mask=m, other=0.0).to(tl.float32)
    f = f.to(Out0.dtype.element_ty)
    tl.store(Out0 + offs, f, mask=m)
    if N_OLD > 0:
        f = ((f.to(tl.float32) - tl.load(Old0 + offs, mask=m, other=0.0).to(tl.float32)) * inv_delta).to(Out1.dtype.element_ty)
        tl.store(Out1 + offs, f, mask=m)
    if N_OLD > 1:
        f = ((f.to(tl.float32) - tl.load(Old1 + offs, mask=m, other=0.0).to(tl.float32)) * inv_delta).to(Out2.dtype.element_ty)
        tl.store(Out2 + offs, f, mask=m)


def _grid(n):
    return (cdiv(n, _BLOCK),)


def _taylor_sum_triton(factors, coefs, base, coef_tensor=None):
    out = torch.empty_like(factors[0])
    fs = list(factors) + [factors[0]] * (MAX_FACTORS - len(factors))
    cs = [float(c) for c in coefs] + [0.0] * (MAX_FACTORS - len(coefs))
    n = out.numel()
    if n:
        launch(_taylor_sum_kernel, _grid(n), out, factors[0] if base is None else base, *fs, *cs,
               coef_tensor if coef_tensor is not None else out, n,
               N=len(factors), HAS_BASE=base is not None, COEFS_IN_MEMORY=coef_tensor is not None, BLOCK=_BLOCK)
    return out


def _taylor_refresh_triton(new, sub, old, delta):
    outs = [torch.empty_like(new) for _ in range(1 + len(old))]
    olds = list(old) + [new] * (2 - len(old))
    o = outs + [new] * (MAX_FACTORS - len(outs))
    n = new.numel()
    if n:
        # a multiply by 1/delta: delta is a small integer step count, and fp32 rounds 1/3 and x/3 alike
        # closely enough for a cache (the reference divides; tests bound the difference)
        launch(_taylor_refresh_kernel, _grid(n), new, new if sub is None else sub, *olds, *o, 1.0 / float(delta), n,
               N_OLD=len(old), HAS_SUB=sub is not None, BLOCK=_BLOCK)
    return outs


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------
def _taylor_sum_impl(factors: List[torch.Tensor], coefs: List[float], base: Optional[torch.Tensor] = None,
                     coef_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``coef_tensor`` (fp32, at least ``len(factors)`` entries), when given, replaces ``coefs``."""
    if use_triton(factors[0]) and _flat(factors, base):
        return _taylor_sum_triton(factors, coefs, base, coef_tensor)
    return taylor_sum_reference(factors, coefs if coef_tensor is None else coef_tensor, base)


def _taylor_refresh_impl(new: torch.Tensor, sub: Optional[torch.Tensor], old: List[torch.Tensor],
                         delta: float) -> List[torch.Tensor]:
    if use_triton(new) and _flat([new, *old], sub):
        return _taylor_refresh_triton(new, sub, old, delta)
    return taylor_refresh_reference(new, sub, old, delta)


def _flat(tensors, extra) -> bool:
    """The kernels index memory flat: every tensor dense (a permutation of a contiguous layout, e.g. the
    heads-inner attention output) with the strides of the first (else the reference runs). Outputs are
    ``empty_like`` of the first, so they share that layout."""
    ts = list(tensors) + ([extra] if extra is not None else [])
    first = ts[0]
    order = sorted(range(first.dim()), key=lambda d: -first.stride(d))
    return first.permute(order).is_contiguous() and all(t.stride() == first.stride() for t in ts)


taylor_sum_op = torch.library.custom_op("flashomni::taylor_sum", _taylor_sum_impl, mutates_args=())
taylor_refresh_op = torch.library.custom_op("flashomni::taylor_refresh", _taylor_refresh_impl, mutates_args=())
inference_only(taylor_sum_op)
inference_only(taylor_refresh_op)


@taylor_sum_op.register_fake
def _(factors, coefs, base=None, coef_tensor=None):
    return torch.empty_like(factors[0])


@taylor_refresh_op.register_fake
def _(new, sub, old, delta):
    return [torch.empty_like(new) for _ in range(1 + len(old))]


def _check(labelled, like):
    """Float tensors of one dtype, device and shape; any strides (non-dense layouts take the reference)."""
    for name, t in labelled:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES or t.dtype != like.dtype or t.device != like.device:
            raise TypeError(f"{name} must be a float16/bfloat16/float32 tensor of dtype {like.dtype} on {like.device}, "
                            f"got {t.dtype} on {t.device}")
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(like.shape)}")


def taylor_sum(factors: Sequence[torch.Tensor], coefs, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``base + Σ coefs[i] · factors[i]`` (``base`` None: the sum alone) in one pass, computed in fp32 and
    rounded once to the factors' dtype. 1 to 3 factors of one shape and dtype; ``base`` likewise.
    ``coefs``: numbers, or an fp32 tensor on the factors' device holding at least one per factor, which
    the kernel reads from memory (nothing is read on the host: a captured CUDA graph serves every step)."""
    factors = list(factors)
    in_memory = isinstance(coefs, torch.Tensor)
    n_coefs = coefs.numel() if in_memory else len(coefs)
    if not 1 <= len(factors) <= MAX_FACTORS or (n_coefs < len(factors) if in_memory else n_coefs != len(factors)):
        raise ValueError(f"taylor_sum takes 1 to {MAX_FACTORS} factors with as many coefs, got {len(factors)} "
                         f"factors and {n_coefs} coefs")
    _check([(f"factors[{i}]", f) for i, f in enumerate(factors)] + ([("base", base)] if base is not None else []),
           factors[0])
    if in_memory:
        if coefs.dtype != torch.float32 or coefs.device != factors[0].device or coefs.dim() != 1:
            raise TypeError(f"taylor_sum: coefs given as a tensor must be 1-D float32 on {factors[0].device}, got "
                            f"{coefs.dtype} of {coefs.dim()} dims on {coefs.device}")
        return op_for_call(taylor_sum_op, _taylor_sum_impl, factors, base)(factors, [0.0] * len(factors), base,
                                                                            coefs.contiguous())
    return op_for_call(taylor_sum_op, _taylor_sum_impl, factors, base)(factors, [float(c) for c in coefs], base)


def taylor_refresh(new: torch.Tensor, old: Sequence[torch.Tensor], delta: float,
                   sub: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Taylor factors after observing ``new − sub`` (``new`` when ``sub`` is None) ``delta`` steps after
    the observation that gave ``old`` (0 to 2 factors; none: the first observation). Returns
    ``1 + len(old)`` fresh tensors in ``new.dtype`` (never ``new`` itself)."""
    old = list(old)
    if len(old) > MAX_FACTORS - 1:
        raise ValueError(f"taylor_refresh takes at most {MAX_FACTORS - 1} old factors, got {len(old)}")
    if old and not delta > 0:
        raise ValueError(f"taylor_refresh needs delta > 0 with old factors, got {delta!r}")
    _check([("new", new)] + ([("sub", sub)] if sub is not None else []) + [(f"old[{i}]", o) for i, o in enumerate(old)],
           new)
    return op_for_call(taylor_refresh_op, _taylor_refresh_impl, new, sub, old)(new, sub, old, float(delta) if old else 1.0)
