"""What the node does with a pynetdicom association it opened and could not establish."""

from __future__ import annotations

from pynetdicom.association import Association


def close_unestablished(assoc: Association) -> None:
    """Close the socket of an association that ended before it was established.

    pynetdicom's ``AssociationSocket.close`` shuts the socket down before it
    closes it, and skips the close when the shutdown fails, as it does once
    the peer has closed its end (a peer that accepts the connection and drops
    it during negotiation, a black-holed address that resets).  The file
    descriptor then stayed open until the garbage collector found the
    association's cycle.  Found by a test of a source PACS that never answers.
    An association whose thread still runs is left to it.
    """
    wrapped = assoc.dul.socket
    raw = wrapped.socket if wrapped is not None else None
    if raw is not None and not assoc.is_alive():
        raw.close()
