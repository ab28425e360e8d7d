"""The coverage sweep: the ``flashomni`` backend on diffusers transformer families beyond the eight of
``test_backend_families.py``, each a tiny config built through its class's real constructor and called with
its pipeline's own inputs, masks, timestep convention and CFG form (``_tiny_families.py``).

Per family, one compile (``_coverage.check_family``): the sites found equal the SDPA calls eager makes; the
rewritten / GEMM-Q / GEMM-O counts are exact; the ``policy="dense"`` output equals eager; fresh inputs do
not recompile; and a six-step sparse loop dispatches on the sites listed, with a finite output that differs
from the dense one. docs/passes.md's coverage table is ``tools/passes_coverage.py``'s output of the same
check, and :func:`test_the_docs_table_matches` keeps the two in step.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import _coverage as C
import _tiny_families as TF

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

# family: (SDPA sites, rewritten, rewritten with a q projection, GEMM-Q, GEMM-O, sites that dispatch in the loop)
EXPECTED = {
    "chroma": (2, 2, 2, 2, 2, 2),
    "mochi": (3, 0, 0, 0, 0, 0),
    "lumina2": (3, 3, 3, 3, 3, 3),
    "lumina_next": (2, 2, 2, 2, 1, 2),
    "sana": (1, 1, 1, 1, 1, 1),
    "sana_video": (1, 1, 1, 1, 1, 1),
    "auraflow": (2, 2, 2, 2, 2, 2),
    "hidream": (2, 2, 2, 2, 2, 2),
    "hunyuandit": (4, 4, 4, 4, 4, 4),
    "allegro": (2, 2, 2, 2, 2, 2),
    "ltx2": (6, 6, 6, 6, 6, 6),
    "cogview3plus": (1, 1, 1, 1, 1, 1),
    "cogview4": (1, 1, 1, 1, 1, 1),
    "cosmos": (2, 2, 2, 2, 2, 2),
    "easyanimate": (1, 1, 1, 1, 1, 1),
    "skyreels_v2": (2, 2, 2, 2, 2, 2),
    "wan_vace": (4, 4, 4, 4, 4, 4),
    "chronoedit": (3, 3, 3, 1, 2, 3),
    "qwenimage": (1, 1, 1, 1, 1, 1),
    "flux2": (2, 2, 2, 2, 2, 2),
    "omnigen": (1, 1, 1, 1, 1, 1),
    "stable_audio": (2, 2, 2, 2, 2, 2),
    "latte": (3, 3, 3, 3, 3, 3),
    "consisid": (1, 1, 1, 1, 1, 1),
    "hunyuan_framepack": (3, 3, 3, 3, 3, 3),
    "hunyuan_image": (3, 3, 3, 3, 3, 3),
    "hunyuan_video15": (2, 2, 2, 2, 2, 2),
    "kandinsky5": (3, 3, 3, 3, 3, 3),
    "bria": (2, 2, 2, 2, 2, 2),
    "prx": (1, 1, 1, 1, 1, 1),
    "z_image": (3, 3, 3, 3, 3, 3),
}

#: text/vision splits the passes must find: (site, kind, segments, kv_segments)
SEGMENTS = {
    # 8 learned register tokens prepended to the 8 prompt tokens: 16 text tokens before 64 image tokens
    "auraflow": ("single_transformer_blocks.0.attn", "joint", [("text", 0, 16), ("vision", 16, 80)],
                 [("text", 0, 16), ("vision", 16, 80)]),
    # 16 image tokens, as many as the CLIP + T5 text tokens: told apart by where they come from
    "hunyuandit": ("blocks.1.attn1", "self", [("vision", 0, 16)], [("vision", 0, 16)]),
    # image queries; keys are the text's rows of one fused projection, then the image's of another
    "prx": ("blocks.0.attention", "cross", [("vision", 0, 16)], [("text", 0, 8), ("vision", 8, 24)]),
}

#: families that stay dense, each with words of the reason the user is told
EXCEPTIONS = {
    # its processor loops over batch items and calls torch.nonzero: the attention runs in no compiled graph
    "mochi": "breaks the graph inside attention code at attention_processor.py",
}

@pytest.mark.parametrize("family", TF.FAMILIES)
def test_family(family):
    row = C.check_family(family)
    assert not row.error, row.error
    sites, rewritten, with_q, gemm_q, gemm_o, dispatching = EXPECTED[family]
    assert row.sdpa_calls == sites
    if family in EXCEPTIONS:  # the user is told, by a warning, and the sites it reaches say why
        assert any(EXCEPTIONS[family] in w for w in row.warnings), row.warnings
    else:
        assert row.sites == row.sdpa_calls  # every attention call of a forward is a site of some graph
    assert (row.rewritten, row.q_projections, row.gemm_q, row.gemm_o) == (rewritten, with_q, gemm_q, gemm_o), row.reasons
    assert row.dense_max_diff < 1e-4
    if family in SEGMENTS:
        name, kind, segs, kv = SEGMENTS[family]
        assert row.segments[name] == (kind, segs, kv)
    assert not row.recompiled
    assert row.dispatch_sites == dispatching, row.reasons
    assert row.sparse_finite
    if row.dispatch_sites:
        assert row.sparse_max_diff > 1e-3  # the dispatch steps really skipped work


def test_the_docs_table_matches():
    """docs/passes.md's coverage table (written by tools/passes_coverage.py) says what EXPECTED says."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "passes.md")).read()
    rows = {}
    for line in doc.splitlines():
        m = re.match(r"\| (\w+) \(`\w+`\) \| [^|]* \| (\d+) \| (\d+) \| (\d+)/(\d+) \| (\d+) \| "
                     r"(sparse \((\d+)/\d+ sites\)|dense)", line)
        if m:
            s, rw, q, with_q, o = (int(x) for x in m.group(2, 3, 4, 5, 6))
            rows[m.group(1)] = (s, rw, with_q, q, o, int(m.group(8) or 0))
    assert rows == EXPECTED


def test_sweep_meets_the_coverage_targets():
    """At most one family stays dense (a documented exception, the user warned), and GEMM-Q covers every q
    projection in at least 80 % of the families whose attention has one, by the expectations the sweep
    asserts."""
    assert len(EXPECTED) >= 20 and set(EXPECTED) == set(TF.FAMILIES)
    dense = [f for f, e in EXPECTED.items() if not e[5]]
    assert set(dense) <= set(EXCEPTIONS) and len(EXCEPTIONS) <= 1
    with_q = [e for e in EXPECTED.values() if e[2]]
    assert sum(1 for e in with_q if e[3] == e[2]) >= 0.8 * len(with_q)


# one family per q-chain form that gained GEMM-Q, with a reuse fraction that reuses some vision blocks
GEMM_Q_FORMS = {
    "allegro": 0.75,      # rotate-half RoPE: cat([-x2, x1], -1)
    "qwenimage": 0.75,    # complex RoPE: view_as_complex / view_as_real (and two-call CFG of two text lengths)
    "flux2": 0.75,        # q, k, v and the MLP input in one linear
    "prx": 0.75,          # q, k, v in one linear, read through reshape + permute + index; per-item text masks
    "skyreels_v2": 0.5,   # rms_norm over all heads (token-local): heads reuse different blocks at 0.5
    "sana_video": 0.5,    # a hand-written RMSNorm's mean over all heads
}


@pytest.mark.parametrize("family", sorted(GEMM_Q_FORMS))
def test_gemm_q_changes_no_value(family):
    """GEMM-Q leaves unwritten only tiles nothing reads: the sparse loop's outputs with it equal those
    without it bit for bit, while its dispatch steps really skip q tiles."""
    with_q, state = C.sparse_loop(family, reuse=GEMM_Q_FORMS[family])
    without_q, _ = C.sparse_loop(family, reuse=GEMM_Q_FORMS[family], gemm_q=False)
    for a, b in zip(with_q, without_q):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    sites = [s for s in state.sites if s.gemm_q]
    assert sites
    skipped = 0.0
    for s in sites:
        for ss in s.streams.values():
            assert ss.sparse_calls["linear_q"] > 0
            skipped += (ss.q_symbols if s.q_mixes_heads else ss.symbols).reuse_fraction()
    assert skipped > 0  # GEMM-Q left tiles unwritten on the dispatch steps
    if family in ("skyreels_v2", "sana_video"):
        assert all(s.q_mixes_heads for s in sites)
