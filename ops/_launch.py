"""One Triton launch path for the ops' kernels, with the per-call argument binding cached.

``kernel[grid](*args, **kwargs)`` makes Triton bind and specialize every argument, build a cache key and
look the compiled kernel up on every call: on an H100 with Triton 3.6 a launch of the attention kernel
(36 arguments) cost ~77 µs of host time against ~19 µs for an empty kernel, as much as the kernel runs at
FLUX size (``tools/host_launch.py``, docs/benchmarks.md), and dispatch steps of a FLUX-size model are
host-bound. :func:`launch` keys the compiled kernel by what Triton specializes on — per tensor its dtype
and 16-byte alignment, per int whether it is 1, divisible by 16 and fits 32 bits, per TMA descriptor its
dtype, block shape and the alignment of its base, shape and strides, and every keyword (constexprs, warps,
stages) by value and type — a superset of Triton's own key, so a hit is a kernel Triton itself would have picked;
a hit launches it straight through its launcher. Misses, the interpreter, and runs with Triton launch
hooks installed (profilers) take Triton's own path. ``OMNI_COMPILE_FAST_LAUNCH=0`` turns the cache off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ._common import env_switch, triton_interpreting

_ENABLED = env_switch("OMNI_COMPILE_FAST_LAUNCH")
_CACHE: dict = {}

try:  # the descriptor class of host-side TMA, where this Triton has it
    from triton.tools.tensor_descriptor import TensorDescriptor as _Descriptor
except ImportError:  # pragma: no cover - older Triton
    _Descriptor = None

try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover - older Triton: no cached path
    _knobs = _driver = None
    _ENABLED = False


def enabled() -> bool:
    return _ENABLED and not triton_interpreting()


@contextlib.contextmanager
def launch_cache(on: bool) -> Iterator[None]:
    """Launch through the cache (``True``, where this Triton allows it) or through Triton's own path
    (``False``) inside the block, as ``kernel_backend`` and ``tensor_memory_accelerator`` choose theirs:
    benchmarks and tests compare both."""
    global _ENABLED
    old, _ENABLED = _ENABLED, bool(on) and _driver is not None
    try:
        yield
    finally:
        _ENABLED = old


def _spec(a):
    t = type(a)
    if t is int:
        return (a == 1, a % 16 == 0, -2**31 <= a < 2**31)
    if t is float or a is None:
        return t
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if _Descriptor is not None and isinstance(a, _Descriptor):
        return (a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.block_shape),
                tuple(s % 16 == 0 for s in a.shape), tuple(s % 16 == 0 for s in a.strides),
                getattr(a, "padding", None))
    return (t, a)  # anything else (bool) by value


def _entry(kernel, compiled, n_args: int, kwargs: dict):
    """``(run, function, packed_metadata, names of the keyword parameters in signature order)`` of a kernel
    Triton just compiled and launched, or None when this Triton's objects do not have that shape."""
    try:
        names = list(kernel.arg_names[n_args:])
        if any(n not in kwargs for n in names):
            return None  # a parameter left to its default: Triton binds it
        return compiled.run, compiled.function, compiled.packed_metadata, names
    except AttributeError:
        return None


def _hooked() -> bool:
    """Launch hooks installed (a profiler such as proton): they need Triton's launch metadata. Triton 3.6+
    keeps an empty ``HookChain`` there by default, which is not a hook."""
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; runtime arguments positional, constexprs and launch options by
    keyword (every parameter after the positional ones must be given by keyword)."""
    if not enabled() or _hooked():
        kernel[grid](*args, **kwargs)
        return
    device = _driver.active.get_current_device()
    _launch_keyed(_key(kernel, device, args, kwargs), device, kernel, grid, args, kwargs)


def launch_planned(plan, kernel, grid, args: tuple, kwargs: dict) -> None:
    """:func:`launch` for a caller that vouches that the hashable ``plan`` determines every argument's
    specialization (each tensor's dtype and 16-byte alignment, each int's value class, every keyword),
    so the ~10 µs of per-argument keying is skipped: the launch plans ``sparse_attention`` and
    ``sparse_linear_q`` keep, whose keys hold the shapes, strides, dtypes and alignments the arguments
    derive from. The first launch of a plan takes :func:`launch`'s full key, so a plan never launches a
    kernel that key would not pick."""
    if not enabled() or _hooked():
        kernel[grid](*args, **kwargs)
        return
    device = _driver.active.get_current_device()
    key = ("plan", id(kernel), device, plan)
    hit = _CACHE.get(key)
    if hit is None:
        full = _key(kernel, device, args, kwargs)
        _launch_keyed(full, device, kernel, grid, args, kwargs)
        _CACHE[key] = _CACHE[full]
        return
    _run(hit, device, kernel, grid, args, kwargs)


def _key(kernel, device, args, kwargs) -> tuple:
    return (id(kernel), device, tuple(map(_spec, args)), tuple(kwargs.items()), tuple(map(type, kwargs.values())))


def _launch_keyed(key, device, kernel, grid, args, kwargs) -> None:
    hit = _CACHE.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # Tritons that compile asynchronously return a future
            compiled = compiled.result()
        _CACHE[key] = _entry(kernel, compiled, len(args), kwargs) or False
        return
    _run(hit, device, kernel, grid, args, kwargs)


def _run(hit, device, kernel, grid, args, kwargs) -> None:
    if hit is False:
        kernel[grid](*args, **kwargs)
        return
    run, function, packed, names = hit
    stream = _driver.active.get_current_stream(device)
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, function, packed, None, None, None,
        *args, *[kwargs[k] for k in names])
