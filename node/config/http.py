"""The ``http:`` and ``audit:`` sections of the node configuration.

Kept apart from :mod:`segnode.node.config` so the ops modules (HTTP API, metrics,
audit log) own their settings; :class:`segnode.node.config.NodeConfig` embeds them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field
from segnode.yamlconf import Frozen


class HttpConfig(Frozen):
    """The ops HTTP server: API, status page, ``/metrics``.

    Bound to loopback by default.  ``token_file`` names a file holding the
    shared bearer token for machine clients; a token file or accounts
    (``segnode users add``) are mandatory when ``host`` is not a loopback address.
    Login sessions end after ``session_idle_s`` without a request or
    ``session_max_s`` after login; after ``login_free_failures`` failed logins
    for a name or from an address the next attempt waits ``login_delay_s`` and
    each further one twice as long (at most ``login_max_delay_s``).  ``secure_cookie`` marks the session cookie
    ``Secure`` (set it when a TLS proxy fronts the node).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)
    token_file: Path | None = None
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    session_idle_s: float = Field(1800.0, gt=0)
    session_max_s: float = Field(12 * 3600.0, gt=0)
    login_free_failures: int = Field(5, ge=1, le=100)
    login_delay_s: float = Field(1.0, gt=0)
    login_max_delay_s: float = Field(900.0, ge=1)
    secure_cookie: bool = False

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name other than localhost may resolve anywhere
            return False


class AuditConfig(Frozen):
    """The append-only audit log (JSON lines); see ``docs/operators-guide.md``.

    ``path`` defaults to ``<state_dir>/audit/audit.jsonl``.  ``fsync: always``
    makes each record durable before the node moves on; ``never`` leaves it to
    the operating system.  The file is rotated (renamed, never truncated or
    deleted) when it passes ``rotate_bytes``.
    """

    path: Path | None = None
    fsync: Literal["always", "never"] = "always"
    rotate_bytes: int = Field(64 * 1024 * 1024, ge=4096)
    poll_interval_s: float = Field(0.5, gt=0)
