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

**The counted clock** (``OmniConfig.steps`` set) reads nothing: call ``c`` of a generation is step
``c // streams``, stream ``c % streams``, and a generation ends after ``steps * streams`` calls (or at
:meth:`reset`). The host then never waits for the GPU, so it can queue the next steps while the GPU runs
(``tick_counted``). The timesteps are still checked against the assigned positions, as they arrive on the
host without blocking (:meth:`StepClock.check`), and a loop that does not match ``steps``/``streams``
raises a ``RuntimeError`` — at most a few calls late, but never silently.

**The schedule.** :func:`step_action` maps a step index to ``"dense"`` (warm-up, and the final dense
steps), ``"update"`` or ``"dispatch"`` from ``warmup``, ``interval`` and, for the final dense steps, the
loop's length alone, so it can move to the device unchanged (an integer step tensor compared with a few
constants).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

DENSE, UPDATE, DISPATCH = "dense", "update", "dispatch"


@dataclass(frozen=True)
class Position:
    generation: int
    step: int
    stream: int
    timestep: float


def step_action(step: int, warmup: int, interval: int, steps: Optional[int] = None, final_dense: int = 0) -> str:
    """``"dense"`` for ``step < warmup - 1`` and for the last ``final_dense`` of ``steps`` steps;
    ``"update"`` at ``warmup - 1 + k * interval``; else ``"dispatch"``. (Paper, W=8, N=5: dense 0–6, updates
    7, 12, 17, …, dispatch in between; with 50 steps and one final dense step, step 49 dense.) The final
    dense steps need the loop's length: without ``steps`` there are none."""
    first = warmup - 1
    if step < first or (final_dense and steps is not None and step >= steps - final_dense):
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
        act = step_action(pos.step, config.warmup, config.interval, config.steps, config.final_dense)
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
        self._calls = 0
        """Calls of the current generation (counted clock)."""
        self._checked: Optional[tuple] = None
        """``(position, timestep)`` of the last call whose timestep was checked (counted clock)."""
        self.pending: deque = deque()
        """``(position, host copy of the timestep, copy-done event)`` of counted calls whose timestep has
        not reached the host yet (the runtime fills and drains it)."""

    def tick_counted(self, steps: int, streams: int) -> Position:
        """The position of the next call from call counts alone (no timestep read): ``steps`` steps of
        ``streams`` calls per generation. Its ``timestep`` is NaN (unknown when the call is placed)."""
        if self.generation < 0 or self._calls >= steps * streams:
            self.generation += 1
            self._calls = 0
        self.step, self.stream = divmod(self._calls, streams)
        self._calls += 1
        self.ticks += 1
        self.position = Position(self.generation, self.step, self.stream, float("nan"))
        return self.position

    def check(self, pos: Position, timestep: float) -> None:
        """Check a counted position against the call's timestep, in call order: within a generation the
        timestep must stay equal between the streams of a step and fall from one step to the next; a new
        generation must not start below the last timestep of the previous one (that would be the same
        loop running longer than ``steps``). Raises ``RuntimeError`` naming the mismatch."""
        t = float(timestep)
        prev = self._checked
        self._checked = (pos, t)
        if prev is None:
            return
        (p, u) = prev
        where = f"generation {pos.generation}, step {pos.step}, stream {pos.stream} (timestep {t:g}, before it {u:g})"
        if pos.generation != p.generation:
            if t < u:
                raise RuntimeError(
                    f"flashomni counted clock: the timestep kept falling across the generation boundary at {where}: "
                    "the loop has more steps than OmniConfig.steps (or more calls per step than OmniConfig.streams); "
                    "set them to the loop's, or leave steps=None to place calls by their timesteps")
        elif pos.step == p.step and t != u:
            raise RuntimeError(
                f"flashomni counted clock: two calls of one step saw different timesteps at {where}: the loop makes "
                "fewer calls per step than OmniConfig.streams; set streams to the loop's")
        elif pos.step != p.step and not t < u:
            raise RuntimeError(
                f"flashomni counted clock: the timestep did not fall from one step to the next at {where}: the loop "
                "has fewer steps than OmniConfig.steps, makes more calls per step than OmniConfig.streams, or a new "
                "generation started without OmniState.reset()")

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
