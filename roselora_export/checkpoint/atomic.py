"""Atomic directory writes: build beside the destination, then rename (or exchange) in one step.

A crash or kill at any point leaves the destination either as it was or complete, never a mix:
a new directory appears by one rename; an existing one is replaced by Linux's
renameat2(RENAME_EXCHANGE), which swaps two directory entries atomically. Where that call is
missing (non-Linux, some filesystems) the fallback is two renames, with a window in which the
destination is briefly absent but the old copy is kept whole beside it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Swap a and b atomically; False where the call is unsupported, OSError for any other failure."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # no such call, or a filesystem without it
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_files(root: Path) -> None:
    """fsync every regular file under `root` (cheap for hard links of files already on disk)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def exchange_dirs(new: Path, dest: Path) -> None:
    """Make `new` appear at `dest` atomically; the old content ends up at `new` (caller removes it)."""
    if _renameat2_exchange(new, dest):
        _fsync_dir(dest.parent)
        return
    old = new.with_name(new.name + ".old")
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except OSError:
        os.rename(old, dest)  # put the old copy back where it was
        raise
    os.rename(old, new)
    _fsync_dir(dest.parent)


def _in_place_prefix(dest: Path) -> str:
    return f".{dest.name}.inplace-"


@contextlib.contextmanager
def locked_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on directory `dest` for an in-place update, waiting for any other holder.

    The lock is flock on the directory itself. An in-place update swaps a new directory in, so a
    waiter may wake holding the lock of the old one: it then retries on whatever `dest` is now.
    Holding it, leftovers of in-place updates killed before their swap (`.NAME.inplace-*` beside
    `dest`; only lock holders make them) are removed."""
    import fcntl

    dest = Path(dest).resolve()  # "." has no name to put beside it, and a symlink would be swapped, not its target
    missing_since = None
    while True:
        try:
            fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            # Only the two-rename fallback of exchange_dirs leaves `dest` missing, for an instant.
            missing_since = missing_since or time.monotonic()
            if time.monotonic() - missing_since > 5:
                raise InputError(f"{dest}: no such directory") from None
            time.sleep(0.01)
            continue
        except OSError as err:
            raise InputError(f"{dest}: cannot open the directory to lock it ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(dest).st_ino:
                    break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # swapped while we waited: lock the directory that is there now
    try:
        # Exactly mkdtemp's 8 random characters (a sibling checkpoint named "NAME.inplace-x" has its own),
        # and the old copy the two-rename fallback parks beside them.
        prefix = glob.escape(_in_place_prefix(dest)) + "?" * 8
        for pattern in (prefix, prefix + ".old"):
            for stale in dest.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        yield dest
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `dest`; on success it becomes `dest` atomically, on error it is removed.

    replace=False refuses a non-empty existing `dest`; replace=True swaps it (in-place updates; hold
    `locked_dir(dest)` around them, so that two updates cannot both start from the same old copy).
    """
    dest = Path(dest).resolve()  # "." has no name to put a temp directory beside; a symlink's target is swapped
    exists = dest.exists()
    if exists and not dest.is_dir():
        raise InputError(f"--out {dest}: exists and is not a directory")
    if exists and not replace and any(dest.iterdir()):
        raise InputError(f"--out {dest}: exists and is not empty; choose another path or remove it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = _in_place_prefix(dest) if replace and exists else f".{dest.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        if exists and replace:
            exchange_dirs(tmp, dest)  # tmp now holds the old checkpoint
        else:
            if exists:
                dest.rmdir()
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_file(dest: Path) -> Path:
    """A temp path beside `dest` for a file that will be renamed onto it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return Path(tmp)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (same filesystem, for in-place updates), copy otherwise."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
