"""Group commit: instances that arrive together share one sync wave and one index transaction.

Each writer places its file (:meth:`segnode.storage.spool.Spool.place`: written and
linked, not yet synced) and hands it to :meth:`GroupCommit.commit`, which blocks
until the file is durable and its index row committed.  One committer thread
takes every pending file at once: one sync wave for all of them
(:meth:`segnode.storage.spool.Spool.make_durable`: the data syncs and each folder's
directory sync issued together, sharing the file system's journal commit), then
one index transaction (:meth:`segnode.storage.index.Index.record_instances`), then
wakes each writer with its own outcome.

Batching is natural: files that arrive while a batch is syncing form the next
one, so a lone writer waits for one sync and nothing else.  A writer that has
announced itself (:meth:`GroupCommit.begin`) and is still writing its file
holds the batch back for at most ``window_s`` (from the first pending file), so
concurrent associations join the same wave; nobody waits for a writer that is
not already writing.

Errors fail only the writers they concern: a failed sync fails its file (or,
for a directory, that folder's files), which are removed; a failed index
transaction is retried one record at a time, so only the records that fail
again are reported.  The order durable file → index row → answer is kept:
an acknowledged instance is durable and indexed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from segnode.errors import StorageError
from segnode.storage.index import Index, InstanceRecord
from segnode.storage.spool import Placed, Spool

logger = logging.getLogger(__name__)

#: how long a writer still writing its file may hold a batch back (seconds)
WINDOW_S = 0.002
#: the most files in one wave
MAX_BATCH = 64


@dataclass(eq=False)
class _Pending:
    placed: Placed
    record: InstanceRecord
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    new: bool = False
    error: StorageError | None = None


class GroupCommit:
    """The committer of one process's writers into ``spool`` and ``index``."""

    def __init__(self, spool: Spool, index: Index, *, window_s: float = WINDOW_S, max_batch: int = MAX_BATCH) -> None:
        if window_s < 0 or max_batch < 1:
            raise ValueError("window_s must be >= 0 and max_batch >= 1")
        self.spool = spool
        self.index = index
        self.window_s = window_s
        self.max_batch = max_batch
        self.batches = 0  # waves committed (tests and benchmarks read it)
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._writing = 0  # writers announced, file not yet handed over
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="spool-commit", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        """A writer starts writing a file it will :meth:`commit` (or :meth:`abandon`)."""
        with self._cond:
            self._writing += 1

    def abandon(self) -> None:
        """An announced writer will not commit (its write failed, or it was a duplicate)."""
        with self._cond:
            self._writing -= 1
            self._cond.notify_all()

    def commit(self, placed: Placed, record: InstanceRecord) -> bool:
        """Make ``placed`` durable and index ``record``; whether the instance was new.

        Must follow :meth:`begin`.  Raises ``StorageError`` when this file's sync
        or its index row failed (the file is then removed, or, if only the row
        failed, left for the start-up re-index).
        """
        pending = _Pending(placed, record, time.monotonic())
        with self._cond:
            if self._closed:
                self._writing -= 1
                raise StorageError("the spool's committer is closed", where=record.sop_uid)
            self._writing -= 1
            self._queue.append(pending)
            self._cond.notify_all()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.new

    def stop(self) -> None:
        """Refuse further commits; the committer thread commits what is pending, then ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        """:meth:`stop`, and wait for the pending commits."""
        self.stop()
        self._thread.join()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._commit(batch)
            self.batches += 1

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.window_s
            while self._writing and len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            errors = self.spool.make_durable([p.placed for p in batch])
            for pending, error in zip(batch, errors):
                pending.error = error
            self._index([p for p in batch if p.error is None])
        except Exception as exc:  # boundary: every waiter must be answered, whatever went wrong
            logger.exception("group commit of %d instance(s) failed", len(batch))
            for pending in batch:
                pending.error = pending.error or StorageError(f"commit failed: {exc}", where=pending.record.sop_uid)
        finally:
            for pending in batch:
                pending.done.set()

    def _index(self, durable: list[_Pending]) -> None:
        """One transaction for every row; if it fails, one per row, so only the failing rows fail."""
        if not durable:
            return
        try:
            for pending, new in zip(durable, self.index.record_instances([p.record for p in durable])):
                pending.new = new
            return
        except StorageError as exc:
            logger.warning("index transaction of %d instance(s) failed (%s); committing them one by one",
                           len(durable), exc)
        for pending in durable:
            try:
                pending.new = self.index.record_instance(pending.record)
            except StorageError as exc:
                pending.error = exc
