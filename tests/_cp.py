"""Context-parallel runs for the tests: ranks as processes on this machine (gloo, CPU), diffusers' own
``enable_parallelism``, the tiny FLUX and Wan, and what a single process must reproduce.

``run_ranks(cases, world)`` spawns ``world`` processes once (``torch.multiprocessing.spawn``) and runs every
case in each; a case compiles its model with ``backend="flashomni"`` under context parallelism, runs a
short denoising loop per policy on that one compiled graph and returns, per rank: the outputs per step, the
bits each policy decided (:class:`Recorder`), the collectives issued per step (:func:`issued`), the
sites and the state's report and memory. The single-process side (:func:`single_loop`) replays those bits
through :class:`Replay`, mapped from the ranks' token order to its own (:func:`block_order`).
"""

from __future__ import annotations

import os
import tempfile
import traceback
from dataclasses import dataclass, field

import torch

BLOCK = 16
STEPS = 7  # warm-up 2, interval 3: dense 0, update 1, dispatch 2-3, update 4, dispatch 5-6
WARMUP, INTERVAL = 2, 3
#: FLUX sizes: 32 text + 64 image tokens, so each of 2 ranks holds 16 text + 32 image tokens, whole blocks
FLUX_TEXT, FLUX_SIDE = 32, 8


# ---- models and inputs --------------------------------------------------------------------------------


def build(family: str):
    """``(model, inputs(x, t), x0, t_scale)``: the tiny model, its inputs for latents ``x`` at timestep ``t``
    (in [0, 1]), the first latents."""
    if family in ("flux", "flux4"):
        from _runtime_helpers import initial_latents, tiny_flux

        # flux4: 4 heads and 64 text + 256 image tokens, so that 4 ranks hold whole blocks and heads
        side, text, heads = (FLUX_SIDE, FLUX_TEXT, 2) if family == "flux" else (16, 64, 4)
        model, make, info = tiny_flux(side=side, text=text, layers=1, single_layers=1, heads=heads, head_dim=16)
        return model, lambda x, t: make(x, torch.tensor([t])), initial_latents(info)
    if family == "wan":
        import _tiny_models

        model, make = _tiny_models.build("wan")
        kw = make(0)
        x0 = kw.pop("hidden_states")

        def inputs(x, t):
            return dict(kw, hidden_states=x, timestep=torch.tensor([t * 1000.0]))

        return model, inputs, x0
    raise ValueError(family)


def enable(model, mode: str, world: int):
    """diffusers' context parallelism on ``model`` (``omni_compile.bench.parallel.enable``: its ``_cp_plan``,
    and on CPU ranks an lse path for ring attention)."""
    from omni_compile.bench import parallel

    parallel.enable(model, mode, world)


# ---- policies that record and replay bits ---------------------------------------------------------------


@dataclass
class Recorder:
    """Runs ``inner`` and keeps the bits it decided per (site name, step)."""

    inner: object
    bits: dict = field(default_factory=dict)
    name = "recorder"
    needs_features = False
    reuses_text = False

    @property
    def needs_scores(self) -> bool:
        from omni_compile.policies import resolve_policy

        return resolve_policy(self.inner).needs_scores

    def __call__(self, inp, config):
        from omni_compile.policies import resolve_policy

        reuse, skip = resolve_policy(self.inner)(inp, config)
        self.bits[(inp.site_name, inp.step)] = (reuse.cpu().clone(), skip.cpu().clone())
        return reuse, skip


@dataclass
class Replay:
    """Returns the bits of ``bits[(site name, step)]``."""

    bits: dict
    name = "replay"
    needs_scores = False
    needs_features = False
    reuses_text = False

    def __call__(self, inp, config):
        reuse, skip = self.bits[(inp.site_name, inp.step)]
        return reuse.to(inp.device), skip.to(inp.device)


def block_order(segments_local: list, size: int, seq_local: int) -> torch.Tensor:
    """For each block of the single process's sequence (text of every rank, then vision), the block of
    the ranks' rank-major sequence that holds the same tokens: both are whole blocks of ``BLOCK`` rows."""
    cp_blocks = []
    for r in range(size):
        for m, a, b in segments_local:
            cp_blocks += [(m, r, i) for i in range(a // BLOCK, b // BLOCK)]
    order = sorted(range(len(cp_blocks)), key=lambda i: (cp_blocks[i][0] != "text", cp_blocks[i][1], cp_blocks[i][2]))
    return torch.tensor(order, dtype=torch.long)


def replay_bits(per_rank: list, policy: str) -> dict:
    """The bits the ranks decided under ``policy`` (their results of one case), for a single process."""
    modes, orders = {}, {}
    for site in per_rank[0]["sites"]:
        cp = site["cp"]
        modes[site["name"]] = cp["mode"] if cp else None
        if cp:
            n = cp["seq_local"]
            local = [(m, a, min(b, n)) for m, a, b in site["segments"] if a < n]  # one rank's shard
            order = block_order(local, cp["size"], cp["seq_local"])
            orders[site["name"]] = (order, order)
    return merge_bits([r["bits"][policy] for r in per_rank], modes, orders)


def merge_bits(per_rank: list, modes: dict, orders: dict) -> dict:
    """The bits of the whole site from every rank's recorded ones, in the single process's token order.
    Ulysses: ranks hold heads (concatenated in rank order); ring: every rank decided for every query
    (rank 0's); a site that context parallelism does not touch (Wan's cross-attention) holds its rank's
    queries (concatenated along query blocks)."""
    out = {}
    for key in per_rank[0]:
        name = key[0]
        parts = [r[key] for r in per_rank]
        mode = modes[name]
        if mode == "ulysses":
            reuse, skip = (torch.cat([p[i] for p in parts], dim=1) for i in (0, 1))
        elif mode == "ring":
            reuse, skip = parts[0]
        else:
            reuse, skip = (torch.cat([p[i] for p in parts], dim=2) for i in (0, 1))
        q_order, k_order = orders.get(name, (None, None))
        if q_order is not None:
            reuse, skip = reuse[:, :, q_order], skip[:, :, q_order]
        if k_order is not None:
            skip = skip[..., k_order]
        out[key] = (reuse, skip)
    return out


# ---- the loop -------------------------------------------------------------------------------------------


def timesteps():
    return [1.0 - i / STEPS for i in range(STEPS)]


def loop(fn, inputs, x0, counts=None) -> list:
    """An Euler loop of ``STEPS`` calls; the latents of every step. ``counts`` (a list) gets the number of
    collectives each call issued (:func:`issued`)."""
    ts = timesteps() + [0.0]
    x, outs = x0.clone(), []
    with torch.no_grad():
        for i in range(STEPS):
            before = issued() if counts is not None else 0
            v = fn(**inputs(x, ts[i]))[0]
            if counts is not None:
                counts.append(issued() - before)
            x = x + (ts[i + 1] - ts[i]) * v
            outs.append(x.clone())
    return outs


def issued() -> int:
    """Collectives this process has issued so far, over every process group: c10d numbers each group's
    collectives (the functional ones in compiled graphs too). Neither a ``TorchDispatchMode`` (under one,
    Dynamo runs the frame eagerly instead of the compiled graph, and the site ops never run) nor the
    profiler (~1.5 s per step of these tiny loops) is needed."""
    from torch.distributed.distributed_c10d import _world

    return sum(pg._get_sequence_number_for_group() for pg in list(_world.pg_names))


def eager_loop(family: str) -> list:
    """The loop in this process, eager, without parallelism."""
    model, inputs, x0 = build(family)
    return loop(model, inputs, x0)


def single_loops(family: str, policies: list, config: tuple = ()) -> list:
    """The loop in this process without parallelism, once per policy, all on one compiled graph:
    ``[(latents per step, memory_bytes, report)]``; ``config`` as for :func:`run_case`."""
    import omni_compile

    model, inputs, x0 = build(family)
    torch._dynamo.reset()
    state = omni_compile.OmniState(_config(config))
    state.name_modules(model)
    compiled = torch.compile(model, backend="flashomni", options={"state": state})
    out = []
    for p in policies:
        state.configure(policy=p)
        out.append((loop(compiled, inputs, x0), state.memory_bytes(), state.report()))
    torch._dynamo.reset()
    return out


def _config(config: tuple):
    from omni_compile import OmniConfig

    base = dict(policy="dense", use_inductor=False, block_q=BLOCK, block_kv=BLOCK, warmup=WARMUP, interval=INTERVAL,
                block_cache=None)
    return OmniConfig(**{**base, **dict(config)})


# ---- what each rank runs ----------------------------------------------------------------------------------


def run_case(rank: int, world: int, family: str, mode: str, policies: tuple, config: tuple = ()) -> dict:
    """One case on this rank (module docstring); ``config``: ``(field, value)`` pairs of ``OmniConfig``."""
    import time

    import omni_compile

    t0 = time.perf_counter()
    torch._dynamo.reset()
    model, inputs, x0 = build(family)
    enable(model, mode, world)
    state = omni_compile.OmniState(_config(config))
    state.name_modules(model)
    compiled = torch.compile(model, backend="flashomni", options={"state": state})
    res = {"loops": {}, "bits": {}, "collectives": {}, "memory": {}, "reports": {}, "seconds": {}}
    res["seconds"]["build"] = time.perf_counter() - t0
    for i, name in enumerate(policies):
        t0 = time.perf_counter()
        rec = None
        if name != "dense":
            rec = Recorder(name)
            state.configure(policy=rec)
        else:
            state.configure(policy="dense")
        counts: list = []
        if i == 0:
            outs = loop(compiled, inputs, x0, counts)
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                outs = loop(compiled, inputs, x0, counts)
        res["loops"][name] = outs
        res["collectives"][name] = counts
        res["memory"][name] = state.memory_bytes()
        res["reports"][name] = state.report()
        if rec is not None:
            res["bits"][name] = rec.bits
        res["seconds"][name] = time.perf_counter() - t0
        res.setdefault("skipped_blocks", {})[name] = sum(b.skipped_calls for b in state.blocks)
    res["actions"] = [next((r.action for r in state.history if r.step == s), None) for s in range(STEPS)]
    res["sites"] = [dict(name=s.name, kind=s.kind, rewritten=s.rewritten, gemm_q=s.gemm_q, gemm_o=s.gemm_o,
                         segments=s.segments, kv_segments=s.kv_segments, cp=s.cp, heads=s.heads, seq_q=s.seq_q,
                         seq_kv=s.seq_kv, reason=s.reason, runtime_reason=s.runtime_reason,
                         sparse_calls={k: sum(ss.sparse_calls[k] for ss in s.streams.values())
                                       for k in ("attention", "linear_q", "linear_o")})
                    for s in state.sites]
    res["compiles"] = len(state.compiles)
    return res


# ---- processes ---------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, tmp: str, cases: list):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    # diffusers 0.42.1 places each rank on device `rank % torch.accelerator.device_count()`, which is 0 on a
    # CPU build of torch (ZeroDivisionError): one "device" it is
    torch.accelerator.device_count = lambda: 1
    out = {}
    try:
        for case in cases:
            try:
                out[case] = run_case(rank, world, *case)
            except Exception:
                out[case] = {"error": traceback.format_exc()}
                raise
    finally:
        torch.save(out, f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()


def run_ranks(cases: list, world: int = 2) -> list:
    """Run every case on ``world`` ranks; returns ``{case: result}`` per rank (rank order)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_worker, args=(world, tmp, cases), nprocs=world, join=True)
        finally:
            got = []
            for r in range(world):
                p = f"{tmp}/rank{r}.pt"
                got.append(torch.load(p, weights_only=False) if os.path.exists(p) else {})
    return got
