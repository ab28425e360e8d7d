"""The symbol format: bit-exact packing (numpy.packbits little-endian), round trips, schedules, repr."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_compile.ops import Symbols, pack_bits, unpack_bits

BLOCKS = st.sampled_from([16, 32, 64, 128, 256])


@st.composite
def dense_symbols(draw, max_blocks=11):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    bq, bkv = draw(BLOCKS), draw(BLOCKS)
    sq = draw(st.integers(1, bq * max_blocks))
    skv = draw(st.integers(1, bkv * max_blocks))
    nq, nk = -(-sq // bq), -(-skv // bkv)
    p_reuse = draw(st.sampled_from([0.0, 0.3, 1.0]))
    p_skip = draw(st.sampled_from([0.0, 0.5, 1.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    reuse = torch.rand(B, H, nq, generator=g) < p_reuse
    skip = torch.rand(B, H, nq, nk, generator=g) < p_skip
    return reuse, skip, bq, bkv, sq, skv


@given(st.lists(st.integers(1, 4), min_size=0, max_size=2), st.integers(1, 77), st.integers(0, 2**31))
def test_pack_bits_is_numpy_packbits_little(lead, n, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(*lead, n, generator=g) < 0.5
    packed = pack_bits(bits)
    want = np.packbits(bits.numpy(), axis=-1, bitorder="little")
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), want)
    assert torch.equal(unpack_bits(packed, n), bits)


@given(dense_symbols())
def test_from_dense_round_trip_and_layout(case):
    reuse, skip, bq, bkv, sq, skv = case
    s = Symbols.from_dense(reuse, skip, bq, bkv, sq, skv)
    r2, k2 = s.to_dense()
    assert torch.equal(r2, reuse) and torch.equal(k2, skip)
    # the stored bytes are exactly numpy.packbits(..., axis=-1, bitorder="little")
    assert np.array_equal(s.reuse_bits.numpy(), np.packbits(reuse.numpy(), axis=-1, bitorder="little"))
    assert np.array_equal(s.skip_bits.numpy(), np.packbits(skip.numpy(), axis=-1, bitorder="little"))


def _dense_work(reuse, skip, bq, bkv, sq, skv):
    rows = torch.arange(sq) // bq
    cols = torch.arange(skv) // bkv
    keep = ~skip & ~reuse.unsqueeze(-1)
    return keep[:, :, rows][:, :, :, cols]  # [B,H,sq,skv]


@given(dense_symbols(max_blocks=6))
def test_density_counts_real_work(case):
    reuse, skip, bq, bkv, sq, skv = case
    s = Symbols.from_dense(reuse, skip, bq, bkv, sq, skv)
    work = _dense_work(reuse, skip, bq, bkv, sq, skv)
    assert s.density() == pytest.approx(work.double().mean().item(), abs=1e-12)
    reused_rows = reuse[:, :, torch.arange(sq) // bq].double().mean().item()
    assert s.reuse_fraction() == pytest.approx(reused_rows, abs=1e-12)


@given(dense_symbols())
def test_kv_schedule_lists_kept_blocks_in_order(case):
    reuse, skip, bq, bkv, sq, skv = case
    s = Symbols.from_dense(reuse, skip, bq, bkv, sq, skv)
    idx, cnt = s.kv_schedule()
    keep = ~skip & ~reuse.unsqueeze(-1)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert torch.equal(cnt, keep.sum(-1).int())
    for b, h, q in [(0, 0, 0), (reuse.shape[0] - 1, reuse.shape[1] - 1, reuse.shape[2] - 1)]:
        n = int(cnt[b, h, q])
        assert idx[b, h, q, :n].tolist() == torch.nonzero(keep[b, h, q]).flatten().tolist()
    assert s.kv_schedule() is s.kv_schedule()  # decoded once, cached


@given(dense_symbols(max_blocks=5), st.integers(0, 100), st.sampled_from([16, 64, 128]), st.booleans(),
       st.sampled_from(["reference", "triton"]))
def test_head_schedule_is_union_over_tile_rows(case, offset, block_m, select_reused, backend):
    """Both paths: the PyTorch formula and, on the Triton path, the kernel that reads the bits of aligned
    tiles directly (``slice_head_schedule``; other tiles take ``selected_first`` there too)."""
    from omni_compile.ops import kernel_backend

    reuse, skip, bq, bkv, sq, skv = case
    sq2 = sq + offset
    nq = -(-sq2 // bq)
    reuse = torch.cat([reuse, torch.ones(*reuse.shape[:2], nq - reuse.shape[2], dtype=torch.bool)], -1)
    skip = torch.zeros(*reuse.shape, 1, dtype=torch.bool)
    s = Symbols.from_dense(reuse, skip, bq, 16, sq2, 16)
    with kernel_backend(backend):
        idx, cnt = s.head_schedule(sq, offset, block_m, select_reused)
    B, H = reuse.shape[:2]
    for b in range(B):
        for t in range(-(-sq // block_m)):
            rows = torch.arange(t * block_m, min(sq, (t + 1) * block_m)) + offset
            sel = reuse[b][:, rows // bq]
            sel = sel if select_reused else ~sel
            want = torch.nonzero(sel.any(1)).flatten().tolist()
            assert idx[b, t, : int(cnt[b, t])].tolist() == want


def test_dense_constructor_and_union():
    s = Symbols.dense(2, 3, 300, 200, 64, 32)
    assert s.density() == 1.0 and s.reuse_fraction() == 0.0
    reuse = torch.zeros(2, 3, 5, dtype=torch.bool)
    reuse[0, 1, 2] = True
    skip = torch.zeros(2, 3, 5, 7, dtype=torch.bool)
    skip[1, 2, :, 3] = True
    a = Symbols.from_dense(reuse, torch.zeros_like(skip), 64, 32, 300, 200)
    b = Symbols.from_dense(torch.zeros_like(reuse), skip, 64, 32, 300, 200)
    r, k = (a | b).to_dense()
    assert torch.equal(r, reuse) and torch.equal(k, skip)
    assert (a | b) == Symbols.from_dense(reuse, skip, 64, 32, 300, 200)
    with pytest.raises(ValueError, match="same shape"):
        a | Symbols.dense(2, 3, 300, 200, 64, 64)


def test_repr_grid_small_and_summary_large():
    reuse = torch.tensor([[[False, True]]])
    skip = torch.tensor([[[[False, True, False], [False, False, False]]]])
    text = repr(Symbols.from_dense(reuse, skip, 16, 16, 20, 40))
    assert "q0   #.#" in text and "q1   RRR" in text and "density=" in text
    big = repr(Symbols.dense(1, 24, 4608, 4608))
    assert "\n" not in big and "blocks=36x36" in big and "density=1.000" in big


def test_device_move_keeps_bits():
    s = Symbols.from_dense(torch.rand(1, 2, 3) < 0.5, torch.rand(1, 2, 3, 4) < 0.5, 16, 16, 40, 60)
    assert s.to("cpu") is s and s.cpu() is s
    with pytest.raises(TypeError, match="device move"):
        s.to(torch.float16)
    if torch.cuda.is_available():
        g = s.cuda()
        assert g.device.type == "cuda" and g.cpu() == s


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(block_q=48), ValueError, "block_q must be a power of two"),
        (dict(block_kv=512), ValueError, "block_kv must be a power of two"),
        (dict(reuse=torch.zeros(1, 2, 4, dtype=torch.bool)), ValueError, "reuse must have shape"),
        (dict(skip=torch.zeros(1, 2, 3, 5, dtype=torch.bool)), ValueError, "skip must have shape"),
        (dict(reuse=torch.zeros(1, 2, 3)), TypeError, "bool"),
    ],
)
def test_from_dense_rejects_bad_input(kwargs, exc, match):
    args = dict(
        reuse=torch.zeros(1, 2, 3, dtype=torch.bool),
        skip=torch.zeros(1, 2, 3, 4, dtype=torch.bool),
        block_q=16,
        block_kv=16,
        seq_q=40,
        seq_kv=60,
    )
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        Symbols.from_dense(**args)


@given(dense_symbols(max_blocks=5), st.integers(0, 100), st.sampled_from([16, 64, 128]),
       st.sampled_from(["reference", "triton"]))
def test_tile_schedule_lists_computed_tiles_first(case, offset, block_m, backend):
    from omni_compile.ops import kernel_backend

    reuse, _, bq, _, sq, _ = case
    sq2 = sq + offset
    nq = -(-sq2 // bq)
    reuse = torch.cat([reuse, torch.ones(*reuse.shape[:2], nq - reuse.shape[2], dtype=torch.bool)], -1)
    s = Symbols.from_dense(reuse, torch.zeros(*reuse.shape, 1, dtype=torch.bool), bq, 16, sq2, 16)
    with kernel_backend(backend):
        tiles, count = s.tile_schedule(sq, offset, block_m)
    B, H = reuse.shape[:2]
    T = -(-sq // block_m)
    computed = [(b * T + t) * H + h for b in range(B) for t in range(T) for h in range(H)
                if not reuse[b, h, (torch.arange(t * block_m, min(sq, (t + 1) * block_m)) + offset) // bq].all()]
    rest = sorted(set(range(B * T * H)) - set(computed))
    assert tiles.dtype == torch.int32 and count.dtype == torch.int32 and count.shape == (1,)
    assert int(count) == len(computed) and tiles.tolist() == computed + rest
    assert s.tile_schedule(sq, offset, block_m) is s.tile_schedule(sq, offset, block_m)  # cached


@settings(deadline=None, max_examples=40)
@given(B=st.integers(1, 2), H=st.sampled_from([1, 3, 24, 40]), T=st.sampled_from([1, 2, 31, 33, 64]),
       first=st.integers(0, 9), p=st.sampled_from([0.0, 0.1, 0.5, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_slice_schedules_equal_the_compaction_of_the_mask(B, H, T, first, p, seed):
    """The schedule kernels that read packed bits (``slice_head_schedule``, ``slice_tile_schedule``) equal
    ``selected_first`` of the sliced reuse mask entry for entry: head counts off a power of two, one tile,
    tile counts across the kernel's 32-tile programs, tile lists across its 2048-entry chunks (2 x 33 x
    40), bits starting mid-byte (``first``), nothing and everything reused."""
    from omni_compile.ops import kernel_backend
    from omni_compile.ops.symbols import pack_bits, selected_first, slice_head_schedule, slice_tile_schedule

    g = torch.Generator().manual_seed(seed)
    n_q = first + T + 3  # blocks after the slice too
    reuse = torch.rand(B, H, n_q, generator=g) < p
    bits = pack_bits(reuse)
    part = reuse[:, :, first:first + T].transpose(1, 2)  # [B, T, H]
    with kernel_backend("triton"):
        for select_reused in (False, True):
            idx, cnt = slice_head_schedule(bits, first, T, select_reused)
            with kernel_backend("reference"):
                want = selected_first(part if select_reused else ~part)
            assert torch.equal(idx, want[0]) and torch.equal(cnt, want[1]), select_reused
        tiles, count = slice_tile_schedule(bits, first, T)
    with kernel_backend("reference"):
        want_t, want_c = selected_first((~part).reshape(1, -1))
    assert torch.equal(tiles, want_t.reshape(-1)) and torch.equal(count, want_c.reshape(1))


def test_prefetch_schedules_decodes_what_the_other_symbols_decoded():
    g = torch.Generator().manual_seed(0)
    a = Symbols.from_dense(torch.rand(1, 2, 3, generator=g) < 0.5, torch.rand(1, 2, 3, 5, generator=g) < 0.5, 16, 16, 40, 70)
    b = Symbols.from_dense(torch.rand(1, 2, 3, generator=g) < 0.5, torch.rand(1, 2, 3, 5, generator=g) < 0.5, 16, 16, 40, 70)
    a.kv_schedule()
    a.head_schedule(40, 0, 32, False)
    a.head_schedule(24, 16, 16, True)
    a.tile_schedule(40, 0, 16)
    assert b._kv_schedule is None and not b._head_schedules and not b._tile_schedules
    other = Symbols.from_dense(torch.zeros(1, 2, 3, dtype=torch.bool), torch.zeros(1, 2, 3, 4, dtype=torch.bool),
                               16, 16, 40, 60)  # another key length: its schedules do not apply
    other.prefetch_schedules(a)
    assert other._kv_schedule is None and not other._head_schedules
    b.prefetch_schedules(a)
    assert set(b._head_schedules) == set(a._head_schedules)
    assert set(b._tile_schedules) == set(a._tile_schedules)
    fresh = Symbols(b.reuse_bits, b.skip_bits, 16, 16, 40, 70)
    for got, want in zip(b.kv_schedule(), fresh.kv_schedule()):
        assert torch.equal(got, want)
    for key in a._head_schedules:
        for got, want in zip(b._head_schedules[key], fresh.head_schedule(*key)):
            assert torch.equal(got, want)
    for key in a._tile_schedules:
        for got, want in zip(b._tile_schedules[key], fresh.tile_schedule(*key)):
            assert torch.equal(got, want)


@given(st.integers(1, 3), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_selected_first_is_a_stable_sort_of_the_unselected(rows, n, p, seed):
    """The schedules' compaction equals ``torch.sort(~mask, stable=True)`` entry for entry (selected
    positions ascending, then the others ascending), including all-True and all-False rows."""
    from omni_compile.ops import kernel_backend
    from omni_compile.ops.symbols import selected_first

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, 2, n, generator=g) < p
    mask[0, 0] = True
    mask[-1, -1] = False
    want = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
    for backend in ("reference", "triton"):  # the PyTorch formula; the kernel (interpreter on CPU)
        with kernel_backend(backend):
            idx, cnt = selected_first(mask.transpose(0, 1).contiguous().transpose(0, 1))  # a strided mask too
        assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
        assert torch.equal(idx.long(), want) and torch.equal(cnt, mask.sum(-1).int()), backend


def test_shared_dense_view_is_what_the_bits_say():
    g = torch.Generator().manual_seed(1)
    reuse, skip = torch.rand(1, 2, 3, generator=g) < 0.5, torch.rand(1, 2, 3, 5, generator=g) < 0.5
    shared = Symbols.from_dense(reuse, skip, 16, 16, 40, 70, share_dense=True)
    plain = Symbols.from_dense(reuse, skip, 16, 16, 40, 70)
    assert shared.to_dense()[0] is reuse and plain.to_dense()[0] is not reuse
    for a, b in zip(shared.to_dense(), plain.to_dense()):
        assert torch.equal(a, b)
    assert shared == plain and shared.to("meta")._dense is None


@given(st.integers(1, 300), st.integers(0, 40), st.integers(0, 2**31 - 1))
def test_longest_first_is_a_stable_descending_sort(n, top, seed):
    """The persistent attention's walk (``Symbols.kv_order``) equals ``argsort(descending, stable)`` entry
    for entry: lengths off the kernel's 64/128 tiles, all counts equal (``top = 0``: every entry ties,
    index order), and many ties."""
    from omni_compile.ops import kernel_backend
    from omni_compile.ops.symbols import longest_first

    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, top + 1, (n,), generator=g, dtype=torch.int32)
    want = torch.sort(counts, descending=True, stable=True).indices
    for backend in ("reference", "triton"):  # torch's sort; the kernel (interpreter on CPU)
        with kernel_backend(backend):
            got = longest_first(counts.reshape(1, -1, 1)[:, :, 0])  # any shape: ranked flat
        assert got.dtype == torch.int32 and torch.equal(got.long(), want), backend


def _mutations(sym, reuse, skip):
    """In-place changes a caller could make after building ``sym``: each flips one bit somewhere."""
    return [
        ("reuse_bits", lambda: sym.reuse_bits[0, 1].bitwise_xor_(1)),
        ("skip_bits through a view", lambda: sym.skip_bits.view(-1)[:1].bitwise_xor_(1)),
        ("shared reuse mask", lambda: reuse[0, 0, 2].logical_not_()),
        ("shared skip mask", lambda: skip[0, 0, 0, 1].logical_not_()),
    ]


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("which", range(4))
def test_symbols_are_immutable_after_construction(impl, which):
    """A Symbols caches the schedules it decodes; changing its bits (or the masks it keeps) in place after
    a use would leave the kernels reading a stale schedule while the reference reads the new bits. Every
    op raises instead (the runtime's prechecked GEMM-O path too), and the fields cannot be reassigned."""
    from omni_compile.ops import cache_bias_for, kernel_backend, sparse_attention, sparse_linear_o, sparse_linear_q
    from omni_compile.ops.linear_o import sparse_linear_o_prechecked

    g = torch.Generator().manual_seed(which)
    B, H, S, D = 1, 2, 48, 16
    reuse = torch.zeros(B, H, 3, dtype=torch.bool)
    reuse[0, 1, 0] = True
    skip = torch.zeros(B, H, 3, 3, dtype=torch.bool)
    sym = Symbols.from_dense(reuse, skip, 16, 16, S, S, share_dense=True)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    x, a = torch.randn(B, S, 24, generator=g), torch.randn(B, S, H * D, generator=g)
    wq, wo = torch.randn(H * D, 24, generator=g), torch.randn(8, H * D, generator=g)
    calls = [lambda: sparse_attention(q, k, v, sym), lambda: sparse_linear_q(x, wq, None, sym, D),
             lambda: sparse_linear_o(a, wo, None, sym, D), lambda: cache_bias_for(a, wo, sym, D),
             lambda: sparse_linear_o_prechecked(a, wo, None, sym, D, [], [])]
    with kernel_backend(impl):
        for call in calls:
            call()  # decodes and caches the schedules (the second call of each op takes its kept plan)
            call()
        name, mutate = _mutations(sym, reuse, skip)[which]
        mutate()
        for call in calls:
            with pytest.raises(RuntimeError, match="Symbols are immutable"):
                call()
    for field in ("reuse_bits", "skip_bits", "block_q", "seq_kv"):
        with pytest.raises(AttributeError, match=f"Symbols.{field} cannot be changed"):
            setattr(Symbols.dense(1, 1, 16, 16, 16, 16), field, getattr(sym, field))
