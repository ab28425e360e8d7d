"""Speed at a quality budget (``omni_compile.tune``): the trace of a generation, the work model's arithmetic,
the schedule's final dense steps, FlashOmni's threshold ramp, and the search on a tiny model."""

from __future__ import annotations


import pytest
import torch

import omni_compile
from omni_compile import FixedBlocks, OmniConfig, ResidualChange
from omni_compile.policies import FlashOmni, Fixed, PolicyFallback
from omni_compile.schedule import step_action
from omni_compile.tune import (Axis, Budget, SiteStep, Trace, WorkModel, config_of, nearest_point, psnr, trace)

from _runtime_helpers import BLOCK, compile_with, denoise, make_state, tiny_flux_case

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


# ---- the schedule's final dense steps and the threshold ramp --------------------------------------------


def test_final_dense_steps_end_the_schedule():
    acts = [step_action(s, 3, 3, steps=12, final_dense=2) for s in range(12)]
    assert acts == ["dense", "dense", "update", "dispatch", "dispatch", "update", "dispatch", "dispatch", "update",
                    "dispatch", "dense", "dense"]
    # without the loop's length there are none
    assert [step_action(s, 3, 3, final_dense=2) for s in range(12)] == [step_action(s, 3, 3) for s in range(12)]
    with pytest.raises(ValueError, match="final_dense needs the loop's length"):
        OmniConfig(final_dense=1)
    with pytest.raises(ValueError, match="final_dense must be an integer"):
        OmniConfig(final_dense=-1, steps=10)


def test_final_dense_steps_run_dense_in_the_loop():
    model, make_inputs, x = tiny_flux_case()
    st = make_state(policy=Fixed(reuse=0.5, skip=0.5), steps=8, final_dense=2)
    denoise(compile_with(model, st), make_inputs, x, 8)
    acts = {r.step: r.action for r in st.history}
    assert [acts[s] for s in range(8)] == ["dense", "update", "dispatch", "dispatch", "update", "dispatch", "dense",
                                           "dense"]
    # nothing is observed for a forecast on the final dense steps: the caches are the last update's
    updates = {ss.update_step for s in st.sites for ss in s.streams.values()}
    assert updates == {4}


def test_final_dense_steps_keep_the_last_updates_block_residuals():
    model, make_inputs, x = tiny_flux_case(single_layers=2)
    st = make_state(policy="dense", block_cache=ResidualChange(1e9), steps=8, final_dense=2)
    denoise(compile_with(model, st), make_inputs, x, 8)
    for b in st.blocks:
        (bs,) = b.streams.values()
        # cached on every dispatch step (2, 3, 5); steps 6 and 7 ran dense and observed nothing
        assert bs.obs_step == bs.update_step == 4 and bs.skipped == bs.counts["dispatch"] == 3 and bs.counts["dense"] == 3


def test_ramp_scales_both_thresholds_by_the_loop_progress():
    from omni_compile.bench.presets import example_input

    inp = example_input()
    pol = FlashOmni(tau_q=0.8, tau_kv=0.2, ramp=2)
    inp.step = 4
    tq, tkv = pol.thresholds(inp, OmniConfig(steps=10))
    assert (tq, tkv) == pytest.approx((0.8 * 0.25, 0.2 * 0.25))  # ((4 + 1) / 10) ** 2
    assert FlashOmni(tau_q=0.8, tau_kv=0.2).thresholds(inp, OmniConfig()) == (0.8, 0.2)
    with pytest.raises(PolicyFallback, match="needs the loop's length"):
        pol.thresholds(inp, OmniConfig())
    with pytest.raises(ValueError, match="ramp must be a number from 0 to 8"):
        FlashOmni(ramp=-1)
    # the ramped policy's symbols are the plain policy's at the ramped thresholds
    a = pol.symbols(inp, OmniConfig(steps=10, block_q=16, block_kv=16))
    b = FlashOmni(tau_q=tq, tau_kv=tkv).symbols(inp, OmniConfig(block_q=16, block_kv=16))
    assert all(torch.equal(u, v) for u, v in zip(a.to_dense(), b.to_dense()))
    assert a.density() > FlashOmni(tau_q=0.8, tau_kv=0.2).symbols(inp, OmniConfig(block_q=16, block_kv=16)).density()


# ---- the trace and the work model ------------------------------------------------------------------------


def _trace(cells, actions):
    return Trace(len(actions), list(actions), ["a", "b"], [100, 300], [0, 1], cells, blocks=2)


def test_work_model_prices_each_step_from_its_work():
    c = SiteStep
    acts = ["dense", "update", "dispatch", "dispatch"]
    cells = [[c(), c()], [c(), c()],
             [c(density=0.5, reuse=0.2), c(ran=0.0)],
             [c(density=0.25, reuse=0.5), c(density=1.0)]]
    tr = _trace(cells, acts)
    m = WorkModel(attention=0.4, projections=0.2, outside=0.1, update=0.05)
    rest = 1 - 0.1 - 0.4 - 0.2
    d1 = 0.1 + (0.4 * 0.5 + 0.2 * 0.8 + rest + 0.0) / 2
    d2 = 0.1 + ((0.4 * 0.25 + 0.2 * 0.5 + rest) + (0.4 + 0.2 + rest)) / 2
    assert m.loop_cost(tr) == pytest.approx(1 + 1.05 + d1 + d2)
    assert m(tr) == m.loop_cost(tr) and m.dense(4) == 4.0
    # attention work weighs sites by their work; the cached site counts 0
    assert tr.attention_work(dispatch_only=True) == pytest.approx((100 * 0.5 + 0 + 100 * 0.25 + 300 * 1.0) / 800)
    assert tr.cached_share() == pytest.approx(0.25)


def test_work_model_at_another_size_rederives_density_from_the_vision_choices():
    c = SiteStep
    acts = ["update", "dispatch", "dispatch"]
    fig = c(density=0.9, reuse=0.1, reuse_vision=0.5, skip_vision=0.5)
    tr = Trace(3, acts, ["a"], [1], [None], [[c()], [fig], [fig]])
    m = WorkModel(attention=0.5, projections=0.1, outside=0.0, update=0.0, text_share=0.2, blocks=3,
                  dense_ms=10.0, baseline_ms=12.0)
    t = 0.2
    density = t + (1 - t) * 0.5 * (t + (1 - t) * 0.5)
    step = 0.5 * density + 0.1 * (1 - (1 - t) * 0.5) + 0.4
    p = m.predict(tr, steps=6, warmup=1, interval=3)  # update, dispatch, dispatch, update, dispatch, dispatch
    assert p["cost"] == pytest.approx(2 + 4 * step)
    assert p["speedup"] == pytest.approx(6 * 12.0 / (p["cost"] * 10.0))
    assert m(tr) == pytest.approx(1 + 2 * step)  # the trace's own schedule at this size
    back = Trace.from_dict(tr.to_dict())
    assert back.cells == tr.cells and back.actions == tr.actions


def test_trace_of_a_loop_with_fixed_bits_and_cached_blocks():
    model, make_inputs, x = tiny_flux_case(single_layers=2)  # 3 blocks, a site each
    st = make_state(policy=Fixed(reuse=0.5, skip=0.5), block_cache=FixedBlocks(1 / 3), warmup=2, interval=3)
    denoise(compile_with(model, st), make_inputs, x, 8)
    tr = trace(st)
    assert tr.actions == [step_action(s, 2, 3) for s in range(8)] and tr.blocks == 3
    cached = [b.order for b in st.blocks if b.skipped_calls]
    assert cached == [1]  # round(3 / 3) = 1 block: floor(0.5 * 3) = 1
    for s, a in enumerate(tr.actions):
        for i, cell in enumerate(tr.cells[s]):
            if a != "dispatch":
                assert (cell.ran, cell.density) == (1.0, 1.0)
            elif tr.site_block[i] == 1:
                assert cell.ran == 0.0
            else:
                # 4 vision query blocks: 2 reused; 4 vision key blocks: 2 skipped per computed row
                assert cell.ran == 1.0 and cell.reuse_vision == 0.5 and cell.skip_vision == 0.5
                assert 0 < cell.density < 1
    assert tr.cached_share() == pytest.approx(1 / 3)


# ---- the search -------------------------------------------------------------------------------------------


def test_search_space_points_and_configs():
    space = (Axis("interval", (1, 3, 5)), Axis("tau_q", (0.0, 0.5, 0.9)), Axis("block_cache", (None, FixedBlocks(0.5))))
    base = OmniConfig(interval=3)
    p = nearest_point(base, space)
    assert p == (1, 1, 0)
    cfg = config_of(base, space, (2, 2, 1))
    assert cfg.interval == 5 and cfg.policy == FlashOmni(tau_q=0.9, tau_kv=0.05) and cfg.block_cache == FixedBlocks(0.5)
    sites = (Axis("policy", ("dense", FlashOmni(tau_q=0.3), FlashOmni())), Axis("tau_q", (0.0, 0.9)))
    assert nearest_point(OmniConfig(policy="flashomni"), sites) == (2, 1)  # tau_q 0.5: nearer 0.9 than 0
    assert nearest_point(OmniConfig(policy="dense"), sites) == (0, 0)
    # thresholds move a FlashOmni policy and leave the dense one as it is (the search runs such twins once)
    assert config_of(OmniConfig(), sites, (0, 1)).policy.name == "dense"
    assert config_of(OmniConfig(), sites, (1, 1)).policy == FlashOmni(tau_q=0.9)


def test_budget_measures_and_scores():
    ref = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = (ref + 0.01).clamp(0, 1)
    b = Budget(psnr=30, ssim=0.9, data_range=1.0)
    got = b.measure([out, ref], [ref, ref])
    assert got["psnr"] == float("inf") or got["psnr"] > 30
    worst = Budget(psnr=30, data_range=1.0, worst=True).measure([out, ref], [ref, ref])
    assert worst["psnr"] == pytest.approx(psnr(out, ref, 1.0))
    assert b.holds(dict(psnr=31.0, ssim=0.95)) and not b.holds(dict(psnr=29.0, ssim=0.95))
    assert b.score(dict(psnr=31.0, ssim=0.95)) == pytest.approx(min(0.1, 0.5))
    with pytest.raises(ValueError):
        Budget()


def test_tuner_finds_a_faster_setting_inside_the_budget():
    """On the tiny FLUX (3 blocks, 10 steps, two calibration latents), a 45 dB budget against the dense
    latents: the search returns a setting inside the budget (re-measured here) that its cost model prices
    below the starting point's, the cheapest of the settings it found inside the budget."""
    model, make_inputs, _ = tiny_flux_case(single_layers=2)
    from _runtime_helpers import initial_latents

    latents = [initial_latents(dict(tokens=64, channels=16), seed=s) for s in (0, 1)]

    def generate(m, x):
        return denoise(m, make_inputs, x, 10)

    space = (Axis("interval", (1, 2, 3, 5)), Axis("tau_q", (0.0, 0.5, 0.9)), Axis("tau_kv", (0.0, 0.05, 0.2)),
             Axis("block_cache", (None, FixedBlocks(1 / 3), FixedBlocks(2 / 3))))
    base = OmniConfig(use_inductor=False, block_q=BLOCK, block_kv=BLOCK, warmup=2, interval=2,
                      policy=FlashOmni(tau_q=0.5, tau_kv=0.05))
    cost = WorkModel(attention=0.4, projections=0.1, outside=0.05)
    budget = Budget(psnr=45.0)
    res = omni_compile.tune(model, generate, latents, budget, base=base, space=space, cost=cost, max_trials=20)
    rep = res.report
    start, best = rep.trials[rep.default_index], rep.best
    assert best is not None and best.holds and best.config == res.config
    assert best.cost < start.cost and rep.speedup(best) > rep.speedup(start) > 1.0
    assert best.cost == min(t.cost for t in rep.trials if t.holds)
    assert any(not t.holds for t in rep.trials)  # the budget binds: faster settings were tried and refused
    assert len(rep.trials) <= 20 and len({t.point for t in rep.trials}) == len(rep.trials)
    # the chosen setting holds the budget when run again from scratch
    torch._dynamo.reset()
    st = omni_compile.OmniState(res.config)
    cm = compile_with(model, st)
    refs = [generate(model, x) for x in latents]
    outs = [generate(cm, x) for x in latents]
    assert budget.holds(budget.measure(outs, refs))
    gens = sorted({r.generation for r in st.history})
    assert cost(Trace.mean([trace(st, g) for g in gens]), res.config) == pytest.approx(best.cost)
    # the report names the front and draws it
    assert rep.front()[0].cost == min(t.cost for t in rep.trials)
    assert "B" in rep.plot() and "budget" in rep.format() and rep.to_dict()["best_index"] == rep.best_index


@pytest.mark.parametrize("final_dense", [0, 2])
def test_final_dense_steps_compute_the_dense_model_on_the_loop_state(final_dense):
    """On each of the last ``final_dense`` steps the compiled model's output is the dense model's on that
    step's input (a sparse loop's latents), with the block caching of the default config on; a step that
    dispatches differs from it (the control: ``final_dense=0`` leaves the last step a dispatch step)."""
    steps = 7  # warm-up 2, interval 3: dense 0, updates 1 and 4, dispatch 2, 3, 5 and 6
    model, make_inputs, lat = tiny_flux_case(single_layers=2)
    state = make_state(policy=Fixed(reuse=0.5, skip=0.5), block_cache=ResidualChange(10.0), steps=steps,
                       final_dense=final_dense)
    torch._dynamo.reset()
    compiled = compile_with(model, state)
    seen = []

    def spy(**kw):
        out = compiled(**kw)
        with torch.no_grad():
            seen.append((out[0], model(**kw)[0]))
        return out

    denoise(spy, make_inputs, lat, steps)
    gaps = [(a - b).abs().max().item() / b.abs().max().item() for a, b in seen]
    assert len(gaps) == steps
    for s in range(steps - final_dense, steps):
        assert gaps[s] < 1e-5, (s, gaps)
    if final_dense == 0:
        assert gaps[-1] > 1e-3, gaps  # a dispatch step: reused tiles, skipped keys and cached blocks
