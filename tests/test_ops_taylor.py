"""taylor_sum / taylor_refresh: the runtime's one-pass Taylor-cache arithmetic, against an fp64 golden."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from omni_compile.ops import taylor_refresh, taylor_sum
from omni_compile.ops.taylor import _BLOCK, taylor_refresh_op, taylor_sum_op

from _golden import EPS, IMPLS, impl_context, max_err

# sizes around the kernel's block (odd, one element, one block, a block and one)
SIZES = st.sampled_from([(1,), (7, 3), (_BLOCK,), (_BLOCK + 1,), (3, 37, 29)])
DTYPES = st.sampled_from([torch.float16, torch.float32])


def _rand(shape, dtype, g, scale=3.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("impl", IMPLS[:2])
@given(shape=SIZES, dtype=DTYPES, n=st.integers(1, 3), with_base=st.booleans(),
       coefs=st.lists(st.floats(-4, 4), min_size=3, max_size=3), seed=st.integers(0, 2**31))
def test_taylor_sum_matches_golden(impl, shape, dtype, n, with_base, coefs, seed):
    g = torch.Generator().manual_seed(seed)
    fs = [_rand(shape, dtype, g) for _ in range(n)]
    base = _rand(shape, dtype, g) if with_base else None
    with impl_context(impl):
        got = taylor_sum(fs, coefs[:n], base)
        # the coefficients read from memory (what a captured graph does) give the same sums
        from_memory = taylor_sum(fs, torch.tensor(coefs, dtype=torch.float32), base)
    gold = sum(c * f.double() for c, f in zip(coefs[:n], fs)) + (0 if base is None else base.double())
    assert got.dtype == dtype and got.shape == fs[0].shape
    # computed in fp32 and rounded once: half a unit of the dtype at the result's scale, plus fp32 sums
    assert max_err(got, gold) <= EPS[dtype] * (gold.abs().max().item() + 1.0) + 1e-5 * (1 + sum(map(abs, coefs)))
    assert max_err(from_memory, gold) <= EPS[dtype] * (gold.abs().max().item() + 1.0) + 1e-5 * (1 + sum(map(abs, coefs)))


@pytest.mark.parametrize("impl", IMPLS[:2])
@given(shape=SIZES, dtype=DTYPES, n_old=st.integers(0, 2), with_sub=st.booleans(), delta=st.integers(1, 6),
       seed=st.integers(0, 2**31))
def test_taylor_refresh_matches_golden(impl, shape, dtype, n_old, with_sub, delta, seed):
    g = torch.Generator().manual_seed(seed)
    new = _rand(shape, dtype, g)
    sub = _rand(shape, dtype, g) if with_sub else None
    old = [_rand(shape, dtype, g) for _ in range(n_old)]
    with impl_context(impl):
        got = taylor_refresh(new, old, delta, sub=sub)
    assert len(got) == 1 + n_old and all(f.dtype == dtype and f.shape == new.shape for f in got)
    assert all(f.data_ptr() != new.data_ptr() for f in got)  # fresh tensors, never the input
    # the golden follows the definition: each order from the stored (rounded) value of the one before
    f = (new.double() - (0 if sub is None else sub.double())).to(dtype)
    assert max_err(got[0], f) <= EPS[dtype] * f.abs().max().item()
    for o, out in zip(old, got[1:]):
        f = f.double()
        want = (f - o.double()) / delta
        # the kernel multiplies by 1/delta in fp32: a few fp32 units besides the rounding to the dtype
        assert max_err(out, want) <= EPS[dtype] * (want.abs().max().item() + 1.0) + 1e-5
        f = out  # the next order differences the stored value


@pytest.mark.parametrize("impl", IMPLS[:2])
def test_permuted_and_strided_layouts(impl):
    # a dense permuted tensor (the heads-inner attention output) runs the kernel over its memory; a sliced
    # one falls back to the reference: both equal the contiguous result bit for bit, which holds on any
    # machine: elementwise fp32 arithmetic in one order, and delta = 2, where the kernel's product with
    # 1/delta equals the reference's quotient exactly
    g = torch.Generator().manual_seed(1)
    a, b, c = (_rand((2, 5, 3, 16), torch.float16, g).transpose(1, 2) for _ in range(3))
    with impl_context(impl):
        perm = taylor_sum([a, b], [1.0, 0.5], c)
        flat = taylor_sum([a.contiguous(), b.contiguous()], [1.0, 0.5], c.contiguous())
        sliced = taylor_refresh(a[..., :8], [b[..., :8]], 2, sub=c[..., :8])
        flat_r = taylor_refresh(a[..., :8].contiguous(), [b[..., :8].contiguous()], 2, sub=c[..., :8].contiguous())
    assert torch.equal(perm, flat) and perm.stride() == a.stride()
    assert all(torch.equal(x, y) for x, y in zip(sliced, flat_r))


def test_nan_stays_in_its_element():
    # elementwise: a NaN in one cached element must not reach any other
    x = torch.zeros(2 * _BLOCK + 3, dtype=torch.float16)
    x[5] = float("nan")
    with impl_context("triton"):
        s = taylor_sum([x, torch.ones_like(x)], [1.0, 2.0])
        r = taylor_refresh(x, [torch.ones_like(x)], 1)
    for t in (s, *r):
        assert torch.isnan(t[5]) and torch.isfinite(torch.cat([t[:5], t[6:]])).all()


def test_bad_input_raises_and_opcheck():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="1 to 3 factors"):
        taylor_sum([x] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match=r"factors\[1\] has shape"):
        taylor_sum([x, torch.randn(4, 9)], [1.0, 1.0])
    with pytest.raises(TypeError, match="base must be a float16/bfloat16/float32 tensor of dtype torch.float32"):
        taylor_sum([x], [1.0], x.half())
    with pytest.raises(ValueError, match="at most 2 old factors"):
        taylor_refresh(x, [x, x, x], 1)
    with pytest.raises(ValueError, match="delta > 0"):
        taylor_refresh(x, [x], 0)
    torch.library.opcheck(taylor_sum_op, ([x, torch.randn(4, 8)], [1.0, 0.5], torch.randn(4, 8)))
    torch.library.opcheck(taylor_sum_op, ([x], [2.0], None))
    torch.library.opcheck(taylor_sum_op, ([x, torch.randn(4, 8)], [0.0, 0.0], None, torch.tensor([1.0, 0.5])))
    with pytest.raises(TypeError, match="1-D float32"):
        taylor_sum([x], torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="as many coefs"):
        taylor_sum([x, x], torch.tensor([1.0]))
    torch.library.opcheck(taylor_refresh_op, (x, torch.randn(4, 8), [torch.randn(4, 8), torch.randn(4, 8)], 3.0))
    torch.library.opcheck(taylor_refresh_op, (x, None, [], 1.0))
