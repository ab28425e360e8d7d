"""omni_compile.bench.kernels's random symbols (the kernels' benchmark needs a GPU; its masks do not)."""
import pytest
import torch

from omni_compile.bench.kernels import make_symbols


def test_equal_and_varied_masks_keep_the_asked_fraction():
    """Equal masks keep exactly round(keep·n) key blocks in every tile; varied ones draw each tile's count
    from 1 .. 2·round(keep·n) - 1 (so tiles differ, none is empty) with about the same density."""
    n = 4608 // 128
    for keep in (0.1, 0.2, 0.5):
        kept = round(keep * n)
        equal = make_symbols(4608, keep, device="cpu")
        varied = make_symbols(4608, keep, device="cpu", varied=True)
        c_eq, c_var = equal.kv_schedule()[1], varied.kv_schedule()[1]
        assert (c_eq == kept).all()
        assert c_var.min() >= 1 and c_var.max() <= min(n, 2 * kept - 1) and c_var.unique().numel() > 1
        assert abs(varied.density() - equal.density()) < 0.02


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_symbol_generation_row_runs_the_update_pipeline(monkeypatch, backend):
    """The benchmark's update-step symbol-generation row on the CPU (its timer stubbed): it runs the
    flashomni policy on a joint site through ``policy_symbols`` (the runtime's path) and through the
    PyTorch ops, decodes the schedules, and compares its bits with the reference pipeline's (on the
    reference backend the same path, so none differ) and its lists with the PyTorch formulas' (on the
    Triton backend, in the interpreter, the kernels' lists)."""
    from omni_compile.bench import kernels as bench
    from omni_compile.ops import kernel_backend

    monkeypatch.setattr(bench, "graph_ms", lambda fn: float("nan"))  # CUDA graphs: not on a CPU
    monkeypatch.setattr(bench, "H", 4)  # fewer heads than FLUX: the interpreter runs every program in Python
    with kernel_backend(backend):
        calls = []
        monkeypatch.setattr(bench, "bench_ms", lambda fn: calls.append(fn()) or 0.5)
        g = torch.Generator().manual_seed(0)
        S = 1000  # 8 blocks, the last partial; the first 4 hold the 512 text tokens
        q, k = (torch.randn(1, bench.H, S, bench.D, generator=g) for _ in range(2))
        row = bench.symbol_generation_row(q, k, dense_ms=2.0)
        assert row["part"] == "symbols" and row["ok"] and row["differing"] == 0 and row["lists_agree"]
        assert row["fraction"] == 0.25 and 0 < row["density"] <= 1 and row["unfused_ms"] == 0.5
        # the stage split: the stubbed timer gives every prefix 0.5 ms, so all of it lands on the first stage
        assert (row["pooled_ms"], row["symbols_ms"], row["schedules_ms"]) == (0.5, 0.0, 0.0)
        fused, unfused, pooled, symbols = calls[0], calls[1], calls[2], calls[3]
        assert pooled.shape == (1, bench.H, 8, 8) and symbols._kv_order is None and symbols.density() == row["density"]
        assert fused == unfused and fused._dense is not None
        reuse, skip = fused.to_dense()
        assert not reuse[:, :, :4].any(), "text query blocks are never reused"
        assert not skip[:, :, :, :4].any(), "text key blocks are never skipped"
        assert fused._kv_order is not None and fused._tile_schedules and fused._head_schedules


def test_gemm_floor_is_compute_or_bytes_whichever_is_larger():
    """At FLUX's projection (4608 x 3072 x 3072, bf16) and 4 TB/s: GEMM-O moves the cache bias and the
    output whole, 56.6 MB plus the computed share of ``a``, so at 10 % computed its floor is memory
    (~14.9 us) rather than a tenth of cuBLAS; dense it is cuBLAS itself."""
    from omni_compile.bench.kernels import gemm_floor_ms

    M, K, N = 4608, 3072, 3072
    bw = 4000.0  # GB/s
    mb = 1e6
    o_bytes = (0.1 * M * K + K * N + 2 * M * N) * 2
    assert gemm_floor_ms("gemm_o", M, K, N, 0.1, 0.124, bw) == pytest.approx(o_bytes / bw / mb)
    assert gemm_floor_ms("gemm_o", M, K, N, 1.0, 0.124, bw) == 0.124  # compute-bound dense
    # GEMM-Q reads all of x; the unfilled form writes only the computed tiles
    q_filled = (M * K + K * N + M * N) * 2 / bw / mb
    q_unfilled = (M * K + K * N + 0.1 * M * N) * 2 / bw / mb
    assert gemm_floor_ms("gemm_q", M, K, N, 0.1, 0.124, bw) == pytest.approx(q_filled)
    assert gemm_floor_ms("gemm_q unfilled", M, K, N, 0.1, 0.124, bw) == pytest.approx(q_unfilled)
    assert q_unfilled < q_filled
    assert gemm_floor_ms("gemm_q unfilled", M, K, N, 0.5, 0.124, bw) == pytest.approx(0.062)
    with pytest.raises(ValueError, match="unknown op"):
        gemm_floor_ms("gemm_x", M, K, N, 0.5, 0.1, bw)
