"""The passes on diffusers' context-parallel graphs, in this process: torch's fake process group lets Dynamo
trace a rank's graph without peers (its collectives return garbage, so nothing here reads values), and the
rules of the all-to-all and the ring rewrite on hand-made graphs."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.distributed as dist
from torch import fx

import _cp
import omni_compile
from omni_compile.passes import _layout as lay
from omni_compile.passes import cp as pcp

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture
def fake_rank(monkeypatch):
    """``fake_rank(rank, world)``: this process as that rank of a fake process group (torch's testing
    backend: collectives do nothing), torn down after the test."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)  # see omni_compile.bench.parallel.init

    def init(rank, world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def _plans(family, mode, ulysses=1, ring=1):
    from diffusers import ContextParallelConfig

    from omni_compile.bench import parallel

    if ring > 1:
        parallel.ring_on_cpu()
    model, inputs, x0 = _cp.build(family)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring),
                             cp_plan=parallel.cp_plan(model))
    state = omni_compile.OmniState(omni_compile.OmniConfig(policy="dense", use_inductor=False, block_q=16, block_kv=16))
    with torch.no_grad():
        torch.compile(model, backend="flashomni", options={"state": state})(**inputs(x0, 1.0))
    return {p.name: p for p in state.plans}


def test_ulysses_rank_1_projects_its_own_rows_of_the_rank_major_sequence(fake_rank):
    fake_rank(1, 2)
    plans = _plans("flux", "ulysses", ulysses=2)
    double, single = plans["transformer_blocks.0.attn"], plans["single_transformer_blocks.0.attn"]
    # rank 1's shard (16 text + 32 image tokens) sits at 48..96 of the attention's 96 rank-major tokens
    assert double.q_projections == [("transformer_blocks.0.attn.to_q", 64), ("transformer_blocks.0.attn.add_q_proj", 48)]
    assert double.out_projections == [("transformer_blocks.0.attn.to_out.0", 64, 32, 0),
                                      ("transformer_blocks.0.attn.to_add_out", 48, 16, 0)]
    assert single.q_projections == [("single_transformer_blocks.0.attn.to_q", 48)]
    assert single.out_projections == [("single_transformer_blocks.0.proj_out", 48, 48, 0)]
    for p in (double, single):
        assert (p.kind, p.heads, p.seq_q, p.gemm_q, p.gemm_o) == ("joint", 1, 96, True, True)
        assert p.cp == {"mode": "ulysses", "size": 2, "group": p.cp["group"], "rank": 1, "seq_local": 48,
                        "heads_local": 1}


def test_ring_becomes_one_attention_over_every_rank_keys(fake_rank):
    fake_rank(1, 2)
    plans = _plans("flux", "ring", ring=2)
    double = plans["transformer_blocks.0.attn"]
    assert (double.kind, double.heads, double.seq_q, double.seq_kv) == ("joint", 2, 48, 96)
    # queries and GEMM rows are this rank's own; keys are rank 0's shard, then rank 1's
    assert double.q_projections == [("transformer_blocks.0.attn.to_q", 16), ("transformer_blocks.0.attn.add_q_proj", 0)]
    assert double.segments == [("text", 0, 16), ("vision", 16, 48)]
    assert double.kv_segments == [("text", 0, 16), ("vision", 16, 48), ("text", 48, 64), ("vision", 64, 96)]
    assert double.cp["mode"] == "ring" and double.cp["rank"] == 1


def test_ulysses_with_ring_is_left_dense_with_the_reason(fake_rank):
    fake_rank(0, 4)
    plans = _plans("flux", "unified", ulysses=2, ring=2)
    assert plans and all(not p.rewritten and "both ulysses_degree and ring_degree" in p.reason for p in plans.values())


# ---- the rules on hand-made graphs ------------------------------------------------------------------------


def _a2a(splits):
    g = fx.Graph()
    x = g.placeholder("x")
    return g.call_function(torch.ops._c10d_functional.all_to_all_single, (x, splits, splits, "0"))


def test_all_to_all_turns_the_outer_head_factor_into_the_source_rank_and_back():
    # [P·H/P·D] flattened with the rank's heads outermost, as diffusers' Ulysses lays them out
    before = ((lay.h_atom(2, 4), lay.s_atom("to_q", 0, 8), lay.h_atom(4), lay.Atom("D", 16)),)
    after = lay.collective_layout(_a2a([256, 256]), before, "a2a")
    r = after[0][0]
    assert (r.kind, r.size, r.key) == ("R", 2, ("0", 4))
    back = lay.collective_layout(_a2a([256, 256]), after, "a2a")
    assert back == before
    # a token axis in front is no head exchange; uneven splits are not Ulysses' equal shards
    with pytest.raises(lay.NotLocal, match="neither a head factor"):
        lay.collective_layout(_a2a([256, 256]), ((lay.Atom("B", 2),) + before[0][1:],), "a2a")
    with pytest.raises(lay.NotLocal, match="uneven"):
        lay.collective_layout(_a2a([300, 212]), before, "a2a")
    # the R atom is a token atom: a reshape cannot split it
    with pytest.raises(lay.NotLocal, match="splits the token axis"):
        lay.regroup(((lay.Atom("R", 4, ("0", 1)),),), (2, 2), "reshape")


def test_spread_repeats_a_shard_layout_per_rank_and_merges_neighbours():
    assert pcp.spread([("text", 0, 4), ("vision", 4, 12)], 12, 2) == [
        ("text", 0, 4), ("vision", 4, 12), ("text", 12, 16), ("vision", 16, 24)]
    assert pcp.spread([("vision", 0, 16)], 16, 4) == [("vision", 0, 64)]


def test_a_ring_group_with_a_mask_is_left_as_it_is():
    """Only the maskless form is rewritten: a group whose calls carry a mask keeps its calls."""
    g = fx.Graph()
    q, k, m = g.placeholder("q"), g.placeholder("k"), g.placeholder("mask")
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for _ in range(2):
        c = g.call_function(op, (q, k, k, 0.0, False), {"attn_mask": m})
        g.call_function(operator.getitem, (c, 0))
    g.output(None)
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert pcp.canonicalize_ring(gm) == 0
    assert sum(n.target is op for n in gm.graph.nodes) == 2
