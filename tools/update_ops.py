"""What one step costs the host per attention site, counted on the CPU (a diagnostic, not part of the package).

    python tools/update_ops.py [--layers 1] [--single 2] [--policy fixed] [--ops] [--stacks OPNAME]
    TRITON_INTERPRET=1 python tools/update_ops.py --triton ...   # the Triton paths, as on CUDA

Compiles the tiny FLUX of the tests (``tests/_runtime_helpers.tiny_flux_case`` sizes: 8 x 8 image tokens,
16 text tokens, blocks of 16, 2 heads of 16) with ``policy="fixed"`` at the benchmark's aggressive setting
(reuse 0.5, skip 0.8, Taylor order 1), warm-up 3 and interval 3, and runs steps 0-6: dense, dense, update,
dispatch, dispatch, update, dispatch. Step 0 (a plain dense step), step 5 (an update that replaces symbols
and differences against the last update, as in a long loop) and step 6 (a dispatch step) are measured.

Per step and site it prints

* ``aten``: the aten ops dispatched inside the site ops (``TorchDispatchMode``), every op counted, the ops'
  CPU reference implementations included;
* ``gpu``: the same stream as a GPU would see it: each call of an op's implementation (attention, GEMM-Q,
  GEMM-O, Taylor refresh/sum, pooled scores, a schedule compaction) and each dense step's SDPA/``F.linear``
  counted as one launch (on CUDA they are one Triton/cuBLAS/cuDNN kernel), everything else op by op.
  Each is ~one kernel launch, ~5-10 us of host time on a GPU host;
* ``host us``: wall time inside the site ops minus the time inside those implementations (no mode
  installed: the Python and small-op work the host does around the kernels, on this CPU);
* ``suspect``: ops that copy between host and device or wait for the device when run on CUDA
  (``lift_fresh``: ``torch.tensor(data)``; ``_local_scalar_dense``: ``.item()``, ``bool()``, ``int()``,
  ``float()``; ``nonzero``, ``masked_select``; ``_to_copy`` / ``copy_`` with a CPU source;
  boolean-mask ``index``/``index_put_``); ``--stacks NAME`` prints where each one of that name came from.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "tests"))

SITE_OPS = ("site_attention", "site_linear_q", "site_linear_o")
_SUSPECT = ("lift_fresh", "_local_scalar_dense", "nonzero", "masked_select", "item")


def _kernel_standins():
    """``(module, attribute)`` of the functions that are one launch on CUDA."""
    import omni_compile.runtime as rt
    import omni_compile.ops.attention as att
    import omni_compile.ops.flashomni_policy as fp
    import omni_compile.ops.linear_o as lo
    import omni_compile.ops.linear_q as lq
    import omni_compile.ops.pooled as po
    import omni_compile.ops.symbols as sy
    import omni_compile.ops.taylor as ta

    return [(att, "_sparse_attention_op_impl"), (att, "_launch_attention"), (lq, "_sparse_linear_q_op_impl"), (lo, "_sparse_linear_o_op_impl"),
            (ta, "_taylor_refresh_impl"), (ta, "_taylor_sum_impl"), (po, "_pooled_scores_op_impl"),
            (sy, "selected_first"), (sy, "longest_first"), (sy, "slice_head_schedule"), (sy, "slice_tile_schedule"), (fp, "_flashomni_symbols_impl"), (rt, "_dense_attention"),
            (rt, "_dense_linear")]


class _Meter:
    """Shared by the dispatch mode and the stand-in wrappers: what is being counted right now."""

    def __init__(self):
        self.on = False
        self.inside = 0  # > 0 inside a kernel stand-in: its ops are not counted one by one
        self.kernel_s = 0.0
        self.reset()

    def reset(self):
        self.aten = collections.Counter()
        self.gpu = collections.Counter()
        self.names = collections.Counter()
        self.suspects = collections.Counter()
        self.stacks = collections.defaultdict(list)
        self.kernel_s = 0.0


def _wrap(meter: _Meter, fn, label):
    def wrapped(*args, **kwargs):
        outer = meter.inside == 0
        if outer and meter.on:
            meter.gpu[label] += 1
        meter.inside += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            meter.inside -= 1
            if outer:
                meter.kernel_s += time.perf_counter() - t0

    wrapped.__wrapped__ = fn
    return wrapped


def _is_suspect(func, args) -> bool:
    name = func.__name__.split(".")[0]
    if name in _SUSPECT:
        return True
    if name in ("index", "index_put", "index_put_"):
        idx = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx or ()))
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return args[1].device.type == "cpu" and args[1].dim() > 0 and False  # on CPU every copy is host to host
    return False


class _Mode(TorchDispatchMode):
    """A mode Dynamo compiles through (it runs a frame eagerly under any other mode, and the site ops
    would never run)."""

    @classmethod
    def ignore_compile_internals(cls):
        return True

    @classmethod
    def is_infra_mode(cls):
        return True


class _Count(_Mode):
    def __init__(self, meter: _Meter, stacks_of=None):
        super().__init__()
        self.meter, self.stacks_of, self.site_op = meter, stacks_of, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        m = self.meter
        if func.namespace == "flashomni" and func.__name__.split(".")[0] in SITE_OPS:
            prev, self.site_op = self.site_op, func.__name__.split(".")[0]
            m.on = True
            try:
                import omni_compile.runtime as rt

                with self:  # its Python kernel, called directly: the ops it dispatches come back here
                    return getattr(rt, self.site_op).fn(*args, **kwargs)
            finally:
                m.on, self.site_op = False, prev
        if m.on:
            name = func.__name__
            m.aten[self.site_op] += 1
            if m.inside == 0:
                m.gpu[self.site_op] += 1
                m.names[(self.site_op, name)] += 1
            if _is_suspect(func, args):
                m.suspects[name] += 1
                if self.stacks_of and self.stacks_of in name:
                    m.stacks[name].append("".join(traceback.format_stack(limit=14)[:-3]))
        return func(*args, **kwargs)


class _Time(_Mode):
    """Wall time inside the site ops only (their inner ops run without a mode)."""

    def __init__(self, meter: _Meter):
        super().__init__()
        self.meter, self.site_s = meter, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "flashomni" and func.__name__.split(".")[0] in SITE_OPS:
            name = func.__name__.split(".")[0]
            k0 = self.meter.kernel_s
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            self.site_s[name] += time.perf_counter() - t0 - (self.meter.kernel_s - k0)
            return out
        return func(*args, **kwargs)


def measure(layers: int = 1, single: int = 2, stacks_of=None, repeats: int = 5, backend: str = "auto", **config):
    """``{action: dict(aten=…, gpu=…, host_us=…, names=…, suspects=…, stacks=…)}`` per site, for steps 0
    (dense), 5 (update) and 6 (dispatch) of the loop in the module docstring. ``backend="triton"`` (with
    ``TRITON_INTERPRET=1``) runs the ops' Triton paths, as CUDA would, in the interpreter: the count then
    is the GPU's (the CPU's PyTorch references decode some schedules in more ops than CUDA launches)."""
    import contextlib

    from omni_compile.ops import kernel_backend

    with kernel_backend(backend) if backend != "auto" else contextlib.nullcontext():
        return _measure(layers, single, stacks_of, repeats, **config)


def _measure(layers, single, stacks_of, repeats, **config):
    from omni_compile import OmniConfig, OmniState
    from omni_compile.policies import Fixed
    from omni_compile.schedule import step_action

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from _runtime_helpers import initial_latents, tiny_flux  # the tests' tiny FLUX, counted as the tests count it

    model, make_inputs, info = tiny_flux(side=8, text=16, layers=layers, single_layers=single, heads=2, head_dim=16)
    lat = initial_latents(info)
    cfg = dict(use_inductor=False, block_q=16, block_kv=16, warmup=3, interval=3, policy=Fixed(reuse=0.5, skip=0.8),
               taylor_order=1)
    cfg.update(config)
    state = OmniState(OmniConfig(**cfg))
    torch._dynamo.reset()
    fn = torch.compile(model, backend="flashomni", options={"state": state})
    meter = _Meter()
    saved = []
    for mod, attr in _kernel_standins():
        fn_ = getattr(mod, attr)
        saved.append((mod, attr, fn_))
        setattr(mod, attr, _wrap(meter, fn_, attr))
    want = {0: "dense", 5: "update", 6: "dispatch"}
    ts = torch.linspace(1.0, 0.3, 7)
    res = {}
    try:
        with torch.no_grad():
            fn(**make_inputs(lat, ts[:1]))  # compile
            for rep in range(repeats + 1):
                state.reset()
                for i in range(7):
                    assert step_action(i, cfg["warmup"], cfg["interval"]) == want.get(i, step_action(i, 3, 3))
                    kw = make_inputs(lat, ts[i:i + 1])
                    if i not in want:
                        fn(**kw)
                        continue
                    act = want[i]
                    if rep == 0:  # count once
                        meter.reset()
                        with _Count(meter, stacks_of):
                            fn(**kw)
                        n = len(state.sites)
                        res[act] = dict(aten=sum(meter.aten.values()) / n, gpu=sum(meter.gpu.values()) / n,
                                        aten_by_op={k: v / n for k, v in meter.aten.items()},
                                        gpu_by_op={k: v / n for k, v in meter.gpu.items()},
                                        names=dict(meter.names), suspects=dict(meter.suspects),
                                        stacks=dict(meter.stacks), host_us=[])
                    else:
                        t = _Time(meter)
                        with t:
                            fn(**kw)
                        res[act]["host_us"].append(sum(t.site_s.values()) / len(state.sites) * 1e6)
    finally:
        for mod, attr, fn_ in saved:
            setattr(mod, attr, fn_)
    for r in res.values():
        r["host_us"] = sorted(r["host_us"])[len(r["host_us"]) // 2] if r["host_us"] else float("nan")
    return res, state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--policy", default="fixed", help="fixed (reuse 0.5, skip 0.8) or another policy name")
    ap.add_argument("--ops", action="store_true", help="list the counted ops per site op and action")
    ap.add_argument("--triton", action="store_true",
                    help="run the ops' Triton paths (set TRITON_INTERPRET=1 on a CPU): the GPU's launch count")
    ap.add_argument("--stacks", default=None, help="print the call stacks of suspect ops whose name contains this")
    args = ap.parse_args()
    extra = {} if args.policy == "fixed" else dict(policy=args.policy)
    res, state = measure(args.layers, args.single, args.stacks, backend="triton" if args.triton else "auto", **extra)
    print(f"policy {state.config.policy!r}, {state.summary()}; per site:")
    print(f"{'step':9s} {'aten':>7s} {'gpu':>7s} {'host us':>8s}  gpu by site op")
    for act in ("update", "dense", "dispatch"):
        r = res[act]
        by = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["gpu_by_op"].items()))
        print(f"{act:9s} {r['aten']:7.1f} {r['gpu']:7.1f} {r['host_us']:8.0f}  {by}")
    for act in ("update", "dense", "dispatch"):
        r = res[act]
        print(f"{act}: suspect host-device ops (whole step): {r['suspects'] or 'none'}")
        if args.ops:
            for (op, name), c in sorted(r["names"].items(), key=lambda kv: (kv[0][0], -kv[1])):
                print(f"    {op:15s} {name:40s} {c / len(state.sites):6.2f}")
        for name, st in r["stacks"].items():
            for s in st[:3]:
                print(f"--- {name} ({act})\n{s}")


if __name__ == "__main__":
    main()
