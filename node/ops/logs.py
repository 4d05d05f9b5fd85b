"""Logging set-up for the command line and the service (never at import time)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


#: where pynetdicom logs a peer's reset with ``LOGGER.exception`` (its DUL reading a PDU, its transport)
PYNETDICOM_LOGGERS = ("pynetdicom.dul", "pynetdicom.transport", "pynetdicom.assoc", "pynetdicom.acse")


class PeerGoneFilter(logging.Filter):
    """A peer that resets or drops a connection is logged by a library with a traceback; keep the line, drop it.

    A PACS restarting, or a black-holed destination closing, resets the
    node's association, and pynetdicom logs it with ``LOGGER.exception``; a
    broker restarting does the same to a worker's Celery and kombu (\"Couldn't
    ack ...\").  The line says what happened; the soak (``bench/soak.py``) found
    the tracebacks in the logs.  ``loggers``: only the records of these loggers
    and their children (empty: every record that reaches the filter).
    """

    def __init__(self, errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError),
                 loggers: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.errors, self.loggers = errors, loggers

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.errors) and (
                not self.loggers or any(record.name == n or record.name.startswith(n + ".") for n in self.loggers)):
            record.exc_info, record.exc_text = None, None
        return True


def drop_broker_tracebacks(errors: tuple[type[BaseException], ...]) -> None:
    """A worker's log keeps Celery's and kombu's lines about a lost broker connection (``errors``), not tracebacks."""
    gone = PeerGoneFilter(errors, ("celery", "kombu", "amqp"))
    for handler in logging.getLogger().handlers:
        handler.addFilter(gone)


def configure(verbosity: int = 0, as_json: bool = False) -> None:
    """Log to stderr, or to stdout when ``$SEGNODE_LOG_STREAM`` is ``stdout`` (containers)."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stdout if os.environ.get("SEGNODE_LOG_STREAM") == "stdout" else sys.stderr)
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "highdicom", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    for name in PYNETDICOM_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, PeerGoneFilter) for f in logger.filters):
            logger.addFilter(PeerGoneFilter())
    warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """Libraries' warnings (highdicom's person-name form, ...) go to the log at DEBUG, not to the operator."""
    logging.getLogger("py.warnings").debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno)
