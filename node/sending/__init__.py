"""Sending results to destinations: a sender per destination behind one interface, and a queue each.

- :mod:`~segnode.node.sending.sender`: the :class:`Sender` protocol, the typed :class:`SendResult`,
  the deadlines of one try, and :func:`sender_for` (which sender a destination gets);
- :mod:`~segnode.node.sending.dimse`: C-STORE / C-ECHO (pynetdicom as SCU);
- :mod:`~segnode.node.sending.stow`: STOW-RS (dicomweb-client, its retries off);
- :mod:`~segnode.node.sending.delivery`: one try of one delivery, recorded in the index;
- :mod:`~segnode.node.sending.queues`: a delivery queue and worker thread(s) per destination.

The retry policy itself is the hub's (:mod:`segnode.node.dispatch`).  Senders know nothing of models.
"""
