"""The mask factoring of ``omni_compile.masks`` on the mask forms diffusers pipelines build: every form runs
exactly (equal to PyTorch's SDPA with the mask as given), and the forms the ops can express factor into item
groups, minor rows and bias groups as the module docstring says."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from omni_compile import masks
from omni_compile.ops import Symbols, sparse_attention

FORMS = ["key_padding", "key_padding_additive", "expanded", "outer", "outer_col0", "float_outer", "text_causal",
         "causal"]


def _dense_symbols(B, H, Sq, Skv, device):
    return Symbols.dense(B, H, Sq, Skv, 16, 16, device)


def _dense(q, k, v):
    B, H, Sq, _ = q.shape
    return sparse_attention(q, k, v, _dense_symbols(B, H, Sq, k.shape[2], q.device))


def make_mask(form: str, B: int, H: int, S: int, valid: list, n_text: int):
    """A mask of ``form`` over one sequence of ``S`` tokens whose first ``n_text`` are text, of which item ``b``
    keeps ``valid[b]`` (pads at the end of the text; images always valid)."""
    kv = torch.ones(B, S, dtype=torch.bool)
    for b, n in enumerate(valid):
        kv[b, n:n_text] = False
    if form == "key_padding":
        return kv[:, None, None, :]
    if form == "key_padding_additive":
        return torch.where(kv, 0.0, -10000.0)[:, None, None, :]
    if form == "expanded":  # Lumina-Next: view(B, 1, 1, -1).expand(-1, heads, Sq, -1)
        return kv.view(B, 1, 1, S).expand(-1, H, S, -1)
    if form in ("outer", "outer_col0"):  # HunyuanVideo refiner / 1.5: q_valid x k_valid, column 0 kept
        m = kv[:, None, :, None] & kv[:, None, None, :]
        if form == "outer_col0":
            m = m.clone()
            m[:, :, :, 0] = True
        return m.expand(-1, H, -1, -1)
    if form == "float_outer":  # Chroma: a float 0/1 mask multiplied out, i.e. an additive +1 on kept pairs
        f = kv.float()
        return f[:, None, None, :] * f[:, None, :, None]
    if form == "text_causal":  # OmniGen: causal over the text, the image sees every valid token
        m = kv[:, None, None, :].expand(B, 1, S, S).clone()
        m[:, :, :n_text, :n_text] &= torch.ones(n_text, n_text, dtype=torch.bool).tril()
        m[:, :, :n_text, n_text:] = False
        return torch.where(m, 0.0, torch.finfo(torch.float32).min)
    if form == "causal":
        return torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    raise AssertionError(form)


@given(form=st.sampled_from(FORMS), B=st.integers(1, 2), H=st.integers(1, 2), n_img=st.sampled_from([16, 24, 40]),
       n_text=st.integers(2, 8), data=st.data())
def test_every_mask_form_runs_exactly(form, B, H, n_img, n_text, data):
    valid = [data.draw(st.integers(1, n_text)) for _ in range(B)]
    S = n_text + n_img
    mask = make_mask(form, B, H, S, valid, n_text)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, 16, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out, fallbacks = masks.padded_attention(q, k, v, mask, None, _dense_symbols, _dense)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    plan = masks.analyse(mask, B, H, S, S)
    if form == "causal":
        assert plan is None and fallbacks == 1  # no row class holds most rows: SDPA with the mask itself
        return
    assert plan is not None and fallbacks == 0
    items_differ = len(set(valid)) > 1 and form != "float_outer" or (form == "float_outer" and len(set(valid)) > 1)
    assert len(plan.groups) == (2 if items_differ else 1)
    pads = any(n < n_text for n in valid)
    has_rows = form in ("outer", "outer_col0", "float_outer") and pads or form == "text_causal"
    assert (plan.rows is not None) == has_rows
    for grp in plan.groups:
        # the ops attend the image and the kept text: the keys a vision row keeps with the dominant value
        n_kept = int(grp.kept.sum())
        items = grp.items or list(range(B))
        if form == "float_outer":
            assert n_kept == n_img + valid[items[0]] and len(grp.extra) == (1 if valid[items[0]] < n_text else 0)
            if grp.extra:
                assert grp.extra[0][1] == -1.0  # pad keys carry 1 less than the kept ones
        else:
            assert n_kept == n_img + valid[items[0]] and not grp.extra
        assert grp.kv_segments([("text", 0, n_text), ("vision", n_text, S)]) == [
            ("text", 0, valid[items[0]]), ("vision", valid[items[0]], n_kept)]


def test_plans_are_read_once_per_mask_tensor():
    mask = make_mask("outer", 2, 2, 20, [3, 5], 6)
    a = masks.analyse(mask, 2, 2, 20, 20)
    assert masks.analyse(mask, 2, 2, 20, 20) is a  # the same tensor at the next site: no second read
    mask[0, 0, 0, 0] = not bool(mask[0, 0, 0, 0])  # written in place: read again
    assert masks.analyse(mask, 2, 2, 20, 20) is not a


def test_keys_that_differ_per_head_are_not_factored():
    mask = torch.ones(1, 2, 1, 12, dtype=torch.bool)
    mask[0, 1, 0, 3:6] = False
    assert masks.analyse(mask, 1, 2, 12, 12) is None
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    out, fallbacks = masks.padded_attention(q, k, v, mask, None, _dense_symbols, _dense)
    assert fallbacks == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_merge_is_attention_over_the_union():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    bias = torch.zeros(9)
    bias[6:] = -1.5
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 9))
    a = masks._dense_lse(q, k[:, :, :6], v[:, :, :6], 0.25)
    b = masks._dense_lse(q, k[:, :, 6:], v[:, :, 6:], 0.25)
    torch.testing.assert_close(masks.merge([a, (b[0], b[1] - 1.5)]), ref, rtol=1e-5, atol=1e-6)
    # an empty part (lse -inf: a tile the ops reused) drops out of the merge
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    torch.testing.assert_close(masks.merge([a, empty]), a[0])
