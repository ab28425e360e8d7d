"""Pass 3: classify a site as ``joint`` / ``self`` / ``cross`` and find its text/vision token split.

* **cross**: keys come from other tokens than the queries (their projections read a different tensor),
  e.g. PixArt/Wan/LTX ``attn2`` (image queries, text keys).
* **joint**: queries and keys are one sequence that holds both text and vision tokens: separate text and
  image projections concatenated along tokens (FLUX/SD3/HunyuanVideo double-stream blocks), or one
  projection of ``cat([text, image])`` hidden states (FLUX/HunyuanVideo single-stream, CogVideoX).
* **self**: everything else (DiT, PixArt ``attn1``, SD3.5 ``attn2``, HunyuanVideo's token refiner over text).

Which tokens are text: a projection named like a context projection (``add_q_proj``…), or a stream
whose length equals the text length (the ``encoder_hidden_states`` input's sequence length). Segments are
``(modality, start, stop)`` over the attention's query (and key) sequence.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import fx

from . import cp
from ._fx import linear_args, op_name, static_shape, tensor_meta

_TEXT_HINTS = ("add_q_proj", "add_k_proj", "add_v_proj", "context", "txt", "text", "encoder")
_PASS_THROUGH = {
    "layer_norm", "rms_norm", "group_norm", "mul", "add", "sub", "truediv", "div", "to", "float", "type",
    "type_as", "contiguous", "clone", "silu", "gelu", "dropout", "half", "bfloat16",
}


_TEXT_INPUTS = ("encoder_hidden_states", "prompt_embeds", "context", "cap_feats", "txt")


def _is_text_input(n: fx.Node) -> bool:
    low = n.name.lower()
    return n.op == "placeholder" and any(h in low for h in _TEXT_INPUTS) and not _is_parameter(n)


def _is_parameter(n: fx.Node) -> bool:
    low = n.name.lower()
    return n.op == "get_attr" or "parameters" in low or "buffers" in low


class TextStream(frozenset):
    """The lengths the text token stream takes (a frozenset: ``length in stream``), and where each node's
    value comes from (``source``): what :func:`classify` needs to tell text tokens from image tokens."""

    deps: dict
    text: frozenset
    small: frozenset

    def source(self, node) -> str:
        """``"text"``: computed from the text input, parameters and per-item conditioning alone;
        ``"image"``: from other token inputs (the latents) and not the text; ``"both"`` or ``"unknown"``."""
        d = self.deps.get(node)
        if d is None:
            return "unknown"
        token = d - self.small
        if token and token <= self.text:
            return "text"
        if token and not token & self.text:
            return "image"
        return "both" if token else "unknown"


def text_lengths(gm: fx.GraphModule) -> TextStream:
    """Every length the text token stream takes before it meets the image: the text input's, and those of
    ``[B, L, C]`` tensors computed from the text input, parameters and per-item conditioning alone (inputs
    of at most two dimensions: timestep, pooled embeddings). AuraFlow prepends 8 learned register tokens
    to the prompt, so its joint sequences hold ``8 + L_text`` text tokens. A text input that context
    parallelism shards counts at the length this rank sees."""
    deps: dict = {}
    small: set = set()
    text: set = set()
    lengths = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if _is_parameter(n):
                deps[n] = frozenset()
                continue
            deps[n] = frozenset((n,))
            shp = static_shape(n)
            if shp is not None and len(shp) <= 2:
                small.add(n)  # per-item conditioning or ids (txt_ids): not a token stream
            elif _is_text_input(n):
                text.add(n)
            continue
        d = frozenset().union(*(deps.get(a, frozenset()) for a in n.all_input_nodes))
        deps[n] = d
        if d & text and d <= text | small:
            shp = static_shape(n)
            if shp is not None and len(shp) == 3:
                lengths.add(shp[1])
    for n in text:
        shp = static_shape(n)
        if shp is not None and len(shp) == 3:
            lengths.add(cp.shard_length(n, shp[1]))
    out = TextStream(lengths)
    out.deps, out.text, out.small = deps, frozenset(text), frozenset(small)
    return out


#: Argument names a denoising timestep goes by, most usual first (in graphs after Dynamo's ``l_`` /
#: ``l_kwargs_`` prefix and ``_`` suffix); any name holding ``timestep`` counts too.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "noise_level", "time", "times")
#: Parts of the names of other scalar conditions that some models embed sinusoidally like the timestep
#: (FLUX-dev's ``guidance``, CogVideoX 1.5's ``ofs``, PixArt's resolution and aspect ratio, frame rates):
#: constant across the steps, so taken for the timestep they would make every call one step's stream.
_OTHER_CONDITIONS = ("guidance", "ofs", "aspect", "resolution", "size", "label", "fps", "frame", "motion", "cfg")
_SINUSOID = ("sin", "cos")


def _argument_name(node: fx.Node) -> str:
    return re.sub(r"^l_(kwargs_)?", "", node.name.lower()).rstrip("_")


def _named_like_a_timestep(name: str) -> bool:
    return "timestep" in name or name in TIMESTEP_NAMES


def _nearby(node: fx.Node, depth: int, forward: bool):
    """The nodes within ``depth`` edges of ``node`` (its users' side when ``forward``, its inputs'
    otherwise), breadth first, each once."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for m in (n.users if forward else n.all_input_nodes):
                if m not in seen:
                    seen.add(m)
                    nxt.append(m)
                    yield m
        frontier = nxt


def _feeds_sinusoidal_embedding(node: fx.Node) -> bool:
    """Whether ``node`` is the input of a sinusoidal timestep embedding (diffusers' ``Timesteps`` /
    ``get_timestep_embedding`` and its copies: ``t[:, None] * exp(-log(P) * arange(half) / half)`` then
    ``sin`` and ``cos``): a ``sin``/``cos`` a few nodes downstream whose argument also derives from
    ``exp`` of an ``arange``. Rotary position embeddings take ``pow`` of an ``arange`` instead, and their
    positions are 2-D."""
    # depth 12: FLUX takes 7 nodes (to, mul by 1000, getitem, float, mul by the frequencies, mul, sin)
    for m in _nearby(node, 12, forward=True):
        if op_name(m) in _SINUSOID:
            for e in _nearby(m, 8, forward=False):
                if op_name(e) == "exp" and any(op_name(a) == "arange" for a in _nearby(e, 6, forward=False)):
                    return True
    return False


def timestep_input(gm: fx.GraphModule) -> Optional[fx.Node]:
    """The denoising timestep input of ``gm``: a tensor placeholder of at most one dimension (Dynamo's
    parameter and buffer placeholders, whose names hold ``parameters``, ``modules`` or ``buffers``, are
    not it), found by its role and, where that does not decide, by its name. In order of preference:

    1. one that feeds a sinusoidal timestep embedding (:func:`_feeds_sinusoidal_embedding`) and is named
       like a timestep (``timestep``, ``timesteps``, ``t``, ``sigma``, ``sigmas``, ``noise_level``, …:
       Dynamo spells them ``l_timestep_``, ``l_kwargs_timestep_``, ``l_t_``);
    2. one that feeds such an embedding and is not named like another scalar condition (FLUX-dev's
       ``guidance`` is embedded the same way, but stays constant across the steps);
    3. one named like a timestep (a graph whose embedding does not look like diffusers').

    None when the graph has none (e.g. a graph after a graph break, or a block compiled on its own)."""
    candidates = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        low = n.name.lower()
        if "parameters" in low or "modules" in low or "buffers" in low:
            continue
        t = tensor_meta(n)
        if t is None or t.dim() > 1:
            continue
        candidates.append(n)
    named = [n for n in candidates if _named_like_a_timestep(_argument_name(n))]
    embedded = [n for n in candidates if _feeds_sinusoidal_embedding(n)]
    for n in embedded:
        if n in named:
            return n
    for n in embedded:
        if not any(c in _argument_name(n) for c in _OTHER_CONDITIONS):
            return n
    return named[0] if named else None


def token_grid(gm: fx.GraphModule, batch: int) -> Optional[tuple]:
    """``(frames, height, width)`` of the vision tokens, read from the graph's patch embedding: the first
    ``conv2d`` / ``conv3d`` (DiT, PixArt, SD3: ``[B, C, h, w]`` → ``(1, h, w)``; CogVideoX embeds frames as
    a batch, ``[B·F, C, h, w]`` → ``(F, h, w)``; HunyuanVideo, Wan: ``[B, C, f, h, w]`` → ``(f, h, w)``).
    None when the graph has no conv (FLUX and LTX pack latents before the transformer) or its output
    does not divide into ``batch``. The runtime uses it only where its size matches a site's vision tokens."""
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or op_name(n) not in ("conv2d", "conv3d", "_conv_forward"):
            continue
        shp = static_shape(n)
        if shp is None:
            return None
        if len(shp) == 5 and shp[0] == batch:
            return tuple(shp[2:])
        if len(shp) == 4 and batch > 0 and shp[0] % batch == 0:
            return (shp[0] // batch, shp[2], shp[3])
        return None
    return None


def _token_parts(x: fx.Node) -> Optional[list]:
    """``(node, length)`` of the token-axis ``cat`` parts that ``x`` [B, S, C] comes from, walking back
    through per-token ops (norms, modulation, casts); None when no such cat is found."""
    shp = static_shape(x)
    if shp is None or len(shp) != 3:
        return None
    n = x
    for _ in range(64):
        name = op_name(n)
        if name in ("cat", "concat"):
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            if dim % 3 == 1:
                parts = n.args[0] if n.args else n.kwargs["tensors"]
                lens = [static_shape(p)[1] if static_shape(p) else None for p in parts]
                return None if None in lens else list(zip(parts, lens))
            return None
        if name not in _PASS_THROUGH:
            return None
        main = None
        for a in n.all_input_nodes:
            if static_shape(a) == shp:
                main = a
                break
        if main is None:
            return None
        n = main
    return None


def _hinted(name: str) -> bool:
    return any(h in name.lower().rsplit(".", 1)[-1] for h in _TEXT_HINTS)


def _modality(name: str, length: int, text_len, names_decide: bool = False) -> str:
    """``"text"`` for a projection named like a context projection, or (unless ``names_decide``: another
    projection of the site carries such a name, so names tell the streams apart) one whose length is one
    of the text stream's."""
    if _hinted(name):
        return "text"
    if not names_decide and length in text_len:
        return "text"
    return "vision"


def _stream(node, length: int, text_len, alone: bool = False) -> str:
    """Modality of the tokens of ``node`` (a token stream ``[B, L, C]``): by where its value comes from when
    that is text or image alone. A stream computed from both is, when it attends ``alone`` (not as one part
    of a joint sequence), the image after a cross-attention to the text; as a part of a joint sequence both
    streams read both after the first joint attention, and its length decides."""
    src = text_len.source(node) if isinstance(text_len, TextStream) else "unknown"
    if src in ("text", "image"):
        return "text" if src == "text" else "vision"
    if alone and src == "both":
        return "vision"
    return "text" if length in text_len else "vision"


def _projected(p, length: int, text_len) -> str:
    """Modality of the rows of projection ``p``: text for a context projection's name, else by its input."""
    return "text" if _hinted(p.name) else _stream(linear_args(p.node)[0], length, text_len, alone=True)


def classify(site, walk, text_len):
    """(kind, segments, kv_segments) for a site, from its walk (projections) and the text stream
    (:func:`text_lengths`; an int or None is taken as that one length or none)."""
    if text_len is None or isinstance(text_len, int):
        text_len = frozenset() if text_len is None else frozenset((text_len,))
    segs: list = []
    qp = walk.q_projections if walk is not None else []
    kp = walk.k_projections if walk is not None else []
    named = any(_hinted(p.name) for p in qp)
    if len(qp) > 1 and all(p.row_offset is not None for p in qp):
        for p in sorted(qp, key=lambda p: p.row_offset):
            segs.append((_modality(p.name, p.rows, text_len, named), p.row_offset, p.row_offset + p.rows))
    elif len(qp) > 1:
        # projection order in the sequence unknown (GEMM-Q walk failed): assume the graph's cat order
        off = 0
        for p in qp:
            segs.append((_modality(p.name, p.rows, text_len, named), off, off + p.rows))
            off += p.rows
    elif len(qp) == 1:
        x = linear_args(qp[0].node)[0]
        parts = _token_parts(x)
        if parts and len(parts) > 1 and sum(n for _, n in parts) == site.seq_q:
            off = 0
            for node, n in parts:
                segs.append((_stream(node, n, text_len), off, off + n))
                off += n
        elif _hinted(qp[0].name):
            segs.append(("text", 0, site.seq_q))
        else:
            segs.append((_stream(x, site.seq_q, text_len, alone=True), 0, site.seq_q))
    if not segs or segs[-1][2] != site.seq_q:
        segs = [("text" if site.seq_q in text_len else "vision", 0, site.seq_q)]

    q_in = {linear_args(p.node)[0] for p in qp}
    k_in = {linear_args(p.node)[0] for p in kp}
    if q_in and k_in:
        cross = not k_in <= q_in
    else:
        cross = site.seq_q != site.seq_kv
    if cross:
        placed = sorted((p for p in kp if p.row_offset is not None), key=lambda p: p.row_offset)
        kv, off = [], 0
        for p in placed:  # keys made of several projections' rows (PRX: text then image)
            if p.row_offset != off:
                break
            kv.append((_projected(p, p.rows, text_len), off, off + p.rows))
            off += p.rows
        if off != site.seq_kv or not kv:
            kv = [(_projected(kp[0], site.seq_kv, text_len) if kp else
                   ("text" if site.seq_kv in text_len else "vision"), 0, site.seq_kv)]
        return "cross", segs, kv
    mods = {s[0] for s in segs}
    kind = "joint" if {"text", "vision"} <= mods else "self"
    return kind, segs, list(segs)


# ---- context parallelism (passes/cp.py) ----------------------------------------------------------------


def classify_cp(site, walk, text_len: Optional[int], par: dict):
    """``classify`` for a context-parallel site: on one rank's shard, spread over the ranks where the
    attention sees them all. Ulysses: queries and keys are every rank's shard, rank-major (FLUX
    ``[text 0-4, vision 4-12, text 12-16, vision 16-24]``); ring: the queries are this rank's own, the keys
    every rank's."""
    import copy

    size = par["size"]
    local = copy.copy(site)
    if par["mode"] == "ulysses":
        local.seq_q, local.seq_kv = site.seq_q // size, site.seq_kv // size
    else:
        local.seq_kv = site.seq_kv // size
    kind, segs, kv_segs = classify(local, walk, text_len)
    kv = cp.spread(kv_segs, local.seq_kv, size)
    return kind, (cp.spread(segs, local.seq_q, size) if par["mode"] == "ulysses" else segs), kv
