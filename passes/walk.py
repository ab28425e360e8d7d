"""Pass 2: walk from an attention site back to its q/k/v projections and forward to its output projections.

Backward (per q, k, v): breadth-first from the SDPA argument through every input (and through in-place
writes such as Wan's RoPE ``out[..., 0::2] = ...``), stopping at ``linear`` nodes. The linears whose
output is ``[B, S, H*D]`` are the projections; the nodes both downstream of a projection and upstream of
the SDPA argument form the *prologue chain*. For q, the chain is then checked op by op with the layout
tracker (``_layout.py``): GEMM-Q is valid only if every op is per-(token, head) local, the token axis at
the SDPA is exactly the projections' rows (concatenated, e.g. text then image), and nothing else reads
the projection output. Each projection gets its ``row_offset`` in the attention's query sequence.

Forward (output): from the SDPA output through layout ops (permute/flatten/split/slice/cat) to the
``linear`` nodes that consume its heads. A consumer qualifies when its input's feature axis holds all
heads in order (``H`` outer, ``D`` inner) — directly, or as one part of a feature-axis ``cat`` (FLUX
single blocks: ``proj_out(cat([attn, mlp]))``) — and its token axis is one contiguous row range of the
attention output. GEMM-O is valid only if every use of the attention output ends in such linears.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from torch import fx

from . import _layout as lay
from ._fused import FusedSlice, fused_slice
from ._fx import (
    is_linear,
    is_metadata_use,
    is_mutation,
    linear_args,
    module_path,
    mutations_of,
    op_name,
    static_shape,
)

log = logging.getLogger("omni_compile.passes")


@dataclass
class Projection:
    """One projection linear feeding q (or k/v) and where its rows land in the attention sequence."""

    node: fx.Node
    name: str  # module path, e.g. transformer_blocks.0.attn.to_q
    rows: int
    row_offset: Optional[int] = None  # None when the rows do not map 1:1 onto attention positions
    fused: Optional[FusedSlice] = None  # q's columns of a fused linear (``_fused``); None: a plain H*D linear


@dataclass
class OutProjection:
    """A linear that consumes the attention heads (GEMM-O candidate)."""

    node: fx.Node  # the linear
    name: str
    head_input: fx.Node  # the tensor [B, rows, H*D] holding the heads (the linear's input or a cat part)
    row_offset: int
    rows: int
    col_offset: int  # where the heads start in the linear's input features
    cat_node: Optional[fx.Node] = None  # the feature-axis cat feeding the linear, if any


@dataclass
class SiteWalk:
    q_projections: list = field(default_factory=list)
    k_projections: list = field(default_factory=list)
    v_projections: list = field(default_factory=list)
    gemm_q: bool = False
    gemm_q_reason: Optional[str] = None
    out_projections: list = field(default_factory=list)
    gemm_o: bool = False
    gemm_o_reason: Optional[str] = None
    q_chain: set = field(default_factory=set)


def _preds(node: fx.Node) -> list:
    """Data predecessors, counting in-place writes into ``node`` as predecessors."""
    out = list(node.all_input_nodes)
    for m in mutations_of(node):
        out.append(m)
    return out


def find_projections(start: fx.Node, heads: int, head_dim: int):
    """Linears reached backwards from ``start`` without crossing another linear: ``(projections, visited,
    wide)`` — projections have output ``[B, S, heads*head_dim]``, ``wide`` ones ``[B, S, N > heads*head_dim]``
    (fused projection candidates, ``_fused``); ``visited``: every node reached."""
    seen, stack, projs, wide = {start}, [start], [], []
    while stack:
        n = stack.pop()
        if is_linear(n) and n is not start:
            shp = static_shape(n)
            if shp is not None and len(shp) == 3 and shp[-1] == heads * head_dim:
                projs.append(n)
            elif shp is not None and len(shp) == 3 and shp[-1] > heads * head_dim:
                wide.append(n)
            continue
        if n.op in ("placeholder", "get_attr"):
            continue
        for p in _preds(n):
            if p not in seen:
                seen.add(p)
                stack.append(p)
    projs.sort(key=lambda n: _order(n))
    wide.sort(key=lambda n: _order(n))
    return projs, seen, wide


def _order(n: fx.Node) -> int:
    g = n.graph
    cache = g.__dict__.setdefault("_omni_order", {})
    if not cache or n not in cache:
        cache.clear()
        cache.update({m: i for i, m in enumerate(g.nodes)})
    return cache[n]


def _descendants(roots) -> set:
    seen, stack = set(roots), list(roots)
    while stack:
        n = stack.pop()
        for u in n.users:
            targets = [u]
            if is_mutation(u, n):
                pass
            elif any(is_mutation(u, a) for a in u.all_input_nodes):
                targets.append(u.args[0])  # a value written into a tensor makes that tensor a descendant
            if is_metadata_use(u, n):
                continue
            for t in targets:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
    return seen


def walk_q(q: fx.Node, heads: int, head_dim: int, seq_q: int, mixing: Optional[list] = None,
           ulysses: Optional[dict] = None):
    """Projections of q and whether GEMM-Q is valid for them: returns (projections, ok, reason, chain).
    With ``mixing`` (a list), ops that mix the heads of one token are accepted and described there
    (``_layout`` module docstring: GEMM-Q then needs the same reuse decision for every head). Fused
    projections (``_fused``) are tried where the plain ones alone do not make GEMM-Q valid.
    ``ulysses`` (``passes.cp.detect_ulysses``): ``heads`` are the heads this rank attends (H/P) over all
    ``seq_q`` tokens, the projections hold all H heads of this rank's ``seq_q / P`` tokens, and the row
    offsets are within that shard."""
    local_heads, heads = heads, heads * (ulysses["size"] if ulysses else 1)
    projs, visited, wide = find_projections(q, heads, head_dim)
    plain = [(Projection(p, module_path(p), static_shape(p)[1]), p, _head_layout(p, heads, head_dim)) for p in projs]
    fused, why_not_fused = [], None
    for w in wide:
        fs, why = fused_slice(w, heads, head_dim, visited)
        if fs is not None and fs.col_offset not in (0, fs.width - heads * head_dim):
            fs, why = None, f"q's columns lie inside `{module_path(w)}` (neither its first nor its last)"
        if fs is None:
            why_not_fused = why_not_fused or why
            continue
        fused.append((Projection(w, module_path(w), static_shape(w)[1], fused=fs), fs.slice_node, fs.layout))
    if not plain and not fused:
        return [], False, why_not_fused or "no q projection linear of width H*D found", set()
    tries = [plain, plain + fused] if plain and fused else [plain or fused]
    for i, cand in enumerate(tries):
        mixing_try = None if mixing is None else []
        got = _check_q(q, cand, visited, local_heads, seq_q, mixing_try, ulysses=ulysses)
        if got[1] or i == len(tries) - 1:
            if mixing is not None and got[1]:
                mixing.extend(mixing_try)
            return got
    raise AssertionError("unreachable")


def _head_layout(p: fx.Node, heads: int, head_dim: int) -> tuple:
    b, s, _ = static_shape(p)
    return (lay.Atom("B", b),), (lay.s_atom(p.name, 0, s),), (lay.h_atom(heads), lay.Atom("D", head_dim))


def _check_q(q: fx.Node, cand: list, visited: set, heads: int, seq_q: int, mixing: Optional[list],
             exclusive: bool = True, ulysses: Optional[dict] = None):
    """GEMM-Q validity for the projections ``cand`` (``(Projection, start node, start layout)``): the layout
    tracker over the chain from the start nodes to q (:func:`walk_q`'s result). ``heads`` are those q has
    at the attention (this rank's under ``ulysses``). ``exclusive=False`` lets other nodes read the chain
    (enough to place each projection's rows, as :func:`walk_kv` does)."""
    out = [pr for pr, _, _ in cand]
    starts = [n for _, n, _ in cand]
    layouts: dict = {n: layout for _, n, layout in cand}
    desc = _descendants(starts)
    chain = (visited & desc) | {q}
    chain -= set(starts)
    order = sorted(chain, key=_order)
    try:
        for n in order:
            if n.op != "call_function" and n.op != "call_method":
                raise lay.NotLocal(f"`{n.op}` {n.name} on the q chain")
            if is_mutation(n, n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else False:
                lay.check_mutation(n, layouts)
                continue
            layouts[n] = lay.propagate(n, layouts, mixing)
        # nothing outside the chain may read the projection outputs or the prologue
        allowed = chain | {u for u in q.users}
        for n in list(chain) + starts if exclusive else []:
            if n is q:
                continue
            for u in n.users:
                if u in allowed or is_metadata_use(u, n):
                    continue
                raise lay.NotLocal(
                    f"`{op_name(u)}` ({module_path(u) or u.name}) also reads the q projection/prologue"
                )
        ql = layouts.get(q)
        if ql is None or len(ql) != 4:
            raise lay.NotLocal("q at the attention is not a 4-D chain tensor")
        b_g, h_g, s_g, d_g = (lay.normalize(g) for g in ql)
        if lay.has_token_or_head(b_g) or lay.has_token_or_head(d_g):
            raise lay.NotLocal(f"q's batch/head-dim axes carry tokens or heads ({b_g}, {d_g})")
        if heads > 1 and h_g != (lay.h_atom(heads),):
            raise lay.NotLocal(f"q's head axis is not the projection's head split ({h_g})")
        if ulysses:
            s_g, seq_q = _strip_shards(s_g, ulysses, heads), seq_q // ulysses["size"]
        parts = s_g[0].key if len(s_g) == 1 and s_g[0].kind == "CAT" else (s_g,)
        off = 0
        for part in parts:
            if len(part) != 1 or part[0].kind != "S":
                raise lay.NotLocal(f"q's token axis is not made of projection rows ({s_g})")
            a = part[0]
            for pr in out:
                if pr.node.name == a.key[0] and a.key[1] == 0 and a.size == pr.rows and pr.row_offset is None:
                    pr.row_offset = off
            off += a.size
        missing = [pr.name for pr in out if pr.row_offset is None]
        if missing:
            raise lay.NotLocal(f"rows of {missing} do not map one-to-one onto query positions")
        if off != seq_q:
            raise lay.NotLocal("q's token axis does not cover the query sequence")
    except lay.NotLocal as e:
        for pr in out:
            pr.row_offset = None
        return out, False, str(e), chain
    return out, True, None, chain


def _strip_shards(s_g: tuple, ulysses: dict, local_heads: int) -> tuple:
    """q's token axis under Ulysses without its outer ``R`` atom (the source rank): what remains must be
    this rank's projection rows, as without context parallelism."""
    r = s_g[0] if s_g else None
    if r is None or r.kind != "R" or r.size != ulysses["size"] or r.key != (ulysses["group"], local_heads):
        raise lay.NotLocal(f"q's token axis is not the context-parallel group's token shards ({s_g})")
    return tuple(s_g[1:])


def walk_kv(t: fx.Node, heads: int, head_dim: int, ulysses: Optional[dict] = None) -> list:
    """The linears k (or v) is computed from: projections of width H*D and fused ones wider than that, each
    with the ``row_offset`` of its rows in the key sequence where the layout tracker can follow them there
    (None elsewhere): PRX's keys are the text's and the image's rows of two fused projections. Under
    ``ulysses`` the projections hold all ``heads * P`` heads of this rank's token shard."""
    local_heads, heads = heads, heads * (ulysses["size"] if ulysses else 1)
    projs, visited, wide = find_projections(t, heads, head_dim)
    cand = [(Projection(p, module_path(p), static_shape(p)[1]), p, _head_layout(p, heads, head_dim)) for p in projs]
    others = []
    for w in wide:
        fs, _ = fused_slice(w, heads, head_dim, visited)
        pr = Projection(w, module_path(w), static_shape(w)[1])
        if fs is None:
            others.append(pr)
        else:
            cand.append((pr, fs.slice_node, fs.layout))
    shp = static_shape(t)
    if cand and shp is not None and len(shp) == 4:
        _check_q(t, cand, visited, local_heads, shp[2], [], exclusive=False, ulysses=ulysses)
    return sorted([pr for pr, _, _ in cand] + others, key=lambda pr: _order(pr.node))




def walk_out(o: fx.Node, heads: int, head_dim: int, seq_q: int, batch: int, ulysses: Optional[dict] = None):
    """Output projections fed by the attention output ``o``: returns (out_projections, ok, reason).
    ``ulysses``: the attention's tokens are the ranks' shards, rank-major, and the projections see all
    ``heads * P`` heads of this rank's shard (rows within the shard)."""
    tokens = (lay.s_atom("@out", 0, seq_q),)
    if ulysses:
        size = ulysses["size"]
        tokens = (lay.Atom("R", size, (ulysses["group"], heads)), lay.s_atom("@out", 0, seq_q // size))
    layouts = {o: ((lay.Atom("B", batch),), (lay.h_atom(heads),), tokens, (lay.Atom("D", head_dim),))}
    heads *= ulysses["size"] if ulysses else 1
    outs: list = []
    visited = {o}
    try:
        # walk users in graph order so every node's chain inputs are known before it is processed
        frontier = sorted(o.users, key=_order)
        pending = list(frontier)
        while pending:
            pending.sort(key=_order)
            n = pending.pop(0)
            if n in layouts:
                continue
            chain_in = [a for a in n.all_input_nodes if a in layouts]
            if chain_in and all(is_metadata_use(n, a) for a in chain_in):
                continue
            if is_linear(n):
                x, w, b = linear_args(n)
                if x not in layouts or w in layouts or b in layouts:
                    raise lay.NotLocal(f"attention output reaches `linear` {module_path(n)} other than as its input")
                outs.append(_out_projection(n, x, layouts, heads, head_dim))
                continue
            if n.op not in ("call_function", "call_method"):
                raise lay.NotLocal(f"attention output escapes to `{n.op}` {n.name}")
            if n.args and isinstance(n.args[0], fx.Node) and is_mutation(n, n.args[0]):
                raise lay.NotLocal(f"in-place write `{op_name(n)}` on the attention output path")
            layouts[n] = lay.propagate(n, layouts)
            for u in n.users:
                if u not in visited:
                    visited.add(u)
                    pending.append(u)
        if not outs:
            raise lay.NotLocal("no output projection consumes the attention heads")
    except lay.NotLocal as e:
        return outs, False, str(e)
    return outs, True, None


def _out_projection(lin: fx.Node, x: fx.Node, layouts: dict, heads: int, head_dim: int) -> OutProjection:
    name = module_path(lin)
    lx = layouts[x]
    if len(lx) != 3:
        raise lay.NotLocal(f"{name}: input is not [B, S, features]")
    b_g, s_g, f_g = (lay.normalize(g) for g in lx)
    if lay.has_token_or_head(b_g):
        raise lay.NotLocal(f"{name}: batch axis carries tokens or heads")
    if len(s_g) != 1 or s_g[0].kind != "S":
        raise lay.NotLocal(f"{name}: token axis is not one row range of the attention output ({s_g})")
    row_offset, rows = s_g[0].key[1], s_g[0].size
    heads_group = (lay.h_atom(heads),) if heads > 1 else ()

    def is_heads(g) -> bool:
        g = lay.normalize(g)
        hs = tuple(a for a in g if a.kind == "H")
        rest = [a for a in g if a.kind != "H"]
        if hs != heads_group or any(a.kind not in ("D",) for a in rest):
            return False
        if heads > 1 and g[0].kind != "H":
            return False
        return lay.dim_size(g) == heads * head_dim

    if is_heads(f_g):
        return OutProjection(lin, name, x, row_offset, rows, 0)
    if len(f_g) == 1 and f_g[0].kind == "CAT" and op_name(x) in ("cat", "concat"):
        off, found = 0, None
        for part in f_g[0].key:
            if is_heads(part):
                if found is not None:
                    raise lay.NotLocal(f"{name}: heads appear twice in its input")
                found = off
            elif lay.has_token_or_head(part):
                raise lay.NotLocal(f"{name}: input features mix heads with other data")
            off += lay.dim_size(part)
        if found is not None:
            tensors = x.args[0] if x.args else x.kwargs["tensors"]
            part_node = None
            acc = 0
            for t in tensors:
                w = static_shape(t)[-1]
                if acc == found and t in layouts:
                    part_node = t
                acc += w
            if part_node is None:
                raise lay.NotLocal(f"{name}: cannot isolate the heads in its input")
            return OutProjection(lin, name, part_node, row_offset, rows, found, cat_node=x)
    raise lay.NotLocal(f"{name}: its input features are not the attention heads in order ({f_g})")
