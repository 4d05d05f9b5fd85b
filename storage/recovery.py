"""Start-up check: spooled instances that have no index row get one.

The SCP answers Success only after the spool file is durable and its index
row committed.  The index commits with ``synchronous=NORMAL`` (WAL): a crash
of the process loses nothing, but a power loss may lose the last commits.
The spool files are synced before the commit, so after a power loss every
acknowledged instance is still on disk; this scan finds those without a row
and indexes them again, which re-opens a ``received`` job for their series.
It also finds files linked into place just before a crash, before their
rows were written, and so never acknowledged.  The SCP links a file before
its data sync completes (the syncs overlap; :meth:`segnode.storage.spool.Spool.write`),
so such a file may be incomplete: its self-check (dataset length and XXH3 hash
in the file meta, :mod:`segnode.storage.part10`) tells, and an incomplete file is
removed (the sender, never answered, sends it again).  A complete one is
indexed.  Files without a self-check were synced before their link, and
are complete by construction.

What the row cannot recover is kept as the file says: the calling AE title
comes from the file meta's Source Application Entity Title (the SCP writes
it); the sender's host is not in the file and is recorded as ``unknown``.
"""

from __future__ import annotations

import logging

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from segnode.errors import InputError, StorageError
from segnode.storage.index import Index, InstanceRecord
from segnode.storage.part10 import verify
from segnode.storage.spool import Spool
from segnode.uids import check_uid

logger = logging.getLogger(__name__)

UNKNOWN_HOST = "unknown"


def reindex_spool(spool: Spool, index: Index, *, called_ae: str) -> int:
    """Index every spooled file that has no row; return how many were added."""
    files = list(spool.instances())
    known = index.known_instances(sop for _, _, sop, _ in files)  # the spool's files only, not a year's index
    added = 0
    for study, series, sop, path in files:
        if sop in known:
            continue
        try:
            if verify(path) is False:
                logger.warning("removing %s: incomplete (written when the node stopped, never acknowledged)",
                               path)
                path.unlink()
                continue
            record = _record(spool, study, series, sop, called_ae)
        except (InputError, StorageError, InvalidDicomError, OSError, ValueError) as exc:
            logger.error("spooled file %s cannot be indexed, left in place: %s", path, exc)
            continue
        if index.record_instance(record):
            added += 1
    if added:
        logger.warning("re-indexed %d spooled instance(s) whose index rows were lost (power loss?)", added)
    return added


def _record(spool: Spool, study: str, series: str, sop: str, called_ae: str) -> InstanceRecord:
    path = spool.instance_path(study, series, sop)  # validates the three UIDs
    ds = dcmread(path, stop_before_pixels=True,
                 specific_tags=["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"])
    found = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
             str(ds.get("SOPInstanceUID", "")))
    if found != (study, series, sop):
        raise StorageError("the UIDs in the file differ from its path", where=str(path))
    meta = ds.file_meta
    check_uid(str(meta.get("MediaStorageSOPClassUID", "")), "MediaStorageSOPClassUID")
    return InstanceRecord(
        sop_uid=sop, series_uid=series, study_uid=study,
        sop_class_uid=str(meta.MediaStorageSOPClassUID), transfer_syntax_uid=str(meta.TransferSyntaxUID),
        modality=str(ds.get("Modality", "")) or None, path=str(path.relative_to(spool.root)),
        size_bytes=path.stat().st_size,
        calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip() or "unknown",
        called_ae=called_ae, sender_host=UNKNOWN_HOST,
    )
