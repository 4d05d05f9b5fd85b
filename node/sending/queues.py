"""A delivery queue and worker thread(s) per destination, so that no destination waits on another.

:meth:`Senders.dispatch_due` reads the deliveries whose time has come from the
index and hands each to its destination's :class:`DestinationQueue`; it
never sends, so accepting a result (a local worker's outcome, a remote
worker's result, a review approval) only marks deliveries due and wakes the
queues.  Each queue's thread(s) (``destinations[].workers``, default 1) make
the tries (:class:`~segnode.node.sending.delivery.Courier`): a slow, down or
black-holing destination holds only its own threads, each try bounded by the
destination's deadlines (:class:`~segnode.node.sending.sender.Deadlines`).

A delivery is queued at most once at a time: one found due again while it is
queued or in flight is left alone, and a courier skips a task whose delivery
was tried since it was found due, so a retry is never sent before its time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from segnode.node.commitment import CommitmentBook
from segnode.node.config import Destination, NodeConfig
from segnode.node.events import EventSink
from segnode.node.sending.commitment import committer_for
from segnode.node.sending.delivery import Courier, DeliveryTask, record_unknown
from segnode.node.sending.sender import sender_for
from segnode.storage.index import Index

logger = logging.getLogger(__name__)


class DestinationQueue:
    """One destination's deliveries due, worked by its own thread(s)."""

    def __init__(self, courier: Courier, *, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("a destination queue needs at least one worker")
        self.courier = courier
        self.workers = workers
        self._queue: queue.SimpleQueue[DeliveryTask | None] = queue.SimpleQueue()
        self._known: set[int] = set()  # job ids queued or in flight
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def destination(self) -> str:
        return self.courier.destination

    def start(self) -> None:
        for n in range(self.workers):
            thread = threading.Thread(target=self._run, name=f"segnode-send-{self.destination}-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def put(self, task: DeliveryTask) -> bool:
        """Queue ``task``; False if its delivery is already queued or in flight."""
        with self._lock:
            if task.job_id in self._known:
                return False
            self._known.add(task.job_id)
        self._queue.put(task)
        return True

    def in_hand(self) -> int:
        """Deliveries queued or in flight."""
        with self._lock:
            return len(self._known)

    def stop(self, timeout_s: float = 1.0) -> None:
        """Let the threads end after their current try (they are daemons: a try in flight does not hold exit)."""
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def _run(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                self.courier.attempt(task)
            except Exception:  # the boundary of this thread: record it and keep the destination served
                logger.exception("job %d: delivery to %s failed unexpectedly", task.job_id, self.destination)
            finally:
                with self._lock:
                    self._known.discard(task.job_id)


class Senders:
    """The delivery queues of every configured destination."""

    def __init__(self, config: NodeConfig, index: Index, report: EventSink) -> None:
        self.index = index
        self.report = report
        self.commitments = CommitmentBook(index, config)
        self.queues = {dest.name: DestinationQueue(self._courier(config, dest), workers=dest.workers)
                       for dest in config.destinations}

    def _courier(self, config: NodeConfig, dest: Destination) -> Courier:
        sender = sender_for(dest, calling_ae=config.ae_title, dispatch=config.dispatch)
        committer = committer_for(dest, calling_ae=config.ae_title, dispatch=config.dispatch, book=self.commitments)
        return Courier(dest.name, sender, self.index, config.dispatch, self.report, committer)

    def start(self) -> None:
        for q in self.queues.values():
            q.start()

    def stop(self) -> None:
        for q in self.queues.values():
            q.stop()

    def dispatch_due(self) -> int:
        """Hand every delivery due to its destination's queue; the number newly queued.  Never sends.

        Storage commitments with no report by their deadline are first made due again.
        """
        for event in self.commitments.expire_overdue():
            self.report(event)
        queued = 0
        for job, delivery in self.index.due_deliveries():
            task = DeliveryTask(job.job_id, delivery.destination, delivery.attempts)
            destination = self.queues.get(delivery.destination)
            if destination is None:
                record_unknown(self.index, task, self.report)
            elif destination.put(task):
                queued += 1
        return queued
