"""The patch file: encode a Patch into one safetensors file, and read it back with full validation.

The layout is specified byte for byte in docs/format.md; the constants below are its single source:
two U8 streams for the whole patch, `positions` (CSR of the touched rows, delta-encoded varints) and
`values` (byte planes of the XOR bits), each compressed when that is smaller, and JSON in `__metadata__`
saying which tensor owns which part. The reader charges everything it allocates to one budget
proportional to the file size, so no hostile header or stream can make it allocate gigabytes.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import dtypes
from ..core.atomic import atomic_write
from ..core.oserrors import input_error
from ..core.safetensors import parse_header, read_header_bytes
from ..errors import InputError
from .model import BITS_BY_NAME, FORMAT_VERSION, Patch, TensorPatch
from .provenance import provenance_problem

FORMAT_NAME = "roselora-patch"
STREAMS = ("positions", "values")
COLUMNS = ("name", "shape", "dtype", "nnz", "rows", "layout", "sha256_base", "sha256_patched", "sha256_base_touched")
FINGERPRINTS = COLUMNS[-3:]
LAYOUTS = ("sparse", "dense")
CODECS = ("none", "zlib", "xz")
XZ_MAX_RAW = 1 << 20  # xz (LZMA2, preset 6) runs at a few MB/s: used for streams up to this size only
CHUNK_MIN = 256 << 10  # a tensor with this many raw stream bytes deflates its parts as soon as it is encoded
PIECE_LEVEL = 1  # zlib level of a large stream's pieces: 4x faster than level 6, about 5% larger
XZ_MEMLIMIT = 64 << 20  # decoder memory an xz stream may ask for (preset 6 needs about 9 MiB)
MAX_HEADER_BYTES = 16 << 20  # a real header is about 250 bytes per tensor; anything beyond this is refused unread
MAX_TENSORS = 1 << 16  # per patch; counted before any entry is validated
MAX_NUMEL = 1 << 40  # per tensor; larger shapes are not real model tensors
MAX_NDIM = 8
MAX_VARINT_BYTES = 6  # 42 bits: enough for any index below MAX_NUMEL
ALLOC_FACTOR = 256  # the reader allocates at most this many times the file size, plus ALLOC_SLACK
ALLOC_SLACK = 64 << 20
# Bytes the reader charges before decoding: per stored element (flat index, values, temporaries), and per
# number in the positions stream (its decoding); measured peaks were 28-46 bytes per element for real
# layouts and about 110 for the worst (every element its own row: three numbers each).
ELEMENT_COST, NUMBER_COST = 64, 40
DENSE_MIN_DENSITY = 0.25  # below this a tensor is always stored sparse (dense cannot be smaller)


# ----------------------------------------------------------------------------- small helpers

def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view of positions: (shape[0], rest) for N-D, one row for 1-D and 0-D tensors."""
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(shape) >= 2:
        return int(shape[0]), (numel // int(shape[0]) if shape[0] else 0)
    return 1, numel


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of each value (7 bits per byte, low group first, high bit = more follows)."""
    v = np.asarray(values, dtype=np.uint64)
    nbytes = np.ones(v.size, np.int64)
    for k in range(1, 10):  # 10 bytes hold any uint64
        nbytes += v >= np.uint64(1 << (7 * k))
    out = np.empty(int(nbytes.sum()), np.uint8)
    start = np.cumsum(nbytes) - nbytes
    for k in range(int(nbytes.max(initial=0))):
        sel = np.flatnonzero(nbytes > k)
        group = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        out[start[sel] + k] = group | np.where(nbytes[sel] > k + 1, 0x80, 0).astype(np.uint8)
    return out


def varint_decode(stream: np.ndarray, count: int) -> np.ndarray:
    """Exactly `count` varints filling `stream`, as uint64; _Bad on anything else (vectorised, no loop per value)."""
    ends = np.flatnonzero(stream < 0x80)
    _need(ends.size == count, f"the positions stream holds {ends.size} numbers, the tensors' rows and nnz need {count}")
    _need(stream.size == (int(ends[-1]) + 1 if count else 0), "the positions stream has trailing bytes")
    if count == 0:
        return np.zeros(0, np.uint64)
    lengths = np.diff(ends, prepend=-1)
    _need(int(lengths.max()) <= MAX_VARINT_BYTES, f"a number in the positions stream is longer than {MAX_VARINT_BYTES} bytes")
    _need(bool(np.all((stream[ends] != 0) | (lengths == 1))), "a number in the positions stream is not minimally encoded")
    starts = ends - lengths + 1
    # One pass per byte position (at most MAX_VARINT_BYTES): memory per number, not per stream byte.
    out = (stream[starts] & 0x7F).astype(np.uint64)
    for k in range(1, int(lengths.max())):
        longer = np.flatnonzero(lengths > k)
        out[longer] |= (stream[starts[longer] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return out


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _hex(b64: object, what: str) -> str:
    _need(isinstance(b64, str) and len(b64) == 44, f"{what} is not a base64 sha256")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad(f"{what} is not a base64 sha256") from None
    _need(len(raw) == 32 and base64.b64encode(raw).decode() == b64, f"{what} is not a base64 sha256")
    return raw.hex()


def _planes(values: np.ndarray) -> list[np.ndarray]:
    """Little-endian byte planes of unsigned values: plane b is byte b of every value."""
    v = np.ascontiguousarray(values)
    return [np.ascontiguousarray(plane) for plane in v.view(np.uint8).reshape(-1, v.dtype.itemsize).T]


# ----------------------------------------------------------------------------- encoding

@dataclass
class EncodedTensor:
    """One tensor's metadata columns and its parts of the two streams (raw, before compression)."""

    entry: dict
    positions: tuple[np.ndarray, np.ndarray, np.ndarray]  # U8 varints: row gaps, row counts - 1, column gaps
    values: np.ndarray  # XOR bit patterns: nnz of them, or numel when dense
    # Each part (positions 0-2, then value planes 3-6) raw-deflated on its own, for a large patch's zlib
    # stream; made ahead for large tensors, so that merge's worker thread does it while merging goes on.
    deflated: dict[int, bytes] = field(default_factory=dict)

    def parts(self) -> list[np.ndarray]:
        return [*self.positions, *_planes(self.values)]


NO_POSITIONS = (np.zeros(0, np.uint8),) * 3


def _csr_parts(tp: TensorPatch) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """CSR of the touched rows, delta-encoded: each touched row's gap to the previous one, its count of
    changes (a row pointer difference, minus 1), and each change's gap to the previous column in its row."""
    _, ncols = matrix_shape(tp.shape)
    rows, cols = np.divmod(tp.flat_index, max(ncols, 1))
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    touched = rows[starts]
    col_gaps = np.diff(cols, prepend=-1) - 1
    col_gaps[starts] = cols[starts]  # each row's first column counts from column 0
    counts = np.diff(np.append(starts, rows.size))
    parts = varint_encode(np.diff(touched, prepend=-1) - 1), varint_encode(counts - 1), varint_encode(col_gaps)
    return parts, int(touched.size)


def encode_tensor(tp: TensorPatch) -> EncodedTensor:
    """The metadata entry and raw stream parts for one tensor, sparse or dense, whichever is smaller."""
    (positions, rows), values, layout = _csr_parts(tp), tp.xor_bits, "sparse"
    if tp.nnz >= DENSE_MIN_DENSITY * tp.numel:
        dense = np.zeros(tp.numel, tp.bits_dtype)
        dense[tp.flat_index] = tp.xor_bits
        # Compare what each costs after (fast) deflating: a dense tensor's unchanged elements are zeros.
        sparse_size = sum(len(zlib.compress(p.tobytes(), 1)) for p in (*positions, *_planes(values)))
        dense_size = sum(len(zlib.compress(p.tobytes(), 1)) for p in _planes(dense))
        if dense_size < sparse_size:
            positions, rows, values, layout = NO_POSITIONS, 0, dense, "dense"
    fingerprints = map(_b64, (tp.base_sha256, tp.patched_sha256, tp.base_touched_sha256))
    entry = dict(zip(COLUMNS, (tp.name, list(tp.shape), tp.dtype_name, tp.nnz, rows, layout, *fingerprints)))
    enc = EncodedTensor(entry, positions, values)
    if positions[0].size + positions[1].size + positions[2].size + values.nbytes >= CHUNK_MIN:
        enc.deflated = {i: _deflate_part(part) for i, part in enumerate(enc.parts())}
    return enc


def _deflate_part(part: np.ndarray) -> bytes:
    """Raw deflate of one part, ending byte-aligned (full flush) with no final block: such pieces
    concatenate into one valid deflate stream (as pigz does), so they can be made independently."""
    c = zlib.compressobj(PIECE_LEVEL, zlib.DEFLATED, -15)
    return c.compress(part.tobytes()) + c.flush(zlib.Z_FULL_FLUSH)


def _zlib_of_parts(parts: list[np.ndarray], deflated: list[bytes | None]) -> bytes:
    """One zlib stream (RFC 1950) of the parts' concatenation, from pieces deflated ahead where given.

    Kept for merge: it takes the patch's deflate off merge's critical path (10x less CPU, docs/benchmarks.md).
    """
    adler = 1
    pieces = [b"\x78\x01"]  # zlib header: deflate, 32 KiB window, fastest level
    for part, piece in zip(parts, deflated):
        adler = zlib.adler32(part, adler)
        pieces.append(piece if piece is not None else _deflate_part(part))
    pieces.append(zlib.compressobj(PIECE_LEVEL, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # an empty final block
    pieces.append(adler.to_bytes(4, "big"))
    return b"".join(pieces)


def _decode_cost(elements: int, numbers: int, raw_bytes: dict[str, int]) -> int:
    """What the reader charges to its budget for a file: the writer keeps every file within it."""
    return ELEMENT_COST * elements + NUMBER_COST * numbers + sum(raw_bytes.values())


def _compress(parts: list[np.ndarray], deflated: list[bytes | None]) -> tuple[str, bytes]:
    """The stream of the parts, as the smallest of: raw; zlib (level 6); xz (preset 6), for streams up
    to XZ_MAX_RAW only; larger streams get zlib made of per-part pieces, some deflated ahead."""
    raw_size = sum(p.nbytes for p in parts)
    if raw_size > XZ_MAX_RAW:
        packed = _zlib_of_parts(parts, deflated)
        return ("zlib", packed) if len(packed) < raw_size else ("none", b"".join(p.tobytes() for p in parts))
    raw = b"".join(p.tobytes() for p in parts)
    best = ("none", raw)
    if raw:
        import lzma

        options = [("zlib", zlib.compress(raw, 6)),
                   ("xz", lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=6))]
        best = min([best, *options], key=lambda o: len(o[1]))
    return best


def _checksum(tensors_json: str, streams_json: str, provenance_json: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for text in (tensors_json, streams_json, provenance_json):
        h.update(text.encode())
        h.update(b"\n")
    for key in sorted(arrays):
        a = arrays[key]
        h.update(key.encode() + b"\0" + a.dtype.str.encode() + b"\0")
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def encode_patch(patch: Patch, encoded: dict[str, EncodedTensor] | None = None
                 ) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The __metadata__ and arrays of a patch file (see docs/format.md). `encoded`: tensor name ->
    `encode_tensor(tp)` done ahead (merge does it in its worker threads), used instead of encoding again."""
    parts = [(encoded or {}).get(tp.name) or encode_tensor(tp) for tp in patch.tensors.values() if tp.nnz]
    columns = {c: [p.entry[c] for p in parts] for c in COLUMNS}
    # Stream order: positions field by field, values plane by plane; each over all tensors in turn.
    order = {"positions": [(k, i) for i in range(3) for k in range(len(parts))],
             "values": [(k, 3 + b) for b in range(4) for k, p in enumerate(parts) if b < p.values.itemsize]}
    split = [p.parts() for p in parts]
    pieces = {name: ([split[k][i] for k, i in items], [parts[k].deflated.get(i) for k, i in items])
              for name, items in order.items()}
    raw_bytes = {name: sum(a.nbytes for a in arrays) for name, (arrays, _) in pieces.items()}
    with ThreadPoolExecutor(max_workers=len(STREAMS)) as pool:  # zlib and lzma release the GIL
        stored = dict(zip(STREAMS, pool.map(lambda name: _compress(*pieces[name]), STREAMS)))
    elements = sum(p.values.size for p in parts)
    numbers = sum(2 * p.entry["rows"] + (p.entry["nnz"] if p.entry["layout"] == "sparse" else 0) for p in parts)
    if ALLOC_FACTOR * sum(len(b) for _, b in stored.values()) + ALLOC_SLACK < _decode_cost(elements, numbers, raw_bytes):
        # Only pathological data compresses this far.
        stored = {name: ("none", b"".join(a.tobytes() for a in pieces[name][0])) for name in STREAMS}
    streams = {name: {"codec": codec, "raw_bytes": raw_bytes[name]} for name, (codec, _) in stored.items()}
    arrays = {name: np.frombuffer(data, np.uint8) for name, (_, data) in stored.items()}
    tensors_json = json.dumps(columns, separators=(",", ":"))
    streams_json = json.dumps(streams, separators=(",", ":"), sort_keys=True)
    provenance_json = json.dumps(patch.provenance, separators=(",", ":"), sort_keys=True, default=str)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(patch.format_version),
        "tensors": tensors_json,
        "streams": streams_json,
        "provenance": provenance_json,
        "checksum": _checksum(tensors_json, streams_json, provenance_json, arrays),
    }
    return metadata, arrays


def save_patch(patch: Patch, path: str | os.PathLike, encoded: dict[str, EncodedTensor] | None = None) -> Path:
    """Write `patch` to `path` atomically (core.atomic.atomic_write); `encoded` as for `encode_patch`."""
    from safetensors.numpy import save

    path = Path(path)
    metadata, arrays = encode_patch(patch, encoded)
    return atomic_write(path, save(arrays, metadata=metadata))


# ----------------------------------------------------------------------------- decoding

class _Bad(Exception):
    """Internal: a validation failure, turned into InputError with the file name."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise _Bad(msg)


class _Budget:
    """Bytes the reader may still allocate: ALLOC_FACTOR x the file size, plus ALLOC_SLACK; element counts and
    decompressed bytes are charged before they are made."""

    def __init__(self, file_bytes: int):
        self.left = ALLOC_FACTOR * file_bytes + ALLOC_SLACK

    def charge(self, nbytes: int, what: str) -> None:
        _need(nbytes <= self.left, f"{what} claims far more data than the file holds (corrupt or hostile header)")
        self.left -= nbytes


def _decompress(name: str, packed: np.ndarray, codec: object, raw_bytes: object, budget: _Budget) -> np.ndarray:
    _need(codec in CODECS, f"stream {name!r}: codec {codec!r} is not one of {list(CODECS)}")
    _need(isinstance(raw_bytes, int) and not isinstance(raw_bytes, bool) and raw_bytes >= 0,
          f"stream {name!r}: bad 'raw_bytes'")
    if codec == "none":
        _need(packed.size == raw_bytes, f"stream {name!r} has {packed.size} bytes, its metadata says {raw_bytes}")
        return packed
    budget.charge(raw_bytes, f"stream {name!r}")
    data = packed.tobytes()
    if codec == "zlib":
        d, error = zlib.decompressobj(), zlib.error
    else:
        import lzma

        d, error = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT), lzma.LZMAError
    try:
        out = d.decompress(data, raw_bytes + 1)  # at most one byte past the claim: enough to see it lied
    except error as err:
        raise _Bad(f"stream {name!r} is not valid {codec} data ({err})") from None
    done = d.eof and not getattr(d, "unconsumed_tail", b"") and not d.unused_data
    _need(done and len(out) == raw_bytes,
          f"stream {name!r} is truncated, has trailing data, or does not decompress to its {raw_bytes} bytes")
    return np.frombuffer(out, np.uint8)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    numel: int
    dtype_name: str
    nnz: int
    rows: int
    dense: bool
    fingerprints: tuple[str, str, str]

    @property
    def width(self) -> int:
        return BITS_BY_NAME[self.dtype_name].itemsize

    @property
    def stored(self) -> int:  # values in the values stream
        return self.numel if self.dense else self.nnz


def _read_entries(tensors: object) -> list[_Entry]:
    _need(isinstance(tensors, dict) and set(tensors) == set(COLUMNS),
          f"'tensors' must be an object with exactly the columns {list(COLUMNS)}")
    cols = [tensors[c] for c in COLUMNS]
    _need(all(isinstance(c, list) for c in cols) and len({len(c) for c in cols}) == 1,
          "the 'tensors' columns must be lists of one length")
    _need(len(cols[0]) <= MAX_TENSORS, f"lists {len(cols[0])} tensors (limit {MAX_TENSORS}); corrupt or hostile")
    entries, names = [], set()
    for name, shape, dtype_name, nnz, rows, layout, *fps in zip(*cols):
        _need(isinstance(name, str) and name != "", "a tensor without a name")
        try:
            _need(name not in names, "appears twice")
            names.add(name)
            _need(isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_int(d) and 0 <= d <= MAX_NUMEL for d in shape),
                  "bad 'shape'")
            numel = 1
            for d in shape:
                numel *= d
            _need(numel <= MAX_NUMEL, f"shape {shape} is absurdly large")
            _need(isinstance(dtype_name, str) and dtype_name in BITS_BY_NAME,
                  f"dtype {dtype_name!r} is not one of {sorted(BITS_BY_NAME)}")
            _need(_int(nnz) and 1 <= nnz <= numel, f"nnz {nnz!r} is not in [1, {numel}]")
            _need(isinstance(layout, str) and layout in LAYOUTS, f"layout {layout!r} is not one of {list(LAYOUTS)}")
            nrows = matrix_shape(tuple(shape))[0]
            _need(_int(rows) and (rows == 0 if layout == "dense" else 1 <= rows <= min(nnz, nrows)),
                  f"rows {rows!r} is not in [1, min(nnz, {nrows})] (0 for dense)")
            hexes = tuple(_hex(fp, col) for fp, col in zip(fps, FINGERPRINTS))
        except _Bad as err:
            raise _Bad(f"tensor {name}: {err}") from None
        entries.append(_Entry(name, tuple(shape), numel, dtype_name, nnz, rows, layout == "dense", hexes))
    return entries


def _split_positions(entries: list[_Entry], stream: np.ndarray) -> dict[str, np.ndarray]:
    """Flat indices of each sparse tensor, from the varint stream: all row gaps, all counts, all column gaps."""
    sparse = [e for e in entries if not e.dense]
    n_rows, n_nnz = sum(e.rows for e in sparse), sum(e.nnz for e in sparse)
    numbers = varint_decode(stream, 2 * n_rows + n_nnz).astype(np.int64)  # each < 2^42: no sign trouble
    row_gaps, counts, col_gaps = numbers[:n_rows], numbers[n_rows:2 * n_rows] + 1, numbers[2 * n_rows:]
    out, r0, c0 = {}, 0, 0
    for e in sparse:
        nrows, ncols = matrix_shape(e.shape)
        g, cnt, cg = row_gaps[r0:r0 + e.rows], counts[r0:r0 + e.rows], col_gaps[c0:c0 + e.nnz]
        r0, c0 = r0 + e.rows, c0 + e.nnz
        # Every gap is below 2^42 and there are at most 2^40 of them: a float sum rules out int64 overflow.
        _need(float(cnt.sum(dtype=np.float64)) == e.nnz, f"tensor {e.name}: its rows' counts do not add up to nnz={e.nnz}")
        _need(float(g.sum(dtype=np.float64)) + e.rows <= nrows, f"tensor {e.name}: row index out of range (it has {nrows} rows)")
        rows = np.cumsum(g + 1) - 1
        starts = np.cumsum(cnt) - cnt  # where each row's columns begin
        _need(float(cg.max()) < ncols, f"tensor {e.name}: column index out of range (it has {ncols} columns)")
        steps = cg + 1
        steps[starts] = cg[starts]  # a row's first column counts from 0
        run = np.cumsum(steps)
        cols = run - np.repeat(run[starts] - cg[starts], cnt)
        # Wrapped int64 sums (hostile gaps) show up as negative or too large columns.
        _need(int(cols.min()) >= 0 and int(cols.max()) < ncols, f"tensor {e.name}: column index out of range (it has {ncols} columns)")
        out[e.name] = np.repeat(rows, cnt) * ncols + cols
    return out


def _split_values(entries: list[_Entry], stream: np.ndarray) -> dict[str, np.ndarray]:
    """Each tensor's XOR values, reassembled from the byte planes (plane 0 of all tensors, then plane 1, ...)."""
    values = {e.name: np.zeros(e.stored, np.dtype(f"<u{e.width}")) for e in entries}
    pos = 0
    for b in range(4):
        for e in entries:
            if b < e.width:
                plane = stream[pos:pos + e.stored]
                pos += e.stored
                values[e.name] |= plane.astype(values[e.name].dtype) << np.array(8 * b, values[e.name].dtype)
    return values


def _decode(metadata: dict, arrays: dict[str, np.ndarray], file_bytes: int) -> Patch:
    _need(metadata.get("format") == FORMAT_NAME, f"not a patch file (not a {FORMAT_NAME} file: no format marker in the metadata)")
    version = metadata.get("format_version")
    _need(version == str(FORMAT_VERSION),
          f"format version {version!r} is not supported (this tool reads {FORMAT_VERSION}); "
          "re-create the patch with this version of roselora-export")
    texts = [metadata.get(k) for k in ("tensors", "streams", "provenance")]
    _need(all(isinstance(t, str) for t in texts), "metadata lacks 'tensors', 'streams' or 'provenance'")
    _need(metadata.get("checksum") == _checksum(*texts, arrays),
          "checksum mismatch: the file is corrupt (a flipped or truncated byte); re-download or re-create it")
    try:
        tensors, streams, provenance = (json.loads(t) for t in texts)
    except ValueError as err:
        raise _Bad(f"metadata is not valid JSON ({err})") from None
    _need(isinstance(provenance, dict), "'provenance' is not an object")
    problem = provenance_problem(provenance)
    _need(problem is None, f"{problem}; the patch is corrupt or was not written by roselora-export")
    _need(isinstance(streams, dict) and set(streams) == set(STREAMS)
          and all(isinstance(s, dict) and set(s) == {"codec", "raw_bytes"} for s in streams.values()),
          f"'streams' must describe exactly {list(STREAMS)} by codec and raw_bytes")
    _need(set(arrays) == set(STREAMS), f"the file must hold exactly the arrays {list(STREAMS)}, not {sorted(arrays)[:4]}")
    _need(all(a.dtype == np.uint8 and a.ndim == 1 for a in arrays.values()), "arrays must be 1-D U8")
    entries = _read_entries(tensors)
    numbers = sum(2 * e.rows + e.nnz for e in entries if not e.dense)
    budget = _Budget(file_bytes)
    budget.charge(_decode_cost(sum(e.stored for e in entries), numbers, {}), "the tensors' element counts")
    _need(streams["values"]["raw_bytes"] == sum(e.stored * e.width for e in entries),
          "the values stream's size does not match the tensors' element counts")
    pos_bytes = streams["positions"]["raw_bytes"]
    # Checked before decompressing: a stream claiming more bytes than its numbers can use is refused unread.
    _need(_int(pos_bytes) and numbers <= pos_bytes <= MAX_VARINT_BYTES * numbers,
          f"the positions stream's size ({pos_bytes!r} bytes) cannot hold the {numbers} numbers the tensors need")
    raw = {n: _decompress(n, arrays[n], streams[n]["codec"], streams[n]["raw_bytes"], budget) for n in STREAMS}
    positions = _split_positions(entries, raw["positions"])
    values = _split_values(entries, raw["values"])
    patch = Patch(provenance=provenance, format_version=FORMAT_VERSION)
    for e in entries:
        xor = values[e.name]
        if e.dense:
            flat = np.flatnonzero(xor).astype(np.int64)
            xor = xor[flat]
            _need(flat.size == e.nnz, f"tensor {e.name}: dense values change {flat.size} elements, metadata says nnz={e.nnz}")
        else:
            flat = positions[e.name]
            _need(bool(np.all(xor != 0)), f"tensor {e.name}: a stored element does not change (zero XOR)")
        patch.tensors[e.name] = TensorPatch(
            name=e.name, shape=e.shape, dtype_name=e.dtype_name, flat_index=flat,
            xor_bits=xor.astype(BITS_BY_NAME[e.dtype_name], copy=False),
            base_sha256=e.fingerprints[0], patched_sha256=e.fingerprints[1], base_touched_sha256=e.fingerprints[2],
        )
    return patch


def check_patch_bytes(path: Path) -> None:
    """InputError "not a patch file" when the bytes after the 8-byte header length do not open a JSON
    object: no safetensors file at all (a .jsonl, a config, any text). Shorter files are left to the
    header reader, which calls them truncated."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise input_error(err, f"reading {path}") from None
    if len(head) == 9 and head[8:9] != b"{":
        raise InputError(f"{path}: not a patch file (not safetensors; patches are what merge, diff and combine write)")


def _read_file(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The patch file's __metadata__ and arrays, through the one safetensors header reader (core)."""
    if not path.is_file():
        raise InputError(f"{path}: no such patch file")
    check_patch_bytes(path)
    raw, size = read_header_bytes(path, MAX_HEADER_BYTES, "patch file")
    header = parse_header(path, raw, size)
    if len(header.tensors) > len(STREAMS):
        raise InputError(f"{path}: not a patch file (a safetensors file with {len(header.tensors)} arrays; "
                         f"a patch holds exactly {list(STREAMS)})")
    arrays = {}
    try:
        with open(path, "rb") as f:
            for name, info in header.tensors.items():
                f.seek(info.start)
                data = f.read(info.nbytes)
                if len(data) != info.nbytes:
                    raise InputError(f"{path}: truncated while reading {name}; the file is truncated or corrupt")
                arrays[name] = np.frombuffer(data, dtypes.NUMPY[info.dtype]).reshape(info.shape)
    except OSError as err:
        raise input_error(err, f"reading {path}") from None
    return header.metadata or {}, arrays


def load_patch(path: str | os.PathLike) -> Patch:
    """Read and validate a patch file; any defect raises InputError naming the file and the problem."""
    path = Path(path)
    metadata, arrays = _read_file(path)
    try:
        return _decode(metadata, arrays, path.stat().st_size)
    except _Bad as err:
        raise InputError(f"{path}: {err}") from None
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError) as err:
        raise InputError(f"{path}: malformed patch ({type(err).__name__}: {err})") from None


def file_layout(path: str | os.PathLike, patch: Patch | None = None) -> dict[str, dict]:
    """Per tensor: its layout and the file bytes attributed to it, for `inspect`: its metadata columns plus its
    share of each compressed stream, in proportion to its part of the raw stream."""
    path = Path(path)
    metadata, arrays = _read_file(path)
    patch = patch or load_patch(path)
    tensors = json.loads(metadata["tensors"])
    streams = json.loads(metadata["streams"])
    ratio = {n: arrays[n].size / streams[n]["raw_bytes"] if streams[n]["raw_bytes"] else 0.0 for n in STREAMS}
    out = {}
    for i, name in enumerate(tensors["name"]):
        tp = patch.tensors[name]
        dense = tensors["layout"][i] == "dense"
        pos_raw = 0 if dense else sum(part.size for part in _csr_parts(tp)[0])
        val_raw = (tp.numel if dense else tp.nnz) * tp.xor_bits.itemsize
        meta = sum(len(json.dumps(tensors[c][i], separators=(",", ":"))) + 1 for c in COLUMNS)
        out[name] = {"layout": tensors["layout"][i],
                     "bytes": round(meta + pos_raw * ratio["positions"] + val_raw * ratio["values"])}
    return out
