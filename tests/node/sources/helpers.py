"""Studies for the sources tests: small CT series with an accession number, uploaded to Orthanc."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from segnode.node.config import NodeConfig
from segnode.node.ingest.store import StoreHandler
from segnode.storage.index import Index
from segnode.storage.spool import Spool

from tests.peers import OrthancPeer
from tests.phantoms import thorax_phantom, write_ct_series


@dataclass(frozen=True)
class Study:
    folder: Path
    study_uid: str
    series_uid: str
    accession: str
    count: int


def write_study(folder: Path, accession: str, *, patient_id: str = "SRC-PAT-1", slices: int = 100,
                seed: int = 0) -> Study:
    """A chest phantom series (48×48 pixels) whose every file carries ``accession``."""
    v = thorax_phantom(shape=(slices, 48, 48), spacing=(8.0, 8.0, 2.0), seed=seed).volume
    paths = write_ct_series(v.hu, folder, v.spacing, v.origin, v.direction, patient_id=patient_id)
    for path in paths:
        ds = dcmread(path)
        ds.AccessionNumber = accession
        ds.save_as(path, enforce_file_format=True)
    first = dcmread(paths[0], stop_before_pixels=True)
    return Study(folder, first.StudyInstanceUID, first.SeriesInstanceUID, accession, len(paths))


def upload(pacs: OrthancPeer, study: Study) -> None:
    """Every file of ``study`` into Orthanc by its REST API."""
    for path in sorted(study.folder.glob("*.dcm")):
        request = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/instances", data=path.read_bytes(),
                                         method="POST", headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


def store_path(config: NodeConfig) -> tuple[StoreHandler, Index]:
    """The node's store path over ``config``'s state directory (as ``segnode fetch`` opens it)."""
    index = Index(config.index_path)
    return StoreHandler(config, Spool(config.spool_dir), index), index
