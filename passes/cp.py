"""Context parallelism in Dynamo's graph: diffusers' Ulysses and ring attention, as the passes see them.

diffusers (``ContextParallelConfig`` + ``model.enable_parallelism``) shards the token axis over ranks and
exchanges inside the attention call with functional collectives (``_c10d_functional.*``), which Dynamo
traces into the graph (inference, ``torch.no_grad()``). Two forms reach the backend:

* **Ulysses**: q/k/v ``[B, S/P, H, D]`` go through one ``all_to_all_single`` each, which trades the token
  shard for a head shard: the SDPA sees ``[B, H/P, S, D]`` with the tokens rank-major (global position
  ``r·S/P + j`` is row ``j`` of rank ``r``); its output goes back through one more all-to-all. The layout
  tracker follows this with an ``R`` atom: before the exchange the outer head
  factor of size P, after it the source rank of the token shard. So the walks see through the exchange:
  rank r's q projection (its S/P rows, all H heads) feeds positions ``r·S/P + j`` of every rank's attention.
* **ring** (``rotate_method="allgather"``): k and v are all-gathered once (``cat([k.flatten(),
  v.flatten()])``), then P attention calls with a log-sum-exp (``aten._scaled_dot_product_*``) over the
  local queries and each rank's keys, merged by ``sigmoid``/``logsigmoid``. :func:`canonicalize_ring`
  rewrites each such group into one ``scaled_dot_product_attention`` over all ranks' keys (the gathered
  chunks concatenated in rank order): the same value, and an SDPA node the other passes treat like any
  site, with local queries and global keys.

The layout tracker's rule for the all-to-all is in ``_layout.py`` (:func:`~._layout.collective_layout`),
with the ``R`` atom. The new SDPA node (ring) carries ``meta["omni_cp"]``; :func:`site_cp` gives both
forms' description (``{"mode", "size", "group", "rank"}``) to the backend.
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
from torch import fx

from ._fx import collective, example, group_size, is_linear, mutations_of, op_name, process_group, static_shape

log = logging.getLogger("omni_compile.passes")


def group_rank(name) -> int:
    import torch.distributed as dist

    return dist.get_rank(process_group(name))


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


# ---- which form a site has -------------------------------------------------------------------------------


def detect_ulysses(q: fx.Node) -> Optional[dict]:
    """The Ulysses exchange on the way to ``q``: the first ``all_to_all_single`` met walking back from q
    without crossing a linear. Returns ``{"mode": "ulysses", "size": P, "group": name}`` or None."""
    seen, stack = {q}, [q]
    while stack:
        n = stack.pop()
        if collective(n) == "all_to_all_single":
            in_s, group = _arg(n, 2, "input_split_sizes"), _arg(n, 3, "group_name")
            return {"mode": "ulysses", "size": len(in_s) if in_s is not None else group_size(group), "group": group}
        if is_linear(n) or n.op in ("placeholder", "get_attr"):
            continue
        for p in list(n.all_input_nodes) + mutations_of(n):
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return None


def site_cp(site) -> Optional[dict]:
    """How context parallelism shapes an attention site: ``{"mode": "ulysses" | "ring", "size": P,
    "group": process-group name, "rank": this rank in it}``, or None without it. Ulysses with ring
    (diffusers' unified attention) is reported as ``mode="ulysses+ring"``."""
    ring = site.node.meta.get("omni_cp")
    uly = detect_ulysses(site.q)
    if ring is not None and uly is not None:
        return {"mode": "ulysses+ring", "size": uly["size"] * ring["size"], "group": uly["group"],
                "rank": group_rank(uly["group"])}
    cp = ring or uly
    if cp is None:
        return None
    cp = dict(cp)
    cp.setdefault("rank", group_rank(cp["group"]))
    return cp


# ---- token layout helpers ------------------------------------------------------------------------------


def spread(segments: list, length: int, size: int) -> list:
    """The segments of ``size`` rank-major shards of ``length`` tokens, each laid out like ``segments``
    (FLUX under Ulysses: ``[text 0-4, vision 4-12]`` → ``[text 0-4, vision 4-12, text 12-16, vision
    16-24]``); adjacent segments of one modality merge."""
    out: list = []
    for r in range(size):
        for m, a, b in segments:
            a, b = r * length + a, r * length + b
            if out and out[-1][0] == m and out[-1][2] == a:
                out[-1] = (m, out[-1][1], b)
            else:
                out.append((m, a, b))
    return out


def shard_length(placeholder: fx.Node, length: int) -> int:
    """The token count a rank sees of an input that the graph shards first (diffusers' split hook:
    ``x.chunk(P, dim=1)[rank]``), else ``length``."""
    users = [u for u in placeholder.users if op_name(u) not in ("size", "dim")]
    if len(users) != 1 or op_name(users[0]) not in ("chunk", "tensor_split"):
        return length
    u = users[0]
    dim = _arg(u, 2, "dim", 0)
    if not isinstance(dim, int) or dim % 3 != 1:
        return length
    parts = [g for g in u.users if op_name(g) == "getitem"]
    shp = static_shape(parts[0]) if len(parts) == 1 else None
    return shp[1] if shp is not None and len(shp) == 3 else length


# ---- ring: one attention over the gathered keys ------------------------------------------------------

#: attention ops that return a log-sum-exp, as diffusers' ring forward ops call them: ``native`` (with an
#: lse path), ``_native_flash``, ``_native_cudnn``, ``_native_efficient``
_LSE_ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu": None,  # (q, k, v, dropout_p, is_causal, *, attn_mask, scale)
    "_scaled_dot_product_flash_attention": None,  # (q, k, v, dropout_p, is_causal, return_debug_mask, *, scale)
    "_scaled_dot_product_cudnn_attention": 3,  # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, …)
    "_scaled_dot_product_efficient_attention": 3,  # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, …)
}
_VIEWS = {"permute", "transpose", "contiguous", "reshape_as", "reshape", "view", "to"}


def _lse_attention(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    name = op_name(node).split(".")[0]
    return name in _LSE_ATTENTION and str(node.target).startswith("aten.")


def _plain(node: fx.Node) -> bool:
    """No mask, no dropout, not causal: the call an SDPA without options makes."""
    name = op_name(node).split(".")[0]
    mask_pos = _LSE_ATTENTION[name]
    mask = node.kwargs.get("attn_mask") if mask_pos is None else _arg(node, mask_pos, "attn_bias")
    drop_pos, causal_pos = (3, 4) if mask_pos is None else (5, 6)
    return (mask is None and _arg(node, drop_pos, "dropout_p", 0.0) in (0, 0.0)
            and _arg(node, causal_pos, "is_causal", False) in (False, None))


def _key(n):
    """Structural identity of a chain of views (``q`` and ``q_1`` are two ``permute`` nodes of one tensor)."""
    if isinstance(n, fx.Node) and n.op in ("call_method", "call_function") and op_name(n) in _VIEWS:
        return (op_name(n), tuple(_key(a) for a in n.args), tuple(sorted((k, _key(v)) for k, v in n.kwargs.items())))
    if isinstance(n, (list, tuple)):
        return tuple(_key(a) for a in n)
    return n


def _gathered_chunk(t: fx.Node):
    """``(all_gather node, chunk index, size, slice)`` when ``t`` (a call's k or v) is a slice of one chunk
    of an all-gathered buffer seen through views; None when it is not."""
    n = t
    while n.op in ("call_method", "call_function") and op_name(n) in _VIEWS:
        n = n.args[0]
    if not (n.target is operator.getitem and isinstance(n.args[1], slice)):
        return None
    sl, kv = n.args[1], n.args[0]
    if not (kv.target is operator.getitem and isinstance(kv.args[1], int)):
        return None
    chunks = kv.args[0]
    if op_name(chunks) != "chunk":
        return None
    res = chunks.args[0]
    if collective(res) == "wait_tensor":
        res = res.args[0]
    if collective(res) != "all_gather_into_tensor":
        return None
    size = _arg(chunks, 1, "chunks")
    if size != _arg(res, 1, "group_size"):
        return None
    return res, kv.args[1], size, (sl.start, sl.stop)


def canonicalize_ring(gm: fx.GraphModule) -> int:
    """Rewrite every ring-attention group of ``gm`` (module docstring) into one SDPA over the keys and values
    of all ranks; returns how many. A group is the P lse-attention calls on one query whose keys are this
    rank's own and one chunk of the same all-gathered buffer per other rank; the first node that depends on
    all of their outputs (the last merge) becomes ``sdpa(q, cat(k_0..k_{P-1}), cat(v_0..v_{P-1}))`` in the
    merge's layout and dtype. Merges and per-step calls are then dead and dropped. Groups that do not fit
    (masks, dropout, another layout) are left as they are: they run as diffusers wrote them, dense."""
    calls = [n for n in gm.graph.nodes if _lse_attention(n)]
    if not calls:
        return 0
    groups: dict = {}
    for c in calls:
        groups.setdefault(_key(c.args[0]), []).append(c)
    done = 0
    for group in groups.values():
        try:
            if _rewrite_group(gm, group):
                done += 1
        except _NotRing as e:
            log.debug("flashomni: ring attention at %s left as is: %s", group[0].name, e)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


class _NotRing(Exception):
    pass


def _rewrite_group(gm: fx.GraphModule, group: list) -> bool:
    g = gm.graph
    if len(group) < 2:
        raise _NotRing("a single attention call")
    if not all(_plain(c) for c in group):
        raise _NotRing("mask, dropout or causal attention")
    sources, gather, size = {}, None, None
    local = []
    for c in group:
        k, v = c.args[1], c.args[2]
        gk, gv = _gathered_chunk(k), _gathered_chunk(v)
        if gk is None and gv is None:
            local.append(c)
            continue
        if gk is None or gv is None or gk[0] is not gv[0] or gk[1] != gv[1]:
            raise _NotRing("k and v do not come from one chunk of one all-gather")
        if gather is not None and gk[0] is not gather:
            raise _NotRing("keys from two all-gathers")
        gather, size = gk[0], gk[2]
        sources[gk[1]] = c
    if gather is None or len(local) != 1 or len(group) != size:
        raise _NotRing(f"{len(group)} calls, {len(local)} with local keys, all-gather of {size}")
    group_name = _arg(gather, 2, "group_name")
    rank = group_rank(group_name)
    if rank in sources:
        raise _NotRing("this rank's chunk is read from the all-gather")
    sources[rank] = local[0]
    if sorted(sources) != list(range(size)):
        raise _NotRing(f"chunks {sorted(sources)} of {size}")
    order = {n: i for i, n in enumerate(g.nodes)}
    outs = {}
    for c in group:
        o = [u for u in c.users if u.target is operator.getitem and u.args[1] == 0]
        if len(o) != 1:
            raise _NotRing("attention output read other than once")
        outs[c] = o[0]
    # the merged output: the first node that depends on every call's output and that every path from the
    # calls to the graph's output passes through (the last merge; earlier nodes such as ``prev_out - out``
    # depend on all calls too but are bypassed, and the lse chain ends in unused ``detach`` copies)
    bit = {outs[c]: 1 << i for i, c in enumerate(group)}
    full = (1 << len(group)) - 1
    deps: dict = {}
    final = None
    start = max(order[c] for c in group)
    for n in g.nodes:
        m = bit.get(n, 0)
        for a in n.all_input_nodes:
            m |= deps.get(a, 0)
        if m:
            deps[n] = m
        if m == full and order[n] > start and not _bypassed(group, n):
            final = n
            break
    o_ex, f_ex = example(outs[group[0]]), example(final)
    if not isinstance(o_ex, torch.Tensor) or not isinstance(f_ex, torch.Tensor) or o_ex.dim() != 4:
        raise _NotRing("outputs are not [B, H, S, D] tensors")
    B, H, S, D = o_ex.shape
    if tuple(f_ex.shape) != (B, S, H, D):
        raise _NotRing(f"the merged output {tuple(f_ex.shape)} is not [B, S, H, D]")
    first = sources[rank]
    q = first.args[0]
    ks = [sources[r].args[1] for r in range(size)]
    vs = [sources[r].args[2] for r in range(size)]
    scale = first.kwargs.get("scale")
    stack = first.meta.get("nn_module_stack", {})
    with g.inserting_before(final):
        K = g.call_function(torch.cat, (ks,), {"dim": 2})
        V = g.call_function(torch.cat, (vs,), {"dim": 2})
        kw = {"scale": scale} if scale is not None else {}
        att = g.call_function(torch.nn.functional.scaled_dot_product_attention, (q, K, V), kw)
        out = g.call_method("transpose", (att, 1, 2))
        if f_ex.dtype != o_ex.dtype:
            out = g.call_method("to", (out, f_ex.dtype))
    K.meta["example_value"] = torch.cat([example(k) for k in ks], dim=2)
    V.meta["example_value"] = torch.cat([example(v) for v in vs], dim=2)
    kw_ex = {"scale": scale} if scale is not None else {}
    att.meta["example_value"] = torch.nn.functional.scaled_dot_product_attention(
        example(q), K.meta["example_value"], V.meta["example_value"], **kw_ex)
    ex = att.meta["example_value"].transpose(1, 2)
    for n in (K, V, att, out, out.args[0]):
        n.meta["nn_module_stack"] = stack
    out.args[0].meta["example_value"] = ex
    out.meta["example_value"] = ex.to(f_ex.dtype)
    att.meta["omni_cp"] = {"mode": "ring", "size": size, "group": group_name, "rank": rank}
    final.replace_all_uses_with(out)
    _drop_dead(g, group)
    return True


def _bypassed(calls: list, cut: fx.Node) -> bool:
    """Whether some path leads from ``calls`` to the graph's output (or a side effect) around ``cut``."""
    seen, stack = set(calls), list(calls)
    while stack:
        for u in stack.pop().users:
            if u is cut or u in seen:
                continue
            if u.op == "output" or u.is_impure(impure_random=False):
                return True
            seen.add(u)
            stack.append(u)
    return False


def _drop_dead(g: fx.Graph, calls: list) -> None:
    """Erase what only served the replaced calls: their descendants without users (the merges, the lse
    chain, detached copies), then whatever fed only the erased nodes (the per-step views of q, k, v)."""
    region, stack = set(), list(calls)
    while stack:
        n = stack.pop()
        if n not in region:
            region.add(n)
            stack.extend(n.users)
    freed, erased = [], set()
    for n in reversed(list(g.nodes)):
        # the per-step calls are tagged random (their dropout); dropout is 0 here, so they may go
        if n in region and not n.users and not n.is_impure(impure_random=False):
            freed.extend(n.all_input_nodes)
            g.erase_node(n)
            erased.add(n)
    stack = freed
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op in ("placeholder", "output", "get_attr") or n.is_impure(impure_random=False):
            continue
        stack.extend(n.all_input_nodes)
        g.erase_node(n)
        erased.add(n)
