"""Pass 4: rewrite one attention site into the site ops.

The ops are handed in (:class:`SiteOps`), so this pass knows nothing of the runtime or of policies. Each
op takes the state id and site id as plain ints; at run time it looks up the site's current symbols and
caches in the state, so one graph serves every denoising step.

* a graph with a timestep input gets one ``clock(timestep, state)`` node (:func:`insert_clock`), whose
  output every site op takes as its argument ``clock`` (None without one): it orders the clock before the
  sites, so the runtime knows the step before any site runs;
* every site op also takes ``ident``: the weight of one of the site's projections (a graph input), whose
  storage tells apart the modules that run one compiled graph (regional compilation), or None;
* the SDPA node becomes ``attention(q, k, v, mask, state, site, scale, clock, ident)``;
* each q projection with a valid ``row_offset`` becomes
  ``linear_q(x, W, b, state, site, row_offset, seq_q, head_dim, clock, ident)`` (GEMM-Q);
* each output projection becomes
  ``linear_o(a, W, b, state, site, row_offset, col_offset, seq_q, head_dim, clock, ident)`` (GEMM-O). When the linear reads ``cat([..., a, ...], -1)`` (FLUX single blocks: ``[attn ‖ mlp]``), it
  is split by linearity: GEMM-O over the attention columns plus a plain ``linear`` per other part on the
  matching column slice of ``W``, summed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from ._fx import linear_args, static_shape


@dataclass(frozen=True)
class SiteOps:
    attention: Any
    linear_q: Any
    linear_o: Any
    clock: Any = None


def insert_clock(gm: fx.GraphModule, timestep: fx.Node, ops: SiteOps, state_id: int) -> fx.Node:
    """Add ``clock(timestep, state)`` after the graph's placeholders; returns its node. A clock whose token no
    site op reads (a graph that holds the timestep but no site, e.g. before a graph break) must be kept
    alive by the caller (:func:`keep_alive`): dead-code elimination would drop it."""
    g = gm.graph
    last_ph = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last_ph):
        node = g.call_function(ops.clock, (timestep, state_id))
    return node


def rewrite_attention(gm: fx.GraphModule, site, ops: SiteOps, state_id: int, site_id: int, clock=None,
                      ident=None) -> fx.Node:
    g = gm.graph
    node = site.node
    with g.inserting_before(node):
        new = g.call_function(
            ops.attention,
            (site.q, site.k, site.v, site.mask, state_id, site_id, None if site.scale is None else float(site.scale), clock,
             ident),
        )
    new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.replace_all_uses_with(new)
    g.erase_node(node)
    site.node = new
    return new


def rewrite_linear_q(gm: fx.GraphModule, proj, site, ops: SiteOps, state_id: int, site_id: int, clock=None,
                     ident=None) -> fx.Node:
    g = gm.graph
    lin = proj.node
    x, w, b = linear_args(lin)
    with g.inserting_before(lin):
        new = g.call_function(ops.linear_q, (x, w, b, state_id, site_id, proj.row_offset, site.seq_q, site.head_dim, clock,
                                             ident))
    new.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
    lin.replace_all_uses_with(new)
    g.erase_node(lin)
    proj.node = new
    return new


def rewrite_linear_o(gm: fx.GraphModule, proj, site, ops: SiteOps, state_id: int, site_id: int, clock=None,
                     ident=None) -> fx.Node:
    g = gm.graph
    lin = proj.node
    _, w, b = linear_args(lin)
    with g.inserting_before(lin):
        y = g.call_function(
            ops.linear_o,
            (proj.head_input, w, b, state_id, site_id, proj.row_offset, proj.col_offset, site.seq_q, site.head_dim,
             clock, ident),
        )
        if proj.cat_node is not None:
            parts = proj.cat_node.args[0] if proj.cat_node.args else proj.cat_node.kwargs["tensors"]
            off = 0
            for part in parts:
                width = static_shape(part)[-1]
                if part is not proj.head_input:
                    w_part = g.call_function(operator.getitem, (w, (slice(None), slice(off, off + width))))
                    y_part = g.call_function(torch._C._nn.linear, (part, w_part, None))
                    y = g.call_function(operator.add, (y, y_part))
                off += width
    y.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
    lin.replace_all_uses_with(y)
    g.erase_node(lin)
    if proj.cat_node is not None and not proj.cat_node.users:
        g.erase_node(proj.cat_node)
    proj.node = y
    return y


def identity_weight(site, walk) -> Optional[fx.Node]:
    """The graph input that tells apart the modules running this site: the weight of its first q (else k,
    else v) projection, when that weight enters the graph as an input (a placeholder: a parameter); None
    otherwise (a weight computed in the graph would change storage every call)."""
    if walk is None:
        return None
    for projs in (walk.q_projections, walk.k_projections, walk.v_projections):
        for p in projs:
            w = linear_args(p.node)[1]
            if isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr"):
                return w
    return None


def keep_alive(gm: fx.GraphModule, node: fx.Node) -> None:
    """Return ``node`` as one more graph output, so no pass drops it; the runner strips it again
    (``omni_compile.backend``)."""
    g = gm.graph
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    (value,) = out.args
    out.args = ((*value, node) if isinstance(value, (tuple, list)) else (value, node),)
