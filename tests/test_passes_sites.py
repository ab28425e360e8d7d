"""The passes on hand-written attention modules: why a site stays dense, when GEMM-Q/GEMM-O are
refused, and the layout tracker's rules (no diffusers, so these run in a few seconds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omni_compile import OmniConfig, OmniState
from omni_compile.passes import _layout as L


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


class Attn(nn.Module):
    """Plain self-attention with switches for the unsupported variants."""

    def __init__(self, dim=32, heads=2, variant="plain"):
        super().__init__()
        self.h, self.variant = heads, variant
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_all = nn.RMSNorm(dim)

    @staticmethod
    def freqs(S, n):
        return torch.arange(S)[:, None] * (1.0 / 100 ** (torch.arange(n) / n))

    def forward(self, x, mask=None):
        B, S, C = x.shape
        q = self.to_q(x)
        if self.variant == "norm_all_heads":
            q = self.norm_all(q)
        split = lambda t: t.view(B, S, self.h, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(self.to_k(x)), split(self.to_v(x))
        kw = {}
        if self.variant == "causal":
            kw["is_causal"] = True
        if self.variant == "dropout":
            kw["dropout_p"] = 0.1
        if self.variant == "mean_over_tokens":
            q = q - q.mean(dim=2, keepdim=True)
        if self.variant == "rotate_half":  # diffusers' apply_rotary_emb(use_real_unbind_dim=-2)
            re, im = q.reshape(*q.shape[:-1], 2, -1).unbind(-2)
            rotated = torch.cat([-im, re], dim=-1)
            cos, sin = torch.cos(self.freqs(S, q.shape[-1])), torch.sin(self.freqs(S, q.shape[-1]))
            q = (q.float() * cos + rotated.float() * sin).to(q.dtype)
        if self.variant == "complex_rope":  # Lumina / Qwen-Image / Z-Image: view_as_complex, then view_as_real
            freqs = torch.polar(torch.ones(S, q.shape[-1] // 2), self.freqs(S, q.shape[-1] // 2))
            qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
            q = torch.view_as_real(qc * freqs).flatten(3).type_as(q)
        if self.variant == "complex_across_heads":  # pairs two heads' values: not inside a head
            qc = torch.view_as_complex(q.float().transpose(1, 3).contiguous())
            q = torch.view_as_real(qc).transpose(1, 3).type_as(q)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        o = o.transpose(1, 2).reshape(B, S, C)
        y = self.to_out(o)
        if self.variant == "out_leak":
            y = y + o.sum(-1, keepdim=True)
        return y


def _compile(model, *args):
    st = OmniState(OmniConfig(use_inductor=False, block_q=16, block_kv=16))
    with torch.no_grad():
        out = torch.compile(model, backend="flashomni", options={"state": st})(*args)
    return st, out


@pytest.mark.parametrize(
    "variant, dtype, reason",
    [
        ("causal", torch.float32, "causal attention is not supported"),
        ("dropout", torch.float32, "dropout is not supported"),
        ("plain", torch.float64, "dtype torch.float64 is not supported"),
    ],
)
def test_unsupported_sites_stay_dense(variant, dtype, reason):
    model = Attn(variant=variant).to(dtype).eval()
    if variant == "dropout":
        model.train()
    x = torch.randn(2, 24, 32, dtype=dtype)
    st, _ = _compile(model, x)
    (site,) = st.sites
    assert not site.rewritten and reason in site.reason and site.calls == 0


def test_masks_with_a_query_axis_are_rewritten_and_run_exactly():
    model = Attn().eval()
    x = torch.randn(2, 24, 32)
    # no row class holds most rows: the runtime runs SDPA with the mask as given
    full = torch.rand(2, 2, 24, 24, generator=torch.Generator().manual_seed(0)) > 0.3
    st, out = _compile(model, x, full)
    (site,) = st.sites
    assert site.rewritten and site.mask == "rows" and site.fallbacks == 1
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, full), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    # an outer product of token validity: factored (valid rows through the ops, pad rows by SDPA)
    valid = torch.arange(24) < torch.tensor([[20], [17]])
    outer = valid[:, None, :, None] & valid[:, None, None, :]
    st, out = _compile(model, x, outer)
    (site,) = st.sites
    assert site.rewritten and site.mask == "rows" and site.fallbacks == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, outer), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    kp = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    kp[0, ..., 20:] = False
    kp[1, ..., 17:] = False
    st, out = _compile(model, x, kp)
    (site,) = st.sites
    assert site.rewritten and site.mask == "key_padding" and site.fallbacks == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, kp), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "variant, q_ok, o_ok, why",
    [
        ("plain", True, True, None),
        ("norm_all_heads", True, True, "spans heads"),  # token-local: GEMM-Q on blocks every head reuses
        ("mean_over_tokens", False, True, "reduces over tokens"),
        ("out_leak", True, False, "reduces over tokens or heads"),
        ("rotate_half", True, True, None),
        ("complex_rope", True, True, None),
        ("complex_across_heads", False, True, "not inside a head"),
    ],
)
def test_gemm_validity(variant, q_ok, o_ok, why):
    model = Attn(variant=variant).eval()
    x = torch.randn(1, 24, 32)
    st, out = _compile(model, x)
    (site,) = st.sites
    assert site.rewritten and site.gemm_q == q_ok and site.gemm_o == o_ok
    if why:
        assert why in (site.gemm_q_reason if not q_ok else site.q_mixes_heads if o_ok else site.gemm_o_reason)
    assert (site.q_mixes_heads is not None) == (variant == "norm_all_heads")
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def test_layout_regroup_and_rules():
    lay = ((L.Atom("B", 2),), (L.s_atom("q", 0, 24),), (L.h_atom(4), L.Atom("D", 16)))
    # unflatten heads, then RoPE-style split of D into (8, 2): tokens and heads stay intact
    u = L.regroup(lay, (2, 24, 4, 16), "t")
    assert u[2] == (L.h_atom(4),)
    r = L.regroup(u, (2, 24, 4, 8, 2), "t")
    assert r[2] == (L.h_atom(4),) and r[1] == (L.s_atom("q", 0, 24),)
    # splitting the heads axis into (2, 32) mixes heads with the head dim; re-merging restores it
    m = L.regroup(lay, (2, 24, 2, 32), "t")
    assert m[2] == (L.h_atom(2, 2),) and L.regroup(m, (2, 24, 64), "t") == L.regroup(lay, (2, 24, 64), "t")
    with pytest.raises(L.NotLocal, match="splits the token axis"):
        L.regroup(lay, (2, 4, 6, 64), "t")
    # token concatenation and slicing back
    cat = L.concat_parts([(L.s_atom("txt", 0, 8),), (L.s_atom("img", 0, 16),)])
    assert L.slice_group(cat, 8, 24, "t") == (L.s_atom("img", 0, 16),)
    assert L.slice_group(cat, 0, 8, "t") == (L.s_atom("txt", 0, 8),)


def test_layout_within_head_concatenation_and_token_local_mixing():
    # rotate-half RoPE: two halves of one head's features concatenate into a plain within-head axis
    half = L.concat_parts([(L.Atom("D", 8),), (L.Atom("D", 8),)])
    assert half == (L.Atom("D", 16),)
    assert L.signature(half) == L.signature((L.Atom("D", 16),))
    # heads or tokens concatenated stay a CAT, which a reshape may not split
    heads = L.concat_parts([(L.h_atom(2), L.Atom("D", 8)), (L.h_atom(2), L.Atom("D", 8))])
    assert heads[0].kind == "CAT"
    # a norm over all heads of a token: refused, or recorded as token-local when the caller accepts it
    g = torch.fx.Graph()
    x = g.placeholder("x")
    n = g.call_function(F.rms_norm, (x, [32]))
    n.meta["example_value"] = torch.empty(1, 24, 32)
    lay = {x: ((L.Atom("B", 1),), (L.s_atom("q", 0, 24),), (L.h_atom(2), L.Atom("D", 16)))}
    with pytest.raises(L.NotLocal, match="spans heads"):
        L.propagate(n, lay)
    mixing = []
    assert L.propagate(n, lay, mixing) == lay[x] and mixing == ["rms_norm over 32 features spans heads (not per-head)"]
    # a reduction over tokens is never local, with or without the list
    m = g.call_method("mean", (x, 1))
    m.meta["example_value"] = torch.empty(1, 32)
    with pytest.raises(L.NotLocal, match="reduces over tokens"):
        L.propagate(m, lay, [])


class FusedAttn(nn.Module):
    """q, k, v (and an MLP input) from one linear, picked by views, in the forms diffusers uses."""

    def __init__(self, dim=32, heads=2, variant="qkv_mlp"):
        super().__init__()
        self.h, self.d, self.variant = heads, dim // heads, variant
        self.fused = nn.Linear(dim, 3 * dim + (2 * dim if variant == "qkv_mlp" else 0))
        self.norm_q = nn.RMSNorm(dim // heads)
        self.to_out = nn.Linear(dim, dim)
        self.mlp_out = nn.Linear(2 * dim, dim)

    def forward(self, x):
        B, S, C = x.shape
        y = self.fused(x)
        extra = 0
        if self.variant == "qkv_mlp":  # FLUX.2: split [qkv | mlp], chunk(3), unflatten heads
            qkv, mlp = torch.split(y, [3 * C, 2 * C], dim=-1)
            q, k, v = (t.unflatten(-1, (self.h, self.d)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
            extra = self.mlp_out(F.gelu(mlp))
        elif self.variant == "qkv_permute":  # PRX: reshape (3, H, D), permute, index
            qkv = y.reshape(B, S, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.variant == "kqv":  # q's columns in the middle
            k, q, v = (t.unflatten(-1, (self.h, self.d)).transpose(1, 2) for t in y.chunk(3, dim=-1))
        elif self.variant == "whole_read":  # something reads every column, q's included
            q, k, v = (t.unflatten(-1, (self.h, self.d)).transpose(1, 2) for t in y.chunk(3, dim=-1))
            extra = y.mean(-1, keepdim=True)
        elif self.variant == "q_peek":  # a view of some of q's columns read apart from q
            q, k, v = (t.unflatten(-1, (self.h, self.d)).transpose(1, 2) for t in y.chunk(3, dim=-1))
            extra = y[..., : self.d].mean(-1, keepdim=True)
        q = self.norm_q(q)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, C)
        return self.to_out(o) + extra


@pytest.mark.parametrize("variant, ok, why", [
    ("qkv_mlp", True, None), ("qkv_permute", True, None),
    ("kqv", False, "lie inside"), ("whole_read", False, "not only through views"),
    ("q_peek", False, "reads q's columns"),
])
def test_fused_projections_give_gemm_q_and_split_exactly(variant, ok, why):
    from omni_compile import passes as P
    from omni_compile.passes import _fused

    model = FusedAttn(variant=variant).eval()
    x = torch.randn(2, 24, 32)
    found = []

    def backend(gm, example_inputs):
        (site,) = P.find_sites(gm)
        projs, valid, reason, _ = P.walk_q(site.q, site.heads, site.head_dim, site.seq_q)
        found.append((projs, valid, reason))
        if valid:
            (proj,) = projs
            assert proj.fused is not None and proj.row_offset == 0 and proj.fused.col_offset == 0
            n_linears = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in P._fx.LINEAR_TARGETS)
            q_lin = _fused.split_fused(gm, proj.fused, site.heads, site.head_dim)
            gm.graph.lint()
            gm.recompile()
            linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in P._fx.LINEAR_TARGETS]
            assert q_lin in linears and len(linears) == n_linears + 1  # the fused linear became two
            assert P._fx.static_shape(q_lin)[-1] == 32
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)  # the split changes no value
    ((projs, valid, reason),) = found
    assert valid == ok
    if why:
        assert why in reason


def test_graph_break_reads_where_dynamo_stopped():
    """The backend warns about a graph break inside attention code from the reason Dynamo attaches to the
    graph module; breaks elsewhere are recorded without the warning."""
    import traceback
    from types import SimpleNamespace

    from omni_compile.passes import graph_break

    def frames(*where):
        return [traceback.FrameSummary(f"/x/diffusers/models/{f}", line, fn) for f, line, fn in where]

    gm = SimpleNamespace()
    assert graph_break(gm) is None
    gm.compile_subgraph_reason = SimpleNamespace(graph_break=False, reason="return_value", user_stack=[])
    assert graph_break(gm) is None
    gm.compile_subgraph_reason = SimpleNamespace(
        graph_break=True, reason="Dynamic shape operator\n  Explanation: ...",
        user_stack=frames(("transformers/transformer_mochi.py", 219, "forward"), ("attention_processor.py", 1068, "__call__")))
    assert graph_break(gm) == {"reason": "Dynamic shape operator", "where": "attention_processor.py:1068 (__call__)",
                               "in_attention": True}
    gm.compile_subgraph_reason = SimpleNamespace(
        graph_break=True, reason="Data dependent operator",
        user_stack=frames(("transformers/transformer_lumina2.py", 273, "forward")))
    assert graph_break(gm)["in_attention"] is False
