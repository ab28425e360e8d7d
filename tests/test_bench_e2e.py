"""The end-to-end benchmark's driver (``omni_compile.bench_e2e``) on the CPU: narrow versions of the
benchmarked model classes, every kind of setting (plain, policy strategy, block caching on a second
compile), results written after each row. Guards the GPU runs, where a driver error costs device time."""

from __future__ import annotations

import json

import pytest
import torch

from omni_compile import bench_e2e


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.mark.parametrize("model", ["flux", "hunyuan"])
def test_cpu_smoke_runs_every_kind_of_setting(model, tmp_path):
    configs = ["dense", "aggressive", "s:topk", "blocks_aggressive"]
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
    assert set(rows["aggressive"]["profile"]) == {"update", "dispatch"}
    assert all(p["host_syncs"] >= 0 for p in rows["aggressive"]["profile"].values())
    assert 0 < rows["blocks_aggressive"]["blocks_cached"] < rows["blocks_aggressive"]["blocks"]
    # the ideal of a block row needs each block's profiled (device) time: every block found in the profile
    assert len(res["block_ms"]) == rows["blocks_aggressive"]["blocks"]
    assert not any(k.startswith("block ") for k in res["profile_split_dense"])
    assert all(len(r["times_ms"]) == 6 for r in rows.values())
    assert (tmp_path / f"e2e_{model}.md").read_text().count("\n| ") == len(configs) + 1
