"""DICOM in: the node's receiver (C-ECHO, C-STORE over TCP or TLS), its PDUs, and the extra receiver processes.

:mod:`~segnode.node.dicom_in.server` starts it, :mod:`~segnode.node.dicom_in.receiver`
serves the upper layer, :mod:`~segnode.node.dicom_in.pdu` decodes and encodes PDUs,
:mod:`~segnode.node.dicom_in.processes` runs more receivers on the same port.
"""
