"""Locks of a collection: a read/write lock between searches and index updates in one process, and the
cross-process writer lock (``flock`` on ``write.lock``, which records who holds it).

>>> view = ReadWriteLock()
>>> with view.read():
...     pass
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from storage.errors import CollectionBusyError

log = logging.getLogger(__name__)


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers so it cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class WriterLock:
    """The one-writer-per-collection lock across processes; re-entrant within the thread that holds it."""

    def __init__(self, path: Path, collection: str):
        self.path = path
        self.collection = collection
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._file = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        return f"pid {info.get('pid', '?')} ({info.get('command', '?')}) since {info.get('since', '?')}"

    @contextmanager
    def hold(self, wait: float = 60.0) -> Iterator[None]:
        """Hold the lock, waiting up to ``wait`` seconds for another thread or process to release it."""
        started = time.monotonic()
        if not self._thread_lock.acquire(timeout=max(wait, 0.0)):
            raise CollectionBusyError(
                f"collection {self.collection} is being written by another request of this server; try again"
            )
        try:
            if self._depth == 0:
                self._acquire(max(0.0, wait - (time.monotonic() - started)))
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._release()
        finally:
            self._thread_lock.release()

    def _acquire(self, wait: float) -> None:
        handle = open(self.path, "a+b", buffering=0)  # unbuffered: a failed note leaves nothing to flush at close
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder()
                    handle.close()
                    raise CollectionBusyError(
                        f"collection {self.collection} is being written by {holder}; wait for it to finish "
                        f"(the CLI's --wait SECONDS waits for it) and try again"
                    ) from None
                time.sleep(0.05)
        self._file = handle
        info = {
            "pid": os.getpid(),
            "command": " ".join(os.path.basename(a) for a in sys.argv[:2]),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            handle.truncate(0)
            handle.write(json.dumps(info).encode())
        except OSError as exc:  # the note only names the holder for others' messages: not a reason to refuse the lock
            log.warning("could not note the holder of %s (%s); holding it anyway", self.path, exc)

    def _release(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
