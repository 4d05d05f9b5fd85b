"""The Celery application the node and the remote workers share (RabbitMQ as broker).

One durable queue per kind of machine (``gpu``, ``cpu``: ``broker.queues``),
each with RabbitMQ message priorities (``x-max-priority``); persistent
messages, publisher confirms; workers acknowledge a message only after the
job's result reached the node (``acks_late``), a worker killed mid-job gives
its message back (``reject_on_worker_lost``), and each worker process takes
one message at a time (prefetch 1).  No result backend: results go to the
node over HTTP (:mod:`segnode.node.remote.jobs`), whose index stays the source of truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kombu import Exchange, Queue

TASK = "segnode.segment"
EXCHANGE = "segnode"
MAX_PRIORITY = 10


def declare_queues(names: Sequence[str]) -> list[Queue]:
    exchange = Exchange(EXCHANGE, type="direct", durable=True)
    return [Queue(name, exchange, routing_key=name, durable=True, queue_arguments={"x-max-priority": MAX_PRIORITY})
            for name in names]


def celery_app(url: str, queues: Sequence[str], *, connect_timeout_s: float = 10.0) -> Any:
    """A Celery app on ``url`` with segnode's queues and delivery guarantees (nothing started)."""
    from celery import Celery

    app = Celery("segnode", broker=url, set_as_current=False)
    app.conf.update(
        task_queues=declare_queues(queues),
        task_default_queue=queues[0],
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,
        task_default_delivery_mode="persistent",
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for a restarted broker for as long as it takes
        broker_connection_timeout=connect_timeout_s,
        broker_heartbeat=30,
        broker_transport_options={"confirm_publish": True},
        broker_pool_limit=4,
    )
    return app
