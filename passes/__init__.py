"""``omni_compile.passes``: FX passes over Dynamo's torch-level graph (one pass per module).

1. :mod:`.find_sites` — find every SDPA call and check it can be run by the ops;
2. :mod:`.walk` — walk back to the q/k/v projections (GEMM-Q validity) and forward to the output
   projections (GEMM-O validity);
3. :mod:`.classify` — joint / self / cross, and the text/vision token split;
4. :mod:`.rewrite` — replace the site's SDPA, q projections and output projections by the site ops.

This package knows no sparsity strategy and no runtime: the ops to rewrite into are passed in.
"""

from .classify import classify, text_length, timestep_input, token_grid
from .find_sites import SKIP_COUNTS, AttentionSite, find_sites
from .rewrite import (SiteOps, identity_weight, insert_clock, keep_alive, rewrite_attention, rewrite_linear_o,
                      rewrite_linear_q)
from .walk import OutProjection, Projection, SiteWalk, walk_kv, walk_out, walk_q

__all__ = [
    "AttentionSite", "find_sites", "SKIP_COUNTS", "Projection", "OutProjection", "SiteWalk", "walk_q",
    "walk_kv", "walk_out", "classify", "text_length", "timestep_input", "token_grid", "SiteOps", "identity_weight",
    "insert_clock", "keep_alive", "rewrite_attention", "rewrite_linear_q", "rewrite_linear_o",
]
