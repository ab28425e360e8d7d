"""Whole-block caching: the block pass, the split-graph runner and the block policies (CPU).

Counters and exact values, not timings. Everything runs the regions as FX (``use_inductor=False``) except
``test_inductor_regions_match_fx`` (slow).
"""

from __future__ import annotations

import math

import pytest
import torch

import _tiny_models as T
from _runtime_helpers import compile_with as _compile, denoise, make_state as _state, tiny_flux_case
from omni_compile import ComputedShare, FixedBlocks, OmniConfig, ResidualChange
from omni_compile.block_cache import BlockProgram, fixed_selection
from omni_compile.passes.blocks import find_blocks, split_blocks
from omni_compile.policies import Fixed

# residual streams per block, in execution order, of the tiny models (tests/_tiny_models.py)
STREAMS = {
    "flux": [2, 2, 1],     # double block (image, text); single block 0 (text, image); last single block: image only
    "sd3": [2, 1],         # joint block (image, text); last block is context_pre_only
    "hunyuan": [2, 1],     # double block; last single block (image only is read after it)
    "wan": [1, 1],         # self/cross-attention blocks on the video stream
}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_case(single_layers=2)




def _no_recompile(compiled):
    n = []

    def forward(**kw):
        n.append(1)
        if len(n) == 1:
            return compiled(**kw)
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled(**kw)

    return forward


# ---- the pass -------------------------------------------------------------------------------------


def test_pass_finds_blocks_and_residual_streams():
    """The pass on its own (tiny FLUX); every family's counts are checked by the loop test below."""
    family = "flux"
    model, make_inputs = T.build(family)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(**make_inputs(0))
    (gm,) = graphs
    blocks = find_blocks(gm)
    assert [len(b.streams) for b in blocks] == STREAMS[family]
    assert all(b.reject is None for b in blocks)
    assert all(how == "trace" for b in blocks for how in b.paired_by)  # no shape guessing needed
    for b in blocks:
        for o, i in b.streams:  # each output continues an input of the same shape
            assert o.meta["example_value"].shape == i.meta["example_value"].shape
    split = split_blocks(gm, blocks)
    assert [r.kind for r in split.regions] == ["prologue"] + ["block"] * len(blocks) + ["epilogue"]
    if family == "flux":
        assert [b.name for b in blocks] == ["transformer_blocks.0", "single_transformer_blocks.0",
                                            "single_transformer_blocks.1"]
        # the double block's image output feeds the single block's cat, which the single block splits back
        assert blocks[1].streams[1][1] is blocks[0].streams[0][0]


def test_fixed_selection_is_evenly_spaced():
    sel = fixed_selection(57, 0.5)  # FLUX.1: 19 double + 38 single blocks
    assert len(sel) == 28 and sel[0] == 1 and sel[-1] == 55
    assert {b - a for a, b in zip(sel, sel[1:])} <= {2, 3}  # spread over the whole depth
    assert fixed_selection(4, 0.5) == [1, 3] and fixed_selection(3, 0.0) == [] and fixed_selection(3, 1.0) == [0, 1, 2]


def test_config_validation():
    with pytest.raises(ValueError, match="block_cache must be None, one of"):
        OmniConfig(block_cache="all")
    for make, field in ((lambda: FixedBlocks(1.5), "FixedBlocks.fraction"), (lambda: ComputedShare(-0.1), "ComputedShare.s_q"),
                        (lambda: ResidualChange(-1.0), "ResidualChange.threshold"),
                        (lambda: ResidualChange(float("inf")), "ResidualChange.threshold")):
        with pytest.raises(ValueError, match=field):
            make()
    assert OmniConfig(block_cache="sq").block_cache == ComputedShare(0.3)
    assert OmniConfig(block_cache="none").block_cache is None


# ---- the loop on every family ---------------------------------------------------------------------

TIMESTEPS = (1.0, 0.875, 0.75, 0.625, 0.5)  # warmup=1, interval=3: U D D U D


def _family_loop(family, **cfg):
    model, make_inputs = T.build(family, batch=1)
    st = _state(policy=Fixed(reuse=0.5, skip=0.5), warmup=1, interval=3, **cfg)
    fwd = _no_recompile(_compile(model, st))
    base = make_inputs(0)
    scale = 1.0 if family == "flux" else 1000.0
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            kw = dict(base, timestep=torch.full_like(base["timestep"], t * scale))
            outs.append(fwd(**kw)[0].clone())
    return outs, st


@pytest.mark.parametrize("family", list(STREAMS))
def test_block_loop_on_every_family(family):
    """No block cached = the attention-only loop, bit for bit; every block cached = no block region and no
    site op of a block runs on dispatch steps; one graph, no recompiles."""
    ref, st_ref = _family_loop(family)
    none, st_none = _family_loop(family, block_cache=FixedBlocks(0.0))
    for a, b in zip(ref, none):
        assert torch.equal(a, b)
    assert len(st_none.compiles) == 1 and st_none.compiles[0]["regions"] == len(STREAMS[family]) + 2
    assert [b.streams_found for b in st_none.blocks] == STREAMS[family]  # exact blocks and streams per family
    assert all(b.cacheable and b.paired_by == ["trace"] * b.streams_found for b in st_none.blocks)
    assert all(b.region_calls == len(TIMESTEPS) and b.skipped_calls == 0 for b in st_none.blocks)

    allc, st = _family_loop(family, block_cache=FixedBlocks(1.0))
    assert all(torch.isfinite(o).all() for o in allc)
    updates, dispatches = 2, 3
    assert torch.equal(ref[0], allc[0])  # step 0 (update) runs every block
    assert not torch.equal(ref[1], allc[1])  # step 1 forecasts every block
    in_block = set()
    for b in st.blocks:
        assert b.region_calls == updates and b.skipped_calls == dispatches
        (bs,) = b.streams.values()
        assert bs.counts == {"dense": 0, "update": updates, "dispatch": dispatches} and bs.skipped == dispatches
        for sid in b.site_ids:
            in_block.add(sid)
            assert st.sites[sid].calls == updates  # the block's attention did not run on dispatch steps
    assert in_block
    for s in st.sites:
        if s.rewritten and s.site_id not in in_block:  # e.g. HunyuanVideo's token refiner: outside every block, runs always
            assert s.calls == len(TIMESTEPS)
    rep = st.report()
    assert [b["cached_steps"] for b in rep.blocks] == [dispatches] * len(STREAMS[family])
    assert "block" in rep.format()


# ---- the forecast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 1, 2])
def test_forecast_matches_hand_computed_taylor(flux, monkeypatch, order):
    model, make_inputs, lat = flux
    st = _state(policy="dense", warmup=3, interval=3, taylor_order=order, block_cache=FixedBlocks(1 / 3))  # of 3 blocks: the middle one
    seen = {}
    real = BlockProgram._run

    def spy(self, r, vals):
        outs = real(self, r, vals)
        step = self.state.clock.position.step
        region = self.split.regions[r]
        d = seen.setdefault(step, {})
        d.update({n: v.clone() for n, v in zip(region.inputs, vals) if isinstance(v, torch.Tensor)})
        d.update({n: v.clone() for n, v in zip(region.outputs, outs) if isinstance(v, torch.Tensor)})
        return outs

    monkeypatch.setattr(BlockProgram, "_run", spy)
    steps = 8  # dense 0 1, update 2, dispatch 3 4, update 5, dispatch 6 7
    denoise(_compile(model, st), make_inputs, lat, steps)
    (blk,) = [b for b in st.blocks if b.skipped_calls]
    assert blk.name == "single_transformer_blocks.0" and blk.skipped_calls == 4 and blk.region_calls == 4
    for o, i in blk.pairs:
        def res(s):
            return seen[s][o] - seen[s][i]

        for u, prev, t in ((2, (1, 0), 3), (2, (1, 0), 4), (5, (2, 1), 6), (5, (2, 1), 7)):
            d = u - prev[0]  # steps between the update and the full step before it
            f = [res(u)]
            if order >= 1:
                f.append((res(u) - res(prev[0])) / d)
            if order >= 2:
                f1_old = (res(prev[0]) - res(prev[1])) / (prev[0] - prev[1])  # order 1 at the previous full step
                f.append((f[1] - f1_old) / d)
            x = t - u
            want = seen[t][i] + sum(fi * x**k / math.factorial(k) for k, fi in enumerate(f))
            torch.testing.assert_close(seen[t][o], want, rtol=1e-5, atol=1e-5)
    assert st.compiles[0]["blocks"] == 3


# ---- CFG streams, reset, memory -------------------------------------------------------------------


def _cfg_loop(compiled, make_inputs, lat, ts, corrupt=None):
    outs = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            vc = compiled(**make_inputs(lat, t, (0,)))[0].clone()
            vu = compiled(**make_inputs(lat, t, (1,)))[0].clone()
            outs.append((vc, vu))
            if corrupt is not None and i == corrupt[1]:
                for b in corrupt[0].blocks:
                    for key, bs in b.streams.items():
                        if key[0] == 1:
                            for fs in bs.factors or []:
                                for f in fs:
                                    f.add_(10.0)
    return outs


def test_cfg_streams_isolated_and_reset(flux):
    model, make_inputs, lat = flux
    st = _state(policy=Fixed(reuse=0.5, skip=0.25), warmup=2, interval=3, block_cache=FixedBlocks(0.5))
    compiled = _compile(model, st)
    ts = [torch.tensor([t]) for t in (1.0, 0.875, 0.75, 0.625, 0.5, 0.375)]
    clean = _cfg_loop(compiled, make_inputs, lat, ts)
    cached = [b for b in st.blocks if b.skipped_calls]
    assert cached
    for b in cached:
        assert sorted(k[0] for k in b.streams) == [0, 1]
        s0, s1 = (next(v for k, v in b.streams.items() if k[0] == s) for s in (0, 1))
        assert s0.counts == s1.counts == {"dense": 1, "update": 2, "dispatch": 3} and s0.skipped == s1.skipped == 3
        assert all(a.data_ptr() != c.data_ptr() for a, c in zip(s0.tensors(), s1.tensors()))
    st.reset()
    assert all(not b.streams and b.region_calls == 0 for b in st.blocks) and st.memory_bytes() == 0
    dirty = _cfg_loop(compiled, make_inputs, lat, ts, corrupt=(st, 1))  # step 1 = first update
    for i, ((c0, u0), (c1, u1)) in enumerate(zip(clean, dirty)):
        assert torch.equal(c0, c1), f"cond output changed at step {i}"
        # dispatch steps 2, 3 read the corrupted uncond factors; step 5 too, through the order-1 difference
        # taken against them at the update of step 4 (whose own output is exact)
        assert torch.equal(u0, u1) == (i not in (2, 3, 5)), i
    st.reset()
    again = _cfg_loop(compiled, make_inputs, lat, ts)  # reset: same as the first run, bit for bit
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(clean, again))


def test_memory_counted_and_capped(flux):
    model, make_inputs, lat = flux
    kw = dict(policy="dense", warmup=2, interval=3, taylor_order=1, block_cache=FixedBlocks(1.0))
    free = _state(**kw)
    denoise(_compile(model, free), make_inputs, lat, 5)
    per_block = []
    for b in free.blocks:
        (bs,) = b.streams.values()
        want = sum(2 * shape.numel() * 4 for shape in _shapes(b))  # f_0, f_1 in fp32
        assert bs.memory_bytes() == want > 0
        per_block.append(want)
    assert free.memory_bytes() == sum(per_block)  # policy="dense": the sites hold no caches
    assert [r["cache_bytes"] for r in free.report().blocks] == per_block
    torch._dynamo.reset()
    cap = per_block[0] + 16
    st = _state(**kw, max_cache_mb=cap / 2**20)  # room for the first block only
    out = denoise(_compile(model, st), make_inputs, lat, 5)
    assert torch.isfinite(out).all() and st.memory_bytes() <= st.config.max_cache_bytes
    (b0, b1, b2) = st.blocks
    assert b0.skipped_calls == 2 and b1.skipped_calls == b2.skipped_calls == 0  # steps 2, 3 dispatch
    assert [next(iter(b.streams.values())).capped for b in st.blocks] == [False, True, True]
    assert b1.region_calls == 5


def _shapes(rec):
    (key,) = rec.streams
    return [torch.Size(s) for s in key[1]]  # stream key: (CFG stream, input shapes of the residual streams)


# ---- the content policies -------------------------------------------------------------------------


@pytest.mark.parametrize("reuse, cached", [(0.75, True), (0.25, False)])
def test_sq_policy_follows_the_sites_computed_fraction(flux, reuse, cached):
    """S_q: tiny FLUX has 1 text + 4 vision query blocks; reusing 3 of 4 vision blocks computes 2/5 = 0.4."""
    model, make_inputs, lat = flux
    st = _state(policy=Fixed(reuse=reuse, skip=0.0), warmup=2, interval=3, block_cache=ComputedShare(0.45))
    denoise(_compile(model, st), make_inputs, lat, 6)  # dense 0, update 1, dispatch 2 3, update 4, dispatch 5
    for b in st.blocks:
        (bs,) = b.streams.values()
        assert bs.computed == pytest.approx(0.4 if reuse == 0.75 else 0.8)
        assert bs.cached is cached
        assert b.skipped_calls == (3 if cached else 0)
    assert st.block_host_reads == 2  # one read per update call, none on dispatch steps


def test_sq_policy_never_caches_without_sparse_sites(flux):
    model, make_inputs, lat = flux
    st = _state(policy="dense", block_cache=ComputedShare(1.0))
    denoise(_compile(model, st), make_inputs, lat, 5)
    assert all(b.skipped_calls == 0 for b in st.blocks)


@pytest.mark.parametrize("threshold, cached", [(1e9, True), (0.0, False)])
def test_change_policy(flux, threshold, cached):
    model, make_inputs, lat = flux
    st = _state(policy="dense", warmup=2, interval=3, taylor_order=0, block_cache=ResidualChange(threshold))
    denoise(_compile(model, st), make_inputs, lat, 6)
    for b in st.blocks:
        (bs,) = b.streams.values()
        assert bs.change is not None and 0 < bs.change < 10  # relative change per step, measured
        assert bs.cached is cached and b.skipped_calls == (3 if cached else 0)
    assert st.block_host_reads == 2


def test_a_block_cached_by_an_adaptive_rule_keeps_what_its_sites_difference_against(flux):
    """Blocks the change rule caches drop their sites' cache-bias terms (only dispatch steps read them) and
    keep the GEMM-O input's factors, so a block that runs again forecasts at full order: at the second
    update its sites difference against the first (delta 3), not against nothing."""
    model, make_inputs, lat = flux
    st = _state(policy=Fixed(reuse=0.5, skip=0.0), warmup=2, interval=3, block_cache=ResidualChange(1e9))
    denoise(_compile(model, st), make_inputs, lat, 6)  # dense 0, update 1, dispatch 2 3, update 4, dispatch 5
    sites = [sid for b in st.blocks if b.skipped_calls for sid in b.site_ids]
    assert len(sites) == 3
    for sid in sites:
        (ss,) = st.sites[sid].streams.values()
        assert ss.bias_terms == {} and ss.a_factors and set(ss.a_step.values()) == {4}


def test_block_cache_none_keeps_the_graph_whole(flux):
    model, make_inputs, lat = flux
    st = _state()
    denoise(_compile(model, st), make_inputs, lat, 2)
    assert st.blocks == [] and "regions" not in st.compiles[0]


@pytest.mark.slow
def test_inductor_regions_match_fx(flux):
    model, make_inputs, lat = flux
    kw = dict(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=3, block_cache=FixedBlocks(0.5))
    ref = denoise(_compile(model, _state(**kw)), make_inputs, lat, 5)
    torch._dynamo.reset()
    st = _state(**kw, use_inductor=True)
    out = denoise(_no_recompile(_compile(model, st)), make_inputs, lat, 5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert st.compiles[0]["regions_compiled"] == 5 and sum(b.skipped_calls for b in st.blocks) > 0


def test_configure_refuses_block_caching_on_an_unsplit_graph(flux):
    """Block caching is a compile-time split: switching it on for a graph compiled whole must fail loudly
    (it would otherwise do nothing), while a split graph may switch it off and on again."""
    model, make_inputs, lat = flux
    st = _state(policy="dense")
    denoise(_compile(model, st), make_inputs, lat, 2)
    with pytest.raises(ValueError, match="block"):
        st.configure(block_cache="fixed")
    torch._dynamo.reset()
    st2 = _state(policy="dense", block_cache=FixedBlocks(0.5))
    compiled = _compile(model, st2)
    denoise(compiled, make_inputs, lat, 2)
    st2.configure(block_cache=None)
    st2.configure(block_cache="fixed")
    assert st2.config.block_cache == FixedBlocks(0.5)


def test_sites_of_cached_blocks_build_nothing(flux, monkeypatch):
    """The fixed rule knows before a block runs that it will be cached, so the block's sites run dense on
    full steps and build no symbols or caches (they never run on the dispatch steps in between), while sites
    of blocks that keep running hold theirs. Same latents as building and then dropping them."""
    from omni_compile import runtime

    model, make_inputs, lat = flux
    cfg = dict(policy=Fixed(reuse=0.5, skip=0.5), block_cache=FixedBlocks(0.5))
    st = _state(**cfg)
    x = denoise(_compile(model, st), make_inputs, lat, 5)  # warm-up 2, interval 3: updates at 1 and 4
    cached = [b for b in st.blocks if b.skipped_calls > 0]
    running = [b for b in st.blocks if b.cacheable and b.skipped_calls == 0]
    assert cached and running

    def held(rec):
        return [t for sid in rec.site_ids for ss in st.sites[sid].streams.values()
                for t in (list(ss.bias_terms.values()) + list(ss.a_factors.values()) + [ss.out_factors]) if t]

    assert all(not st.sites[sid].streams for b in cached for sid in b.site_ids)
    assert all(h.action == "dense" for h in st.history if any(h.site_id in b.site_ids for b in cached))
    assert any(held(b) for b in running)
    assert not st.passive_sites  # only set while a block runs

    # the same loop with the sites of cached blocks doing their update work (and the runner dropping it)
    original = runtime.stream_for

    def never_passive(state, site, batch, seq_q):
        state.passive_sites = frozenset()
        return original(state, site, batch, seq_q)

    monkeypatch.setattr(runtime, "stream_for", never_passive)
    torch._dynamo.reset()
    st2 = _state(**cfg)
    x2 = denoise(_compile(model, st2), make_inputs, lat, 5)
    assert any(st2.sites[sid].streams for b in st2.blocks if b.skipped_calls > 0 for sid in b.site_ids)
    assert torch.equal(x, x2)


def test_report_counts_the_attention_of_cached_blocks_as_work_not_done():
    """Every block cached on every dispatch step: those steps record no attention call, yet the report lists
    every step of the loop, the dispatch steps at density 0 with all their work in cached blocks, and the
    loop's density is the share of steps that ran (dense and update steps)."""
    model, make_inputs, lat = tiny_flux_case(single_layers=2)
    st = _state(policy="flashomni", block_cache=ResidualChange(10.0), steps=12)
    denoise(_compile(model, st), make_inputs, lat, 12)
    rep = st.report()
    assert [s["step"] for s in rep.steps] == list(range(12))
    full = [s for s in rep.steps if s["action"] != "dispatch"]
    cached = [s for s in rep.steps if s["action"] == "dispatch"]
    assert len(cached) == 7 and all(s["density"] == 0.0 and s["cached"] == 1.0 and s["sites"] == 0 for s in cached)
    assert all(s["density"] == 1.0 and s["cached"] == 0.0 for s in full)
    assert rep.density() == pytest.approx(len(full) / 12)
