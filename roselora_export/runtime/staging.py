"""Stage a patch on the device: one packed host buffer (pinned on CUDA), one host-to-device copy.

Layout of the packed buffer (all sections 8-byte aligned, so each can be viewed in place):

    starts int64[E] | lasts int64[E] | lows int64[E] | highs int64[E] | index int64[total nnz]
    | xor bits of the fp32 tensors | of the fp16 tensors | of the bf16 tensors

E is the number of tensors, staged in dtype order (fp32, fp16, bf16), so the indices and bits of one
dtype are contiguous. The small header lets the device check bounds and ordering of every tensor's
indices in a constant number of vectorised operations, before anything is gathered.

One operation per dtype, not per tensor: the touched tensors of one dtype are usually separate
allocations (no shared torch storage), so each dtype gets a "span", a flat view of the address range
from its lowest to its highest touched tensor, and each tensor's indices are staged relative to the
span (flat index + the tensor's element offset from the span's start). A gather or scatter of the whole
dtype is then one index_select / scatter_. The span is a view that owns nothing; the staged tensors'
own views keep every touched storage alive, and only elements inside them are ever indexed (the
indices are checked against each tensor's own range first). Where a span cannot be made (a device
other than CPU or CUDA, a tensor not aligned to its element size, overlapping tensors, or a torch
without the constructor) that dtype falls back to one operation per tensor on its own flat view.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.autograd.graph import increment_version

from ..core import dtypes
from ..core.dtypes import torch_dtype
from ..patch.model import BITS_DTYPE, TORCH_BITS_DTYPE, TensorPatch

GROUP_ORDER = (torch.float32, torch.float16, torch.bfloat16)

# One index_select / scatter_ per dtype over a span (see the module docstring) instead of one per tensor.
# Tests switch it off to run the per-tensor path.
BATCH_ACROSS_TENSORS = True
SPAN_DEVICES = ("cpu", "cuda")  # devices whose data_ptr is a plain address in one address space


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
    data_ptr: int = 0  # the target's address and shape when staged: a cached staging is reused only while
    flat_shape: tuple = ()  # they hold (see PatchRuntime._staged_for)
    span_offset: int = 0  # elements from its dtype's span start to this tensor (0 without a span)

    def group_slice(self) -> slice:
        return slice(self.bits_offset, self.bits_offset + self.nnz)


@dataclass
class Unit:
    """One gather/scatter: `base` (a span or one tensor's flat view) at `idx`, into/from bits[dtype][bits]."""

    base: torch.Tensor
    idx: torch.Tensor  # int64 slice of Staged.index
    dtype: torch.dtype
    bits: slice  # into the dtype's bits buffer
    entries: list[StagedTensor]


@dataclass
class Staged:
    """A patch's indices and XOR bits on one device, plus the header used for validation."""

    device: torch.device
    entries: list[StagedTensor]
    index: torch.Tensor  # int64[total nnz], on device (span-relative where the dtype has a span)
    xor: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # float dtype -> int bits, on device
    units: list[Unit] = field(default_factory=list)  # the gathers/scatters of one pass, in order
    starts: torch.Tensor | None = None
    lasts: torch.Tensor | None = None
    lows: torch.Tensor | None = None  # each tensor's valid index range in Staged.index: [low, high)
    highs: torch.Tensor | None = None
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
        """Bits laid out like `xor` (a new buffer, or `groups`), with each tensor's and unit's slice as a ready view."""
        if groups is None:
            groups = {dt: torch.empty_like(x) for dt, x in self.xor.items()}
        return Bits(groups, [groups[e.tp.dtype][e.group_slice()] for e in self.entries],
                    [groups[u.dtype][u.bits] for u in self.units])

    def take_scratch(self) -> "Bits":
        out, self.scratch = self.scratch, None
        return out if out is not None else self.bits()


@dataclass
class Bits:
    """nnz-sized bit patterns of a staged patch: one buffer per dtype, each tensor's slice, each unit's slice.

    The slices are made once (not per apply/revert): slicing costs a microsecond each.
    """

    groups: dict[torch.dtype, torch.Tensor]
    parts: list[torch.Tensor]  # per entry
    units: list[torch.Tensor]  # per Staged.units


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


def _span_layout(entries: list[StagedTensor], device: torch.device) -> tuple[int, int] | None:
    """(start address, element count) of a span covering these same-dtype tensors, or None where one cannot be used."""
    if not BATCH_ACROSS_TENSORS or len(entries) < 2 or device.type not in SPAN_DEVICES \
            or not hasattr(torch._C, "_construct_storage_from_data_pointer"):
        return None
    width = entries[0].target.element_size()
    ranges = sorted((e.target.data_ptr(), e.target.data_ptr() + e.target.numel() * width) for e in entries)
    start = ranges[0][0]
    if any((lo - start) % width for lo, _ in ranges) or any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        return None  # misaligned, or two tensors share memory (one scatter must not write an element twice)
    return start, (max(hi for _, hi in ranges) - start) // width


def _span(start: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D `dtype` tensor over [start, start + numel * width) on `device`; it does not own the memory.

    torch has no public constructor for a view of memory it did not allocate; this is the one its CUDA
    graph trees use (torch._inductor.cudagraph_trees), and it works the same on the CPU.
    """
    width = torch.empty(0, dtype=dtype).element_size()
    storage = torch._C._construct_storage_from_data_pointer(start, device, numel * width)
    span = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, (numel,), (1,))
    if span.data_ptr() != start:
        raise RuntimeError("span view does not start at the requested address")
    return span


def _try_span(start: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    try:
        return _span(start, numel, dtype, device)
    except (RuntimeError, TypeError, ValueError):  # a torch build or device that will not make one: per tensor
        return None


def stage(items: list[tuple[str, torch.Tensor, TensorPatch]], device: torch.device, pool: dict | None = None) -> Staged:
    """Pack (name, live tensor, TensorPatch) items into one buffer and move it to `device` in one copy.

    On CUDA the buffer is pinned and (via `pool`) reused across patches; the copy is complete when
    this returns, so the next patch may overwrite the buffer.
    """
    items = sorted(items, key=lambda item: GROUP_ORDER.index(item[2].dtype))  # stable: patch order within a dtype
    n_entries = len(items)
    total = sum(int(tp.flat_index.size) for _, _, tp in items)
    group_nnz = {dt: sum(int(tp.flat_index.size) for _, _, tp in items if tp.dtype == dt) for dt in GROUP_ORDER}

    offset = 0
    header_off = offset
    offset += 4 * n_entries * 8
    index_off = offset
    offset += total * 8
    group_off: dict[torch.dtype, int] = {}
    for dt in GROUP_ORDER:
        offset = _align8(offset)
        group_off[dt] = offset
        offset += group_nnz[dt] * BITS_DTYPE[dt].itemsize
    nbytes = _align8(offset)

    buf = _host_buffer(max(nbytes, 8), device, pool)
    host = buf.numpy()
    header = host[header_off:index_off].view(np.int64).reshape(4, n_entries) if n_entries else None
    index_host = host[index_off:index_off + total * 8].view(np.int64)
    group_host = {dt: host[group_off[dt]:group_off[dt] + group_nnz[dt] * BITS_DTYPE[dt].itemsize].view(BITS_DTYPE[dt])
                  for dt in GROUP_ORDER}

    entries: list[StagedTensor] = []
    pos = 0
    gpos = dict.fromkeys(GROUP_ORDER, 0)
    for name, target, tp in items:
        n = int(tp.flat_index.size)
        entries.append(StagedTensor(name, target, tp, pos, gpos[tp.dtype], n))
        pos += n
        gpos[tp.dtype] += n
    by_dtype = {dt: [e for e in entries if e.tp.dtype == dt] for dt in GROUP_ORDER}
    spans: dict[torch.dtype, tuple[int, int]] = {}
    for dt, group in by_dtype.items():
        layout = _span_layout(group, device) if group else None
        if layout is not None:
            spans[dt] = layout
            width = group[0].target.element_size()
            for e in group:
                e.span_offset = (e.target.data_ptr() - layout[0]) // width
    for k, e in enumerate(entries):
        header[0, k] = e.index_offset
        header[1, k] = e.index_offset + e.nnz - 1
        header[2, k] = e.span_offset
        header[3, k] = e.span_offset + e.tp.numel

    # Indices are staged relative to their span (wrapping int64 arithmetic: a corrupt index still fails the
    # range check, which is against the tensor's own [span_offset, span_offset + numel)).
    def pack(e: StagedTensor) -> None:
        dst = index_host[e.index_offset:e.index_offset + e.nnz]
        dst[:] = e.tp.flat_index
        if e.span_offset:
            dst += e.span_offset
        group_host[e.tp.dtype][e.group_slice()] = e.tp.xor_bits

    if nbytes >= PARALLEL_BYTES:
        parallel_map(pack, entries, nbytes)
    elif entries:  # one numpy call per section: per-tensor calls cost more than the copying on small patches
        np.concatenate([e.tp.flat_index for e in entries], out=index_host, casting="unsafe")
        if spans:
            index_host += np.repeat(np.array([e.span_offset for e in entries], dtype=np.int64), [e.nnz for e in entries])
        for dt in GROUP_ORDER:
            if group_nnz[dt]:
                np.concatenate([e.tp.xor_bits for e in by_dtype[dt]], out=group_host[dt], casting="unsafe")

    dev = buf.to(device) if device.type != "cpu" else buf  # the one host-to-device copy
    staged = Staged(device=device, entries=entries, index=dev[index_off:index_off + total * 8].view(torch.int64),
                    nbytes=nbytes)
    for e in entries:
        e.flat = e.target.detach().view(-1).view(TORCH_BITS_DTYPE[e.target.dtype])
        e.data_ptr, e.flat_shape = e.target.data_ptr(), e.target.shape
    for dt in GROUP_ORDER:
        group = by_dtype[dt]
        if not group:
            continue
        span = _try_span(*spans[dt], TORCH_BITS_DTYPE[dt], group[0].target.device) if dt in spans else None
        if span is not None:
            first, count = group[0].index_offset, group_nnz[dt]
            staged.units.append(Unit(span, staged.index[first:first + count], dt, slice(0, count), group))
            continue
        for e in group:  # per tensor, on its own flat view: indices relative to the tensor itself
            idx = staged.index[e.index_offset:e.index_offset + e.nnz]
            if e.span_offset:  # a span was planned but could not be made: take the offset back out
                idx = idx - e.span_offset
            staged.units.append(Unit(e.flat, idx, dt, e.group_slice(), [e]))
    staged.names = tuple(e.name for e in entries)
    staged.host_index = {e.name: np.asarray(e.tp.flat_index) for e in entries}
    staged.data_ptrs = {e.name: e.data_ptr for e in entries}
    for dt in GROUP_ORDER:
        if group_nnz[dt]:
            width = BITS_DTYPE[dt].itemsize
            staged.xor[dt] = dev[group_off[dt]:group_off[dt] + group_nnz[dt] * width].view(TORCH_BITS_DTYPE[dt])
    if n_entries:
        hdr = dev[header_off:index_off].view(torch.int64).view(4, n_entries)
        staged.starts, staged.lasts, staged.lows, staged.highs = hdr[0], hdr[1], hdr[2], hdr[3]
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


def gather(u: Unit, out: torch.Tensor) -> None:
    """out[:] = the live bits at u's indices."""
    # torch on every device: single-threaded index_select is 3x faster than np.take (measured).
    torch.index_select(u.base, 0, u.idx, out=out)


def scatter(u: Unit, values: torch.Tensor) -> None:
    """The live bits at u's indices = values."""
    u.base.scatter_(0, u.idx, values)  # 4x faster than numpy fancy assignment and than index_copy_ (measured)
    if len(u.entries) > 1 or u.base is not u.entries[0].flat:
        # A span shares no version counter with the tensors it covers: bump theirs, as an in-place write
        # on each would (autograd then refuses a backward through weights changed since its forward).
        for e in u.entries:
            increment_version(e.target)


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
    """Every tensor's indices are strictly increasing and inside it.

    Must be known (synchronised) before any gather: an out-of-range index on CUDA is a device assert.
    """
    if not staged.entries:
        return True
    if _numpy(staged.index):
        idx, starts = staged.index.numpy(), staged.starts.numpy()
        if np.any(idx[starts] < staged.lows.numpy()) or np.any(idx[staged.lasts.numpy()] >= staged.highs.numpy()):
            return False
        violation = idx[1:] <= idx[:-1]
        violation[starts[1:] - 1] = False  # a drop from one tensor's last index to the next one's first is fine
        return not bool(violation.any())
    idx = staged.index
    ok = (idx[staged.starts] >= staged.lows).all() & (idx[staged.lasts] < staged.highs).all()
    if idx.numel() > 1:
        violation = idx[1:] <= idx[:-1]
        violation[staged.starts[1:] - 1] = False
        ok &= ~violation.any()
    return bool(ok)
