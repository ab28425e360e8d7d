"""Pass 1: find every ``scaled_dot_product_attention`` call and decide whether the ops can run it.

Returns one :class:`AttentionSite` per SDPA node, in graph order. ``reject`` is None when the site can be
rewritten, else the reason it stays dense (logged at debug level and counted in :data:`SKIP_COUNTS`).
Supported: float16/bfloat16/float32 on CPU or CUDA, q/k/v ``[B, H, S, D]`` with the same H and D (ops'
head-dim range), no dropout, not causal, no GQA, no symbolic sizes, and either no mask or a
*key-padding* mask (one that broadcasts over heads-or-not and over queries: ``[B|1, H|1, 1, Skv]``),
which the runtime applies by dropping the masked keys.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from ._fx import example, is_sdpa, module_path, sdpa_args, static_shape, tensor_meta

log = logging.getLogger("omni_compile.passes")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DEVICES = ("cpu", "cuda")
#: How often each reason to leave a site dense was seen (process-wide, for diagnostics and tests).
SKIP_COUNTS: collections.Counter = collections.Counter()


@dataclass
class AttentionSite:
    node: fx.Node
    name: str  # module path of the attention module, e.g. transformer_blocks.3.attn
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: Optional[fx.Node]
    scale: Optional[float]
    batch: int = 0
    heads: int = 0
    seq_q: int = 0
    seq_kv: int = 0
    head_dim: int = 0
    dtype: Optional[torch.dtype] = None
    device: str = ""
    mask_kind: Optional[str] = None  # None | "key_padding"
    reject: Optional[str] = None


def _check_head_dim(d: int) -> Optional[str]:
    if d < 16 or d > 128 or d % 8:
        return f"head dim {d} outside the ops' range (multiple of 8 from 16 to 128)"
    return None


def _classify_mask(mask: fx.Node, batch: int, heads: int, seq_q: int, seq_kv: int):
    shp = static_shape(mask)
    t = tensor_meta(mask)
    if shp is None or t is None:
        return None, "attention mask with dynamic or unknown shape"
    if t.dtype not in (torch.bool,) + SUPPORTED_DTYPES:
        return None, f"attention mask of dtype {t.dtype}"
    shp4 = (1,) * (4 - len(shp)) + tuple(shp)
    if len(shp4) != 4:
        return None, f"attention mask of shape {list(shp)}"
    b, h, sq, sk = shp4
    if sq != 1 or sk != seq_kv or b not in (1, batch) or h not in (1, heads):
        return None, f"attention mask of shape {list(shp)} is not a key-padding mask"
    return "key_padding", None


def find_sites(gm: fx.GraphModule) -> list:
    """Every SDPA call of ``gm`` as an :class:`AttentionSite` (graph order), each checked for support."""
    sites = []
    names: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if not is_sdpa(node):
            continue
        a = sdpa_args(node)
        name = module_path(node) or node.name
        names[name] += 1
        if names[name] > 1:  # one module running attention twice: keep names unique
            name = f"{name}#{names[name] - 1}"
        scale = _number(a.get("scale"))
        site = AttentionSite(node, name, a["query"], a["key"], a["value"], a.get("attn_mask"),
                             scale if isinstance(scale, (int, float)) else None)
        site.reject = _check(site, a)
        if site.reject:
            SKIP_COUNTS[site.reject.split(" (")[0]] += 1
            log.debug("flashomni: %s left dense: %s", site.name, site.reject)
        sites.append(site)
    return sites


def _number(v):
    """``v``, or the plain number a graph node holds (a value the graph reads back, e.g. ``p.item()``, whose
    example value the backend made concrete); the node itself when its value is not known."""
    if isinstance(v, fx.Node):
        ev = example(v)
        if isinstance(ev, (bool, int, float)):
            return ev
    return v


def _check(site: AttentionSite, a: dict) -> Optional[str]:
    for k in ("query", "key", "value"):
        if not isinstance(a[k], fx.Node):
            return f"{k} is not a graph tensor"
    a = {k: (v if k in ("query", "key", "value", "attn_mask") else _number(v)) for k, v in a.items()}
    if a.get("dropout_p") not in (0, 0.0, None):
        return f"dropout_p={a['dropout_p']} (dropout is not supported)"
    if a.get("is_causal") not in (False, None):
        return "is_causal=True (causal attention is not supported)"
    if a.get("enable_gqa") not in (False, None):
        return "enable_gqa=True (grouped-query attention is not supported)"
    if a.get("scale") is not None and not isinstance(a["scale"], (int, float)):
        return "scale is not a constant"
    qs, ks, vs = (static_shape(site.q), static_shape(site.k), static_shape(site.v))
    if qs is None or ks is None or vs is None:
        return "dynamic (symbolic) shapes are not supported yet"
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return f"q/k/v are not [B, H, S, D] (q {list(qs)}, k {list(ks)})"
    B, H, Sq, D = qs
    site.batch, site.heads, site.seq_q, site.head_dim = B, H, Sq, D
    site.seq_kv = ks[2]
    if ks[:2] != (B, H) or vs[:2] != (B, H) or ks[3] != D or vs[3] != D or vs[2] != ks[2]:
        return f"unusual q/k/v layout (q {list(qs)}, k {list(ks)}, v {list(vs)})"
    qt = tensor_meta(site.q)
    site.dtype, site.device = qt.dtype, qt.device.type
    if qt.dtype not in SUPPORTED_DTYPES:
        return f"dtype {qt.dtype} is not supported"
    if qt.device.type not in SUPPORTED_DEVICES:
        return f"device {qt.device.type} is not supported"
    for t in (site.k, site.v):
        tm = tensor_meta(t)
        if tm.dtype != qt.dtype or tm.device != qt.device:
            return "q/k/v differ in dtype or device"
    hd = _check_head_dim(D)
    if hd:
        return hd
    if site.mask is not None:
        if not isinstance(site.mask, fx.Node):
            return "attention mask is not a graph tensor"
        site.mask_kind, why = _classify_mask(site.mask, B, H, Sq, site.seq_kv)
        if why:
            return why
    return None
