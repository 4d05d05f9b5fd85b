"""Starting the DICOM receiver: its TLS context, the listening server, and the handle the service keeps.

:func:`start_scp` listens on ``config.host:config.port`` with the receiver of
:mod:`segnode.node.dicom_in.receiver` (plain TCP, or TLS when ``tls:`` is
configured) in a background thread and returns a :class:`RunningSCP`.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass

from segnode.node.config import NodeConfig
from segnode.node.dicom_in.receiver import NativeServer
from segnode.node.events import EventSink, discard
from segnode.node.ingest.guards import ListenerHealth, listener_health
from segnode.node.ingest.store import StoreHandler
from segnode.storage.index import Index
from segnode.storage.spool import Spool

logger = logging.getLogger(__name__)


def server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    """The receiver's TLS context: TLS 1.2 or later, our certificate and key, ``client_ca`` → a client certificate."""
    if config.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    if config.tls.client_ca is not None:
        ctx.load_verify_locations(str(config.tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class RunningSCP:
    """A listening receiver; ``stop()`` closes the port, its connections, and waits for the accept thread."""

    server: NativeServer
    handler: StoreHandler
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def health(self) -> ListenerHealth:
        """The accept loop's watchdog (``/readyz``, metrics)."""
        return listener_health(self.server.watchdog, self.server.gate, self.thread.is_alive())

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


def start_scp(config: NodeConfig, spool: Spool, index: Index, events: EventSink = discard, *,
              reuse_port: bool = False) -> RunningSCP:
    """Listen on ``config.host:config.port`` in a background thread; what happens goes to ``events``.

    ``reuse_port``: bind with ``SO_REUSEPORT``, so receiver processes
    (:mod:`segnode.node.dicom_in.processes`) can listen on the same port.
    """
    handler = StoreHandler(config, spool, index, events)
    server = NativeServer(config, handler, reuse_port=reuse_port, ssl_context=server_ssl_context(config))
    thread = threading.Thread(target=server.serve_forever, name="segnode-scp", daemon=True)
    thread.start()
    logger.info("SCP %s listening on %s:%d%s", config.ae_title, config.host, server.server_address[1],
                " (TLS)" if config.tls is not None else "")
    return RunningSCP(server, handler, thread)
