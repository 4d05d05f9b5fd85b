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
    """A peer that resets or drops a connection is logged by pynetdicom with a traceback; keep the line, drop it.

    A PACS restarting, or a black-holed destination closing, resets the
    node's association; the delivery's own warning says what happened to
    which job.  The soak (``bench/soak.py``) found these tracebacks in the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (ConnectionError, TimeoutError)):
            record.exc_info, record.exc_text = None, None
        return True


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
