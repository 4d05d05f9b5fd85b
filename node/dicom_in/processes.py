"""Extra receiver processes: more SCPs on the same port, so concurrent associations use every core.

One process serves all its associations under one GIL; with
``limits.receiver_processes: N`` the node starts ``N - 1`` more processes,
each running the same receiver (:func:`segnode.node.dicom_in.server.start_scp`: allow-list, limits,
TLS, guards) on the same port with ``SO_REUSEPORT``, so the kernel spreads
new connections over the N listeners.  Each writes the shared spool and the
shared index itself (SQLite WAL; writers wait up to the busy timeout).

What the node's ops side sees of a receiver is forwarded over a pipe to the
main process: its typed events (:mod:`segnode.node.events`: associations
accepted and rejected, instances stored and refused, associations released),
passed as they are to the main receiver's sink; the ingest counters; and log
records.
A receiver exits when the main process stops it or dies (its pipe closes),
so a ``kill -9`` of the node leaves no listener behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from segnode.node.config import NodeConfig
from segnode.node.dicom_in.server import RunningSCP, start_scp
from segnode.node.events import Event
from segnode.node.ingest.store import IngestStats
from segnode.storage.index import Index
from segnode.storage.spool import Spool

logger = logging.getLogger(__name__)


class _Pipe:
    """The child's end of the pipe, shared by its threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, *message: Any) -> None:
        with self.lock:
            self.conn.send(message)

    def event(self, event: Event) -> None:
        """An :class:`~segnode.node.events.EventSink`: the event goes to the main process as it is."""
        self.send("event", event)


class _ForwardingStats(IngestStats):
    def __init__(self, pipe: _Pipe) -> None:
        super().__init__()
        self._pipe = pipe

    def add(self, **deltas: int) -> None:
        self._pipe.send("stats", deltas)


#: formats a record's traceback for the main process's log (a Handler has no formatException of its own)
_TRACEBACKS = logging.Formatter()


class _LogForwarder(logging.Handler):
    def __init__(self, pipe: _Pipe) -> None:
        super().__init__()
        self._pipe = pipe

    def emit(self, record: logging.LogRecord) -> None:
        self._pipe.send("log", {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                                "msg": record.getMessage(), "exc_text": _TRACEBACKS.formatException(record.exc_info)
                                if record.exc_info else None, "threadName": f"receiver-{os.getpid()}"})


def _child_main(config: NodeConfig, conn: Connection, log_level: int) -> None:
    """A receiver process: the SCP on the shared port until told to stop or the parent is gone."""
    pipe = _Pipe(conn)
    root = logging.getLogger()
    root.handlers[:] = [_LogForwarder(pipe)]
    root.setLevel(log_level)
    scp = start_scp(config, Spool(config.spool_dir), Index(config.index_path), pipe.event, reuse_port=True)
    scp.handler.stats = _ForwardingStats(pipe)
    from segnode.node.corrections import Corrections  # a stored SEG may correct a job, here as in the main process

    scp.handler.corrections = Corrections(config, scp.handler.index, scp.handler.spool, pipe.event)
    pipe.send("ready")
    try:
        conn.recv()  # "stop", or EOFError once the parent has died
    except (EOFError, OSError):
        pass
    scp.stop()
    os._exit(0)  # no interpreter teardown: nothing of the parent's to flush here


@dataclass
class _Receiver:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    reader: threading.Thread | None = None


class ReceiverPool:
    """``count`` receiver processes beside ``main`` (the main process's SCP, bound with ``SO_REUSEPORT``)."""

    def __init__(self, config: NodeConfig, main: RunningSCP, count: int) -> None:
        self.config = config.model_copy(update={"port": main.port})
        self.main = main
        self.count = count
        self._receivers: list[_Receiver] = []

    def start(self, timeout_s: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")  # the parent has threads: never fork it
        for _ in range(self.count):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(self.config, theirs, logging.getLogger().level),
                               name="segnode-receiver", daemon=True)
            proc.start()
            theirs.close()
            self._receivers.append(_Receiver(proc, ours))
        for rec in self._receivers:
            self._wait_ready(rec, timeout_s)
            rec.reader = threading.Thread(target=self._read, args=(rec,), name="segnode-receiver-pipe", daemon=True)
            rec.reader.start()
        logger.info("%d extra receiver process(es) on port %d", self.count, self.main.port)

    def _wait_ready(self, rec: _Receiver, timeout_s: float) -> None:
        while rec.conn.poll(timeout_s):
            try:
                message = rec.conn.recv()  # its start-up log lines come first
            except EOFError:  # it died; what it logged has been passed on
                break
            if message == ("ready",):
                return
            self._dispatch(message)
        raise RuntimeError(f"receiver process {rec.process.pid} did not start")

    def stop(self) -> None:
        for rec in self._receivers:
            try:
                rec.conn.send("stop")
            except OSError:
                pass
        for rec in self._receivers:
            rec.process.join(timeout=10)
            if rec.process.is_alive():
                rec.process.kill()
                rec.process.join()
            rec.conn.close()
        self._receivers.clear()

    @property
    def pids(self) -> list[int]:
        return [rec.process.pid for rec in self._receivers if rec.process.pid is not None]

    def _read(self, rec: _Receiver) -> None:
        while True:
            try:
                message = rec.conn.recv()
            except (EOFError, OSError):
                return
            self._dispatch(message)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind, *rest = message
        handler = self.main.handler
        if kind == "event":
            handler.events(rest[0])
        elif kind == "stats":
            handler.stats.add(**rest[0])
        elif kind == "log":
            record = logging.makeLogRecord(rest[0])
            logging.getLogger(record.name).handle(record)
