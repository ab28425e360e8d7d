"""Ordinary pipeline use on one state: other resolutions and batch sizes (static and symbolic shapes),
regional compilation, two models on one state, and sites the backend cannot tell apart. Each case runs a
short sparse loop on the tiny FLUX and checks that it really dispatches and equals a fresh run."""

from __future__ import annotations

import warnings

import pytest
import torch

import omni_compile
from omni_compile import OmniState
from omni_compile.policies import Fixed

from _runtime_helpers import compile_with, denoise, make_state, tiny_flux

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _flux(seed: int = 0):
    model, make_inputs, info = tiny_flux(side=4, text=8, layers=1, single_layers=1, heads=2, head_dim=16, seed=seed)
    return model, make_inputs, info


def _latents(side: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, side * side, 16, generator=g)


def _dispatched(state: OmniState, names=None) -> set:
    """Names of the sites that ran at least one dispatch step in the history."""
    by_id = {s.site_id: s.name for s in state.sites}
    return {by_id[r.site_id] for r in state.history if r.action == "dispatch" and (names is None or by_id[r.site_id] in names)}


def _state(**kw) -> OmniState:
    return make_state(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=3, **kw)


def _loop(compiled, make_inputs, side, batch=1, steps=5, cfg="none"):
    return denoise(compiled, make_inputs, _latents(side, batch), steps, cfg=cfg)


def test_a_second_resolution_runs_sparse_and_keeps_the_first_sparse():
    """5 steps at one resolution, then another with Dynamo's default ``dynamic=None``: the recompile is
    symbolic, and the backend specialises it per shape, so both resolutions dispatch, each equal to a run on
    a fresh state."""
    model, make_inputs, _ = _flux()
    st = _state()
    compiled = compile_with(model, st)
    a1 = _loop(compiled, make_inputs, 4)
    b = _loop(compiled, make_inputs, 6)
    a2 = _loop(compiled, make_inputs, 4)
    assert any(c.get("specialized") for c in st.compiles)  # the second resolution came in symbolic
    gens = {r.generation for r in st.history}
    assert all({s.name for s in st.sites} == _dispatched_in(st, g) for g in gens)
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    torch._dynamo.reset()
    fresh = _state()
    torch.testing.assert_close(b, _loop(compile_with(model, fresh), make_inputs, 6), rtol=1e-5, atol=1e-5)


def _dispatched_in(state: OmniState, generation: int) -> set:
    by_id = {s.site_id: s.name for s in state.sites}
    return {by_id[r.site_id] for r in state.history if r.action == "dispatch" and r.generation == generation}


@pytest.mark.parametrize("dynamic", [False, True])
def test_resolutions_back_and_forth_on_one_state(dynamic):
    """Sides 4 -> 6 -> 4 with ``dynamic=False`` (a static graph per shape) and ``dynamic=True`` (one symbolic
    graph): every generation dispatches on every site and the third equals the first."""
    model, make_inputs, _ = _flux()
    st = _state()
    compiled = torch.compile(model, backend="flashomni", options={"state": st}, dynamic=dynamic)
    outs = []
    for side in (4, 6, 4):
        outs.append(_loop(compiled, make_inputs, side))
        gen = max(r.generation for r in st.history)
        assert _dispatched_in(st, gen) == {s.name for s in st.sites}, side
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    assert all(s.rewritten and s.kind == "joint" for s in st.sites)


def test_batch_one_two_one_with_cfg_switched_on_and_off():
    model, make_inputs, _ = _flux()
    st = _state()
    compiled = compile_with(model, st)
    one = _loop(compiled, make_inputs, 4)
    _loop(compiled, make_inputs, 4, cfg="batched")  # one call on cond + uncond: batch 2
    again = _loop(compiled, make_inputs, 4)
    torch.testing.assert_close(one, again, rtol=0, atol=0)
    gens = sorted({r.generation for r in st.history})
    assert all(_dispatched_in(st, g) == {s.name for s in st.sites} for g in gens[-2:])


def test_regional_compilation_runs_one_record_per_block_and_equals_the_whole_graph():
    """diffusers' ``compile_repeated_blocks``: one compiled graph runs every block of a kind. With the model
    attached for the clock, each block is its own site (named by its path), every one dispatches, and the
    loop equals the whole-model compile under the same policy."""
    model, make_inputs, _ = tiny_flux(side=4, text=8, layers=3, single_layers=3, heads=2, head_dim=16)
    whole_state = _state()
    whole = _loop(compile_with(model, whole_state), make_inputs, 4)
    torch._dynamo.reset()
    st = _state()
    model.compile_repeated_blocks(backend="flashomni", options={"state": st})
    handle = st.attach(model)
    try:
        regional = _loop(model, make_inputs, 4)
    finally:
        handle.remove()
    names = sorted(s.name for s in st.sites)
    assert names == sorted(s.name for s in whole_state.sites)  # the model's own paths, one per block
    assert len(st.compiles) < len(names)  # fewer graphs than blocks: graphs are shared
    assert _dispatched(st) == set(names)
    torch.testing.assert_close(regional, whole, rtol=1e-5, atol=1e-5)


def test_regional_compilation_without_the_clock_warns_and_runs_dense():
    model, make_inputs, _ = _flux()
    st = _state()
    model.compile_repeated_blocks(backend="flashomni", options={"state": st})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _loop(model, make_inputs, 4, steps=3)
    msgs = [str(w.message) for w in caught if issubclass(w.category, omni_compile.FlashOmniWarning)]
    assert msgs and any("state.attach(model)" in m for m in msgs)
    assert not _dispatched(st) and all(s.runtime_reason for s in st.sites)
    torch._dynamo.reset()
    for b in model.modules():
        b._compiled_call_impl = None
    torch.testing.assert_close(out, _loop(model, make_inputs, 4, steps=3), rtol=1e-5, atol=1e-5)


def test_two_models_on_one_state_keep_their_caches_apart():
    """Two transformers sharing one state, the second taking over the loop where the first stops (as in
    two-expert video pipelines): the second's sites are its own records, and its first step has nothing of
    its own to dispatch with, so it updates instead of dispatching on the first model's caches."""
    a, make_a, _ = _flux(seed=0)
    b, make_b, _ = _flux(seed=7)
    st = _state()
    ca, cb = compile_with(a, st), compile_with(b, st)
    ts = torch.linspace(1.0, 0.2, 8)
    lat = _latents(4)
    with torch.no_grad():
        for t in ts[:4]:
            ca(**make_a(lat, t.reshape(1)))
        outs = [cb(**make_b(lat, t.reshape(1)))[0] for t in ts[4:]]
    assert len(st.sites) == 2 * 2 and len({s.key for s in st.sites}) == 4
    b_ids = {s.site_id for s in st.sites if s.key[1] in {p.data_ptr() for p in b.parameters()}}
    assert len(b_ids) == 2
    by_step = {}
    for r in st.history:
        if r.site_id in b_ids:
            by_step.setdefault(r.step, set()).add(r.action)
    assert min(by_step) == 4 and by_step[4] == {"update"}  # warm-up 2, interval 3: step 4 would dispatch
    assert "dispatch" in by_step[5]
    assert torch.isfinite(torch.stack(outs)).all()
