"""Copy a checkpoint directory's files into a new one in a background thread, without importing torch.

`merge` starts a ShardCopier first: copying the shards is kernel work (copy_file_range, the GIL
released), so it runs on one core while the merge jobs compute the changed tensors on the other,
and then only overwrite those tensors in the copies.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..core.atomic import check_copyable, copy_entry, is_temp_name, opened
from .model_dir import INDEX_NAME, ModelDir
from .safetensors_stream import Header, TensorInfo, copy_range, read_header

COPY_CHUNK = 256 << 20  # a cancel waits for at most one chunk; each chunk is one copy_file_range call
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def guess_changed(adapter_dir: str | os.PathLike, model: ModelDir) -> list[str]:
    """The base tensors an adapter directory probably changes, from its file header alone (no torch): a head
    start for the copier; the adapter reader (`patch.adapter`) decides, so a wrong guess costs only time."""
    path = Path(adapter_dir)
    try:
        if (path / "ft_l.safetensors").is_file():
            keys = list(read_header(path / "ft_l.safetensors").tensors)
        else:
            keys = [m.group(1) + ".weight" for k in read_header(path / "adapter_model.safetensors").tensors
                    if (m := _LORA_KEY.match(k))]
    except Exception:  # noqa: BLE001 - unreadable here: the adapter reader reports it properly
        return []
    return [k for k in dict.fromkeys(keys) if k in model.locations]


def _side_files(model: ModelDir) -> list[Path]:
    """Config, tokenizer and everything else beside the weights: not a shard, the index or a temporary of ours."""
    skip = {h.path.name for h in model.shards} | {INDEX_NAME}
    return [p for p in sorted(model.path.iterdir()) if p.name not in skip and not is_temp_name(p.name)]


def check_side_files(model: ModelDir) -> None:
    """Refuse a FIFO, socket or device beside the weights before any copying starts (InputError)."""
    for p in _side_files(model):
        check_copyable(p)


def copy_side_files(model: ModelDir, dest: Path, dtype_name: str | None = None, *, link: bool = False) -> None:
    """Config, tokenizer and everything else that is not a weight shard or the index. dtype_name ("bfloat16",
    ...): the new checkpoint's dtype, written into config.json; None copies config.json as it is."""
    for p in _side_files(model):
        if p.name == "config.json" and dtype_name is not None:
            cfg = dict(model.config)
            for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
                cfg[k] = dtype_name
            (dest / p.name).write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            copy_entry(p, dest / p.name, link=link)


class ShardCopier:
    """Copy every shard of `model` into `dest` in one background thread, in shard order; then the index and
    the side files. The copies keep the base's bytes (header included), so the caller writes a changed
    tensor at its offset after `wait(shard)`. The `expected` tensors' bytes are skipped; `finish` copies
    those the caller did not write (`wrote`). `poll`: tensor bytes of finished shards, for a progress bar."""

    def __init__(self, model: ModelDir, dest: Path, *, dtype_name: str | None = None, expected: Iterable[str] = ()):
        self.model, self.dest = model, Path(dest)
        check_side_files(model)
        wanted = set(expected)
        self._expected = [n for n in model.keys() if n in wanted]
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._written: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roselora-copy")
        self._shards: dict[str, Future] = {}
        self._unreported: list[tuple[Future, int]] = []
        for header in model.shards:
            fut = self._pool.submit(self._copy_shard, header, [i for n, i in header.tensors.items() if n in wanted])
            self._shards[header.path.name] = fut
            self._unreported.append((fut, sum(t.nbytes for t in header.tensors.values())))
        self._rest = self._pool.submit(self._copy_rest, dtype_name)

    def _copy_shard(self, header: Header, skip: list[TensorInfo]) -> None:
        size = header.path.stat().st_size
        runs, pos = [], 0  # byte ranges to copy: everything but the skipped tensors
        for info in sorted(skip, key=lambda i: i.start):
            if info.start > pos:
                runs.append((pos, info.start))
            pos = max(pos, info.start + info.nbytes)
        runs.append((pos, size))
        with opened(header.path, os.O_RDONLY) as src, \
                opened(self.dest / header.path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL) as dst:
            os.ftruncate(dst, size)
            for a, b in runs:
                for pos in range(a, b, COPY_CHUNK):
                    if self._cancel.is_set():
                        return
                    copy_range(src, dst, pos, pos, min(COPY_CHUNK, b - pos), header.path.name)

    def _copy_rest(self, dtype_name: str | None) -> None:
        if self._cancel.is_set():
            return
        if self.model.index is not None:
            shutil.copy2(self.model.path / INDEX_NAME, self.dest / INDEX_NAME)
        copy_side_files(self.model, self.dest, dtype_name)

    def wait(self, header: Header) -> None:
        """Block until this shard's copy is complete (re-raising its error)."""
        self._shards[header.path.name].result()

    def wrote(self, name: str) -> None:
        """The caller has written tensor `name` in its shard (so `finish` need not copy it)."""
        with self._lock:
            self._written.add(name)

    def poll(self, block: bool = False) -> int:
        """Tensor bytes of the shards finished since the last call (all of them when block=True)."""
        done = 0
        while self._unreported and (block or self._unreported[0][0].done()):
            fut, nbytes = self._unreported.pop(0)
            fut.result()
            done += nbytes
        return done

    def finish(self) -> None:
        """Wait for every copy, copy the expected tensors nobody wrote; re-raise the first error."""
        for fut in self._shards.values():
            fut.result()
        self._rest.result()
        for name in self._expected:
            if name not in self._written:
                header, info = self.model.locations[name]
                with opened(header.path, os.O_RDONLY) as src, opened(self.dest / header.path.name, os.O_WRONLY) as dst:
                    copy_range(src, dst, info.start, info.start, info.nbytes, name)

    def close(self) -> None:
        """Stop copying (after the chunk in flight) and wait for the thread; call on every exit path."""
        self._cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
