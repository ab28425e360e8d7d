"""flashomni_symbols: the flashomni policy's decision, bits and key lists in two launches, against an fp64
golden that marks the blocks whose running sums sit on a budget (fp32 sums in another order may put them
on either side); everywhere else the kernels and the PyTorch reference must agree with it exactly."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from omni_compile.config import OmniConfig
from omni_compile.ops import Symbols, kernel_backend
from omni_compile.ops.flashomni_policy import MODES, flashomni_symbols, flashomni_symbols_op
from omni_compile.policies import FlashOmni, PolicyInput, finalize, flashomni, policy_symbols

from _golden import golden_flashomni

IMPLS = ["reference", "triton"]
CFG = OmniConfig()


def make_scores(B, H, nQ, nK, seed, style):
    """``(scores [B, H, nQ, nK], square [B, H, nQ, nQ])``: pooled-score-like rows — smooth softmaxes, peaked
    ones (many exact zeros: ties), or small multiples of a power of two (exact sums in any order, exact
    ties; rows sum to at most 1)."""
    g = torch.Generator().manual_seed(seed)

    def rows(n):
        if style == "dyadic":
            w = torch.randint(0, 4, (B, H, nQ, n), generator=g).float()
            return w / 2.0 ** (max(1, n).bit_length() + 2)
        return (torch.randn(B, H, nQ, n, generator=g) * (3.0 if style == "smooth" else 40.0)).softmax(-1)

    return rows(nK), rows(nQ)


def text_mask(n, count, where):
    """``[n]`` bool with ``count`` text blocks first, last or spread out."""
    m = torch.zeros(n, dtype=torch.bool)
    count = min(count, n)
    if count and where == "first":
        m[:count] = True
    elif count and where == "last":
        m[n - count:] = True
    elif count:
        m[torch.linspace(0, n - 1, count).round().long()] = True
    return m


def small_policy_input(kind, n_text, seed, short_q=0, short_kv=0):
    """A ``PolicyInput`` of 2 items x 2 heads on 16-row blocks: 9 query blocks (the first ``n_text`` text),
    9 key blocks with the same text (5 text-free ones for cross-attention), the lengths ``short_q`` /
    ``short_kv`` rows short of whole blocks. Dyadic scores: the tests that use it compare two paths (the
    fused op, the kernels) with the generic PyTorch one bit for bit, which holds on any machine only where
    every sum is exact in any order."""
    nQ, nK = 9, (5 if kind == "cross" else 9)
    scores, _ = make_scores(2, 2, nQ, nK, seed, "dyadic")
    qt = text_mask(nQ, n_text, "first")
    kt = qt.clone() if kind != "cross" else torch.zeros(nK, dtype=torch.bool)
    return PolicyInput(scores=scores, scores_square=None if kind == "cross" else scores, kind=kind, q_text=qt,
                       kv_text=kt, batch=2, heads=2, seq_q=nQ * 16 - short_q, seq_kv=nK * 16 - short_kv, block_q=16,
                       block_kv=16, text_q_blocks=int(qt.sum()), text_kv_blocks=int(kt.sum()))


def run(impl, scores, square, qt, kt, mode, tau_q, tau_kv, allow):
    with kernel_backend(impl):
        return flashomni_symbols(scores, None if mode == MODES["cross"] else square, qt, kt, mode, tau_q, tau_kv, allow)


def check_against_golden(out, scores, square, qt, kt, mode, tau_q, tau_kv, allow, min_certain=0.0):
    reuse, skip, reuse_bits, skip_bits, idx, cnt = out
    B, H, nQ, nK = scores.shape
    # the bits are numpy.packbits(..., bitorder="little") of the masks, bit for bit, and the key lists
    # (kept blocks ascending, then the rest) are those of the masks: on every input
    assert np.array_equal(reuse_bits.numpy(), np.packbits(reuse.numpy(), -1, bitorder="little"))
    assert np.array_equal(skip_bits.numpy(), np.packbits(skip.numpy(), -1, bitorder="little"))
    kept = ~skip & ~reuse.unsqueeze(-1)
    assert torch.equal(cnt, kept.sum(-1).int())
    order = torch.sort((~kept).int(), dim=-1, stable=True).indices.int()
    assert torch.equal(idx, order)
    # the contract the runtime relies on, on every input
    assert not (reuse & qt).any()
    assert not (skip & qt.view(1, 1, -1, 1)).any() and not (skip & kt).any()
    if allow:
        assert not (skip & reuse.unsqueeze(-1)).any()
    else:
        assert not reuse.any()
    assert (kept.any(-1) | reuse).all()  # every computed row keeps a key block
    g_reuse, g_skip, r_unc, s_unc = golden_flashomni(scores, square, qt, kt, mode, tau_q, tau_kv)
    if not allow:
        g_reuse_final = torch.zeros_like(g_reuse)
    else:
        g_reuse_final = g_reuse
    sure = ~r_unc
    assert torch.equal(reuse[sure], g_reuse_final[sure])
    rows_sure = sure.unsqueeze(-1) & ~s_unc
    assert torch.equal(skip[rows_sure], g_skip[rows_sure])
    assert rows_sure.float().mean() >= min_certain
    return rows_sure


@pytest.mark.parametrize("impl", IMPLS)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), nQ=st.integers(1, 40), nK=st.integers(1, 70),
    mode=st.sampled_from(sorted(MODES.values())), n_text=st.integers(0, 5),
    where=st.sampled_from(["first", "last", "spread"]), style=st.sampled_from(["smooth", "peaked", "dyadic"]),
    tau_q=st.sampled_from([0.0, 0.3, 0.5, 1.0]), tau_kv=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    allow=st.booleans(), seed=st.integers(0, 2**31),
)
def test_flashomni_symbols_match_golden(impl, B, H, nQ, nK, mode, n_text, where, style, tau_q, tau_kv, allow, seed):
    if mode != MODES["cross"]:
        nK = nQ  # joint and self sites: one grid (block_q == block_kv)
    scores, square = make_scores(B, H, nQ, nK, seed, style)
    if mode != MODES["cross"]:
        square = scores
    qt = text_mask(nQ, n_text if mode != MODES["cross"] else min(n_text, 1), where)
    kt = qt.clone() if mode != MODES["cross"] else torch.zeros(nK, dtype=torch.bool)
    out = run(impl, scores, square, qt, kt, mode, tau_q, tau_kv, allow)
    check_against_golden(out, scores, square, qt, kt, mode, tau_q, tau_kv, allow)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode, nQ, nK, n_text", [(0, 36, 36, 4), (0, 33, 66, 3), (1, 45, 45, 0), (2, 37, 5, 0)])
def test_flashomni_symbols_decide_nearly_everything_exactly(impl, mode, nQ, nK, n_text):
    """On smooth scores the boundary cases are rare: at least 95 % of the rows are compared exactly, and the
    decision is not trivial (some blocks reused, some skipped). Joint mode with a (block_q, 2·block_q) grid
    reads the square scores for reuse and the others for skipping."""
    scores, square = make_scores(2, 3, nQ, nK, nQ * nK, "smooth")
    if mode == MODES["self"] or nQ == nK:
        square = scores
    qt = text_mask(nQ, n_text, "first")
    if mode == MODES["cross"]:
        kt = torch.zeros(nK, dtype=torch.bool)
    else:
        kt = text_mask(nK, -(-n_text * nK // nQ) if n_text else 0, "first")
    out = run(impl, scores, square, qt, kt, mode, 0.5, 0.3, True)
    check_against_golden(out, scores, square, qt, kt, mode, 0.5, 0.3, True, min_certain=0.95)
    assert 0 < out[0].float().mean() < 1 and out[1].any()


@pytest.mark.parametrize("where", ["none", "last"])
def test_kernels_equal_reference_bit_for_bit_on_exact_sums(where):
    """Small multiples of a power of two sum exactly in any order, so nothing is left to rounding: all six
    outputs agree exactly (ties included, broken by index as a stable sort does)."""
    scores, _ = make_scores(2, 2, 29, 29, 7, "dyadic")
    qt = text_mask(29, 3 if where == "last" else 0, where)
    a = run("triton", scores, scores, qt, qt.clone(), MODES["self"], 0.5, 0.4, True)
    b = run("reference", scores, scores, qt, qt.clone(), MODES["self"], 0.5, 0.4, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[0].any() and a[1].any()


def test_nan_scores_keep_the_contract_and_stay_in_their_rows():
    """NaN in some blocks' scores (a NaN query or key upstream): no crash, the contract holds, NaN blocks
    are never skipped, and rows without NaN decide as the reference does where both are certain."""
    scores, _ = make_scores(1, 2, 20, 20, 3, "smooth")
    scores[0, 0, 5, 7] = float("nan")
    scores[0, 1, 11, :] = float("nan")
    qt = text_mask(20, 2, "first")
    for impl in IMPLS:
        out = run(impl, scores, scores, qt, qt.clone(), MODES["self"], 0.5, 0.3, True)
        reuse, skip = out[0], out[1]
        assert not skip[torch.isnan(scores)].any()
        rows = check_against_golden(out, scores, scores, qt, qt.clone(), MODES["self"], 0.5, 0.3, True)
        assert rows.sum() == 0  # a NaN score makes its head's metric total NaN: nothing is reused
        assert not reuse.any() and not skip[0, 1, 11].any()


@pytest.mark.parametrize("kind, n_text", [("joint", 3), ("joint", 0), ("self", 0), ("cross", 0), ("joint", 9)])
def test_fused_policy_symbols_equal_the_generic_path(kind, n_text):
    """``policy_symbols(FlashOmni())`` takes the fused op; the generic path (call, finalize, pack, decode)
    makes the same symbols, and ``finalize`` is the identity on the decision (the contract holds by
    construction, which is why the fused path skips it). A subclass overriding ``__call__`` is not fused."""
    inp = small_policy_input(kind, n_text, 11, short_q=3, short_kv=5)
    cfg = OmniConfig(policy=FlashOmni(tau_q=0.5, tau_kv=0.3))
    r, s = flashomni(inp, cfg)
    if n_text < 9:  # (all text: nothing to reuse or skip) the decision is not trivial
        assert s.any() and (r.any() or kind == "cross")
    fr, fs = finalize(FlashOmni(), inp, r, s)
    assert torch.equal(fr, r) and torch.equal(fs, s)
    for allow in (True, False):
        generic = Symbols.from_dense(torch.zeros_like(r) if not allow else r, s, 16, 16, inp.seq_q, inp.seq_kv)
        for impl in IMPLS:
            with kernel_backend(impl):
                sym = policy_symbols(FlashOmni(), inp, cfg, allow)
            assert sym == generic
            assert all(torch.equal(a, b) for a, b in zip(sym.kv_schedule(), generic.kv_schedule()))
            assert all(torch.equal(a, b) for a, b in zip(sym.to_dense(), generic.to_dense()))

    class Mine(FlashOmni):
        def __call__(self, inp, config):
            return r, torch.zeros_like(s)

    assert Mine().symbols(inp, cfg) is None
    assert not policy_symbols(Mine(), inp, cfg).to_dense()[1].any()


def test_flashomni_symbols_rejects_bad_input_and_passes_opcheck():
    scores, _ = make_scores(1, 2, 6, 6, 0, "smooth")
    qt = text_mask(6, 1, "first")
    with pytest.raises(ValueError, match="mode must be one of"):
        flashomni_symbols(scores, scores, qt, qt, 3, 0.5, 0.1)
    with pytest.raises(ValueError, match="read the square scores"):
        flashomni_symbols(scores, None, qt, qt, MODES["joint"], 0.5, 0.1)
    with pytest.raises(ValueError, match="q_text must be a bool tensor of shape"):
        flashomni_symbols(scores, scores, qt[:5], qt, MODES["joint"], 0.5, 0.1)
    with pytest.raises(ValueError, match="scores must be a"):
        flashomni_symbols(scores.double(), scores, qt, qt, MODES["joint"], 0.5, 0.1)
    for impl in IMPLS:
        with kernel_backend(impl):
            torch.library.opcheck(flashomni_symbols_op, (scores, scores, qt, qt, MODES["joint"], 0.5, 0.2, True))
            torch.library.opcheck(flashomni_symbols_op, (scores[..., :4], scores[..., :4], qt, qt[:4],
                                                         MODES["cross"], 0.5, 0.2, False))


def test_rows_past_the_kernels_limit_take_the_reference(monkeypatch):
    """Rows longer than ``_MAX_ROW`` blocks (a program holds whole rows) run the PyTorch reference, with
    the same outputs; the kernels are not launched."""
    from omni_compile.ops import flashomni_policy as fp

    scores, _ = make_scores(1, 2, 12, 12, 5, "dyadic")  # exact sums: the two paths agree on any machine
    qt = text_mask(12, 2, "first")
    want = run("triton", scores, scores, qt, qt.clone(), MODES["joint"], 0.5, 0.3, True)
    monkeypatch.setattr(fp, "_MAX_ROW", 11)
    monkeypatch.setattr(fp, "_launch_flashomni_symbols", lambda *a: pytest.fail("launched past the limit"))
    got = run("triton", scores, scores, qt, qt.clone(), MODES["joint"], 0.5, 0.3, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("kind, n_text", [("joint", 3), ("self", 0), ("cross", 0)])
def test_topk_mass_mode_takes_the_fused_skip_kernel(kind, n_text):
    """``TopK(mass=m)`` is the flashomni skip tail with budget ``1 - m`` and nothing reused, so its
    ``symbols`` runs the fused op (without the reuse kernel): the same symbols as its own bits give, on the
    reference and in the kernels. ``k`` mode keeps its PyTorch path."""
    from omni_compile.policies import TopK
    from omni_compile.policies.base import symbols_from_call

    inp = small_policy_input(kind, n_text, 13)
    for mass in (0.7, 1.0):
        want = symbols_from_call(TopK(mass=mass), inp, CFG)
        for impl in IMPLS:
            with kernel_backend(impl):
                got = policy_symbols(TopK(mass=mass), inp, CFG)
            assert got == want and got._kv_schedule is not None
            assert all(torch.equal(a, b) for a, b in zip(got.kv_schedule(), want.kv_schedule()))
        assert want.reuse_fraction() == 0 and (want.density() < 1) == (mass < 1)
    assert TopK(k=2).symbols(inp, CFG) is None
