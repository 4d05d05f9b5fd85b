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
    bearer token; it is mandatory when ``host`` is not a loopback address.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)
    token_file: Path | None = None
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)

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
