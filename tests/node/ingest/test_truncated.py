"""A truncated instance is refused before it is acknowledged, over C-STORE and STOW-RS (issue 21).

``segnode serve`` with its DICOMweb listener; a raw-PDU peer sends the
received bytes as they are (cut in the Pixel Data, inside an element header,
inside a sequence) on one association, each followed by a whole instance;
a STOW-RS request carries the same parts.  Each cut one is answered 0xC210
(C-STORE with the walk's reason as its Error Comment; STOW-RS in the Failed
SOP Sequence), nothing of it reaches the spool or the index, and the whole
instance after it on the same association / request, and the next request,
are stored.
"""

from __future__ import annotations

import http.client
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from segnode.node.http_in.multipart import encode_parts
from segnode.node.http_in.stow import read_file_meta
from segnode.storage.index import Index

from tests.paths import DATA
from tests.peers import NodeProcess, free_port, node, write_node_config
from tests.raw_peer import CT, EXPLICIT_LE, RELEASE_RQ, RawPeer, c_store

CT0001 = DATA / "thorax_cta" / "CT0001.dcm"
CANNOT_DECODE = 0xC210
pytestmark = pytest.mark.peer


@dataclass(frozen=True)
class Instance:
    sop_uid: str
    prefix: bytes  # preamble and file meta
    dataset: bytes

    @property
    def part10(self) -> bytes:
        return self.prefix + self.dataset


def instance() -> Instance:
    """A real CT slice under a new SOP Instance UID, with an undefined-length sequence of two items."""
    ds = dcmread(CT0001)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    items = []
    for k in range(2):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT, f"1.2.826.0.1.3680043.9.{k + 1}"
        item.is_undefined_length_sequence_item = True
        items.append(item)
    ds.ReferencedImageSequence = Sequence(items)
    ds["ReferencedImageSequence"].is_undefined_length = True
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    meta = read_file_meta(data)
    assert meta is not None and meta.transfer_syntax == EXPLICIT_LE
    return Instance(ds.SOPInstanceUID, data[:meta.dataset_offset], data[meta.dataset_offset:])


def cut_in_pixel_data(inst: Instance) -> Instance:
    return Instance(inst.sop_uid, inst.prefix, inst.dataset[:-1000])


def cut_in_element_header(inst: Instance) -> Instance:
    """Cut 6 bytes into the Pixel Data element's header: no Pixel Data left at all."""
    start = inst.dataset.rfind(b"\xe0\x7f\x10\x00OW")
    return Instance(inst.sop_uid, inst.prefix, inst.dataset[:start + 6])


def cut_in_sequence(inst: Instance) -> Instance:
    """Cut after the first element of the sequence's first item (12 + 8 + 8 + 26 bytes in)."""
    start = inst.dataset.find(b"\x08\x00\x40\x11SQ")
    return Instance(inst.sop_uid, inst.prefix, inst.dataset[:start + 12 + 8 + 8 + 26])


#: each cut, and the reason the walk gives
CUTS = ((cut_in_pixel_data, "Pixel Data runs past the end of the dataset"),
        (cut_in_element_header, "dataset ends inside an element header"),
        (cut_in_sequence, "item without its delimiter"))


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[NodeProcess, int, str]]:
    """``segnode serve`` with DICOMweb: the node, its DICOMweb port and a client's token."""
    token = secrets.token_urlsafe(24)
    (tmp_path / "ris.token").write_text(token + "\n")
    (tmp_path / "ris.token").chmod(0o600)
    port = free_port()
    config = write_node_config(tmp_path / "node.yaml", completion={"quiet_period_s": 3600}, dicomweb={
        "enabled": True, "port": port,
        "clients": [{"name": "ris", "token_file": str(tmp_path / "ris.token"), "ae_title": "RIS"}]})
    with node(config) as running:
        yield running, port, token
    if running.proc.stdout is not None:  # its "listening" pipe
        running.proc.stdout.close()


def spooled(running: NodeProcess) -> set[str]:
    """The SOP Instance UIDs of the files in the spool (each file read back)."""
    return {dcmread(p).SOPInstanceUID for p in (running.state_dir / "spool").rglob("*") if p.is_file()}


def test_truncated_instances_are_refused_over_c_store_and_the_association_goes_on(
        serving: tuple[NodeProcess, int, str]) -> None:
    running, _, _ = serving
    index = Index(running.state_dir / "index.sqlite")
    refused, stored = [], []
    with RawPeer(running.port) as peer:
        accepted = peer.associate([(1, CT, [EXPLICIT_LE])])
        assert accepted is not None and accepted.context_results() == {1: 0}
        message = 0
        for cut, reason in CUTS:
            bad, good = cut(instance()), instance()
            for inst in (bad, good):
                message += 1
                peer.send(c_store(1, CT, inst.sop_uid, inst.dataset, message_id=message))
                reply = peer.read()
                assert reply is not None and reply.kind == 0x04, reply
                if inst is bad:
                    assert reply.status == CANNOT_DECODE, cut.__name__
                    assert reply.command[0x0902].decode().strip() == reason
                else:
                    assert reply.status == 0x0000, cut.__name__
            refused.append(bad.sop_uid)
            stored.append(good.sop_uid)
        peer.send(RELEASE_RQ)
        assert (release := peer.read()) is not None and release.kind == 0x06
    assert index.instance_uids() == set(stored)
    assert spooled(running) == set(stored)


def stow(port: int, token: str, parts: list[bytes]) -> tuple[int, dict]:  # type: ignore[type-arg]
    boundary = "b-" + secrets.token_hex(8)
    body = b"".join(encode_parts([({"Content-Type": "application/dicom"}, p) for p in parts], boundary))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/dicomweb/studies", body=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _uids(answer: dict, key: str) -> list[str]:  # type: ignore[type-arg]
    return [item["00081155"]["Value"][0] for item in answer.get(key, {}).get("Value", [])]


def test_truncated_instances_are_refused_over_stow_rs_and_the_node_goes_on(
        serving: tuple[NodeProcess, int, str]) -> None:
    running, port, token = serving
    index = Index(running.state_dir / "index.sqlite")
    bad = [cut(instance()) for cut, _ in CUTS]
    good = [instance() for _ in CUTS]
    status, answer = stow(port, token, [i.part10 for pair in zip(bad, good) for i in pair])
    assert status == 202, answer
    assert _uids(answer, "00081198") == [i.sop_uid for i in bad]
    assert [item["00081197"]["Value"] for item in answer["00081198"]["Value"]] == [[CANNOT_DECODE]] * len(bad)
    assert _uids(answer, "00081199") == [i.sop_uid for i in good]

    after = instance()  # the next request is served
    status, answer = stow(port, token, [after.part10])
    assert status == 200 and _uids(answer, "00081199") == [after.sop_uid]
    stored = {i.sop_uid for i in (*good, after)}
    assert index.instance_uids() == stored
    assert spooled(running) == stored
