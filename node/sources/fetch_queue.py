"""The node's fetch pool: accepted fetch requests run here, a few at a time, never on an HTTP thread.

:class:`FetchQueue` takes the ``queued`` rows of
:class:`~segnode.node.sources.fetch_requests.FetchRequests` oldest first and
runs each on a thread of its own, at most :data:`PER_SOURCE` at a time per
source and :data:`IN_ALL` in all; the others wait ``queued``.  A run is what
``segnode fetch`` does (:func:`~segnode.node.sources.fetch.fetcher_for`,
:func:`~segnode.node.sources.pin.pin_for`, the node's store path, the
retrieval log with the requesting user).  :meth:`FetchQueue.start` first puts
back what a stopped node left ``running``; :meth:`FetchQueue.stop` starts
nothing more and does not wait for a running retrieve: a run that ends after
the stop records nothing (its error may be the shutdown's), and the next start
runs it again (the instances already retrieved are in the spool and index;
storing them again is harmless).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from segnode.errors import SegnodeError
from segnode.node.config import NodeConfig
from segnode.node.ingest.store import StoreHandler
from segnode.node.sources.fetch import FetchReport, fetcher_for
from segnode.node.sources.fetch_requests import FetchRequest, FetchRequests
from segnode.node.sources.pin import pin_for
from segnode.storage.index import Index

logger = logging.getLogger(__name__)

PER_SOURCE = 2  # fetches running at once against one source
IN_ALL = 4  # fetches running at once in the node


class FetchQueue:
    """Runs the accepted fetch requests of one node (``store``: its store path while it listens)."""

    def __init__(self, config: NodeConfig, index: Index, store: Callable[[], StoreHandler | None], *,
                 requests: FetchRequests | None = None, per_source: int = PER_SOURCE, in_all: int = IN_ALL) -> None:
        self.config, self.index, self.store = config, index, store
        self.requests = requests or FetchRequests(config.state_dir / "retrievals.sqlite")
        self.per_source, self.in_all = per_source, in_all
        self._lock = threading.Lock()
        self._running: dict[int, str] = {}  # request id → source, for the runs this queue started
        self._threads: list[threading.Thread] = []
        self._started = False

    def start(self) -> None:
        """Take up what a stopped node left ``queued`` or ``running``, then run requests as they come."""
        resumed = self.requests.requeue_interrupted()
        if resumed:
            logger.info("%d fetch request(s) interrupted by a stop run again", resumed)
        with self._lock:
            self._started = True
        self.pump()

    def stop(self) -> None:
        """Start nothing more; running retrieves are not waited for (a restart runs them again)."""
        with self._lock:
            self._started = False

    def _active(self) -> bool:
        with self._lock:
            return self._started

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for each run this queue started to end; True if all ended."""
        for thread in list(self._threads):
            thread.join(timeout_s)
        return not any(t.is_alive() for t in self._threads)

    def pump(self) -> None:
        """Start as many queued requests as the bounds allow (after an accept and after each run)."""
        with self._lock:
            if not self._started:
                return
            for request in self.requests.queued():
                if self._may_start(request.order.source):
                    self._launch(request)

    def _may_start(self, source: str) -> bool:
        mine = sum(1 for s in self._running.values() if s == source)
        return len(self._running) < self.in_all and mine < self.per_source

    def _launch(self, request: FetchRequest) -> None:
        attempt = self.requests.start(request.id)
        if attempt is None:
            return
        self._running[request.id] = request.order.source
        thread = threading.Thread(target=self._run, args=(request, attempt), name=f"segnode-fetch-{request.id}",
                                  daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _run(self, request: FetchRequest, attempt: int) -> None:
        try:
            report, error = self._fetch(request)
            if not self._active():  # stopped meanwhile (its error may be the shutdown's): the next start runs it
                logger.info("fetch request %d ended after the node stopped; it runs again at the next start",
                            request.id)
            elif not self.requests.finish(request.id, attempt, report=report, error=error):
                logger.info("fetch request %d: run %d ended after a newer run began; its outcome not kept",
                            request.id, attempt)
        finally:
            with self._lock:
                self._running.pop(request.id, None)
            self._pump_after(request.id)

    def _pump_after(self, request_id: int) -> None:
        try:
            self.pump()
        except SegnodeError as exc:  # the table failed: the queued requests wait for the next accept or start
            logger.error("after fetch request %d, the next could not be started: %s", request_id, exc)

    def _fetch(self, request: FetchRequest) -> tuple[dict[str, object] | None, str | None]:
        """The report and the reason it failed (``None``: every series retrieved)."""
        order = request.order
        try:
            report = self.fetch(request)
        except SegnodeError as exc:  # no matching study, an unknown source or rule, the source failed
            logger.warning("fetch request %d from %s failed: %s", request.id, order.source, exc)
            return None, str(exc)
        except Exception as exc:  # the thread's boundary: recorded as the request's failure, not lost
            logger.exception("fetch request %d from %s failed unexpectedly", request.id, order.source)
            return None, f"internal error: {type(exc).__name__}: {exc}"
        logger.info("fetch request %d from %s by %s: %d series, %d failed", request.id, order.source, request.by,
                    len(report.series), sum(not s.ok for s in report.series))
        failed = [s for s in report.series if not s.ok]
        error = None if not failed else "; ".join(f"series {s.series_uid}: {s.error}" for s in failed)
        return report.as_dict(), error

    def fetch(self, request: FetchRequest) -> FetchReport:
        """What ``segnode fetch`` does, in the node, for the requesting user."""
        order = request.order
        pin = pin_for(self.config, route=order.route, profile=order.profile)
        fetcher = fetcher_for(self.config, order.source, store=self.store(), index=self.index, by=request.by,
                              modality=order.modality, pin=pin)
        return fetcher.fetch(order.query())
