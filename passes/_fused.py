"""Fused projections: one ``linear`` computes q with other features (FLUX.2's ``to_qkv_mlp_proj``: q, k, v and
the MLP input; PRX's ``img_qkv_proj``: q, k, v), and views of its output pick q's columns.

:func:`fused_slice` follows the fused output ``y [B, S, N]`` forward through *view* ops only (``split``,
``chunk``, ``getitem``, ``unflatten``, ``view``/``reshape`` that stay views, ``permute``...), replaying each on
a meta tensor of ``y``'s shape, so every reached node is known as a strided view of ``y``: its sizes, strides
and storage offset say exactly which (item, token, column) each element reads. The first node on the q chain
whose view reads every token of every item and exactly ``H*D`` consecutive columns ``[a, a + H*D)`` (as heads
of ``D`` consecutive columns) is q's *slice*: from there the layout tracker checks the rest of the chain as
for a plain projection. Every other reader of ``y`` must be a view reading none of those columns (k, v and
the MLP input); then GEMM-Q over rows ``[a, a + H*D)`` of the weight plus a plain ``linear`` over the other
rows compute the same values, and each other reader reads the plain part through the same strided view.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from . import _layout as lay
from ._fx import module_path, op_name, static_shape

#: ops whose output is a view of their first argument when every other argument is a constant
VIEW_OPS = {
    "view", "reshape", "unflatten", "flatten", "permute", "transpose", "split", "chunk", "unbind", "narrow",
    "select", "squeeze", "unsqueeze", "getitem", "contiguous", "movedim", "swapaxes", "swapdims",
    "split_with_sizes", "tensor_split",
}


@dataclass
class View:
    """A strided view of the fused output, in elements of ``y [B, S, N]``."""

    size: tuple
    stride: tuple
    offset: int


@dataclass
class FusedSlice:
    """q's columns in a fused projection and how the graph reads the projection's output."""

    linear: fx.Node
    width: int
    """Output features of the fused linear (N)."""
    col_offset: int
    """First of q's ``H*D`` columns."""
    slice_node: fx.Node
    """The node whose value is q's columns (the layout tracker starts there)."""
    slice_view: View
    layout: tuple
    """The tracker's layout of ``slice_node``."""
    ancestors: list = field(default_factory=list)
    """View nodes between the linear and ``slice_node`` (they read q's columns too)."""
    leaves: list = field(default_factory=list)
    """``(node, View)``: the other readers, each a view of columns outside q's."""


def _const(a) -> bool:
    if isinstance(a, fx.Node):
        return False
    if isinstance(a, (tuple, list)):
        return all(_const(x) for x in a)
    if isinstance(a, slice):
        return all(_const(x) for x in (a.start, a.stop, a.step))
    return True


def _replay(node: fx.Node, src: fx.Node, val):
    """The meta value of view op ``node`` applied to ``val`` (the meta value of its input ``src``), or None
    when ``node`` is not a view op of ``src`` alone."""
    name = op_name(node)
    if name not in VIEW_OPS or not node.args or node.args[0] is not src:
        return None
    if not all(_const(a) for a in node.args[1:]) or not all(_const(a) for a in node.kwargs.values()):
        return None
    try:
        if node.op == "call_method":
            out = getattr(val, node.target)(*node.args[1:], **node.kwargs)
        elif node.target is operator.getitem:
            out = val[node.args[1]]
        else:
            out = node.target(val, *node.args[1:], **node.kwargs)
    except Exception:  # noqa: BLE001  (an op the meta replay cannot run is not followed)
        return None
    return out


def _view(t: torch.Tensor, root: torch.Tensor) -> Optional[View]:
    if t is not root and t._base is not root:
        return None  # a copy (reshape of a non-viewable layout): the element map is lost
    return View(tuple(t.shape), tuple(t.stride()), t.storage_offset())


def _columns(v: View, S: int, N: int):
    """``(first, last)`` column a view reads, or None when an axis steps across columns and tokens at once."""
    first = v.offset % N
    last = first
    for n, st in zip(v.size, v.stride):
        if n == 1:
            continue
        if st % N == 0:
            continue  # tokens or items
        if st >= N:
            return None
        last += (n - 1) * st
    return first, last


def _slice_layout(v: View, B: int, S: int, N: int, name: str, heads: int, head_dim: int) -> Optional[tuple]:
    """The tracker's layout of a view that reads every item and token and exactly ``heads*head_dim``
    consecutive columns as heads of ``head_dim`` columns, with its first column; else None."""
    if v.offset >= N:
        return None
    feats = sorted((st, n) for n, st in zip(v.size, v.stride) if n > 1 and st % N != 0)
    expect = 1
    for st, n in feats:
        if st != expect:
            return None
        expect *= n
    if expect != heads * head_dim:
        return None
    groups = []
    seen_b = seen_s = False
    for n, st in zip(v.size, v.stride):
        if n == 1:
            groups.append(())
        elif st == S * N and n == B and not seen_b:
            groups.append((lay.Atom("B", n),))
            seen_b = True
        elif st == N and n == S and not seen_s:
            groups.append((lay.s_atom(name, 0, n),))
            seen_s = True
        elif st % N == 0:
            return None
        elif st % head_dim == 0:
            groups.append((lay.h_atom(n, st // head_dim),))
        elif st * n <= head_dim:
            groups.append((lay.Atom("D", n),))
        elif head_dim % st == 0 and (st * n) % head_dim == 0:
            # heads and columns in one axis (``[B, S, H*D]``): row-major (heads, within-head columns)
            groups.append((lay.h_atom(st * n // head_dim, 1), lay.Atom("D", head_dim // st)))
        else:
            return None  # an axis that straddles heads
    if not seen_s or (B > 1 and not seen_b):
        return None
    return tuple(groups), v.offset


def fused_slice(lin: fx.Node, heads: int, head_dim: int, on_chain: set):
    """q's slice of fused projection ``lin`` (module docstring): ``(FusedSlice, None)`` or ``(None, reason)``.
    ``on_chain``: the nodes the backward walk from q visited."""
    shp = static_shape(lin)
    if shp is None or len(shp) != 3 or shp[-1] <= heads * head_dim:
        return None, None
    B, S, N = shp
    where = module_path(lin) or lin.name
    root = torch.empty(shp, device="meta")
    vals = {lin: root}
    order = {n: i for i, n in enumerate(lin.graph.nodes)}
    frontier = [lin]
    found = None
    while frontier:
        frontier.sort(key=order.get)
        n = frontier.pop(0)
        val = vals[n]
        if n is not lin and n in on_chain and isinstance(val, torch.Tensor):
            v = _view(val, root)
            got = _slice_layout(v, B, S, N, lin.name, heads, head_dim) if v is not None else None
            if got is not None and (found is None or order[n] < order[found[0]]):
                found = (n, v, got)
                continue  # the tracker takes over from the slice
        for u in n.users:
            if u in vals:
                continue
            out = _replay(u, n, val)
            if out is not None:
                vals[u] = out
                frontier.append(u)
    if found is None:
        return None, f"no view of `{where}`'s output selects q's {heads * head_dim} columns"
    s_node, s_view, (layout, first) = found
    q_cols = (first, first + heads * head_dim - 1)
    # the views between the linear and the slice, and everything else that reads them
    ancestors, stack = set(), [s_node]
    while stack:
        n = stack.pop()
        for p in n.all_input_nodes:
            if p in vals and p is not lin and p not in ancestors:
                ancestors.add(p)
                stack.append(p)
    readers = [u for a in [lin] + sorted(ancestors, key=order.get) for u in a.users
               if u is not s_node and u not in ancestors]
    leaves = []
    while readers:
        u = readers.pop(0)
        val = vals.get(u)
        if isinstance(val, (tuple, list)):  # a split outside the path to q: its parts are the readers
            if any(op_name(g) != "getitem" for g in u.users):
                return None, f"`{op_name(u)}` ({u.name}) of `{where}`'s output is read as a whole"
            readers.extend(u.users)
            continue
        v = _view(val, root) if isinstance(val, torch.Tensor) else None
        if v is None:
            return None, f"`{op_name(u)}` ({u.name}) reads `{where}`'s output, not only through views"
        cols = _columns(v, S, N)
        if cols is None or not (cols[1] < q_cols[0] or cols[0] > q_cols[1]):
            return None, f"`{op_name(u)}` ({u.name}) reads q's columns of `{where}`"
        leaves.append((u, v))
    return FusedSlice(lin, N, first, s_node, s_view, layout, sorted(ancestors, key=order.get), leaves), None


def split_fused(gm: fx.GraphModule, fs: FusedSlice, heads: int, head_dim: int) -> fx.Node:
    """Split the fused linear of ``fs`` by linearity (module docstring): ``linear(x, W[q rows], b[q rows])``,
    whose output the slice node now reads (the node GEMM-Q rewrites, returned), and ``linear(x, W[other
    rows], ...)``, which every other reader reads through its own strided view. q's rows are the first or
    the last of ``W``, so both weight parts are views (nothing is copied). The model's values are unchanged."""
    from ._fx import linear_args

    g = gm.graph
    lin = fs.linear
    x, w, b = linear_args(lin)
    hd = heads * head_dim
    a, N = fs.col_offset, fs.width
    B, S, _ = static_shape(lin)
    ev = lin.meta.get("example_value")
    rest = slice(hd, N) if a == 0 else slice(0, N - hd)
    stack = lin.meta.get("nn_module_stack", {})

    def node(target, args, val):
        n = g.call_function(target, args)
        n.meta["nn_module_stack"] = stack
        if val is not None:
            n.meta["example_value"] = val
        return n

    def part(rows: slice, width: int):
        wp = node(operator.getitem, (w, rows), None)
        bp = None if b is None else node(operator.getitem, (b, rows), None)
        return node(torch._C._nn.linear, (x, wp, bp), None if ev is None else ev.new_empty(B, S, width))

    def strided(src: fx.Node, v: View, width: int, shift: int):
        # the element (item b, token t, column c) of y is (b, t, c - shift) of the part of this width
        stride = tuple(S * width if st == S * N else width if st == N else st for st in v.stride)
        b0, rem = divmod(v.offset, S * N)
        t0, c = divmod(rem, N)
        offset = b0 * S * width + t0 * width + (c - shift)
        val = src.meta.get("example_value")
        return node(torch.as_strided, (src, list(v.size), list(stride), offset),
                    None if val is None else val.as_strided(v.size, stride, offset))

    with g.inserting_before(lin):
        y_q = part(slice(a, a + hd), hd)
        y_rest = part(rest, N - hd)
    with g.inserting_after(fs.slice_node):
        new_slice = strided(y_q, fs.slice_view, hd, a)
    fs.slice_node.replace_all_uses_with(new_slice)
    for leaf, v in fs.leaves:
        with g.inserting_after(leaf):
            new_leaf = strided(y_rest, v, N - hd, hd if a == 0 else 0)
        leaf.replace_all_uses_with(new_leaf)
    # the fused output and its views are no longer read: drop them (users first)
    dead = [fs.slice_node] + [leaf for leaf, _ in fs.leaves] + list(reversed(fs.ancestors)) + [lin]
    for n in dead:
        for u in list(n.users):
            if not u.users and u not in dead:
                g.erase_node(u)  # a getitem of a split nobody reads
        if not n.users:
            g.erase_node(n)
    return y_q
