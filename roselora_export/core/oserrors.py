"""Operating-system failures (disk full, read-only, busy, I/O error, ...) as one-line InputErrors that say what to do."""
from __future__ import annotations

import errno

from ..errors import InputError

_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded; free some space or write somewhere else",
    errno.EROFS: "the filesystem is read-only; write the result somewhere writable (--out DIR)",
    errno.EACCES: "permission denied; check the permissions, or write somewhere else",
    errno.EPERM: "operation not permitted; check the permissions, or write somewhere else",
    errno.EBUSY: "the path is busy (a mount point cannot be replaced); use --out DIR, or patch a directory inside the mount",
    errno.EIO: "input/output error; the device or file cannot be read reliably",
    errno.EXDEV: "source and destination are on different filesystems",
    errno.ENAMETOOLONG: "a file name is too long",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "a directory was given where a file is needed",
    errno.ENOENT: "no such file or directory",
}


class FilesystemError(InputError, OSError):
    """An OSError met while reading or writing, told as an InputError: one line, exit 2, no traceback.

    Still an OSError (and its errno kept), so callers that catch OS failures keep catching it."""


def input_error(err: OSError, doing: str) -> FilesystemError:
    """The one-line error for `err`, met while `doing` (e.g. "writing /x/model.safetensors"): what failed, the fix."""
    if isinstance(err, InputError):
        return err
    hint = _HINTS.get(err.errno) or err.strerror or str(err) or type(err).__name__
    code = f" [{errno.errorcode.get(err.errno, err.errno)}]" if err.errno else ""
    where = f" ({err.filename})" if err.filename and str(err.filename) not in doing else ""
    out = FilesystemError(f"{doing}{where}: {hint}{code}")
    out.errno = err.errno
    return out
