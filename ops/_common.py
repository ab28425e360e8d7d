"""Shared plumbing for the op families: the environment switches, which implementation runs, and argument
checks.

Environment switches (read once, at import; the table in docs/ops.md says what each does):
``OMNI_COMPILE_KERNELS`` (``auto`` | ``triton`` | ``reference``), ``OMNI_COMPILE_TMA`` (``auto`` | ``on`` |
``off`` | ``device``), and the on/off switches ``OMNI_COMPILE_FAST_LAUNCH``, ``OMNI_COMPILE_CALL_PLANS``,
``OMNI_COMPILE_WARP_SPEC``, ``OMNI_COMPILE_PERSISTENT_ATTENTION``, ``OMNI_COMPILE_PERSISTENT_GEMM`` (default on).
Every one goes through :func:`env_choice` / :func:`env_switch`, which reject any other value.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off environment switch: unset or empty gives ``default``; ``on``/``1``/``true``/``yes`` and
    ``off``/``0``/``false``/``no`` (any case) give True/False; anything else raises ``ValueError`` (a typo
    must not silently select a mode)."""
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if not v:
        return default
    if v in _ON:
        return True
    if v in _OFF:
        return False
    raise ValueError(f"{name} must be on or off (also 1/0, true/false, yes/no), got {raw!r}")


def env_choice(name: str, choices: tuple, default: str) -> str:
    """A multiple-choice environment switch: unset or empty gives ``default``; a value of ``choices`` (any
    case) gives it; anything else raises ``ValueError``."""
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if not v:
        return default
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return v


_MODES = ("auto", "triton", "reference")
_mode = env_choice("OMNI_COMPILE_KERNELS", _MODES, "auto")


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def kernel_backend(mode: str) -> Iterator[None]:
    """Choose the implementation the ops run: ``"auto"`` (Triton on CUDA, reference on CPU),
    ``"triton"`` (Triton everywhere; on CPU tensors this needs ``TRITON_INTERPRET=1``), or
    ``"reference"`` (the fp32 PyTorch reference everywhere: slow, but independent of the kernels)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"kernel_backend mode must be one of {_MODES}, got {mode!r}")
    if mode == "triton" and not triton_interpreting() and not torch.cuda.is_available():
        raise RuntimeError("kernel_backend('triton') on a machine without CUDA needs TRITON_INTERPRET=1")
    old, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = old


def use_triton(t: torch.Tensor) -> bool:
    if _mode == "reference":
        return False
    if t.device.type == "cuda":
        return True
    return _mode == "triton" and t.device.type == "cpu" and triton_interpreting()


_TMA_MODES = ("auto", "on", "off", "device")
_tma = env_choice("OMNI_COMPILE_TMA", _TMA_MODES, "auto")


@contextlib.contextmanager
def tensor_memory_accelerator(mode: str) -> Iterator[None]:
    """Whether the kernels load tiles through tensor descriptors (Hopper's TMA engine): ``"auto"`` (the
    GEMMs on CUDA when the inputs qualify, where the H100 sweep measured it faster; attention keeps pointer
    loads, measured faster; off in Triton's CPU interpreter), ``"on"`` (every kernel, also in the
    interpreter, which emulates descriptors: how CI tests that path), ``"off"`` (plain pointer loads),
    ``"device"`` (descriptors built inside the kernels: the attention kernel's form for Triton's warp
    specialization and the persistent GEMM-Q, both also in the interpreter; GEMM-O takes its ``"auto"``
    path)."""
    global _tma
    if mode not in _TMA_MODES:
        raise ValueError(f"tensor_memory_accelerator mode must be 'auto', 'on', 'off' or 'device', got {mode!r}")
    old, _tma = _tma, mode
    try:
        yield
    finally:
        _tma = old


def tma_mode() -> str:
    return _tma


def tma_enabled() -> bool:
    if _tma == "off" or _TensorDescriptor is None:
        return False
    return _tma == "on" or not triton_interpreting()


def tma_compatible(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte multiples for every stride but the last (1)."""
    return t.data_ptr() % 16 == 0 and tma_strides_compatible(t)


def tma_strides_compatible(t: torch.Tensor) -> bool:
    """The stride half of :func:`tma_compatible`, which fake tensors (torch.compile's tracing) can answer."""
    size = t.element_size()
    return t.stride(-1) == 1 and all((st * size) % 16 == 0 for st in t.stride()[:-1])


def make_descriptor(t: torch.Tensor, block_shape):
    return _TensorDescriptor(t, list(t.shape), list(t.stride()), list(block_shape))


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_device_allocator() -> None:
    """Kernels that build tensor descriptors on the device need global scratch memory, which Triton asks
    of an allocator the process sets (``triton.set_allocator``). Sets one that takes it from torch's caching
    allocator, unless one is set already (Inductor and users may set their own)."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # pragma: no cover - other Triton layouts: set ours
        pass
    triton.set_allocator(_torch_scratch)


try:  # host-side tensor descriptors: triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    _TensorDescriptor = None


_HOPPER_WITH_NEW_TRITON: dict = {}


def hopper_with_new_triton(device) -> bool:
    """A CUDA device of compute capability 9.x (Hopper) with Triton 3.6 or newer: where the in-kernel
    descriptor kernels (warp-specialized attention, persistent GEMM-Q) were measured and tested. Decided
    once per device: the check runs on every call of a dispatch step. False in the interpreter."""
    if triton_interpreting() or not torch.cuda.is_available():
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return False
    hit = _HOPPER_WITH_NEW_TRITON.get(device)
    if hit is None:
        try:
            version = tuple(int(p) for p in triton.__version__.split(".")[:2])
        except ValueError:
            version = (0, 0)
        hit = _HOPPER_WITH_NEW_TRITON[device] = version >= (3, 6) and device_capability(device)[0] == 9
    return hit


def check_float(name: str, t, dims: int, dtype: Optional[torch.dtype] = None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the other inputs ({dtype})")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def check_head_dim(name: str, head_dim: int) -> None:
    if not isinstance(head_dim, int) or head_dim < 16 or head_dim > 128 or head_dim % 8:
        raise ValueError(f"{name} must be a multiple of 8 from 16 to 128 (e.g. 64, 72, 80, 96, 128), got {head_dim!r}")


def check_symbols_device(symbols, device) -> None:
    if symbols.device != device:
        raise ValueError(f"symbols are on {symbols.device} but the inputs are on {device}; use symbols.to(device)")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host, for launch grids and block counts (``symbols.block_count``).
    ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in Triton 3.9: a host call costs
    ~3 µs against 0.04 µs for this division, and a site's update step makes a dozen of them."""
    return -(-a // b)


# ------------------------------------------------------------------------------------------------
# Triton helpers shared by the kernels
# ------------------------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def load_reuse_bit(ReuseBits, bh, qb, n_qbytes, mask):
    """Reuse bit of (batch*H + head ``bh``, query block ``qb``) from bytes packed little-endian along
    the query-block axis (``ReuseBits [B, H, n_qbytes]`` uint8 contiguous). Masked lanes read 1."""
    byte = tl.load(ReuseBits + bh * n_qbytes + (qb >> 3), mask=mask, other=255)
    return (byte.to(tl.int32) >> (qb & 7)) & 1


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n) in groups of GROUP_M row tiles, so programs that run
    together share weight tiles in L2."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


def tensors_key(*tensors) -> tuple:
    """Per tensor (``None`` stays ``None``) its shape, strides, dtype, device and whether its base is 16-byte
    aligned: what the ops' checks and kernel choices read of an input, so the public wrappers can keep
    their decisions per call key (``ops.attention``, ``ops.linear_q``)."""
    return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
                  for t in tensors])


#: ``OMNI_COMPILE_CALL_PLANS=off``: the public wrappers check and plan every call afresh (slower on the host;
#: for ruling the kept decisions out when something looks wrong)
CALL_PLANS = env_switch("OMNI_COMPILE_CALL_PLANS")


#: the wrappers' kept calls and launch plans are emptied at this many entries (a model has a few shapes,
#: a sweep may have many)
MAX_KEPT = 1024


def keep(cache: dict, key, value):
    """``cache[key] = value`` (returned), the cache emptied first when it already holds :data:`MAX_KEPT`."""
    if len(cache) >= MAX_KEPT:
        cache.clear()
    cache[key] = value
    return value


def plans_apply(*tensors) -> bool:
    """Whether a public wrapper may keep its checks' outcome and launch plan for this call: plain tensors
    (``None`` allowed) outside torch.compile's tracing (fake tensors have no data pointer, subclasses may
    behave otherwise) that autograd does not track (those go through the registered op, whose backward
    raises: :func:`op_for_call`), unless ``OMNI_COMPILE_CALL_PLANS=0``."""
    if not CALL_PLANS:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return not torch.compiler.is_compiling()


def _tracked(tensors) -> bool:
    """Whether autograd records an op on these inputs (tensors, None, or lists of tensors)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if isinstance(t, (list, tuple)):
            if any(x is not None and x.requires_grad for x in t):
                return True
        elif t is not None and t.requires_grad:
            return True
    return False


def op_for_call(op, impl, *tensors):
    """The registered op while torch.compile traces (so graphs hold ``flashomni::*`` nodes) or when autograd
    tracks one of ``tensors`` (so the output carries the op's backward, which raises: see
    :func:`inference_only`), the plain implementation otherwise: the dispatcher round trip costs ~10-20 us
    a call on the host, as much as a small sparse kernel runs. Called outside autograd (the runtime runs
    under ``no_grad``), the check is one ``torch.is_grad_enabled()``."""
    return op if torch.compiler.is_compiling() or _tracked(tensors) else impl


def inference_only(op) -> None:
    """Register a backward for the custom op ``op`` that raises a ``RuntimeError`` saying the op is
    inference-only. The kernels compute no gradients (the Triton paths return outputs autograd cannot
    see through), so a backward through them would otherwise be wrong silently or fail with a message
    that asks the user to write one."""
    name = op._qualname

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name} has no backward: the flashomni ops and the flashomni backend are inference-only. Run the model "
            "under torch.no_grad() or torch.inference_mode() (diffusers pipelines do), or detach the op's inputs.")

    op.register_autograd(backward)


_DEVICE_CONSTANTS: dict = {}


def device_constant(key, device, build) -> torch.Tensor:
    """``build()`` (a CPU tensor) on ``device``, made once per ``(key, device)`` and kept: a constant built
    per call is a host-to-device copy each time (a stall on CUDA), and the update steps build several per
    site (bit weights, tile-to-block tables, diagonal key blocks)."""
    k = (key, str(device))
    t = _DEVICE_CONSTANTS.get(k)
    if t is None:
        t = _DEVICE_CONSTANTS[k] = build().to(device)
    return t


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple:
    """``(major, minor)`` compute capability of a CUDA device, asked once per device: the ops' launch
    choices read it on every call."""
    return _capability(_cuda_index(device))


def num_persistent_programs(device: torch.device) -> int:
    """One program per SM on a GPU; 3 in the interpreter (few enough that each walks several tiles)."""
    if device.type != "cuda":
        return 3
    return _sm_count(_cuda_index(device))
