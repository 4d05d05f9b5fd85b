"""A logging handler that collects the tracebacks logged while a fuzz runs (the DICOM port's and the HTTP side's).

segnode's own are a finding, by logger and message; a library's (a peer's
reset logged by pynetdicom's DUL, say) are only counted.
"""

from __future__ import annotations

import logging
from typing import Protocol


class TracebackFindings(Protocol):
    tracebacks: list[str]
    library_tracebacks: int


class TracebackLog(logging.Handler):
    def __init__(self, findings: TracebackFindings) -> None:
        super().__init__(logging.DEBUG)
        self.findings = findings

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            if record.name.startswith("segnode"):
                self.findings.tracebacks.append(f"{record.name}: {record.getMessage()}")
            else:
                self.findings.library_tracebacks += 1
