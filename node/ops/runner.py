"""Operations around a running node: audit log, metrics, HTTP API and status page.

``Ops(service)`` before ``service.start()`` (it subscribes to the service's
events), ``ops.start()`` after it (binds to the SCP and listens), and
``ops.stop()`` before ``service.stop()``::

    service = Service(config)
    ops = Ops(service)
    service.start()
    ops.start()
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

from segnode.errors import ConfigError, StorageError
from segnode.node.config import NodeConfig
from segnode.node.config.datasets import dataset_store_root
from segnode.node.events import Delivered, Event, EventSink, JobMoved
from segnode.node.ingest.guards import ListenerHealth
from segnode.node.http_in.catalogue import IndexCatalogue
from segnode.node.http_in.dicomweb_read import DicomWebReader
from segnode.node.ingest.store import StoreHandler
from segnode.node.ops.accounts import AccountStore
from segnode.node.ops.api import OpsApp, RunningHTTP, start_http
from segnode.node.ops.audit import AuditFollower, AuditLog, record_of
from segnode.node.ops.fetch import FetchAPI
from segnode.node.ops.metrics import NodeMetrics
from segnode.node.ops.status_page import render_status
from segnode.node.ops.views import OpsDB
from segnode.node.ops.viewer import Viewer, viewer_routes
from segnode.node.remote.status import ScaleoutCollector, ScaleoutSource, render_remote
from segnode.node.sources.fetch_queue import FetchQueue
from segnode.routing import RulesHolder
from segnode.storage.index import Index

logger = logging.getLogger(__name__)


def audit_path(config: NodeConfig) -> Path:
    return config.audit.path or config.state_dir / "audit" / "audit.jsonl"


def datasets_summary(root: Path) -> dict[str, Any]:
    """Datasets, case counts by label status, and frozen versions of the store at ``root``."""
    if not (root / "store.json").is_file():
        return {"store": str(root), "exists": False, "datasets": [], "quarantined": 0}
    from segnode.storage.dataset import DatasetStore

    store = DatasetStore.open_read_only(root)
    out = []
    for name in store.datasets():
        cases = store.cases(name)
        status: dict[str, int] = {}
        for case in cases.values():
            key = getattr(case.label_status, "value", str(case.label_status))
            status[key] = status.get(key, 0) + 1
        out.append({"name": name, "cases": len(cases), "label_status": status, "versions": store.versions(name)})
    return {"store": str(root), "exists": True, "datasets": out, "quarantined": len(store.quarantined())}


class Listener(Protocol):
    """The DICOM listener as ops sees it: its port, its store path's counters, its watchdog."""

    @property
    def port(self) -> int: ...

    @property
    def handler(self) -> StoreHandler: ...

    def health(self) -> ListenerHealth: ...


class NodeForOps(ScaleoutSource, Protocol):
    """What the ops side reads of the node (:class:`segnode.node.service.Service`)."""

    @property
    def config(self) -> NodeConfig: ...

    @property
    def index(self) -> Index: ...

    @property
    def rules(self) -> RulesHolder: ...

    @property
    def scp(self) -> Listener | None: ...

    @property
    def listeners(self) -> list[EventSink]: ...

    def review(self, job_id: int, approve: bool, reviewer: str, comment: str = "") -> str | None: ...


class Ops:
    """The node's ops side, attached to a :class:`segnode.node.service.Service`."""

    def __init__(self, service: NodeForOps) -> None:
        self.service = service
        config = self.config = service.config
        self.db = OpsDB(config.index_path)
        self.audit = AuditLog(audit_path(config), node=config.ae_title, fsync=config.audit.fsync == "always",
                              rotate_bytes=config.audit.rotate_bytes)
        self.metrics = NodeMetrics(self.db, config.state_dir, ingest_stats=self._ingest_stats)
        self.follower = AuditFollower(self.audit, self.db, poll_interval_s=config.audit.poll_interval_s,
                                      on_spans=self.metrics.observe_spans)
        self.http: RunningHTTP | None = None
        self.accounts = AccountStore.in_state_dir(config.state_dir)  # people and their roles (segnode users)
        scp = lambda: self.service.scp.handler if self.service.scp is not None else None  # noqa: E731
        self.fetches = FetchQueue(config, service.index, scp)  # POST /api/v1/fetch runs here
        service.listeners.append(self.on_event)

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        self.follower.start()
        if self.service.remote is not None or self.service.dicomweb is not None:
            self.metrics.registry.register(ScaleoutCollector(self.service))
        if self.config.http.enabled:
            self.http = start_http(self.config.http, self.app(), accounts=self.accounts)
        self.fetches.start()  # after the service: the store path listens; resumes what a stop left

    def stop(self) -> None:
        self.fetches.stop()
        if self.http is not None:
            self.http.stop()
        self.follower.stop()
        self.audit.close()

    # -- the HTTP application -----------------------------------------------------------
    def app(self) -> OpsApp:
        app = OpsApp(db=self.db, retry=self.service.index.retry, metrics=self.metrics.render,
                     rules=self.service.rules, readiness=self.readiness_checks(),
                     validate_rules=self.validate_rules, datasets=self.datasets,
                     status_page=self.status_page, audit=self.write_audit,
                     review=self.service.review, node=self.config.ae_title)
        reader = DicomWebReader(IndexCatalogue(self.config.index_path, self.config.spool_dir))
        app.add_routes(viewer_routes(Viewer(self.config.viewer, node=self.config.ae_title), reader))
        app.add_routes(FetchAPI(self.config, self.fetches, self.write_audit).routes())  # /api/v1/fetch
        return app

    def status_page(self) -> str:
        checks = self.readiness_checks()
        page = render_status(self.db, node=self.config.ae_title,
                             readiness=lambda: {name: check() for name, check in checks.items()})
        remote = self.service.remote
        if remote is not None:  # queues and in-flight remote jobs (node/remote/status.py)
            page = page.replace("</body>", render_remote(remote.snapshot()) + "</body>", 1)
        return page

    def readiness_checks(self) -> dict[str, Any]:
        return {"index": self._index_ok, "scp": self._scp_ok, "disk": self._disk_ok, "rules": self._rules_ok,
                "audit": self._audit_ok}

    def _index_ok(self) -> tuple[bool, str]:
        return self.db.ping(), str(self.config.index_path)

    def _scp_ok(self) -> tuple[bool, str]:
        scp = self.service.scp
        if scp is None:
            return False, "the DICOM listener is not running"
        health = scp.health()  # the accept loop's watchdog (node/ingest/guards.py)
        if not health.up:
            return False, health.detail
        return True, f"{self.config.ae_title} on {self.config.host}:{scp.port}"

    def _disk_ok(self) -> tuple[bool, str]:
        free = shutil.disk_usage(self.config.state_dir).free
        minimum = self.config.limits.min_free_disk_mb * 1024 * 1024
        return free >= minimum, f"{free // (1024 * 1024)} MB free, minimum {self.config.limits.min_free_disk_mb} MB"

    def _rules_ok(self) -> tuple[bool, str]:
        current = self.service.rules.current
        return bool(current.rules), f"{len(current.rules)} rules from {current.source}"

    def _audit_ok(self) -> tuple[bool, str]:
        return self.follower.alive, str(self.audit.path)

    def validate_rules(self, path: Path) -> list[str]:
        from segnode.profiles.loader import profile_paths
        from segnode.routing import load_rules

        rules = load_rules(path, profiles=tuple(profile_paths()),
                           destinations=tuple(d.name for d in self.config.destinations))
        return [r.name for r in rules.rules]

    def datasets(self) -> dict[str, Any]:
        return datasets_summary(dataset_store_root(self.config))

    # -- events -----------------------------------------------------------------------------
    def _ingest_stats(self) -> dict[str, int]:
        scp = self.service.scp
        if scp is None:
            return {}
        stats, health = scp.handler.stats, scp.health()
        listener = {"listener_up": int(health.up), "accept_errors": health.accept_errors,
                    "connections_refused": health.refused_pending, "connections_pending": health.pending}
        with stats.lock:
            return {"stored": stats.stored, "bytes_stored": stats.bytes_stored, "duplicates": stats.duplicates,
                    **listener}

    def write_audit(self, event: str, **fields: Any) -> None:
        try:
            self.audit.write(event, **fields)
        except StorageError as exc:  # the record is lost; ingest and dispatch go on, the metric says so
            self.metrics.audit_errors.inc()
            logger.error("audit record %s not written: %s", event, exc)

    def on_event(self, event: Event) -> None:
        """The service's event sink (runs on the receiver's and the dispatcher's threads)."""
        self.metrics.on_event(event)
        if isinstance(event, Delivered):
            self._audit_delivery(event)
        elif (record := record_of(event)) is not None:
            self.write_audit(record[0], **record[1])
        if isinstance(event, (JobMoved, Delivered)):
            self.follower.wake()

    def _audit_delivery(self, event: Delivered) -> None:
        name = event.destination
        job = self.db.job(event.job_id) or {}
        try:
            dest = self.config.destination(name)
            where = {"destination_ae": dest.ae_title, "destination_host": dest.host, "destination_port": dest.port}
        except ConfigError:
            where = {}
        self.write_audit("delivery.attempt", job_id=event.job_id, destination=name, **where,
                         study_uid=job.get("study_uid"), series_uid=job.get("series_uid"),
                         seg_sop_uid=job.get("seg_sop_uid"), ok=event.ok, message=event.message)

