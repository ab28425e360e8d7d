"""Sparse symbols: the compact, bit-packed description of which attention work to do.

For one attention call over ``q: [B, H, Sq, D]`` and ``k, v: [B, H, Skv, D]`` the sequence axes are cut
into query blocks of ``block_q`` rows and key blocks of ``block_kv`` rows (the last block of each may be
partial). Two bit fields describe the work:

* **reuse** ``[B, H, nQ]`` - 1 means the (query block, head) tile is reused from a cache: the kernels do no
  matrix work for it and write zeros there (the runtime supplies the cached value).
* **skip** ``[B, H, nQ, nK]`` - 1 means that key block is left out of the softmax of that tile, exactly as if
  its scores were -inf.

Both are stored bit-packed along their **last axis** with the semantics of
``numpy.packbits(bits, axis=-1, bitorder="little")``: entry ``j`` lives in bit ``j % 8`` of byte ``j // 8``,
and the last byte is padded with zero bits. ``docs/symbols.md`` states the format.

The kernels read a *schedule* decoded from the bits (which key blocks each tile visits, which heads each
row block reduces over). Decoding costs a few small kernels, so it is done once per ``Symbols`` object and
cached: symbols change only on update steps, while dispatch steps call the kernels many times.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import cdiv, device_constant, next_pow2, use_triton
from ._launch import launch

__all__ = ["Symbols", "pack_bits", "unpack_bits", "block_count", "check_block_size"]

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def block_count(seq: int, block: int) -> int:
    """Number of blocks of ``block`` rows covering ``seq`` rows (the last one may be partial)."""
    return cdiv(seq, block)


def check_block_size(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 16 or value > 256 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two from 16 to 256, got {value}")
    return value


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor along its last axis, as ``numpy.packbits(bits, -1, bitorder="little")``."""
    n = bits.shape[-1]
    nbytes = block_count(n, 8)
    pad = nbytes * 8 - n
    # a bool tensor is reinterpreted, not converted (one kernel fewer per packed tensor on update steps)
    b = bits.view(torch.uint8) if bits.dtype == torch.bool else bits.to(torch.uint8)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*bits.shape[:-1], nbytes, 8)
    # uint8 throughout: eight distinct powers of two sum to at most 255, so nothing can overflow
    return (b * _bit_weights(bits.device)).sum(-1, dtype=torch.uint8)


def _bit_weights(device) -> torch.Tensor:
    """``_BIT_WEIGHTS`` as uint8 on ``device``, made once per device."""
    return device_constant("bit_weights", device, lambda: torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8))


#: What a ``Symbols`` fixes at construction (:meth:`Symbols.__setattr__`).
_FIELDS = frozenset({"reuse_bits", "skip_bits", "block_q", "block_kv", "seq_q", "seq_kv"})


def _versions(*tensors: torch.Tensor) -> Optional[int]:
    """The sum of the tensors' version counters, or None when one is an inference tensor (it has none)."""
    total = 0
    for t in tensors:
        if t.is_inference():
            return None
        total += t._version
    return total


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits along the last axis, as a bool tensor."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :n].bool()


class Symbols:
    """Reuse and skip bits for one attention call (see the module docstring for the format).

    Build with :meth:`from_dense` (from boolean masks) or :meth:`dense` (everything computed). Immutable:
    the fields cannot be reassigned, and a change to the bits in place (through any view) makes every
    later op call raise ``RuntimeError`` (:meth:`_unchanged`), since the schedules decoded from the bits
    are cached on the object.
    ``density()`` is the fraction of attention work (query rows x key columns, partial blocks weighted
    by their real size) that remains after reuse and skipping.
    """

    __slots__ = (
        "reuse_bits",
        "skip_bits",
        "block_q",
        "block_kv",
        "seq_q",
        "seq_kv",
        "_kv_schedule",
        "_kv_order",
        "_head_schedules",
        "_tile_schedules",
        "_dense",
        "_versions",
    )

    def __init__(
        self,
        reuse_bits: torch.Tensor,
        skip_bits: torch.Tensor,
        block_q: int,
        block_kv: int,
        seq_q: int,
        seq_kv: int,
    ):
        check_block_size("block_q", block_q)
        check_block_size("block_kv", block_kv)
        for name, v in (("seq_q", seq_q), ("seq_kv", seq_kv)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        n_q, n_k = block_count(seq_q, block_q), block_count(seq_kv, block_kv)
        for name, t in (("reuse_bits", reuse_bits), ("skip_bits", skip_bits)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
                raise TypeError(f"{name} must be a torch.uint8 tensor")
        if reuse_bits.dim() != 3 or reuse_bits.shape[-1] != block_count(n_q, 8):
            raise ValueError(
                f"reuse_bits must have shape [B, H, {block_count(n_q, 8)}] for seq_q={seq_q}, "
                f"block_q={block_q}; got {list(reuse_bits.shape)}"
            )
        expect = [*reuse_bits.shape[:2], n_q, block_count(n_k, 8)]
        if list(skip_bits.shape) != expect:
            raise ValueError(f"skip_bits must have shape {expect}; got {list(skip_bits.shape)}")
        if skip_bits.device != reuse_bits.device:
            raise ValueError("reuse_bits and skip_bits must be on the same device")
        # set past __setattr__ (its check would double the construction's host time)
        init = object.__setattr__
        init(self, "reuse_bits", reuse_bits.contiguous())
        init(self, "skip_bits", skip_bits.contiguous())
        init(self, "block_q", block_q)
        init(self, "block_kv", block_kv)
        init(self, "seq_q", seq_q)
        init(self, "seq_kv", seq_kv)
        init(self, "_kv_schedule", None)  # Optional[Tuple[Tensor, Tensor]]
        init(self, "_kv_order", None)  # Optional[Tensor]
        init(self, "_head_schedules", {})
        init(self, "_tile_schedules", {})
        init(self, "_dense", None)  # Optional[Tuple[Tensor, Tensor]]
        init(self, "_versions", _versions(self.reuse_bits, self.skip_bits))

    def __setattr__(self, name, value):
        # the bits, blocks and lengths are fixed at construction: the decoded schedules are cached
        if name in _FIELDS and hasattr(self, name):
            raise AttributeError(f"Symbols.{name} cannot be changed: Symbols are immutable (the schedules decoded "
                                 "from them are cached); build new ones")
        object.__setattr__(self, name, value)

    def _unchanged(self) -> None:
        """Raise unless the bits (and the masks kept as :meth:`to_dense`) are as they were at construction.
        Their version counters move with every in-place write, through any view. The ops call it once per
        eager call, before they read a schedule (outside a Dynamo trace only: there the counters are
        symbolic), so a change in place never leaves a stale cached schedule behind, which the kernels would
        read while the reference reads the new bits (~0.25 us a call; in every schedule accessor, with the
        trace check, it cost ~0.5 us each, several per call). Inference tensors have no version counter:
        symbols made under ``torch.inference_mode()`` are not checked (such tensors can be changed only
        inside inference mode)."""
        v = self._versions
        if v is None:
            return
        # counters only grow, so their sum is unchanged exactly when each is
        d = self._dense
        now = self.reuse_bits._version + self.skip_bits._version
        if d is not None:
            now += d[0]._version + d[1]._version
        if now != v:
            raise RuntimeError(
                "Symbols are immutable, but their bits (or the masks they were built from with share_dense) were "
                "changed in place after construction: the schedules decoded from them would be stale. Build new "
                "Symbols (Symbols(...), Symbols.from_dense(...)) instead of changing these")

    def _keep_dense(self, reuse: torch.Tensor, skip: torch.Tensor) -> None:
        self._dense = (reuse, skip)
        self._versions = _versions(self.reuse_bits, self.skip_bits, reuse, skip)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        reuse: torch.Tensor,
        skip: torch.Tensor,
        block_q: int,
        block_kv: int,
        seq_q: int,
        seq_kv: int,
        share_dense: bool = False,
    ) -> "Symbols":
        """From boolean masks ``reuse [B, H, nQ]`` and ``skip [B, H, nQ, nK]`` (True = reuse / skip).

        ``share_dense``: keep the two masks as this object's :meth:`to_dense` view, so decoding the
        schedules does not unpack the bits again (the runtime's update steps: a dozen small kernels fewer
        per site). Only for a caller that owns the masks and never changes them afterwards; the default
        copies nothing and keeps nothing."""
        check_block_size("block_q", block_q)
        check_block_size("block_kv", block_kv)
        n_q, n_k = block_count(seq_q, block_q), block_count(seq_kv, block_kv)
        if reuse.dim() != 3 or reuse.shape[-1] != n_q:
            raise ValueError(f"reuse must have shape [B, H, {n_q}] (nQ = ceil({seq_q}/{block_q})), got {list(reuse.shape)}")
        if list(skip.shape) != [*reuse.shape[:2], n_q, n_k]:
            raise ValueError(
                f"skip must have shape {[*reuse.shape[:2], n_q, n_k]} (nK = ceil({seq_kv}/{block_kv})), got {list(skip.shape)}"
            )
        if reuse.dtype != torch.bool or skip.dtype != torch.bool:
            raise TypeError("reuse and skip must be bool tensors")
        out = cls(pack_bits(reuse), pack_bits(skip), block_q, block_kv, seq_q, seq_kv)
        if share_dense:
            out._keep_dense(reuse, skip)
        return out

    @classmethod
    def from_decoded(cls, reuse_bits: torch.Tensor, skip_bits: torch.Tensor, block_q: int, block_kv: int, seq_q: int,
                     seq_kv: int, dense: Tuple[torch.Tensor, torch.Tensor],
                     kv_schedule: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> "Symbols":
        """From packed bits together with what was decoded beside them (``ops.flashomni_symbols``' kernels
        write all at once): ``dense``, the ``(reuse, skip)`` bool masks the bits pack, kept as the
        :meth:`to_dense` view, and ``kv_schedule``, what :meth:`kv_schedule` would decode. Only for a caller
        that made them from one decision and never changes them (their tests check they agree)."""
        out = cls(reuse_bits, skip_bits, block_q, block_kv, seq_q, seq_kv)
        reuse, skip = dense
        if tuple(reuse.shape) != (out.batch, out.heads, out.num_q_blocks) or tuple(skip.shape) != tuple(out.skip_bits.shape[:3]) + (out.num_kv_blocks,):
            raise ValueError(f"dense masks of shapes {list(reuse.shape)} and {list(skip.shape)} do not match {out!r}")
        out._keep_dense(reuse, skip)
        out._kv_schedule = kv_schedule
        return out

    @classmethod
    def dense(
        cls,
        batch: int,
        heads: int,
        seq_q: int,
        seq_kv: int,
        block_q: int = 128,
        block_kv: int = 128,
        device=None,
    ) -> "Symbols":
        """All tiles computed, no key block skipped: the kernels then equal dense attention."""
        n_q, n_k = block_count(seq_q, block_q), block_count(seq_kv, block_kv)
        reuse = torch.zeros(batch, heads, block_count(n_q, 8), dtype=torch.uint8, device=device)
        skip = torch.zeros(batch, heads, n_q, block_count(n_k, 8), dtype=torch.uint8, device=device)
        return cls(reuse, skip, block_q, block_kv, seq_q, seq_kv)

    # ---- shape -------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.reuse_bits.shape[0]

    @property
    def heads(self) -> int:
        return self.reuse_bits.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return block_count(self.seq_q, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return block_count(self.seq_kv, self.block_kv)

    @property
    def device(self) -> torch.device:
        return self.reuse_bits.device

    # ---- views -------------------------------------------------------------------------------
    def to_dense(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(reuse [B, H, nQ], skip [B, H, nQ, nK])`` as bool tensors (do not modify them: they may be
        the masks this object was built from, see :meth:`from_dense`, and a change to those makes the ops
        raise)."""
        if self._dense is not None:
            return self._dense
        return (
            unpack_bits(self.reuse_bits, self.num_q_blocks),
            unpack_bits(self.skip_bits, self.num_kv_blocks),
        )

    def _block_sizes(self):
        dev = self.device
        rows = torch.full((self.num_q_blocks,), self.block_q, dtype=torch.float64, device=dev)
        rows[-1] = self.seq_q - self.block_q * (self.num_q_blocks - 1)
        cols = torch.full((self.num_kv_blocks,), self.block_kv, dtype=torch.float64, device=dev)
        cols[-1] = self.seq_kv - self.block_kv * (self.num_kv_blocks - 1)
        return rows, cols

    def work_mask(self) -> torch.Tensor:
        """``[B, H, nQ, nK]`` bool: True where a (query block, key block) product is computed."""
        reuse, skip = self.to_dense()
        return ~reuse.unsqueeze(-1) & ~skip

    def density(self) -> float:
        """Fraction of the dense attention work (rows x keys) that remains, in [0, 1]."""
        rows, cols = self._block_sizes()
        work = self.work_mask().double()
        done = torch.einsum("bhqk,q,k->", work, rows, cols)
        return float(done) / (self.batch * self.heads * self.seq_q * self.seq_kv)

    def reuse_fraction(self) -> float:
        """Fraction of query rows (over all heads and batch items) whose tile is reused."""
        rows, _ = self._block_sizes()
        reuse = unpack_bits(self.reuse_bits, self.num_q_blocks).double()
        return float(torch.einsum("bhq,q->", reuse, rows)) / (self.batch * self.heads * self.seq_q)

    # ---- moves -------------------------------------------------------------------------------
    def to(self, device) -> "Symbols":
        """A copy on ``device`` (bits stay uint8: symbols have no floating dtype to move)."""
        if isinstance(device, torch.dtype):
            raise TypeError("Symbols hold bits (uint8); only a device move is meaningful")
        device = torch.device(device)
        if device == self.device:
            return self
        return Symbols(
            self.reuse_bits.to(device),
            self.skip_bits.to(device),
            self.block_q,
            self.block_kv,
            self.seq_q,
            self.seq_kv,
        )

    def cpu(self) -> "Symbols":
        return self.to("cpu")

    def cuda(self, device=None) -> "Symbols":
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def __or__(self, other: "Symbols") -> "Symbols":
        """Union of two strategies: reused where either reuses, skipped where either skips."""
        if not isinstance(other, Symbols):
            return NotImplemented
        same = (
            self.block_q == other.block_q
            and self.block_kv == other.block_kv
            and self.seq_q == other.seq_q
            and self.seq_kv == other.seq_kv
            and self.reuse_bits.shape == other.reuse_bits.shape
        )
        if not same:
            raise ValueError("can only combine Symbols of the same shape and block sizes")
        return Symbols(
            self.reuse_bits | other.reuse_bits,
            self.skip_bits | other.skip_bits,
            self.block_q,
            self.block_kv,
            self.seq_q,
            self.seq_kv,
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, Symbols):
            return NotImplemented
        return (
            (self.block_q, self.block_kv, self.seq_q, self.seq_kv)
            == (other.block_q, other.block_kv, other.seq_q, other.seq_kv)
            and self.reuse_bits.shape == other.reuse_bits.shape
            and bool(torch.equal(self.reuse_bits.cpu(), other.reuse_bits.cpu()))
            and bool(torch.equal(self.skip_bits.cpu(), other.skip_bits.cpu()))
        )

    __hash__ = None  # mutable tensors inside

    # ---- schedules the kernels read ----------------------------------------------------------
    def kv_schedule(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(kv_indices [B, H, nQ, nK] int32, kv_counts [B, H, nQ] int32)``.

        For each tile the kept key blocks come first in ascending order; ``kv_counts`` says how many.
        A reused tile has count 0. Cached on this object.
        """
        if self._kv_schedule is None:
            reuse, skip = self.to_dense()
            # ~skip & ~reuse as ~(skip | reuse): two ops instead of three
            self._kv_schedule = selected_first(torch.logical_not(skip | reuse.unsqueeze(-1)))
        return self._kv_schedule

    def kv_order(self) -> torch.Tensor:
        """``[B*H*nQ]`` int32: the flat ``(b*H + h)*nQ + qb`` tiles by their ``kv_counts``, most kept key
        blocks first (ties in index order, reused tiles last): the persistent attention kernel's walk,
        longest first so its last wave is short. Cached on this object."""
        if self._kv_order is None:
            self._kv_order = longest_first(self.kv_schedule()[1])
        return self._kv_order

    def _shape(self) -> tuple:
        return (self.batch, self.heads, self.seq_q, self.seq_kv, self.block_q, self.block_kv)

    def prefetch_schedules(self, like: "Symbols") -> "Symbols":
        """Decode now every schedule ``like`` has decoded (same arguments), so the calls that need them find
        them cached. The runtime calls it when an update replaces a stream's symbols: the decode is a few
        dozen small device ops per site, issued there while the GPU still runs the update's dense kernels
        instead of on the first dispatch step, where it stood between the host and an idle GPU. Nothing when
        ``like`` has another shape or other block sizes. Returns ``self``."""
        if like is None or like is self or like._shape() != self._shape():
            return self  # other shapes or blocks decode other schedules
        if like._kv_schedule is not None:
            self.kv_schedule()
        if like._kv_order is not None:
            self.kv_order()
        for key in list(like._head_schedules):
            self.head_schedule(*key)
        for key in list(like._tile_schedules):
            self.tile_schedule(*key)
        return self

    def row_selection(self, seq: int, row_offset: int, select_reused: bool) -> torch.Tensor:
        """``[B, seq, H]`` bool: row ``r`` (query position ``r + row_offset``) selects head ``h``.

        Selects computed heads, or reused heads when ``select_reused``.
        """
        return row_head_selection(self.reuse_bits, self.block_q, self.seq_q, seq, row_offset, select_reused)

    def head_schedule(self, seq: int, row_offset: int, block_m: int, select_reused: bool = False):
        """``(head_indices [B, T, H] int32, head_counts [B, T] int32)`` for row tiles of ``block_m``.

        Row tile ``t`` covers rows ``[t*block_m, (t+1)*block_m)`` of an operand whose row ``r`` is query
        position ``r + row_offset``; its list holds the heads selected by any of its rows (computed heads,
        or reused ones when ``select_reused``), ascending. Cached per argument tuple.
        """
        key = (seq, row_offset, block_m, bool(select_reused))
        hit = self._head_schedules.get(key)
        if hit is not None:
            return hit
        plan = self._slice_plan(seq, row_offset, block_m)
        if plan is not None:
            out = slice_head_schedule(self.reuse_bits, plan[1], plan[2] - plan[1], select_reused)
        else:
            out = selected_first(self._tile_selection(seq, row_offset, block_m, select_reused))
        self._head_schedules[key] = out
        return out

    def tile_schedule(self, seq: int, row_offset: int, block_m: int):
        """``(tiles [B*T*H] int32, count [1] int32)``: the (batch, row tile, head) tiles of an operand with
        rows in tiles of ``block_m`` (as in :meth:`head_schedule`) and one head per column tile, as flat
        indices ``(b*T + t)*H + h``; those with a computed head first, ascending, then the rest; ``count``
        how many are computed. What a persistent kernel walks: it reads the count on the device, so the
        host never waits for it. Cached per argument tuple."""
        key = (seq, row_offset, block_m)
        hit = self._tile_schedules.get(key)
        if hit is not None:
            return hit
        plan = self._slice_plan(seq, row_offset, block_m)
        if plan is not None:
            out = slice_tile_schedule(self.reuse_bits, plan[1], plan[2] - plan[1])
        else:
            tiles, count = selected_first(self._tile_selection(seq, row_offset, block_m, False).reshape(1, -1))
            out = (tiles.reshape(-1), count.reshape(1))
        self._tile_schedules[key] = out
        return out

    def _slice_plan(self, seq: int, row_offset: int, block_m: int):
        """The ``("slice", a, b)`` tile plan when the schedule kernels that read the bits directly apply
        (row tiles aligned to query blocks, on the Triton path, outside a trace), else None."""
        if not use_triton(self.reuse_bits) or self.heads > _SLICE_MAX_HEADS or torch.compiler.is_compiling():
            return None
        plan = _tile_plan(seq, row_offset, block_m, self.block_q, self.device)
        return plan if plan[0] == "slice" and plan[2] > plan[1] else None

    def _tile_selection(self, seq: int, row_offset: int, block_m: int, select_reused: bool) -> torch.Tensor:
        """``[B, T, H]`` bool, contiguous: row tile ``t`` holds a row that selects head ``h``. When every
        tile lies in one query block (the usual aligned tiles) the blocks are a slice or a gather of the
        reuse mask written once in this layout (one or two ops, where the general path takes four: an index,
        an ``any`` and the copy :func:`selected_first` makes of the transposed result)."""
        reuse = self._dense[0] if self._dense is not None else unpack_bits(self.reuse_bits, self.num_q_blocks)
        plan = _tile_plan(seq, row_offset, block_m, self.block_q, self.device)
        if plan[0] == "slice":
            per_tile = reuse[:, :, plan[1]:plan[2]]  # [B, H, T] view
        elif plan[0] == "gather":
            per_tile = reuse.index_select(2, plan[1])
        else:
            sel = reuse if select_reused else ~reuse
            return sel[:, :, plan[1]].any(-1).transpose(1, 2).contiguous()
        view = per_tile.transpose(1, 2)
        if select_reused:
            return view.contiguous()
        out = torch.empty(view.shape, dtype=torch.bool, device=view.device)
        return torch.logical_not(view, out=out)

    def check_for(self, name: str, batch: int, heads: int, seq_q: int, seq_kv: Optional[int] = None):
        """Raise ValueError (naming ``name``) unless these symbols describe this call's shape."""
        got = (self.batch, self.heads, self.seq_q) + ((self.seq_kv,) if seq_kv is not None else ())
        want = (batch, heads, seq_q) + ((seq_kv,) if seq_kv is not None else ())
        if got != want:
            fields = "(batch, heads, seq_q" + (", seq_kv)" if seq_kv is not None else ")")
            raise ValueError(f"{name} were built for {fields} = {got}, but the call has {want}")

    # ---- repr --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        head = (
            f"Symbols(batch={self.batch}, heads={self.heads}, seq_q={self.seq_q}, seq_kv={self.seq_kv}, "
            f"block_q={self.block_q}, block_kv={self.block_kv}, blocks={self.num_q_blocks}x{self.num_kv_blocks}, "
            f"density={self.density():.3f}, reused={self.reuse_fraction():.3f}, device={self.device})"
        )
        if self.batch * self.heads > 4 or self.num_q_blocks > 16 or self.num_kv_blocks > 32:
            return head
        reuse, skip = self.to_dense()
        lines = [head, "  rows: query blocks; '#' computed, '.' skipped key block, 'R' reused tile"]
        for b in range(self.batch):
            for h in range(self.heads):
                lines.append(f"  [b={b}, h={h}]")
                for qb in range(self.num_q_blocks):
                    if reuse[b, h, qb]:
                        row = "R" * self.num_kv_blocks
                    else:
                        row = "".join("." if s else "#" for s in skip[b, h, qb].tolist())
                    lines.append(f"    q{qb:<3d} {row}")
        return "\n".join(lines)


#: rows longer than this decode with the PyTorch formula (the kernel holds a whole row in registers)
_COMPACT_MAX_ROW = 8192


@triton.jit
def _selected_first_kernel(Mask, Idx, Cnt, n, N_POW2: tl.constexpr):
    """One program per row. ``Mask [R, n]`` uint8 (a bool tensor's bytes), ``Idx [R, n]`` int32,
    ``Cnt [R]`` int32, all contiguous; grid ``(R,)``. Row ``r`` of ``Idx`` gets the positions of its
    nonzero entries ascending, then those of its zero entries ascending; ``Cnt[r]`` how many are nonzero."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_POW2)
    inside = offs < n
    m = (tl.load(Mask + row * n + offs, mask=inside, other=0) != 0).to(tl.int32)
    kept = tl.cumsum(m, 0)  # inclusive: selected entries up to and including each position
    total = tl.sum(m, 0)
    slot = tl.where(m != 0, kept - 1, total + offs - kept)
    tl.store(Idx + row * n + slot, offs, mask=inside)
    tl.store(Cnt + row, total)


def selected_first(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(indices [..., n] int32, counts [...] int32)`` of a bool ``mask [..., n]``: the positions of its
    True entries in ascending order, then those of its False entries (the order a stable sort of ``~mask``
    gives), and how many are True. On CUDA one Triton launch (a prefix sum per row); elsewhere
    :func:`selected_first_reference`. Either replaces a sort: on CUDA a segmented sort costs ~0.15 ms of
    host time a call, and every update step decodes a few schedules per site."""
    n = mask.shape[-1]
    # under torch.compile (a user compiling code that decodes symbols) the PyTorch formula traces as ops
    if not use_triton(mask) or mask.numel() == 0 or n > _COMPACT_MAX_ROW or torch.compiler.is_compiling():
        return selected_first_reference(mask)
    m = mask.contiguous()
    idx = torch.empty(m.shape, dtype=torch.int32, device=m.device)
    cnt = torch.empty(m.shape[:-1], dtype=torch.int32, device=m.device)
    rows = m.numel() // n
    launch(_selected_first_kernel, (rows,), m.view(torch.uint8), idx, cnt, n, N_POW2=max(16, next_pow2(n)))
    return idx, cnt


def selected_first_reference(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`selected_first` in PyTorch: a prefix sum and one scatter (~9 small kernels)."""
    n = mask.shape[-1]
    kept = mask.cumsum(-1)  # int64: kept entries up to and including each position
    counts = kept[..., -1:]
    pos = torch.arange(n, device=mask.device)
    slot = torch.where(mask, kept - 1, counts + pos - kept)
    out = torch.empty(mask.shape, dtype=torch.int32, device=mask.device)
    out.scatter_(-1, slot, pos.to(torch.int32).expand(mask.shape))
    return out, counts.squeeze(-1).to(torch.int32)


@triton.jit
def _reused_bit(Bits, b, h, qb, stride_b, stride_h, inside):
    """Reuse bit of query block ``qb`` of (batch ``b``, head ``h``) from packed ``Bits``; 0 outside."""
    byte = tl.load(Bits + b * stride_b + h * stride_h + (qb >> 3), mask=inside, other=0)
    return (byte.to(tl.int32) >> (qb & 7)) & 1


@triton.jit
def _slice_heads_kernel(Bits, Idx, Cnt, stride_b, stride_h, first_block, T, H, SELECT_REUSED: tl.constexpr,
                        BLOCK_T: tl.constexpr, H_POW2: tl.constexpr):
    """:meth:`Symbols.head_schedule` for row tiles that are query blocks ``first_block + t`` alone. Grid
    ``(B, cdiv(T, BLOCK_T))``; ``Bits [B, H, ceil(nQ/8)]`` uint8 packed reuse bits (strides ``stride_b``,
    ``stride_h``, bytes contiguous), ``Idx [B, T, H]`` and ``Cnt [B, T]`` int32 contiguous. Row ``(b, t)``
    of ``Idx`` gets the selected heads ascending, then the others ascending (:func:`selected_first`)."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, H_POW2)
    inside = (t[:, None] < T) & (h[None, :] < H)
    reused = _reused_bit(Bits, b, h[None, :], first_block + t[:, None], stride_b, stride_h, inside)
    sel = tl.where(inside, reused if SELECT_REUSED else 1 - reused, 0)
    kept = tl.cumsum(sel, 1)
    total = tl.sum(sel, 1)
    slot = tl.where(sel != 0, kept - 1, total[:, None] + h[None, :] - kept)
    row = (b * T + t) * H
    tl.store(Idx + row[:, None] + slot, tl.broadcast_to(h[None, :], [BLOCK_T, H_POW2]), mask=inside)
    tl.store(Cnt + b * T + t, total, mask=t < T)


@triton.jit
def _computed_tiles(Bits, start, n, T, H, first_block, stride_b, stride_h, CHUNK: tl.constexpr):
    """Flat tiles ``i = start + [0, CHUNK)`` of a slice schedule: ``(i, i < n, 1 where the head computes)``."""
    i = start + tl.arange(0, CHUNK)
    inside = i < n
    b, t, h = i // (T * H), (i // H) % T, i % H
    reused = _reused_bit(Bits, b.to(tl.int64), h, first_block + t, stride_b, stride_h, inside)
    return i, inside, tl.where(inside, 1 - reused, 0)


@triton.jit
def _slice_tiles_kernel(Bits, Tiles, Count, stride_b, stride_h, first_block, T, H, n, CHUNK: tl.constexpr):
    """:meth:`Symbols.tile_schedule` for row tiles that are query blocks ``first_block + t`` alone. Grid
    ``(1,)``; ``Bits`` as in :func:`_slice_heads_kernel`; ``Tiles [n]`` int32 with ``n = B*T*H``, ``Count
    [1]`` int32. Flat tile ``i = (b*T + t)*H + h`` is selected when its head computes; the selected come
    first ascending, then the rest ascending. Two walks over the list in chunks: the count, then the
    slots (a running prefix sum), so no list has to fit one block."""
    # a vector accumulator, then typed int32 scalars: the loop-carried forms every Triton compiles
    acc = tl.zeros([CHUNK], dtype=tl.int32)
    for start in range(0, n, CHUNK):
        _, _, sel = _computed_tiles(Bits, start, n, T, H, first_block, stride_b, stride_h, CHUNK)
        acc += sel
    total = tl.sum(acc, 0)
    before = total * 0
    for start in range(0, n, CHUNK):
        i, inside, sel = _computed_tiles(Bits, start, n, T, H, first_block, stride_b, stride_h, CHUNK)
        kept = before + tl.cumsum(sel, 0)
        slot = tl.where(sel != 0, kept - 1, total + i - kept)
        tl.store(Tiles + slot, i, mask=inside)
        before += tl.sum(sel, 0)
    tl.store(Count, total)


#: a slice schedule's tiles a program (head lists) and a chunk of the flat walk (tile lists)
_SLICE_BLOCK_T, _SLICE_CHUNK = 32, 2048
#: head counts beyond this decode with the PyTorch formula (a program holds BLOCK_T rows of H_POW2)
_SLICE_MAX_HEADS = 256


def slice_head_schedule(reuse_bits: torch.Tensor, first_block: int, T: int, select_reused: bool):
    """``(head_indices [B, T, H] int32, head_counts [B, T] int32)``: the head lists of row tiles ``t`` that
    are query blocks ``first_block + t`` alone, read straight from the packed reuse bits in one launch
    (:func:`_slice_heads_kernel`). The same as :func:`selected_first` of the sliced, transposed (and, for
    computed heads, negated) reuse mask, which costs that launch and three or four small ones before it."""
    B, H = reuse_bits.shape[:2]
    idx = torch.empty(B, T, H, dtype=torch.int32, device=reuse_bits.device)
    cnt = torch.empty(B, T, dtype=torch.int32, device=reuse_bits.device)
    launch(_slice_heads_kernel, (B, cdiv(T, _SLICE_BLOCK_T)), reuse_bits, idx, cnt, reuse_bits.stride(0),
           reuse_bits.stride(1), first_block, T, H, SELECT_REUSED=bool(select_reused), BLOCK_T=_SLICE_BLOCK_T,
           H_POW2=max(16, next_pow2(H)))
    return idx, cnt


def slice_tile_schedule(reuse_bits: torch.Tensor, first_block: int, T: int):
    """``(tiles [B*T*H] int32, count [1] int32)`` of :meth:`Symbols.tile_schedule` for row tiles that are
    query blocks ``first_block + t`` alone, read straight from the packed reuse bits in one launch
    (:func:`_slice_tiles_kernel`)."""
    B, H = reuse_bits.shape[:2]
    n = B * T * H
    tiles = torch.empty(n, dtype=torch.int32, device=reuse_bits.device)
    count = torch.empty(1, dtype=torch.int32, device=reuse_bits.device)
    launch(_slice_tiles_kernel, (1,), reuse_bits, tiles, count, reuse_bits.stride(0), reuse_bits.stride(1),
           first_block, T, H, n, CHUNK=_SLICE_CHUNK)
    return tiles, count


@triton.jit
def _longest_first_kernel(Cnt, Order, n, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Grid ``(cdiv(n, BLOCK_I),)``; ``Cnt [n]`` int32 and ``Order [n]`` int32, contiguous. Entry ``i`` goes
    to position ``#{j: Cnt[j] > Cnt[i]} + #{j < i: Cnt[j] == Cnt[i]}`` of ``Order``: its rank in a stable
    descending sort, counted against every entry in ``BLOCK_J``-wide tiles (O(n²) compares, no sort)."""
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    inside = offs_i < n
    c_i = tl.load(Cnt + offs_i, mask=inside, other=0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        c_j = tl.load(Cnt + offs_j, mask=offs_j < n, other=0)
        before = (c_j[None, :] > c_i[:, None]) | ((c_j[None, :] == c_i[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        rank += tl.sum((before & (offs_j[None, :] < n)).to(tl.int32), 1)
    tl.store(Order + rank, offs_i, mask=inside)


#: lists longer than this rank with torch.argsort: the kernel's compares grow with the square of the length
_LONGEST_FIRST_MAX = 16384
#: entries ranked a program, entries compared a step: the ranking is a serial walk over the list per
#: program, so many small programs (16) beat fewer large ones, about 2.5-3x at FLUX and HunyuanVideo sizes
#: on the H200
_LONGEST_FIRST_I, _LONGEST_FIRST_J = 16, 256


def longest_first(counts: torch.Tensor) -> torch.Tensor:
    """``[counts.numel()]`` int32: the flat positions of ``counts`` (int32) by value, largest first, ties in
    index order (``torch.argsort(counts.reshape(-1), descending=True, stable=True)``). On CUDA one Triton
    launch that ranks every entry against all others (lists up to 16384; the persistent attention's at most
    ~1600 tiles); elsewhere :func:`longest_first_reference`. One launch instead of a device sort, whose host
    cost is tens of microseconds a call and which makes three device copies."""
    c = counts.reshape(-1)
    n = c.numel()
    if not use_triton(c) or n == 0 or n > _LONGEST_FIRST_MAX or torch.compiler.is_compiling():
        return longest_first_reference(counts)
    c = c.to(torch.int32).contiguous()
    order = torch.empty(n, dtype=torch.int32, device=c.device)
    launch(_longest_first_kernel, (cdiv(n, _LONGEST_FIRST_I),), c, order, n, BLOCK_I=_LONGEST_FIRST_I,
           BLOCK_J=_LONGEST_FIRST_J)
    return order


def longest_first_reference(counts: torch.Tensor) -> torch.Tensor:
    """:func:`longest_first` in PyTorch: a stable descending sort."""
    return torch.argsort(counts.reshape(-1), descending=True, stable=True).to(torch.int32)


def _tile_blocks_host(seq: int, row_offset: int, block_m: int, block_q: int) -> list:
    """Per row tile of ``block_m`` rows (row ``r`` at query position ``r + row_offset``) the query blocks it
    falls in, ascending."""
    tiles = []
    for t in range(block_count(seq, block_m)):
        first = (t * block_m + row_offset) // block_q
        last = (min(seq, (t + 1) * block_m) - 1 + row_offset) // block_q
        tiles.append(list(range(first, last + 1)))
    return tiles


def _tile_blocks(seq: int, row_offset: int, block_m: int, block_q: int, device) -> torch.Tensor:
    """``[T, k]`` int64: the query blocks that rows ``[t*block_m, min(seq, (t+1)*block_m))`` of an operand
    (row ``r`` at query position ``r + row_offset``) fall in, padded with each tile's first block; made on the
    host once per argument tuple and device."""

    def build():
        tiles = _tile_blocks_host(seq, row_offset, block_m, block_q)
        width = max(len(b) for b in tiles)
        return torch.tensor([b + [b[0]] * (width - len(b)) for b in tiles], dtype=torch.int64)

    return device_constant(("tile_blocks", seq, row_offset, block_m, block_q), device, build)


_TILE_PLANS: dict = {}


def _tile_plan(seq: int, row_offset: int, block_m: int, block_q: int, device) -> tuple:
    """How :meth:`Symbols._tile_selection` reads the query blocks of each row tile, decided on the host once
    per argument tuple and device: ``("slice", a, b)`` when tile ``t`` is block ``a + t`` alone,
    ``("gather", index [T])`` when each tile lies in one block, else ``("any", blocks [T, k])``
    (:func:`_tile_blocks`)."""
    key = (seq, row_offset, block_m, block_q, str(device))
    hit = _TILE_PLANS.get(key)
    if hit is None:
        tiles = _tile_blocks_host(seq, row_offset, block_m, block_q)
        if all(len(b) == 1 for b in tiles):
            first = [b[0] for b in tiles]
            if first == list(range(first[0], first[0] + len(first))):
                hit = ("slice", first[0], first[0] + len(first))
            else:
                hit = ("gather", device_constant(("tile_block", seq, row_offset, block_m, block_q), device,
                                                 lambda: torch.tensor(first, dtype=torch.int64)))
        else:
            hit = ("any", _tile_blocks(seq, row_offset, block_m, block_q, device))
        _TILE_PLANS[key] = hit
    return hit


def row_head_selection(
    reuse_bits: torch.Tensor, block_q: int, seq_q: int, seq: int, row_offset: int, select_reused: bool
) -> torch.Tensor:
    """``[B, seq, H]`` bool from packed reuse bits: which heads row ``r`` (position ``r + row_offset``)
    selects - its computed heads, or its reused heads when ``select_reused``."""
    reuse = unpack_bits(reuse_bits, block_count(seq_q, block_q))
    pos = torch.arange(seq, device=reuse_bits.device) + row_offset
    per_row = reuse[:, :, pos // block_q]  # [B, H, seq]
    return (per_row if select_reused else ~per_row).transpose(1, 2)


def scale_or_default(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
