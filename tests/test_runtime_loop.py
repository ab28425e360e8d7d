"""The update–dispatch runtime over real denoising loops (tiny FLUX, FlowMatchEulerDiscreteScheduler, CPU).

Counters, not timings: which steps updated, which ops ran with the stored symbols, what the caches hold.
Almost all tests skip Inductor (``use_inductor=False``); ``test_inductor_sparse_loop`` runs one.
"""

from __future__ import annotations

import pytest
import torch

from omni_compile.policies import Fixed, FlashOmni
from omni_compile.schedule import step_action

from _runtime_helpers import compile_with as _compile, denoise, make_state as _state, tiny_flux_case


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_case(single_layers=1)




def test_interval_one_and_dense_policy_equal_the_dense_loop(flux):
    model, make_inputs, lat = flux
    with torch.no_grad():
        eager = denoise(model, make_inputs, lat, 6)
    dense = denoise(_compile(model, _state(policy="dense")), make_inputs, lat, 6)
    torch.testing.assert_close(dense, eager, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    st = _state(policy=FlashOmni(tau_q=0.9, tau_kv=0.5), interval=1)
    every_update = denoise(_compile(model, st), make_inputs, lat, 6)
    assert torch.equal(every_update, dense)  # bit for bit: update steps compute the exact output
    rep = st.report()
    assert [s["action"] for s in rep.steps] == ["dense"] + ["update"] * 5
    assert all(s.streams for s in st.sites)  # the policy did run (symbols were built)
    torch._dynamo.reset()
    sparse = denoise(_compile(model, _state(policy=FlashOmni(tau_q=0.9, tau_kv=0.5), interval=3)), make_inputs, lat, 6)
    assert not torch.equal(sparse, dense)  # a real dispatch step changes the result


class _FreshFixed(Fixed):
    """``fixed``'s tiles without its memoised symbols: each update builds a new object, so the test can
    tell which update's symbols a dispatch step reads."""

    def __call__(self, inp, config):
        return super().__call__(inp, config)


def test_update_steps_at_configured_steps_and_dispatch_uses_stored_symbols(flux):
    model, make_inputs, lat = flux
    st = _state(policy=_FreshFixed(reuse=0.5, skip=0.5), warmup=3, interval=3)
    compiled = _compile(model, st)
    calls = []

    def forward(**kw):
        calls.append(1)
        if len(calls) == 1:
            return compiled(**kw)
        with torch.compiler.set_stance("fail_on_recompile"):  # one graph serves every step
            return compiled(**kw)

    steps = 10
    denoise(lambda **kw: forward(**kw), make_inputs, lat, steps)
    want = [step_action(i, 3, 3) for i in range(steps)]
    assert want == ["dense", "dense", "update", "dispatch", "dispatch", "update", "dispatch", "dispatch", "update", "dispatch"]
    rep = st.report()
    assert [s["action"] for s in rep.steps] == want
    assert len(st.compiles) == 1
    n_dispatch = want.count("dispatch")
    for site in st.sites:
        assert site.rewritten and site.gemm_q and site.gemm_o
        (ss,) = site.streams.values()
        assert ss.counts == {"dense": 2, "update": 3, "dispatch": n_dispatch}
        assert ss.sparse_calls == {
            "attention": n_dispatch,
            "linear_q": n_dispatch * len(site.q_projections),
            "linear_o": n_dispatch * len(site.out_projections),
        }
        recs = [r for r in st.history if r.site_id == site.site_id]
        disp = {r.step: r.symbols for r in recs if r.action == "dispatch"}
        # steps 3, 4 read the symbols built at step 2; 6, 7 those of step 5; 9 the latest (the stream's now)
        assert disp[3] is disp[4] and disp[6] is disp[7] and disp[9] is ss.symbols
        assert disp[3] is not disp[6]
        for sym in disp.values():
            assert sym.reuse_fraction() > 0.2 and sym.density() < 0.7
        dense_like = [r.symbols for r in recs if r.action != "dispatch"]
        assert all(s.density() == 1.0 for s in dense_like)


def _cfg_pass(compiled, make_inputs, xs, timesteps, corrupt_after=None, state=None):
    """Two calls per step (cond, uncond) on given latents; optionally corrupt stream 1's caches after the
    uncond call of step ``corrupt_after``."""
    outs = []
    with torch.no_grad():
        for i, (x, t) in enumerate(zip(xs, timesteps)):
            vc = compiled(**make_inputs(x, t, (0,)))[0]
            vu = compiled(**make_inputs(x, t, (1,)))[0]
            outs.append((vc.clone(), vu.clone()))
            if i == corrupt_after:
                n = 0
                for site in state.sites:
                    for key, ss in site.streams.items():
                        if key[0] == 1:
                            for terms in ss.bias_terms.values():
                                for t_ in terms or []:
                                    t_.add_(10.0)
                                    n += 1
                assert n > 0
    return outs


def test_two_call_cfg_streams_are_isolated(flux):
    model, make_inputs, lat = flux
    st = _state(policy=Fixed(reuse=0.5, skip=0.25), warmup=2, interval=3, taylor_order=1)
    compiled = _compile(model, st)
    ts = [torch.tensor([t]) for t in (1.0, 0.875, 0.75, 0.625, 0.5, 0.375)]
    g = torch.Generator().manual_seed(3)
    xs = [lat + 0.1 * i * torch.randn(lat.shape, generator=g) for i in range(len(ts))]
    clean = _cfg_pass(compiled, make_inputs, xs, ts)
    for site in st.sites:
        assert sorted(k[0] for k in site.streams) == [0, 1]  # cond and uncond: two streams
        s0 = [v for k, v in site.streams.items() if k[0] == 0][0]
        s1 = [v for k, v in site.streams.items() if k[0] == 1][0]
        assert s0.counts == s1.counts == {"dense": 1, "update": 2, "dispatch": 3}
        # the caches are each stream's own; the symbol bits (the first two tensors) may be one object, as
        # fixed hands out one Symbols per site and nothing writes symbols
        caches0, caches1 = s0.tensors()[2:], s1.tensors()[2:]
        assert caches0 and len(caches0) == len(caches1)
        for a, b in zip(caches0, caches1):
            assert a.data_ptr() != b.data_ptr()
    st.reset()
    dirty = _cfg_pass(compiled, make_inputs, xs, ts, corrupt_after=1, state=st)  # step 1 = first update
    for i, ((c0, u0), (c1, u1)) in enumerate(zip(clean, dirty)):
        assert torch.equal(c0, c1), f"cond output changed at step {i}"
        if i in (2, 3):  # dispatch steps that read the corrupted uncond caches
            assert not torch.allclose(u0, u1)
        else:
            assert torch.equal(u0, u1)


def test_batched_cfg_is_one_stream_with_per_item_symbols(flux):
    model, make_inputs, lat = flux
    st = _state(policy=FlashOmni(tau_q=0.7, tau_kv=0.3), warmup=2, interval=3)
    out = denoise(_compile(model, st), make_inputs, lat, 6, cfg="batched")
    assert torch.isfinite(out).all()
    for site in st.sites:
        (key,) = site.streams
        assert key[0] == 0 and key[1] == 2  # one stream, batch of 2 (cond, uncond)
        reuse, _ = site.streams[key].symbols.to_dense()
        assert reuse.shape[0] == 2
    assert st.report().density() < 1.0


def test_reset_and_new_generation_reproduce_bit_for_bit(flux):
    model, make_inputs, lat = flux
    st = _state(policy=FlashOmni(tau_q=0.7, tau_kv=0.3), warmup=2, interval=3, taylor_order=2)
    compiled = _compile(model, st)
    first = denoise(compiled, make_inputs, lat, 7)
    gen0 = st.report()
    second = denoise(compiled, make_inputs, lat, 7)  # timestep jumps back up: a new generation
    assert st.clock.generation == 1
    st.reset()
    third = denoise(compiled, make_inputs, lat, 7)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert [s["action"] for s in st.report().steps] == [s["action"] for s in gen0.steps]
    assert gen0.density() < 1.0


def test_counted_clock_loop_equals_the_timestep_clock_loop(flux):
    # OmniConfig.steps places calls by counting them (no host read of the timestep): the same positions,
    # so the same output bit for bit, on two generations without reset() and with two-call CFG
    model, make_inputs, lat = flux
    kw = dict(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=3)
    by_time = denoise(_compile(model, _state(**kw)), make_inputs, lat, 7, cfg="two-call")
    torch._dynamo.reset()
    st = _state(steps=7, streams=2, **kw)
    compiled = _compile(model, st)
    first = denoise(compiled, make_inputs, lat, 7, cfg="two-call")
    with torch.compiler.set_stance("fail_on_recompile"):
        second = denoise(compiled, make_inputs, lat, 7, cfg="two-call")
    assert torch.equal(first, by_time) and torch.equal(second, by_time)
    # the timesteps are checked on dense and update steps only (dispatch steps read nothing): what is still
    # queued is the calls since the last update
    assert st.clock.generation == 1 and st.clock.pending
    assert all(step_action(p.step, 2, 3) == "dispatch" and p.step > 4 for p, _, _ in st.clock.pending)
    assert [s["action"] for s in st.report().steps if s["stream"] == 0 and s["generation"] == 1] == [
        step_action(i, 2, 3) for i in range(7)]
    # a loop longer than steps: the counted clock would start a new generation mid-loop; it raises instead
    st.reset()
    with pytest.raises(RuntimeError, match="more steps than OmniConfig.steps"):
        denoise(compiled, make_inputs, lat, 8, cfg="two-call")


def _expected_bytes(st):
    D = st.config.taylor_order
    total = 0
    for site in st.sites:
        for (stream, B, S), ss in site.streams.items():
            sym = ss.symbols
            total += sym.reuse_bits.numel() + sym.skip_bits.numel()
            H, hd = site.heads, site.head_dim
            if site.gemm_o:
                for (ro, co), (rows, cout) in site.out_features.items():
                    text_only = all(m == "text" for m, a, b in site.segments if a < ro + rows and b > ro)
                    total += D * B * rows * H * hd * 4  # GEMM-O input factors f_0..f_{D-1}, fp32
                    if not text_only:
                        total += (D + 1) * B * rows * cout * 4  # one cache-bias term per order
            else:
                total += (D + 1) * B * H * S * hd * 4 + B * H * S  # attention-output factors + row mask
    return total


@pytest.mark.parametrize("gemm_o, order", [(True, 2), (False, 1)])
def test_memory_reported_equals_what_the_caches_hold(flux, gemm_o, order):
    model, make_inputs, lat = flux
    st = _state(policy="fixed", warmup=2, interval=3, taylor_order=order, gemm_o=gemm_o)
    denoise(_compile(model, st), make_inputs, lat, 5)  # ends after the 2nd update: every order present
    assert all(s.gemm_o == gemm_o for s in st.sites)
    want = _expected_bytes(st)
    assert st.memory_bytes() == want > 0
    rep = st.report()
    assert rep.memory_bytes == want == sum(s["cache_bytes"] for s in rep.sites)


def test_memory_cap_bounds_the_caches(flux):
    model, make_inputs, lat = flux
    free = _state(policy="fixed", warmup=2, interval=3, taylor_order=1)
    denoise(_compile(model, free), make_inputs, lat, 5)
    per_site = [sum(ss.memory_bytes() for ss in s.streams.values()) for s in free.sites]
    torch._dynamo.reset()
    cap_mb = (per_site[0] + 64) / 2**20  # room for the first site only
    st = _state(policy="fixed", warmup=2, interval=3, taylor_order=1, max_cache_mb=cap_mb)
    out = denoise(_compile(model, st), make_inputs, lat, 5)
    assert torch.isfinite(out).all()
    assert st.memory_bytes() <= st.config.max_cache_bytes
    capped = [ss.capped for s in st.sites for ss in s.streams.values()]
    assert capped == [False, True]
    (ss,) = st.sites[1].streams.values()
    reuse, skip = ss.symbols.to_dense()
    assert not reuse.any() and skip.any()  # no reused tiles without a cache; skipping needs none


def test_attention_output_forecast_without_gemm_o(flux, monkeypatch):
    """Sites without GEMM-O fill reused tiles with the forecast attention output (order 1, by hand)."""
    from omni_compile import runtime

    model, make_inputs, lat = flux
    st = _state(policy=Fixed(reuse=0.5, skip=0.0), warmup=2, interval=3, taylor_order=1, gemm_o=False, gemm_q=False)
    seen = {}
    real = runtime.run_attention

    def spy(state, site, q, k, v, mask, scale):
        out = real(state, site, q, k, v, mask, scale)
        seen[(site.site_id, state.clock.position.step)] = out.clone()
        return out

    monkeypatch.setattr(runtime, "run_attention", spy)
    denoise(_compile(model, st), make_inputs, lat, 7)
    for site in st.sites:
        (ss,) = site.streams.values()
        rows = ss.reuse_rows  # symbols of the update at step 4
        assert rows.any()
        # order 1 at step 6: f0 = O(4), f1 = (O(4) - O(1)) / 3, forecast = f0 + 2 * f1
        o1, o4, o6 = (seen[(site.site_id, s)] for s in (1, 4, 6))
        want = o4 + 2 * (o4 - o1) / 3
        got = o6
        torch.testing.assert_close(torch.where(rows, got, 0), torch.where(rows, want, 0), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(torch.where(rows, got, 0), torch.where(rows, o4, 0))  # not plain reuse


def test_no_timestep_input_runs_dense_with_a_reason(flux):
    model, make_inputs, lat = flux
    st = _state(warmup=1, interval=2)

    def call(**kw):
        return compiled_block(**kw)

    # a model whose graph takes no timestep: compile one transformer block on its own
    block = model.single_transformer_blocks[0]
    compiled_block = torch.compile(block, backend="flashomni", options={"state": st})
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 64, 32, generator=g), encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
              temb=torch.randn(1, 32, generator=g))
    with torch.no_grad():
        ref = block(**kw)
        out = [call(**kw) for _ in range(3)]
    for o in out:
        torch.testing.assert_close(o[0], ref[0], rtol=1e-4, atol=1e-4)
    (site,) = st.sites
    assert "no timestep" in site.runtime_reason and not site.streams


@pytest.mark.slow
def test_inductor_sparse_loop(flux):
    """The clock and the site ops keep their order under Inductor; the loop equals the unfused one."""
    model, make_inputs, lat = flux
    ref = denoise(_compile(model, _state(policy=FlashOmni(tau_q=0.7, tau_kv=0.3), warmup=2, interval=3)), make_inputs, lat, 5)
    torch._dynamo.reset()
    st = _state(policy=FlashOmni(tau_q=0.7, tau_kv=0.3), warmup=2, interval=3, use_inductor=True)
    compiled = _compile(model, st)
    n = []

    def forward(**kw):
        n.append(1)
        if len(n) == 1:
            return compiled(**kw)
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled(**kw)

    out = denoise(lambda **kw: forward(**kw), make_inputs, lat, 5)
    assert [s["action"] for s in st.report().steps] == ["dense", "update", "dispatch", "dispatch", "update"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "hunyuan", "wan", "cogvideox", "pixart", "dit", "ltx"])
def test_sparse_runtime_on_every_family(family):
    """Each family runs the update–dispatch loop through one graph: every rewritten site dispatches with
    sparse symbols, key-padding-masked ones (HunyuanVideo) on the keys the mask keeps."""
    import _tiny_models as T

    model, make_inputs = T.build(family, batch=1)
    st = _state(policy=Fixed(reuse=0.5, skip=0.5), warmup=1, interval=2)
    compiled = _compile(model, st)
    base = make_inputs(0)
    outs = []
    with torch.no_grad():
        for i, t in enumerate((1.0, 0.75, 0.5, 0.25)):
            kw = dict(base, timestep=torch.full_like(base["timestep"], t * 1000))
            if i == 0:
                outs.append(compiled(**kw)[0])
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    outs.append(compiled(**kw)[0])
    assert all(torch.isfinite(o).all() for o in outs)
    sparse = 0
    for s in st.sites:
        if not s.rewritten:
            continue
        (ss,) = s.streams.values()
        assert ss.counts == {"dense": 0, "update": 2, "dispatch": 2}
        assert ss.sparse_calls["attention"] == 2
        sparse += 1
        assert s.fallbacks == 0 and s.runtime_reason is None
    assert sparse >= 1


@pytest.mark.parametrize("batch", [1, 2])
def test_key_padding_mask_sites_dispatch_on_kept_keys(batch):
    """HunyuanVideo passes a text key-padding mask to its joint sites. With one padding pattern for all
    items the runtime drops the masked keys and dispatches sparse on the rest (no reuse, no skip: the
    result must equal the eager masked model); patterns that differ per item fall back to masked dense
    attention with a reason, never to a wrong result."""
    import _tiny_models as T

    model, make_inputs = T.build("hunyuan", batch=batch)
    base = make_inputs(0)
    if batch == 2:
        assert not torch.equal(base["encoder_attention_mask"][0], base["encoder_attention_mask"][1])
    st = _state(policy=Fixed(reuse=0.0, skip=0.0), warmup=1, interval=2)
    compiled = _compile(model, st)
    with torch.no_grad():
        for i, t in enumerate((1.0, 0.75, 0.5, 0.25)):
            kw = dict(base, timestep=torch.full_like(base["timestep"], t * 1000))
            want = model(**kw)[0]
            got = compiled(**kw)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    masked = [s for s in st.sites if s.rewritten and s.mask is not None]
    assert masked
    for s in masked:
        (ss,) = s.streams.values()
        if batch == 1:
            assert ss.sparse_calls["attention"] == 2 and s.runtime_reason is None
            assert ss.symbols.seq_kv < s.seq_kv  # the padded keys were dropped
        else:
            assert ss.sparse_calls["attention"] == 0 and "mask" in s.runtime_reason


def test_kept_keys_reads_every_form_of_key_padding_mask():
    """The mask analysis behind masked sites, on each form a model may pass: boolean and additive 0/-inf
    padding give the same kept keys and kv segments; an additive bias with other values, patterns that
    differ per batch item, and a mask that keeps no key are inexpressible (None: masked dense attention)."""
    from omni_compile.masks import kept_keys

    Skv, B, H = 11, 2, 3
    kv_segments = [("text", 0, 4), ("vision", 4, 11)]
    keep = torch.ones(Skv, dtype=torch.bool)
    keep[2:4] = False  # two padded text keys
    keep[9] = False  # and a vision key
    as_bool = keep.expand(B, 1, 1, Skv)
    additive = torch.zeros(B, 1, 1, Skv).masked_fill(~keep, float("-inf"))
    for mask in (as_bool, additive, additive.clamp_min(-1e9)):
        idx, segs = kept_keys(kv_segments, mask, B, H, Skv)
        assert idx.tolist() == keep.nonzero().squeeze(1).tolist()
        assert segs == [("text", 0, 2), ("vision", 2, 8)]
    assert kept_keys(kv_segments, torch.ones(B, 1, 1, Skv, dtype=torch.bool), B, H, Skv) == "all"
    assert kept_keys(kv_segments, torch.zeros(1, Skv, dtype=torch.bool), B, H, Skv) is None
    assert kept_keys(kv_segments, additive + 0.5 * keep, B, H, Skv) is None  # a real bias on the kept keys
    per_item = as_bool.clone()
    per_item[1, 0, 0, 0] = False
    assert kept_keys(kv_segments, per_item, B, H, Skv) is None


def test_update_decodes_the_schedules_the_dispatch_steps_used(flux):
    """From the second update on, the new symbols arrive with the schedules the previous dispatch steps
    decoded (attention's kv schedule, GEMM-Q/GEMM-O head schedules), so dispatch steps find them cached."""
    model, make_inputs, lat = flux
    st = _state(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=3)
    denoise(_compile(model, st), make_inputs, lat, 5)  # dense, update, dispatch, dispatch, update
    for s in st.sites:
        (ss,) = s.streams.values()
        assert ss.action == "update"
        assert ss.symbols._kv_schedule is not None
        decoded = {(k[0], k[1]) for k in ss.symbols._head_schedules if not k[3]}  # (rows, row_offset)
        assert {(rows, off) for _, off, rows, _ in s.out_projections} <= decoded


def test_history_keeps_the_current_and_previous_generation_only(flux):
    model, make_inputs, lat = flux
    st = _state(policy=Fixed(reuse=0.5, skip=0.5))
    compiled = _compile(model, st)
    for _ in range(3):
        denoise(compiled, make_inputs, lat, 4)
    assert st.clock.generation == 2
    assert {r.generation for r in st.history} == {1, 2}
    assert len(st.history) == 2 * 4 * sum(s.rewritten for s in st.sites)


def test_unwritten_reused_q_tiles_never_reach_the_output(flux, monkeypatch):
    """Dispatch steps run GEMM-Q with ``fill_reused=False``: the persistent kernel leaves the reused tiles
    unwritten. With those tiles NaN, the loop's output (Triton kernels, in-kernel descriptors) is finite and
    bit-equal to the run where the memory held whatever it held: nothing downstream reads them."""
    import omni_compile.ops.linear_q as LQ
    from _golden import impl_context

    model, make_inputs, lat = flux
    unfilled = []
    real = LQ._output

    def poisoned(B, S, N, like, fill_reused):
        unfilled.append(not fill_reused)
        out = real(B, S, N, like, fill_reused)
        return out if fill_reused else out.fill_(float("nan"))

    def loop():
        torch._dynamo.reset()
        st = _state(policy=Fixed(reuse=0.5, skip=0.5), interval=3)
        with impl_context("triton-device-tma"):
            return denoise(_compile(model, st), make_inputs, lat, 6)

    plain = loop()
    monkeypatch.setattr(LQ, "_output", poisoned)
    got = loop()
    assert any(unfilled), "no dispatch-step GEMM-Q left its reused tiles unwritten"
    assert torch.isfinite(got).all() and torch.equal(got, plain)


def test_the_loop_on_the_triton_path_equals_the_reference_path(flux, monkeypatch):
    """The whole update-dispatch loop through the ops' Triton kernels (the CPU interpreter, as CUDA runs
    them: the attention kernel, GEMM-Q and GEMM-O over the schedules the kernels decode from the bits,
    Taylor refresh and forecast) against the PyTorch references: the same symbols (``fixed``), the same
    latents up to fp32 rounding."""
    import collections

    import omni_compile.ops.attention as att
    import omni_compile.ops.linear_o as lo
    import omni_compile.ops.linear_q as lq
    import omni_compile.ops.symbols as sy
    from omni_compile.ops import kernel_backend

    launched = collections.Counter()
    for mod, name in ((att, "_launch_attention"), (sy, "slice_head_schedule"), (sy, "slice_tile_schedule"),
                      (lq, "_launch_linear_q"), (lq, "_launch_linear_q_persistent"), (lo, "_launch_linear_o")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **k: launched.update([_n]) or _fn(*a, **k))
    model, make_inputs, lat = flux
    kw = dict(policy=Fixed(reuse=0.5, skip=0.5), taylor_order=1)
    out, states = {}, {}
    for backend in ("reference", "triton"):
        torch._dynamo.reset()
        states[backend] = _state(**kw)
        with kernel_backend(backend):
            out[backend] = denoise(_compile(model, states[backend]), make_inputs, lat, 7)
    ref, got = out["reference"], out["triton"]
    # the kernels ran: attention, both projections, the head lists GEMM-O reads decoded from the bits
    assert all(launched[n] for n in ("_launch_attention", "_launch_linear_o", "slice_head_schedule")), launched
    assert launched["_launch_linear_q"] + launched["_launch_linear_q_persistent"], launched
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    steps = {b: [(r["step"], r["action"], r["density"]) for r in states[b].report().steps] for b in states}
    assert steps["triton"] == steps["reference"] and any(a == "dispatch" for _, a, _ in steps["triton"])
