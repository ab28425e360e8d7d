"""The backend and the ops are inference-only, and say so: a graph autograd would record through is left to
Inductor (correct gradients, one warning), the public ops raise on backward, and cached Taylor factors
carry no autograd history."""

from __future__ import annotations

import warnings

import pytest
import torch

from omni_compile import taylor
from omni_compile.ops import (Symbols, cache_bias_for, kernel_backend, pooled_scores, sparse_attention,
                              sparse_linear_o, sparse_linear_q)
from omni_compile.ops.attention import sparse_attention_op
from omni_compile.ops.flashomni_policy import MODES, flashomni_symbols, flashomni_symbols_op
from omni_compile.ops.linear_o import sparse_linear_o_op
from omni_compile.ops.linear_q import sparse_linear_q_op
from omni_compile.ops.pooled import pooled_scores_op
from omni_compile.ops.taylor import taylor_refresh, taylor_refresh_op, taylor_sum, taylor_sum_op
from omni_compile.policies import Fixed

from _runtime_helpers import compile_with, make_state, tiny_flux_case

# opcheck's tests that do not run a backward (test_aot_dispatch_dynamic differentiates the op)
_NO_BACKWARD = ("test_schema", "test_autograd_registration", "test_faketensor")


# ---- the backend ----------------------------------------------------------------------------------


def _step_grads(model, make_inputs, lat, t):
    x = lat.clone().requires_grad_(True)
    out = model(**make_inputs(x, torch.tensor([t])))[0]
    out.square().sum().backward()
    attn = model.transformer_blocks[0].attn
    grads = (x.grad, attn.to_q.weight.grad, attn.to_out[0].weight.grad)
    assert all(g is not None for g in grads)
    model.zero_grad()
    return out.detach(), [g.clone() for g in grads]


def _grad_loop(compiled, model, make_inputs, lat, timesteps):
    for t in timesteps:
        got = _step_grads(compiled, make_inputs, lat, t)
        want = _step_grads(model, make_inputs, lat, t)
        for a, b in zip([got[0], *got[1]], [want[0], *want[1]]):
            # fp32 sums over a few hundred terms, fused and ordered differently by Inductor: ~100 fp32 eps
            # relative (a dropped gradient term, as through a site op, is off by percents)
            assert (a - b).norm() <= 1e-5 * b.norm()


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_graph_traced_for_autograd_is_left_dense_with_one_warning_and_gradients_match_eager():
    model, make_inputs, lat = tiny_flux_case(single_layers=1)
    st = make_state(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=3)
    compiled = compile_with(model, st)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # past the warm-up and the first update: steps 2 and 3 would be dispatch steps
        _grad_loop(compiled, model, make_inputs, lat, [1.0, 0.9, 0.8, 0.7])
    inference_only = [w for w in seen if "inference-only" in str(w.message)]
    assert len(inference_only) == 1 and "torch.no_grad()" in str(inference_only[0].message)
    assert not any(s.rewritten for s in st.sites)
    # the same compiled model under no_grad: Dynamo recompiles for the grad mode and the sites are rewritten
    with torch.no_grad():
        compiled(**make_inputs(lat, torch.tensor([0.6])))
    assert st.sites and all(s.rewritten for s in st.sites)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_gradients_through_the_backend_match_eager():
    model, make_inputs, lat = tiny_flux_case(single_layers=1)
    st = make_state(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=3, use_inductor=True)
    with pytest.warns(UserWarning, match="inference-only"):
        _grad_loop(compile_with(model, st), model, make_inputs, lat, [1.0, 0.9, 0.8])


# ---- the ops --------------------------------------------------------------------------------------


def _op_calls():
    """``(name, wrapper call, registered op, op args)`` for every public op, on inputs that require grad."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    B, H, S, D = 1, 2, 40, 16
    reuse = torch.zeros(B, H, 3, dtype=torch.bool)
    reuse[0, 1, 1] = True
    skip = torch.zeros(B, H, 3, 3, dtype=torch.bool)
    skip[0, 0, 2, 0] = True
    sym = Symbols.from_dense(reuse, skip, 16, 16, S, S)
    q, k, v = rnd(B, H, S, D), rnd(B, H, S, D), rnd(B, H, S, D)
    x, wq, bq = rnd(B, S, 24), rnd(H * D, 24), rnd(H * D)
    a, wo, bo = rnd(B, S, H * D), rnd(20, H * D), rnd(20)
    idx, cnt = sym.kv_schedule()
    hidx, hcnt = sym.head_schedule(S, 0, 16, False)
    scores = torch.softmax(rnd(B, H, 3, 3), -1)
    text = torch.tensor([True, False, False])
    f0, f1 = rnd(4, 8), rnd(4, 8)
    return [
        ("sparse_attention", lambda: sparse_attention(q, k, v, sym), sparse_attention_op,
         (q, k, v, sym.reuse_bits, sym.skip_bits, idx, cnt, 16, 16, 0.25)),
        ("sparse_linear_q", lambda: sparse_linear_q(x, wq, bq, sym, D), sparse_linear_q_op,
         (x, wq, bq, sym.reuse_bits, 16, S, D, 0)),
        ("sparse_linear_o", lambda: sparse_linear_o(a, wo, bo, sym, D, cache_bias_for(a.detach(), wo.detach(), sym, D)),
         sparse_linear_o_op, (a, wo, bo, None, sym.reuse_bits, hidx, hcnt, 16, S, D, 0, 16, False)),
        ("pooled_scores", lambda: pooled_scores(q, k, 16, 16), pooled_scores_op, (q, k, 16, 16, 0.25)),
        ("taylor_sum", lambda: taylor_sum([f0, f1], [1.0, 0.5]), taylor_sum_op, ([f0, f1], [1.0, 0.5], None)),
        ("taylor_refresh", lambda: taylor_refresh(f0, [f1], 2.0)[1], taylor_refresh_op, (f0, None, [f1], 2.0)),
        ("flashomni_symbols", lambda: flashomni_symbols(scores, scores, text, text, MODES["joint"], 0.5, 0.1),
         flashomni_symbols_op, (scores, scores, text, text, MODES["joint"], 0.5, 0.1, True)),
    ]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_every_public_op_raises_a_clear_error_on_backward(impl):
    with kernel_backend(impl):
        for name, call, op, args in _op_calls():
            out = call()
            if name == "flashomni_symbols":
                # bool masks, packed bits and key lists: nothing to differentiate, nothing recorded
                assert not any(t.requires_grad for t in out)
            else:
                assert out.requires_grad, name  # the output is tracked, not silently detached
                with pytest.raises(RuntimeError, match=rf"flashomni::{name} has no backward: .*inference-only"):
                    out.float().sum().backward()
            with torch.no_grad():
                out = call()
            assert not any(t.requires_grad for t in (out if isinstance(out, tuple) else (out,)))
            torch.library.opcheck(op, args, test_utils=_NO_BACKWARD)


def test_taylor_factors_are_stored_without_autograd_history():
    new = torch.randn(4, 8, requires_grad=True)
    for dtype in (torch.float32, torch.float64):  # the one-pass op, and PyTorch's ops for other dtypes
        f = taylor.refresh(None, new.to(dtype), 1, order=1)
        f = taylor.refresh(f, (new * 2).to(dtype), 2, order=1)
        assert len(f) == 2 and not any(t.requires_grad or t.grad_fn is not None for t in f)
        torch.testing.assert_close(f[1], (new.detach() / 2).to(dtype))
