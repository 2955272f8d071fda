"""Atomic writes and the one locking scheme, for every file or directory the package writes.

Writes: build beside the destination, then rename (or exchange, for an existing directory) in one
step: a crash leaves the destination as it was or complete. What is replaced keeps its permission bits;
what is new follows the umask. Temporaries: `.NAME.tmp-PID-XXXXXXXX` beside NAME, flock-ed by their
owner for life; every writer first removes its destination's stale ones (owner gone, lock free), never
a live one. In-place temporaries (`.NAME.inplace-XXXXXXXX`) are made only under the directory's
exclusive lock, so its next holder removes them. Locks: flock on the directory, exclusive for in-place
writers, shared for readers. Guarantees: docs/design.md "What is guaranteed".
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import errno
import fcntl
import glob
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import InputError
from .oserrors import input_error

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
TEMP_MARK, IN_PLACE_MARK = ".tmp-", ".inplace-"


# ----------------------------------------------------------------------------- modes

def umask() -> int:
    """The process umask, read without changing it (a thread-safe read where /proc has it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_mode(is_dir: bool) -> int:
    """The permission bits a new file or directory gets from open/mkdir under the current umask."""
    return (0o777 if is_dir else 0o666) & ~umask()


# ----------------------------------------------------------------------------- renames and syncs

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
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def opened(path: str | os.PathLike, flags: int, mode: int = 0o666) -> Iterator[int]:
    """os.open(path, flags, mode) as a context manager: the fd is closed on every exit path."""
    fd = os.open(path, flags, mode)
    try:
        yield fd
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with opened(path, os.O_RDONLY) as fd:
        os.fsync(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fsync_file(path)


def fsync_files(root: Path) -> None:
    """fsync every regular file under `root` (cheap for hard links of files already on disk)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)


def exchange_dirs(new: Path, dest: Path) -> None:
    """Make `new` appear at `dest` atomically; the old content ends up at `new` (caller removes it)."""
    if _renameat2_exchange(new, dest):
        fsync_dir(dest.parent)
        return
    old = new.with_name(new.name + ".old")
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except OSError:
        os.rename(old, dest)  # put the old copy back where it was
        raise
    os.rename(old, new)
    fsync_dir(dest.parent)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (same filesystem, for in-place updates), copy otherwise."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------- temporaries and their owners

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on path, or None if someone else holds it (or it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and not path.is_symlink() else 0)
                     | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    os.close(fd)
    return None


def _try_flock(fd: int, mode: int) -> bool:
    """Take flock `mode` on fd without waiting; False if a conflicting holder has it."""
    with contextlib.suppress(BlockingIOError):
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def stale_temps(parent: Path, name: str | None = None) -> list[Path]:
    """The temporaries of `parent/name` (name None: of any entry of `parent`) whose owner is gone: its pid
    dead, its lock free. A missing or unreadable `parent` has none."""
    stem = r".+" if name is None else re.escape(name)
    pattern = re.compile(rf"^\.{stem}{re.escape(TEMP_MARK)}(\d+)-[a-z0-9_]{{8}}$")
    out = []
    for p in Path(parent).glob(".*" if name is None else glob.escape(f".{name}{TEMP_MARK}") + "*"):
        m = pattern.match(p.name)
        if m and not _alive(int(m.group(1))):
            fd = _try_lock(p)
            if fd is not None:
                os.close(fd)
                out.append(p)
    return out


def remove_stale_temps(parent: Path, name: str | None = None) -> list[Path]:
    """Remove and return stale_temps(parent, name): safe without any directory lock."""
    stale = stale_temps(parent, name)
    for p in stale:
        _remove(p)
    return stale


def is_temp_name(name: str) -> bool:
    """Whether a directory entry is one of our temporaries (never copied into an output)."""
    return name.startswith(".") and (TEMP_MARK in name or IN_PLACE_MARK in name or name.endswith(".tmp"))


@contextlib.contextmanager
def owned_temp(parent: Path, name: str, *, is_dir: bool) -> Iterator[Path]:
    """A new temporary `.NAME.tmp-PID-XXXXXXXX` in `parent`, flock-ed while it exists; removed on exit if still there."""
    prefix = f".{name}{TEMP_MARK}{os.getpid()}-"
    if is_dir:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
        path = Path(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        _remove(path)
        os.close(fd)


# ----------------------------------------------------------------------------- outputs vs inputs

def check_disjoint(outputs: dict[str, object], inputs: dict[str, object]) -> None:
    """Refuse an output that is, lies inside, or contains an input (symlinks resolved). Keys are option names."""
    def real(p: object) -> Path:
        return Path(os.path.realpath(os.fspath(p)))

    for out_opt, out in outputs.items():
        if out is None:
            continue
        o = real(out)
        for in_opt, src in inputs.items():
            if src is None:
                continue
            i = real(src)
            if o == i or i in o.parents or o in i.parents:
                how = "is" if o == i else ("lies inside" if i in o.parents else "contains")
                raise InputError(f"{out_opt} {out} {how} {in_opt} {src}; writing it would overwrite an input, "
                                 "choose a path outside the inputs")


def check_empty_out(out: str | os.PathLike | None, what: str = "--out") -> None:
    """InputError unless `out` (None: nothing to check) is absent or an empty directory, before any work starts."""
    if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise InputError(f"{what} {out}: exists and is not an empty directory; choose another path or remove it")


# ----------------------------------------------------------------------------- copies

def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")


def copy_entry(src: Path, dst: Path, *, link: bool = False) -> None:
    """Copy one directory entry: files (hard-linked when `link` and possible), directories recursively,
    a symlink as what it points to (a dangling one as a symlink). A FIFO, socket or device is refused:
    reading one could block forever or never end. Our temporaries inside directories are skipped."""
    try:
        st = src.stat()
    except FileNotFoundError:
        if src.is_symlink():  # dangling: keep it as the link it is
            os.symlink(os.readlink(src), dst)
            return
        raise
    if stat.S_ISDIR(st.st_mode):
        dst.mkdir()
        for child in sorted(src.iterdir()):
            if not is_temp_name(child.name):
                copy_entry(child, dst / child.name, link=link)
        shutil.copystat(src, dst)
    elif stat.S_ISREG(st.st_mode):
        if link:
            link_or_copy(src, dst)
        else:
            shutil.copy2(src, dst)
    else:
        check_copyable(src)


def check_copyable(src: Path) -> None:
    """InputError for a FIFO, socket or device (followed through symlinks): never copied, see copy_entry."""
    with contextlib.suppress(FileNotFoundError):
        mode = src.stat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise InputError(f"{src} is {_kind(mode)}; only regular files and directories can be copied into the "
                             "output: move it out of the model directory")


# ----------------------------------------------------------------------------- locks

def _holder(fd: int) -> str:
    """' (held by pid N)' from /proc/locks for the flock on fd's inode, when it can be told."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        st = os.fstat(fd)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if "FLOCK" in parts and dev in parts:
                k = parts.index(dev)
                return f" (held by pid {parts[k - 1]})"
    return ""


_LOCK_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar("lock_timeout", default=None)


@contextlib.contextmanager
def lock_timeout_default(seconds: float | None) -> Iterator[None]:
    """Within this block, locked_dir calls without a timeout of their own wait at most `seconds` (the CLI's --lock-timeout)."""
    token = _LOCK_TIMEOUT.set(seconds)
    try:
        yield
    finally:
        _LOCK_TIMEOUT.reset(token)


def _open_dir(dest: Path) -> int:
    """An fd on directory `dest`; a missing one is waited for up to 5 s (exchange_dirs' two-rename fallback)."""
    missing_since = time.monotonic()
    while True:
        try:
            return os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if time.monotonic() - missing_since > 5:
                raise InputError(f"{dest}: no such directory") from None
            time.sleep(0.01)
        except OSError as err:
            raise input_error(err, f"opening {dest} to lock it") from None


@contextlib.contextmanager
def locked_dir(dest: str | os.PathLike, *, shared: bool = False, timeout: float | None = None) -> Iterator[Path]:
    """Hold the lock of directory `dest`: exclusive for an in-place update, shared for reading it.

    Waits (saying so on stderr) at most `timeout` s (None: lock_timeout_default's, else no limit), then
    InputError. A waiter woken on a directory swapped out meanwhile retries on whatever `dest` is now.
    An exclusive holder first removes the leftovers of in-place updates killed before their swap."""
    dest = Path(dest).resolve()  # "." has no name to put beside it, and a symlink would be swapped, not its target
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    timeout = _LOCK_TIMEOUT.get() if timeout is None else timeout
    start, told = time.monotonic(), False
    while True:
        fd = _open_dir(dest)
        try:
            while not _try_flock(fd, mode):
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise InputError(f"{dest}: still locked by another process{_holder(fd)} after {waited:.0f} s "
                                     "(an in-place apply, or a reader of it); try again later, or raise --lock-timeout")
                if not told:
                    told = True
                    print(f"waiting for the lock on {dest}: another process{_holder(fd)} is "
                          f"{'updating it in place' if shared else 'reading or updating it'}"
                          + ("" if timeout is not None else "; --lock-timeout SECONDS bounds the wait"),
                          file=sys.stderr, flush=True)
                time.sleep(0.05)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(dest).st_ino:
                    break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # swapped while we waited: lock the directory that is there now
    try:
        if not shared:
            # Exactly mkdtemp's 8 random characters (a sibling checkpoint named "NAME.inplace-x" has its own),
            # and the old copy the two-rename fallback parks beside them.
            prefix = glob.escape(f".{dest.name}{IN_PLACE_MARK}") + "?" * 8
            for pattern in (prefix, prefix + ".old"):
                for stale in dest.parent.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
        yield dest
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


# ----------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, replace: bool = False, what: str = "--out") -> Iterator[Path]:
    """Yield a temp directory beside `dest`; on success it becomes `dest` atomically, on error it is removed.

    replace=False refuses a non-empty existing `dest`; replace=True swaps it (hold `locked_dir(dest)`
    around in-place updates). OS failures become one-line InputErrors."""
    dest = Path(dest).resolve()  # "." has no name to put a temp directory beside; a symlink's target is swapped
    exists = dest.exists()
    if exists and not dest.is_dir():
        raise InputError(f"{what} {dest}: exists and is not a directory")
    if exists and not replace and any(dest.iterdir()):
        raise InputError(f"{what} {dest}: exists and is not empty; choose another path or remove it")
    if exists and replace and os.path.ismount(dest):
        raise InputError(f"{dest} is a mount point, which an in-place update cannot swap; use --out DIR, or keep the "
                         "model in a directory inside the mount")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest.parent, dest.name)
        with contextlib.ExitStack() as stack:
            if exists and replace:
                tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{IN_PLACE_MARK}", dir=dest.parent))
                stack.callback(shutil.rmtree, tmp, ignore_errors=True)
                os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
            else:
                tmp = stack.enter_context(owned_temp(dest.parent, dest.name, is_dir=True))
                os.chmod(tmp, new_mode(is_dir=True))
            yield tmp
            fsync_dir(tmp)
            if exists and replace:
                exchange_dirs(tmp, dest)  # tmp now holds the old checkpoint
            else:
                if exists:
                    dest.rmdir()
                os.rename(tmp, dest)
                fsync_dir(dest.parent)
    except OSError as err:
        raise input_error(err, f"writing {dest}") from None


def atomic_write(dest: str | os.PathLike, write: Callable[[int], None] | bytes, *, durable: bool = True) -> Path:
    """Write a file atomically: `write(fd)` (or the bytes) into a temp file beside `dest`, fsync, rename.

    An existing `dest` keeps its permission bits; a new one follows the umask. OS failures become
    one-line InputErrors; nothing is left behind but the old file (or none)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest.parent, dest.name)
        try:
            mode = stat.S_IMODE(dest.stat().st_mode)
        except FileNotFoundError:
            mode = new_mode(is_dir=False)
        with owned_temp(dest.parent, dest.name, is_dir=False) as tmp:
            with opened(tmp, os.O_WRONLY) as fd:
                if isinstance(write, (bytes, bytearray, memoryview)):
                    view, done = memoryview(write).cast("B"), 0
                    while done < view.nbytes:
                        done += os.write(fd, view[done:done + (1 << 24)])
                else:
                    write(fd)
                os.fchmod(fd, mode)
                if durable:
                    os.fsync(fd)
            os.replace(tmp, dest)
        if durable:
            fsync_dir(dest.parent)
    except OSError as err:
        raise input_error(err, f"writing {dest}") from None
    return dest
