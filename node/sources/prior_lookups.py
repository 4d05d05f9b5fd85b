"""The priors of ``complete`` jobs, looked up off the job path: a slow source PACS holds up only its own lookups.

A job whose route asks for priors is not claimed (:meth:`segnode.storage.index.Index.claim_next`)
until its priors are in its options: :meth:`PriorLookups.start`, called with every
``start_jobs``, hands each such job to the pool of its route's source (a few
threads per source), which runs :func:`~segnode.node.sources.priors.prior_options`
(C-FIND, and a retrieval when the node has no result of its own) and records
what it found (:meth:`~segnode.storage.index.Index.record_priors`).  Jobs
without priors, and jobs whose priors come from another source, go on
meanwhile: neither a local worker's slot nor the loop that publishes to remote
workers waits on a PACS.  A node stopped during a lookup looks it up again
when it starts (the job is still ``complete``, its options without
``priors_found``); a lookup that fails leaves the report without priors and
says why, it never fails the job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from segnode.node.config import NodeConfig
from segnode.node.ingest.store import StoreHandler
from segnode.node.sources.priors import prior_options
from segnode.routing.rules import Priors
from segnode.storage.index import Index, Job
from segnode.storage.spool import Spool

logger = logging.getLogger(__name__)

#: lookups at once per source: a source answers a few; the others' lookups never wait on it
THREADS_PER_SOURCE = 2


class PriorLookups:
    """One small pool per source; ``found`` is called after each lookup recorded (the node claims the job)."""

    def __init__(self, config: NodeConfig, index: Index, spool: Spool, store: StoreHandler | None,
                 found: Callable[[], None]) -> None:
        self.config, self.index, self.spool, self.store, self.found = config, index, spool, store, found
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Hand every job that waits for its priors, and is not being looked up, to its source's pool."""
        for job in self.index.awaiting_priors():
            source = Priors.model_validate(job.options["priors"]).source
            with self._lock:
                if self._closed or job.job_id in self._pending:
                    continue
                self._pending.add(job.job_id)
                pool = self._pools.get(source)
                if pool is None:
                    pool = self._pools[source] = ThreadPoolExecutor(THREADS_PER_SOURCE,
                                                                    thread_name_prefix=f"segnode-priors-{source}")
            logger.info("job %d: looking up priors on %s", job.job_id, source)
            pool.submit(self._lookup, job)

    def _lookup(self, job: Job) -> None:
        try:
            try:
                found = prior_options(self.config, self.index, self.spool, job, store=self.store)
            except Exception as exc:  # noqa: BLE001 - a defect must not leave the job waiting for ever
                logger.exception("job %d: priors lookup failed", job.job_id)
                found = {"priors_note": f"priors lookup failed: {type(exc).__name__}"}
            recorded = self.index.record_priors(job.job_id, found)
        finally:
            with self._lock:
                self._pending.discard(job.job_id)
        if recorded:
            self.found()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
