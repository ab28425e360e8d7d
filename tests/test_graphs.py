"""Dispatch steps replayed from captured graphs (``omni_compile.graphs``), on the CPU: a capturer that, like
a CUDA graph, runs the call's Python once and on every replay re-runs only its *work* with the Python
decisions frozen at the capture step (the clock's position put back to it, the runtime's bookkeeping undone
afterwards). A per-step value baked in at capture (rather than read from ``state.step_coefs``) then shows as
a wrong result. Plus: dispatch steps read nothing on the host."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import omni_compile.backend as backend
import omni_compile.graphs as graphs
from omni_compile import FixedBlocks, ResidualChange
from omni_compile.policies import Fixed
from omni_compile.schedule import step_action

from _runtime_helpers import compile_with, denoise, initial_latents, make_state, tiny_flux

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def frozen_capture(state):
    """A CPU stand-in for ``graphs.cuda_capture`` (module docstring)."""

    def capture(fn, args):
        pos = state.clock.position
        out = fn(*args)

        def replay():
            journal = graphs._Journal(state)
            before = journal.snapshot()
            now, state.clock.position = state.clock.position, pos
            state._hook_tick = True  # a replay runs no Python: the graph's clock op does not place it
            try:
                with state.graph_mode():
                    new = fn(*args)
            finally:
                state.clock.position = now
                journal.restore(before)
            for o, n in zip(out if isinstance(out, (list, tuple)) else [out], new if isinstance(new, (list, tuple)) else [new]):
                if isinstance(o, torch.Tensor):
                    o.copy_(n)

        return replay, out

    return capture


@pytest.fixture
def flux():
    model, make_inputs, info = tiny_flux(side=8, text=16, layers=1, single_layers=2, heads=2, head_dim=16)
    return model, make_inputs, initial_latents(info)


def _graph_loop(model, make_inputs, lat, state, steps, monkeypatch):
    monkeypatch.setattr(backend, "_replays_dispatch_steps", lambda st, mode, has_sites, ex: has_sites)
    monkeypatch.setattr(graphs, "cuda_capture", frozen_capture(state))
    out = denoise(compile_with(model, state), make_inputs, lat, steps)
    runners = [c["graph_runner"] for c in state.compiles if "graph_runner" in c]
    return out, runners


def _actions(state):
    by = collections.defaultdict(list)
    for r in state.history:
        by[(r.generation, r.step)].append((r.site_id, r.action))
    return {k: sorted(v) for k, v in by.items()}


@pytest.mark.parametrize("kw", [
    dict(policy=Fixed(reuse=0.5, skip=0.5), taylor_order=1),
    dict(policy=Fixed(reuse=0.5, skip=0.25), taylor_order=2),
    dict(policy="flashomni", taylor_order=1),
    dict(policy=Fixed(reuse=0.5, skip=0.5), taylor_order=1, block_cache=FixedBlocks(0.5)),
    dict(policy="flashomni", taylor_order=1, block_cache=ResidualChange(10.0)),
    dict(policy=Fixed(reuse=0.5, skip=0.5), taylor_order=1, final_dense=2),
], ids=["fixed", "order2", "flashomni", "blocks", "adaptive-blocks", "final-dense"])
def test_replayed_dispatch_steps_equal_the_ordinary_loop(flux, monkeypatch, kw):
    """12 steps, warm-up 2, interval 5: per update, one ordinary dispatch step, one captured, two replayed.
    The loop, the step history and every counter equal the loop without graphs."""
    model, make_inputs, lat = flux
    base = dict(warmup=2, interval=5, steps=12, **kw)
    ref_state = make_state(**base)
    ref = denoise(compile_with(model, ref_state), make_inputs, lat, 12)
    torch._dynamo.reset()
    st = make_state(**base)
    out, runners = _graph_loop(model, make_inputs, lat, st, 12, monkeypatch)
    # the final dense steps (10, 11) end the second cycle early: 7 ordinary, 8 captured, 9 replayed
    replays = 3 if kw.get("final_dense") else 4
    assert runners and sum(r.captures for r in runners) >= 2 and sum(r.replays for r in runners) >= replays
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert _actions(st) == _actions(ref_state)
    for a, b in zip(st.sites, ref_state.sites):
        assert (a.calls, a.linear_q_calls, a.linear_o_calls) == (b.calls, b.linear_q_calls, b.linear_o_calls)
        assert [(k, ss.counts, ss.sparse_calls) for k, ss in a.streams.items()] == \
               [(k, ss.counts, ss.sparse_calls) for k, ss in b.streams.items()]
    assert st.report().density() == pytest.approx(ref_state.report().density())


def test_a_baked_step_value_would_show(flux, monkeypatch):
    """The capturer is strict enough: with the device coefficients not used (graph mode ignored), replays
    forecast with the capture step's x and the loop differs."""
    model, make_inputs, lat = flux
    base = dict(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=5, steps=12, taylor_order=1)
    ref = denoise(compile_with(model, make_state(**base)), make_inputs, lat, 12)
    torch._dynamo.reset()
    st = make_state(**base)
    monkeypatch.setattr(st, "graph_mode", contextlib.nullcontext)  # the ops then take the host's x
    out, _ = _graph_loop(model, make_inputs, lat, st, 12, monkeypatch)
    assert (out - ref).abs().max() > 1e-3


class _Reads:
    """Counts host reads of tensor values (what would wait for a GPU) while ``active``."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")

    def __init__(self, monkeypatch):
        self.active = False
        self.seen = collections.Counter()
        for n in self.NAMES:
            real = getattr(torch.Tensor, n)

            def wrapped(t, *a, _real=real, _n=n, **k):
                if self.active:
                    self.seen[_n] += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, n, wrapped)


@pytest.mark.parametrize("kw", [
    dict(policy=Fixed(reuse=0.5, skip=0.5)),
    dict(policy="flashomni"),
    dict(policy=Fixed(reuse=0.5, skip=0.5), block_cache=FixedBlocks(0.5)),
], ids=["fixed", "flashomni", "blocks"])
def test_dispatch_steps_read_nothing_on_the_host(flux, monkeypatch, kw):
    """With the counted clock a dispatch step reads no tensor value on the host (no device sync on a GPU):
    the clock's timestep checks wait for a dense or update step."""
    model, make_inputs, lat = flux
    st = make_state(warmup=2, interval=3, steps=8, **kw)
    compiled = compile_with(model, st)
    reads = _Reads(monkeypatch)
    per_action = collections.Counter()
    ts = torch.linspace(1.0, 0.1, 8)
    with torch.no_grad():
        compiled(**make_inputs(lat, ts[:1]))  # compile
        st.reset()
        for i, t in enumerate(ts):
            action = step_action(i, 2, 3)
            reads.seen.clear()
            reads.active = action == "dispatch"
            compiled(**make_inputs(lat, t.reshape(1)))
            reads.active = False
            per_action[action] += sum(reads.seen.values())
    assert sum(1 for i in range(8) if step_action(i, 2, 3) == "dispatch") == 4
    assert per_action["dispatch"] == 0, reads.seen


@pytest.mark.gpu
@pytest.mark.parametrize("block_cache", [None, FixedBlocks(0.5)], ids=["sites", "blocks"])
def test_cuda_graph_loop_equals_the_ordinary_loop_and_never_syncs_on_dispatch(block_cache):
    """On a GPU: a whole generation with updates in it, replayed dispatch steps against the ordinary loop,
    and no host-device sync on any dispatch step (``torch.cuda.set_sync_debug_mode("error")``)."""
    model, make_inputs, info = tiny_flux(side=16, text=16, layers=1, single_layers=2, heads=2, head_dim=64,
                                         device="cuda", dtype=torch.bfloat16)
    lat = initial_latents(info, device="cuda", dtype=torch.bfloat16)
    base = dict(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=5, steps=12, block_cache=block_cache)
    ref = denoise(compile_with(model, make_state(**base)), make_inputs, lat, 12)
    torch._dynamo.reset()
    st = make_state(cuda_graphs=True, **base)
    compiled = compile_with(model, st)
    x = lat
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(12)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            dispatch = step_action(i, 2, 5) == "dispatch"
            inputs = make_inputs(x, (t / 1000).reshape(1).to("cuda"))  # (host-to-device copies of the ids)
            torch.cuda.set_sync_debug_mode("error" if dispatch else "default")
            try:
                v = compiled(**inputs)[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            x = sched.step(v, t, x, return_dict=False)[0]
    runners = [c["graph_runner"] for c in st.compiles if "graph_runner" in c]
    assert sum(r.replays for r in runners) >= 4
    torch.testing.assert_close(x.float(), ref.float(), rtol=2e-2, atol=2e-2)
