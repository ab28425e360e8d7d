"""Where a model call stands in the denoising loop, and what each step does: the one place the runtime
decides *update* vs *dispatch*.

**The clock.** The passes give every graph that takes the timestep as an input one
``flashomni::step_clock(timestep, state)`` op; it runs once per model call, before the graph's site ops
(they take its output as an argument, so the order is a data dependency), and calls
:meth:`StepClock.tick` with the timestep's first value. The clock turns the sequence of timesteps it
sees into positions ``(generation, step, stream)``:

* the same timestep as the previous call -> the next *stream* of the same step (a pipeline that calls
  the transformer twice per step, cond then uncond, gets streams 0 and 1), up to ``MAX_STREAMS`` calls;
* a timestep that moves on in the generation's direction -> the next *step*, stream 0. The direction is
  learned from the generation's first two distinct timesteps: most pipelines feed falling timesteps,
  several rising ones (Lumina2's ``1 - t/1000``, Z-Image's ``(1000 - t)/1000``, Mochi, OmniGen);
* a new *generation* (step 0, stream 0, every cache dropped) at the first call, at :meth:`reset`, and when
  the call cannot continue the current one: the timestep turned back (up in a falling loop, down in a
  rising one), one call more than ``MAX_STREAMS`` at one timestep, or a step whose timestep change is more
  than ``GAP_FACTOR`` times larger or smaller than the previous step's (a new image starting past the last
  timestep, e.g. an image-to-image run after an interrupted one).

A new image that starts past the last timestep *on* the schedule (its first change within ``GAP_FACTOR``
of the last step's) looks exactly like the next step of the old one: the timesteps cannot tell them apart,
and :meth:`OmniState.reset` is the way to start it.
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

import logging
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


def config_action(config, step: int) -> str:
    """:func:`step_action` of ``step`` under ``config``'s schedule (``warmup``, ``interval``, and the final
    dense steps when ``steps`` is set): the one place the runtime, the CUDA-graph runner and the report ask."""
    return step_action(step, config.warmup, config.interval, config.steps, config.final_dense)


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
        act = config_action(config, pos.step)
        if act == DISPATCH and not ready(st):
            act = UPDATE
        st.action = act
        st.counts[act] += 1
    return st


#: Calls at one timestep that the timestep clock takes as streams of one step: two-call CFG is 2, at a
#: second-order sampler's repeated timestep 4, and 8 when the model's forward is two compiled graphs that
#: each take the timestep (each ticks). One more call at that timestep starts a new generation: it is a new
#: image at the same timestep (a one-step model run again, a benchmark calling one step over and over), and
#: without the bound every such call would add a stream whose caches stay until the next generation.
#: ``OmniConfig.streams`` raises it for pipelines with more calls per step.
MAX_STREAMS = 8

#: The factor by which the timestep change of a step may differ from the previous step's (either way)
#: before the clock takes the call for the first step of a new image. The samplers' schedules stay well
#: inside it: over diffusers' schedulers (flow matching with shifts 1–17, DDIM/DDPM/Euler/DPM-Solver/UniPC/
#: KDPM2/Heun with every spacing, Karras and exponential sigmas; 3–100 steps) and hand-made schedules
#: (LTX's distilled one, Align Your Steps) the largest ratio between two successive changes is 13.4 (flow
#: matching with shift 17 in 3 steps: every step still dense at the default warm-up); most stay within 2.
GAP_FACTOR = 16.0

log = logging.getLogger("omni_compile")


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
        self.direction = 0
        """-1 when the timesteps of this generation fall, +1 when they rise, 0 before its second distinct
        timestep (learned anew in every generation)."""
        self._gap: Optional[float] = None
        """How much the timestep changed at this generation's last step (None before its second step)."""
        self.reason: Optional[str] = None
        """Why the current generation began (``"first call"``, ``"timestep turned back"``, ...)."""
        self.position: Optional[Position] = None
        self._calls = 0
        """Calls of the current generation (counted clock)."""
        self._checked: Optional[tuple] = None
        """``(position, timestep)`` of the last call whose timestep was checked (counted clock)."""
        self._checked_direction = 0
        """Direction of the checked timesteps in the current counted generation (0: not known yet)."""
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
        timestep must stay equal between the streams of a step and move from one step to the next in one
        direction, falling or rising (learned from the generation's first two steps); a new generation
        must not go on in the direction of the one before it (that would be the same loop running longer
        than ``steps``). Raises ``RuntimeError`` naming the mismatch."""
        t = float(timestep)
        prev = self._checked
        self._checked = (pos, t)
        direction = self._checked_direction
        if prev is None or pos.generation != prev[0].generation:
            self._checked_direction = 0  # learned anew in every generation
        if prev is None:
            return
        (p, u) = prev
        where = f"generation {pos.generation}, step {pos.step}, stream {pos.stream} (timestep {t:g}, before it {u:g})"
        if pos.generation != p.generation:
            if direction and (t - u) * direction > 0:
                raise RuntimeError(
                    f"flashomni counted clock: the timestep kept {_moving(direction)} across the generation boundary "
                    f"at {where}: the loop has more steps than OmniConfig.steps (or more calls per step than "
                    "OmniConfig.streams); set them to the loop's, or leave steps=None to place calls by their timesteps")
        elif pos.step == p.step:
            if t != u:
                raise RuntimeError(
                    f"flashomni counted clock: two calls of one step saw different timesteps at {where}: the loop "
                    "makes fewer calls per step than OmniConfig.streams; set streams to the loop's")
        else:
            moved = (t > u) - (t < u)
            if moved == 0 or (direction and moved != direction):
                what = ("stayed the same" if moved == 0 else
                        f"turned back in a {_moving(direction)} loop")
                raise RuntimeError(
                    f"flashomni counted clock: the timestep {what} from one step to the next at {where}: the loop has "
                    "fewer steps than OmniConfig.steps, makes more calls per step than OmniConfig.streams, or a new "
                    "generation started without OmniState.reset()")
            self._checked_direction = moved

    def tick(self, timestep: float, max_streams: int = MAX_STREAMS) -> Position:
        """The position of a call at ``timestep`` (timestep clock; the rules are the module docstring's).
        ``max_streams``: calls at one timestep taken as streams of one step (at least ``MAX_STREAMS``)."""
        t = float(timestep)
        self.ticks += 1
        reason = self._new_generation_reason(t, max(max_streams, MAX_STREAMS))
        if reason is not None:
            if self._last is not None:
                log.info("flashomni clock: new generation at timestep %g (%s)", t, reason)
            self.generation += 1
            self.step, self.stream = 0, 0
            self.direction, self._gap, self.reason = 0, None, reason
        elif t == self._last:
            self.stream += 1
        else:
            self.direction = 1 if t > self._last else -1
            self._gap = abs(t - self._last)
            self.step += 1
            self.stream = 0
        self._last = t
        self.position = Position(self.generation, self.step, self.stream, t)
        return self.position

    def _new_generation_reason(self, t: float, max_streams: int) -> Optional[str]:
        """Why a call at ``t`` begins a new generation, or None when it continues the current one."""
        last = self._last
        if last is None:
            return "first call"
        if t == last:
            if self.stream + 1 < max_streams:
                return None
            return f"{max_streams + 1} calls at one timestep: more than the streams of a step"
        if t != t or last != last:
            return "timestep is NaN"
        moved = 1 if t > last else -1
        if self.direction and moved != self.direction:
            return "timestep turned back: " + ("it rose in a falling loop" if moved > 0 else "it fell in a rising loop")
        gap = abs(t - last)
        if self._gap is not None and not self._gap / GAP_FACTOR <= gap <= self._gap * GAP_FACTOR:
            return (f"timestep moved by {gap:g} after a step of {self._gap:g}: more than {GAP_FACTOR:g}x off the "
                    "schedule, a new image starting past the last timestep")
        return None


def _moving(direction: int) -> str:
    return "rising" if direction > 0 else "falling"
