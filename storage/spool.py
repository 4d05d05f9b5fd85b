"""The durable spool: received instances as Part 10 files, named by the node.

Layout under the spool root::

    tmp/<random>.part                  being written; removed at start-up
    <StudyUID>/<SeriesUID>/<SOPUID>.dcm  one file per acknowledged instance

Every UID is checked against the UID grammar (:mod:`storage.uids`) before it
is joined to a path, so nothing a peer sends can name a file or escape the
root.  A write is: temporary file in ``tmp/`` (same file system), ``fsync``,
atomic ``rename`` into place, ``fsync`` of the directory.  A crash at any
point leaves either the complete file or no file under its final name.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from node.errors import StorageError
from storage.uids import check_uid

logger = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable store of received instances under ``root``.

    Parameters
    ----------
    root:
        The spool directory; created if missing.
    fsync:
        ``False`` only for benchmarks that measure the cost of durability.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.fsync = fsync
        self.tmp.mkdir(parents=True, exist_ok=True)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """Folder of one series (UIDs validated)."""
        study = check_uid(study_uid, "StudyInstanceUID")
        series = check_uid(series_uid, "SeriesInstanceUID")
        return self.root / study / series

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Final path of one instance (UIDs validated)."""
        sop = check_uid(sop_uid, "SOPInstanceUID")
        return self.series_dir(study_uid, series_uid) / f"{sop}.dcm"

    def write(self, study_uid: str, series_uid: str, sop_uid: str, parts: Iterable[bytes]) -> Path:
        """Write one instance durably and return its path.

        Raises
        ------
        InputError
            A UID does not follow the grammar (nothing is written).
        StorageError
            The write failed (disk full, I/O error); no file is left behind.
        """
        final = self.instance_path(study_uid, series_uid, sop_uid)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                for part in parts:
                    fh.write(part)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            self._ensure_dir(final.parent)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write instance: {exc.strerror or exc}", where=sop_uid) from exc
        return final

    def _ensure_dir(self, folder: Path) -> None:
        if folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        if self.fsync:  # make the new directory entries themselves durable
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)

    def free_bytes(self) -> int:
        """Free space on the spool's file system, in bytes (for unprivileged users)."""
        return shutil.disk_usage(self.root).free

    def remove_series(self, study_uid: str, series_uid: str) -> None:
        """Delete a series folder (housekeeping after success)."""
        folder = self.series_dir(study_uid, series_uid)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # the study folder, once empty
        except OSError:
            pass

    def clean_partial(self) -> int:
        """Remove temporary files a crash left behind; return how many."""
        removed = 0
        for part in self.tmp.glob("*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.info("removed %d partial file(s) from %s", removed, self.tmp)
        return removed

    def size_bytes(self) -> int:
        """Total size of the spooled files."""
        return sum(p.stat().st_size for p in self.root.glob("*/*/*.dcm"))
