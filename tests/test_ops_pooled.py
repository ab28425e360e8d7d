"""pooled_scores: block-mean pooling + softmax over key blocks, against an fp64 golden."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from omni_compile.ops import pooled_scores
from omni_compile.ops.pooled import pooled_scores_op

from _golden import IMPLS, impl_context, max_err


def golden_pooled(q, k, bq, bkv, scale):
    def means(x, blk):
        chunks = torch.split(x.double(), blk, dim=2)
        return torch.stack([c.mean(2) for c in chunks], 2), torch.tensor([c.shape[2] for c in chunks]).double()

    qm, _ = means(q, bq)
    km, kc = means(k, bkv)
    logits = qm @ km.transpose(-1, -2) * scale + kc.log()
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("impl", IMPLS)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), D=st.sampled_from([64, 72, 128]),
    bq=st.sampled_from([16, 64, 128]), bkv=st.sampled_from([16, 32, 256]),
    sq=st.integers(1, 300), skv=st.integers(1, 300), dtype=st.sampled_from([torch.float16, torch.float32]),
    seed=st.integers(0, 2**31),
)
def test_pooled_scores_match_golden(impl, B, H, D, bq, bkv, sq, skv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, sq, D, generator=g) * 3).to(dtype)
    k = (torch.randn(B, H, skv, D, generator=g) * 3).to(dtype)
    with impl_context(impl):
        p = pooled_scores(q, k, bq, bkv)
    gold = golden_pooled(q, k, bq, bkv, D**-0.5)
    assert p.dtype == torch.float32 and p.shape == gold.shape
    assert max_err(p, gold) <= 1e-5
    assert torch.allclose(p.sum(-1).double(), torch.ones(()).double(), atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sq, skv", [(700, 600), (16 * 32, 16 * 64 + 1)])
def test_pooled_scores_with_many_blocks(impl, sq, skv):
    """More query and key blocks than the softmax kernel's tiles (8 query x 64 key blocks), partial tiles on
    both axes: 38 key blocks take its one-tile path, 65 its two-pass path."""
    g = torch.Generator().manual_seed(sq)
    q, k = (torch.randn(1, 2, n, 64, generator=g) * 3 for n in (sq, skv))
    with impl_context(impl):
        p = pooled_scores(q, k, 16, 16)
    assert max_err(p, golden_pooled(q, k, 16, 16, 64**-0.5)) <= 1e-5


def test_pooled_scores_rejects_bad_input_and_passes_opcheck():
    q = torch.randn(1, 2, 40, 64)
    with pytest.raises(ValueError, match="block_kv must be a power of two"):
        pooled_scores(q, q, 16, 24)
    with pytest.raises(ValueError, match="k must have shape"):
        pooled_scores(q, torch.randn(1, 2, 40, 32), 16, 16)
    torch.library.opcheck(pooled_scores_op, (q, torch.randn(1, 2, 50, 64), 16, 32, 0.2))
