"""Pass 5 (block caching only): find the repeated transformer blocks and split the graph at their borders.

:func:`find_blocks` reads ``meta["nn_module_stack"]``: a node belongs to block ``<list>.<i>`` when one of
its module frames is a direct child of the model named like ``transformer_blocks.3``,
``single_transformer_blocks.12``, ``blocks.0`` or ``layers.5`` (a top-level ``ModuleList`` whose name ends
in ``blocks`` or ``layers``; nested lists such as HunyuanVideo's ``context_embedder.token_refiner.
refiner_blocks`` are not blocks). A block's *span* is every node from its first to its last node in graph
order (Dynamo emits one module call contiguously; unattributed nodes inside the span belong to it). For
each block it records

* ``inputs``: the values from outside the span that the span reads (parameters included);
* ``outputs``: the span's values read after it (by a later node or the graph output);
* ``streams``: ``(output, input)`` pairs of residual streams: the output is traced back through the
  chain of residual ``add``s, casts, clamps, token-axis slices and token-axis ``cat``s to the input it
  continues (FLUX/SD3/HunyuanVideo double blocks carry two: image and text; FLUX single blocks concatenate
  them at the start and split them at the end). Outputs that cannot be traced are paired by shape when one
  unpaired input has exactly their shape and dtype.

A block is cacheable (``reject`` None) when every output is a paired stream: then skipping the span and
writing ``input + forecast`` for each output reproduces everything later nodes read. Otherwise ``reject``
says why (logged at debug level, counted in :data:`SKIP_COUNTS`) and the block is left uncached — it still
runs as its own region.

:func:`split_blocks` cuts the graph into consecutive regions (prologue, block, glue, …, epilogue), each an
``fx.GraphModule`` whose placeholders are the values it reads from earlier regions or graph inputs and whose
output is the tuple of its values read later. This module knows no runtime or caching policy.
"""

from __future__ import annotations

import collections
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx

from ._fx import normalize_path, op_name, static_shape, tensor_meta

log = logging.getLogger("omni_compile.passes")

#: How often each reason to leave a block uncached was seen (process-wide, for diagnostics and tests).
SKIP_COUNTS: collections.Counter = collections.Counter()

_BLOCK_PATH = re.compile(r"^((?:[A-Za-z_][A-Za-z0-9_]*)?(?:blocks|layers))\.(\d+)$")
_PASS_THROUGH = {"to", "float", "type", "type_as", "contiguous", "clone", "clamp", "clip", "clamp_", "clip_",
                 "half", "bfloat16"}


@dataclass
class Block:
    name: str
    """Module path of the block (``transformer_blocks.3``)."""
    index: int
    """Position among the graph's blocks, in execution order."""
    nodes: List[fx.Node] = field(default_factory=list)
    """Every node of the span, in graph order."""
    inputs: List[fx.Node] = field(default_factory=list)
    outputs: List[fx.Node] = field(default_factory=list)
    streams: List[Tuple[fx.Node, fx.Node]] = field(default_factory=list)
    """``(output, input)`` residual pairs, in the order of ``outputs``."""
    paired_by: List[str] = field(default_factory=list)
    """``"trace"`` or ``"shape"`` per stream: how the pair was found."""
    reject: Optional[str] = None
    """Why the block cannot be cached (None when it can)."""


def block_of(node: fx.Node) -> Optional[str]:
    """The block a node belongs to (``transformer_blocks.3``), from its module stack; None outside blocks."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for v in stack.values():
        path = normalize_path(v[0] if isinstance(v, tuple) else str(v))
        if _BLOCK_PATH.match(path):
            return path
    return None


def _token_axis(node: fx.Node) -> Optional[int]:
    shp = static_shape(node)
    return None if shp is None or len(shp) < 2 else 1


def _slice_range(node: fx.Node) -> Optional[Tuple[fx.Node, int, int]]:
    """``x[:, a:b]`` (a getitem slicing the token axis only) -> ``(x, a, b)`` in ``x``'s coordinates."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    x, idx = node.args[0], node.args[1]
    shp = static_shape(x)
    if shp is None or len(shp) < 2 or not isinstance(idx, tuple) or len(idx) < 2:
        return None
    if not (isinstance(idx[0], slice) and idx[0] == slice(None, None, None)):
        return None
    if not isinstance(idx[1], slice) or idx[1].step not in (None, 1):
        return None
    if any(not (isinstance(s, slice) and s == slice(None, None, None)) and s is not Ellipsis for s in idx[2:]):
        return None
    a, b, _ = idx[1].indices(shp[1])
    if not all(isinstance(v, int) for v in (a, b)):
        return None
    return x, a, b


def _cat_parts(node: fx.Node) -> Optional[list]:
    if op_name(node) not in ("cat", "concat", "concatenate"):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shp = static_shape(node)
    if shp is None or len(shp) < 2 or not isinstance(dim, int) or dim % len(shp) != 1:
        return None
    return list(parts)


def _trace(node: Any, lo: int, hi: int, inputs: set, depth: int = 0) -> Optional[fx.Node]:
    """The block input that rows ``lo:hi`` of ``node`` continue along the residual path, or None."""
    if not isinstance(node, fx.Node) or depth > 64:
        return None
    shp = static_shape(node)
    if shp is None or len(shp) < 2:
        return None
    if node in inputs:
        return node if (lo, hi) == (0, shp[1]) else None
    name = op_name(node)
    if node.op == "call_function" and node.target in (operator.add, torch.add) or name in ("add", "add_"):
        for a in node.args[:2]:
            if isinstance(a, fx.Node) and static_shape(a) == shp:
                hit = _trace(a, lo, hi, inputs, depth + 1)
                if hit is not None:
                    return hit
        return None
    if name in _PASS_THROUGH or (node.op == "call_function" and node.target in (torch.clamp, torch.clip)):
        a = node.args[0] if node.args else None
        if isinstance(a, fx.Node) and static_shape(a) == shp:
            return _trace(a, lo, hi, inputs, depth + 1)
        return None
    sl = _slice_range(node)
    if sl is not None:
        x, a, _ = sl
        return _trace(x, a + lo, a + hi, inputs, depth + 1)
    parts = _cat_parts(node)
    if parts is not None:
        off = 0
        for p in parts:
            ps = static_shape(p)
            if ps is None:
                return None
            if off <= lo and hi <= off + ps[1]:
                return _trace(p, lo - off, hi - off, inputs, depth + 1)
            off += ps[1]
    return None


def _same_kind(a: fx.Node, b: fx.Node) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    return (ta is not None and tb is not None and static_shape(a) is not None
            and static_shape(a) == static_shape(b) and ta.dtype == tb.dtype and ta.device == tb.device)


def find_blocks(gm: fx.GraphModule) -> List[Block]:
    """Every transformer block of ``gm`` in execution order, with its inputs, outputs and residual pairs."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    first: Dict[str, int] = {}
    last: Dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        b = block_of(n)
        if b is None:
            continue
        first.setdefault(b, i)
        last[b] = i
    names = sorted(first, key=first.get)
    blocks: List[Block] = []
    prev_end = -1
    for k, name in enumerate(names):
        blk = Block(name=name, index=k)
        a, b = first[name], last[name]
        if a <= prev_end:
            blk.reject = "block interleaves with the previous block in graph order"
        prev_end = max(prev_end, b)
        blk.nodes = [n for n in nodes[a:b + 1] if n.op not in ("placeholder", "output", "get_attr")]
        blocks.append(blk)
    for blk in blocks:
        if blk.reject:
            _skip(blk)
            continue
        inside = set(blk.nodes)
        ins: Dict[fx.Node, None] = {}
        outs: Dict[fx.Node, None] = {}
        for n in blk.nodes:
            for a in n.all_input_nodes:
                if a not in inside:
                    ins[a] = None
            if any(u not in inside for u in n.users):
                outs[n] = None
        blk.inputs, blk.outputs = list(ins), list(outs)
        _pair(blk, pos)
    return blocks


def _pair(blk: Block, pos: dict) -> None:
    if not blk.outputs:
        blk.reject = "the block's outputs are never read"
        return _skip(blk)
    inputs = {n for n in blk.inputs if n.op != "get_attr"}
    pairs: Dict[fx.Node, Tuple[fx.Node, str]] = {}
    for o in blk.outputs:
        shp = static_shape(o)
        if shp is None or len(shp) < 2:
            continue
        hit = _trace(o, 0, shp[1], inputs)
        if hit is not None and _same_kind(o, hit) and hit not in [p for p, _ in pairs.values()]:
            pairs[o] = (hit, "trace")
    for o in blk.outputs:
        if o in pairs:
            continue
        used = {p for p, _ in pairs.values()}
        cands = [i for i in blk.inputs if i not in used and _same_kind(o, i)]
        if len(cands) == 1:
            pairs[o] = (cands[0], "shape")
    missing = [o for o in blk.outputs if o not in pairs]
    if missing:
        o = missing[0]
        shp = static_shape(o)
        blk.reject = (f"output {o.name} ({list(shp) if shp else 'not a static tensor'}) read after the block is "
                      "not a residual stream of an input")
        return _skip(blk)
    blk.streams = [(o, pairs[o][0]) for o in blk.outputs]
    blk.paired_by = [pairs[o][1] for o in blk.outputs]


def _skip(blk: Block) -> None:
    SKIP_COUNTS[blk.reject.split(" (")[0]] += 1
    log.debug("flashomni: block %s left uncached: %s", blk.name, blk.reject)


# ---- splitting ----------------------------------------------------------------------------------


@dataclass
class Region:
    """One piece of the split graph: runs ``module(*[env[n] for n in inputs])`` -> ``outputs``."""

    kind: str
    """``"prologue"``, ``"block"``, ``"glue"`` or ``"epilogue"``."""
    module: fx.GraphModule
    inputs: List[str]
    """Names (in the original graph) of the values it reads, in placeholder order."""
    outputs: List[str]
    """Names of the values it produces that later regions or the graph output read."""
    block: Optional[Block] = None
    release: List[str] = field(default_factory=list)
    """Names whose last reader is this region (the runner drops them afterwards)."""


@dataclass
class SplitGraph:
    placeholders: List[str]
    """Names of the original graph's placeholders, in call order."""
    regions: List[Region]
    output: Any
    """The original output node's argument (nodes of the original graph, looked up by name)."""


def split_blocks(gm: fx.GraphModule, blocks: List[Block], keep: Tuple[fx.Node, ...] = ()) -> SplitGraph:
    """Cut ``gm`` into regions at block borders (see the module docstring). ``keep``: nodes to return from
    their region even when nothing reads them (e.g. an op whose effect is on the host: Inductor drops an
    op whose output is unused)."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    out_node = [n for n in nodes if n.op == "output"][0]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    owner: Dict[fx.Node, int] = {}
    spans = []  # (kind, block, nodes)
    cur: List[fx.Node] = []
    by_first = {blk.nodes[0]: blk for blk in blocks
                if blk.nodes and not (blk.reject or "").startswith("block interleaves")}
    i = 0
    while i < len(body):
        n = body[i]
        blk = by_first.get(n)
        if blk is not None:
            if cur:
                spans.append(("glue", None, cur))
                cur = []
            members = set(blk.nodes)
            span = []
            while i < len(body) and body[i] in members:
                span.append(body[i])
                i += 1
            spans.append(("block", blk, span))
            continue
        cur.append(n)
        i += 1
    if cur:
        spans.append(("glue", None, cur))
    if spans and spans[0][0] == "glue":
        spans[0] = ("prologue",) + spans[0][1:]
    if len(spans) > 1 and spans[-1][0] == "glue":
        spans[-1] = ("epilogue",) + spans[-1][1:]
    for r, (_, _, span) in enumerate(spans):
        for n in span:
            owner[n] = r
    last_use: Dict[fx.Node, int] = {}
    for n in body:
        for a in n.all_input_nodes:
            last_use[a] = max(last_use.get(a, -1), owner[n])
    final = len(spans)
    for a in out_node.all_input_nodes:
        last_use[a] = final
    keep = set(keep)
    regions: List[Region] = []
    for r, (kind, blk, span) in enumerate(spans):
        inside = set(span)
        g = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        ins: List[fx.Node] = []
        for n in span:
            for a in n.all_input_nodes:
                if a not in inside and a not in env:
                    ph = g.placeholder(f"in_{len(ins)}")
                    ph.meta = dict(a.meta)
                    env[a] = ph
                    ins.append(a)
        for n in span:
            # fresh names (``linear_3``…): identical blocks give identical region code, which lets
            # Inductor's graph cache serve repeated blocks once their graphs match
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            new = g.create_node(n.op, n.target, args, kwargs, type_expr=n.type)
            new.meta = dict(n.meta)
            env[n] = new
        outs = [n for n in span if last_use.get(n, -1) > r or n in keep]
        g.output(tuple(env[n] for n in outs))
        mod = fx.GraphModule(gm, g, class_name=f"Region{r}")
        release = [a.name for a in ins if last_use.get(a, -1) == r and a.op != "placeholder"]
        regions.append(Region(kind, mod, [a.name for a in ins], [n.name for n in outs], blk, release))
    return SplitGraph([p.name for p in placeholders], regions, out_node.args[0])
