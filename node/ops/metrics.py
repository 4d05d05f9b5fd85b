"""Prometheus metrics of the node, on their own registry (no global state).

=====================================  =========  ============================================
metric                                 type       source
=====================================  =========  ============================================
``segnode_associations_total``         counter    associations, ``result`` accepted/rejected
``segnode_instances_received_total``   counter    instances stored (the SCP's counters)
``segnode_bytes_received_total``       counter    bytes of the instances stored
``segnode_duplicates_total``           counter    instances received again (first copy kept)
``segnode_rejections_total``           counter    refusals by ``reason``: association
                                                  (``sender_not_allowed``, ``called_ae_unknown``,
                                                  ``too_many_associations``) and C-STORE
                                                  (``too_large``, ``disk_full``, ``write_failed``,
                                                  ``cannot_decode``, ``invalid_uid``,
                                                  ``uid_mismatch``, ``sop_class_not_supported``,
                                                  ``sop_class_mismatch``, ``study_mismatch`` (STOW-RS),
                                                  ``internal_error``)
``segnode_jobs``                       gauge      jobs per ``state`` (read from the index)
``segnode_stage_duration_seconds``     histogram  per ``stage`` (ingest, queue, segment,
                                                  dispatch), see :mod:`segnode.node.ops.views`
``segnode_dispatch_attempts_total``    counter    C-STORE attempts of results, per
                                                  ``destination``
``segnode_dispatch_failures_total``    counter    failed attempts, per ``destination``
``segnode_free_disk_bytes``            gauge      free space on the state directory's disk
``segnode_listener_up``                gauge      1 while the accept loop serves (its watchdog,
                                                  :mod:`segnode.node.ingest.guards`), 0 while accepting fails
``segnode_accept_errors_total``        counter    failed ``accept()`` / thread starts (backed off)
``segnode_connections_pending``        gauge      connections not yet associated
``segnode_connections_refused_total``  counter    connections closed at once: pending caps reached
``segnode_audit_errors_total``         counter    audit records that could not be written
=====================================  =========  ============================================

Association, instance and delivery outcomes come from the node's typed events
(:mod:`segnode.node.events`, :meth:`NodeMetrics.on_event`), so the receiver
and the store path need no metrics code; an instance refusal is counted under
the reason its event carries, never guessed from its error comment.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from segnode.node.events import (
    AssociationAccepted,
    AssociationRejected,
    CommitmentSettled,
    Delivered,
    Event,
    InstanceRefused,
)
from segnode.node.ops.views import STAGES, OpsDB, StageSpan
from segnode.storage.index import DeliveryState, JobState

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: seconds; from a quick CT ingest to a full TotalSegmentator run on the CPU.
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))

class NodeMetrics:
    """The node's metrics; :meth:`render` gives the Prometheus text exposition.

    Parameters
    ----------
    db:
        Read-only index view (jobs per state), or ``None``.
    disk_path:
        A path on the disk whose free space is reported.
    ingest_stats:
        A callable returning the SCP's counters (``stored``, ``bytes_stored``,
        ``duplicates``), or ``None``.
    """

    def __init__(self, db: OpsDB | None, disk_path: Path | None,
                 ingest_stats: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.associations = Counter("segnode_associations", "DICOM associations requested of the SCP",
                                    ["result"], registry=self.registry)
        self.rejections = Counter("segnode_rejections", "Associations and instances refused, by reason",
                                  ["reason"], registry=self.registry)
        self.stage_duration = Histogram("segnode_stage_duration_seconds", "Seconds a job spent in each stage",
                                        ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.dispatch_attempts = Counter("segnode_dispatch_attempts", "C-STORE attempts of results",
                                         ["destination"], registry=self.registry)
        self.dispatch_failures = Counter("segnode_dispatch_failures", "Failed C-STORE attempts of results",
                                         ["destination"], registry=self.registry)
        self.commitments = Counter("segnode_storage_commitments", "Storage Commitment outcomes (committed, failed, "
                                   "expired, refused)", ["destination", "outcome"], registry=self.registry)
        self.audit_errors = Counter("segnode_audit_errors", "Audit records that could not be written",
                                    registry=self.registry)
        for result in ("accepted", "rejected"):
            self.associations.labels(result)
        for stage in STAGES:
            self.stage_duration.labels(stage)
        self.registry.register(_StateCollector(db, disk_path, ingest_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- feeding ------------------------------------------------------------------
    def observe_spans(self, spans: list[StageSpan]) -> None:
        for span in spans:
            self.stage_duration.labels(span.stage).observe(span.seconds)

    def on_event(self, event: Event) -> None:
        """An :class:`~segnode.node.events.EventSink`: counts associations, refusals and delivery attempts."""
        match event:
            case AssociationAccepted():
                self.associations.labels("accepted").inc()
            case AssociationRejected(reason=reason):
                self.associations.labels("rejected").inc()
                self.rejections.labels(reason.value).inc()
            case InstanceRefused(reason=reason):
                self.rejections.labels(reason).inc()
            case Delivered(destination=destination, ok=ok):
                self.dispatch_attempts.labels(destination).inc()
                if not ok:
                    self.dispatch_failures.labels(destination).inc()
            case CommitmentSettled(destination=destination, outcome=outcome):
                self.commitments.labels(destination, outcome).inc()


class _StateCollector(Collector):
    """Values read at scrape time: jobs per state, SCP counters, free disk."""

    def __init__(self, db: OpsDB | None, disk_path: Path | None,
                 ingest_stats: Callable[[], dict[str, int]] | None) -> None:
        self.db = db
        self.disk_path = disk_path
        self.ingest_stats = ingest_stats

    def describe(self) -> list[Metric]:
        return []  # values come from outside; describe nothing so registration reads nothing

    def collect(self) -> Iterator[Metric]:
        stats = self.ingest_stats() if self.ingest_stats is not None else {}
        for name, key, text in (
            ("segnode_instances_received", "stored", "Instances stored in the spool"),
            ("segnode_bytes_received", "bytes_stored", "Bytes of the instances stored"),
            ("segnode_duplicates", "duplicates", "Instances received again (first copy kept)"),
        ):
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        if "listener_up" in stats:
            yield from _listener_metrics(stats)
        if self.db is not None:
            jobs = GaugeMetricFamily("segnode_jobs", "Jobs per state", labels=["state"])
            counts = self.db.counts()
            for state in JobState:
                jobs.add_metric([state.value], counts.get(state.value, 0))
            yield jobs
            yield _delivery_gauge(self.db)
        if self.disk_path is not None:
            yield GaugeMetricFamily("segnode_free_disk_bytes", "Free bytes on the state directory's disk",
                                    value=shutil.disk_usage(self.disk_path).free)


def _delivery_gauge(db: OpsDB) -> Metric:
    """Deliveries per state: ``stored`` awaits the destination's Storage Commitment, ``done`` is committed there."""
    gauge = GaugeMetricFamily("segnode_deliveries", "Deliveries per state (stored: awaiting Storage Commitment)",
                              labels=["state"])
    counts = {r[0]: r[1] for r in db.query("SELECT state, COUNT(*) FROM deliveries GROUP BY state")}
    for state in DeliveryState:
        gauge.add_metric([state.value], counts.get(state.value, 0))
    return gauge


def _listener_metrics(stats: dict[str, int]) -> Iterator[Metric]:
    """The accept loop's watchdog and the pending-connection gate (:mod:`segnode.node.ingest.guards`)."""
    yield GaugeMetricFamily("segnode_listener_up", "1 while the DICOM accept loop serves",
                            value=stats["listener_up"])
    yield CounterMetricFamily("segnode_accept_errors", "Failed accept() calls and thread starts (backed off)",
                              value=stats["accept_errors"])
    yield GaugeMetricFamily("segnode_connections_pending", "DICOM connections not yet associated",
                            value=stats["connections_pending"])
    yield CounterMetricFamily("segnode_connections_refused", "Connections closed at once: pending caps reached",
                              value=stats["connections_refused"])
