"""QIDO-RS and WADO-RS of a running node with ``dicomweb-client`` as the client.

``segnode serve`` takes the CTA by STOW-RS, segments the lungs and holds the
result; a client with ``retrieve`` then searches and reads the CT and the
job's SEG back, and every answer is compared with what pydicom reads from the
files the node holds.  Refusals (no token, a client without ``retrieve``, bad
UIDs, unknown studies, a path that climbs) are answered 4xx with a reason.
"""

from __future__ import annotations

import http.client
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
import requests
import yaml
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from segnode.storage.index import Index, JobState

from tests.node.http_in.test_dicomweb import token_file
from tests.paths import DATA
from tests.peers import free_port, node, wait_until, write_node_config

THORAX = DATA / "thorax_cta"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
pytestmark = [pytest.mark.peer, pytest.mark.slow]


def test_dicomweb_client_searches_and_reads_the_ct_and_the_jobs_seg(tmp_path: Path) -> None:
    reader_token_path, reader_token = token_file(tmp_path / "viewer.token")
    sender_token_path, sender_token = token_file(tmp_path / "ris.token")
    port = free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "hold", "fallback": True, "action": {
        "profile": "lungs", "backend": "hu_based", "destinations": ["pacs"], "review": "always"}}]}))
    config = write_node_config(tmp_path / "node.yaml", routes=str(routes), destinations=[
        {"name": "pacs", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}], dicomweb={
        "enabled": True, "port": port, "clients": [
            {"name": "ris", "token_file": str(sender_token_path), "ae_title": "RIS"},
            {"name": "viewer", "token_file": str(reader_token_path), "store": False, "retrieve": True}]})
    datasets = [dcmread(p) for p in sorted(THORAX.iterdir())]
    study, ct_series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    url = f"http://127.0.0.1:{port}/dicomweb"
    with node(config) as n:
        DICOMwebClient(url, headers={"Authorization": f"Bearer {sender_token}"}).store_instances(datasets)
        index = Index(n.state_dir / "index.sqlite")
        held = wait_until(lambda: next((j for j in index.jobs() if j.state in {
            JobState.HELD, JobState.FAILED, JobState.DONE}), None), 180, "the held job", interval=0.2)
        assert held.state is JobState.HELD, held.reason
        seg_file = next(held.file(o["path"]) for o in held.outputs if o["sop_class_uid"] == SEG)
        web = DICOMwebClient(url, headers={"Authorization": f"Bearer {reader_token}"})

        [found] = web.search_for_studies(search_filters={"PatientID": datasets[0].PatientID})
        assert found["00080061"]["Value"] == ["CT", "SEG"] and found["00201208"]["Value"] == [165]
        assert web.search_for_studies(search_filters={"PatientID": "nobody"}) == []
        series = web.search_for_series(study)
        assert {s["0020000E"]["Value"][0] for s in series} == {ct_series, held.seg_series_uid}
        [seg_row] = web.search_for_series(study, search_filters={"Modality": "SEG"})
        assert seg_row["00201209"]["Value"] == [1]
        page = web.search_for_instances(study, ct_series, limit=50, offset=150)
        assert len(page) == 14 and {i["00080018"]["Value"][0] for i in page} <= {d.SOPInstanceUID for d in datasets}
        [one] = web.search_for_instances(study, ct_series, fields=["SliceThickness"],
                                         search_filters={"SOPInstanceUID": datasets[7].SOPInstanceUID})
        assert one["00180050"]["Value"] == [float(datasets[7].SliceThickness)]

        metadata = web.retrieve_series_metadata(study, ct_series)
        assert len(metadata) == 164
        meta = next(m for m in metadata if m["00080018"]["Value"][0] == datasets[7].SOPInstanceUID)
        assert meta["00200032"]["Value"] == [float(v) for v in datasets[7].ImagePositionPatient]
        pixel_uri = meta["7FE00010"]["BulkDataURI"]  # the path on this server, for any host and port
        assert pixel_uri == (f"/dicomweb/studies/{study}/series/{ct_series}/instances/{datasets[7].SOPInstanceUID}"
                             "/bulkdata/7FE00010")
        assert web.retrieve_bulkdata(urljoin(url, pixel_uri), media_types=("application/octet-stream",))[0] \
            == datasets[7].PixelData

        [frame] = web.retrieve_instance_frames(study, ct_series, datasets[7].SOPInstanceUID, frame_numbers=[1])
        pixels = np.frombuffer(frame, "<i2").reshape(datasets[7].Rows, datasets[7].Columns)
        np.testing.assert_array_equal(pixels, datasets[7].pixel_array)

        seg = web.retrieve_instance(study, held.seg_series_uid, held.seg_sop_uid)
        truth = dcmread(seg_file)
        assert seg.SOPClassUID == SEG and seg.SOPInstanceUID == truth.SOPInstanceUID
        assert seg.PixelData == truth.PixelData
        seg_meta = web.retrieve_instance_metadata(study, held.seg_series_uid, held.seg_sop_uid)
        assert len(seg_meta["00620002"]["Value"]) == len(truth.SegmentSequence)
        study_files = web.retrieve_study(study)
        assert len(study_files) == 165

        for path, status, reason in refusals(url, reader_token, sender_token, study, ct_series):
            got = requests.get(path[0], headers=path[1], timeout=30)
            assert got.status_code == status and reason in got.json()["error"], (path[0], got.text)
        status, body = raw_get(port, "/dicomweb/studies/../../../etc/passwd", reader_token)
        assert status == 404 and b"no such DICOMweb resource" in body
        status, body = raw_get(port, "/dicomweb/studies/..%2F..%2Fetc/series", reader_token)
        assert status == 400 and b"valid DICOM UID" in body


def refusals(url: str, reader: str, sender: str, study: str, series: str):  # type: ignore[no-untyped-def]
    auth = {"Authorization": f"Bearer {reader}"}
    return [
        ((f"{url}/studies", {}), 401, "token"),
        ((f"{url}/studies", {"Authorization": f"Bearer {sender}"}), 403, "may not retrieve"),
        ((f"{url}/studies/1.2.abc/series", auth), 400, "valid DICOM UID"),
        ((f"{url}/studies/1.2.3", auth), 404, "no such"),
        ((f"{url}/studies/{study}/series/{series}/instances/1.2.3/frames/1", auth), 404, "no such"),
        ((f"{url}/studies?NoSuchAttribute=1", auth), 400, "unknown attribute"),
        ((f"{url}/studies?limit=x", auth), 400, "limit"),
    ]


def raw_get(port: int, target: str, token: str) -> tuple[int, bytes]:
    """A GET with the target sent as it is (no client-side normalising of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", target, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body
