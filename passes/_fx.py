"""Small helpers over Dynamo's torch-level FX graphs, shared by the passes (not a pass itself)."""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def op_name(node: fx.Node) -> str:
    """A short name for what a node does: the method name for ``call_method``, the function's
    ``__name__`` for ``call_function`` (``linear``, ``cat``, ``getitem``, ``mul`` ...), else the op kind."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def example(node: Any) -> Any:
    """The example value Dynamo recorded for a node (a FakeTensor for tensor nodes), or None."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def tensor_meta(node: Any) -> Optional[torch.Tensor]:
    ev = example(node)
    return ev if isinstance(ev, torch.Tensor) else None


def static_shape(node: Any) -> Optional[tuple]:
    """The node's shape as plain ints, or None when it is not a tensor or any size is symbolic."""
    t = tensor_meta(node)
    if t is None:
        return None
    out = []
    for s in t.shape:
        if not isinstance(s, int):
            return None
        out.append(s)
    return tuple(out)


def module_path(node: fx.Node) -> str:
    """Dotted module path of the innermost module that produced ``node`` (``transformer_blocks.3.attn``),
    from ``meta["nn_module_stack"]``; Dynamo's ``L['self'].__dict__['_modules']['x']`` spelling is
    normalised to ``x``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_path(path)


def normalize_path(path: str) -> str:
    import re

    p = path
    p = re.sub(r"^L\['self'\]\.?", "", p)
    p = re.sub(r"^L\['fn'\]\.?", "", p)
    # diffusers' HookRegistry (context-parallel split/gather hooks, caches) replaces a module's forward by a
    # closure over ``function_reference``: Dynamo's root is then that module, spelled this way
    p = re.sub(r"^L\['function_reference'\]\.forward\.__self__\.?", "", p)
    p = p.replace(".__dict__['_modules']", "").replace("__dict__['_modules']", "")
    p = re.sub(r"\['([^'\]]+)'\]", r".\1", p)
    p = re.sub(r"\._modules\.", ".", p)
    p = re.sub(r"\.+", ".", p).strip(".")
    return p


def sdpa_args(node: fx.Node) -> dict:
    """The SDPA call's arguments by name, whether Dynamo recorded them positionally or as keywords."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    for name, a in zip(names, node.args):
        out[name] = a
    out.update(node.kwargs)
    return out


def linear_args(node: fx.Node):
    """(input, weight, bias) of a ``linear`` call node."""
    args = list(node.args) + [None] * 3
    x, w, b = args[0], args[1], args[2]
    x = node.kwargs.get("input", x)
    w = node.kwargs.get("weight", w)
    b = node.kwargs.get("bias", b)
    return x, w, b


def is_mutation(user: fx.Node, target: fx.Node) -> bool:
    """True when ``user`` writes into ``target`` in place (``t[idx] = v``, ``t.mul_(x)``, ``t.copy_(x)``)."""
    if user.op == "call_function" and user.target is operator.setitem:
        return len(user.args) > 0 and user.args[0] is target
    if user.op == "call_method" and str(user.target).endswith("_") and not str(user.target).startswith("_"):
        return len(user.args) > 0 and user.args[0] is target
    return False


def mutations_of(node: fx.Node) -> list:
    return [u for u in node.users if is_mutation(u, node)]


# Uses that read only a tensor's metadata (dtype, shape, device), never its values.
_META_METHODS = {"size", "dim", "type_as", "new_empty", "new_zeros", "new_ones", "new_full", "get_device", "numel"}
_META_FUNCS = {"empty_like", "zeros_like", "ones_like", "full_like", "getattr"}


def is_metadata_use(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` uses ``node`` only for its metadata (``x.type_as(node)``, ``empty_like(node)``...)."""
    name = op_name(user)
    if user.op == "call_method":
        if name == "type_as":
            return len(user.args) > 1 and user.args[1] is node and user.args[0] is not node
        if name in _META_METHODS:
            return user.args[0] is node
        if name in ("to", "type") and user.args[0] is not node:
            return True  # x.to(node) / x.type(node): dtype/device reference
    if user.op == "call_function":
        if name in _META_FUNCS:
            return True
        if name in ("getattr",) or user.target is getattr:
            return True
    return False


def users_excluding(node: fx.Node, allowed: Iterable[fx.Node]) -> list:
    allowed = set(allowed)
    return [u for u in node.users if u not in allowed and not is_metadata_use(u, node)]


#: source files whose frames are attention code (diffusers' processors, its attention dispatch, this repo's
#: examples): a graph break there leaves that attention call outside every compiled graph
_ATTENTION_FILES = ("attention_processor.py", "attention_dispatch.py", "attention.py")


def graph_break(gm: fx.GraphModule) -> Optional[dict]:
    """Why Dynamo ended this graph early, when it did: ``{"reason", "where", "in_attention"}`` from the
    ``compile_subgraph_reason`` Dynamo attaches to the graph module (None when the graph ends at the
    function's return). ``where`` is the innermost user frame (``file:line (function)``); ``in_attention``
    says whether a frame of the break lies in attention code (an attention processor's ``__call__``, or a
    file of attention code), where it keeps that attention call out of every compiled graph."""
    r = getattr(gm, "compile_subgraph_reason", None)
    if r is None or not getattr(r, "graph_break", False):
        return None
    stack = list(getattr(r, "user_stack", None) or [])
    reason = str(r.reason).split("\n")[0].strip()
    where = ""
    if stack:
        f = stack[-1]
        where = f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"
    in_attention = any(f.filename.rsplit("/", 1)[-1] in _ATTENTION_FILES or
                       (f.name == "__call__" and "transformer" in f.filename.rsplit("/", 1)[-1]) for f in stack)
    return {"reason": reason, "where": where, "in_attention": in_attention}
_COLLECTIVES = "_c10d_functional"


def collective(node: fx.Node) -> Optional[str]:
    """The name of the functional collective ``node`` calls (``all_to_all_single``, ``wait_tensor``,
    ``all_gather_into_tensor``…), or None."""
    if node.op != "call_function":
        return None
    # Dynamo records the op packet (``torch.ops._c10d_functional.all_to_all_single``), an overload elsewhere
    name = str(node.target)
    if not name.startswith(_COLLECTIVES + "."):
        return None
    return name.split(".")[1]


def process_group(name):
    """The process group a functional collective names (by its group name string)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def group_size(name) -> int:
    return process_group(name).size()
