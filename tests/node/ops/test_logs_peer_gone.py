"""A peer's reset is logged by pynetdicom with a traceback; the node's log keeps the line, not the traceback.

Found by the soak (bench/soak.py): a PACS restarting and a black-holed destination
closing reset the node's associations, and pynetdicom's DUL logged each reset with
``LOGGER.exception``.
"""

from __future__ import annotations

import io
import logging
import socket
import struct
from collections.abc import Iterator

import pytest
from segnode.node.ops.logs import configure

@pytest.fixture
def node_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure(0)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize("name", ["pynetdicom.dul", "pynetdicom.transport"])
def test_a_peer_that_resets_the_association_leaves_no_traceback(node_log: io.StringIO, name: str) -> None:
    """As pynetdicom's DUL logs a reset read (``dul.py``: ``LOGGER.exception(exc)``)."""
    ours, theirs = socket.socketpair()
    with ours:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()
        try:
            ours.send(b"x" * 10)
            ours.recv(6)
        except ConnectionError as exc:
            logging.getLogger(name).error("Connection closed before the entire PDU was received")
            logging.getLogger(name).exception(exc)
    try:
        raise ValueError("a bug of ours or of the library")
    except ValueError:
        logging.getLogger(name).exception("not a peer gone")
    text = node_log.getvalue()
    assert "Connection closed before the entire PDU was received" in text  # the lines are kept
    assert text.count("Traceback") == 1 and "ValueError" in text, text  # only the real error's traceback
