"""``torch.library.opcheck`` on the site ops the passes rewrite into (``omni_compile.runtime``).

They are defined from schemas with one Python kernel (``runtime._SiteOp``), so nothing checks their
schema, fake kernels or aliasing at call time: opcheck does, on a site registered by hand, under
``policy="dense"`` (deterministic: the same inputs give the same output on every call). The clock is
stateful by design (each call advances it), so only its schema and fake kernel are checked.
"""

from __future__ import annotations

import pytest
import torch

from omni_compile import OmniConfig, OmniState
from omni_compile import runtime  # noqa: F401  (registers the ops)
from omni_compile.state import SitePlan

B, H, S, D, C = 1, 2, 40, 16, 24


@pytest.fixture()
def site():
    st = OmniState(OmniConfig(policy="dense", block_q=16, block_kv=16))
    plan = st.register(SitePlan(name="blocks.0.attn", kind="joint", rewritten=True, gemm_q=True, gemm_o=True,
                                segments=[("text", 0, 8), ("vision", 8, S)], kv_segments=[("text", 0, 8), ("vision", 8, S)],
                                batch=B, heads=H, head_dim=D, seq_q=S, seq_kv=S))
    return st, plan


def test_site_ops_pass_opcheck(site):
    st, rec = site
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[..., -5:] = False
    clock = torch.tensor([0, 0, 0])
    ops = torch.ops.flashomni
    for m in (None, mask):
        torch.library.opcheck(ops.site_attention.default, (q, k, v, m, st.id, rec.plan_id, 0.3, clock))
    x = torch.randn(B, S, C, generator=g)
    wq, bq = torch.randn(H * D, C, generator=g), torch.randn(H * D, generator=g)
    torch.library.opcheck(ops.site_linear_q.default, (x, wq, bq, st.id, rec.plan_id, 0, S, D, clock))
    a = torch.randn(B, S, H * D, generator=g)
    wo = torch.randn(C, H * D + 8, generator=g)  # a wider weight: the site's heads are columns 4 .. 4 + H*D
    torch.library.opcheck(ops.site_linear_o.default, (a, wo, None, st.id, rec.plan_id, 0, 4, S, D, clock))
    torch.library.opcheck(ops.step_clock.default, (torch.tensor([500.0]), st.id),
                          test_utils=("test_schema", "test_faketensor"))


def test_site_ops_return_fresh_tensors(site):
    """The schemas promise no aliasing: an output is never an input or a view of one. The attention output
    has the heads-inner strides the fake kernel reports, whatever layout q comes in."""
    st, rec = site
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    out = torch.ops.flashomni.site_attention.default(q, k, v, None, st.id, rec.plan_id, None, None)
    assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (q, k, v))
    assert out.stride() == (S * H * D, D, H * D, 1)
    q_inner, k_inner, v_inner = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out2 = torch.ops.flashomni.site_attention.default(q_inner, k_inner, v_inner, None, st.id, rec.plan_id, None, None)
    assert out2.stride() == out.stride() and torch.allclose(out2, out)
    x, w = torch.randn(B, S, C), torch.randn(H * D, C)
    y = torch.ops.flashomni.site_linear_q.default(x, w, None, st.id, rec.plan_id, 0, S, D, None)
    assert y.untyped_storage().data_ptr() not in (x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr())
