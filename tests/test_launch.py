"""The launch cache's key (ops/_launch.py) on the CPU: it must tell apart every argument property Triton
specializes a kernel on, so a cache hit can only return a kernel Triton itself would have picked. (The
launch itself runs on the GPU: tests/test_ops_gpu.py compares it with Triton's bit for bit.)"""

import torch

from omni_compile.ops import _launch


def test_key_separates_what_triton_specializes_on():
    spec = _launch._spec
    # ints: == 1 (a constant), divisibility by 16, 32-bit range
    assert len({spec(1), spec(2), spec(16), spec(2**31)}) == 4
    assert spec(3) == spec(5) and spec(32) == spec(48)
    # tensors: dtype and 16-byte alignment of the data pointer
    base = torch.zeros(64, dtype=torch.float16)
    assert spec(base) == spec(base[8:])  # 16 bytes in: still aligned
    assert spec(base) != spec(base[1:])  # 2 bytes in
    assert spec(base) != spec(base.float())
    # floats are not specialized by value, bools and other objects are kept by value
    assert spec(0.5) == spec(2.0)
    assert spec(True) != spec(False) and spec(True) != spec(1)


def test_interpreter_and_disabled_runs_take_tritons_path(monkeypatch):
    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    cached_before = dict(_launch._CACHE)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with _launch.launch_cache(True):
        _launch.launch(FakeKernel(), (3,), 1, 2, BLOCK=4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with _launch.launch_cache(False):
        _launch.launch(FakeKernel(), (3,), 1, 2, BLOCK=4)
    assert calls == [((3,), (1, 2), {"BLOCK": 4})] * 2
    assert _launch._CACHE == cached_before  # nothing was cached on either path


def test_planned_launch_takes_the_full_key_first_then_the_plan(monkeypatch):
    """``launch_planned``: a plan's first launch is keyed and compiled as ``launch`` would; later launches of
    that plan run the cached launcher directly; a new plan whose arguments specialize alike finds the
    compiled kernel under the full key, and one whose arguments specialize otherwise compiles its own."""
    compiles, runs = [], []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, gx, gy, gz, stream, function, packed, *rest):
            runs.append((gx, rest[3:]))

    class FakeKernel:
        arg_names = ["X", "n", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *a, **k: compiles.append((grid, a, k)) or Compiled()

    class Active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 7)

    monkeypatch.setattr(_launch, "_driver", type("Driver", (), {"active": Active})())
    monkeypatch.setattr(_launch, "_CACHE", {})
    monkeypatch.setattr(_launch, "_hooked", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernel, x = FakeKernel(), torch.zeros(8)
    with _launch.launch_cache(True):
        _launch.launch_planned("a", kernel, (2,), (x, 5), {"BLOCK": 4})
        _launch.launch_planned("a", kernel, (3,), (x, 5), {"BLOCK": 4})
        _launch.launch_planned("b", kernel, (4,), (x, 7), {"BLOCK": 4})  # 5 and 7 specialize alike
        _launch.launch_planned("c", kernel, (5,), (x, 16), {"BLOCK": 4})  # 16: divisible by 16
    assert [c[0] for c in compiles] == [(2,), (5,)]
    assert runs == [(3, (x, 5, 4)), (4, (x, 7, 4))]
    assert {k[0] for k in _launch._CACHE if k[0] == "plan"} and len(_launch._CACHE) == 5
