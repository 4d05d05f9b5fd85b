"""What operators see of the broker, the remote workers and DICOMweb: a status page section and metrics.

=============================================  =======  ==========================================
metric                                         type     source
=============================================  =======  ==========================================
``segnode_broker_up``                          gauge    1 when the broker answered the last look
``segnode_broker_queue_messages``              gauge    messages ready per ``queue`` (not yet taken)
``segnode_broker_queue_consumers``             gauge    workers consuming each ``queue``
``segnode_remote_jobs_in_flight``              gauge    jobs enqueued, no result yet, per ``queue``
``segnode_remote_jobs_enqueued_total``         counter  messages published
``segnode_remote_results_total``               counter  results by ``outcome`` (accepted, ignored)
``segnode_remote_publish_failures_total``      counter  publishes the broker did not take
``segnode_remote_timeouts_total``              counter  jobs enqueued again: no result in time
``segnode_dicomweb_instances_total``           counter  STOW-RS instances by ``result``
``segnode_dicomweb_requests_total``            counter  requests by ``kind`` (stow, wado, unauthorized)
=============================================  =======  ==========================================
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # the broker's client is imported only when a broker is configured
    from segnode.node.http_in.dicomweb import RunningDicomWeb
    from segnode.node.remote.jobs import RemoteJobs


class ScaleoutSource(Protocol):
    """The node's remote jobs and DICOMweb server, when configured (:class:`segnode.node.service.Service`)."""

    @property
    def remote(self) -> RemoteJobs | None: ...

    @property
    def dicomweb(self) -> RunningDicomWeb | None: ...


class ScaleoutCollector(Collector):
    """Reads the running service's :class:`segnode.node.remote.jobs.RemoteJobs` and DICOMweb server at scrape time."""

    def __init__(self, service: ScaleoutSource) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        remote = self.service.remote
        if remote is not None:
            yield from _remote_metrics(remote.snapshot())
        dicomweb = self.service.dicomweb
        if dicomweb is not None:
            yield from _dicomweb_metrics(dict(dicomweb.app.stats))


def _remote_metrics(snap: dict[str, Any]) -> Iterator[Metric]:
    up = GaugeMetricFamily("segnode_broker_up", "1 when the broker answered the last look")
    up.add_metric([], 1.0 if snap["queues"] else 0.0)
    yield up
    ready = GaugeMetricFamily("segnode_broker_queue_messages", "messages ready per queue", labels=["queue"])
    consumers = GaugeMetricFamily("segnode_broker_queue_consumers", "consumers per queue", labels=["queue"])
    for name, depth in snap["queues"].items():
        ready.add_metric([name], depth["ready"])
        consumers.add_metric([name], depth["consumers"])
    yield ready
    yield consumers
    flying = GaugeMetricFamily("segnode_remote_jobs_in_flight", "jobs enqueued without a result", labels=["queue"])
    per_queue: dict[str, int] = {}
    for flight in snap["in_flight"]:
        per_queue[flight["queue"]] = per_queue.get(flight["queue"], 0) + 1
    for name, count in per_queue.items():
        flying.add_metric([name], count)
    yield flying
    counters = snap["counters"]
    for name, key, text in (("segnode_remote_jobs_enqueued", "enqueued", "messages published"),
                            ("segnode_remote_publish_failures", "publish_failures", "publishes refused"),
                            ("segnode_remote_timeouts", "timeouts", "jobs enqueued again after no result")):
        metric = CounterMetricFamily(name, text)
        metric.add_metric([], counters[key])
        yield metric
    results = CounterMetricFamily("segnode_remote_results", "remote results by outcome", labels=["outcome"])
    results.add_metric(["accepted"], counters["results_accepted"])
    results.add_metric(["ignored"], counters["results_ignored"])
    yield results


def _dicomweb_metrics(stats: dict[str, int]) -> Iterator[Metric]:
    instances = CounterMetricFamily("segnode_dicomweb_instances", "STOW-RS instances by result", labels=["result"])
    instances.add_metric(["stored"], stats["stow_instances"])
    instances.add_metric(["refused"], stats["stow_failed"])
    yield instances
    requests = CounterMetricFamily("segnode_dicomweb_requests", "DICOMweb requests by kind", labels=["kind"])
    for kind, key in (("stow", "stow_requests"), ("wado", "wado_series"), ("unauthorized", "unauthorized")):
        requests.add_metric([kind], stats[key])
    yield requests


def render_remote(snap: dict[str, Any], now: float | None = None) -> str:
    """The status page's "Remote workers" section: queues and in-flight jobs."""
    now = time.time() if now is None else now
    e = html.escape
    if snap["queues"]:
        rows = "".join(f"<tr><td>{e(name)}</td><td class=n>{d['ready']}</td><td class=n>{d['consumers']}</td></tr>"
                       for name, d in snap["queues"].items())
        queues = f"<table id=broker-queues><tr><th>queue</th><th>waiting</th><th>workers</th></tr>{rows}</table>"
    else:
        queues = "<p class=notready id=broker-queues>broker unreachable: jobs wait in the index</p>"
    flights = "".join(
        f"<tr><td>{f['job_id']}</td><td>{f['attempt']}</td><td>{e(f['queue'])}</td><td>{e(f['priority'])}</td>"
        f"<td class=n>{now - f['enqueued_at']:.0f} s</td><td>{e(f['fetched_by'] or '—')}</td></tr>"
        for f in snap["in_flight"])
    table = "<p class=muted id=in-flight>no job in flight</p>"
    if flights:
        table = ("<table id=in-flight><tr><th>job</th><th>attempt</th><th>queue</th><th>priority</th>"
                 f"<th>waiting</th><th>worker</th></tr>{flights}</table>")
    c = snap["counters"]
    summary = (f"<div class=muted>enqueued {c['enqueued']} · results accepted {c['results_accepted']}, "
               f"ignored {c['results_ignored']} · publish failures {c['publish_failures']} · "
               f"timeouts {c['timeouts']}</div>")
    return f"<h2>Remote workers</h2>{queues}{table}{summary}"
