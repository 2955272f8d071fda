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


def _write(path, metadata, arrays, *, rechecksum=True):
    if rechecksum:
        metadata = dict(metadata)
        metadata["checksum"] = _checksum(metadata["tensors"], metadata["provenance"], arrays)
    save_file(arrays, str(path), metadata=metadata)
    return path


def _crafted(tmp_path, edit_entry=None, edit_arrays=None):
    """A valid patch file, then the metadata entry of 'w' and/or its arrays changed, with a valid checksum."""
    patch, _ = _patch()
    metadata, arrays = encode_patch(patch)
    entries = json.loads(metadata["tensors"])
    if edit_entry:
        edit_entry(entries[0])
    if edit_arrays:
        edit_arrays(arrays)
    metadata["tensors"] = json.dumps(entries)
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
    i = data.index(b'base\\":\\"') + 12  # inside the hex of the first base fingerprint (JSON in JSON)
    bad = data[:i] + (b"0" if data[i:i + 1] != b"0" else b"1") + data[i + 1:]
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
        e["encoding"] = "dense"
        e["shape"] = [1 << 19, 1 << 19]
    with pytest.raises(InputError, match="dense"):
        load_patch(_crafted(tmp_path, dense))


def test_row_index_out_of_range_is_refused(tmp_path):
    def rows(a):
        a["0.rows"] = a["0.rows"].copy()
        a["0.rows"][-1] = 200
    with pytest.raises(InputError, match="out of range"):
        load_patch(_crafted(tmp_path, edit_arrays=rows))


def test_column_index_out_of_range_is_refused(tmp_path):
    def cols(a):
        key = "0.col" if "0.col" in a else "0.gap"
        a[key] = a[key].copy()
        a[key][-1] = 250
    with pytest.raises(InputError, match="out of range|increasing"):
        load_patch(_crafted(tmp_path, edit_arrays=cols))


def test_columns_not_increasing_within_a_row_are_refused(tmp_path):
    def swap(a):
        key = "0.col" if "0.col" in a else "0.gap"
        a[key] = a[key].copy()
        a[key][[0, 1]] = a[key][[1, 0]]
    with pytest.raises(InputError, match="increasing|positive"):
        load_patch(_crafted(tmp_path, edit_arrays=swap))


def test_unknown_dtype_and_encoding_are_refused(tmp_path):
    with pytest.raises(InputError, match="dtype"):
        load_patch(_crafted(tmp_path, lambda e: e.update(dtype="F64")))
    with pytest.raises(InputError, match="encoding"):
        load_patch(_crafted(tmp_path, lambda e: e.update(encoding="zip")))


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
    except InputError:
        pass


@pytest.mark.timeout(120)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["shape", "nnz", "dtype", "encoding", "planes", "key", "sha256", "name"]),
       value=st.one_of(st.integers(-2, 1 << 62), st.text(max_size=8), st.lists(st.integers(-1, 1 << 40), max_size=4),
                       st.none(), st.booleans(), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)))
def test_fuzzed_metadata_with_valid_checksum_raises_only_input_error(tmp_path, field, value):
    """Metadata lies that pass the checksum must still be caught by validation."""
    try:
        load_patch(_crafted(tmp_path, lambda e: e.update({field: value})))
    except InputError:
        pass


def test_unbacked_huge_claims_are_refused_before_allocating(tmp_path):
    """A header claiming a huge rect tensor with no mask and all-zero value planes: refused, not allocated."""
    def lie(e):
        e["shape"] = [1 << 20, 1 << 20]
        e["nnz"] = 1 << 39
        e["planes"] = "zz"
        e["encoding"] = "rect"
    with pytest.raises(InputError, match="planes"):
        load_patch(_crafted(tmp_path, lie))


def _replace_plane(tmp_path, packed: bytes):
    """Swap tensor 0's value array for a zlib stream (declared as U8 in the entry's 'zlib' map)."""
    def arrays(a):
        for k in [k for k in a if k in ("0.v", "0.v.z")]:
            del a[k]
        a["0.v.z"] = np.frombuffer(packed, np.uint8)
    def entry(e):
        e["zlib"] = {**e.get("zlib", {}), "v": "|u1"}
    return _crafted(tmp_path, entry, arrays)


def test_zlib_bomb_is_refused_within_the_allocation_budget(tmp_path):
    import zlib

    with pytest.raises(InputError, match="budget|claims far more"):
        load_patch(_replace_plane(tmp_path, zlib.compress(b"\0" * (100 << 20), 9)))


def test_invalid_zlib_stream_is_refused(tmp_path):
    with pytest.raises(InputError, match="zlib"):
        load_patch(_replace_plane(tmp_path, b"\x78\x9c not zlib at all"))
