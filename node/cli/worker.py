"""``segnode worker``: a remote segmentation worker consuming the broker's queues (docs/scaling.md).

    segnode worker --broker amqp://user@broker:5672// --queue gpu [--node-url URL]
                   [--state-dir DIR] [--weights-dir DIR] [--device cuda] [--concurrency 1]

The broker URL may come from ``$SEGNODE_BROKER_URL`` instead (it holds a
password: better not on the process list).  Each Celery pool process runs one
job at a time and keeps its models warm between jobs.  The state folder is
made private (0700) and its jobs folder emptied before the first job: it
holds only the jobs in progress (:func:`segnode.node.remote.worker.prepare_state`).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segnode.errors import ConfigError

if TYPE_CHECKING:
    from segnode.node.remote.worker import WorkerSettings

logger = logging.getLogger(__name__)

BROKER_ENV = "SEGNODE_BROKER_URL"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run jobs from the broker's queues on this machine (remote worker)")
    p.add_argument("--broker", help=f"AMQP URL of the broker (default ${BROKER_ENV})")
    p.add_argument("--queue", action="append", help="queue to consume (repeatable; default cpu)")
    p.add_argument("--node-url", help="the node's DICOMweb base URL (default: the one in each job message)")
    p.add_argument("--state-dir", type=Path,
                   help="this worker's scratch folder (default ~/.local/state/segnode-worker)")
    p.add_argument("--weights-dir", type=Path, help="this worker's model weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads per job")
    p.add_argument("--concurrency", type=int, default=1, help="jobs at a time (pool processes)")
    p.add_argument("--name", help="worker name (default segnode-<host>-<pid>)")
    p.set_defaults(func=cmd_worker)


def _settings(args: argparse.Namespace) -> WorkerSettings:
    """This worker's settings; its state folder made private and emptied of jobs a killed worker left."""
    from segnode.node.remote.worker import WorkerSettings, prepare_state

    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    state = args.state_dir or base / "segnode-worker"
    prepare_state(state)
    name = args.name or f"segnode-{socket.gethostname()}-{os.getpid()}"
    return WorkerSettings(state_dir=state, name=name, weights_dir=args.weights_dir, node_url=args.node_url,
                          device=args.device, threads=args.threads)


def cmd_worker(args: argparse.Namespace) -> int:
    from segnode.node.ops.logs import drop_broker_tracebacks
    from segnode.node.remote.broker import TASK, celery_app
    from segnode.node.remote.worker import handle

    url = args.broker or os.environ.get(BROKER_ENV)
    if not url or not url.startswith(("amqp://", "amqps://")):
        raise ConfigError(f"give the broker's AMQP URL (--broker or ${BROKER_ENV})")
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    queues = args.queue or ["cpu"]
    settings = _settings(args)
    app = celery_app(url, queues)
    drop_broker_tracebacks(tuple(app.connection_for_write().connection_errors))

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True)
    def segment(message: dict[str, Any]) -> str:
        return handle(message, settings)

    logger.info("worker %s consuming %s", settings.name, ", ".join(queues))
    print(f"segnode: worker {settings.name} consuming {', '.join(queues)}", flush=True)
    app.worker_main(["worker", "-Q", ",".join(queues), "-c", str(args.concurrency), "-P", "prefork",
                     "-n", f"{settings.name}@{socket.gethostname()}", "--without-gossip", "--without-mingle",
                     "--without-heartbeat", "-l", "INFO"])
    return 0
