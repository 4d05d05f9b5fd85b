"""Group commit: instances that arrive together share their syncs and one index transaction.

:meth:`GroupCommit.commit` writes one instance durably and indexes it, and
returns only once both are done; what writers arriving at the same time share:

- **the data syncs**: each writer syncs its own file in its own thread
  (:meth:`segnode.storage.spool.Spool.write`), so the syncs of concurrent writers
  are in flight together and the file system commits them in one journal
  commit (one device flush) instead of one each;
- **the directory sync**: one ``fsync`` of a series folder serves every writer
  that linked into it before it started (:class:`segnode.storage.spool._DirSync`);
- **the index transaction**: a writer whose file is durable queues its row;
  the first one to find no commit running leads: it takes every queued row,
  commits them in one transaction (:meth:`segnode.storage.index.Index.record_instances`)
  and wakes the others with their own outcome; rows queued meanwhile go in the
  next transaction.  The leader waits up to ``window_s`` for writers still
  syncing (announced and not yet queued) so that the writers of one journal
  commit share one transaction; a lone writer waits for nobody.

There is no committer thread: a lone writer commits its own row in its own
thread, as without group commit, and concurrent writers in one process no
longer queue on SQLite's write lock (each would sleep in its busy handler).
Receiver processes (:mod:`segnode.node.dicom_in.processes`) each have their own.

Errors fail only the writers they concern: a failed write or sync raises in
its own writer (nothing of it is queued); a failed transaction is retried one
row at a time, so only the rows that fail again are reported.  The order
durable file → index row → answer is kept: an acknowledged instance is
durable and indexed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from segnode.errors import StorageError
from segnode.storage.index import Index, InstanceRecord
from segnode.storage.spool import Spool

logger = logging.getLogger(__name__)

#: how long a leader waits for writers still syncing (seconds)
WINDOW_S = 0.001
#: the most rows in one transaction
MAX_BATCH = 64


@dataclass(eq=False)
class _Pending:
    record: InstanceRecord
    arrived: float
    done: bool = False
    new: bool = False
    error: StorageError | None = None


@dataclass
class _Counters:
    transactions: int = 0  # index transactions committed (tests and benchmarks read them)
    rows: int = 0


class GroupCommit:
    """Durable writes into ``spool`` and their rows in ``index``, shared by the writers of one process."""

    def __init__(self, spool: Spool, index: Index, *, window_s: float = WINDOW_S, max_batch: int = MAX_BATCH) -> None:
        if window_s < 0 or max_batch < 1:
            raise ValueError("window_s must be >= 0 and max_batch >= 1")
        self.spool = spool
        self.index = index
        self.window_s = window_s
        self.max_batch = max_batch
        self.counters = _Counters()
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._syncing = 0  # writers writing or syncing their file, row not yet queued
        self._leading = False

    def commit(self, parts: Iterable[bytes | memoryview], record: InstanceRecord) -> bool:
        """Write ``parts`` (self-checking Part 10) durably into the spool (at ``record.path``), then index ``record``.

        Returns whether the instance was new (``False``: its SOP Instance UID
        was already indexed; the first copy's row is kept).  Raises
        ``InputError`` (a UID breaks the grammar) or ``StorageError`` (the
        write, a sync or the index row failed).
        """
        with self._cond:
            self._syncing += 1
        try:
            self.spool.write(record.study_uid, record.series_uid, record.sop_uid, parts, self_checking=True)
        except BaseException:
            with self._cond:
                self._syncing -= 1
                self._cond.notify_all()
            raise
        pending = _Pending(record, time.monotonic())
        with self._cond:
            self._syncing -= 1
            self._queue.append(pending)
            self._cond.notify_all()
        self._until_done(pending)
        if pending.error is not None:
            raise pending.error
        return pending.new

    def _until_done(self, pending: _Pending) -> None:
        """Wait for a leader to commit ``pending``, or lead while it is not done."""
        while True:
            with self._cond:
                while not pending.done and self._leading:
                    self._cond.wait()
                if pending.done:
                    return
                self._leading = True
                batch = self._take()
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()

    def _take(self) -> list[_Pending]:
        """The next transaction's rows (the lock held): after waiting up to the window for writers syncing."""
        deadline = self._queue[0].arrived + self.window_s
        while self._syncing and len(self._queue) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _commit(self, batch: list[_Pending]) -> None:
        """One transaction for every row; if it fails, one per row, so only the failing rows fail."""
        try:
            try:
                outcomes = self.index.record_instances([p.record for p in batch])
                self.counters.transactions += 1
                for pending, new in zip(batch, outcomes):
                    pending.new, pending.done = new, True
            except StorageError as exc:
                logger.warning("index transaction of %d instance(s) failed (%s); committing them one by one",
                               len(batch), exc)
                for pending in batch:
                    self._commit_one(pending)
            self.counters.rows += len(batch)
        except Exception:  # boundary: every writer of the batch is answered; none as stored unless committed
            logger.exception("group commit of %d instance(s) failed", len(batch))
        finally:
            for pending in batch:
                if not pending.done:
                    pending.error = pending.error or StorageError("index commit failed", where=pending.record.sop_uid)
                    pending.done = True

    def _commit_one(self, pending: _Pending) -> None:
        try:
            pending.new = self.index.record_instance(pending.record)
            pending.done = True
            self.counters.transactions += 1
        except StorageError as exc:
            pending.error = exc
