"""What an update step costs the host per attention site (docs/design.md, "Pooled scores and the update
step"): the ops it dispatches,
counted on the CPU as ``tools/update_ops.py`` counts them, and the exactness of the shorter formulas that
brought the count down."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_compile.policies import BasePolicy, Fixed, PolicyInput, block_text_mask, finalize

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

_TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "update_ops.py")


def _update_ops():
    spec = importlib.util.spec_from_file_location("update_ops", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Unmemoised(Fixed):
    """``fixed``'s bits through the path every other policy takes (call, finalize, pack, decode): a
    subclass that overrides ``__call__`` gets no memoised symbols."""

    def __call__(self, inp, config):
        return super().__call__(inp, config)


def _count(**config):
    torch._dynamo.reset()
    res, state = _update_ops().measure(layers=1, single=2, repeats=0, **config)
    torch._dynamo.reset()
    return res, state


@pytest.fixture(scope="module")
def counted():
    """Per-site counts of the tiny FLUX (1 double-stream + 2 single-stream blocks) at the benchmark's
    aggressive fixed setting: steps 0 (dense), 5 (update), 6 (dispatch)."""
    return _count()


@pytest.fixture(scope="module")
def counted_generic():
    """The same with ``fixed``'s bits through the generic path (no memoised symbols)."""
    return _count(policy=_Unmemoised())


def test_update_step_launches_at_most_41_ops_per_site(counted_generic):
    """The update step takes 40.3 launches per site on the path every policy without its own ``symbols``
    takes (each op implementation one launch, as on a GPU; the dense step's SDPA and F.linear one each):
    41 catches one op more per site."""
    res, state = counted_generic
    assert len(state.sites) == 3
    up = res["update"]
    assert up["gpu"] <= 41, up["gpu_by_op"]
    # the small ops around the kernels in the attention site (policy bits, packing, schedule decode)
    assert up["gpu_by_op"]["site_attention"] <= 30, sorted(up["names"].items())
    # the kernels themselves: dense attention, q and o projections, two cache-bias GEMMs (Taylor order 1) and
    # a refresh per biased projection, and a compaction per schedule (kv + GEMM-O heads + cache-bias heads)
    assert up["gpu_by_op"]["_dense_attention"] == 1
    assert up["gpu_by_op"]["selected_first"] <= 10 / 3
    for act in ("dense", "dispatch"):  # nothing of the update's work leaks into the other steps
        assert res[act]["gpu"] <= 4.5, (act, res[act]["gpu_by_op"])


def test_fixed_update_steps_make_no_symbols_again(counted, counted_generic):
    """With ``fixed``'s memoised symbols an update step after the first launches only its
    kernels: 7.7 ops a site against 40.3; the attention site itself none (no policy, finalize, packing or
    schedule decoding). Dense and dispatch steps are unchanged."""
    res, _ = counted
    assert res["update"]["gpu"] <= 9, res["update"]["gpu_by_op"]
    assert res["update"]["gpu_by_op"].get("site_attention", 0) == 0
    assert "selected_first" not in res["update"]["gpu_by_op"]
    for act in ("dense", "dispatch"):
        assert res[act]["gpu"] == counted_generic[0][act]["gpu"]


def test_flashomni_update_on_the_triton_path_launches_only_kernels():
    """The default policy's update step as CUDA runs it (the ops' Triton paths, in the interpreter): the
    kernels alone, ~12 launches a site (dense attention, the projections, the Taylor refresh and cache
    biases, pooled scores, the fused policy op, one launch per GEMM schedule read from the bits). None of
    the small ops that would build each schedule's mask (20.3 a site on this model with them), and no
    host-device traffic."""
    torch._dynamo.reset()
    res, state = _update_ops().measure(layers=1, single=2, repeats=0, backend="triton", policy="flashomni")
    torch._dynamo.reset()
    up = res["update"]
    assert up["gpu"] <= 12.5, up["gpu_by_op"]
    assert "site_attention" not in up["gpu_by_op"] and "selected_first" not in up["gpu_by_op"], up["gpu_by_op"]
    assert up["gpu_by_op"]["_flashomni_symbols_impl"] == 1 and up["gpu_by_op"]["slice_head_schedule"] >= 1
    for act in ("update", "dense", "dispatch"):
        assert res[act]["suspects"] == {}, (act, res[act]["suspects"])
    assert res["dispatch"]["gpu"] <= 4.5, res["dispatch"]["gpu_by_op"]


def test_update_step_copies_nothing_between_host_and_device(counted, counted_generic):
    """No op on any step of the loop builds a tensor from host values, reads one back or sizes an output
    by its data (each a host-device copy or a sync on CUDA)."""
    for res, _ in (counted, counted_generic):
        for act in ("update", "dense", "dispatch"):
            assert res[act]["suspects"] == {}, (act, res[act]["suspects"])


# ---- the shorter formulas are the old ones ---------------------------------------------------------


def _old_finalize(reuse, skip, inp: PolicyInput, reuses_text: bool):
    """finalize and keep_one_key in their longer form (a zero fill, a scatter, a negation, an and): the
    reference the shorter formulas must equal."""
    nQ, nK = inp.num_q_blocks, inp.num_kv_blocks
    B, H = inp.batch, inp.heads
    if not reuses_text:
        reuse = reuse & ~inp.q_text.view(1, 1, nQ)
    skip = skip & ~reuse.unsqueeze(-1)
    empty = skip.all(-1) & ~reuse
    if inp.scores is not None:
        pick = inp.scores.argmax(-1)
    else:
        pick = (torch.zeros(nQ, dtype=torch.long) if inp.kind == "cross"
                else (torch.arange(nQ) * inp.block_q // inp.block_kv).clamp_max(nK - 1)).view(1, 1, nQ).expand(B, H, nQ)
    unskip = torch.zeros_like(skip).scatter(-1, pick.unsqueeze(-1), empty.unsqueeze(-1))
    return reuse, skip & ~unskip


@settings(deadline=None, max_examples=60)
@given(seq=st.integers(8, 120), text=st.integers(0, 40), bq=st.sampled_from([16, 32]), bkv=st.sampled_from([16, 32]),
       kind=st.sampled_from(["joint", "self", "cross"]), with_scores=st.booleans(), reuses_text=st.booleans(),
       p_reuse=st.sampled_from([0.0, 0.5, 1.0]), p_skip=st.sampled_from([0.0, 0.7, 1.0]), seed=st.integers(0, 2**31))
def test_finalize_equals_the_old_formula(seq, text, bq, bkv, kind, with_scores, reuses_text, p_reuse, p_skip, seed):
    text = min(text, seq)
    segs = [s for s in (("text", 0, text), ("vision", text, seq)) if s[2] > s[1]]
    q_text, kv_text = block_text_mask(segs, seq, bq), block_text_mask(segs, seq, bkv)
    nQ, nK = q_text.numel(), kv_text.numel()
    B, H = 2, 3
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(B, H, nQ, nK, generator=g), -1) if with_scores else None
    inp = PolicyInput(scores=scores, scores_square=None, kind=kind, q_text=q_text, kv_text=kv_text, batch=B, heads=H,
                      seq_q=seq, seq_kv=seq, block_q=bq, block_kv=bkv)
    reuse = torch.rand(B, H, nQ, generator=g) < p_reuse
    skip = torch.rand(B, H, nQ, nK, generator=g) < p_skip

    class P(BasePolicy):
        name = "p"

        def __call__(self, inp, config):  # pragma: no cover - finalize is called directly
            return reuse, skip

    P.reuses_text = reuses_text
    got = finalize(P(), inp, reuse, skip)
    want = _old_finalize(reuse, skip, inp, reuses_text)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (~got[1] | got[0].unsqueeze(-1)).any(-1).all()  # every computed row keeps a key block


def test_fixed_loop_output_unchanged_by_the_host_work_cuts():
    """The loop's output with the boolean-identity formulas of finalize and the kv mask equals the one computed
    with the reference formulas patched back in (bit for bit: only boolean identities changed)."""
    import omni_compile.policies.base as base
    from omni_compile.ops import symbols as sy

    from _runtime_helpers import compile_with, denoise, make_state, tiny_flux_case

    model, make_inputs, lat = tiny_flux_case(single_layers=1)
    kw = dict(policy=Fixed(reuse=0.5, skip=0.8), warmup=2, interval=3)
    new = denoise(compile_with(model, make_state(**kw)), make_inputs, lat, 7)
    torch._dynamo.reset()

    def old_finalize(policy, inp, reuse, skip):
        return _old_finalize(reuse, skip, inp, getattr(policy, "reuses_text", False))

    old_kv = sy.Symbols.kv_schedule

    def kv_schedule(self):
        if self._kv_schedule is None:
            reuse, skip = self.to_dense()
            self._kv_schedule = sy.selected_first(~skip & ~reuse.unsqueeze(-1))
        return self._kv_schedule

    saved = base.finalize
    import omni_compile.policies as pol

    try:
        base.finalize = pol.finalize = old_finalize
        sy.Symbols.kv_schedule = kv_schedule
        old = denoise(compile_with(model, make_state(**kw)), make_inputs, lat, 7)
    finally:
        base.finalize = pol.finalize = saved
        sy.Symbols.kv_schedule = old_kv
    assert torch.equal(new, old)


def test_calls_by_caller_names_the_ops_that_issued_them():
    from types import SimpleNamespace as E

    from omni_compile.bench.e2e import calls_by_caller

    top = E(name="flashomni::site_attention", cpu_parent=None)
    mid = E(name="aten::copy_", cpu_parent=E(name="aten::_to_copy", cpu_parent=top))
    evs = [E(name="cudaMemcpyAsync", cpu_parent=mid), E(name="cudaMemcpyAsync", cpu_parent=mid),
           E(name="cudaMemcpyAsync", cpu_parent=None), E(name="cudaLaunchKernel", cpu_parent=mid)]
    assert calls_by_caller(evs) == {"aten::copy_ < aten::_to_copy < flashomni::site_attention": 2, "(top level)": 1}
