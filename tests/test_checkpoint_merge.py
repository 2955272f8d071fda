"""merge: a complete model directory plus the patch, bit-exact with a dense merge, streaming, tied weights kept."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from roselora_export.checkpoint import fingerprints, load_state_dict, merge_checkpoint, open_model_dir
from roselora_export.errors import InputError
from roselora_export.patch import load_patch
from test_patch_fixtures import DTYPES, make_adapter, needs_mkl, reference_merge, tiny_gpt2_dir, tiny_llama_dir


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = tiny_llama_dir(root / "base", shard_kb=40)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    adapter = make_adapter(base, root / "adapter")
    return root, base, adapter


def _peft_merged(model_dir, adapter_dir, cls="AutoModelForCausalLM"):
    import transformers
    from peft import PeftModel

    model = getattr(transformers, cls).from_pretrained(str(model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().state_dict()


@needs_mkl
def test_fp32_merge_equals_peft_merge_and_unload_bit_for_bit(sharded, tmp_path):
    # The tool computes each fused multiply-add exactly, in k order; MKL's B @ A (what PEFT uses) does the same here.
    _, base, adapter = sharded
    merge_checkpoint(base, adapter, tmp_path / "out")
    got = load_state_dict(tmp_path / "out")
    want = _peft_merged(base, adapter)
    assert all(torch.equal(got[k], want[k]) for k in got)


@needs_mkl
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_merge_in_each_dtype_equals_the_dense_merge_in_that_dtype(sharded, tmp_path, dtype):
    _, base, adapter = sharded
    merge_checkpoint(base, adapter, tmp_path / "out", dtype=DTYPES[dtype])
    got = load_state_dict(tmp_path / "out")
    want = reference_merge(load_state_dict(base), adapter, DTYPES[dtype])
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in got)


def test_merge_keeps_sharding_index_config_and_tokenizer_files(sharded, tmp_path):
    _, base, adapter = sharded
    res = merge_checkpoint(base, adapter, tmp_path / "out", dtype=torch.bfloat16)
    out = tmp_path / "out"
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    # the base's files, plus the ledger recording the merged patch
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in base.iterdir()] + ["roselora-ledger.json"])
    assert (out / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert res.patch_path == tmp_path / "out.patch.safetensors" and res.patch_path.is_file()


@needs_mkl
def test_merged_directory_loads_with_transformers_and_tied_weights_stay_tied(sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    root, base, _ = sharded
    adapter = make_adapter(base, tmp_path / "ad", targets=("q_proj", "lm_head"), seed=3)
    merge_checkpoint(base, adapter, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in open_model_dir(tmp_path / "out").keys()
    peft_sd = _peft_merged(base, adapter)
    assert torch.equal(model.model.embed_tokens.weight, peft_sd["lm_head.weight"])


def test_patch_written_by_merge_reproduces_the_merged_checkpoint(sharded, tmp_path):
    from roselora_export.checkpoint import apply_to_checkpoint

    _, base, adapter = sharded
    res = merge_checkpoint(base, adapter, tmp_path / "merged", patch_path=tmp_path / "p.safetensors")
    apply_to_checkpoint(base, [load_patch(tmp_path / "p.safetensors")], tmp_path / "applied")
    assert fingerprints(tmp_path / "applied") == fingerprints(tmp_path / "merged")
    assert res.patch.provenance["method"] == "roselora"
    assert res.patch.provenance["base_config_sha256"] == open_model_dir(base).fingerprint


@needs_mkl
def test_gpt2_conv1d_fan_in_fan_out_merge_equals_peft(tmp_path):
    base = tiny_gpt2_dir(tmp_path / "gpt2")
    adapter = make_adapter(base, tmp_path / "ad", targets=("c_attn",), fan_in_fan_out=True)
    merge_checkpoint(base, adapter, tmp_path / "out")
    got, want = load_state_dict(tmp_path / "out"), _peft_merged(base, adapter)
    assert all(torch.equal(got[k], want[k]) for k in got if k in want)
    assert not torch.equal(got["transformer.h.0.attn.c_attn.weight"], load_state_dict(base)["transformer.h.0.attn.c_attn.weight"])


@needs_mkl
def test_rank_and_alpha_patterns_and_rslora_scale_like_peft(sharded, tmp_path):
    _, base, _ = sharded
    adapter = make_adapter(base, tmp_path / "ad", r=4, alpha=8, use_rslora=True,
                           rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16})
    merge_checkpoint(base, adapter, tmp_path / "out")
    got, want = load_state_dict(tmp_path / "out"), _peft_merged(base, adapter)
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-7) for k in got)


def test_ft_l_directory_merges_its_new_values(sharded, tmp_path):
    from safetensors.torch import save_file

    _, base, _ = sharded
    sd = load_state_dict(base)
    new = sd["model.layers.1.mlp.down_proj.weight"].clone()
    new[3, :5] += 0.25
    (tmp_path / "ftl").mkdir()
    save_file({"model.layers.1.mlp.down_proj.weight": new}, str(tmp_path / "ftl" / "ft_l.safetensors"))
    (tmp_path / "ftl" / "roselora.json").write_text('{"method": "ft-l"}')
    res = merge_checkpoint(base, tmp_path / "ftl", tmp_path / "out")
    assert torch.equal(load_state_dict(tmp_path / "out")["model.layers.1.mlp.down_proj.weight"], new)
    assert res.patch.total_nnz == 5 and res.patch.provenance["method"] == "ft-l"


def test_survival_report_counts_edits_rounded_away_in_bf16(sharded, tmp_path):
    _, base, _ = sharded
    adapter = make_adapter(base, tmp_path / "ad", scale=3e-3, seed=5)  # RoseLoRA's clamp: tiny deltas
    bf16 = merge_checkpoint(base, adapter, tmp_path / "bf16", dtype=torch.bfloat16).survival
    fp32 = merge_checkpoint(base, adapter, tmp_path / "fp32").survival
    assert bf16.intended_nnz == fp32.intended_nnz > 0
    assert bf16.mostly_lost and bf16.lost_fraction > 0.5
    assert fp32.lost_fraction < 0.05 and fp32.rel_l2_error < 1e-3
    assert bf16.rel_l2_error > fp32.rel_l2_error


def test_merge_refuses_an_existing_nonempty_out_and_writes_nothing(sharded, tmp_path):
    _, base, adapter = sharded
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        merge_checkpoint(base, adapter, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_patch_file_from_merge_equals_a_fresh_encoding_of_its_patch(sharded, tmp_path):
    from roselora_export.patch.io import encode_patch

    _, base, adapter = sharded
    res = merge_checkpoint(base, adapter, tmp_path / "out")
    metadata, arrays = encode_patch(res.patch)  # what save_patch gives without merge's ahead-of-time encoding
    with safe_open(str(res.patch_path), "np") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(arrays)
        assert all(np.array_equal(f.get_tensor(k), a) for k, a in arrays.items())


def test_a_failing_shard_copy_leaves_no_output(sharded, tmp_path, monkeypatch):
    from roselora_export.checkpoint import copier

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(copier, "copy_range", broken)
    _, base, adapter = sharded
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoint(base, adapter, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_background_run_copy_in_apply_leaves_no_output(sharded, tmp_path, monkeypatch):
    from roselora_export.checkpoint import apply_to_checkpoint, safetensors_stream

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    _, base, adapter = sharded
    res = merge_checkpoint(base, adapter, tmp_path / "m")
    monkeypatch.setattr(safetensors_stream.ShardWriter, "copy_run", broken)
    with pytest.raises(OSError, match="disk full"):
        apply_to_checkpoint(base, [res.patch], tmp_path / "applied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.patch.safetensors"]


def test_merged_shards_are_the_base_files_with_only_the_changed_tensors_rewritten(sharded, tmp_path):
    _, base, adapter = sharded
    res = merge_checkpoint(base, adapter, tmp_path / "out")
    model = open_model_dir(base)
    for header in model.shards:
        old, new = header.path.read_bytes(), (tmp_path / "out" / header.path.name).read_bytes()
        assert len(new) == len(old)
        kept = bytearray(old)
        for name, info in header.tensors.items():
            if name in res.patch.tensors:
                assert new[info.start:info.start + info.nbytes] != old[info.start:info.start + info.nbytes]
                kept[info.start:info.start + info.nbytes] = new[info.start:info.start + info.nbytes]
        assert bytes(kept) == new  # the header and every unchanged tensor are the base's bytes
    assert (tmp_path / "out" / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()


def test_adapter_for_another_model_is_refused(sharded, tmp_path):
    _, base, _ = sharded
    gpt2 = tiny_gpt2_dir(tmp_path / "gpt2")
    adapter = make_adapter(gpt2, tmp_path / "ad", targets=("c_attn",), fan_in_fan_out=True)
    with pytest.raises(InputError, match="c_attn"):
        merge_checkpoint(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sequence_classification_adapter_with_modules_to_save_merges_like_peft(tmp_path):
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from tiny_models import save_model_dir, tiny_bert

    save_model_dir(tiny_bert(), tmp_path / "base")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"))
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "ad"))
    res = merge_checkpoint(tmp_path / "base", tmp_path / "ad", tmp_path / "out")
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"))
    want = PeftModel.from_pretrained(fresh, str(tmp_path / "ad")).merge_and_unload().state_dict()
    got = load_state_dict(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) for k in got if k in want)
    assert {"classifier.weight", "classifier.bias"} <= set(res.patch.tensors)
    assert res.patch.provenance["method"] == "lora"


def test_a_tensor_read_from_a_shard_can_be_modified_without_changing_the_file(sharded):
    model = open_model_dir(sharded[1])
    name = model.keys()[0]
    header = model.locations[name][0]
    before, want = header.path.read_bytes(), model.read(name).clone()
    t = model.read(name)
    t.add_(1.0)
    assert header.path.read_bytes() == before
    assert torch.equal(model.read(name), want) and not torch.equal(t, want)


def test_a_misaligned_tensor_is_read_correctly(tmp_path):
    from roselora_export.checkpoint.safetensors_stream import read_array, read_header, read_tensor

    values = torch.arange(6, dtype=torch.float32)
    header = json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x07" + values.numpy().tobytes())
    h = read_header(path)
    assert torch.equal(read_tensor(h.tensors["b"], path=path), values.reshape(2, 3))
    assert read_tensor(h.tensors["a"], path=path).tolist() == [7]
    assert np.array_equal(read_array(h.tensors["b"], path=path).view(np.float32), values.numpy().ravel())


def test_merge_in_a_process_that_has_torch_leaves_its_gc_and_torch_threads_as_they_were(sharded, tmp_path):
    import gc

    _, base, adapter = sharded
    frozen = gc.get_freeze_count()
    torch.set_num_threads(2)
    merge_checkpoint(base, adapter, tmp_path / "out")
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    assert torch.get_num_threads() == 2


def test_the_shard_copier_copies_the_expected_tensors_nobody_wrote(sharded, tmp_path):
    from roselora_export.checkpoint.copier import ShardCopier

    model = open_model_dir(sharded[1])
    expected = [k for k in model.keys() if k.endswith(("q_proj.weight", "v_proj.weight"))]
    copier = ShardCopier(model, tmp_path, expected=expected)
    try:
        copier.finish()
    finally:
        copier.close()
    for header in model.shards:
        assert (tmp_path / header.path.name).read_bytes() == header.path.read_bytes()


@pytest.mark.parametrize("guess", ["none", "every tensor"])
def test_a_wrong_guess_of_the_changed_tensors_still_gives_the_exact_merge(sharded, tmp_path, monkeypatch, guess):
    from roselora_export.checkpoint import merge as merge_module

    _, base, adapter = sharded
    want = merge_checkpoint(base, adapter, tmp_path / "want")
    monkeypatch.setattr(merge_module, "guess_changed", lambda a, model: [] if guess == "none" else model.keys())
    got = merge_checkpoint(base, adapter, tmp_path / "got")
    assert fingerprints(tmp_path / "got") == fingerprints(tmp_path / "want")
    assert {k: (t.base_sha256, t.patched_sha256) for k, t in got.patch.tensors.items()} == \
        {k: (t.base_sha256, t.patched_sha256) for k, t in want.patch.tensors.items()}


def test_the_guess_of_changed_tensors_names_the_adapted_weights(sharded):
    from roselora_export.checkpoint.copier import guess_changed

    _, base, adapter = sharded
    model = open_model_dir(base)
    assert guess_changed(adapter, model) == [k for k in model.keys() if k.endswith(("q_proj.weight", "v_proj.weight"))]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # refused with its one-line error, and no numpy warning
def test_a_merge_that_would_write_inf_is_refused_and_leaves_nothing(sharded, tmp_path):
    from safetensors.torch import save_file

    _, base, _ = sharded
    new = load_state_dict(base)["model.layers.1.mlp.down_proj.weight"].clone()
    new[0, 0] = float("inf")
    (tmp_path / "ftl").mkdir()
    save_file({"model.layers.1.mlp.down_proj.weight": new}, str(tmp_path / "ftl" / "ft_l.safetensors"))
    with pytest.raises(InputError, match="NaN or Inf"):
        merge_checkpoint(base, tmp_path / "ftl", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ftl"]


def test_a_dtype_given_by_name_merges_as_the_torch_dtype_does(sharded, tmp_path):
    _, base, adapter = sharded
    merge_checkpoint(base, adapter, tmp_path / "named", dtype="bf16")
    merge_checkpoint(base, adapter, tmp_path / "torch", dtype=torch.bfloat16)
    assert fingerprints(tmp_path / "named") == fingerprints(tmp_path / "torch")
    assert {v.dtype for v in load_state_dict(tmp_path / "named").values() if v.is_floating_point()} == {torch.bfloat16}


def test_an_unknown_dtype_name_is_refused_before_anything_is_written(sharded, tmp_path):
    _, base, adapter = sharded
    with pytest.raises(InputError, match="fp32, fp16, bf16"):
        merge_checkpoint(base, adapter, tmp_path / "out", dtype="fp8")
    assert list(tmp_path.iterdir()) == []


def test_tensors_are_read_without_mapping_where_files_cannot_be_mapped(sharded, monkeypatch):
    from roselora_export.checkpoint import safetensors_stream

    model = open_model_dir(sharded[1])
    want = {k: model.read(k).clone() for k in model.keys()}

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(safetensors_stream.mmap, "mmap", no_mmap)
    assert all(torch.equal(model.read(k), want[k]) for k in model.keys())
    assert all(np.array_equal(model.read_array(k).view(np.float32), want[k].numpy().ravel()) for k in model.keys())


def test_tensors_of_other_dtypes_beside_the_lora_factors_are_ignored(sharded, tmp_path):
    # PEFT may save frozen copies (any dtype) next to the factors; only the factors are read.
    import shutil

    from safetensors.torch import load_file, save_file

    _, base, adapter = sharded
    extra = tmp_path / "adapter"
    shutil.copytree(adapter, extra)
    tensors = load_file(str(extra / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.base_layer.steps"] = torch.arange(4, dtype=torch.int64)
    save_file(tensors, str(extra / "adapter_model.safetensors"))
    merge_checkpoint(base, adapter, tmp_path / "a")
    merge_checkpoint(base, extra, tmp_path / "b")
    assert fingerprints(tmp_path / "a") == fingerprints(tmp_path / "b")


@pytest.mark.parametrize("bad", ["width", "count", "byte order"])
def test_a_produced_bit_array_that_is_not_the_declared_tensor_is_refused(bad):
    from roselora_export.checkpoint.rewrite import _check_produced
    from roselora_export.checkpoint.safetensors_stream import OutTensor, TensorInfo

    info, out = TensorInfo("w", "F32", (2, 4), 0, 32), OutTensor("w", "F32", (2, 4), 32)
    _check_produced(info, out, np.zeros(8, np.uint32))  # the right one passes
    wrong = {"width": np.zeros(16, np.uint16), "count": np.zeros(4, np.float64), "byte order": np.zeros(8, ">u4")}[bad]
    with pytest.raises(RuntimeError, match="w: produced"):
        _check_produced(info, out, wrong)
