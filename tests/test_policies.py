"""The policy API and the shipped strategies: property tests of each strategy's definition on
symbol bits (pure tensors, nasty shapes), the config surface (names, objects, tuples, overrides, token
layout), and one compiled tiny FLUX running every strategy through the same graph with no recompile."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _runtime_helpers import compile_with, denoise, make_state, tiny_flux_case
from omni_compile import OmniConfig
from omni_compile.ops import Symbols
from omni_compile.bench.presets import strategy_config
from omni_compile.policies import (POLICIES, BasePolicy, Broadcast, Compose, FlashOmni, PolicyFallback, PolicyInput,
                                   TaylorSeer, TokenLayout, TopK, Window, block_text_mask, finalize, no_bits,
                                   resolve_policy, run_policy, window_keep)

EPS = 1e-5


def _inp(seq, text, text_first, block_q=16, block_kv=16, B=1, H=2, kind=None, layout=None, scores=None,
         change=None, seed=0, spread=3.0):
    """A PolicyInput for a self/joint site of ``seq`` tokens, ``text`` of them text (first or last)."""
    segs = ([("text", 0, text), ("vision", text, seq)] if text_first else [("vision", 0, seq - text), ("text", seq - text, seq)])
    segs = [s for s in segs if s[2] > s[1]]
    q_text = block_text_mask(segs, seq, block_q)
    kv_text = block_text_mask(segs, seq, block_kv)
    nQ, nK = q_text.numel(), kv_text.numel()
    if scores is None:
        g = torch.Generator().manual_seed(seed)
        scores = torch.softmax(torch.randn(B, H, nQ, nK, generator=g) * spread, -1)
    n_text = sum(1 for j in range(nQ) if any(m == "text" and a < (j + 1) * block_q and b > j * block_q for m, a, b in segs))
    kind = kind or ("joint" if 0 < text < seq else "self")
    return PolicyInput(scores=scores, scores_square=scores if block_q == block_kv else None, kind=kind, q_text=q_text,
                       kv_text=kv_text, batch=B, heads=H, seq_q=seq, seq_kv=seq, block_q=block_q, block_kv=block_kv,
                       text_q_blocks=n_text, layout=layout, change=change), segs


CFG = OmniConfig()


# ---- window ------------------------------------------------------------------------------------------


@given(F=st.integers(1, 2), Hh=st.integers(1, 5), W=st.integers(1, 7), text=st.integers(0, 20),
       text_first=st.booleans(), wf=st.integers(1, 3), wr=st.integers(1, 5), wc=st.integers(1, 5),
       block_kv=st.sampled_from([16, 32]))
def test_window_keeps_exactly_the_blocks_within_the_window(F, Hh, W, text, text_first, wf, wr, wc, block_kv):
    n_vis = F * Hh * W
    seq = n_vis + text
    start = text if text_first else 0
    inp, segs = _inp(seq, text, text_first, block_kv=block_kv, layout=TokenLayout(F, Hh, W, start))
    reuse, skip = run_policy(Window(size=(wf, wr, wc)), inp, CFG)
    assert not reuse.any()
    assert (skip == skip[:1, :1]).all()  # static: the same bits for every batch item and head
    s = skip[0, 0]
    assert not s[inp.q_text].any(), "a text query block skipped keys"
    assert not s[:, inp.kv_text].any(), "a text key block was skipped"
    coords = {start + (f * Hh + r) * W + c: (f, r, c) for f in range(F) for r in range(Hh) for c in range(W)}

    def near(i, j):
        (f1, r1, c1), (f2, r2, c2) = coords[i], coords[j]
        return abs(f1 - f2) <= wf // 2 and abs(r1 - r2) <= wr // 2 and abs(c1 - c2) <= wc // 2

    for qb in range(inp.num_q_blocks):
        if inp.q_text[qb]:
            continue
        qt = [i for i in range(qb * 16, min(seq, qb * 16 + 16)) if i in coords]
        for kb in range(inp.num_kv_blocks):
            if inp.kv_text[kb]:
                continue
            kt = [j for j in range(kb * block_kv, min(seq, kb * block_kv + block_kv)) if j in coords]
            inside = any(near(i, j) for i in qt for j in kt)
            assert bool(s[qb, kb]) == (not inside), (qb, kb, inside)
    assert (~s).any(-1).all()  # each query block keeps at least its own tokens' block


def test_window_needs_the_layout_and_skips_nothing_for_text_keys():
    inp, _ = _inp(40, 8, True)
    with pytest.raises(PolicyFallback, match="token layout"):
        Window()(inp, CFG)
    cross, _ = _inp(40, 0, True, kind="cross")
    cross.kv_text = torch.ones(1, dtype=torch.bool)
    cross.seq_kv = 8
    r, s = Window()(cross, CFG)
    assert not r.any() and not s.any()
    with pytest.raises(ValueError, match="Window.size"):
        Window(size=(0, 2, 2))
    assert Window(size=(4, 4)).size == (1, 4, 4)


def test_window_keep_is_cheap_at_video_size():
    # HunyuanVideo-like 720p grid: 30 x 45 x 80 tokens, blocks of 128: nQ x S work, no S x S mask
    keep = window_keep(TokenLayout(30, 45, 80, 0), (9, 15, 15), 108000, 108000, 128, 128)
    assert keep.shape == (844, 844) and 0.05 < keep.float().mean() < 0.6


# ---- topk --------------------------------------------------------------------------------------------


@given(seq=st.integers(1, 120), text=st.integers(0, 40), text_first=st.booleans(), mass=st.floats(0.05, 1.0),
       spread=st.floats(0.5, 6.0), seed=st.integers(0, 1000))
def test_topk_kept_blocks_carry_the_mass(seq, text, text_first, mass, spread, seed):
    text = min(text, seq)
    inp, _ = _inp(seq, text, text_first, seed=seed, spread=spread)
    reuse, skip = run_policy(TopK(mass=mass), inp, CFG)
    assert not reuse.any()
    kept = torch.where(skip, 0.0, inp.scores.double()).sum(-1)
    rows = ~inp.q_text
    assert (kept[:, :, rows] >= mass - EPS).all(), "kept key blocks carry less than the requested mass"
    assert not skip[:, :, inp.q_text].any() and not skip[..., inp.kv_text].any()
    assert (~skip).any(-1).all()


@given(seq=st.integers(1, 120), text=st.integers(0, 40), k=st.integers(1, 8), seed=st.integers(0, 1000))
def test_topk_k_keeps_the_k_best_vision_blocks(seq, text, k, seed):
    text = min(text, seq)
    inp, _ = _inp(seq, text, True, seed=seed)
    _, skip = TopK(k=k)(inp, CFG)
    vis_k = ~inp.kv_text
    n = int(vis_k.sum())
    for qb in (~inp.q_text).nonzero().squeeze(1).tolist():
        keep = ~skip[:, :, qb] & vis_k
        assert (keep.sum(-1) == min(k, n)).all()
        sc = inp.scores[:, :, qb].masked_fill(~vis_k, -1.0)
        worst_kept = torch.where(keep, sc, torch.full_like(sc, 2.0)).amin(-1)
        best_skipped = torch.where(skip[:, :, qb] & vis_k, sc, torch.full_like(sc, -1.0)).amax(-1)
        assert (worst_kept >= best_skipped).all()


# ---- broadcast, taylorseer -----------------------------------------------------------------------------


@given(seq=st.integers(1, 120), text=st.integers(0, 40), text_first=st.booleans(),
       kinds=st.sampled_from([("joint", "self", "cross"), ("self",), ("joint",)]))
def test_broadcast_reuses_every_vision_block_of_chosen_sites(seq, text, text_first, kinds):
    text = min(text, seq)
    inp, _ = _inp(seq, text, text_first)
    reuse, skip = run_policy(Broadcast(kinds=kinds), inp, CFG)
    assert not skip.any()
    if inp.kind in kinds:
        assert torch.equal(reuse, (~inp.q_text).expand_as(reuse)), "vision blocks not all reused / text reused"
    else:
        assert not reuse.any()


@given(seq=st.integers(1, 140), text=st.integers(0, 40), text_first=st.booleans(), frac=st.floats(0, 1),
       seed=st.integers(0, 1000), B=st.integers(1, 2))
def test_taylorseer_reuses_the_least_changing_blocks(seq, text, text_first, frac, seed, B):
    text = min(text, seq)
    probe, _ = _inp(seq, text, text_first, B=B)
    g = torch.Generator().manual_seed(seed)
    change = torch.rand(B, 2, probe.num_q_blocks, generator=g)
    inp, _ = _inp(seq, text, text_first, B=B, change=change)
    reuse, skip = run_policy(TaylorSeer(fraction=frac), inp, CFG)
    assert not skip.any() and not reuse[..., inp.q_text].any()
    vis = ~inp.q_text
    k = round(frac * int(vis.sum()))
    assert (reuse.sum(-1) == k).all()
    for b, h in itertools.product(range(B), range(2)):
        r, c = reuse[b, h], change[b, h]
        if r.any() and (vis & ~r).any():
            assert c[r].max() <= c[vis & ~r].min(), "a reused block changed more than a computed one"
    thr = float(change.median())
    r2, _ = TaylorSeer(threshold=thr)(inp, CFG)
    assert torch.equal(r2, (change <= thr) & vis)
    inp.change = None
    r3, _ = TaylorSeer()(inp, CFG)
    assert not r3.any() and inp.notes  # nothing observed yet: nothing reused, and it says so


# ---- composition and the runtime's contract ----------------------------------------------------------------


@given(F=st.integers(1, 2), Hh=st.integers(1, 5), W=st.integers(2, 7), text=st.integers(0, 20),
       text_first=st.booleans(), win=st.integers(1, 3), mass=st.floats(0.05, 0.9), tau_q=st.floats(0, 1),
       seed=st.integers(0, 1000))
def test_compose_is_the_or_and_no_row_loses_every_key(F, Hh, W, text, text_first, win, mass, tau_q, seed):
    seq = F * Hh * W + text
    inp, _ = _inp(seq, text, text_first, seed=seed, layout=TokenLayout(F, Hh, W, text if text_first else 0))
    cfg = OmniConfig(policy=FlashOmni(tau_q=tau_q))
    parts = [Window(size=(1, win, win)), TopK(mass=mass), FlashOmni()]
    bits = [finalize(p, inp, *p(inp, cfg)) for p in parts]
    reuse, skip = run_policy(Compose(*parts), inp, cfg)
    want_r = bits[0][0] | bits[1][0] | bits[2][0]
    want_s = (bits[0][1] | bits[1][1] | bits[2][1]) & ~want_r.unsqueeze(-1)
    assert torch.equal(reuse, want_r)
    # the OR, except where a computed row would lose every key: it keeps its best-scoring block
    assert not (skip & ~want_s).any()
    fixed = want_s & ~skip
    rows = fixed.any(-1)
    assert torch.equal(rows, want_s.all(-1) & ~want_r)
    assert torch.equal(fixed[rows].float().argmax(-1), inp.scores[rows].argmax(-1))
    assert (~skip | reuse.unsqueeze(-1)).any(-1).all(), "a computed row lost every key block"


def test_compose_keeps_one_key_where_kept_sets_are_disjoint():
    # vision-only 4x4 grid in 4 blocks (one row each); window 1x1 keeps only the own block; TopK(k=1) on
    # scores that put all mass on another block keeps only that one: their intersection is empty
    inp, _ = _inp(64, 0, True, H=1, layout=TokenLayout(1, 4, 16, 0))
    P = torch.zeros(1, 1, 4, 4)
    P[..., 3] = 1.0
    P[..., 3, 0] = 1.0
    P[..., 3, 3] = 0.0
    inp.scores = inp.scores_square = P
    reuse, skip = Compose(Window(size=(1, 1, 1)), TopK(k=1))(inp, CFG)
    assert not reuse.any()
    kept = (~skip[0, 0]).nonzero().tolist()
    assert kept == [[0, 3], [1, 3], [2, 3], [3, 0]]  # the best-scoring block, one per row
    # without scores the diagonal block is the one kept
    inp.scores = None
    _, skip2 = Compose(Window(size=(1, 1, 1)), "dense")(inp, CFG)
    assert torch.equal(~skip2[0, 0], torch.eye(4, dtype=torch.bool))


def test_compose_member_fallback_adds_no_bits():
    inp, _ = _inp(48, 16, True)
    r, s = Compose("window", "flashomni")(inp, CFG)
    rf, sf = run_policy("flashomni", inp, CFG)
    assert torch.equal(r, rf) and torch.equal(s, sf)
    assert any("window" in n for n in inp.notes)
    with pytest.raises(PolicyFallback):
        Compose("window", Window(size=(1, 2, 2)))(inp, CFG)


def test_finalize_enforces_the_contract():
    inp, _ = _inp(48, 16, True)

    class Greedy(BasePolicy):
        name = "greedy"

        def __call__(self, inp, config):
            r, s = no_bits(inp)
            return r | True, s | True

    reuse, skip = run_policy(Greedy(), inp, CFG)
    assert not reuse[..., inp.q_text].any() and reuse[..., ~inp.q_text].all()  # text rows never reused
    assert not skip[reuse].any()  # reused tiles carry no skip bits
    assert (~skip[:, :, inp.q_text]).sum(-1).eq(1).all()  # a computed row keeps one key

    class Wrong(BasePolicy):
        name = "wrong"

        def __call__(self, inp, config):
            return torch.zeros(3), torch.zeros(3)

    with pytest.raises(ValueError, match="policy 'wrong' returned reuse"):
        run_policy(Wrong(), inp, CFG)


def test_symbols_of_each_strategy_render():
    inp, _ = _inp(70, 12, True, H=1, layout=TokenLayout(1, 7, 8, 12),
                  change=torch.linspace(0, 1, 5).view(1, 1, 5))
    for name in ("flashomni", "window", "topk", "broadcast", "taylorseer"):
        r, s = run_policy(name, inp, OmniConfig(policy=FlashOmni(tau_q=0.6, tau_kv=0.1)))
        text = repr(Symbols.from_dense(r, s, 16, 16, 70, 70))
        assert "q0" in text and "density=" in text


# ---- config surface -------------------------------------------------------------------------------------


def test_config_accepts_names_objects_tuples_and_validates_overrides():
    assert resolve_policy(OmniConfig(policy="window").policy) is POLICIES["window"]
    c = OmniConfig(policy=("window", TopK(k=2)))
    assert resolve_policy(c.policy).name == "window+topk"
    with pytest.raises(ValueError, match=r"OmniConfig\.policy must be one of"):
        OmniConfig(policy=("window", "nope"))
    with pytest.raises(ValueError, match=r"cannot be set per site; valid fields: policy, interval"):
        OmniConfig(overrides={"transformer_blocks.0.*": {"block_q": 64}})
    with pytest.raises(ValueError, match=r"overrides\['x'\]: OmniConfig\.interval"):
        OmniConfig(overrides={"x": {"interval": 0}})
    with pytest.raises(ValueError, match=r"cannot be set per site.*FlashOmni\(tau_q=0\.3\)"):
        OmniConfig(overrides={"x": {"tau_kv": 0.1}})
    with pytest.raises(ValueError, match=r"OmniConfig\.token_layout"):
        OmniConfig(token_layout=(0, 4, 4))
    assert OmniConfig(token_layout=(6, 8)).token_layout == (1, 6, 8)
    o = OmniConfig(policy=FlashOmni(tau_q=0.3), overrides={"transformer_blocks.*": {"policy": "dense"},
                                                         "*.0.*": {"interval": 2}})
    assert o.for_site("transformer_blocks.0.attn").policy == "dense"
    assert o.for_site("transformer_blocks.0.attn").interval == 2
    assert o.for_site("single_transformer_blocks.1.attn").policy == FlashOmni(tau_q=0.3)
    assert o.for_site("single_transformer_blocks.1.attn").interval == 5
    for bad in (lambda: TopK(mass=0), lambda: TopK(k=0), lambda: TaylorSeer(fraction=2),
                lambda: Broadcast(kinds=("spatial",)), lambda: FlashOmni(tau_kv=1.0)):
        with pytest.raises(ValueError):
            bad()


def test_strategy_configs_for_the_benchmark():
    for name in ("dense", "flashomni", "window", "topk", "broadcast", "taylorseer", "window+flashomni"):
        cfg = strategy_config(name, token_layout=(1, 64, 64), block=128, interval=5)
        assert cfg.block_q == 128 and cfg.token_layout == (1, 64, 64)
        assert resolve_policy(cfg.policy).name == name


@pytest.mark.parametrize("family, grid", [("dit", (1, 4, 4)), ("wan", (2, 4, 4)), ("flux", None)])
def test_passes_infer_the_token_layout(family, grid):
    from _tiny_models import build

    torch._dynamo.reset()
    model, make_inputs = build(family)
    st_ = make_state(policy="dense")
    with torch.no_grad():
        compile_with(model, st_)(**make_inputs(0))
    torch._dynamo.reset()
    vis = [s for s in st_.sites if s.kind != "cross"]
    assert vis and all(s.token_layout == grid for s in vis)


# ---- every strategy through one compiled graph -------------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_case(single_layers=1)


def test_every_strategy_runs_on_one_compiled_graph(flux):
    import _user_policy  # noqa: F401  (registers "band", the docs' worked example)

    model, make_inputs, lat = flux
    torch._dynamo.reset()
    state = make_state(policy="dense")
    compiled = compile_with(model, state)
    ref = denoise(compiled, make_inputs, lat, 7)  # the first call compiles; nothing after may
    ops_before = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("flashomni::")}
    runs = [
        ("flashomni", dict(policy=FlashOmni(tau_q=0.7, tau_kv=0.2))),
        ("window", dict(policy=Window(size=(1, 3, 3)), token_layout=(1, 8, 8))),
        ("topk", dict(policy=TopK(mass=0.7))),
        ("broadcast", dict(policy="broadcast")),
        ("taylorseer", dict(policy="taylorseer")),
        ("fixed", dict(policy="fixed")),
        ("window+flashomni", dict(policy=(Window(size=(1, 3, 3)), FlashOmni(tau_q=0.7, tau_kv=0.0)), token_layout=(1, 8, 8))),
        ("band", dict(policy="band")),
        ("overrides", dict(policy="broadcast", overrides={"transformer_blocks.0.*": {"policy": "dense"}})),
        ("window, no layout", dict(policy="window", token_layout=None, overrides=None)),
    ]
    dens = {}
    with torch.compiler.set_stance("fail_on_recompile"):
        for name, changes in runs:
            state.configure(**changes)
            out = denoise(compiled, make_inputs, lat, 7)
            assert torch.isfinite(out).all(), name
            rep = state.report()
            dens[name] = rep.density()
            disp = [s for s in rep.steps if s["action"] in ("dispatch", "mixed")]  # mixed: per-site policies
            if name == "window, no layout":
                assert torch.equal(out, ref), "a site that cannot run its policy must run dense"
                assert all("token layout" in (s.runtime_reason or "") for s in state.sites)
                assert not disp
                continue
            assert disp and min(s["density"] for s in disp) < 1.0, name
            assert 0 < dens[name] < 1, name
            if name == "overrides":
                first = state.site("transformer_blocks.0.attn")
                assert not first.streams and all(r.action == "dense" for r in state.history if r.site_id == first.site_id)
    assert len(state.compiles) == 1
    # switching policy registered no op (and no kernel: the ops are the same custom ops)
    assert {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("flashomni::")} == ops_before
    assert dens["broadcast"] < dens["taylorseer"]  # broadcast reuses every vision block, taylorseer half


def test_docs_show_the_worked_example_verbatim():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    code = (root / "tests" / "_user_policy.py").read_text().split("\n", 2)[2]  # minus the two comment lines
    assert code.strip() in (root / "docs" / "policies.md").read_text()


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read a tensor back to the host or build one from host data: on CUDA each is a
    sync or a copy that stalls the pipelined loop once per site and update."""

    READS = ("_local_scalar_dense", "nonzero", "masked_select", "lift_fresh")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy", [FlashOmni(), TopK(mass=0.9), TopK(k=2), Broadcast(), TaylorSeer(fraction=0.5)])
@pytest.mark.parametrize("text", [0, 16])
def test_score_policies_read_nothing_back(policy, text):
    inp, _ = _inp(96, text, True, H=3)
    inp.change = torch.rand(1, 3, inp.q_text.numel(), generator=torch.Generator().manual_seed(1))
    with _HostReads() as reads:
        run_policy(policy, inp, CFG)
    assert reads.seen == [], (policy, reads.seen)


@pytest.mark.parametrize("text_kv_blocks", [None, 1])
def test_window_reads_back_only_without_the_host_count(text_kv_blocks):
    # 16 text tokens then a 5 x 16 grid, blocks of 16: one text key block (the runtime passes the count)
    inp, _ = _inp(96, 16, True, H=2, layout=TokenLayout(1, 5, 16, 16))
    inp.text_kv_blocks = text_kv_blocks
    run_policy(Window(size=(1, 3, 3)), inp, CFG)  # the window's key mask is built on the host once per shape
    with _HostReads() as reads:
        reuse, skip = run_policy(Window(size=(1, 3, 3)), inp, CFG)
    assert reads.seen == ([] if text_kv_blocks is not None else ["_local_scalar_dense"])
    assert skip[..., 1:, 1:].any() and not skip[..., 0].any()  # vision keys outside the window skipped, text kept
    inp.text_kv_blocks = None
    assert all(torch.equal(a, b) for a, b in zip(run_policy(Window(size=(1, 3, 3)), inp, CFG), (reuse, skip)))


def _site_layout(segs, seq, block_q, block_kv, site_id=0):
    """The runtime's cached ``(q_text, kv_text, text query blocks, text key blocks)`` of a self site."""
    from types import SimpleNamespace

    from omni_compile.runtime import _layout

    state = SimpleNamespace(config=SimpleNamespace(block_q=block_q, block_kv=block_kv))
    plan = SimpleNamespace(plan_id=site_id, segments=segs, seq_q=seq, kv_segments=segs, seq_kv=seq)
    return _layout(state, plan, torch.device("cpu"))


def test_runtime_text_block_counts():
    segs = [("text", 0, 20), ("vision", 20, 100), ("text", 100, 103)]
    q_text, kv_text, n_q, n_kv = _site_layout(segs, 103, 16, 32)
    assert (n_q, n_kv) == (3, 2)  # 16-blocks 0, 1 (tokens 16-19) and 6 (96-102); 32-blocks 0 and 3
    assert torch.equal(q_text, block_text_mask(segs, 103, 16)) and torch.equal(kv_text, block_text_mask(segs, 103, 32))
    assert _site_layout([("vision", 0, 64)], 64, 16, 16)[2:] == (0, 0)


def test_fixed_hands_out_one_symbols_object_per_site():
    """``Fixed.symbols``: the symbols the generic path makes of its bits, and the same object on every later
    update of the site (no finalize, packing or decoding again; decoded schedules stay with it); another
    site, another ``allow_reuse`` or other fractions make their own. A subclass overriding ``__call__`` is
    not memoised."""
    from omni_compile.ops import Symbols
    from omni_compile.policies import Fixed, policy_symbols
    from omni_compile.policies.base import symbols_from_call

    inp, _ = _inp(200, 40, True, B=2, H=3)
    cfg = OmniConfig(policy=Fixed(reuse=0.3, skip=0.5))
    first = policy_symbols("fixed", inp, cfg)
    first.kv_schedule()
    again = policy_symbols("fixed", inp, cfg)
    assert again is first and again._kv_schedule is not None
    generic = symbols_from_call(Fixed(), inp, cfg)
    assert isinstance(first, Symbols) and first == generic and first.reuse_fraction() > 0
    capped = policy_symbols("fixed", inp, cfg, allow_reuse=False)
    assert capped is not first and capped.reuse_fraction() == 0
    inp.site_id = 7
    assert policy_symbols("fixed", inp, cfg) is not first
    assert policy_symbols("fixed", inp, OmniConfig(policy=Fixed(reuse=0.0, skip=0.5))) is not first
    inp.site_id = 0
    assert policy_symbols("fixed", inp, cfg, allow_reuse=False) is capped  # site 0's one entry
    assert policy_symbols("fixed", inp, cfg) is not first and policy_symbols("fixed", inp, cfg) == first

    class Mine(Fixed):
        def __call__(self, inp, config):
            return super().__call__(inp, config)

    assert Mine().symbols(inp, cfg) is None
