"""Stage a patch on the device: one packed host buffer (pinned on CUDA), one host-to-device copy.

Layout of the packed buffer (all sections 8-byte aligned, so each can be viewed in place):

    starts int64[E] | lasts int64[E] | numels int64[E] | index int64[total nnz]
    | xor bits of the fp32 tensors | of the fp16 tensors | of the bf16 tensors

E tensors, staged in dtype order, so the bits of one dtype are contiguous. The header lets the device
check every tensor's index bounds and order in a few vectorised operations, before anything is
gathered; each tensor is then gathered and written with one index_select / scatter_ on a flat integer
view of its storage (public torch only).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import dtypes
from ..core.dtypes import torch_dtype
from ..patch.model import BITS_DTYPE, TORCH_BITS_DTYPE, TensorPatch

GROUP_ORDER = (torch.float32, torch.float16, torch.bfloat16)


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass
class StagedTensor:
    """One tensor of a staged patch: where its indices and bits sit in the packed device buffers."""

    name: str  # canonical live name
    target: torch.Tensor  # the live parameter or buffer
    tp: TensorPatch
    index_offset: int  # into Staged.index
    bits_offset: int  # into Staged.xor[dtype]
    nnz: int
    flat: torch.Tensor | None = None  # 1-D integer view of the target's storage (set by stage)
    idx: torch.Tensor | None = None  # its slice of Staged.index, on the device (set by stage)
    data_ptr: int = 0  # the target's address and shape when staged: a cached staging is reused only while
    flat_shape: tuple = ()  # they hold (see PatchRuntime._staged_for)

    def group_slice(self) -> slice:
        return slice(self.bits_offset, self.bits_offset + self.nnz)


@dataclass
class Staged:
    """A patch's indices and XOR bits on one device, plus the header used for validation."""

    device: torch.device
    entries: list[StagedTensor]
    index: torch.Tensor  # int64[total nnz], on device
    xor: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # float dtype -> int bits, on device
    starts: torch.Tensor | None = None  # each tensor's first and last position in Staged.index
    lasts: torch.Tensor | None = None
    numels: torch.Tensor | None = None  # each tensor's element count: its indices lie in [0, numel)
    nbytes: int = 0
    # Host-side bookkeeping every apply needs (made once here, shared by the handles of cached re-applies):
    names: tuple[str, ...] = ()  # canonical live names, in entry order
    host_index: dict[str, np.ndarray] = field(default_factory=dict)  # name -> flat indices, for overlap checks
    data_ptrs: dict[str, int] = field(default_factory=dict)  # name -> the live tensor's address when staged
    # Kept between applies of the same loaded patch (PatchRuntime caches the staging):
    indices_checked: bool = False  # indices_valid passed (the staged index buffer is never written again)
    verified: "tuple[Bits, Bits] | None" = None  # base bits that passed sha256, and base ^ xor (checked finite)
    scratch: "Bits | None" = None  # a free nnz-sized buffer to gather into

    def bits(self, groups: dict[torch.dtype, torch.Tensor] | None = None) -> "Bits":
        """Bits laid out like `xor` (a new buffer, or `groups`), with each tensor's slice as a ready view."""
        if groups is None:
            groups = {dt: torch.empty_like(x) for dt, x in self.xor.items()}
        return Bits(groups, [groups[e.tp.dtype][e.group_slice()] for e in self.entries])

    def take_scratch(self) -> "Bits":
        out, self.scratch = self.scratch, None
        return out if out is not None else self.bits()


@dataclass
class Bits:
    """nnz-sized bit patterns of a staged patch: one buffer per dtype, and each tensor's slice of it (made once:
    slicing costs a microsecond each)."""

    groups: dict[torch.dtype, torch.Tensor]
    parts: list[torch.Tensor]  # per entry


POOL_LIMIT = 1 << 30  # pinned staging buffers up to this size are kept for the next patch
PARALLEL_BYTES = 32 << 20  # host work on larger patches is spread over threads, one tensor each


def parallel_map(fn, entries: list, nbytes: int) -> list:
    """fn over entries, on a thread pool when the work is large (numpy copies and sha256 release the GIL)."""
    workers = min(8, os.cpu_count() or 1, len(entries))
    if nbytes < PARALLEL_BYTES or workers < 2:
        return [fn(e) for e in entries]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, entries))


def _host_buffer(nbytes: int, device: torch.device, pool: dict | None) -> torch.Tensor:
    """A host byte buffer for staging: pinned for CUDA (reused from `pool`, as pinning is slow), plain for CPU."""
    if device.type != "cuda":
        return torch.empty(nbytes, dtype=torch.uint8)
    cached = pool.get("pinned") if pool is not None else None
    if cached is not None and cached.numel() >= nbytes:
        return cached[:nbytes]
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if pool is not None and nbytes <= POOL_LIMIT:
        pool["pinned"] = buf
    return buf


@dataclass
class _Layout:
    """Byte offsets of the packed buffer's sections (see the module docstring)."""

    n_entries: int
    total: int  # nnz of all tensors
    group_nnz: dict[torch.dtype, int]
    index_off: int
    group_off: dict[torch.dtype, int]
    nbytes: int

    @classmethod
    def of(cls, items: list[tuple[str, torch.Tensor, TensorPatch]]) -> "_Layout":
        group_nnz = {dt: sum(tp.nnz for _, _, tp in items if tp.dtype == dt) for dt in GROUP_ORDER}
        index_off = 3 * len(items) * 8
        offset = index_off + sum(group_nnz.values()) * 8
        group_off = {}
        for dt in GROUP_ORDER:
            offset = _align8(offset)
            group_off[dt] = offset
            offset += group_nnz[dt] * BITS_DTYPE[dt].itemsize
        return cls(len(items), sum(group_nnz.values()), group_nnz, index_off, group_off, _align8(offset))

    def header(self, buf):
        return buf[:self.index_off]

    def index(self, buf):
        return buf[self.index_off:self.index_off + self.total * 8]

    def group(self, buf, dt: torch.dtype):
        return buf[self.group_off[dt]:self.group_off[dt] + self.group_nnz[dt] * BITS_DTYPE[dt].itemsize]


def stage(items: list[tuple[str, torch.Tensor, TensorPatch]], device: torch.device, pool: dict | None = None) -> Staged:
    """Pack (name, live tensor, TensorPatch) items into one buffer and move it to `device` in one copy. On CUDA
    the buffer is pinned and reused via `pool`; the copy is complete when this returns."""
    items = sorted(items, key=lambda item: GROUP_ORDER.index(item[2].dtype))  # stable: patch order within a dtype
    layout = _Layout.of(items)
    entries = _place(items)
    buf = _host_buffer(max(layout.nbytes, 8), device, pool)
    _pack(buf.numpy(), layout, entries)
    dev = buf.to(device) if device.type != "cpu" else buf  # the one host-to-device copy
    return _on_device(dev, layout, entries, device)


def _place(items: list[tuple[str, torch.Tensor, TensorPatch]]) -> list[StagedTensor]:
    """Each tensor's offsets into the index buffer and into its dtype's bits buffer."""
    entries, pos, gpos = [], 0, dict.fromkeys(GROUP_ORDER, 0)
    for name, target, tp in items:
        entries.append(StagedTensor(name, target, tp, pos, gpos[tp.dtype], tp.nnz))
        pos += tp.nnz
        gpos[tp.dtype] += tp.nnz
    return entries


def _pack(host: np.ndarray, layout: _Layout, entries: list[StagedTensor]) -> None:
    """Write the header, the indices and the XOR bits into the host buffer."""
    if not entries:
        return
    header = layout.header(host).view(np.int64).reshape(3, layout.n_entries)
    header[0] = [e.index_offset for e in entries]
    header[1] = [e.index_offset + e.nnz - 1 for e in entries]
    header[2] = [e.tp.numel for e in entries]
    index_host = layout.index(host).view(np.int64)
    group_host = {dt: layout.group(host, dt).view(BITS_DTYPE[dt]) for dt in GROUP_ORDER}
    if layout.nbytes >= PARALLEL_BYTES:
        def pack(e: StagedTensor) -> None:
            index_host[e.index_offset:e.index_offset + e.nnz] = e.tp.flat_index
            group_host[e.tp.dtype][e.group_slice()] = e.tp.xor_bits

        parallel_map(pack, entries, layout.nbytes)
        return
    # One numpy call per section: per-tensor calls cost more than the copying on small patches.
    np.concatenate([e.tp.flat_index for e in entries], out=index_host, casting="unsafe")
    for dt in GROUP_ORDER:
        if layout.group_nnz[dt]:
            np.concatenate([e.tp.xor_bits for e in entries if e.tp.dtype == dt], out=group_host[dt], casting="unsafe")


def _on_device(dev: torch.Tensor, layout: _Layout, entries: list[StagedTensor], device: torch.device) -> Staged:
    """Views of the device copy: the index, each dtype's bits, the header, and each tensor's own slices."""
    staged = Staged(device=device, entries=entries, index=layout.index(dev).view(torch.int64), nbytes=layout.nbytes)
    for e in entries:
        e.flat = e.target.detach().view(-1).view(TORCH_BITS_DTYPE[e.target.dtype])
        e.idx = staged.index[e.index_offset:e.index_offset + e.nnz]
        e.data_ptr, e.flat_shape = e.target.data_ptr(), e.target.shape
    for dt in GROUP_ORDER:
        if layout.group_nnz[dt]:
            staged.xor[dt] = layout.group(dev, dt).view(TORCH_BITS_DTYPE[dt])
    if entries:
        staged.starts, staged.lasts, staged.numels = layout.header(dev).view(torch.int64).view(3, layout.n_entries)
    staged.names = tuple(e.name for e in entries)
    staged.host_index = {e.name: np.asarray(e.tp.flat_index) for e in entries}
    staged.data_ptrs = {e.name: e.data_ptr for e in entries}
    return staged


# Exponent masks: a value is finite unless all its exponent bits are set.
EXPONENT_MASK = {torch_dtype(k): v for k, v in dtypes.EXPONENT_MASK.items()}  # core's rule, keyed by torch dtype

# Element-wise work over a whole patch on the CPU goes through numpy: torch's intra-op threads make
# these ops 10-100x slower when the cores are busy (measured on a loaded 2-core machine), numpy's
# single thread does not. On accelerators the same operations run in torch. Tests switch NUMPY_ON_CPU
# off to run the accelerator code path on the CPU.
NUMPY_ON_CPU = True


def _numpy(t: torch.Tensor) -> bool:
    return NUMPY_ON_CPU and t.device.type == "cpu"


def gather(e: StagedTensor, out: torch.Tensor) -> None:
    """out[:] = the live bits at e's indices."""
    # torch on every device: single-threaded index_select is 3x faster than np.take (measured).
    torch.index_select(e.flat, 0, e.idx, out=out)


def scatter(e: StagedTensor, values: torch.Tensor) -> None:
    """The live bits at e's indices = values (an in-place write on a view: the parameter's version counter moves)."""
    e.flat.scatter_(0, e.idx, values)  # 4x faster than numpy fancy assignment and than index_copy_ (measured)


def xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _numpy(a):
        return torch.from_numpy(np.bitwise_xor(a.numpy(), b.numpy()))
    return a ^ b


def all_finite(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | bool:
    """Whether no bit pattern in `bits` (an integer view of `dtype` values) is Inf or NaN."""
    mask = EXPONENT_MASK[dtype]
    if _numpy(bits):
        return not bool(dtypes.nonfinite(bits.numpy().view(BITS_DTYPE[dtype]), dtypes.dtype_name(dtype)).any())
    b = bits.view(TORCH_BITS_DTYPE[dtype])
    return ~((b & _signed(mask, b.dtype)) == _signed(mask, b.dtype)).any()


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if _numpy(a):
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


def all_equal(a: Bits, b: Bits) -> bool:
    """Whether two Bits of one staged patch hold the same bit patterns (one comparison per dtype)."""
    return all(equal(x, b.groups[dt]) for dt, x in a.groups.items())


def _signed(mask: int, dtype: torch.dtype) -> int:
    bits = torch.iinfo(dtype).bits
    return mask - (1 << bits) if mask >= 1 << (bits - 1) else mask


def indices_valid(staged: Staged) -> bool:
    """Every tensor's indices are strictly increasing and inside it (known before any gather: an out-of-range
    index on CUDA is a device assert)."""
    if not staged.entries:
        return True
    if _numpy(staged.index):
        idx, starts = staged.index.numpy(), staged.starts.numpy()
        if np.any(idx[starts] < 0) or np.any(idx[staged.lasts.numpy()] >= staged.numels.numpy()):
            return False
        violation = idx[1:] <= idx[:-1]
        violation[starts[1:] - 1] = False  # a drop from one tensor's last index to the next one's first is fine
        return not bool(violation.any())
    idx = staged.index
    ok = (idx[staged.starts] >= 0).all() & (idx[staged.lasts] < staged.numels).all()
    if idx.numel() > 1:
        violation = idx[1:] <= idx[:-1]
        violation[staged.starts[1:] - 1] = False
        ok &= ~violation.any()
    return bool(ok)
