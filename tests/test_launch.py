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
