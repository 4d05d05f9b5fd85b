"""What the node can show a viewer: the spooled series and the jobs' results, as DICOM instances.

The DICOMweb read side (QIDO-RS, :mod:`segnode.node.http_in.qido`; WADO-RS,
:mod:`segnode.node.http_in.wado`) asks a :class:`Catalogue` for the instances
of a study or series; :class:`IndexCatalogue` answers from the index (its own
read-only SQLite connection per thread, as the ops views read it) and the
files it names: every instance of a series not yet purged from the spool, and
every DICOM object a job encoded (SEG, RTSTRUCT, SR, overlay images) under its
job folder, except the results of superseded jobs.  Headers are read with
pydicom (no pixel data) and kept in a bounded cache keyed by file, size and
modification time.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from segnode.errors import InputError, StorageError
from segnode.uids import is_valid_uid

logger = logging.getLogger(__name__)

#: job states whose results a viewer is shown (a superseded job's result was replaced)
HIDDEN_STATES = ("superseded",)
HEADER_CACHE = 20_000


@dataclass(frozen=True)
class StoredInstance:
    """One DICOM instance the node holds: its UIDs and its Part 10 file."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    source: str  # "spool" or "job-N"


class Catalogue(Protocol):
    """The instances a DICOMweb read request may see (the node's spool and its jobs' results)."""

    def study_uids(self) -> list[str]: ...

    def instances(self, study_uid: str | None = None, series_uid: str | None = None) -> list[StoredInstance]: ...

    def header(self, instance: StoredInstance) -> Dataset: ...


class HeaderCache:
    """Headers (no pixel data) of Part 10 files, by path, size and modification time; bounded, thread-safe."""

    def __init__(self, limit: int = HEADER_CACHE) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int, int], Dataset] = OrderedDict()

    def get(self, path: Path) -> Dataset:
        try:
            stat = path.stat()
        except OSError as exc:
            raise StorageError(f"cannot read an instance: {exc.strerror}", where=path.name) from exc
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        header = read_header(path)
        with self._lock:
            self._cache[key] = header
            while len(self._cache) > self.limit:
                self._cache.popitem(last=False)
        return header


def read_header(path: Path) -> Dataset:
    """The dataset of ``path`` up to its pixel data (``InputError`` when it is not DICOM)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InputError(f"not a readable DICOM file: {exc}", where=path.name) from exc


class IndexCatalogue:
    """The catalogue of a node: its index (read-only), its spool folder and its jobs' folders."""

    def __init__(self, index_path: Path, spool_root: Path, *, headers: HeaderCache | None = None) -> None:
        self.index_path = Path(index_path)
        self.spool_root = Path(spool_root).resolve()
        self.headers = headers or HeaderCache()
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True, timeout=10)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open the index read-only: {exc}", where=str(self.index_path)) from exc
            self._local.db = db
        return db

    def _rows(self, sql: str, params: Iterable[str]) -> list[tuple[str, ...]]:
        try:
            return list(self._db().execute(sql, tuple(params)))
        except sqlite3.Error as exc:
            raise StorageError(f"index query failed: {exc}", where=str(self.index_path)) from exc

    def study_uids(self) -> list[str]:
        rows = self._rows("SELECT DISTINCT study_uid FROM series WHERE purged_at IS NULL UNION "
                          "SELECT DISTINCT study_uid FROM jobs WHERE outputs != '[]' AND state NOT IN "
                          f"({','.join('?' * len(HIDDEN_STATES))}) ORDER BY 1", HIDDEN_STATES)
        return [r[0] for r in rows]

    def instances(self, study_uid: str | None = None, series_uid: str | None = None) -> list[StoredInstance]:
        return self._spooled(study_uid, series_uid) + self._results(study_uid, series_uid)

    def header(self, instance: StoredInstance) -> Dataset:
        return self.headers.get(instance.path)

    def _spooled(self, study_uid: str | None, series_uid: str | None) -> list[StoredInstance]:
        where, params = ["s.purged_at IS NULL"], []
        if study_uid is not None:
            where.append("s.study_uid = ?")
            params.append(study_uid)
        if series_uid is not None:
            where.append("i.series_uid = ?")
            params.append(series_uid)
        rows = self._rows("SELECT s.study_uid, i.series_uid, i.sop_uid, i.sop_class_uid, i.path FROM instances i "
                          "JOIN series s ON s.series_uid = i.series_uid WHERE " + " AND ".join(where)
                          + " ORDER BY i.series_uid, i.path", params)
        out = []
        for study, series, sop, sop_class, rel in rows:
            path = (self.spool_root / rel).resolve()
            if self.spool_root in path.parents:  # rows are written by the node; guard anyway
                out.append(StoredInstance(study, series, sop, sop_class, path, "spool"))
        return out

    def _results(self, study_uid: str | None, series_uid: str | None) -> list[StoredInstance]:
        where = [f"state NOT IN ({','.join('?' * len(HIDDEN_STATES))})", "outputs != '[]'", "result_dir IS NOT NULL"]
        params = list(HIDDEN_STATES)
        if study_uid is not None:
            where.append("study_uid = ?")
            params.append(study_uid)
        rows = self._rows("SELECT job_id, study_uid, result_dir, outputs FROM jobs WHERE " + " AND ".join(where)
                          + " ORDER BY job_id", params)
        out: list[StoredInstance] = []
        for job_id, study, folder, outputs in rows:
            for item in _dicom_outputs(outputs):
                if series_uid is not None and item["series_instance_uid"] != series_uid:
                    continue
                root = Path(folder).resolve()
                path = (root / item["path"]).resolve()
                if root in path.parents and path.is_file():
                    out.append(StoredInstance(str(study), item["series_instance_uid"], item["sop_instance_uid"],
                                              item["sop_class_uid"], path, f"job-{job_id}"))
        return out


def _dicom_outputs(outputs: str) -> list[dict[str, str]]:
    """The job's encoded objects that are DICOM instances (valid UIDs), from its ``outputs`` column."""
    try:
        items = json.loads(outputs)
    except ValueError:
        return []
    keys = ("path", "sop_class_uid", "sop_instance_uid", "series_instance_uid")
    return [item for item in items if isinstance(item, dict) and all(isinstance(item.get(k), str) for k in keys)
            and all(is_valid_uid(item[k]) for k in keys[1:])]
