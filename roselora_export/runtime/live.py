"""Apply and revert patches in place on a live torch model, on any device, exactly.

Usage::

    runtime = PatchRuntime(model)          # one runtime per model
    handle = runtime.apply("edit.patch")   # or a Patch object
    with runtime.serving():                # in the serving thread(s), around each forward/generate
        out = model.generate(...)
    runtime.revert(handle)                 # or runtime.revert() for the most recent
    with runtime.applied(patch): ...       # apply, then revert on exit

Thread-safety: serving code holds `runtime.serving()` around every forward pass (or a whole
`generate`); any number of threads may serve at once. apply/revert check while serving goes on and
hold the lock exclusively only to write the touched elements (CUDA synchronised before and after), so
a forward pass sees the model wholly before or wholly after a patch. apply/revert calls are
serialised; calling them inside `serving()` on the same thread raises RuntimeError. `active` changes
under the same lock as the weights. Writes by anyone else are not covered (revert detects them).

Stacking: every patch must match the sha256 of the live bits it touches (`base_touched_sha256`), so a
patch overlapping an active one is accepted only if built on top of it. A patch reverts only while no
later active patch overlaps it (per element; a tied weight is one tensor under any name).

Re-applying the same loaded Patch object reuses its staging (up to STAGE_CACHE_BYTES in all) while
every touched live tensor is still the one staged. The steps, and the cost (one gather and one scatter
per tensor, each way), are in docs/design.md "The runtime on a live model".
"""
from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.dtypes import nonfinite_message
from ..errors import InputError
from ..patch.model import BITS_DTYPE, DTYPE_NAMES, FORMAT_VERSION, Patch
from ..patch.overlap import holds_base, intersects
from .lock import ServingLock
from .staging import (Bits, Staged, StagedTensor, all_equal, all_finite, gather, indices_valid, parallel_map, scatter,
                      stage, xor)

# Stagings kept for re-applying the same Patch object, in bytes (indices, XOR bits, base/new/scratch bits).
STAGE_CACHE_BYTES = 256 << 20


@dataclass(eq=False)
class _CacheEntry:
    ref: "weakref.ref[Patch]"
    names: tuple  # PatchRuntime._names when staged (refresh() invalidates)
    tensors: list  # (name, TensorPatch, flat_index, xor_bits, base_touched_sha256, dtype, shape), by identity
    staged: Staged
    size: int


@dataclass(eq=False)
class PatchHandle:
    """An applied patch: what `apply` returns and `revert` takes."""

    id: int
    provenance: dict
    source: str | None  # the file it came from, if any
    names: tuple[str, ...]  # live tensor names it touches (canonical for tied weights)
    nnz: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds: stage, check, write, total
    _staged: Staged | None = field(default=None, repr=False)
    _old: Bits | None = field(default=None, repr=False)  # device bits before apply
    _new: Bits | None = field(default=None, repr=False)  # device bits apply wrote
    _host_index: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # for overlap checks
    _overlaps: set[int] = field(default_factory=set, repr=False)  # ids of earlier handles it overlaps
    _data_ptrs: dict[str, int] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"PatchHandle(id={self.id}, tensors={len(self.names)}, nnz={self.nnz}, source={self.source!r})"


def _write(e: StagedTensor, values: torch.Tensor) -> None:
    """The only place weights are written (a function of its own so tests can make it fail)."""
    scatter(e, values)


def _load(patch_or_path) -> tuple[Patch, str | None]:
    if isinstance(patch_or_path, Patch):
        return patch_or_path, None
    if isinstance(patch_or_path, (str, os.PathLike)):
        from ..patch.io import load_patch  # memory-maps the file (safetensors.safe_open) and checks its checksum

        path = os.fspath(patch_or_path)
        if not os.path.isfile(path):
            raise InputError(f"--patch {path}: no such file")
        try:
            return load_patch(path), path
        except InputError:
            raise
        except Exception as err:  # a file the reader chokes on is bad input, not a crash
            raise InputError(f"--patch {path}: not a readable patch file ({type(err).__name__}: {err})") from None
    raise TypeError(f"apply() takes a Patch or a path, not {type(patch_or_path).__name__}")


def _check_config(patch: Patch, model: torch.nn.Module) -> None:
    prov = patch.provenance or {}
    # The patch module records it as base_config_sha256; base_config_fingerprint is accepted too.
    expected = prov.get("base_config_sha256") or prov.get("base_config_fingerprint")
    config = getattr(model, "config", None)
    if not expected or config is None or not hasattr(config, "to_dict"):
        return
    from ..patch.fingerprint import config_fingerprint

    actual = config_fingerprint(config.to_dict())
    if actual != expected:
        base = prov.get("base_model") or "another model"
        raise InputError(f"patch was built for {base} (config fingerprint {expected[:12]}), but the live model's config "
                         f"is {actual[:12]}; apply it to the model it was built from")


class PatchRuntime:
    """Applies and reverts patches on one live model, in place, on the model's own device(s)."""

    # model -> weak reference to its runtime (weak both ways, so neither keeps the other alive)
    _by_model: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()

    def __init__(self, model: torch.nn.Module) -> None:
        ref = PatchRuntime._by_model.get(model)
        other = ref() if ref is not None else None
        if other is not None and other.active:
            raise InputError("this model already has a PatchRuntime with applied patches; use that one "
                             "(two runtimes on one model could not see each other's patches)")
        PatchRuntime._by_model[model] = weakref.ref(self)
        self.model = model
        self.lock = ServingLock()
        self._mutate = threading.RLock()
        self._active: list[PatchHandle] = []
        self._ids = itertools.count(1)
        self._names: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None
        self._pool: dict = {}  # the reusable pinned staging buffer (CUDA)
        self._stage_cache: dict[int, _CacheEntry] = {}  # id(patch) -> its staging, oldest first

    # ---- public API -------------------------------------------------------------------------
    @property
    def active(self) -> list[PatchHandle]:
        """The applied patches, oldest first (each with its provenance)."""
        return list(self._active)

    def serving(self):
        """Context manager for serving threads: no patch is written while any thread is inside."""
        return self.lock.read()

    @contextmanager
    def applied(self, patch_or_path, *, verify: bool = True) -> Iterator[PatchHandle]:
        """Apply a patch for the duration of a `with` block, then revert it."""
        handle = self.apply(patch_or_path, verify=verify)
        try:
            yield handle
        finally:
            self.revert(handle)

    def apply(self, patch_or_path, *, verify: bool = True) -> PatchHandle:
        """Check a patch against the live model, then XOR it in. Returns the handle for `revert`.

        verify=False skips only the sha256 of the touched base bits (host-side hashing, the one
        step that does not run at device speed); bounds, shapes, dtypes and finiteness are always
        checked. Raises InputError, with the model untouched, on any mismatch.
        """
        t0 = time.perf_counter()
        patch, source = _load(patch_or_path)
        with self._mutate:
            return self._apply(patch, source, verify, t0)

    def revert(self, handle: PatchHandle | None = None, *, check: bool = True) -> None:
        """Restore exactly the bits a patch changed (default: the most recent active patch).

        check=True first confirms, on the device, that those elements still hold what the patch
        wrote (refusing to overwrite changes made outside the runtime); it costs one gather.
        """
        with self._mutate:
            if handle is None:
                if not self._active:
                    raise InputError("no patch is applied; nothing to revert")
                handle = self._active[-1]
            if handle not in self._active:
                raise InputError(f"patch #{handle.id} is not applied (already reverted?)")
            later = self.blocking(handle)
            if later is not None:
                raise InputError(f"patch #{handle.id} cannot be reverted while patch #{later.id}, applied later, "
                                 f"overlaps it; revert #{later.id} first")
            self._revert(handle, check, done=lambda: self._active.remove(handle))
            handle._staged = handle._old = handle._new = None  # free the nnz-sized device buffers (unless cached)

    def blocking(self, handle: PatchHandle) -> PatchHandle | None:
        """The first active patch applied after `handle` that overlaps it (revert refuses while one exists)."""
        with self._mutate:
            pos = self._active.index(handle) if handle in self._active else len(self._active)
            return next((later for later in self._active[pos + 1:] if handle.id in later._overlaps), None)

    def commit(self, handle: PatchHandle) -> None:
        """Keep an applied patch for good: its bits stay, its revert state (nnz-sized buffers) is freed,
        and it leaves the active stack, so it can no longer be reverted, block, or be blocked."""
        with self._mutate:
            if handle not in self._active:
                raise InputError(f"patch #{handle.id} is not applied (already reverted?)")
            with self.lock.write():
                self._active.remove(handle)
            for later in self._active:
                later._overlaps.discard(handle.id)
            handle._staged = handle._old = handle._new = None
            handle._host_index = {}

    # ---- apply ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the model's parameter and buffer names (after replacing or re-tying parameters)."""
        live: dict[str, torch.Tensor] = {}
        for name, t in itertools.chain(self.model.named_parameters(remove_duplicate=False),
                                       self.model.named_buffers(remove_duplicate=False)):
            live.setdefault(name, t)
        canonical: dict[str, str] = {}
        first_by_storage: dict[tuple, str] = {}
        for name, t in live.items():
            if t.device.type == "meta":
                canonical[name] = name
                continue
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            canonical[name] = first_by_storage.setdefault(key, name)
        self._names = (live, canonical)

    def _resolve(self, patch: Patch) -> list[tuple[str, torch.Tensor, "object"]]:
        # Walking the module tree costs milliseconds on a 30-layer model, so the name map is cached;
        # it is rebuilt when a patch names a tensor it does not know.
        if self._names is None or any(n not in self._names[0] for n in patch.tensors):
            self.refresh()
        live, canonical = self._names
        prefix = getattr(self.model, "base_model_prefix", "") or ""

        items = []
        seen: dict[str, str] = {}
        for name, tp in patch.tensors.items():
            candidates = (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")) if prefix else (name,)
            found = next((alt for alt in candidates if alt in live), None)
            if found is None:
                raise InputError(f"patch tensor {name} is not in the live model (no parameter or buffer of that name); "
                                 f"is the patch for another model?")
            target = live[found]
            canon = canonical[found]
            if canon in seen:
                raise InputError(f"patch names {seen[canon]} and {name}, which are one tied tensor in the live model; "
                                 f"a tied weight must be patched once")
            seen[canon] = name
            if target.device.type == "meta":
                raise InputError(f"{name} is not loaded (meta device / offloaded); load the model fully before patching")
            if tuple(tp.shape) != tuple(target.shape):
                raise InputError(f"{name}: patch shape {tuple(tp.shape)} does not match the live tensor's "
                                 f"{tuple(target.shape)}; is the patch for another model?")
            if tp.dtype != target.dtype:
                have = DTYPE_NAMES.get(target.dtype, str(target.dtype))
                raise InputError(f"{name}: patch dtype {DTYPE_NAMES.get(tp.dtype, tp.dtype)} does not match the live "
                                 f"model's {have}; load the model in the patch's dtype")
            if tp.dtype not in BITS_DTYPE:
                raise InputError(f"{name}: dtype {tp.dtype} is not supported (fp32, fp16, bf16)")
            if not target.is_contiguous():
                raise InputError(f"{name}: the live tensor is not contiguous, so it cannot be patched in place")
            idx, bits = np.asarray(tp.flat_index), np.asarray(tp.xor_bits)
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise InputError(f"{name}: flat_index must be a 1-D integer array (got {idx.dtype}, {idx.ndim}-D)")
            if bits.shape != idx.shape or bits.dtype.itemsize != BITS_DTYPE[tp.dtype].itemsize:
                raise InputError(f"{name}: xor_bits must be {BITS_DTYPE[tp.dtype]} with one value per index "
                                 f"(got {bits.dtype} x {bits.size} for {idx.size} indices)")
            if idx.size:
                items.append((canon, target, tp))
        return items

    def _bad_index_message(self, staged: Staged) -> str:
        for e in staged.entries:  # slow path, only to name the culprit
            idx = np.asarray(e.tp.flat_index)
            if idx[0] < 0 or idx[-1] >= e.tp.numel or (idx.size > 1 and not np.all(idx[1:] > idx[:-1])):
                return (f"{e.tp.name}: patch indices are out of range for a tensor of {e.tp.numel} elements, "
                        f"or not strictly increasing; the patch is corrupt or for another model")
        return "patch indices are out of range or not strictly increasing"

    def _apply(self, patch: Patch, source: str | None, verify: bool, t0: float) -> PatchHandle:
        if patch.format_version != FORMAT_VERSION:
            raise InputError(f"patch format version {patch.format_version} is not supported (this tool reads "
                             f"version {FORMAT_VERSION})")
        staged = self._staged_for(patch)  # a cached one was checked against this model's config, names and device
        if staged is None:
            _check_config(patch, self.model)
            items = self._resolve(patch)
            devices = {target.device for _, target, _ in items}
            if len(devices) > 1:
                raise InputError("the patch touches tensors on several devices; load the model on one device to patch it")
            staged = stage(items, devices.pop() if devices else torch.device("cpu"), self._pool)
        handle = PatchHandle(id=next(self._ids), provenance=dict(patch.provenance or {}), source=source,
                             names=staged.names, nnz=int(staged.index.numel()))
        handle._host_index, handle._data_ptrs = staged.host_index, staged.data_ptrs  # shared, read-only
        handle._overlaps = self._overlapping(handle)
        t1 = time.perf_counter()

        with torch.no_grad():
            if not staged.indices_checked:
                if not indices_valid(staged):
                    raise InputError(self._bad_index_message(staged))
                staged.indices_checked = True
            current = staged.take_scratch()
            self._gather(staged, current)
            if staged.verified is not None and all_equal(current, staged.verified[0]):
                # The live bits equal bits that already passed the sha256 check (and whose patched values
                # passed the finiteness check) for this very staging: the same checks hold, bit for bit.
                old, new = staged.verified
                staged.scratch = current
            else:
                old = current
                new = staged.bits({dt: xor(bits, staged.xor[dt]) for dt, bits in old.groups.items()})
                if not all(bool(all_finite(bits, dt)) for dt, bits in new.groups.items()):
                    raise InputError(self._nonfinite_message(staged, new))
                if verify:
                    self._check_base(staged, old)
                    staged.verified = (old, new)
            t2 = time.perf_counter()
            self._write_all(staged, new.parts, old.parts, done=lambda: self._active.append(handle))
        t3 = time.perf_counter()
        # Revert state: indices, XOR bits, old and new bits, all nnz-sized and on the device.
        handle._staged, handle._old, handle._new = staged, old, new
        handle.timings = {"stage": t1 - t0, "check": t2 - t1, "write": t3 - t2, "total": t3 - t0}
        self._remember(patch, staged)
        return handle

    def _write_all(self, staged: Staged, values: list[torch.Tensor], previous: list[torch.Tensor],
                   done=None) -> None:
        """Write every tensor's values under the exclusive lock; if any write fails, put `previous` back into
        every tensor started, the failing one included. `done()` runs under the same lock once all succeeded.
        Writes run in reverse order of the gathers, so the first lines written are the last read (in cache)."""
        entries = staged.entries
        with self.lock.write():
            self._sync(staged.device)
            started: list[int] = []
            try:
                for k in range(len(entries) - 1, -1, -1):
                    started.append(k)
                    _write(entries[k], values[k])
                self._sync(staged.device)
            except BaseException:
                for k in started:
                    _write(entries[k], previous[k])
                self._sync(staged.device)
                raise
            if done is not None:
                done()

    # ---- staging cache ----------------------------------------------------------------------
    def _staged_for(self, patch: Patch) -> Staged | None:
        """The cached staging of this very Patch object, while it holds the same TensorPatch objects and arrays
        (not re-read if changed in place) and every touched live tensor is still the one staged."""
        entry = self._stage_cache.get(id(patch))
        if entry is None or entry.ref() is not patch:
            return None
        if self._cache_entry_valid(entry, patch):
            return entry.staged
        self._stage_cache.pop(id(patch), None)  # stale: drop it (it holds views of the old storages)
        return None

    def _cache_entry_valid(self, entry: "_CacheEntry", patch: Patch) -> bool:
        tensors = patch.tensors
        if entry.names is not self._names or len(tensors) != len(entry.tensors):
            return False
        for (name, tp, idx, bits, sha, dtype, shape), (cur_name, cur) in zip(entry.tensors, tensors.items()):
            if (cur is not tp or cur_name != name or cur.flat_index is not idx or cur.xor_bits is not bits
                    or cur.base_touched_sha256 != sha or cur.dtype != dtype or cur.shape != shape):
                return False
        for e in entry.staged.entries:
            t = e.target
            if (t.data_ptr() != e.data_ptr or t.dtype != e.tp.dtype or t.device != entry.staged.device
                    or t.shape != e.flat_shape or not t.is_contiguous()):
                return False
        return True

    def _remember(self, patch: Patch, staged: Staged) -> None:
        """Cache a staging for the next apply of the same Patch object (while it lives, within a byte budget)."""
        key = id(patch)
        entry = self._stage_cache.get(key)
        if entry is not None and entry.staged is staged:
            return
        size = staged.nbytes + 3 * sum(x.numel() * x.element_size() for x in staged.xor.values())
        if size > STAGE_CACHE_BYTES:
            return
        self._stage_cache.pop(key, None)
        # Snapshots (list(...)): `forget` below may remove entries from any thread, at garbage collection.
        entries = list(self._stage_cache.items())  # oldest first
        held = sum(e.size for _, e in entries)
        for old_key, old_entry in entries:
            if size + held <= STAGE_CACHE_BYTES:
                break
            self._stage_cache.pop(old_key, None)
            held -= old_entry.size

        cache = self._stage_cache

        def forget(ref, key=key, cache=cache):  # the patch was garbage-collected
            entry = cache.get(key)
            if entry is not None and entry.ref is ref:
                cache.pop(key, None)

        tensors = [(name, tp, tp.flat_index, tp.xor_bits, tp.base_touched_sha256, tp.dtype, tp.shape)
                   for name, tp in patch.tensors.items()]
        cache[key] = _CacheEntry(weakref.ref(patch, forget), self._names, tensors, staged, size)

    def _gather(self, staged: Staged, out: Bits) -> Bits:
        """The live bits at every touched element into `out` (laid out like staged.xor)."""
        for e, part in zip(staged.entries, out.parts):
            gather(e, part)
        return out

    def _check_base(self, staged: Staged, old: Bits) -> None:
        host = {dt: bits.cpu().numpy() for dt, bits in old.groups.items()}  # nnz-sized, one copy per dtype

        def matches(e: StagedTensor) -> bool:  # the touched-element rule, shared with checkpoints and ONNX
            return holds_base(e.tp, host[e.tp.dtype][e.group_slice()])

        ok = parallel_map(matches, staged.entries, sum(e.nnz for e in staged.entries) * 4)
        for e, good in zip(staged.entries, ok):
            if not good:
                raise InputError(self._mismatch_message(e))

    def _mismatch_message(self, e: StagedTensor) -> str:
        over = [h.id for h in self._active if e.name in h._host_index]
        hint = (f"; it overlaps active patch(es) {', '.join('#%d' % i for i in over)} and was not built on top of them"
                if over else "; the patch is for another model or another version of it")
        return f"{e.tp.name}: the live values at the patch's elements do not match the patch's base fingerprint{hint}"

    def _nonfinite_message(self, staged: Staged, new: Bits) -> str:
        parts = zip(staged.entries, new.parts)
        return nonfinite_message(next((e.tp.name for e, p in parts if not bool(all_finite(p, e.tp.dtype))), "a tensor"))

    def _overlapping(self, handle: PatchHandle) -> set[int]:
        """Ids of the active patches that share an element with `handle`."""
        return {other.id for other in self._active
                if any(name in other._host_index and intersects(idx, other._host_index[name])
                       for name, idx in handle._host_index.items())}

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # ---- revert -----------------------------------------------------------------------------
    def _revert(self, handle: PatchHandle, check: bool, done) -> None:
        staged, old, new = handle._staged, handle._old, handle._new
        if staged is None or not staged.entries:
            with self.lock.write():
                done()
            return
        for e in staged.entries:
            if e.target.data_ptr() != handle._data_ptrs[e.name] or e.target.device != staged.device:
                raise InputError(f"{e.tp.name} was moved or reallocated since patch #{handle.id} was applied; "
                                 f"it cannot be reverted in place")
        t0 = time.perf_counter()
        with torch.no_grad():
            if check:  # the touched elements must still hold what apply wrote (kept as `new`, no XOR here)
                current = staged.take_scratch()
                unchanged = all_equal(self._gather(staged, current), new)
                staged.scratch = current
                if not unchanged:
                    raise InputError(f"the weights patch #{handle.id} touched were changed outside the runtime; "
                                     f"refusing to revert over them")
            t1 = time.perf_counter()
            self._write_all(staged, old.parts, new.parts, done)  # on failure, put back what was there: the patched bits
        handle.timings.update({"revert_check": t1 - t0, "revert_write": time.perf_counter() - t1})
