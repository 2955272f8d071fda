"""CLI commands for patches on safetensors checkpoints: merge, diff, apply (and revert), inspect."""
from __future__ import annotations

import contextlib
import functools
import json
import shutil
from pathlib import Path

import click

from ..errors import InputError
from . import main


def _os_errors(fn):
    """A command whose stray OSError (disk full, read-only filesystem, I/O error) ends as one `error:` line."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as err:
            from ..core.oserrors import input_error

            raise input_error(err, fn.__name__.removesuffix("_command")) from None
    return run


def _lock_timeout(fn):
    """Add --lock-timeout: how long to wait for a directory another process is applying a patch to in place."""
    @click.option("--lock-timeout", "lock_timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                  help="Wait at most this long for a model directory that another process is updating (or "
                       "reading); the wait is announced on stderr.  [default: no limit]")
    @functools.wraps(fn)
    def run(*args, lock_timeout=None, **kwargs):
        from ..core.atomic import lock_timeout_default

        with lock_timeout_default(lock_timeout):
            return fn(*args, **kwargs)
    return run

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


@contextlib.contextmanager
def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


def _onnx_apply(base: Path, patches, out: Path | None, *, revert: bool = False, in_place: bool = False,
                base_model: str | None = None, sources: list | None = None, check: bool = False) -> dict:
    try:
        from ..onnx import patching
        from ..onnx.mapping import apply_mapped, map_onnx
        from ..onnx.names import NAMES_FILE
    except ImportError:
        raise InputError(f"{base} is an ONNX artifact but ONNX patching is not available in this build") from None
    if base_model is None or (base / NAMES_FILE).is_file():  # sources: the patch files, for the ledger
        kw = {"sources": sources, "check": True} if check else {"sources": sources} if sources else {}
        return patching.apply_to_onnx_dir(base, patches, out, revert=revert, in_place=in_place, **kw)
    if check:  # mapped in memory: --check writes no names.json either
        return patching.apply_to_onnx_dir(base, patches, out, revert=revert, names=map_onnx(base_model, base)[0],
                                          sources=sources, check=True)
    return apply_mapped(base, patches, out, base_model=base_model, revert=revert, in_place=in_place)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@main.command("merge")
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False), help="Base model directory (safetensors, sharded or not).")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(file_okay=False),
              help="PEFT LoRA adapter dir (RoseLoRA or dense) or an ft-l output dir (ft_l.safetensors).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="New directory for the merged model (must not exist or be empty).")
@click.option("--patch", "patch_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the patch.  [default: OUT.patch.safetensors beside OUT]")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Store the merged model in this dtype (the patch is relative to the base in it).  [default: keep the base's]")
@click.option("--onnx", "onnx_dir", type=click.Path(file_okay=False), default=None,
              help="Also patch this ONNX artifact (from export-onnx) into OUT/onnx.")
@click.option("--check", is_flag=True, help="Validate the adapter against the base (shapes, NaN/Inf, ledger, "
              "destinations, --onnx) and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (files, sizes, edit survival) as JSON.")
@_lock_timeout
@_os_errors
def merge_command(base_dir, adapter_dir, out_dir, patch_path, dtype, onnx_dir, check, as_json) -> None:
    """Merge an adapter into a base model: writes a complete model directory and the sparse patch.

    Streams shard by shard (memory about one tensor plus the adapter), keeps the base's sharding,
    index, config and tokenizer files, and keeps tied weights tied. Reports how much of the edit
    survives rounding into the stored dtype, and warns when most of it is rounded away. A base with
    a ledger (a patched directory) passes it on, with the new patch added.
    """
    from ..checkpoint import merge_checkpoint, open_model_dir  # neither imports torch, nor does the merge

    if check:
        from ..checkpoint.merge_check import check_merge

        report, patch = check_merge(base_dir, adapter_dir, out_dir, dtype=dtype, patch_path=patch_path)
        if onnx_dir is not None:  # the artifact must take the patch, as merge --onnx would apply it
            from ..onnx.names import open_artifact
            from ..onnx.patching import plan_patches

            touched = plan_patches(open_artifact(onnx_dir), [patch])
            report["onnx"] = {"initializers": len(touched),
                              "elements": sum(int(t.positions.size) for t in touched.values())}
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo(f"check passed: would write {report['out']} and {report['patch']} ({report['tensors']} tensors, "
                       f"{report['total_nnz']} nonzeros); nothing written")
        return

    if onnx_dir:  # fail on a bad ONNX directory before writing anything
        from ..onnx.names import open_artifact

        open_artifact(onnx_dir)
    total = open_model_dir(base_dir).total_bytes
    with _progress(total, "merge") as update:
        res = merge_checkpoint(base_dir, adapter_dir, out_dir, dtype=dtype, patch_path=patch_path, progress=update)
    try:
        onnx_report = (_onnx_apply(Path(onnx_dir), [res.patch], Path(out_dir) / "onnx", sources=[res.patch_path])
                       if onnx_dir else None)
    except InputError:
        # All or nothing: the ONNX step failed (e.g. an artifact of another base), so take back what merge wrote.
        shutil.rmtree(res.out_dir, ignore_errors=True)
        Path(res.patch_path).unlink(missing_ok=True)
        raise
    # The few totals merge prints, taken from the patch in memory (inspect's full summary, with its
    # per-tensor layout read back from the file, cost ~0.1 s here).
    surv, nnz, file_bytes = res.survival, res.patch.total_nnz, Path(res.patch_path).stat().st_size
    value_bytes = sum(tp.nnz * tp.xor_bits.itemsize for tp in res.patch.tensors.values())
    if as_json:
        click.echo(json.dumps({"out": str(res.out_dir), "patch": str(res.patch_path), "file_bytes": file_bytes,
                               "total_nnz": nnz, "bytes_per_nnz": file_bytes / nnz if nnz else 0.0,
                               "edit_survival": surv.to_dict(), "onnx": onnx_report}, indent=2))
    else:
        click.echo(f"wrote {res.out_dir}")
        click.echo(f"wrote {res.patch_path}: {len(res.patch.tensors)} tensors, {nnz} nonzeros, "
                   f"{_fmt_bytes(file_bytes)} ({file_bytes / nnz if nnz else 0.0:.2f} B/nnz, "
                   f"{file_bytes / value_bytes if value_bytes else 0.0:.2f}x the value bytes)")
        click.echo("edit survival (intended nonzeros of the delta that changed no stored value; relative L2 error):")
        worst = sorted(surv.tensors, key=lambda s: s.lost_fraction, reverse=True)
        for s in worst[:10]:
            click.echo(f"  {s.name}: lost {s.lost_nnz}/{s.intended_nnz} ({s.lost_fraction:.1%}), rel L2 err {s.rel_l2_error:.3g}")
        if len(worst) > 10:
            click.echo(f"  ... {len(worst) - 10} more tensors")
        click.echo(f"  total: lost {surv.lost_nnz}/{surv.intended_nnz} ({surv.lost_fraction:.1%}), rel L2 err {surv.rel_l2_error:.3g}")
        if onnx_report:
            click.echo(f"patched ONNX into {onnx_report['out']}: {onnx_report['elements']} elements")
    if surv.mostly_lost:
        click.echo(f"warning: {surv.lost_fraction:.0%} of the edit's nonzeros were rounded away in "
                   f"{dtype or 'the stored dtype'}; the edit may not take effect (merge in fp32, or a larger edit)", err=True)


@main.command("diff")
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False), help="Base model directory.")
@click.option("--target", "target_dir", required=True, type=click.Path(file_okay=False),
              help="Modified model directory with the same keys, shapes and dtypes.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Patch file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_lock_timeout
@_os_errors
def diff_command(base_dir, target_dir, out_file, as_json) -> None:
    """A patch of every element that differs between two checkpoints (bit-exact; revertible).

    Reports density per tensor; a tensor is stored densely when that is smaller, and the report says so.
    """
    from ..checkpoint import diff_checkpoints, open_model_dir
    from ..patch.inspect import summarize

    with _progress(open_model_dir(base_dir).total_bytes, "diff") as update:
        patch = diff_checkpoints(base_dir, target_dir, out_file, progress=update)
    summary = summarize(out_file, patch)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for t in summary["tensors"]:
        note = "  (stored dense: smaller)" if t["layout"] == "dense" else ""
        click.echo(f"  {t['name']}: {t['nnz']} changed, density {t['density']:.3%}, {_fmt_bytes(t['bytes'])}{note}")
    click.echo(f"wrote {out_file}: {len(summary['tensors'])} tensors differ, {summary['total_nnz']} elements, "
               f"{_fmt_bytes(summary['file_bytes'])}")


@main.command("apply")
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint directory, or an ONNX artifact directory (names.json + *.onnx).")
@click.option("--patch", "patch_files", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Patch file; repeat to apply several in order (reverted in reverse order).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="New directory for the result.")
@click.option("--in-place", is_flag=True, help="Modify --base atomically instead (whole old or whole new on any crash).")
@click.option("--revert", is_flag=True, help="Take the patches back out (bit-exact).")
@click.option("--base-model", "base_model", type=click.Path(file_okay=False), default=None,
              help="ONNX --base without names.json: the checkpoint it was built from, mapped on demand (as map-onnx).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="PEM EC public key: every patch must carry a signature (PATCH.sig) by one of these. Repeatable.")
@click.option("--check", is_flag=True, help="Validate everything (fingerprints, overlap, NaN/Inf, ledger, signatures) "
              "and write nothing; --out and --in-place are optional.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_lock_timeout
@_os_errors
def apply_command(base_dir, patch_files, out_dir, in_place, revert, trusted_keys, check, as_json, base_model=None) -> None:
    """Apply (or --revert) patches to a checkpoint or ONNX artifact, bit-exactly.

    Patches made independently on one base stack in any order when they change different elements
    (the rule the live runtime uses); any applied patch reverts while no later patch overlaps it.
    Everything is checked before anything is written; a refusal names the patch file, the tensor and
    the patches it conflicts with. The directory's ledger records each patch (`roselora-export log`).
    """
    from ..onnx.names import is_onnx_dir
    from ..patch import load_patch

    if (check and in_place and out_dir is not None) or (not check and in_place == (out_dir is not None)):
        raise InputError("give exactly one of --out DIR or --in-place")
    if trusted_keys:  # every signature checked before any patch is read
        from ..patch.io import check_patch_bytes
        from ..signing import verify_patch

        for p in patch_files:
            check_patch_bytes(Path(p))  # a .jsonl is "not a patch file" rather than "no signature"
            verify_patch(p, list(trusted_keys))
    patches = [load_patch(p) for p in patch_files]
    base = Path(base_dir)
    if is_onnx_dir(base):  # either marker: an ONNX dir missing names.json gets the ONNX error that names it
        report = _onnx_apply(base, patches, Path(out_dir) if out_dir else None, revert=revert, in_place=in_place,
                             base_model=base_model, sources=list(patch_files), check=check)
    elif base_model is not None:
        raise InputError(f"--base-model is for an ONNX --base; {base} is a checkpoint")
    else:
        from ..checkpoint import apply_to_checkpoint, open_model_dir  # here: an ONNX apply needs none of these

        bar = contextlib.nullcontext() if check else _progress(open_model_dir(base).total_bytes,
                                                               "revert" if revert else "apply")
        with bar as update:
            report = apply_to_checkpoint(base, patches, out_dir, revert=revert, in_place=in_place, progress=update,
                                         sources=list(patch_files), check=check)
    what = f"{len(patches)} patch{'es' if len(patches) != 1 else ''} ({report.get('nnz', report.get('elements'))} elements)"
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif check:
        click.echo(f"check passed: {what} would {'revert' if revert else 'apply'} cleanly to {base}; nothing written")
    else:
        click.echo(f"{'reverted' if revert else 'applied'} {what} -> {report['out']}")


@main.command("inspect")
@click.argument("patch_file", metavar="PATCH_OR_ADAPTER", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema in docs/format.md).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw an overview (every tensor by layer and module) and the changed cells of single matrices, "
                   "coloured by magnitude, into this PNG.")
@click.option("--plot-value", type=click.Choice(["density", "nnz"]), default="density",
              help="What the overview's colour shows.")
@click.option("--limit", type=int, default=12, help="Most single-matrix panels in --plot (each module kind in turn).")
@_os_errors
def inspect_command(patch_file, as_json, plot_path, plot_value, limit) -> None:
    """Explain a patch file (or an adapter directory): where it came from, its settings, and per tensor
    nnz, density, rows and columns touched and bytes; optionally a picture.

    Tensors are listed in layer order. For an adapter directory the counts are of its fp32 delta,
    before rounding into the base's dtype (merge measures that).
    """
    from ..core.atomic import check_disjoint
    from ..patch import load_patch
    from ..patch import inspect as ins

    check_disjoint({"--plot": plot_path}, {"PATCH_FILE": patch_file})  # the picture must not replace the patch
    if ins.is_adapter_dir(patch_file):
        _inspect_adapter(patch_file, as_json, plot_path, plot_value, limit)
        return
    patch = load_patch(ins.check_patch_file(patch_file))
    summary = ins.summarize(patch_file, patch)
    if plot_path:
        ins.plot_sparsity(patch, plot_path, limit=limit, value=plot_value)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{patch_file}: patch format {summary['format_version']}")
    for line in ins.provenance_lines(summary["provenance"]):
        click.echo(line)
    click.echo(f"{'tensor':<48} {'shape':>14} {'dtype':>5} {'nnz':>9} {'density':>8} {'rows':>6} {'cols':>6} {'bytes':>9} layout")
    for t in summary["tensors"]:
        click.echo(f"{ins.fmt_value(t['name'], 48):<48} {'x'.join(map(str, t['shape'])):>14} {t['dtype']:>5} {t['nnz']:>9} "
                   f"{t['density']:>8.3%} {t['rows_touched']:>6} {t['cols_touched']:>6} {t['bytes']:>9} {t['layout']}")
    frac = summary["touched_fraction"]
    click.echo(f"total: {summary['total_nnz']} nonzeros in {len(summary['tensors'])} tensors, {summary['file_bytes']} bytes "
               f"({summary['bytes_per_nnz']:.2f} B/nnz, {summary['bytes_over_value_bytes']:.2f}x value bytes)"
               + (f", {frac:.4%} of the base model touched" if frac is not None else ""))
    if plot_path:
        click.echo(f"wrote {plot_path}")


def _inspect_adapter(adapter_dir, as_json, plot_path, plot_value, limit) -> None:
    from ..patch import inspect as ins

    summary = ins.summarize_adapter(adapter_dir)
    if plot_path:
        patterns, label = ins.adapter_patterns(adapter_dir)
        ins.plot_patterns(patterns, plot_path, magnitude_label=label, limit=limit, value=plot_value)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{adapter_dir}: {summary['method']} adapter directory (not yet merged)")
    for line in ins.provenance_lines({"roselora": summary["settings"], "lora": summary["lora"]} if summary["lora"]
                                     else {"roselora": summary["settings"]}):
        click.echo(line)
    fmt = lambda v, spec="": "-" if v is None else format(v, spec)  # noqa: E731
    click.echo(f"{'tensor':<48} {'shape':>14} {'rank':>4} {'nnz(A)':>7} {'nnz(B)':>7} {'nnz(delta)':>10} {'density':>8} "
               f"{'rows':>6} {'cols':>6} {'max|delta|':>10}")
    for t in summary["tensors"]:
        click.echo(f"{ins.fmt_value(t['name'], 48):<48} {'x'.join(map(str, t['shape'])):>14} {fmt(t['rank']):>4} "
                   f"{fmt(t['nnz_A']):>7} {fmt(t['nnz_B']):>7} {fmt(t['nnz']):>10} {fmt(t['density'], '.3%'):>8} "
                   f"{fmt(t['rows_touched']):>6} {fmt(t['cols_touched']):>6} {fmt(t['max_abs_delta'], '.3g'):>10}")
    click.echo(f"total: {fmt(summary['total_nnz'])} nonzeros of the fp32 delta in {len(summary['tensors'])} tensors")
    if plot_path:
        click.echo(f"wrote {plot_path}")
