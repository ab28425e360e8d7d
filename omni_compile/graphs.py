"""Dispatch steps replayed from CUDA graphs (``OmniConfig(cuda_graphs=True)``, or
``torch.compile(..., backend="flashomni", mode="reduce-overhead")``).

Between two update steps every dispatch step of a stream runs the same kernels on the same tensors: the
symbols, caches and cached-block decisions change only at updates, and the one number that changes from
step to step — the Taylor forecast's ``x`` (steps since the update) — is read by the kernels from a small
device tensor (:meth:`omni_compile.state.OmniState.step_coefs`) instead of being passed as a kernel argument.
So the runner of a compiled graph:

1. places the call in the loop on the host before it runs (the graph's own clock op then skips it); with
   ``OmniConfig(steps=...)`` this reads nothing from the device;
2. runs dense and update steps as usual (the runtime's Python decides, allocates and refreshes);
3. runs the first dispatch step after an update as usual too (Triton compiles any new kernel
   specialisation there), noting whether every site of the graph dispatched;
4. captures the next dispatch step of that stream into a CUDA graph and replays it for the following
   dispatch steps until the next update, copying new inputs into the captured ones and the step's
   coefficients into the device tensor. What the runtime's Python would have recorded (the step history
   ``state.report()`` reads, the counters) is applied from what the captured call recorded.

A graph whose sites read something on the host on dispatch steps (an attention mask, read per call) or
whose sites do not all follow one schedule (per-site ``interval`` overrides) is not captured: it runs as
usual. Capture needs CUDA; :func:`cuda_capture` is the capturer, and tests on the CPU pass one that runs
the call instead (``GraphRunner(capture=...)``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .schedule import DISPATCH, config_action


def cuda_capture(fn: Callable, args: list):
    """Capture ``fn(*args)`` into a CUDA graph: ``(replay, static output)``. The call's Python runs once here
    (its kernels are recorded, not run); ``replay()`` runs them."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph.replay, out


def last_update(step: int, warmup: int, interval: int) -> int:
    """The update step at or before dispatch step ``step`` of the schedule (``step_action``)."""
    first = warmup - 1
    return first + ((step - first) // interval) * interval


class _Journal:
    """What the runtime's Python records during one call: counters that grow and step fields that are set,
    on sites, their streams and blocks, and the history records it appends. Taken around a captured call, it
    is applied again for every replay (whose Python does not run)."""

    COUNTERS = ("calls", "linear_q_calls", "linear_o_calls", "fallbacks", "region_calls", "skipped_calls", "skipped")

    def __init__(self, state):
        self.state = state

    def _fields(self):
        st = self.state
        for s in st.sites:
            yield s, None
            for ss in s.streams.values():
                yield ss, None
        for b in st.blocks:
            yield b, None
            for bs in b.streams.values():
                yield bs, None

    def snapshot(self) -> dict:
        snap = {}
        for obj, _ in self._fields():
            for f in self.COUNTERS:
                if isinstance(getattr(obj, "__dict__", {}).get(f), int):
                    snap[(id(obj), f)] = (obj, f, obj.__dict__[f])
            for d in ("counts", "sparse_calls"):
                dd = getattr(obj, "__dict__", {}).get(d)
                if isinstance(dd, dict):
                    for k, v in dd.items():
                        snap[(id(obj), d, k)] = (obj, (d, k), v)
        return {"counters": snap, "history": len(self.state.history)}

    def diff(self, before: dict) -> dict:
        after = self.snapshot()
        grown, stepped = [], []
        for key, (obj, f, v) in after["counters"].items():
            old = before["counters"].get(key, (obj, f, 0))[2]
            if v != old:
                grown.append((obj, f, v - old))
        touched = {id(o) for o, _, _ in grown}
        for obj, _ in self._fields():
            if "step" in getattr(obj, "__dict__", {}) and id(obj) in touched:
                stepped.append(obj)
        records = self.state.history[before["history"]:]
        return {"grown": grown, "stepped": stepped, "records": list(records)}

    def restore(self, before: dict) -> None:
        for obj, f, v in before["counters"].values():
            if isinstance(f, tuple):
                getattr(obj, f[0])[f[1]] = v
            else:
                setattr(obj, f, v)
        del self.state.history[before["history"]:]

    def apply(self, delta: dict, pos) -> None:
        from .state import StepRecord

        for obj, f, d in delta["grown"]:
            if isinstance(f, tuple):
                getattr(obj, f[0])[f[1]] += d
            else:
                setattr(obj, f, getattr(obj, f) + d)
        for obj in delta["stepped"]:
            obj.step = pos.step
        self.state.history.extend(StepRecord(pos.generation, pos.step, pos.stream, r.site_id, r.action, r.symbols,
                                             r.work) for r in delta["records"])


class GraphRunner:
    """Runs one compiled graph, replaying its dispatch steps from CUDA graphs (module docstring)."""

    def __init__(self, state, fn: Callable, timestep_index: Optional[int], graph: int,
                 capture: Optional[Callable] = None):
        self.state, self.fn, self.timestep_index, self.graph = state, fn, timestep_index, graph
        self.capture = capture
        self.warm: dict = {}
        """key -> the data pointers of the first dispatch step's inputs, for keys whose first dispatch step ran
        as usual with every site dispatching (capture may follow)."""
        self.graphs: dict = {}
        """key -> (replay, static args, static output, journal delta)."""
        self.replays = 0
        self.captures = 0

    def __call__(self, *args):
        st = self.state
        if self.timestep_index is not None:
            st.place_call(args[self.timestep_index])
            st._hook_tick = True  # the graph's own clock op skips this call
        pos = st.clock.position
        cfg = st.config
        key = self._key(pos, args)
        if key is None:
            return self.fn(*args)
        st.set_step_coefs(pos.step - last_update(pos.step, cfg.warmup, cfg.interval), args)
        hit = self.graphs.get(key)
        if hit is not None:
            return self._replay(hit, args, pos)
        journal = _Journal(st)
        if key not in self.warm:
            before = journal.snapshot()
            with st.graph_mode():
                out = self.fn(*args)
            if self._clean(journal.diff(before)):
                self.warm[key] = _pointers(args)
            return out
        # capture: the call's Python runs once (this step's own bookkeeping), its kernels run at the replay
        # an update or a new generation makes every older capture stale
        self.graphs = {k: v for k, v in self.graphs.items() if (k[0], k[2]) == (key[0], key[2])}
        # inputs whose storage stayed (parameters, buffers) are the graph's own; the others get buffers that
        # each replay copies the new values into
        static = [a.clone() if isinstance(a, torch.Tensor) and p != q else a
                  for a, p, q in zip(args, self.warm[key], _pointers(args))]
        before = journal.snapshot()
        with st.graph_mode():
            replay, static_out = (self.capture or cuda_capture)(self.fn, static)
        delta = journal.diff(before)
        self.captures += 1
        self.graphs[key] = (replay, static, static_out, delta)
        replay()
        return _clone(static_out)

    def _key(self, pos, args):
        """What a capture is valid for, or None when this call cannot be captured."""
        st, cfg = self.state, self.state.config
        if pos is None:
            return None
        if cfg.overrides and any("interval" in f for f in cfg.overrides.values()):
            st.warn_once(("graphs_interval", self.graph), "flashomni: CUDA graphs: per-site intervals "
                         "(OmniConfig.overrides) make the sites' actions differ within a step, so this graph's "
                         "steps run without CUDA graphs")
            return None
        if config_action(cfg, pos.step) != DISPATCH:
            return None
        sites = [s for s in st.sites if s.plan.graph == self.graph]
        if any(s.mask for s in sites):  # the mask is read on the host every call
            st.warn_once(("graphs_mask", self.graph), "flashomni: CUDA graphs: this graph's attention sites "
                         "read an attention mask on the host at every call, so its steps run without CUDA graphs")
            return None
        shapes = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        return (pos.generation, pos.stream, last_update(pos.step, cfg.warmup, cfg.interval), id(cfg), shapes)

    def _clean(self, delta: dict) -> bool:
        """Every attention call of the graph in this call dispatched, none fell back."""
        records = delta["records"]
        if any(r.action != DISPATCH for r in records):
            return False
        fell = any(f == "fallbacks" for _, f, _ in delta["grown"])
        return not fell and not any(getattr(s, "runtime_reason", None) for s in self.state.sites
                                    if s.plan.graph == self.graph and s.rewritten)

    def _replay(self, hit, args, pos):
        replay, static, static_out, delta = hit
        for s, a in zip(static, args):
            if isinstance(s, torch.Tensor) and s.data_ptr() != a.data_ptr():
                s.copy_(a, non_blocking=True)
        replay()
        self.replays += 1
        _Journal(self.state).apply(delta, pos)
        return _clone(static_out)


def _pointers(args) -> tuple:
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args)


def _clone(out):
    """A copy of the captured call's output: its memory belongs to the graph and the next replay overwrites it."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(o) for o in out)
    return out


