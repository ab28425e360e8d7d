"""Property tests of the runtime's pieces: the policies, the Taylor forecast, the schedule and clock, the
config's validation. Pure tensor code, no model."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from omni_compile import ResidualChange, OmniConfig
from omni_compile import taylor
from omni_compile.ops import Symbols, cache_bias_for
from omni_compile.policies import POLICIES, Fixed, FlashOmni, PolicyInput, fixed, flashomni
from omni_compile.schedule import StepClock, step_action

EPS = 1e-5


def _layout(n_text, n_vis, text_first):
    text = [True] * n_text + [False] * n_vis if text_first else [False] * n_vis + [True] * n_text
    return torch.tensor(text)


def _scores(seed, B, H, nq, nk, spread):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, H, nq, nk, generator=g) * spread, dim=-1)


def _inp(P, q_text, kv_text, kind, square=None):
    B, H, nq, nk = P.shape
    return PolicyInput(scores=P, scores_square=P if square is None else square, kind=kind, q_text=q_text,
                       kv_text=kv_text, batch=B, heads=H, seq_q=nq * 16, seq_kv=nk * 16, block_q=16, block_kv=16,
                       text_q_blocks=int(q_text.sum()))


def _tail(score, tau):
    """Hand rule (float64): ascending stable order; prefix whose cumulative sum <= tau * total. Returns
    (selected index set, smallest distance of any cumulative sum to the threshold)."""
    score = np.asarray(score, dtype=np.float64)
    total = score.sum()
    order = np.argsort(score, kind="stable")
    cum = np.cumsum(score[order])
    thr = tau * total
    sel = {int(i) for i, c in zip(order, cum) if c <= thr} if tau > 0 else set()
    return sel, float(np.min(np.abs(cum - thr))) if len(cum) else 1.0


def _check_common(P, q_text, kv_text, reuse, skip, tau_kv):
    assert not reuse[..., q_text].any(), "a text query block was reused"
    assert not skip[:, :, q_text].any(), "a text query row skipped key blocks"
    assert not skip[..., kv_text].any(), "a text key block was skipped"
    assert not (skip & reuse.unsqueeze(-1)).any(), "a reused tile carries skip bits"
    kept = torch.where(skip, 0.0, P.double()).sum(-1)  # [B, H, nQ]
    rows = ~reuse & ~q_text
    assert (kept[rows] >= 1 - tau_kv - EPS).all(), "kept key blocks carry less than 1 - tau_kv"
    assert (~skip).any(-1).all(), "a row lost every key block"


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), H=st.integers(1, 3), n_text=st.integers(1, 3),
       n_vis=st.integers(1, 7), text_first=st.booleans(), spread=st.floats(0.5, 6.0),
       tau_q=st.floats(0.0, 1.0), tau_kv=st.floats(0.0, 0.95))
def test_flashomni_joint(seed, B, H, n_text, n_vis, text_first, spread, tau_q, tau_kv):
    q_text = _layout(n_text, n_vis, text_first)
    n = q_text.numel()
    P = _scores(seed, B, H, n, n, spread)
    reuse, skip = flashomni(_inp(P, q_text, q_text, "joint"), OmniConfig(), tau_q, tau_kv)
    _check_common(P, q_text, q_text, reuse, skip, tau_kv)
    vis = (~q_text).nonzero().squeeze(1).tolist()
    txt = q_text.nonzero().squeeze(1).tolist()
    Pn = P.double().numpy()
    for b in range(B):
        for h in range(H):
            C = [Pn[b, h, txt, i].sum() for i in vis]
            G = [sum(Pn[b, h, i, j] / Pn[b, h, vis, j].sum() for j in txt) for i in vis]
            sc, dc = _tail(C, tau_q)
            sg, dg = _tail(G, tau_q)
            got = {vis.index(i) for i in reuse[b, h].nonzero().squeeze(1).tolist()}
            # reused blocks respect both cumulative budgets
            assert sum(C[i] for i in got) <= tau_q * sum(C) + EPS
            assert sum(G[i] for i in got) <= tau_q * sum(G) + EPS
            if min(dc, dg) > 1e-4:  # away from float ties at the threshold: the exact set
                assert got == sc & sg


@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), spread=st.floats(0.5, 6.0),
       tau_q=st.floats(0.0, 1.0), tau_kv=st.floats(0.0, 0.95))
def test_flashomni_vision_only_self_attention(seed, n, spread, tau_q, tau_kv):
    q_text = torch.zeros(n, dtype=torch.bool)
    P = _scores(seed, 1, 2, n, n, spread)
    reuse, skip = flashomni(_inp(P, q_text, q_text, "self"), OmniConfig(), tau_q, tau_kv)
    _check_common(P, q_text, q_text, reuse, skip, tau_kv)
    for h in range(2):
        col = P[0, h].double().sum(0).numpy()  # how much each block feeds all queries
        sel, d = _tail(col, tau_q)
        got = set(reuse[0, h].nonzero().squeeze(1).tolist())
        assert sum(col[i] for i in got) <= tau_q * col.sum() + EPS
        if d > 1e-4:
            assert got == sel


@given(seed=st.integers(0, 2**16), nq=st.integers(1, 8), nk=st.integers(1, 3), tau_q=st.floats(0.0, 1.0))
def test_flashomni_cross_attention_uses_guidance(seed, nq, nk, tau_q):
    q_text = torch.zeros(nq, dtype=torch.bool)
    kv_text = torch.ones(nk, dtype=torch.bool)
    P = _scores(seed, 1, 1, nq, nk, 3.0)
    reuse, skip = flashomni(_inp(P, q_text, kv_text, "cross", square=None), OmniConfig(), tau_q, 0.5)
    assert not skip.any()  # every key is text: never skipped
    Pn = P[0, 0].double().numpy()
    G = (Pn / Pn.sum(0, keepdims=True)).sum(1)
    sel, d = _tail(G, tau_q)
    got = set(reuse[0, 0].nonzero().squeeze(1).tolist())
    assert sum(G[i] for i in got) <= tau_q * G.sum() + EPS
    if d > 1e-4:
        assert got == sel


def test_flashomni_thresholds_at_the_ends():
    q_text = _layout(1, 6, True)
    P = _scores(0, 1, 2, 7, 7, 3.0)
    r0, s0 = flashomni(_inp(P, q_text, q_text, "joint"), OmniConfig(), 0.0, 0.0)
    assert not r0.any() and not s0.any()
    r1, _ = flashomni(_inp(P, q_text, q_text, "joint"), OmniConfig(), 1.0, 0.0)
    assert r1[..., 1:].all() and not r1[..., 0].any()  # tau_q = 1: every vision block, never text


@given(seed=st.integers(0, 1000), n_text=st.integers(0, 2), n_vis=st.integers(1, 8),
       rf=st.floats(0, 1), sf=st.floats(0, 1), site=st.integers(0, 50))
def test_fixed_policy_fractions_and_determinism(seed, n_text, n_vis, rf, sf, site):
    q_text = _layout(n_text, n_vis, True)
    n = q_text.numel()
    inp = _inp(torch.full((2, 3, n, n), 1.0 / n), q_text, q_text, "joint" if n_text else "self")
    inp.site_id = site
    reuse, skip = fixed(inp, rf, sf, seed)
    assert (reuse.sum(-1) == round(rf * n_vis)).all()
    assert not reuse[..., q_text].any()
    k_skip = round(sf * n_vis) if n_text else min(round(sf * n_vis), n_vis - 1)
    rows = ~reuse & ~q_text
    assert (skip.sum(-1)[rows] == k_skip).all()
    assert not skip[~rows].any() and not skip[..., q_text].any()
    again = fixed(inp, rf, sf, seed)
    assert torch.equal(again[0], reuse) and torch.equal(again[1], skip)


# ---- Taylor forecasting ----------------------------------------------------------------------------


@given(order=st.integers(0, 2), gaps=st.lists(st.integers(1, 6), min_size=1, max_size=4), x=st.integers(0, 6),
       seed=st.integers(0, 1000))
def test_taylor_forecast_matches_hand_extrapolation(order, gaps, x, seed):
    g = torch.Generator().manual_seed(seed)
    steps = [0]
    for d in gaps:
        steps.append(steps[-1] + d)
    obs = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in steps]
    factors = None
    for k, F in enumerate(obs):
        factors = taylor.refresh(factors, F, steps[k] - steps[k - 1] if k else 0, order)
    # by hand, with the last observations: f0 = F_k, f1 = (F_k - F_{k-1}) / d_k,
    # f2 = (f1_k - f1_{k-1}) / d_k where f1_{k-1} = (F_{k-1} - F_{k-2}) / d_{k-1}
    k = len(obs) - 1
    want = obs[k].clone()
    if order >= 1 and k >= 1:
        d1 = steps[k] - steps[k - 1]
        f1 = (obs[k] - obs[k - 1]) / d1
        want = want + f1 * x
        if order >= 2 and k >= 2:
            f1_old = (obs[k - 1] - obs[k - 2]) / (steps[k - 1] - steps[k - 2])
            f2 = (f1 - f1_old) / d1
            want = want + f2 * x * x / 2
    assert len(factors) == min(order, k) + 1
    torch.testing.assert_close(taylor.forecast(factors, x, torch.float64), want, rtol=1e-5, atol=1e-5)


def test_taylor_is_exact_on_polynomials():
    t = torch.tensor([0.0, 5.0, 10.0])
    a, b, c = torch.randn(3, 4, dtype=torch.float64)
    F = lambda s: a + b * s + c * s * s  # noqa: E731
    f = None
    for k, s in enumerate(t.tolist()):
        f = taylor.refresh(f, F(s), 5 if k else 0, 2)
    # finite differences are exact for a quadratic up to the backward-difference bias of f1 (c * Δ)
    x = 3.0
    got = taylor.forecast(f, x, torch.float64)
    want = F(10.0) + (b + c * (2 * 10.0 - 5)) * x + c * x * x
    torch.testing.assert_close(got, want)


def test_refresh_never_returns_its_input():
    a = torch.randn(4, 4)
    (f0,) = taylor.refresh(None, a, 0, 0)
    assert f0.data_ptr() != a.data_ptr() and torch.equal(f0, a)


def test_cache_bias_terms_forecast_equals_projecting_the_forecast():
    g = torch.Generator().manual_seed(0)
    B, S, H, D, C = 2, 40, 3, 16, 24
    W = torch.randn(C, H * D, generator=g)
    reuse = torch.rand(B, H, 3, generator=g) < 0.5
    sym = Symbols.from_dense(reuse, torch.zeros(B, H, 3, 3, dtype=torch.bool), 16, 16, S, S)
    fs = [torch.randn(B, S, H * D, generator=g) for _ in range(3)]
    x = 2.0
    terms = [cache_bias_for(f, W, sym, D) for f in fs]
    torch.testing.assert_close(taylor.forecast(terms, x), cache_bias_for(taylor.forecast(fs, x), W, sym, D),
                               rtol=1e-4, atol=1e-4)


# ---- schedule, clock, config -----------------------------------------------------------------------


@given(warmup=st.integers(1, 10), interval=st.integers(1, 8))
def test_step_action(warmup, interval):
    acts = [step_action(s, warmup, interval) for s in range(40)]
    assert acts[: warmup - 1] == ["dense"] * (warmup - 1)
    ups = [s for s, a in enumerate(acts) if a == "update"]
    assert ups == list(range(warmup - 1, 40, interval))
    assert all(a == "dispatch" for s, a in enumerate(acts) if s >= warmup - 1 and s not in ups)


def test_clock_streams_steps_and_generations():
    c = StepClock()
    seq = [1.0, 1.0, 0.8, 0.8, 0.5, 0.5, 1.0, 0.7, 0.7]
    pos = [(p.generation, p.step, p.stream) for p in map(c.tick, seq)]
    assert pos == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1),
                   (1, 0, 0), (1, 1, 0), (1, 1, 1)]
    c.reset()
    assert c.tick(0.2).generation == 0


@given(steps=st.integers(1, 6), streams=st.integers(1, 3), gens=st.integers(1, 3))
def test_counted_clock_places_calls_like_the_timestep_clock(steps, streams, gens):
    # a loop that matches steps/streams gets the positions the timestep clock gives, and passes the check
    ts = [1.0 - i / steps for i in range(steps)]
    seq = [t for _ in range(gens) for t in ts for _ in range(streams)]
    by_time, counted = StepClock(), StepClock()
    for t in seq:
        a = by_time.tick(t)
        b = counted.tick_counted(steps, streams)
        assert (a.generation, a.step, a.stream) == (b.generation, b.step, b.stream)
        counted.check(b, t)


@pytest.mark.parametrize("seq, steps, streams, match", [
    ([1.0, 0.5, 0.2, 0.1], 3, 1, "more steps than OmniConfig.steps"),
    ([1.0, 0.5, 1.0, 0.5], 3, 1, "fewer steps than OmniConfig.steps"),
    ([1.0, 0.5, 0.2, 0.1], 2, 2, "different timesteps"),
    ([1.0, 1.0, 1.0, 1.0], 2, 1, "stayed the same from one step to the next"),
])
def test_counted_clock_raises_when_the_loop_does_not_match(seq, steps, streams, match):
    c = StepClock()
    with pytest.raises(RuntimeError, match=match):
        for t in seq:
            c.check(c.tick_counted(steps, streams), t)
    c.reset()  # reset() starts over: the same calls after it are a fresh generation
    c.check(c.tick_counted(steps, streams), seq[0])


@pytest.mark.parametrize("kw, field, rng", [
    ({"interval": 0}, "interval", "from 1 to 1000"),
    ({"warmup": 0}, "warmup", "from 1 to 1000"),
    ({"taylor_order": 3}, "taylor_order", "from 0 to 2"),
    ({"max_cache_mb": -1.0}, "max_cache_mb", "0 or more"),
    ({"max_cache_mb": float("inf")}, "max_cache_mb", "finite"),
    ({"max_cache_mb": float("nan")}, "max_cache_mb", "finite"),
    ({"interval": 2.5}, "interval", "from 1 to 1000"),
    ({"policy": "magic"}, "policy", "one of"),
    ({"steps": 0}, "steps", "1 or more"),
    ({"streams": 0}, "streams", "from 1 to 16"),
])
def test_config_rejects_invalid_values(kw, field, rng):
    with pytest.raises(ValueError, match=rf"OmniConfig\.{field} must .*{rng}"):
        OmniConfig(**kw)


@pytest.mark.parametrize("make, field, rng", [
    (lambda: FlashOmni(tau_q=1.5), "FlashOmni.tau_q", "from 0 to 1"),
    (lambda: FlashOmni(tau_kv=1.0), "FlashOmni.tau_kv", "from 0 to less than 1"),
    (lambda: Fixed(reuse=-0.1), "Fixed.reuse", "from 0 to 1"),
    (lambda: Fixed(skip=2), "Fixed.skip", "from 0 to 1"),
    (lambda: Fixed(seed=-1), "Fixed.seed", "0 or more"),
])
def test_policy_objects_reject_invalid_knobs(make, field, rng):
    with pytest.raises(ValueError, match=rf"{field} must .*{rng}"):
        make()


def test_override_patterns_that_match_no_site_are_reported():
    from omni_compile.config import unmatched_override_patterns

    sites = ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn"]
    cfg = OmniConfig(overrides={"transformer_blocks.0.*": {"policy": "dense"},
                                "transformer_block.1.*": {"interval": 2},  # misspelt
                                "single_transformer_blocks.*": {"interval": 3},
                                "Transformer_blocks.1.*": {"interval": 2},  # case matters, as in for_site
                                "blocks.*": {"interval": 2}})  # fnmatch matches the whole path
    assert unmatched_override_patterns(cfg, sites) == ["transformer_block.1.*", "Transformer_blocks.1.*", "blocks.*"]
    assert unmatched_override_patterns(cfg, []) == list(cfg.overrides)
    assert unmatched_override_patterns(OmniConfig(), sites) == []
    # exactly the patterns for_site never applies (it returns the config itself when none matches)
    alone = {p: OmniConfig(overrides={p: dict(f)}) for p, f in cfg.overrides.items()}
    never = [p for p, c in alone.items() if all(c.for_site(n) is c for n in sites)]
    assert unmatched_override_patterns(cfg, sites) == never


def test_config_defaults_are_the_paper_settings_with_adaptive_block_caching():
    c = OmniConfig()
    assert (c.policy, c.interval, c.warmup, c.block_cache, c.final_dense) == ("flashomni", 5, 8, ResidualChange(0.1), 0)
    assert POLICIES["flashomni"] == FlashOmni(tau_q=0.5, tau_kv=0.05)  # the paper's thresholds
    assert c.max_cache_bytes is None and OmniConfig(max_cache_mb=1).max_cache_bytes == 2**20
