"""The end-to-end benchmark's driver (``omni_compile.bench.e2e``) on the CPU: narrow versions of the
benchmarked model classes, every kind of setting (plain, policy strategy, block caching on a second
compile), results written after each row. Guards the GPU runs, where a driver error costs device time."""

from __future__ import annotations

import json

import pytest

from omni_compile.bench import e2e as bench_e2e


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.mark.parametrize("model", ["flux", "hunyuan"])
def test_cpu_smoke_runs_every_kind_of_setting(model, tmp_path):
    from omni_compile.ops import _launch

    launch_cache = _launch._ENABLED
    # the '+cg' settings get their own compiles (CUDA graphs, which a CPU run goes without: warned)
    configs = ["dense", "aggressive", "aggressive@triton", "s:topk", "blocks_aggressive", "aggressive+cg",
               "blocks_aggressive+cg"]
    rc = bench_e2e.main(["--cpu-smoke", "--model", model, "--steps", "6", "--warmup", "2", "--interval", "2",
                         "--no-inductor-baseline", "--profile", "aggressive", "--configs", ",".join(configs),
                         "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / f"e2e_{model}.json").read_text())
    assert not res.get("failed") and res["partial"] is False
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == configs
    assert rows["dense"]["density"] == 1.0 and rows["dense"]["memory_mb"] == 0.0
    assert rows["aggressive"]["density"] < 1.0 and rows["aggressive"]["reuse"] > 0
    # the same setting with Triton's own launch path: the same work, recorded as such, the switch restored
    assert rows["aggressive@triton"]["launch_cache"] is False and rows["aggressive"]["launch_cache"] is True
    assert rows["aggressive@triton"]["density"] == rows["aggressive"]["density"]
    assert rows["aggressive+cg"]["density"] == rows["aggressive"]["density"]
    assert rows["blocks_aggressive+cg"]["blocks_cached"] == rows["blocks_aggressive"]["blocks_cached"]
    assert _launch._ENABLED == launch_cache
    assert set(rows["aggressive"]["profile"]) == {"update", "dispatch"}
    assert all(p["host_syncs"] >= 0 for p in rows["aggressive"]["profile"].values())
    assert 0 < rows["blocks_aggressive"]["blocks_cached"] < rows["blocks_aggressive"]["blocks"]
    # the ideal of a block row needs each block's profiled (device) time: every block found in the profile
    assert len(res["block_ms"]) == rows["blocks_aggressive"]["blocks"]
    assert not any(k.startswith("block ") for k in res["profile_split_dense"])
    assert all(len(r["times_ms"]) == 6 for r in rows.values())
    # the loop again without a sync per step, on the counted clock: the same latent bit for bit
    assert res["clock"] == "counted"
    assert all(r["pipelined_s"] > 0 and r["pipelined_err"] == 0.0 for r in rows.values())
    assert (tmp_path / f"e2e_{model}.md").read_text().count("\n| ") == len(configs) + 1


@pytest.mark.slow
def test_cpu_smoke_under_torchrun_with_context_parallelism(tmp_path):
    """The N-GPU command on 2 CPU processes: torchrun, diffusers' Ulysses over both, every setting on one
    compile; rank 0 writes the results with both ranks' cache memory."""
    import subprocess
    import sys

    configs = ["dense", "aggressive", "flashomni", "blocks_aggressive"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "omni_compile.bench.e2e", "--cp", "ulysses", "--cpu-smoke", "--model", "flux", "--steps", "6",
           "--warmup", "2", "--interval", "2", "--no-inductor-baseline", "--profile", "aggressive",
           "--configs", ",".join(configs), "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads((tmp_path / "e2e_flux.json").read_text())
    assert (res["cp"], res["world"], res["partial"], res.get("failed")) == ("ulysses", 2, False, None)
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == configs
    assert rows["aggressive"]["density"] < 1.0 and rows["blocks_aggressive"]["blocks_cached"] > 0
    # each rank holds the caches of its own rows: the same amount on both ranks here
    mem = rows["aggressive"]["memory_mb_per_rank"]
    assert len(mem) == 2 and mem[0] == mem[1] > 0
    assert "context parallel: ulysses over 2 processes" in (tmp_path / "e2e_flux.md").read_text()


def test_scaling_table_sets_each_run_against_inductor_at_its_own_and_at_one_process(tmp_path):
    def run(world, inductor, dense):
        return dict(model="flux", steps=50, device="H100", cp="ulysses" if world > 1 else "none", world=world,
                    rows=[dict(name="inductor", total_s=inductor), dict(name="dense", total_s=dense)])

    paths = []
    for world, ind, den in ((4, 10.0, 5.0), (1, 40.0, 20.0)):
        path = tmp_path / f"e2e_{world}.json"
        path.write_text(json.dumps(run(world, ind, den)))
        paths.append(str(path))
    assert bench_e2e.main(["--scaling", *paths, "--out", str(tmp_path)]) == 0
    md = (tmp_path / "scaling_flux.md").read_text()
    assert "| setting | 1× none | 4× ulysses |" in md
    assert "| dense | 20.00 (2.00x; 2.00x) | 5.00 (2.00x; 8.00x) |" in md


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def elapsed_us(self):
        return self.end - self.start


class _Event:
    def __init__(self, name, start, end, device="cuda", annotation=False):
        from torch.autograd import DeviceType

        self.name, self.time_range, self.is_user_annotation = name, _Range(start, end), annotation
        self.device_type = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
        self.cpu_time_total = end - start


class _Profile:
    def __init__(self, events):
        self._events = events

    def events(self):
        return self._events


def test_block_times_are_the_kernels_inside_each_label():
    """Kernels are attributed to the block whose device range they start in; gaps inside a label and the
    label ranges themselves count for nothing, so block times add up to at most the step's kernel time."""
    p = "flashomni::block "
    prof = _Profile([
        _Event(p + "a", 0, 100, annotation=True), _Event(p + "b", 150, 400, annotation=True),
        _Event("kernel_a1", 10, 30), _Event("kernel_a2", 60, 90),  # 50 us in a, with gaps
        _Event("embed", 110, 140),  # between blocks: no block's
        _Event("nvjet_b", 150, 350), _Event("kernel_after", 400, 420),  # the end is exclusive
        _Event(p + "a", 0, 500, device="cpu"),  # the CPU-side range is not device time
    ])
    ms = bench_e2e.block_ms_by_label(prof)
    assert ms == pytest.approx({"a": 0.050, "b": 0.200})
    classes = bench_e2e.device_ms_by_class(prof)
    assert sum(ms.values()) < sum(classes.values())
