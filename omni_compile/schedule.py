"""Where a model call stands in the denoising loop, and what each step does: the one place the runtime
decides *update* vs *dispatch*.

**The clock.** The passes give every graph that takes the timestep as an input one
``flashomni::step_clock(timestep, state)`` op; it runs once per model call, before the graph's site ops
(they take its output as an argument, so the order is a data dependency), and calls
:meth:`StepClock.tick` with the timestep's first value. The clock turns the sequence of timesteps it
sees into positions ``(generation, step, stream)``:

* the same timestep as the previous call -> the next *stream* of the same step (a pipeline that calls
  the transformer twice per step, cond then uncond, gets streams 0 and 1);
* a smaller timestep -> the next *step*, stream 0;
* a larger timestep (the schedule jumped back up), the first call, or :meth:`reset` -> a new
  *generation*: step 0, stream 0, every cache dropped.

A pipeline that batches CFG into one call has one stream whose batch items carry their own symbols.
Reading the timestep's value is one host sync per model call (``Tensor.item``); see docs/runtime.md.

**The schedule.** :func:`step_action` maps a step index to ``"dense"`` (warm-up), ``"update"`` or
``"dispatch"`` from ``warmup`` and ``interval`` alone, so it can move to the device unchanged (an integer
step tensor compared with two constants).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DENSE, UPDATE, DISPATCH = "dense", "update", "dispatch"


@dataclass(frozen=True)
class Position:
    generation: int
    step: int
    stream: int
    timestep: float


def step_action(step: int, warmup: int, interval: int) -> str:
    """``"dense"`` for ``step < warmup - 1``; ``"update"`` at ``warmup - 1 + k * interval``; else
    ``"dispatch"``. (Paper, W=8, N=5: dense 0–6, updates 7, 12, 17, …, dispatch in between.)"""
    first = warmup - 1
    if step < first:
        return DENSE
    return UPDATE if (step - first) % interval == 0 else DISPATCH


def place_stream(streams: dict, key, make, pos: Position, config, ready) -> object:
    """The run-time state ``streams[key]`` (made with ``make(key)`` if new) placed at ``pos``: cleared when a
    new generation began, and on the first call of a step given that step's action — ``"dispatch"`` turned
    into ``"update"`` when ``ready(state)`` is false (the stream appeared mid-loop and has nothing to
    dispatch with). Shared by attention sites (``runtime.stream_for``) and blocks (``block_cache``); the
    state needs ``generation``, ``step``, ``action``, ``counts`` and ``clear()``."""
    st = streams.get(key)
    if st is None:
        st = streams[key] = make(key)
    if st.generation != pos.generation:
        st.clear()
        st.generation, st.step = pos.generation, -1
    if st.step != pos.step:
        st.step = pos.step
        act = step_action(pos.step, config.warmup, config.interval)
        if act == DISPATCH and not ready(st):
            act = UPDATE
        st.action = act
        st.counts[act] += 1
    return st


class StepClock:
    """Positions from the timesteps of successive model calls (see the module docstring)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.generation = -1
        self.step = -1
        self.stream = -1
        self.ticks = 0
        self._last: Optional[float] = None
        self.position: Optional[Position] = None

    def tick(self, timestep: float) -> Position:
        t = float(timestep)
        self.ticks += 1
        if self._last is None or t > self._last:
            self.generation += 1
            self.step, self.stream = 0, 0
        elif t == self._last:
            self.stream += 1
        else:
            self.step += 1
            self.stream = 0
        self._last = t
        self.position = Position(self.generation, self.step, self.stream, t)
        return self.position
