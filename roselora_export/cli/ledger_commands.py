"""CLI commands for stacks of patches: log (a directory's ledger) and combine (fuse disjoint patches)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InputError
from . import main


@main.command("log")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help='Print {"patches": [{"sha256", "nnz", "tensors", "provenance", "applied_at", "file"}, ...]}.')
def log_command(directory, as_json) -> None:
    """The patches applied to a checkpoint or ONNX directory, oldest first (from its ledger)."""
    from ..patch.ledger import read_ledger

    if not Path(directory).is_dir():
        raise InputError(f"{directory}: no such directory")
    ledger = read_ledger(directory)
    if as_json:
        click.echo(json.dumps({"patches": [{"sha256": e.sha256, "nnz": e.nnz, "tensors": e.tensors,
                                            "provenance": e.provenance, "applied_at": e.applied_at, "file": e.file}
                                           for e in ledger.entries]}, indent=2))
        return
    if not ledger.entries:
        click.echo(f"{directory}: no patches recorded (a fresh base, or patched before ledgers were kept)")
        return
    for i, e in enumerate(ledger.entries, 1):
        prov = e.provenance
        what = f"{prov.get('kind', '?')} from {prov.get('source', '?')}"
        click.echo(f"{i:>3}. {e.applied_at}  sha256 {e.sha256[:12]}  {e.nnz} elements in {len(e.tensors)} tensors  "
                   f"{what}" + (f"  ({Path(e.file).name})" if e.file else ""))


@main.command("combine")
@click.argument("patch_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_file", required=True, type=click.Path(dir_okay=False), help="The combined patch file.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), default=None,
              help="The model the patches were made for; needed when two of them change the same tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def combine_command(patch_files, out_file, base_dir, as_json) -> None:
    """Fuse patches that change disjoint elements into one; overlapping patches are refused.

    The result equals applying the parts in any order, and one revert takes them all out.
    """
    from ..checkpoint import open_model_dir
    from ..patch.combine import combine_patches
    from ..patch.io import load_patch, save_patch
    from ..patch.ledger import file_sha256

    if len(patch_files) < 2:
        raise InputError("combine needs at least two patch files")
    out = Path(out_file)
    if any(out.resolve() == Path(p).resolve() for p in patch_files):
        raise InputError(f"-o {out_file} is one of the inputs; choose a new file")
    patches = [load_patch(p) for p in patch_files]
    labels = [Path(p).name for p in patch_files]
    parts = [{"sha256": file_sha256(p), "source": p_.provenance.get("source"), "kind": p_.provenance.get("kind")}
             for p, p_ in zip(patch_files, patches)]
    base = open_model_dir(base_dir) if base_dir is not None else None
    combined = combine_patches(patches, labels, base=base, parts=parts)
    save_patch(combined, out)
    report = {"out": str(out), "patches": len(patches), "tensors": len(combined.tensors),
              "total_nnz": combined.total_nnz}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"wrote {out}: {len(patches)} patches, {combined.total_nnz} elements in "
                   f"{len(combined.tensors)} tensors")
