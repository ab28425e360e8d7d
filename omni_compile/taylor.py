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


def refresh(old: Optional[Sequence[torch.Tensor]], new: torch.Tensor, delta: int, order: int,
            keep: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """Factors ``[f_0, …]`` after observing ``new`` ``delta`` steps after the observation that produced
    ``old`` (None: first observation). Differences are taken in fp32 (or wider) and stored in ``dtype`` (default
    ``new.dtype``). ``keep`` limits how many factors are returned (all ``<= order + 1`` by default).

    Every returned tensor is a fresh copy, never ``new`` itself: a compiled graph may reuse the storage
    of its intermediate tensors (Inductor's buffer reuse) once their last use in the graph is done."""
    dtype = dtype or new.dtype
    if dtype == new.dtype and (old is None or all(o.dtype == dtype for o in old)):
        # the storage dtype throughout: per order a subtraction and an in-place division, each computed in
        # fp32 per element and rounded to the storage dtype (the fp32 path below converts every operand
        # first: 5 passes per order, on every GEMM-O projection of every update step)
        f = [new.clone()]
        if old is not None and delta > 0:
            for i in range(min(order, len(old))):
                f.append(torch.sub(f[i], old[i]).div_(delta))
        return f if keep is None else f[:keep]
    acc = torch.promote_types(new.dtype, torch.float32)
    f = [new.to(acc)]
    if old is not None and delta > 0:
        for i in range(order):
            if i >= len(old):
                break
            f.append((f[i] - old[i].to(acc)) / delta)
    if keep is not None:
        f = f[:keep]
    return [x.to(dtype, copy=True) if x is new or x.data_ptr() == new.data_ptr() else x.to(dtype) for x in f]


def coefficients(n: int, x: float) -> List[float]:
    """``x^i / i!`` for ``i < n``."""
    return [x**i / math.factorial(i) for i in range(n)]


def forecast(factors: Sequence[torch.Tensor], x: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Σ_i factors[i] · x^i / i!`` returned in ``dtype``.

    When ``dtype`` is the factors' own dtype the sum is one ``torch.add(f0, f1, alpha=c1)`` (plus an in-place
    ``add_`` per further order): each element is computed in fp32 and rounded once per order, in one pass
    over memory — on a dispatch step this runs for every GEMM-O projection, and the accumulate-in-fp32
    path below (three conversions and three passes) cost as much as the sparse GEMM it feeds (FLUX 1024²,
    H100). Otherwise it accumulates in fp32 (or wider) and converts at the end."""
    if all(f.dtype == dtype for f in factors):
        c = coefficients(len(factors), x)
        if len(factors) == 1:
            return factors[0].clone()
        out = torch.add(factors[0], factors[1], alpha=c[1])
        for ci, f in zip(c[2:], factors[2:]):
            out.add_(f, alpha=ci)
        return out
    out = None
    acc = torch.promote_types(factors[0].dtype, torch.float32)
    for c, f in zip(coefficients(len(factors), x), factors):
        term = f.to(acc) if c == 1.0 else f.to(acc) * c
        out = term if out is None else out + term
    return out.to(dtype)
