"""The merge command: its report, and its start-up (it imports only what it needs, and copies shards
while torch is imported; checked in fresh subprocesses, as this test process has everything loaded)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_patch_fixtures import make_adapter, tiny_llama_dir

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("transformers", "peft", "onnx", "onnxruntime", "scipy", "matplotlib")


def _python(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    base = tiny_llama_dir(root / "base", shard_kb=40)
    return root, base, make_adapter(base, root / "adapter")


def test_merge_help_imports_neither_torch_nor_any_heavy_library():
    got = _python(
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from roselora_export.cli import main\n"
        "r = CliRunner().invoke(main, ['merge', '--help'])\n"
        f"print(json.dumps({{'code': r.exit_code, 'loaded': [m for m in ('torch', 'numpy', *{HEAVY!r}) if m in sys.modules]}}))")
    assert got == {"code": 0, "loaded": []}


def test_merge_copies_shards_before_torch_is_imported_and_never_imports_heavy_libraries(dirs, tmp_path):
    _, base, adapter = dirs
    got = _python(
        "import json, sys\n"
        "from roselora_export.checkpoint import copier\n"
        "seen = []\n"
        "init = copier.ShardCopier.__init__\n"
        "def spy(self, *a, **k):\n"
        "    seen.append('torch' in sys.modules)\n"
        "    init(self, *a, **k)\n"
        "copier.ShardCopier.__init__ = spy\n"
        "from roselora_export.cli import main\n"
        "main(['merge', '--base', sys.argv[1], '--adapter', sys.argv[2], '--out', sys.argv[3], '--json'], standalone_mode=False)\n"
        f"print(json.dumps({{'torch_at_copy_start': seen, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))",
        base, adapter, tmp_path / "out")
    assert got == {"torch_at_copy_start": [False], "heavy": []}
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_merge_json_totals_equal_those_of_inspect(dirs, tmp_path):
    from click.testing import CliRunner

    from roselora_export.cli import main
    from roselora_export.patch.inspect import summarize

    _, base, adapter = dirs
    r = CliRunner().invoke(main, ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                                  "--json"])
    assert r.exit_code == 0, r.output
    report, summary = json.loads(r.stdout), summarize(tmp_path / "m.patch.safetensors")
    assert report["total_nnz"] == summary["total_nnz"] > 0
    assert report["file_bytes"] == summary["file_bytes"]
    assert report["bytes_per_nnz"] == pytest.approx(summary["bytes_per_nnz"])


def test_every_command_is_mapped_to_the_module_that_defines_it():
    import roselora_export.cli as cli

    cli._load(*cli._MODULES)
    defined = {name: cmd.callback.__module__.rsplit(".", 1)[-1] for name, cmd in cli.main.commands.items()}
    assert defined == cli._COMMAND_MODULES  # a command missing here would import every module to run


def test_a_library_merge_in_a_fresh_process_leaves_torch_threads_as_they_were(dirs, tmp_path):
    _, base, adapter = dirs
    want = _python("import json, torch; print(json.dumps({'threads': torch.get_num_threads()}))")
    got = _python(
        "import json, sys\n"
        "from roselora_export.checkpoint import merge_checkpoint\n"
        "merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3])\n"
        "import torch\n"
        "print(json.dumps({'threads': torch.get_num_threads()}))",
        base, adapter, tmp_path / "out")
    assert got == want
