"""The backend under diffusers' context parallelism, on 2 CPU ranks (gloo, one spawn for the module).

Each rank compiles the tiny FLUX (Ulysses and ring) or Wan (Ulysses) with ``backend="flashomni"`` after
``model.enable_parallelism(...)`` and runs a 7-step loop per policy on that one graph (``tests/_cp.py``):

* ``policy="dense"``: every rank's latents equal the single-process eager loop;
* ``fixed`` and ``flashomni``: every rank's latents equal the single-process loop run with the same bits
  (the ranks' decisions, mapped to the single process's token order) on every step, dispatch steps
  included, and differ from the dense loop (the sparsity is real);
* no recompiles (the policies switch under ``fail_on_recompile``);
* collectives: dispatch steps issue exactly what the dense loop issues (diffusers' own), update steps one
  more per site where the runtime exchanges (Ulysses: the GEMMs' reuse bits; ring with a score-reading
  policy: the pooled scores).
"""

from __future__ import annotations

import pytest
import torch

import _cp

WORLD = 2
CASES = [
    ("flux", "ulysses", ("dense", "fixed", "flashomni")),
    ("flux", "ring", ("dense", "fixed", "flashomni")),
    ("wan", "ulysses", ("dense", "fixed")),
]
SPARSE = [(c, p) for c in CASES for p in c[2] if p != "dense"]
ATOL = 1e-5


def _id(case):
    return f"{case[0]}-{case[1]}"


@pytest.fixture(scope="module")
def ranks():
    """``[{case: result}]`` per rank: every case, run once on ``WORLD`` processes."""
    got = _cp.run_ranks(CASES, WORLD)
    for r, res in enumerate(got):
        for case in CASES:
            assert case in res and "error" not in res[case], f"rank {r}, {case}: {res.get(case, {}).get('error')}"
    return got


@pytest.fixture(scope="module")
def single(ranks):
    """The single-process loops, one compile per family: eager (``None``), the loop with the ranks' bits
    per (case, policy), and FLUX's own flashomni decision (``"own"``, its bits recorded)."""
    out = {}
    for family in ("flux", "wan"):
        out[family, None] = _cp.eager_loop(family)
        keys, policies = [], []
        for case, policy in SPARSE:
            if case[0] == family:
                keys.append((family, case, policy))
                policies.append(_cp.Replay(_cp.replay_bits([r[case] for r in ranks], policy)))
        if family == "flux":
            keys.append((family, "own"))
            policies.append(_cp.Recorder("flashomni"))
        for key, policy, res in zip(keys, policies, _cp.single_loops(family, policies)):
            out[key] = res
            if isinstance(policy, _cp.Recorder):
                out[key + ("bits",)] = policy.bits
    return out


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_dense_loop_equals_the_single_process_loop(ranks, single, case):
    ref = single[case[0], None]
    for r in range(WORLD):
        outs = ranks[r][case]["loops"]["dense"]
        for step, (a, b) in enumerate(zip(outs, ref)):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=lambda m: f"rank {r} step {step}: {m}")


@pytest.mark.parametrize("case,policy", SPARSE, ids=[f"{_id(c)}-{p}" for c, p in SPARSE])
def test_sparse_loop_equals_the_single_process_loop_with_the_same_bits(ranks, single, case, policy):
    outs_single, _, _ = single[case[0], case, policy]
    dense = single[case[0], None]
    res = ranks[0][case]
    assert res["actions"] == ["dense", "update", "dispatch", "dispatch", "update", "dispatch", "dispatch"]
    # the bits made a difference: the sparse loop is not the dense one
    assert (outs_single[-1] - dense[-1]).abs().max() > 1e-3
    for r in range(WORLD):
        outs = ranks[r][case]["loops"][policy]
        for step, (a, b) in enumerate(zip(outs, outs_single)):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=lambda m: f"rank {r} step {step}: {m}")
        # every rewritten site ran its dispatch steps sparse: attention, and the GEMMs the passes found
        for site in ranks[r][case]["sites"]:
            calls = site["sparse_calls"]
            assert calls["attention"] > 0, site["name"]
            assert (calls["linear_q"] > 0) == site["gemm_q"] and (calls["linear_o"] > 0) == site["gemm_o"], site


def test_the_passes_find_every_site_through_the_collectives(ranks):
    for r in range(WORLD):
        flux = {s["name"]: s for s in ranks[r][CASES[0]]["sites"]}
        assert sorted(flux) == ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]
        for s in flux.values():
            # Ulysses: this rank's head over all 96 tokens, text and vision of each rank's shard in turn
            assert (s["kind"], s["gemm_q"], s["gemm_o"], s["heads"], s["seq_q"]) == ("joint", True, True, 1, 96)
            assert s["segments"] == [("text", 0, 16), ("vision", 16, 48), ("text", 48, 64), ("vision", 64, 96)]
            assert s["cp"]["mode"] == "ulysses" and s["cp"]["rank"] == r
        for s in ranks[r][CASES[1]]["sites"]:
            # ring: every head over this rank's 48 queries, the keys of both ranks
            assert (s["kind"], s["gemm_q"], s["gemm_o"], s["heads"], s["seq_q"], s["seq_kv"]) == ("joint", True, True, 2, 48, 96)
            assert s["segments"] == [("text", 0, 16), ("vision", 16, 48)]
            assert s["kv_segments"] == [("text", 0, 16), ("vision", 16, 48), ("text", 48, 64), ("vision", 64, 96)]
        wan = {s["name"]: s for s in ranks[r][CASES[2]]["sites"]}
        # blocks.1 runs in another graph than blocks.0 (diffusers' split hook breaks Dynamo's frame there):
        # each module is still its own site, named by its path in the model
        assert sorted(wan) == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
        for name, s in wan.items():
            # Wan normalises q over all heads of a token, before the all-to-all: GEMM-Q holds where every head
            # reuses (as in one process); its cross-attention is not parallel in diffusers (each rank attends
            # its own queries to all text keys)
            assert (s["gemm_q"], s["gemm_o"]) == (True, True)
            assert (s["cp"] or {}).get("mode") == ("ulysses" if name.endswith("attn1") else None)
            if name.endswith("attn2"):
                assert s["kv_segments"] == [("text", 0, 8)]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_no_collective_on_dispatch_steps_and_one_per_site_on_updates(ranks, case):
    for r in range(WORLD):
        res = ranks[r][case]
        dense = res["collectives"]["dense"][1]  # diffusers' own per call (step 0 also traced the graph)
        assert all(n == dense for n in res["collectives"]["dense"][1:])
        for policy in case[2][1:]:
            exchanging = [s for s in res["sites"] if s["cp"] and (
                s["cp"]["mode"] == "ulysses" and (s["gemm_q"] or s["gemm_o"])
                or s["cp"]["mode"] == "ring" and policy == "flashomni")]  # ring: only score-reading policies
            if case[1] == "ulysses":
                assert exchanging, "every Ulysses site here has a GEMM: each exchanges on updates"
            for step, (action, n) in enumerate(zip(res["actions"], res["collectives"][policy])):
                extra = len(exchanging) if action == "update" else 0
                assert n == dense + extra, f"rank {r} {policy} step {step} ({action}): {n} collectives"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_one_compile_serves_every_policy(ranks, case):
    # the later policies ran under fail_on_recompile; FLUX is one graph, Wan seven (diffusers' hooks break
    # Dynamo's frame at blocks.0 and around it)
    assert all(ranks[r][case]["compiles"] == (1 if case[0] == "flux" else 7) for r in range(WORLD))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "flux"], ids=_id)
def test_each_rank_holds_its_share_of_the_caches(ranks, single, case):
    """Per rank: ``memory_bytes()`` is what its report lists; the GEMM-O caches are over its own rows, so
    the ranks together hold what one process holds, plus the reuse bits each rank gathers (Ulysses)."""
    _, mem_single, _ = single[case[0], case, "fixed"]
    mems = []
    for r in range(WORLD):
        rep = ranks[r][case]["reports"]["fixed"]
        mem = ranks[r][case]["memory"]["fixed"]
        assert mem == rep.memory_bytes == sum(s["cache_bytes"] for s in rep.sites)
        assert rep.cp == {"mode": case[1], "size": WORLD, "rank": r}
        assert f"rank {r} of {WORLD}" in rep.format()
        mems.append(mem)
    assert max(mems) < mem_single
    bits = sum(mems) - mem_single  # symbol bits: each rank's own, plus (Ulysses) the gathered ones
    assert 0 <= bits < 0.02 * mem_single, (mems, mem_single)


def test_flashomni_decides_under_context_parallelism_what_it_decides_in_one_process(ranks, single):
    """The content-adaptive policy reads the same pooled scores per head (Ulysses) or over every rank's
    queries (ring): its bits equal a single process's own decision, not only its replay."""
    for case in CASES[:2]:
        per_rank = [r[case] for r in ranks]
        cp_bits = _cp.replay_bits(per_rank, "flashomni")
        own = single["flux", "own", "bits"]
        assert sorted(cp_bits) == sorted(own)
        for key, (reuse, skip) in own.items():
            assert torch.equal(cp_bits[key][0], reuse) and torch.equal(cp_bits[key][1], skip), (case, key)
        assert any(r.any() for r, _ in own.values())  # it reused something
