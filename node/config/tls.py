"""``tls:`` of a peer the node connects to (a destination, a DIMSE source), and the client context it makes."""

from __future__ import annotations

import ssl
from pathlib import Path

from segnode.yamlconf import Frozen


class ClientTLS(Frozen):
    """TLS when the node connects to a peer: the CA it trusts, its own certificate, whether the name is checked."""

    ca: Path | None = None  # None: the system trust store
    cert: Path | None = None
    key: Path | None = None
    check_hostname: bool = True

    def tls_args(self, host: str) -> tuple[ssl.SSLContext, str]:
        """pynetdicom's ``tls_args`` for connecting to ``host``: the client context and the server name."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca) if self.ca else None)
        ctx.check_hostname = self.check_hostname
        if self.cert is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return ctx, host
