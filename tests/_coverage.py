"""One family of the coverage sweep: compile a tiny diffusers transformer (``_tiny_families.py``) once with the
``flashomni`` backend and check what the passes and the runtime make of it.

:func:`check_family` returns a :class:`Row`; ``tests/test_coverage_sweep.py`` asserts on it and
``tools/passes_coverage.py`` writes the coverage table of docs/passes.md from it. Per family, one compile
(``use_inductor=False``: the rewritten FX graph runs as is, which is what the checks need) serves

1. the dense check: ``policy="dense"`` on two fresh inputs (every input shape the pipeline uses), output
   equal to eager; SDPA calls in eager counted against the sites the passes found;
2. the sparse loop: ``state.configure(policy=Fixed(...))`` on the same graph, six steps with the pipeline's
   own timesteps, CFG form and masks; dispatch steps counted per site, the output finite and different
   from the dense output there.

Both run under ``torch.compiler.set_stance("fail_on_recompile")`` once every input shape was seen.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from omni_compile import FlashOmniWarning, OmniConfig, OmniState
from omni_compile.policies import Fixed

import _tiny_families as TF

#: the loop's scheduler positions (1 = noise), exact in bf16 and after ``* 1000``
SIGMAS = [1 - k / 8 for k in range(6)]
LOOP = dict(warmup=2, interval=3, block_cache=None)  # the attention sites alone: block caching has its own tests


@dataclass
class Row:
    family: str
    cls: str
    sdpa_calls: int = 0
    """SDPA calls of one eager forward."""
    graphs: int = 0
    sites: int = 0
    rewritten: int = 0
    gemm_q: int = 0
    gemm_o: int = 0
    q_projections: int = 0
    """Rewritten sites whose walk found a q projection (separate or fused): GEMM-Q candidates."""
    dense_max_diff: float = float("nan")
    recompiled: bool = False
    dispatch_calls: int = 0
    dispatch_sites: int = 0
    sparse_finite: bool = False
    sparse_max_diff: float = 0.0
    """Largest |sparse - eager| at the loop's last step, a dispatch step."""
    segments: dict = field(default_factory=dict)
    """Site name -> (kind, segments, kv_segments) of the rewritten sites."""
    warnings: list = field(default_factory=list)
    """The ``FlashOmniWarning`` messages the compile and the calls raised (what the user is told)."""
    reasons: list = field(default_factory=list)
    """``"<site, graph or loop>: <why>"``: why sites stay dense or lack GEMM-Q/GEMM-O, why the runtime ran
    rewritten sites dense, graph breaks inside attention code, a loop with no dispatch step."""
    error: str = ""
    seconds: float = 0.0


class CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def tensors(out) -> list:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in tensors(o)]
    return []


def max_diff(a, b) -> float:
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb) and ta, "outputs differ in structure"
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(ta, tb))


def finite(a) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors(a))


def batch_of(name: str) -> int:
    return 2 if TF.META[name].cfg == "batch" else 1


def step_inputs(name: str, make_inputs, k: int, seed: int = 100) -> list:
    """The model calls of loop step ``k`` as the pipeline makes them: one call, or cond then uncond (the
    uncond call with the negative prompt's own length where the pipeline pads per call)."""
    sigma = SIGMAS[k]
    if TF.META[name].cfg == "two_calls":
        neg = {"neg": True} if "neg" in inspect.signature(make_inputs).parameters else {}
        return [make_inputs(seed + k, t=sigma), make_inputs(seed + 50 + k, t=sigma, **neg)]
    return [make_inputs(seed + k, t=sigma)]


def _reasons(state) -> list:
    out = []
    for s in state.sites:
        if not s.rewritten:
            out.append(f"{s.name}: dense: {s.reason}")
            continue
        if not s.gemm_q:
            out.append(f"{s.name}: no GEMM-Q: {s.gemm_q_reason}")
        if not s.gemm_o:
            out.append(f"{s.name}: no GEMM-O: {s.gemm_o_reason}")
    return out


@contextlib.contextmanager
def one_thread():
    """Run on one intra-op thread: the tiny models gain nothing from more, and on a shared machine the
    spinning of a second thread made the sweep 4x slower (LTX-2: 19 s against 4.6 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_family(name: str) -> Row:
    """Compile ``name`` once and run the dense check and the sparse loop (module docstring)."""
    t0 = time.perf_counter()
    row = Row(name, TF.META[name].cls)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as caught, one_thread():
            warnings.simplefilter("always", FlashOmniWarning)
            _check(name, row)
        row.warnings = [str(w.message) for w in caught if issubclass(w.category, FlashOmniWarning)]
    except Exception as e:  # noqa: BLE001  (the row says what broke; the test asserts there is no error)
        row.error = f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        torch._dynamo.reset()
    row.seconds = time.perf_counter() - t0
    return row


def _check(name: str, row: Row) -> None:
    model, make_inputs = TF.build(name, batch=batch_of(name))
    # two steps see every input shape twice: a second shape makes Dynamo retrace with symbolic sizes, and
    # the backend specialises that graph per shape on first use; nothing compiles after that
    first = step_inputs(name, make_inputs, 0, seed=0) + step_inputs(name, make_inputs, 1, seed=5)
    fresh = step_inputs(name, make_inputs, 2, seed=10)
    with torch.no_grad():
        counter = CountSDPA()
        with counter:
            ref_first = [model(**kw) for kw in first]
        ref_fresh = [model(**kw) for kw in fresh]
    row.sdpa_calls = counter.calls // len(first)

    state = OmniState(OmniConfig(policy="dense", use_inductor=False, block_q=16, block_kv=16, **LOOP))
    compiled = torch.compile(model, backend="flashomni", options={"state": state})
    with torch.no_grad():
        outs = [compiled(**kw) for kw in first]
        n_compiles = len(state.compiles)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                outs += [compiled(**kw) for kw in fresh]
        except RuntimeError as e:
            if "recompil" not in str(e).lower():
                raise
            row.recompiled = True
            outs += [compiled(**kw) for kw in fresh]
    row.recompiled = row.recompiled or len(state.compiles) != n_compiles
    row.graphs = len(state.compiles)
    row.dense_max_diff = max(max_diff(o, r) for o, r in zip(outs, ref_first + ref_fresh))
    sites = state.sites
    row.sites = len(sites)
    row.rewritten = sum(s.rewritten for s in sites)
    row.gemm_q = sum(s.gemm_q for s in sites)
    row.gemm_o = sum(s.gemm_o for s in sites)
    row.q_projections = sum(1 for s in sites if s.rewritten and s.q_projections)
    row.segments = {s.name: (s.kind, s.segments, s.kv_segments) for s in sites if s.rewritten}
    row.reasons = _reasons(state)
    row.reasons += [f"graph: Dynamo breaks the graph inside attention code at {b['where']} ({b['reason']}), "
                    "so that attention runs outside every compiled graph"
                    for b in (e.get("graph_break") for e in state.compiles) if b and b["in_attention"]]

    state.configure(policy=Fixed(reuse=0.75, skip=0.5))
    row.sparse_finite = True
    with torch.no_grad(), torch.compiler.set_stance("eager_on_recompile" if row.recompiled else "fail_on_recompile"):
        for k in range(len(SIGMAS)):
            for kw in step_inputs(name, make_inputs, k):
                out = compiled(**kw)
                row.sparse_finite &= finite(out)
                if k == len(SIGMAS) - 1:  # a dispatch step (warm-up 2, interval 3): against eager
                    row.sparse_max_diff = max(row.sparse_max_diff, max_diff(out, model(**kw)))
    rep = state.report()
    row.dispatch_calls = sum(s["counts"]["dispatch"] for s in rep.sites)
    row.dispatch_sites = sum(1 for s in rep.sites if s["counts"]["dispatch"])
    row.reasons += sorted({f"{s.name}: runtime: {s.runtime_reason}" for s in state.sites
                           if s.rewritten and s.runtime_reason})
    if row.rewritten and not row.dispatch_sites and state.clock.generation >= len(SIGMAS) - 1:
        row.reasons.append(f"loop: the step clock started a new generation at every step (the pipeline passes "
                           f"{TF.META[name].direction} timesteps)")


def sparse_loop(name: str, reuse: float = 0.75, **config) -> list:
    """The outputs of the six-step sparse loop (``Fixed(reuse, skip=0.5)``) of one compile with ``config``
    (e.g. ``gemm_q=False``), and the state: ``(outputs, state)``."""
    torch._dynamo.reset()
    model, make_inputs = TF.build(name, batch=batch_of(name))
    state = OmniState(OmniConfig(policy=Fixed(reuse=reuse, skip=0.5), use_inductor=False, block_q=16, block_kv=16,
                                 **LOOP, **config))
    compiled = torch.compile(model, backend="flashomni", options={"state": state})
    outs = []
    with torch.no_grad(), one_thread():
        for k in range(len(SIGMAS)):
            outs += [tensors(compiled(**kw)) for kw in step_inputs(name, make_inputs, k)]
    torch._dynamo.reset()
    return outs, state
