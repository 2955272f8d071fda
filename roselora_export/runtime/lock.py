"""The serving lock: many forward passes at once, or one patch write, never both.

The standard library has no readers-writer lock, hence this small one. Writers are preferred
(a waiting apply/revert stops new forward passes from starting), so a busy server cannot starve
an edit; the write itself lasts only as long as the scatter of the touched elements.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ServingLock:
    """Readers-writer lock: `read()` around forward passes, `write()` around weight writes.

    `read()` is reentrant per thread. Calling `write()` from a thread that holds `read()` would
    deadlock, so it raises RuntimeError instead.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextmanager
    def read(self) -> Iterator[None]:
        depth = self._depth()
        if depth == 0:
            with self._cond:
                while self._writer or self._waiting_writers:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        if self._depth():
            raise RuntimeError("apply/revert was called inside runtime.serving() on the same thread, which would "
                               "deadlock; call it outside the serving block")
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
