"""Context parallelism beyond the 2-rank cases of ``test_context_parallel.py`` (slow: a spawn of 4 ranks on
a 2-core machine, and a second compile for block caching): 4 ranks under Ulysses and ring, and whole-block
caching (``FixedBlocks``) under Ulysses."""

from __future__ import annotations

import pytest
import torch

import _cp
from omni_compile import FixedBlocks

pytestmark = pytest.mark.slow

ATOL = 1e-5
FOUR = [("flux4", "ulysses", ("dense", "fixed", "flashomni")), ("flux4", "ring", ("dense", "flashomni"))]
BLOCKS = ("flux", "ulysses", ("dense", "fixed"), (("block_cache", FixedBlocks(0.5)),))


def _check(per_rank, case, config=()):
    """Every rank equals the single process with the same config: dense, and the sparse policies with the
    ranks' bits; and no collective beyond diffusers' own on dispatch steps."""
    sparse = [p for p in case[2] if p != "dense"]
    singles = _cp.single_loops(case[0], ["dense"] + [_cp.Replay(_cp.replay_bits(per_rank, p)) for p in sparse],
                               config)
    refs = dict(zip(["dense"] + sparse, [s[0] for s in singles]))
    for r, res in enumerate(per_rank):
        assert "error" not in res, res.get("error")
        for policy in case[2]:
            for step, (a, b) in enumerate(zip(res["loops"][policy], refs[policy])):
                torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=lambda m: f"rank {r} {policy} {step}: {m}")
            for action, n, base in zip(res["actions"], res["collectives"][policy], res["collectives"]["dense"]):
                if action == "dispatch":
                    assert n == base
    return refs


def test_four_ranks_ulysses_and_ring_equal_one_process():
    got = _cp.run_ranks(FOUR, world=4)
    for case in FOUR:
        per_rank = [r[case] for r in got]
        refs = _check(per_rank, case)
        assert (refs["flashomni"][-1] - refs["dense"][-1]).abs().max() > 1e-3
        assert all(s["cp"]["size"] == 4 and s["gemm_q"] and s["gemm_o"] for s in per_rank[0]["sites"])


def test_fixed_blocks_skip_the_same_blocks_on_every_rank():
    """Block caching decided alike on every rank: a cached block's collectives are skipped on all of them
    (a rank that ran it alone would wait forever), and the loop equals one process with the same setting."""
    (r0, r1) = (r[BLOCKS] for r in _cp.run_ranks([BLOCKS], world=2))
    _check([r0, r1], BLOCKS, BLOCKS[3])
    for res in (r0, r1):
        assert res["skipped_blocks"]["fixed"] > 0
        disp = [n for a, n in zip(res["actions"], res["collectives"]["fixed"]) if a == "dispatch"]
        assert max(disp) < res["collectives"]["dense"][1]  # the cached block's all-to-alls did not run
