"""The quality-and-speed table's machinery on the CPU: the faster CPU attention of the quality runs against
the ops' reference, the recorded-density replay's bits and configs, and the full-size driver replaying a
recorded row (``--cpu-smoke``)."""

from __future__ import annotations

import json

import pytest
import torch

from omni_compile import FixedBlocks, OmniConfig, ResidualChange
from omni_compile.bench import e2e as bench_e2e
from omni_compile.bench import quality as zq
from omni_compile.bench.replay import Replay, draw, replay_config
from omni_compile.ops import Symbols
from omni_compile.ops.attention import sparse_attention_reference
from omni_compile.policies import FlashOmni
from omni_compile.tune import SiteStep, Trace

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def test_masked_sdpa_equals_the_reference():
    """Reused tiles, skipped key blocks, a partial last block and a row that keeps no key at all: the quality
    runs' SDPA stand-in gives the reference's output (zeros where nothing is computed)."""
    g = torch.Generator().manual_seed(0)
    B, H, S, D, blk = 2, 3, 100, 16, 16  # 7 blocks, the last of 4 rows
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    n = -(-S // blk)
    reuse = torch.rand(B, H, n, generator=g) < 0.3
    skip = torch.rand(B, H, n, n, generator=g) < 0.5
    skip[0, 0, 2] = True  # a computed row that keeps nothing
    reuse[0, 0, 2] = False
    sym = Symbols.from_dense(reuse, skip, blk, blk, S, S)
    ref, _ = sparse_attention_reference(q, k, v, sym.reuse_bits, sym.skip_bits, blk, blk, D ** -0.5)
    out, lse = zq.masked_sdpa(q, k, v, sym.reuse_bits, sym.skip_bits, blk, blk, D ** -0.5)
    assert torch.allclose(out, ref, atol=2e-6, rtol=0) and torch.isnan(lse).all()
    assert (out[0, 0, 32:48] == 0).all() and (out[reuse.repeat_interleave(blk, -1)[..., :S]] == 0).all()


def test_cpu_fast_paths_swap_and_restore():
    from omni_compile import runtime
    from omni_compile.ops import attention

    before = (runtime._dense_attention, runtime._dense_linear, attention.sparse_attention_reference)
    with zq.cpu_fast_paths():
        assert runtime._dense_attention is not before[0] and attention.sparse_attention_reference is not before[2]
    assert (runtime._dense_attention, runtime._dense_linear, attention.sparse_attention_reference) == before
    with zq.cpu_fast_paths(False):
        assert runtime._dense_attention is before[0]


def test_settings_from_the_command_line():
    assert zq.split_settings("dense,t=policy=FlashOmni(tau_q=0.6, tau_kv=0.1);interval=3,flashomni") == [
        "dense", "t=policy=FlashOmni(tau_q=0.6, tau_kv=0.1);interval=3", "flashomni"]
    name, fields = zq.parse_setting("t=policy=FlashOmni(tau_q=0.6, tau_kv=0.1);block_cache=ResidualChange(0.2)")
    assert name == "t" and fields["policy"] == FlashOmni(tau_q=0.6, tau_kv=0.1)
    assert fields["block_cache"] == ResidualChange(0.2) and fields["interval"] == 5 and fields["warmup"] == 8
    with pytest.raises(ValueError, match="unknown setting"):
        zq.parse_setting("nonesuch")
    # a named or custom setting measures what it names (no block caching unless it says so); "default" is
    # OmniConfig() itself, whatever its defaults are
    assert zq.parse_setting("t=interval=3")[1]["block_cache"] is None
    assert zq.parse_setting("default") == ("default", {})
    assert "ResidualChange" in zq.describe({}) and "flashomni" in zq.describe({})


def _two_cycle_trace() -> Trace:
    """Two sites over 8 steps (warm-up 2, interval 3): cycle 1 reuses a quarter of site 0's vision blocks,
    cycle 2 three quarters; site 1 skips half its vision keys and is cached in cycle 2."""
    c = SiteStep
    acts = ["dense", "update", "dispatch", "dispatch", "update", "dispatch", "dispatch", "update"]
    cells = []
    for s, a in enumerate(acts):
        if a != "dispatch":
            cells.append([c(), c()])
        elif s < 4:
            cells.append([c(density=0.7, reuse=0.2, reuse_vision=0.25), c(density=0.6, skip_vision=0.5)])
        else:
            cells.append([c(density=0.3, reuse=0.6, reuse_vision=0.75), c(ran=0.0)])
    return Trace(8, acts, ["blocks.0.attn", "blocks.1.attn"], [10, 10], [0, 1], cells, blocks=2)


def test_replay_takes_the_traced_cycle_and_depth():
    tr = _two_cycle_trace()
    r = Replay(tr, steps=16, sites=4)
    # sites 0, 1 of 4 take traced site 0; sites 2, 3 traced site 1; an update early in the loop the first
    # cycle (traced update at 1/8), late the second (4/8)
    assert r.figures(0, 2).reuse_vision == 0.25 and r.figures(1, 9).reuse_vision == 0.75
    assert r.figures(3, 2).skip_vision == 0.5


def test_replay_draws_exact_counts_on_vision_blocks():
    from omni_compile.bench.presets import example_input

    inp = example_input()  # 1 text + 12 vision blocks, one head
    reuse, skip = draw(inp, 0.5, 0.25, seed=3)
    assert not reuse[..., 0].any() and int(reuse.sum()) == 6
    computed_vision = ~reuse[0, 0] & ~inp.q_text
    per_row = skip[0, 0][computed_vision].sum(-1)
    assert (per_row == 3).all() and not skip[..., 0].any()  # round(0.25 * 12), text keys kept
    assert not skip[0, 0][reuse[0, 0]].any()
    again = draw(inp, 0.5, 0.25, seed=3)
    assert torch.equal(again[0], reuse) and torch.equal(again[1], skip)


def test_replay_config_of_table_rows():
    tr = _two_cycle_trace()
    row = dict(setting="x", config=dict(policy="FlashOmni(tau_q=0.5, tau_kv=0.05)", interval=3, warmup=2,
                                        taylor_order=1, block_cache="ResidualChange(threshold=0.1)"),
               trace=tr.to_dict(), cached_share=0.25)
    cfg = replay_config(row, steps=16)
    assert isinstance(cfg["policy"], Replay) and cfg["policy"].needs_scores
    assert cfg["block_cache"] == FixedBlocks(0.25) and cfg["interval"] == 3 and cfg["warmup"] == 2
    fixed = replay_config(dict(row, config=dict(row["config"], policy="Fixed(reuse=0.3, skip=0.5, seed=0)",
                                                block_cache="FixedBlocks(fraction=0.5)")), steps=16)
    # content-blind policies run as themselves; every block rule as the traced share of cached block-steps
    assert not isinstance(fixed["policy"], Replay) and fixed["block_cache"] == FixedBlocks(0.25)
    assert replay_config(dict(row, cached_share=0.0), steps=16)["block_cache"] is None
    final = replay_config(dict(row, config=dict(row["config"], final_dense=2)), steps=16)
    assert final["final_dense"] == 2 and final["steps"] == 16
    # the "default" row (config {}: OmniConfig() as it comes) replays the default policy and block caching
    default = replay_config(dict(row, setting="default", config={}), steps=16)
    assert isinstance(default["policy"], Replay) and default["block_cache"] == FixedBlocks(0.25)
    OmniConfig(**final)


def test_e2e_replays_recorded_rows_on_the_cpu(tmp_path):
    tr = _two_cycle_trace()
    rows = [dict(setting="sparse", config=dict(policy="FlashOmni(tau_q=0.5, tau_kv=0.05)", interval=3, warmup=2,
                                                taylor_order=1), trace=tr.to_dict(), cached_share=0.0),
            dict(setting="cached", config=dict(policy="FlashOmni(tau_q=0.5, tau_kv=0.05)", interval=3, warmup=2,
                                                taylor_order=1, block_cache="ResidualChange(threshold=0.1)"),
                 trace=tr.to_dict(), cached_share=0.5)]
    src = tmp_path / "quality.json"
    src.write_text(json.dumps(dict(meta={}, rows=rows)))
    rc = bench_e2e.main(["--cpu-smoke", "--model", "flux", "--steps", "8", "--no-inductor-baseline", "--profile",
                         "none", "--no-pipelined", "--replay", str(src), "--configs", "dense,r:sparse,r:cached",
                         "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "e2e_flux.json").read_text())
    got = {r["name"]: r for r in res["rows"]}
    assert not res.get("failed") and set(got) == {"dense", "r:sparse", "r:cached"}
    assert got["r:sparse"]["acts"] == [bench_e2e.actions(8, 2, 3)[i] for i in range(8)]
    assert 0 < got["r:sparse"]["density"] < 1 and got["r:sparse"]["reuse"] > 0
    assert "recorded-density replay of 'sparse'" in got["r:sparse"]["what"]
    # 3 blocks (1 double, 2 single): round(0.5 · 3) = 2 cached
    assert got["r:cached"]["blocks_cached"] == 2 and "FixedBlocks(fraction=0.5)" in got["r:cached"]["what"]
    assert "pipelined_s" not in got["r:sparse"]
