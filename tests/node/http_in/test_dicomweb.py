"""DICOMweb with real peers: ``dicomweb-client`` stores into ``segnode serve`` by STOW-RS, and the
job's SEG reaches Orthanc's DICOMweb plugin by STOW-RS.
"""

from __future__ import annotations

import http.client
import secrets
from pathlib import Path

import pytest
import requests
import yaml
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from segnode.node.http_in.multipart import encode_parts
from segnode.storage.index import Index, JobState

from tests.paths import DATA
from tests.peers import (
    ORTHANC_DICOMWEB_PLUGIN,
    free_port,
    node,
    orthanc,
    wait_until,
    write_node_config,
)
from tests.phantoms import thorax_phantom, write_ct_series

THORAX = DATA / "thorax_cta"
pytestmark = [pytest.mark.peer, pytest.mark.slow]
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def token_file(path: Path) -> tuple[Path, str]:
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


def dicomweb_node(tmp_path: Path, destinations: list[dict], *,
                  max_body: int = 64 * 1024 * 1024) -> tuple[Path, str, int]:
    tok_path, token = token_file(tmp_path / "ris.token")
    port = free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "everything", "fallback": True, "action": {
        "profile": "lungs", "destinations": [d["name"] for d in destinations]}}]}))
    config = write_node_config(tmp_path / "node.yaml", destinations=destinations, routes=str(routes), dicomweb={
        "enabled": True, "port": port, "max_body_bytes": max_body,
        "clients": [{"name": "ris", "token_file": str(tok_path), "ae_title": "RIS"}]})
    return config, token, port


def client(port: int, token: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"http://127.0.0.1:{port}/dicomweb", headers={"Authorization": f"Bearer {token}"})


def test_stow_into_the_node_and_seg_to_orthanc_by_stow(tmp_path: Path) -> None:
    assert ORTHANC_DICOMWEB_PLUGIN.is_file(), "Debian package orthanc-dicomweb (make peers)"
    with orthanc(tmp_path / "orthanc", dicomweb=True) as pacs:
        config, token, port = dicomweb_node(tmp_path, [{"name": "pacs-web", "dicomweb": {"url": pacs.dicomweb_url}}])
        with node(config) as n:
            datasets = [dcmread(p) for p in sorted(THORAX.iterdir())]
            answer = client(port, token).store_instances(datasets)
            stored = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
            assert stored == {ds.SOPInstanceUID for ds in datasets} and "FailedSOPSequence" not in answer
            index = Index(n.state_dir / "index.sqlite")
            assert index.instance_uids() == stored
            spool = n.state_dir / "spool"
            for rel in index.instance_paths(datasets[0].SeriesInstanceUID):
                assert dcmread(spool / rel).SOPInstanceUID in stored  # every row's file is complete Part 10
            assert index.series(datasets[0].SeriesInstanceUID).calling_ae == "RIS"

            job = wait_until(lambda: next((j for j in index.jobs() if j.state in {
                JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER}), None), 180, "the job to finish")
            assert job.state is JobState.DONE, job.reason
        # the SEG went by STOW-RS to the DICOMweb plugin; read it back through QIDO/WADO-RS
        web = DICOMwebClient(url=pacs.dicomweb_url)
        [seg_series] = web.search_for_series(search_filters={"Modality": "SEG"})
        assert seg_series["0020000E"]["Value"][0] == job.seg_series_uid
        [seg] = web.retrieve_series(datasets[0].StudyInstanceUID, job.seg_series_uid)
        assert seg.SOPClassUID == SEG and seg.StudyInstanceUID == datasets[0].StudyInstanceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID


def test_stow_refusals_wrong_token_oversize_and_non_dicom_part(tmp_path: Path) -> None:
    config, token, port = dicomweb_node(tmp_path, [], max_body=2 * 1024 * 1024)
    folder = tmp_path / "series"
    v = thorax_phantom(shape=(4, 32, 32)).volume
    files = write_ct_series(v.hu, folder, v.spacing, v.origin, v.direction)
    with node(config) as n:
        index = Index(n.state_dir / "index.sqlite")
        ds = dcmread(files[0])
        with pytest.raises(requests.HTTPError) as wrong:
            client(port, "not-the-token-" + token).store_instances([ds])
        assert wrong.value.response.status_code == 401
        assert index.instance_count() == 0

        big = [dcmread(p) for p in sorted(THORAX.iterdir())]  # 5 MB: over the 2 MiB cap
        with pytest.raises(requests.HTTPError) as oversize:
            client(port, token).store_instances(big)
        assert oversize.value.response.status_code == 413
        for rel in (r for s in {d.SeriesInstanceUID for d in big} for r in index.instance_paths(s)):
            dcmread(n.state_dir / "spool" / rel)  # whatever was stored before the cap is whole

        # a Content-Length request over the cap: refused before its body is read
        status, _ = raw_stow(port, token, [({"Content-Type": "application/dicom"}, b"\0" * (3 * 1024 * 1024))])
        assert status == 413

        # a DICOM part, a text part and a "DICOM" part that is not: one stored, two failed with reasons
        status, answer = raw_stow(port, token, [
            ({"Content-Type": "application/dicom"}, files[1].read_bytes()),
            ({"Content-Type": "text/plain"}, b"hello"),
            ({"Content-Type": "application/dicom"}, b"\0" * 128 + b"DICM" + b"garbage"),
        ])
        assert status == 202
        assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [dcmread(files[1]).SOPInstanceUID]
        assert [i["00081197"]["Value"][0] for i in answer["00081198"]["Value"]] == [0xC000, 0xC000]
        assert dcmread(files[1]).SOPInstanceUID in index.instance_uids()

        # into another study's URL: refused per instance (0xA900), nothing stored
        status, answer = raw_stow(port, token, [({"Content-Type": "application/dicom"}, files[2].read_bytes())],
                                  study="1.2.3.4")
        assert status == 409 and answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
        assert dcmread(files[2]).SOPInstanceUID not in index.instance_uids()


def raw_stow(port: int, token: str, parts: list[tuple[dict[str, str], bytes]],
             study: str | None = None) -> tuple[int, dict]:
    import json

    boundary = "b-" + secrets.token_hex(8)
    body = b"".join(encode_parts(parts, boundary))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    path = "/dicomweb/studies" + (f"/{study}" if study else "")
    conn.request("POST", path, body=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else {}
