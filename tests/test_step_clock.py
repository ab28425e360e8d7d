"""The step clock: how the timesteps of successive model calls become (generation, step, stream) positions,
for falling and rising loops, CFG streams, new images without ``reset()``, and the timestep input found
by its role in the graph. Unit tests on ``schedule.StepClock`` and ``passes.timestep_input``, then loops
over the tiny FLUX (CPU, FX-run graphs)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from omni_compile.passes import timestep_input
from omni_compile.policies import Fixed
from omni_compile.schedule import GAP_FACTOR, MAX_STREAMS, StepClock, step_action

from _runtime_helpers import compile_with, make_state, tiny_flux_case


def _positions(clock, seq, **kw):
    return [(p.generation, p.step, p.stream) for p in (clock.tick(t, **kw) for t in seq)]


def _expected(gens: int, steps: int, streams: int) -> list:
    return [(g, i, k) for g in range(gens) for i in range(steps) for k in range(streams)]


def _calls(schedule, gens: int, streams: int) -> list:
    return [t for _ in range(gens) for t in schedule for _ in range(streams)]


def _distinct(ts) -> list:
    out = []
    for t in ts:
        if not out or t != out[-1]:
            out.append(float(t))
    return out


# ---- direction ------------------------------------------------------------------------------------


@given(steps=st.integers(2, 40), streams=st.integers(1, 3), gens=st.integers(1, 3), shift=st.floats(1.0, 8.0),
       rising=st.booleans(), scale=st.sampled_from([1.0, 1000.0]))
def test_clock_places_falling_and_rising_loops_alike(steps, streams, gens, shift, rising, scale):
    # flow-matching sigmas with a shift, fed as they are (falling) or as 1 - sigma (rising, Lumina2 / Z-Image)
    s = np.linspace(1.0, 1.0 / steps, steps)
    sigmas = shift * s / (1 + (shift - 1) * s)
    schedule = [scale * float(1 - x if rising else x) for x in sigmas]
    c = StepClock()
    assert _positions(c, _calls(schedule, gens, streams)) == _expected(gens, steps, streams)
    assert c.direction == (1 if rising else -1)


def _real_schedules():
    """Model inputs of diffusers' schedulers (distinct timesteps in call order) and hand-made schedules."""
    import diffusers as D

    out = {}
    for n in (4, 8, 20, 28, 50):
        for shift in (1.0, 3.0, 7.0):
            s = D.FlowMatchEulerDiscreteScheduler(shift=shift)
            s.set_timesteps(n)
            out[f"flow-shift{shift:g}-{n}"] = s.timesteps
        for cls in (D.DDIMScheduler, D.EulerDiscreteScheduler, D.DPMSolverMultistepScheduler, D.UniPCMultistepScheduler,
                    D.KDPM2DiscreteScheduler, D.HeunDiscreteScheduler, D.PNDMScheduler):
            for spacing in ("leading", "trailing", "linspace"):
                s = cls(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
                s.set_timesteps(n)
                out[f"{cls.__name__}-{spacing}-{n}"] = s.timesteps
        for cls in (D.DPMSolverMultistepScheduler, D.EulerDiscreteScheduler):
            for sigmas in ("use_karras_sigmas", "use_exponential_sigmas"):
                s = cls(**{sigmas: True})
                s.set_timesteps(n)
                out[f"{cls.__name__}-{sigmas}-{n}"] = s.timesteps
    out["ltx-distilled"] = [1.0, 0.9937, 0.9875, 0.9812, 0.9750, 0.9094, 0.7250, 0.4219]
    out["align-your-steps-sdxl"] = [999, 845, 730, 587, 443, 310, 193, 116, 53, 13]
    return {k: _distinct(torch.as_tensor(v, dtype=torch.float64).tolist()) for k, v in out.items()}


def test_real_schedules_place_every_step_in_one_generation():
    """No sampler's schedule is split: falling as the schedulers give it and mirrored (rising), one and two
    calls per step, two generations back to back. (Timesteps that a scheduler repeats, as Heun's and
    PNDM's do, are calls of one step for the clock; the test feeds the distinct ones.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schedules = _real_schedules()
    assert len(schedules) > 100
    for name, ts in schedules.items():
        for rising in (False, True):
            seq = [1000.0 - t for t in ts] if rising else ts
            for streams in (1, 2):
                c = StepClock()
                got = _positions(c, _calls(seq, 2, streams))
                assert got == _expected(2, len(seq), streams), (name, rising, streams)


def test_counted_clock_accepts_rising_loops_and_raises_when_they_do_not_match():
    steps, streams = 5, 2
    rising = [i / steps for i in range(steps)]
    c = StepClock()
    for t in _calls(rising, 3, streams):
        c.check(c.tick_counted(steps, streams), t)
    # a rising loop that turns back mid-generation, and one longer than steps
    for seq, match in (([0.0, 0.5, 0.2], "turned back in a rising loop"),
                       ([0.0, 0.2, 0.4, 0.6, 0.8, 0.9], "kept rising across the generation boundary")):
        c = StepClock()
        with pytest.raises(RuntimeError, match=match):
            for t in seq:
                c.check(c.tick_counted(steps, 1), t)


# ---- streams --------------------------------------------------------------------------------------


def test_calls_at_one_timestep_beyond_the_stream_bound_start_a_new_generation():
    c = StepClock()
    pos = _positions(c, [0.5] * 60)
    assert max(p[2] for p in pos) == MAX_STREAMS - 1
    assert pos == [(i // MAX_STREAMS, 0, i % MAX_STREAMS) for i in range(60)]
    # at a later step too: the step's calls fill MAX_STREAMS streams, the next is a new image
    c = StepClock()
    pos = _positions(c, [1.0, 0.9] + [0.8] * (MAX_STREAMS + 1))
    assert pos[-2] == (0, 2, MAX_STREAMS - 1) and pos[-1] == (1, 0, 0)
    # a pipeline with more calls per step raises the bound (OmniConfig.streams)
    c = StepClock()
    n = MAX_STREAMS + 3
    assert _positions(c, [1.0] * n + [0.9] * n, max_streams=n) == _expected(1, 2, n)


# ---- new images without reset() -------------------------------------------------------------------


def _flow_schedule(n: int) -> list:
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(n)
    return (s.timesteps / 1000).tolist()


@pytest.mark.parametrize("rising", [False, True])
def test_a_new_image_starting_far_past_the_last_timestep_starts_a_new_generation(rising):
    """An image interrupted after 3 of 28 steps, then an image-to-image run that starts half way down the
    schedule (past the interrupted one's last timestep, so the timestep does not turn back): its first
    timestep change is far off the schedule's, so it is a new generation."""
    ts = _flow_schedule(28)
    first, second = ts[:3], ts[14:20]
    if rising:
        first, second = [1 - t for t in first], [1 - t for t in second]
    assert abs(second[0] - first[-1]) > GAP_FACTOR * abs(first[-1] - first[-2])
    c = StepClock()
    pos = _positions(c, _calls(first, 1, 2) + _calls(second, 1, 2))
    assert pos == _expected(1, 3, 2) + [(1, i, k) for i in range(6) for k in range(2)]
    assert c.reason.startswith("timestep moved by")


def test_a_new_image_starting_on_the_schedule_past_the_last_timestep_is_the_next_step():
    """The documented limit: an image that starts where the interrupted one's schedule would have gone next
    is indistinguishable from its next step by the timesteps; ``reset()`` starts it."""
    ts = _flow_schedule(28)
    c = StepClock()
    pos = _positions(c, ts[:3] + ts[3:6])
    assert pos == _expected(1, 6, 1)
    c.reset()
    assert _positions(c, ts[3:6]) == _expected(1, 3, 1)


def test_a_nan_timestep_starts_a_new_generation():
    c = StepClock()
    pos = _positions(c, [1.0, 0.9, float("nan"), 0.8, 0.7])
    assert pos == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (2, 0, 0), (2, 1, 0)]


# ---- the timestep input, by role --------------------------------------------------------------------


class _Embedder(nn.Module):
    """Tiny model with diffusers' sinusoidal embedding on a timestep of any name, and a guidance scale
    embedded the same way."""

    def __init__(self):
        super().__init__()
        from diffusers.models.embeddings import Timesteps

        self.proj = Timesteps(8, True, 0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x, guidance, noise_cond, offset):
        emb = self.proj(noise_cond * 1000) + self.proj(guidance)
        return x + self.lin(emb)[:, None] + offset[:, None, None]


class _Freqs(nn.Module):
    """A Z-Image-style embedding written out: ``exp(-log(P) * arange / half)``, then cos and sin."""

    def forward(self, x, pos, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(0, 4, dtype=torch.float32) / 4)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        rope = torch.outer(pos, 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
        return x + emb[:, None] + rope.sum()


def _graph(model, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    torch._dynamo.reset()
    (gm,) = graphs
    return gm


def _arg(node) -> str:
    return node.name.replace("l_", "", 1).strip("_")


def test_timestep_input_is_the_input_of_the_sinusoidal_embedding():
    x = torch.randn(2, 3, 4)
    # a name no rule knows: found by its role; guidance feeds the same embedding but is not the timestep
    gm = _graph(_Embedder(), x, torch.tensor([3.5, 3.5]), torch.tensor([0.5, 0.5]), torch.ones(2))
    assert _arg(timestep_input(gm)) == "noise_cond"
    # Z-Image's `t` with its own embedding, next to a 1-D rotary position input (pow of an arange, not exp)
    gm = _graph(_Freqs(), torch.randn(2, 3, 8), torch.arange(3.0), torch.tensor([0.5, 0.5]))
    assert _arg(timestep_input(gm)) == "t"


def test_timestep_input_falls_back_to_the_name():
    class Plain(nn.Module):
        def forward(self, x, sigma):
            return x * sigma[:, None]

    gm = _graph(Plain(), torch.randn(2, 3), torch.tensor([0.5, 0.5]))
    assert _arg(timestep_input(gm)) == "sigma"


# ---- loops over the tiny FLUX -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_case(single_layers=1)


def _run(model, make_inputs, x, timesteps, calls_per_step=1):
    """A loop at the given timesteps (``calls_per_step`` calls a step, prompts 0, 1, ...); a fixed
    update rule, since the timesteps need not come from one scheduler."""
    with torch.no_grad():
        for t in timesteps:
            for c in range(calls_per_step):
                v = model(**make_inputs(x, torch.tensor([float(t)]), (c,)))[0]
            x = x - 0.1 * v
    return x


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_rising_timestep_loop_runs_update_and_dispatch_steps_as_a_counted_one(flux):
    model, make_inputs, lat = flux
    rising = [1 - t for t in _flow_schedule(7)]
    kw = dict(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=3)
    st = make_state(**kw)
    by_time = _run(compile_with(model, st), make_inputs, lat, rising, calls_per_step=2)
    assert st.clock.generation == 0
    assert [s["action"] for s in st.report().steps if s["stream"] == 0] == [step_action(i, 2, 3) for i in range(7)]
    torch._dynamo.reset()
    counted = make_state(steps=7, streams=2, **kw)
    assert torch.equal(_run(compile_with(model, counted), make_inputs, lat, rising, calls_per_step=2), by_time)


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_new_image_past_an_interrupted_one_equals_a_fresh_run(flux):
    """Without reset(): an image interrupted after 4 steps, then one that starts far down the schedule.
    The second must not dispatch on the first's caches: bit-equal to running it after reset()."""
    model, make_inputs, lat = flux
    ts = _flow_schedule(28)
    st = make_state(policy=Fixed(reuse=0.5, skip=0.5), warmup=2, interval=3)
    compiled = compile_with(model, st)
    _run(compiled, make_inputs, lat, ts[:4])
    second = _run(compiled, make_inputs, lat.flip(1), ts[16:22])
    assert st.clock.generation == 1
    st.reset()
    fresh = _run(compiled, make_inputs, lat.flip(1), ts[16:22])
    assert torch.equal(second, fresh)


@pytest.mark.usefixtures("fresh_dynamo")
def test_calls_at_one_timestep_keep_a_bounded_number_of_streams(flux):
    model, make_inputs, lat = flux
    st = make_state(policy=Fixed(reuse=0.5, skip=0.5), warmup=1, interval=2)
    compiled = compile_with(model, st)
    most = 0
    with torch.no_grad():
        for _ in range(2 * MAX_STREAMS + 1):
            compiled(**make_inputs(lat, torch.tensor([0.5])))
            most = max(most, max(len(s.streams) for s in st.sites if s.rewritten))
    assert st.clock.generation == 2
    assert most == MAX_STREAMS
    # OmniConfig.streams raises the bound for pipelines with more calls per step
    st.configure(streams=MAX_STREAMS + 2)
    with torch.no_grad():
        for _ in range(MAX_STREAMS + 3):
            compiled(**make_inputs(lat, torch.tensor([0.5])))
    assert st.clock.generation == 1 and st.clock.stream == 0
    assert max(len(s.streams) for s in st.sites if s.rewritten) == 1
