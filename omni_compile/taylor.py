"""Taylor forecasting of cached features between update steps (the TaylorSeer scheme, paper §1).

At full steps ``u_0 < u_1 < …`` the feature ``F`` is observed; the factors after observing ``F(u_k)`` are

    f_0 = F(u_k),   f_{i+1} = (f_i(new) - f_i(old)) / Δ,   Δ = u_k - u_{k-1}   (i < D, where f_i(old) exists)

so order ``i`` becomes available after ``i + 1`` observations. At step ``t`` the forecast is
``Σ_i f_i · x^i / i!`` with ``x = t - u_k`` in integer steps. The forecast is linear in the factors, so
projecting each factor (a GEMM-O cache-bias term per order) and summing the projected terms equals
projecting the forecast — dispatch steps never need a dense output projection.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from .ops.taylor import taylor_refresh, taylor_sum

#: dtypes the one-pass ops (``omni_compile.ops.taylor``) take; others (fp64 in tests) use PyTorch ops
_OPS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def refresh(old: Optional[Sequence[torch.Tensor]], new: torch.Tensor, delta: int, order: int,
            keep: Optional[int] = None, dtype: Optional[torch.dtype] = None,
            sub: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Factors ``[f_0, …]`` after observing ``new`` (``new − sub`` when ``sub`` is given: a block's
    residual) ``delta`` steps after the observation that produced ``old`` (None: first observation).
    Differences are taken in fp32 (or wider) and stored in ``dtype`` (default ``new.dtype``). ``keep`` limits
    how many factors are computed and returned (all ``<= order + 1`` by default).

    Every returned tensor is a fresh copy, never ``new`` itself: a compiled graph may reuse the storage
    of its intermediate tensors (Inductor's buffer reuse) once their last use in the graph is done. None
    carries autograd history: the factors are kept across steps, and a cached tensor with a ``grad_fn``
    would keep its step's whole graph alive (and be backpropagated through again at the next step)."""
    dtype = dtype or new.dtype
    n_old = 0 if old is None or delta <= 0 else min(order, len(old))
    if keep is not None:
        n_old = max(0, min(n_old, keep - 1))
    if dtype == new.dtype and dtype in _OPS_DTYPES and (old is None or all(o.dtype == dtype for o in old)):
        # the storage dtype throughout: one pass over memory for all orders (ops.taylor_refresh: each
        # factor computed in fp32 and rounded once; as PyTorch ops it was a copy, then a subtraction and an
        # in-place division per order, on every GEMM-O projection and cached block of every update step)

        return _detached(taylor_refresh(new, list(old[:n_old]) if n_old else [], delta, sub=sub))
    acc = torch.promote_types(new.dtype, torch.float32)
    f = [new.to(acc) if sub is None else new.to(acc) - sub.to(acc)]
    for i in range(n_old):
        f.append((f[i] - old[i].to(acc)) / delta)
    return _detached([x.to(dtype, copy=True) if x is new or x.data_ptr() == new.data_ptr() else x.to(dtype) for x in f])


def _detached(factors: List[torch.Tensor]) -> List[torch.Tensor]:
    """``factors`` without autograd history (the check alone when there is none, as under ``no_grad``)."""
    return [f.detach() if f.requires_grad else f for f in factors]


def coefficients(n: int, x: float) -> List[float]:
    """``x^i / i!`` for ``i < n``."""
    return [x**i / math.factorial(i) for i in range(n)]


def forecast(factors: Sequence[torch.Tensor], x, dtype: torch.dtype = torch.float32,
             base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``base + Σ_i factors[i] · x^i / i!`` (``base`` None: the forecast alone) returned in ``dtype``. ``x``:
    the steps since the observation, or the fp32 device tensor ``[1, x, x²/2]`` of them
    (``OmniState.step_coefs``: nothing is then read on the host, so a captured graph serves every step).

    When ``dtype`` is the factors' (and ``base``'s) dtype it is one pass over memory
    (``ops.taylor_sum``: computed in fp32, rounded once): on a dispatch step this runs for every cached
    block, and as separate PyTorch ops (a sum, then the addition to the input) it cost two passes.
    Otherwise it accumulates in fp32 (or wider) and converts at the end."""
    coefs = x if isinstance(x, torch.Tensor) else coefficients(len(factors), x)
    if dtype in _OPS_DTYPES and all(f.dtype == dtype for f in factors) and (base is None or base.dtype == dtype):
        return taylor_sum(factors, coefs, base)
    acc = torch.promote_types(factors[0].dtype, torch.float32)
    out = None if base is None else base.to(acc)
    for i, f in enumerate(factors):
        c = coefs[i]
        term = f.to(acc) if (not isinstance(c, torch.Tensor) and c == 1.0) else f.to(acc) * c
        out = term if out is None else out + term
    return out.to(dtype)
