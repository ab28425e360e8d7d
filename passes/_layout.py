"""Layout tracking: which token (S) and head (H) each axis of a tensor carries, op by op.

The walks start from a projection's output ``[B, S, H*D]`` (or the attention output ``[B, H, S, D]``) and
push a *layout* forward through the nodes between it and the other end. A layout gives, per tensor axis,
the tuple of *atoms* that axis is made of in row-major order:

* ``S`` atoms are token ranges ``(source, start)`` of one source sequence (one projection, or the
  attention output); ``H`` atoms are head-index factors ``(stride,)`` (so ``unflatten`` and RoPE's
  ``reshape(..., D/2, 2)`` can split and re-merge them); ``D``/``B``/``X`` atoms only carry a size.
* a ``CAT`` atom is an axis built by concatenation (joint text+image tokens, ``[attn ‖ mlp]`` features);
  it can move and be sliced but never be split by a reshape.
* an ``R`` atom (context parallelism, ``passes/cp.py``) is the source rank of a Ulysses all-to-all: the
  axis that indexes the ranks' token shards (tokens, rank-major); it moves like a token atom and is never
  split by a reshape.

An op is *per-(token, head) local* when every output element at (token s, head h) depends only on input
elements at (s, h): reshapes that keep S and H intact, permutes, slicing/unbind/cat along other axes,
elementwise math with operands that do not come from the chain (RoPE tables, norm weights), and
reductions or norms over axes with no S or H atom (per-head RMSNorm over D), a concatenation along an axis
with no S or H atom (rotate-half RoPE ``cat([-x2, x1], -1)``: a within-head axis of the total size) and
``view_as_complex`` / ``view_as_real`` over a trailing pair inside a head (complex RoPE). Anything else
raises :class:`NotLocal` with a human-readable reason, which the passes record on the site.

An op that mixes the heads of one token but no tokens — a norm or reduction over an axis with H atoms and
no S atom (Wan's ``rms_norm`` over all H*D features, a hand-written RMSNorm's ``mean`` over them) — is
*token-local*: each output element at token s depends on token s alone. :func:`propagate` raises on it
unless given a list to record it in (``mixing``); a chain with such ops keeps GEMM-Q valid only when the
site's reuse decisions are the same for every head of a query block (a reused block then leaves whole
token rows unwritten, which nothing computed reads).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import fx

from ._fx import collective, group_size, op_name, static_shape


class NotLocal(Exception):
    """The chain contains an op that is not per-(token, head) local (message says which and why)."""


@dataclass(frozen=True)
class Atom:
    kind: str  # "B" | "S" | "H" | "D" | "X" | "CAT" | "R"
    size: int
    key: tuple = ()  # S: (source, start); H: (stride,); CAT: parts (tuple of atom tuples); R: (group, stride)

    def __repr__(self) -> str:  # compact, for debug logs
        if self.kind == "S":
            return f"S[{self.key[0]}:{self.key[1]}+{self.size}]"
        if self.kind == "H":
            return f"H{self.size}/{self.key[0]}"
        if self.kind == "CAT":
            return "CAT(" + " | ".join("·".join(map(repr, p)) for p in self.key) + ")"
        if self.kind == "R":
            return f"R{self.size}[{self.key[0]}]"
        return f"{self.kind}{self.size}"


Layout = tuple  # tuple[tuple[Atom, ...], ...], one entry per axis


def s_atom(source: str, start: int, size: int) -> Atom:
    return Atom("S", size, (source, start))


def h_atom(size: int, stride: int = 1) -> Atom:
    return Atom("H", size, (stride,))


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def has_token(group: Sequence[Atom]) -> bool:
    for a in group:
        if a.kind in ("S", "R") or (a.kind == "CAT" and any(has_token(p) for p in a.key)):
            return True
    return False


def dim_size(group: Sequence[Atom]) -> int:
    return _prod(a.size for a in group)


def has_token_or_head(group: Sequence[Atom]) -> bool:
    for a in group:
        if a.kind in ("S", "H", "R"):
            return True
        if a.kind == "CAT" and any(has_token_or_head(p) for p in a.key):
            return True
    return False


def normalize(group: Sequence[Atom]) -> tuple:
    """Drop size-1 atoms; merge adjacent H factors and adjacent ranges of one S source."""
    out: list = []
    for a in group:
        if a.size == 1:
            continue
        if out:
            p = out[-1]
            if p.kind == "H" and a.kind == "H" and p.key[0] == a.key[0] * a.size:
                out[-1] = h_atom(p.size * a.size, a.key[0])
                continue
        out.append(a)
    return tuple(out)


def concat_parts(parts: Sequence[tuple]) -> tuple:
    """The axis made by concatenating ``parts`` (each an atom tuple): merges adjacent S ranges of one
    source, flattens nested CATs, and returns a plain group when a single part remains."""
    flat: list = []
    for p in parts:
        p = normalize(p)
        if len(p) == 1 and p[0].kind == "CAT":
            flat.extend(p[0].key)
        elif p:
            flat.append(p)
    merged: list = []
    for p in flat:
        if merged and len(p) == 1 and len(merged[-1]) == 1:
            a, b = merged[-1][0], p[0]
            if a.kind == b.kind == "S" and a.key[0] == b.key[0] and a.key[1] + a.size == b.key[1]:
                merged[-1] = (s_atom(a.key[0], a.key[1], a.size + b.size),)
                continue
        merged.append(p)
    if not merged:
        return ()
    if len(merged) == 1:
        return merged[0]
    total = sum(dim_size(p) for p in merged)
    if not any(has_token_or_head(p) for p in merged):
        # parts inside one (token, head) cell (rotate-half RoPE's cat([-x2, x1], -1)): within a head only the
        # size is tracked, so the result is a plain within-head axis of the total size
        inner = all(a.kind == "D" for p in merged for a in p)
        return (Atom("D" if inner else "X", total),)
    return (Atom("CAT", total, tuple(merged)),)


def slice_group(group: tuple, start: int, stop: int, what: str) -> tuple:
    """Rows ``[start, stop)`` of one axis. Token axes (S ranges or a CAT of parts) slice exactly; axes
    with no S/H atom become an anonymous atom of the new size; slicing across heads is not local."""
    n = dim_size(group)
    if start == 0 and stop == n:
        return group
    g = normalize(group)
    if len(g) == 1 and g[0].kind == "S":
        a = g[0]
        return (s_atom(a.key[0], a.key[1] + start, stop - start),)
    if len(g) == 1 and g[0].kind == "CAT":
        parts, off = [], 0
        for p in g[0].key:
            sz = dim_size(p)
            lo, hi = max(start, off), min(stop, off + sz)
            if lo < hi:
                parts.append(slice_group(p, lo - off, hi - off, what))
            off += sz
        return concat_parts(parts)
    if has_token_or_head(g):
        raise NotLocal(f"{what} slices an axis that mixes tokens or heads ({g})")
    kind = "D" if g and all(a.kind == "D" for a in g) else "X"
    return (Atom(kind, stop - start),)


def regroup(layout: Layout, out_shape: Sequence[int], what: str) -> Layout:
    """Layout after a row-major reshape to ``out_shape`` (view/reshape/flatten/unflatten/(un)squeeze)."""
    atoms = [a for g in layout for a in normalize(g)]
    out, i = [], 0
    for t in out_shape:
        grp, rem = [], t
        while rem > 1:
            if i >= len(atoms):
                raise NotLocal(f"{what}: cannot follow the reshape to {list(out_shape)}")
            a = atoms[i]
            if rem % a.size == 0:
                grp.append(a)
                rem //= a.size
                i += 1
            elif a.size % rem == 0:
                if a.kind in ("S", "CAT", "R"):
                    raise NotLocal(f"{what} splits the token axis (reshape to {list(out_shape)})")
                inner = a.size // rem
                if a.kind == "H":
                    outer_a, inner_a = h_atom(rem, a.key[0] * inner), h_atom(inner, a.key[0])
                else:
                    outer_a, inner_a = Atom(a.kind, rem), Atom(a.kind, inner)
                grp.append(outer_a)
                atoms[i] = inner_a
                rem = 1
            else:
                raise NotLocal(f"{what}: cannot follow the reshape to {list(out_shape)}")
        out.append(normalize(grp))
    if i != len(atoms):
        raise NotLocal(f"{what}: cannot follow the reshape to {list(out_shape)}")
    return tuple(out)


def signature(group: Sequence[Atom]) -> tuple:
    """A group with each run of within-token/head atoms (D, X, B) merged into one atom of their total
    size: two axes with equal signatures hold the same tokens and heads in the same places."""
    out: list = []
    for a in normalize(group):
        if a.kind in ("S", "H", "CAT", "R"):
            out.append(a)
        elif out and out[-1].kind == "Z":
            out[-1] = Atom("Z", out[-1].size * a.size)
        else:
            out.append(Atom("Z", a.size))
    return tuple(out)


def broadcast_merge(layouts: Sequence[Optional[Layout]], out_shape: Sequence[int], what: str) -> Layout:
    """Elementwise op: chain operands (layouts) must agree axis by axis (after right-aligned broadcasting);
    operands off the chain (None) only broadcast."""
    nd = len(out_shape)
    out = []
    for ax in range(nd):
        seen: Optional[tuple] = None
        for lay in layouts:
            if lay is None:
                continue
            j = ax - (nd - len(lay))
            if j < 0:
                continue
            g = normalize(lay[j])
            if not g:
                continue
            if seen is None:
                seen = g
            elif signature(g) != signature(seen):
                raise NotLocal(f"{what} combines chain tensors whose axes do not line up ({seen} vs {g})")
        if seen is None:
            seen = (Atom("X", out_shape[ax]),) if out_shape[ax] > 1 else ()
        elif dim_size(seen) != out_shape[ax]:
            if has_token_or_head(seen):
                raise NotLocal(f"{what} broadcasts a token/head axis")
            seen = (Atom("X", out_shape[ax]),)
        out.append(seen)
    return tuple(out)


# ---- op tables -------------------------------------------------------------------------------
SAME_LAYOUT_METHODS = {
    "contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "double", "type", "type_as",
    "requires_grad_", "cpu", "cuda",
}
ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "floordiv", "neg", "pow", "rsqrt", "sqrt", "exp", "log",
    "sin", "cos", "tanh", "sigmoid", "silu", "gelu", "relu", "abs", "square", "reciprocal", "clamp",
    "clamp_min", "clamp_max", "where", "lerp", "addcmul", "addcdiv", "erf", "softplus", "mish",
    "leaky_relu", "elu", "hardtanh", "dropout", "_to_copy", "float_power", "sign", "maximum", "minimum",
    "masked_fill", "nan_to_num", "rsub", "radd", "rmul", "iadd", "imul", "isub", "itruediv",
    "add_", "sub_", "mul_", "div_", "copy_", "clamp_", "neg_",
}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod", "all", "any"}
DIM_LOCAL = {"softmax", "log_softmax", "cumsum", "cumprod", "normalize"}
NORMS = {"rms_norm", "layer_norm"}
LIKE = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like"}
SPLITS = {"split", "chunk", "split_with_sizes", "tensor_split", "unbind"}


def _dims(spec, nd: int) -> list:
    if spec is None:
        return list(range(nd))
    if isinstance(spec, int):
        spec = [spec]
    return [d % nd for d in spec]


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return concrete(node.args[i])
    return concrete(node.kwargs.get(name, default))


def _is_node(a) -> bool:
    return isinstance(a, fx.Node)


def concrete(v):
    """``v`` with graph nodes that hold a known number (a size computed in a graph whose shapes the backend
    made concrete) replaced by that number; other values unchanged."""
    if isinstance(v, fx.Node):
        ev = v.meta.get("example_value", v.meta.get("val"))
        return ev if isinstance(ev, int) and not isinstance(ev, bool) else v
    if isinstance(v, slice):
        return slice(concrete(v.start), concrete(v.stop), concrete(v.step))
    if isinstance(v, (tuple, list)):
        return type(v)(concrete(x) for x in v)
    return v


def _expand_index(idx, nd: int):
    idx = concrete(idx)
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out = []
    for i in idx:
        if i is Ellipsis:
            out.extend([slice(None)] * (nd - n_real))
        else:
            out.append(i)
    consumed = sum(1 for i in out if i is not None)
    out.extend([slice(None)] * (nd - consumed))
    return out


def index_layout(layout: Layout, idx, what: str) -> Layout:
    """Layout of ``x[idx]`` for basic indexing (ints, slices, None, Ellipsis)."""
    nd = len(layout)
    out, ax = [], 0
    for i in _expand_index(idx, nd):
        if i is None:
            out.append(())
            continue
        g = layout[ax]
        n = dim_size(g)
        if isinstance(i, slice):
            if not all(isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step)):
                raise NotLocal(f"{what}: symbolic slice")
            start, stop, step = i.indices(n)
            if step != 1:
                if has_token_or_head(g):
                    raise NotLocal(f"{what}: strided slice over tokens or heads")
                out.append((Atom("D" if all(a.kind == "D" for a in g) else "X", len(range(start, stop, step))),))
            else:
                out.append(slice_group(g, start, stop, what))
        elif isinstance(i, int):
            if has_token_or_head(g):
                raise NotLocal(f"{what}: integer index selects one token/head")
        else:
            raise NotLocal(f"{what}: advanced indexing")
        ax += 1
    return tuple(out)


def _mixes_heads(groups, what: str, mixing: Optional[list], why: str) -> None:
    """An op combining the values along ``groups`` (the axes it reduces or normalises): fine when they hold
    no token or head atom; token-local when they hold heads but no tokens (recorded in ``mixing`` when the
    caller accepts that, else :class:`NotLocal`); never local across tokens."""
    if not any(has_token_or_head(g) for g in groups):
        return
    if mixing is None or any(has_token(g) for g in groups):
        raise NotLocal(why)
    mixing.append(why)


def propagate(node: fx.Node, layouts: dict, mixing: Optional[list] = None) -> object:
    """Layout of ``node``'s output given the layouts of its chain inputs (``layouts[n]``; inputs absent
    from ``layouts`` are off the chain). Returns a layout, or a list of layouts for tuple-valued ops.
    Raises :class:`NotLocal` when the op is not per-(token, head) local; with ``mixing`` (a list) an op
    that mixes the heads of one token (module docstring) is appended there instead."""
    name = op_name(node)
    what = f"`{name}` ({node.name})"
    shape = static_shape(node)
    L = lambda a: layouts.get(a) if _is_node(a) else None  # noqa: E731
    src = node.args[0] if node.args else None
    lay0 = L(src)

    if collective(node) is not None:  # context parallelism's exchanges (section at the end)
        return collective_layout(node, lay0, what)

    if name == "getitem" and node.target is operator.getitem:
        if isinstance(lay0, list):
            return lay0[node.args[1]]
        if lay0 is None:
            raise NotLocal(f"{what}: indexing with a chain tensor")
        return index_layout(lay0, node.args[1], what)

    if lay0 is None and name not in ELEMENTWISE and name not in ("cat", "stack", "concat", "concatenate", "where"):
        # the chain operand is not the first argument: only elementwise ops and cat/stack allow that
        raise NotLocal(f"{what} takes a chain tensor in an unexpected position")

    if name in SAME_LAYOUT_METHODS or (name in LIKE):
        if name == "to" and shape is not None and lay0 is not None and len(shape) != len(lay0):
            raise NotLocal(what)
        return lay0

    if name in RESHAPES:
        if shape is None:
            raise NotLocal(f"{what}: dynamic shape")
        return regroup(lay0, shape, what)

    if name == "expand":
        if shape is None:
            raise NotLocal(f"{what}: dynamic shape")
        nd = len(shape)
        pad = ((),) * (nd - len(lay0)) + tuple(lay0)
        return tuple(g if dim_size(g) == shape[i] else ((Atom("X", shape[i]),) if shape[i] > 1 else ())
                     for i, g in enumerate(pad))

    if name in ("permute", "transpose", "movedim", "swapaxes", "swapdims"):
        nd = len(lay0)
        if name == "permute":
            perm = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
            perm = [p % nd for p in perm]
        else:
            d0 = _arg(node, 1, "dim0" if name != "movedim" else "source") % nd
            d1 = _arg(node, 2, "dim1" if name != "movedim" else "destination") % nd
            perm = list(range(nd))
            if name == "movedim":
                perm.pop(d0)
                perm.insert(d1, d0)
            else:
                perm[d0], perm[d1] = perm[d1], perm[d0]
        return tuple(lay0[p] for p in perm)

    if name in SPLITS:
        nd = len(lay0)
        dim = _arg(node, 2 if name != "unbind" else 1, "dim", 0) % nd
        g = lay0[dim]
        if name == "unbind":
            if has_token_or_head(g):
                raise NotLocal(f"{what} unbinds a token/head axis")
            return [tuple(lay0[:dim] + lay0[dim + 1:])] * dim_size(g)
        ev = node.meta.get("example_value")
        if not isinstance(ev, (tuple, list)):
            raise NotLocal(what)
        out, off = [], 0
        for t in ev:
            n = int(t.shape[dim])
            out.append(tuple(lay0[:dim]) + (slice_group(g, off, off + n, what),) + tuple(lay0[dim + 1:]))
            off += n
        return out

    if name in ("cat", "concat", "concatenate", "stack"):
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        if shape is None:
            raise NotLocal(f"{what}: dynamic shape")
        nd = len(shape)
        dim %= nd
        in_lays = [L(t) for t in tensors]
        chain = [lay for lay in in_lays if lay is not None]
        if name == "stack":
            base = broadcast_merge(chain, shape[:dim] + shape[dim + 1:], what)
            return tuple(base[:dim]) + ((Atom("X", shape[dim]),),) + tuple(base[dim:])
        # other axes must agree between chain inputs
        others = [tuple(lay[:dim]) + tuple(lay[dim + 1:]) for lay in chain]
        oshape = tuple(shape[:dim]) + tuple(shape[dim + 1:])
        base = broadcast_merge(others, oshape, what)
        parts = []
        for t, lay in zip(tensors, in_lays):
            if lay is not None:
                parts.append(normalize(lay[dim]))
            else:
                n = static_shape(t)[dim] if static_shape(t) is not None else None
                if n is None:
                    raise NotLocal(f"{what}: dynamic shape")
                parts.append((Atom("X", n),))
        token_axis = any(has_token(p) for p in parts)
        if token_axis and any(lay is None for lay in in_lays):
            raise NotLocal(f"{what} concatenates tokens that do not come from a projection")
        return tuple(base[:dim]) + (concat_parts(parts),) + tuple(base[dim:])

    if name in REDUCTIONS:
        nd = len(lay0)
        dims = _dims(_arg(node, 1, "dim"), nd)
        keep = bool(_arg(node, 2, "keepdim", False))
        _mixes_heads([lay0[d] for d in dims], what, mixing, f"{what} reduces over tokens or heads")
        return tuple(() if i in dims else g for i, g in enumerate(lay0) if keep or i not in dims)

    if name in DIM_LOCAL:
        nd = len(lay0)
        dim = _arg(node, 1, "dim", -1)
        _mixes_heads([lay0[dim % nd]], what, mixing, f"{what} mixes tokens or heads")
        return lay0

    if name in NORMS:
        nshape = _arg(node, 1, "normalized_shape")
        k = len(nshape) if isinstance(nshape, (tuple, list)) else 1
        width = _prod(nshape) if isinstance(nshape, (tuple, list)) else nshape
        _mixes_heads(lay0[len(lay0) - k:], what, mixing, f"{name} over {width} features spans heads (not per-head)")
        return lay0

    if name in ("view_as_complex", "view_as_real"):
        # complex RoPE: view_as_complex pairs the last axis (size 2) into complex numbers, view_as_real
        # splits them back; the pair lies inside one (token, head) cell
        if name == "view_as_real":
            return tuple(lay0) + ((Atom("D", 2),),)
        if not lay0 or dim_size(lay0[-1]) != 2 or has_token_or_head(lay0[-1]):
            raise NotLocal(f"{what} pairs an axis that is not inside a head")
        return tuple(lay0[:-1])

    if name in ELEMENTWISE:
        if shape is None:
            raise NotLocal(f"{what}: dynamic shape")
        ins = [L(a) for a in list(node.args) + list(node.kwargs.values())]
        if name == "type_as" or (node.op == "call_method" and name in ("to", "type")):
            ins = ins[:1]
        return broadcast_merge(ins, shape, what)

    raise NotLocal(f"op {what} is not known to be per-(token, head) local")


def check_mutation(mut: fx.Node, layouts: dict) -> None:
    """A write into a chain tensor (``t[idx] = v`` / ``t.op_(v)``) must keep tokens and heads aligned."""
    target = mut.args[0]
    lay_t = layouts.get(target)
    if lay_t is None:
        raise NotLocal(f"in-place write `{op_name(mut)}` into a tensor off the chain")
    what = f"in-place `{op_name(mut)}` ({mut.name})"
    if mut.target is operator.setitem:
        view = index_layout(lay_t, mut.args[1], what)
        val = mut.args[2]
        lay_v = layouts.get(val) if isinstance(val, fx.Node) else None
        if lay_v is not None:
            shape = tuple(dim_size(g) for g in view)
            broadcast_merge([view, lay_v], shape, what)
        return
    others = [layouts.get(a) if isinstance(a, fx.Node) else None for a in mut.args[1:]]
    shape = tuple(dim_size(g) for g in lay_t)
    broadcast_merge([lay_t] + others, shape, what)


# ---- context parallelism: the rule of diffusers' Ulysses exchange (passes/cp.py) ----------------


def collective_layout(node: fx.Node, lay0, what: str):
    """The layout tracker's rule for a collective on the chain: ``wait_tensor`` passes the layout on;
    ``all_to_all_single`` with equal splits moves (token, head) *ownership*: chunk j of the flattened
    tensor goes to rank j, chunk i of the result came from rank i. Its leading atom decides: a head factor
    of size P (the heads rank j attends: Ulysses before the attention) becomes ``R`` (the source rank's
    token shard); an ``R`` of the same group (after the attention) becomes that head factor again. Valid
    because every rank runs the same graph, so the chunk it receives is laid out as its own. Any other
    collective is not per-(token, head) local."""
    name = collective(node)
    if name == "wait_tensor":
        return lay0
    if name != "all_to_all_single":
        raise NotLocal(f"{what}: collective `{name}` on the chain")
    if lay0 is None:
        raise NotLocal(f"{what}: all_to_all of a tensor off the chain")
    out_s, in_s = _arg(node, 1, "output_split_sizes"), _arg(node, 2, "input_split_sizes")
    group = _arg(node, 3, "group_name")
    if in_s is not None and (len(set(in_s)) != 1 or (out_s is not None and list(out_s) != list(in_s))):
        raise NotLocal(f"{what}: all_to_all with uneven splits ({in_s}, {out_s})")
    size = len(in_s) if in_s is not None else group_size(group)
    g = normalize(lay0[0])
    if not g or g[0].size != size:
        raise NotLocal(f"{what}: the exchanged (leading) axis {g[:1]} is not of the group size {size}")
    a = g[0]
    if a.kind == "H":
        new = Atom("R", size, (group, a.key[0]))
    elif a.kind == "R" and a.key[0] == group:
        new = h_atom(size, a.key[1])
    else:
        raise NotLocal(f"{what}: all_to_all exchanges {a}, neither a head factor nor this group's token shards")
    return ((new,) + tuple(g[1:]),) + tuple(lay0[1:])
