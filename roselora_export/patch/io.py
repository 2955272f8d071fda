"""The patch file: encode a Patch into one safetensors file, and read it back with full validation.

The layout is specified byte for byte in docs/format.md; the constants below are its single source.
Every array is plain safetensors (readable with `safetensors.safe_open`); the metadata is JSON
strings in `__metadata__`. Positions are encoded per tensor in whichever of three encodings gives
the smallest file (`rect`: the union of RoseLoRA's row x column rectangles plus a changed-mask;
`csr`: touched rows only; `dense`), the XOR values are split into byte planes (dense, sparse or
omitted), and any array may be stored zlib-deflated. The reader charges everything it allocates to
one budget proportional to the file size, so no hostile header or zlib stream can make it allocate
gigabytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from .model import (
    BITS_DTYPE,
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    FORMAT_VERSION,
    Patch,
    TensorPatch,
)

FORMAT_NAME = "roselora-patch"
MAX_HEADER_BYTES = 64 << 20  # a real header is kilobytes; anything beyond this is refused unread
MAX_NUMEL = 1 << 40  # per tensor; larger shapes are not real model tensors
MAX_NDIM = 8
MAX_RECTS = 1 << 16
ALLOC_FACTOR = 256  # the reader allocates at most this many times the file size, plus ALLOC_SLACK
ALLOC_SLACK = 64 << 20
ELEMENT_COST, CANDIDATE_COST = 24, 16  # bytes the reader charges per stored element / rectangle candidate
UINTS = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8"))
_HEX = set("0123456789abcdef")


# ----------------------------------------------------------------------------- small helpers

def narrow_uint(limit: int) -> np.dtype:
    """The narrowest little-endian unsigned dtype holding every value in [0, limit)."""
    for dt in UINTS:
        if limit <= np.iinfo(dt).max + 1:
            return dt
    raise ValueError(f"{limit} does not fit in 64 bits")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view used for positions: (shape[0], rest) for N-D, one row for 1-D and 0-D tensors."""
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(shape) >= 2:
        return int(shape[0]), (numel // int(shape[0]) if shape[0] else 0)
    return 1, numel


def rect_candidates(rects: list[tuple[np.ndarray, np.ndarray]], ncols: int, *, mask_ok: bool = False) -> np.ndarray:
    """Sorted flat indices of the union of row-set x column-set rectangles.

    mask_ok: the caller holds the whole tensor anyway (merge, encode), so a boolean mask over the rows
    spanned (at most 64 bytes per candidate) may be used instead of sorting; the reader leaves it off
    so that its allocations stay within what it charged per candidate.
    """
    rects = [(r, c) for r, c in rects if r.size and c.size]
    if not rects:
        return np.zeros(0, np.int64)
    total = sum(r.size * c.size for r, c in rects)
    span = (max(int(r.max()) for r, _ in rects) + 1) * ncols
    if (mask_ok and span <= 64 * total and all(int(c.max()) < ncols for _, c in rects)
            and all(int(r.min()) >= 0 and int(c.min()) >= 0 for r, c in rects)):
        # Dense enough: mark a boolean mask and read it back (sorted, no repeats), faster than sorting.
        mask = np.zeros(span, bool)
        grid = mask.reshape(-1, ncols)
        for r, c in rects:
            grid[np.ix_(r, c)] = True
        return np.flatnonzero(mask)
    parts = [np.add.outer(r.astype(np.int64) * ncols, c.astype(np.int64)).ravel() for r, c in rects]
    flat = np.sort(np.concatenate(parts))  # sort + drop repeats: faster than np.unique's hashing here
    return flat[np.concatenate(([True], flat[1:] != flat[:-1]))]


def _packed_size(n: int) -> int:
    return (n + 7) // 8


# ----------------------------------------------------------------------------- encoding

def _encode_planes(xor: np.ndarray, key: str) -> tuple[str, dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """Split XOR values into little-endian byte planes, each dense ('d'), sparse ('s') or zero ('z'),
    concatenated into one U8 array `{key}.v` (one array, not one per plane: each costs header bytes)."""
    modes, parts = [], []
    n = xor.size
    for b in range(xor.dtype.itemsize):
        plane = ((xor >> np.array(8 * b, xor.dtype)) & np.array(0xFF, xor.dtype)).astype(np.uint8)
        nz = plane != 0
        count = int(nz.sum())
        if count == 0:
            modes.append("z")
        elif _packed_size(n) + count < n:
            modes.append("s")
            parts += [np.packbits(nz, bitorder="little"), plane[nz]]
        else:
            modes.append("d")
            parts.append(plane)
    values = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    bounds = tuple(int(x) for x in np.cumsum([p.size for p in parts])[:-1])  # where each plane part starts
    return "".join(modes), {f"{key}.v": values}, {f"{key}.v": bounds}


def _zlib_parts(raw: bytes, bounds: tuple[int, ...]) -> bytes:
    """One zlib stream, with a full flush at each plane boundary so every plane gets its own Huffman
    tables (byte planes have very different statistics). Level 6: level 9 is slower and no smaller here."""
    c = zlib.compressobj(6)
    out, start = [], 0
    for end in (*bounds, len(raw)):
        out.append(c.compress(raw[start:end]))
        out.append(c.flush(zlib.Z_FULL_FLUSH if end < len(raw) else zlib.Z_FINISH))
        start = end
    return b"".join(out)


def _deflate(arrays: dict[str, np.ndarray], bounds: dict[str, tuple[int, ...]] | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Store each array raw, or zlib-compressed under `name.z` when that saves bytes.

    zlib (stdlib) rather than own entropy coding: the byte planes of XOR values and the index
    streams have skewed byte statistics that deflate's Huffman stage captures well.
    """
    stored, dtypes = {}, {}
    for k, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        packed = _zlib_parts(raw, (bounds or {}).get(k, ()))
        if len(packed) + 16 < len(raw):
            stored[k + ".z"] = np.frombuffer(packed, np.uint8)
            dtypes[k.split(".", 1)[1]] = a.dtype.str
        else:
            stored[k] = a
    return stored, dtypes


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    # Each array also costs about 64 bytes of safetensors header; counted so small tensors choose well.
    return sum(a.nbytes + 64 for a in arrays.values())


def _positions_csr(tp: TensorPatch, key: str) -> dict[str, np.ndarray]:
    nrows, ncols = matrix_shape(tp.shape)
    rows = tp.flat_index // max(ncols, 1)
    cols = tp.flat_index - rows * ncols
    starts_at = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))  # rows are sorted
    touched, counts = rows[starts_at], np.diff(np.append(starts_at, rows.size))
    out = {f"{key}.rows": touched.astype(narrow_uint(nrows)), f"{key}.cnt": counts.astype(narrow_uint(ncols + 1))}
    # Column gaps within a row (the first relative to column 0) are narrower than columns on wide rows.
    starts = np.zeros(rows.size, bool)
    starts[0] = True
    starts[1:] = rows[1:] != rows[:-1]
    gaps = cols.copy()
    gaps[~starts] = cols[~starts] - cols[np.flatnonzero(~starts) - 1]
    abs_dt, gap_dt = narrow_uint(ncols), narrow_uint(int(gaps.max()) + 1)
    if gap_dt.itemsize < abs_dt.itemsize:
        out[f"{key}.gap"] = gaps.astype(gap_dt)
    else:
        out[f"{key}.col"] = cols.astype(abs_dt)
    return out


def _positions_rect(tp: TensorPatch, key: str) -> dict[str, np.ndarray] | None:
    rects = [(np.asarray(r), np.asarray(c)) for r, c in (tp.rectangles or []) if len(r) and len(c)]
    if not rects or len(rects) > MAX_RECTS:
        return None
    nrows, ncols = matrix_shape(tp.shape)
    if sum(r.size * c.size for r, c in rects) > 16 * tp.nnz + 1024:
        return None  # far more candidates than changes: a mask would not pay for itself
    cand = rect_candidates(rects, ncols, mask_ok=True)
    pos = np.searchsorted(cand, tp.flat_index)
    if pos.size and (pos.max() >= cand.size or np.any(cand[np.minimum(pos, cand.size - 1)] != tp.flat_index)):
        return None  # some change lies outside the rectangles
    sizes = np.array([[r.size, c.size] for r, c in rects], dtype=np.int64).ravel()
    rect = np.concatenate([[len(rects)], sizes, *[np.sort(r) for r, _ in rects], *[np.sort(c) for _, c in rects]])
    out = {f"{key}.rect": rect.astype(narrow_uint(max(nrows, ncols, len(rects)) + 1))}
    if cand.size != tp.nnz:
        changed = np.zeros(cand.size, bool)
        changed[pos] = True
        holes = np.flatnonzero(~changed)
        holes_arr = holes.astype(narrow_uint(cand.size))
        if holes_arr.nbytes < _packed_size(cand.size):
            out[f"{key}.hole"] = holes_arr
        else:
            out[f"{key}.mask"] = np.packbits(changed, bitorder="little")
    return out


def encode_tensor(tp: TensorPatch, key: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The metadata entry and the arrays for one tensor, in the smallest position encoding."""
    planes, values, bounds = _encode_planes(tp.xor_bits, key)
    sparse_values = (planes, values, _deflate(values, bounds))  # shared by rect and csr: deflated once
    options = []
    rect = _positions_rect(tp, key)
    if rect is not None:
        options.append(("rect", rect, sparse_values))
    options.append(("csr", _positions_csr(tp, key), sparse_values))
    if tp.nnz * 4 >= tp.numel:  # dense can only win at high density; skip building it otherwise
        full = np.zeros(tp.numel, BITS_DTYPE[tp.dtype])
        full[tp.flat_index] = tp.xor_bits
        dplanes, dvalues, dbounds = _encode_planes(full, key)
        options.append(("dense", {}, (dplanes, dvalues, _deflate(dvalues, dbounds))))
    packed = []
    for enc, pos, (planes, vals, (zvals, zvals_dt)) in options:
        # What the reader will charge to its allocation budget for this tensor; compression must not
        # shrink the tensor below its share of that budget (only pathological, constant data would).
        charge = ELEMENT_COST * (tp.numel if enc == "dense" else tp.nnz)
        if enc == "rect":
            m = int(pos[f"{key}.rect"][0])
            charge += CANDIDATE_COST * int(pos[f"{key}.rect"][1:1 + 2 * m].astype(np.int64).reshape(-1, 2).prod(axis=1).sum())
        zpos, zpos_dt = _deflate(pos)
        stored, zdtypes = {**zpos, **zvals}, {**zpos_dt, **zvals_dt}
        if _nbytes(stored) * ALLOC_FACTOR < charge:
            stored, zdtypes = {**pos, **vals}, {}
        packed.append((enc, stored, zdtypes, planes))
    enc, stored, zdtypes, planes = min(packed, key=lambda o: _nbytes(o[1]))
    entry = {
        "key": key,
        "name": tp.name,
        "shape": list(tp.shape),
        "dtype": DTYPE_NAMES[tp.dtype],
        "nnz": tp.nnz,
        "encoding": enc,
        "planes": planes,
        "sha256": {
            "base": tp.base_sha256,
            "patched": tp.patched_sha256,
            "base_touched": tp.base_touched_sha256,
            "patched_touched": tp.patched_touched_sha256,
        },
    }
    if zdtypes:
        entry["zlib"] = zdtypes
    return entry, stored


def _checksum(tensors_json: str, provenance_json: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(tensors_json.encode())
    h.update(b"\n")
    h.update(provenance_json.encode())
    for key in sorted(arrays):
        a = arrays[key]
        h.update(b"\n" + key.encode() + b"\0" + a.dtype.str.encode() + b"\0")
        h.update(np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()


def rekey(encoded: tuple[dict, dict[str, np.ndarray]], key: str) -> tuple[dict, dict[str, np.ndarray]]:
    """An `encode_tensor` result made under another key, renamed to `key` (the bytes do not depend on it)."""
    entry, arrs = encoded
    old = entry["key"]
    if old == key:
        return entry, arrs
    return {**entry, "key": key}, {key + k[len(old):]: a for k, a in arrs.items()}


def encode_patch(patch: Patch, encoded: dict[str, tuple[dict, dict[str, np.ndarray]]] | None = None
                 ) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The __metadata__ and arrays of a patch file (see docs/format.md).

    `encoded`: tensor name -> `encode_tensor(tp, any_key)`, done ahead (merge encodes each tensor in a
    worker thread as soon as it is built); those are renamed to their key here instead of re-encoded.
    """
    entries, arrays = [], {}
    for i, tp in enumerate(patch.tensors.values()):
        if tp.nnz == 0:
            continue
        pre = (encoded or {}).get(tp.name)
        entry, arrs = rekey(pre, str(i)) if pre is not None else encode_tensor(tp, str(i))
        entries.append(entry)
        arrays.update(arrs)
    tensors_json = json.dumps(entries, separators=(",", ":"))
    provenance_json = json.dumps(patch.provenance, separators=(",", ":"), sort_keys=True, default=str)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(patch.format_version),
        "tensors": tensors_json,
        "provenance": provenance_json,
        "checksum": _checksum(tensors_json, provenance_json, arrays),
    }
    return metadata, arrays


def save_patch(patch: Patch, path: str | os.PathLike,
               encoded: dict[str, tuple[dict, dict[str, np.ndarray]]] | None = None) -> Path:
    """Write `patch` to `path` atomically (a temp file beside it, then rename). Returns the path.

    `encoded`: tensors already encoded, as for `encode_patch`."""
    from safetensors.numpy import save

    path = Path(path)
    metadata, arrays = encode_patch(patch, encoded)
    data = save(arrays, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- decoding

class _Bad(Exception):
    """Internal: a validation failure, turned into InputError with the file name."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise _Bad(msg)


class _Store:
    """The file's arrays, decompressing `name.z` on first use, within one allocation budget.

    The budget (ALLOC_FACTOR x the file size, plus ALLOC_SLACK) bounds every byte the decoder allocates:
    decompressed arrays and the per-element work of each tensor are charged to it before they are
    made, so no header claim and no zlib stream can make the reader allocate much more than the
    file's own size.
    """

    def __init__(self, raw: dict[str, np.ndarray], file_bytes: int):
        self.raw = raw
        self.budget = ALLOC_FACTOR * file_bytes + ALLOC_SLACK
        self.used: set[str] = set()
        self.cache: dict[str, np.ndarray] = {}
        self.zdtypes: dict[str, str] = {}  # of the tensor being decoded

    def charge(self, nbytes: int, what: str) -> None:
        _need(nbytes <= self.budget, f"{what} claims far more data than the file holds (corrupt or hostile header)")
        self.budget -= nbytes

    def __contains__(self, key: str) -> bool:
        return key in self.raw or key + ".z" in self.raw

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self.cache:
            return self.cache[key]
        if key in self.raw:
            self.used.add(key)
            a = self.raw[key]
        else:
            _need(key + ".z" in self.raw, f"array {key!r} is missing")
            self.used.add(key + ".z")
            packed = self.raw[key + ".z"]
            field = key.split(".", 1)[1]
            dt = self.zdtypes.get(field)
            _need(packed.dtype == np.uint8 and packed.ndim == 1, f"array {key}.z must be 1-D U8")
            _need(dt in {u.str for u in UINTS}, f"array {key}.z has no valid dtype in the entry's 'zlib' map")
            d = zlib.decompressobj()
            try:
                out = d.decompress(packed.tobytes(), self.budget + 1)
            except zlib.error as err:
                raise _Bad(f"array {key}.z is not valid zlib data ({err})") from None
            _need(len(out) <= self.budget and d.eof and not d.unconsumed_tail and not d.unused_data,
                  f"array {key}.z is truncated, has trailing data, or decompresses past its budget")
            self.charge(len(out), f"array {key}.z")
            _need(len(out) % np.dtype(dt).itemsize == 0, f"array {key}.z does not hold whole {dt} values")
            a = np.frombuffer(out, np.dtype(dt))
        self.cache[key] = a
        return a


def _uint_array(arrays: _Store, key: str, length: int | None = None) -> np.ndarray:
    a = arrays[key]
    _need(a.dtype in UINTS and a.ndim == 1, f"array {key!r} must be a 1-D unsigned integer array")
    if length is not None:
        _need(a.size == length, f"array {key!r} has {a.size} elements, expected {length}")
    return a


def _unpack_mask(arrays: _Store, key: str, n: int) -> np.ndarray:
    m = _uint_array(arrays, key, _packed_size(n))
    _need(m.dtype == np.uint8, f"array {key!r} must be U8")
    bits = np.unpackbits(m, bitorder="little", count=n).astype(bool)
    _need(int(np.unpackbits(m, bitorder="little").sum()) == int(bits.sum()), f"array {key!r} has bits set past its end")
    return bits


def _decode_planes(arrays: _Store, key: str, planes: str, n: int, width: int) -> np.ndarray:
    data = _uint_array(arrays, f"{key}.v")
    _need(data.dtype == np.uint8, f"array {key}.v must be U8")
    out = np.zeros(n, np.dtype(f"<u{width}"))
    pos = 0

    def take(count: int) -> np.ndarray:
        nonlocal pos
        _need(pos + count <= data.size, f"array {key}.v is shorter than its planes need")
        part = data[pos:pos + count]
        pos += count
        return part

    for b, mode in enumerate(planes):
        if mode == "z":
            continue
        if mode == "d":
            plane = take(n)
        else:
            packed = take(_packed_size(n))
            nz = np.unpackbits(packed, bitorder="little", count=n).astype(bool)
            _need(int(np.unpackbits(packed, bitorder="little").sum()) == int(nz.sum()), f"plane {b} mask has bits past its end")
            vals = take(int(nz.sum()))
            _need(bool(np.all(vals != 0)), f"sparse plane {b} stores a zero byte")
            plane = np.zeros(n, np.uint8)
            plane[nz] = vals
        out |= plane.astype(out.dtype) << np.array(8 * b, out.dtype)
    _need(pos == data.size, f"array {key}.v is longer than its planes need")
    return out


def _read_rects(arrays: _Store, key: str, nrows: int, ncols: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rect = _uint_array(arrays, f"{key}.rect").astype(np.int64)
    _need(rect.size >= 1 and 0 < int(rect[0]) <= MAX_RECTS and rect.size >= 1 + 2 * int(rect[0]), "bad rectangle header")
    m = int(rect[0])
    sizes = rect[1:1 + 2 * m].reshape(-1, 2)
    _need(rect.size == 1 + 2 * m + int(sizes.sum()), "rectangle array length does not match its sizes")
    rr = rect[1 + 2 * m:1 + 2 * m + int(sizes[:, 0].sum())]
    rc = rect[1 + 2 * m + int(sizes[:, 0].sum()):]
    _need(rr.size == 0 or int(rr.max()) < nrows, f"rectangle row out of range (rows={nrows})")
    _need(rc.size == 0 or int(rc.max()) < ncols, f"rectangle column out of range (columns={ncols})")
    rects = list(zip(_split(rr, sizes[:, 0]), _split(rc, sizes[:, 1])))
    for i, (r, c) in enumerate(rects):
        _check_increasing(r, f"rectangle {i} rows")
        _check_increasing(c, f"rectangle {i} columns")
    return rects


def _check_increasing(idx: np.ndarray, what: str) -> None:
    _need(idx.size < 2 or bool(np.all(idx[1:] > idx[:-1])), f"{what}: indices are not strictly increasing")


def _split(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    return [flat[offsets[i]:offsets[i + 1]] for i in range(sizes.size)]


def _decode_positions(arrays: _Store, key: str, enc: str, shape, nnz: int) -> np.ndarray | None:
    """Flat indices of the stored values (None for dense: every element)."""
    nrows, ncols = matrix_shape(shape)
    if enc == "dense":
        return None
    if enc == "csr":
        rows = _uint_array(arrays, f"{key}.rows").astype(np.int64)
        cnt = _uint_array(arrays, f"{key}.cnt", rows.size).astype(np.int64)
        _need(rows.size == 0 or int(rows.max()) < nrows, f"row index out of range (rows={nrows})")
        _check_increasing(rows, "touched rows")
        _need(bool(np.all(cnt >= 1)) and bool(np.all(cnt <= ncols)) and int(cnt.sum()) == nnz,
              "row counts do not add up to nnz")
        row_of = np.repeat(rows, cnt)
        starts = np.zeros(nnz, bool)
        starts[np.concatenate(([0], np.cumsum(cnt)[:-1]))] = True
        if f"{key}.gap" in arrays:
            gaps = _uint_array(arrays, f"{key}.gap", nnz).astype(np.int64)
            _need(bool(np.all(gaps[~starts] >= 1)), "column gaps must be positive within a row")
            seg = np.cumsum(starts) - 1
            csum = np.cumsum(gaps)
            before = np.concatenate(([0], csum))[np.flatnonzero(starts)]  # running sum before each row
            cols = csum - before[seg]
        else:
            cols = _uint_array(arrays, f"{key}.col", nnz).astype(np.int64)
        _need(nnz == 0 or int(cols.max()) < ncols, f"column index out of range (columns={ncols})")
        flat = row_of * ncols + cols
        _check_increasing(flat, "columns within a row")
        return flat
    if enc == "rect":
        rects = _read_rects(arrays, key, nrows, ncols)
        total = sum(r.size * c.size for r, c in rects)
        arrays.charge(CANDIDATE_COST * total, "rectangles")  # enumerating candidates: int64 indices, sorted
        cand = rect_candidates(rects, ncols)
        if f"{key}.mask" in arrays:
            flat = cand[_unpack_mask(arrays, f"{key}.mask", cand.size)]
        elif f"{key}.hole" in arrays:
            holes = _uint_array(arrays, f"{key}.hole").astype(np.int64)
            _check_increasing(holes, "holes")
            _need(holes.size == 0 or int(holes.max()) < cand.size, "hole index out of range")
            keep = np.ones(cand.size, bool)
            keep[holes] = False
            flat = cand[keep]
        else:
            flat = cand
        _need(flat.size == nnz, f"positions give {flat.size} elements, metadata says nnz={nnz}")
        return flat
    raise _Bad(f"unknown encoding {enc!r}")


def _is_hex(s, n: int = 64) -> bool:
    return isinstance(s, str) and len(s) == n and set(s) <= _HEX


def decode_tensor(entry, arrays: _Store) -> TensorPatch:
    _need(isinstance(entry, dict), "tensor entry is not an object")
    name = entry.get("name")
    _need(isinstance(name, str) and name != "", "tensor entry without a name")
    try:
        return _decode_tensor(entry, arrays)
    except _Bad as err:
        raise _Bad(f"tensor {name}: {err}") from None


def _decode_tensor(entry: dict, arrays: _Store) -> TensorPatch:
    key, shape, dtype_name, nnz = entry.get("key"), entry.get("shape"), entry.get("dtype"), entry.get("nnz")
    _need(isinstance(key, str) and key.isdigit(), "bad 'key'")
    _need(isinstance(shape, list) and len(shape) <= MAX_NDIM
          and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_NUMEL for d in shape), "bad 'shape'")
    numel = 1
    for d in shape:
        numel *= d
    _need(numel <= MAX_NUMEL, f"shape {shape} is absurdly large")
    _need(dtype_name in DTYPES_BY_NAME, f"dtype {dtype_name!r} is not one of {sorted(DTYPES_BY_NAME)}")
    dtype = DTYPES_BY_NAME[dtype_name]
    _need(isinstance(nnz, int) and not isinstance(nnz, bool) and 1 <= nnz <= numel, f"nnz {nnz!r} is not in [1, {numel}]")
    sha = entry.get("sha256")
    _need(isinstance(sha, dict) and all(_is_hex(sha.get(k)) for k in ("base", "patched", "base_touched", "patched_touched")),
          "fingerprints missing or not sha256 hex")
    zmap = entry.get("zlib", {})
    _need(isinstance(zmap, dict) and all(isinstance(v, str) for v in zmap.values()), "bad 'zlib' map")
    arrays.zdtypes = zmap
    enc, planes = entry.get("encoding"), entry.get("planes")
    width = BITS_DTYPE[dtype].itemsize
    _need(isinstance(planes, str) and len(planes) == width and set(planes) <= set("zds"),
          f"'planes' must be {width} characters of z/d/s")
    _need(planes != "z" * width, "all value planes are empty (a patch changes every element it stores)")
    n = numel if enc == "dense" else nnz
    arrays.charge(ELEMENT_COST * n, "the tensor's element count")  # flat indices, values and temporaries
    flat = _decode_positions(arrays, key, enc, tuple(shape), nnz)
    xor = _decode_planes(arrays, key, planes, n, width)
    if flat is None:
        flat = np.flatnonzero(xor).astype(np.int64)
        xor = xor[flat]
        _need(flat.size == nnz, f"dense values change {flat.size} elements, metadata says nnz={nnz}")
    else:
        _need(bool(np.all(xor != 0)), "a stored element does not change (zero XOR)")
    rects = _read_rects(arrays, key, *matrix_shape(tuple(shape))) if enc == "rect" else None
    return TensorPatch(
        name=entry["name"],
        shape=tuple(shape),
        dtype=dtype,
        flat_index=flat.astype(np.int64),
        xor_bits=xor.astype(BITS_DTYPE[dtype]),
        base_sha256=sha["base"],
        patched_sha256=sha["patched"],
        base_touched_sha256=sha["base_touched"],
        patched_touched_sha256=sha["patched_touched"],
        rectangles=rects,
    )


def _read_header_len(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise InputError(f"{path}: truncated patch file ({size} bytes); re-download or re-create it")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise InputError(f"{path}: header claims {n} bytes (limit {MAX_HEADER_BYTES}); the file is corrupt or not a patch")
    if n > size - 8:
        raise InputError(f"{path}: truncated patch file (header claims {n} bytes, file has {size}); re-download or re-create it")
    return n


def load_patch(path: str | os.PathLike) -> Patch:
    """Read and validate a patch file; any defect raises InputError naming the file and the problem."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such patch file")
    _read_header_len(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for every kind of malformed file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{path}: not a readable safetensors patch ({first}); the file is truncated or corrupt") from None
    try:
        return _decode(metadata, arrays, path.stat().st_size)
    except _Bad as err:
        raise InputError(f"{path}: {err}") from None
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError) as err:
        raise InputError(f"{path}: malformed patch ({type(err).__name__}: {err})") from None


def _decode(metadata: dict, arrays: dict[str, np.ndarray], file_bytes: int) -> Patch:
    _need(metadata.get("format") == FORMAT_NAME, f"not a {FORMAT_NAME} file (no format marker in the metadata)")
    version = metadata.get("format_version")
    _need(version == str(FORMAT_VERSION), f"format version {version!r} is not supported (this tool reads {FORMAT_VERSION})")
    tensors_json, provenance_json = metadata.get("tensors"), metadata.get("provenance")
    _need(isinstance(tensors_json, str) and isinstance(provenance_json, str), "metadata lacks 'tensors' or 'provenance'")
    checksum = metadata.get("checksum")
    _need(checksum == _checksum(tensors_json, provenance_json, arrays),
          "checksum mismatch: the file is corrupt (a flipped or truncated byte); re-download or re-create it")
    try:
        entries = json.loads(tensors_json)
        provenance = json.loads(provenance_json)
    except ValueError as err:
        raise _Bad(f"metadata is not valid JSON ({err})") from None
    _need(isinstance(entries, list) and isinstance(provenance, dict), "metadata has the wrong shape")
    patch = Patch(provenance=provenance, format_version=FORMAT_VERSION)
    store = _Store(arrays, file_bytes)
    keys = set()
    for entry in entries:
        tp = decode_tensor(entry, store)
        _need(tp.name not in patch.tensors, f"tensor {tp.name} appears twice")
        _need(entry["key"] not in keys, f"array key {entry['key']} is used twice")
        keys.add(entry["key"])
        patch.tensors[tp.name] = tp
    extra = set(arrays) - store.used
    _need(not extra, f"unexpected arrays {sorted(extra)[:3]}")
    return patch


def file_layout(path: str | os.PathLike) -> dict[str, int]:
    """Bytes per tensor name in a patch file (its arrays plus its share of the header), for `inspect`."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        sizes: dict[str, int] = {}
        for k in f.keys():
            sl = f.get_slice(k)
            shape = sl.get_shape()
            itemsize = {"U8": 1, "U16": 2, "U32": 4, "U64": 8}.get(sl.get_dtype(), 1)
            sizes[k.split(".")[0]] = sizes.get(k.split(".")[0], 0) + int(np.prod(shape, dtype=np.int64)) * itemsize
    entries = json.loads(metadata.get("tensors", "[]"))
    return {e["name"]: sizes.get(e["key"], 0) + len(json.dumps(e, separators=(",", ":"))) for e in entries}
