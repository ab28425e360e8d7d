"""The flashomni backend on tiny diffusers transformers of every supported family (CPU, random weights).

Per family: sites found == attention calls made in eager; rewritten / GEMM-Q / GEMM-O counts exact;
every dense-left site's reason checked; ``policy="dense"`` output == eager; new inputs on the 2nd and 3rd
call do not recompile. Most tests skip Inductor (``use_inductor=False``: the rewritten FX graph runs as
is); ``test_inductor_end_to_end`` compiles one model with Inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import omni_compile
from omni_compile import OmniConfig, OmniState

import _tiny_models as T
from _coverage import CountSDPA

# family: (sites, rewritten, GEMM-Q, GEMM-O, {kind: rewritten count}, {site: dense reason substring},
#          {site: no-GEMM-Q reason substring})
EXPECTED = {
    "flux": (3, 3, 3, 3, {"joint": 3}, {}, {}),
    "sd3": (3, 3, 3, 3, {"joint": 2, "self": 1}, {}, {}),
    # the token refiner's mask is q_valid x k_valid with key 0 kept: factored at run time (omni_compile.masks)
    "hunyuan": (3, 3, 3, 3, {"joint": 2, "self": 1}, {}, {}),
    # Wan and LTX normalise q over all heads: GEMM-Q on the query blocks every head reuses
    "wan": (4, 4, 4, 4, {"self": 2, "cross": 2}, {}, {}),
    "cogvideox": (2, 2, 2, 2, {"joint": 2}, {}, {}),
    "pixart": (4, 4, 4, 4, {"self": 2, "cross": 2}, {}, {}),
    "dit": (2, 2, 2, 2, {"self": 2}, {}, {}),
    "ltx": (2, 2, 2, 2, {"self": 1, "cross": 1}, {}, {}),
}

# text/vision split of one joint site per family: (site, segments)
JOINT_SPLIT = {
    "flux": ("transformer_blocks.0.attn", [("text", 0, 8), ("vision", 8, 24)]),
    "sd3": ("transformer_blocks.0.attn", [("vision", 0, 16), ("text", 16, 24)]),
    "hunyuan": ("single_transformer_blocks.0.attn", [("vision", 0, 32), ("text", 32, 40)]),
    "cogvideox": ("transformer_blocks.0.attn1", [("text", 0, 8), ("vision", 8, 56)]),
}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.mark.parametrize("family", T.FAMILIES)
def test_family_coverage_and_dense_equivalence(family):
    n_sites, n_rw, n_q, n_o, kinds, dense_reasons, noq_reasons = EXPECTED[family]
    model, make_inputs = T.build(family, batch=2)
    with torch.no_grad(), CountSDPA() as counter:
        ref = [_first(model(**make_inputs(s))) for s in range(3)]
    assert counter.calls == 3 * n_sites  # sanity: eager makes n_sites attention calls per forward

    state = OmniState(OmniConfig(policy="dense", use_inductor=False, block_q=16, block_kv=16))
    compiled = torch.compile(model, backend="flashomni", options={"state": state})
    with torch.no_grad():
        out0 = _first(compiled(**make_inputs(0)))
        with torch.compiler.set_stance("fail_on_recompile"):  # new inputs must not recompile
            out1 = _first(compiled(**make_inputs(1)))
            out2 = _first(compiled(**make_inputs(2)))

    assert omni_compile.last_state() is state
    sites = state.sites
    assert len(sites) == counter.calls // 3 == n_sites
    assert sum(s.rewritten for s in sites) == n_rw
    assert sum(s.gemm_q for s in sites) == n_q
    assert sum(s.gemm_o for s in sites) == n_o
    got_kinds = {}
    for s in sites:
        if s.rewritten:
            got_kinds[s.kind] = got_kinds.get(s.kind, 0) + 1
    assert got_kinds == kinds
    for s in sites:
        if s.rewritten:
            assert s.reason is None
            assert s.calls == 3  # every forward ran through the site op
            assert s.fallbacks == 0  # key-padding masks were applied by dropping keys, not by SDPA
            assert s.linear_q_calls == (3 * len(s.q_projections) if s.gemm_q else 0)
            assert s.linear_o_calls == (3 * len(s.out_projections) if s.gemm_o else 0)
        else:
            assert s.name in dense_reasons, s
            assert dense_reasons[s.name] in s.reason
            assert s.calls == 0
        if s.rewritten and not s.gemm_q:
            assert noq_reasons[s.name] in s.gemm_q_reason
        assert (s.q_mixes_heads is not None) == (s.gemm_q and family in ("wan", "ltx"))
    assert {s.name for s in sites if not s.rewritten} == set(dense_reasons)
    assert {s.name for s in sites if s.rewritten and not s.gemm_q} == set(noq_reasons)
    if family in JOINT_SPLIT:
        name, segs = JOINT_SPLIT[family]
        assert state.site(name).segments == segs
    for s in sites:
        if s.kind == "cross":
            assert s.kv_segments == [("text", 0, s.seq_kv)]

    for r, o in zip(ref, (out0, out1, out2)):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_attention_matters_in_tiny_models():
    """Guards the test models: zeroing attention must move the output a lot (docs/design.md, "Tiny test models let attention matter")."""
    model, make_inputs = T.build("flux")
    inputs = make_inputs(0)
    with torch.no_grad():
        ref = _first(model(**inputs))

        class ZeroAttention(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                return torch.zeros_like(out) if func is F.scaled_dot_product_attention else out

        with ZeroAttention():
            zeroed = _first(model(**inputs))
    assert (zeroed - ref).norm() / ref.norm() > 0.2


def test_bf16_dense_matches_eager():
    model, make_inputs = T.build("flux")
    model = model.to(torch.bfloat16)

    def inputs(seed):
        return {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in make_inputs(seed).items()}

    state = OmniState(OmniConfig(use_inductor=False, block_q=16, block_kv=16))
    compiled = torch.compile(model, backend="flashomni", options={"state": state})
    with torch.no_grad():
        ref = _first(model(**inputs(0)))
        out = _first(compiled(**inputs(0)))
    assert sum(s.rewritten for s in state.sites) == 3
    # bf16 eager vs the ops' fp32-accumulating reference: within bf16 rounding of the activations
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)


def test_rewritten_graph_has_no_sdpa_left():
    model, make_inputs = T.build("hunyuan")
    graphs = []
    from omni_compile.backend import flashomni

    def spy(gm, example_inputs, **kw):
        fn = flashomni(gm, example_inputs, options={"use_inductor": False})
        graphs.append(gm)
        return fn

    with torch.no_grad():
        torch.compile(model, backend=spy)(**make_inputs(0))
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # every site is rewritten, the token refiner's (a query x key validity mask) included
    assert sum(t is F.scaled_dot_product_attention for t in targets) == 0
    assert sum(t is torch.ops.flashomni.site_attention.default for t in targets) == 3
    # refiner to_q, to_q, add_q_proj, single to_q
    assert sum(t is torch.ops.flashomni.site_linear_q.default for t in targets) == 4
    # refiner to_out, to_out, to_add_out, proj_out
    assert sum(t is torch.ops.flashomni.site_linear_o.default for t in targets) == 4


@pytest.mark.slow
def test_inductor_end_to_end():
    """The rewritten graph goes through Inductor (compile_fx) and still equals eager, without recompiles."""
    model, make_inputs = T.build("dit")
    state = OmniState(OmniConfig(block_q=16, block_kv=16))
    compiled = torch.compile(model, backend="flashomni", options={"state": state})
    with torch.no_grad():
        refs = [_first(model(**make_inputs(s))) for s in range(2)]
        out0 = _first(compiled(**make_inputs(0)))
        with torch.compiler.set_stance("fail_on_recompile"):
            out1 = _first(compiled(**make_inputs(1)))
    assert [s.rewritten and s.gemm_q and s.gemm_o for s in state.sites] == [True, True]
    assert all(s.calls == 2 for s in state.sites)
    torch.testing.assert_close(out0, refs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out1, refs[1], rtol=1e-4, atol=1e-4)
    (entry,) = state.compiles
    assert entry["pass_seconds"] < 0.05 * entry["compile_seconds"]  # the passes add < 5 % to compile time
