"""Bad patch files: every defect is one InputError, nothing else, without hanging or allocating much."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from roselora_export.errors import InputError
from roselora_export.patch import apply_to_state_dict, load_patch, save_patch, tensor_patch_from_pair
from roselora_export.patch.io import _checksum, encode_patch
from roselora_export.patch.model import Patch


def _patch(dtype=torch.float16) -> tuple[Patch, dict]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(32, 48, generator=g).to(dtype), "v": torch.randn(20, generator=g).to(dtype)}
    target = {"w": base["w"].clone(), "v": base["v"].clone()}
    target["w"][[1, 1, 5, 30], [2, 40, 7, 47]] += 0.5
    target["v"][3] = 9.0
    tensors = {k: tensor_patch_from_pair(k, base[k], target[k]) for k in base}
    return Patch(tensors=tensors, provenance={"kind": "test"}), base


def _write(path, metadata, arrays):
    metadata = dict(metadata)
    metadata["checksum"] = _checksum(metadata["tensors"], metadata["streams"], metadata["provenance"], arrays)
    save_file(arrays, str(path), metadata=metadata)
    return path


def _crafted(tmp_path, edit_entry=None, edit_streams=None):
    """A valid patch file, then tensor 'w''s metadata and/or the raw streams changed, with a valid checksum.

    edit_entry gets 'w''s columns as a dict; edit_streams gets {"positions": bytes, "values": bytes}
    (uncompressed) and may change or replace them; they are stored uncompressed."""
    import lzma
    import zlib

    patch, _ = _patch()
    metadata, arrays = encode_patch(patch)
    columns, streams = json.loads(metadata["tensors"]), json.loads(metadata["streams"])
    if edit_entry:
        row = {c: v[0] for c, v in columns.items()}
        edit_entry(row)
        for c in columns:
            columns[c][0] = row.get(c)
    unpack = {"none": bytes, "zlib": zlib.decompress, "xz": lzma.decompress}
    raw = {k: unpack[streams[k]["codec"]](arrays[k].tobytes()) for k in arrays}
    if edit_streams:
        edit_streams(raw)
        arrays = {k: np.frombuffer(v, np.uint8) for k, v in raw.items()}
        streams = {k: {"codec": "none", "raw_bytes": len(v)} for k, v in raw.items()}
    metadata["tensors"], metadata["streams"] = json.dumps(columns), json.dumps(streams)
    return _write(tmp_path / "bad.safetensors", metadata, arrays)


def _good_file(tmp_path):
    patch, _ = _patch()
    return save_patch(patch, tmp_path / "good.safetensors")


def test_truncated_file_is_refused(tmp_path):
    data = _good_file(tmp_path).read_bytes()
    for cut in (0, 5, 8, 40, len(data) // 2, len(data) - 1):
        (tmp_path / "t.safetensors").write_bytes(data[:cut])
        with pytest.raises(InputError, match="truncated|corrupt|readable"):
            load_patch(tmp_path / "t.safetensors")


def test_flipped_byte_in_the_payload_fails_the_checksum(tmp_path):
    data = bytearray(_good_file(tmp_path).read_bytes())
    data[-3] ^= 0x10
    (tmp_path / "f.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        load_patch(tmp_path / "f.safetensors")


def test_flipped_byte_in_a_fingerprint_fails_the_checksum(tmp_path):
    data = _good_file(tmp_path).read_bytes()
    i = data.index(b"sha256_base") + 20  # inside the base64 of the first base fingerprint (JSON in JSON)
    bad = data[:i] + (b"A" if data[i:i + 1] != b"A" else b"B") + data[i + 1:]
    (tmp_path / "f.safetensors").write_bytes(bad)
    with pytest.raises(InputError, match="checksum"):
        load_patch(tmp_path / "f.safetensors")


def test_absurd_header_length_is_refused_before_reading(tmp_path):
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(InputError, match="header"):
        load_patch(tmp_path / "h.safetensors")


def test_absurd_shape_and_nnz_claims_are_refused(tmp_path):
    def huge(e):
        e["shape"] = [1 << 30, 1 << 30]
        e["nnz"] = 1 << 50
    with pytest.raises(InputError, match="absurd|nnz|shape"):
        load_patch(_crafted(tmp_path, huge))


def test_absurd_dense_claim_is_refused_without_allocating(tmp_path):
    def dense(e):
        e["layout"] = "dense"
        e["rows"] = 0
        e["shape"] = [1 << 19, 1 << 19]
    with pytest.raises(InputError, match="claims far more"):
        load_patch(_crafted(tmp_path, dense))


def _positions(edit):
    """A streams edit: replace the positions stream by `edit` (bytes), or by `edit(gaps)` re-encoded as varints."""
    from roselora_export.patch.io import varint_decode, varint_encode

    def streams(raw):
        if callable(edit):
            stream = np.frombuffer(raw["positions"], np.uint8)
            gaps = varint_decode(stream, int((stream < 0x80).sum())).tolist()
            raw["positions"] = varint_encode(np.array(edit(gaps), np.uint64)).tobytes()
        else:
            raw["positions"] = edit
    return streams


def _numbers(edit):
    """A streams edit: the positions stream's numbers (row gaps, counts - 1, column gaps) edited, re-encoded."""
    from roselora_export.patch.io import varint_decode, varint_encode

    def streams(raw):
        stream = np.frombuffer(raw["positions"], np.uint8)
        numbers = varint_decode(stream, int((stream < 0x80).sum())).tolist()
        raw["positions"] = varint_encode(np.array(edit(numbers), np.uint64)).tobytes()
    return streams


# _patch(): 'w' (32 x 48) changes rows 1, 5, 30 (counts 2, 1, 1); 'v' (one row of 20) changes column 3.
# Positions stream: row gaps [1, 3, 24, 0], counts - 1 [1, 0, 0, 0], column gaps [2, 37, 7, 47, 3].
def test_row_index_out_of_range_is_refused(tmp_path):
    def far(n):
        n[2] = 99
        return n
    with pytest.raises(InputError, match="w: row index out of range"):
        load_patch(_crafted(tmp_path, edit_streams=_numbers(far)))


def test_column_index_out_of_range_is_refused(tmp_path):
    def far(n):
        n[9] = 48
        return n
    with pytest.raises(InputError, match="w: column index out of range"):
        load_patch(_crafted(tmp_path, edit_streams=_numbers(far)))


def test_columns_past_the_end_of_their_row_are_refused(tmp_path):
    def past(n):
        n[8], n[9] = 30, 30  # row 1: columns 30, then 30 + 30 + 1 = 61; each gap alone is below 48
        return n
    with pytest.raises(InputError, match="w: column index out of range"):
        load_patch(_crafted(tmp_path, edit_streams=_numbers(past)))


def test_row_counts_that_disagree_with_nnz_are_refused(tmp_path):
    def more(n):
        n[4] = 2
        return n
    with pytest.raises(InputError, match="w: its rows' counts do not add up"):
        load_patch(_crafted(tmp_path, edit_streams=_numbers(more)))


def test_positions_that_disagree_with_nnz_are_refused(tmp_path):
    with pytest.raises(InputError, match="12 bytes. cannot hold the 13 numbers"):
        load_patch(_crafted(tmp_path, edit_streams=_numbers(lambda n: n[:12])))


@pytest.mark.parametrize("stream, problem", [
    (b"\x01" * 13 + b"\x81", "trailing"),  # thirteen numbers, then half a fourteenth
    (b"\x80\x80\x80\x80\x80\x80\x01" + b"\x00" * 12, "longer than"),  # a 7-byte number
    (b"\x85\x00" + b"\x00" * 12, "minimally"),  # 5 written in two bytes
])
def test_malformed_varints_are_refused(tmp_path, stream, problem):
    with pytest.raises(InputError, match=problem):
        load_patch(_crafted(tmp_path, edit_streams=_positions(stream)))


def test_unknown_dtype_and_encoding_are_refused(tmp_path):
    with pytest.raises(InputError, match="dtype"):
        load_patch(_crafted(tmp_path, lambda e: e.update(dtype="F64")))
    with pytest.raises(InputError, match="layout"):
        load_patch(_crafted(tmp_path, lambda e: e.update(layout="zip")))


def test_not_a_patch_file_is_refused(tmp_path):
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match="not a roselora-patch"):
        load_patch(tmp_path / "model.safetensors")


def test_shape_or_dtype_mismatch_with_the_base_is_refused():
    patch, base = _patch()
    with pytest.raises(InputError, match="w: the patch is for"):
        apply_to_state_dict(patch, {**base, "w": base["w"].float()})
    with pytest.raises(InputError, match="w: the patch is for"):
        apply_to_state_dict(patch, {**base, "w": base["w"][:, :40]})


def test_wrong_base_is_refused_naming_the_tensor():
    patch, base = _patch()
    other = {k: v.clone() for k, v in base.items()}
    other["v"][0] += 1
    with pytest.raises(InputError, match="v: fingerprint mismatch"):
        apply_to_state_dict(patch, other)


def test_patch_that_would_write_nan_is_refused():
    base = {"w": torch.ones(4, 4)}
    tp = tensor_patch_from_pair("w", base["w"], base["w"].clone().index_fill_(0, torch.tensor([0]), float("nan")))
    with pytest.raises(InputError, match="NaN"):
        apply_to_state_dict(Patch(tensors={"w": tp}), base)


def test_diff_with_nan_in_the_target_is_refused():
    from roselora_export.patch import build_patch_from_state_dicts

    base = {"w": torch.ones(4, 4)}
    with pytest.raises(InputError, match="NaN"):
        build_patch_from_state_dicts(base, {"w": torch.full((4, 4), float("inf"))})


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_patch_files_raise_only_input_error(tmp_path, data):
    """Random byte flips, truncations, insertions and header rewrites of a valid file: InputError or a valid patch."""
    if not hasattr(test_fuzzed_patch_files_raise_only_input_error, "_good"):
        patch, _ = _patch(torch.bfloat16)
        test_fuzzed_patch_files_raise_only_input_error._good = save_patch(patch, tmp_path / "g.safetensors").read_bytes()
    good = bytearray(test_fuzzed_patch_files_raise_only_input_error._good)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "header_len", "bytes"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(good) - 1))
            good[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        good = good[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(good)))
        good[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "header_len":
        good[:8] = struct.pack("<Q", data.draw(st.integers(0, (1 << 64) - 1)))
    else:
        good = bytearray(data.draw(st.binary(max_size=64)))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(good))
    try:
        load_patch(path)
    except InputError as err:
        assert "malformed patch" not in str(err), err  # named by a check, not caught as a stray numpy error


@pytest.mark.timeout(120)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["shape", "nnz", "rows", "dtype", "layout", "sha256_base", "sha256_patched", "sha256_base_touched",
                              "name"]),
       value=st.one_of(st.integers(-2, 1 << 62), st.text(max_size=8), st.lists(st.integers(-1, 1 << 40), max_size=4),
                       st.none(), st.booleans(), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)))
def test_fuzzed_metadata_with_valid_checksum_raises_only_input_error(tmp_path, field, value):
    """Metadata lies that pass the checksum must still be caught by validation."""
    try:
        load_patch(_crafted(tmp_path, lambda e: e.update({field: value})))
    except InputError as err:
        assert "malformed patch" not in str(err), err  # named by a check, not caught as a stray numpy error


def test_unbacked_huge_claims_are_refused_before_allocating(tmp_path):
    """A header claiming a huge sparse tensor the streams cannot hold: refused, not allocated."""
    def lie(e):
        e["shape"] = [1 << 20, 1 << 20]
        e["nnz"] = 1 << 39
    with pytest.raises(InputError, match="claims far more"):
        load_patch(_crafted(tmp_path, lie))


def _replace_stream(tmp_path, name: str, codec: str, packed: bytes, raw_bytes: int):
    patch, _ = _patch()
    metadata, arrays = encode_patch(patch)
    streams = json.loads(metadata["streams"])
    streams[name] = {"codec": codec, "raw_bytes": raw_bytes}
    arrays[name] = np.frombuffer(packed, np.uint8)
    metadata["streams"] = json.dumps(streams)
    return _write(tmp_path / "bomb.safetensors", metadata, arrays)


@pytest.mark.parametrize("codec", ["zlib", "xz"])
def test_compression_bomb_is_refused_before_it_is_inflated(tmp_path, codec):
    import lzma
    import zlib

    bomb = (zlib.compress if codec == "zlib" else lzma.compress)(b"\0" * (100 << 20))
    with pytest.raises(InputError, match="cannot hold the 13 numbers"):  # declared honestly: refused unread
        load_patch(_replace_stream(tmp_path, "positions", codec, bomb, 100 << 20))
    with pytest.raises(InputError, match="does not decompress to its 30 bytes"):  # declared small: cut off there
        load_patch(_replace_stream(tmp_path, "positions", codec, bomb, 30))


@pytest.mark.parametrize("codec", ["zlib", "xz"])
def test_invalid_compressed_stream_is_refused(tmp_path, codec):
    with pytest.raises(InputError, match=f"not valid {codec} data"):
        load_patch(_replace_stream(tmp_path, "positions", codec, b"\x78\x9c not compressed at all", 30))


def test_values_stream_of_the_wrong_size_is_refused(tmp_path):
    def shorter(raw):
        raw["values"] = raw["values"][:-2]
    with pytest.raises(InputError, match="values stream's size"):
        load_patch(_crafted(tmp_path, edit_streams=shorter))


def test_stored_zero_value_is_refused(tmp_path):
    def zero(raw):
        raw["values"] = b"\0" + raw["values"][1:5] + b"\0" + raw["values"][6:]  # first value: both planes 0
    with pytest.raises(InputError, match="does not change"):
        load_patch(_crafted(tmp_path, edit_streams=zero))


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(positions=st.one_of(st.binary(max_size=40), st.lists(st.integers(0, 60), max_size=20).map(bytes)),
       values=st.binary(max_size=24))
def test_fuzzed_streams_with_valid_checksum_raise_only_input_error(tmp_path, positions, values):
    """Stream contents that pass the checksum (stored raw) must still be caught by validation, or decode."""
    def replace(raw):
        raw["positions"], raw["values"] = positions, values
    try:
        patch = load_patch(_crafted(tmp_path, edit_streams=replace))
    except InputError as err:
        assert "malformed patch" not in str(err), err  # named by a check, not caught as a stray numpy error
        return
    for tp in patch.tensors.values():  # whatever decodes is a well-formed patch
        assert tp.nnz and np.all(np.diff(tp.flat_index) > 0) and int(tp.flat_index[-1]) < tp.numel
        assert np.all(tp.xor_bits != 0)
