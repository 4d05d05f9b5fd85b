"""QIDO-RS and WADO-RS for viewers: matching, paging, includefield, metadata, frames, bulk data, refusals.

The reader (:class:`segnode.node.http_in.dicomweb_read.DicomWebReader`) is asked
directly over a catalogue of real files (dcmqi's 3-slice liver CT and its SEG,
three slices of the thorax CTA); answers are compared with what pydicom reads
from the same files.  The real-client test (dicomweb-client against a running
node) is in ``test_qido_node.py``.
"""

from __future__ import annotations

import json
from email import message_from_bytes
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from segnode.node.http_in.base import HttpError
from segnode.node.http_in.catalogue import HeaderCache, StoredInstance
from segnode.node.http_in.dicomweb_read import DicomWebReader
from segnode.node.http_in.wado import WebAnswer, frames_of

from tests.paths import DATA

LIVER = DATA / "liver_3slice"
THORAX = DATA / "thorax_cta"
BASE = "/dicomweb"


class FileCatalogue:
    """A catalogue of the given files (each read once for its UIDs)."""

    def __init__(self, paths: list[Path]) -> None:
        self.headers = HeaderCache()
        self.items = []
        for path in paths:
            ds = self.headers.get(path)
            self.items.append(StoredInstance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                             ds.SOPClassUID, path, "job-1" if ds.Modality == "SEG" else "spool"))

    def study_uids(self) -> list[str]:
        return sorted({i.study_uid for i in self.items})

    def instances(self, study_uid: str | None = None, series_uid: str | None = None) -> list[StoredInstance]:
        return [i for i in self.items if study_uid in (None, i.study_uid) and series_uid in (None, i.series_uid)]

    def header(self, instance: StoredInstance) -> Dataset:
        return self.headers.get(instance.path)


@pytest.fixture(scope="module")
def reader() -> DicomWebReader:
    paths = sorted(LIVER.iterdir()) + sorted(THORAX.iterdir())[:3]
    return DicomWebReader(FileCatalogue(paths))


@pytest.fixture(scope="module")
def liver() -> dict[str, Dataset]:
    return {p.name: pydicom.dcmread(p) for p in sorted(LIVER.iterdir())}


def get(reader: DicomWebReader, path: str, accept: str | None = None, **query: str | list[str]) -> WebAnswer:
    params = {k: v if isinstance(v, list) else [v] for k, v in query.items()}
    return reader.get(path, params, accept=accept, base=BASE)


def found(reader: DicomWebReader, path: str, **query: str | list[str]) -> list[dict]:
    answer = get(reader, path, **query)
    assert answer.status == HTTPStatus.OK and answer.content_type == "application/dicom+json"
    return json.loads(answer.body())


def value(item: dict, tag: str) -> object:
    return item[tag].get("Value", [None])[0]


def refused(reader: DicomWebReader, path: str, accept: str | None = None, **query: str) -> tuple[int, str]:
    with pytest.raises(HttpError) as error:
        get(reader, path, accept, **query)
    return error.value.status, error.value.message


def parts(answer: WebAnswer) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related answer: (content type, bytes)."""
    raw = f"Content-Type: {answer.content_type}\r\n\r\n".encode() + answer.body()
    message = message_from_bytes(raw)
    assert message.is_multipart()
    return [(p.get("Content-Type"), p.get_payload(decode=True)) for p in message.get_payload()]


# -- QIDO-RS ----------------------------------------------------------------------------------


def test_studies_with_counts_modalities_and_study_attributes(reader, liver) -> None:
    studies = found(reader, "/studies")
    ct = liver["01.dcm"]
    assert [value(s, "0020000D") for s in studies] == sorted({ct.StudyInstanceUID, pydicom.dcmread(
        sorted(THORAX.iterdir())[0]).StudyInstanceUID})
    [study] = [s for s in studies if value(s, "0020000D") == ct.StudyInstanceUID]
    assert study["00080061"]["Value"] == ["CT", "SEG"]  # ModalitiesInStudy
    assert value(study, "00201206") == 2 and value(study, "00201208") == 4  # series, instances
    assert value(study, "00100020") == ct.PatientID and value(study, "00080020") == ct.StudyDate
    assert study["00100010"]["Value"][0]["Alphabetic"] == str(ct.PatientName)


def test_matching_exact_wildcard_name_case_and_uid_list(reader, liver) -> None:
    ct = liver["01.dcm"]
    assert len(found(reader, "/studies", PatientID=ct.PatientID)) == 1
    assert found(reader, "/studies", PatientID=ct.PatientID + "x") == []
    assert len(found(reader, "/studies", PatientID=ct.PatientID[:3] + "*")) == 1
    assert len(found(reader, "/studies", PatientName=str(ct.PatientName).lower())) == 1  # PN: any case
    assert found(reader, "/studies", StudyDescription=str(ct.get("StudyDescription", "x")).lower() + "?") == []
    assert len(found(reader, "/studies", StudyInstanceUID=f"1.2.3,{ct.StudyInstanceUID}")) == 1
    assert len(found(reader, "/studies", StudyInstanceUID=f"1.2.3\\{ct.StudyInstanceUID}")) == 1
    assert len(found(reader, "/studies", **{"00100020": ct.PatientID})) == 1  # by tag
    assert len(found(reader, "/studies", PatientID="")) == 2  # universal matching


def test_date_ranges_open_and_closed(reader, liver) -> None:
    date = liver["01.dcm"].StudyDate  # 20030417
    for spec, hits in ((f"{date}-{date}", 1), ("20030101-", 1), ("-20021231", 0), ("20030418-20040101", 0),
                       (date, 1)):
        studies = [s for s in found(reader, "/studies", StudyDate=spec)
                   if value(s, "0020000D") == liver["01.dcm"].StudyInstanceUID]
        assert len(studies) == hits, spec


def test_series_and_instances_in_a_study_and_across(reader, liver) -> None:
    study = liver["01.dcm"].StudyInstanceUID
    series = found(reader, f"/studies/{study}/series")
    assert sorted(value(s, "00080060") for s in series) == ["CT", "SEG"]
    assert {value(s, "00201209") for s in series} == {3, 1}  # NumberOfSeriesRelatedInstances
    [seg] = found(reader, f"/studies/{study}/series", Modality="SEG")
    assert value(seg, "0020000E") == liver["liver_seg_dcmqi.dcm"].SeriesInstanceUID
    ct_series = liver["01.dcm"].SeriesInstanceUID
    instances = found(reader, f"/studies/{study}/series/{ct_series}/instances")
    assert sorted(value(i, "00080018") for i in instances) == sorted(
        liver[n].SOPInstanceUID for n in ("01.dcm", "02.dcm", "03.dcm"))
    assert {value(i, "00280010") for i in instances} == {512}
    across = found(reader, "/series", Modality="SEG")
    assert len(across) == 1 and value(across[0], "00100020") == liver["01.dcm"].PatientID  # study attributes too
    assert len(found(reader, "/instances", SOPClassUID=liver["01.dcm"].SOPClassUID)) == 6
    assert len(found(reader, f"/studies/{study}/instances")) == 4


def test_limit_offset_pages_without_overlap(reader) -> None:
    study = pydicom.dcmread(sorted(THORAX.iterdir())[0]).StudyInstanceUID
    every = [value(i, "00080018") for i in found(reader, "/instances")]
    assert len(every) == 7
    pages = [[value(i, "00080018") for i in found(reader, "/instances", limit="3", offset=str(o))]
             for o in (0, 3, 6, 9)]
    assert [len(p) for p in pages] == [3, 3, 1, 0] and sum(pages, []) == every
    assert len(found(reader, f"/studies/{study}/instances", limit="2")) == 2


def test_includefield_names_tags_and_all(reader, liver) -> None:
    ct = liver["01.dcm"]
    path = f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances"
    plain = found(reader, path)[0]
    assert "00180050" not in plain and "00280030" not in plain  # SliceThickness, PixelSpacing
    named = found(reader, path, includefield=["SliceThickness", "00280030"])[0]
    assert named["00180050"]["Value"] == [float(ct.SliceThickness)]
    assert named["00280030"]["Value"] == [float(v) for v in ct.PixelSpacing]
    comma = found(reader, path, includefield="SliceThickness,PixelSpacing")[0]
    assert "00180050" in comma and "00280030" in comma
    every = found(reader, path, includefield="all")[0]
    header = pydicom.dcmread(ct.filename, stop_before_pixels=True)
    assert {f"{int(e.tag):08X}" for e in header} <= set(every)


@pytest.mark.parametrize(("path", "query", "status", "reason"), [
    ("/studies", {"NoSuchKeyword": "x"}, 400, "unknown attribute"),
    ("/studies", {"limit": "-1"}, 400, "limit"),
    ("/studies", {"offset": "x"}, 400, "offset"),
    ("/studies", {"StudyInstanceUID": "1.2.abc"}, 400, "UID"),
    ("/studies", {"StudyDate": "yesterday"}, 400, "range"),
    ("/studies", {"ReferencedSeriesSequence": "x"}, 400, "sequence"),
    ("/studies", {"includefield": "Nonsense"}, 400, "unknown attribute"),
    ("/studies/1.2.x/series", {}, 400, "valid DICOM UID"),
    ("/studies/1.2.3/series", {}, 404, "no such"),
    ("/studies/..%2F..%2Fetc/series", {}, 400, "valid DICOM UID"),
    ("/studies/1.2.3/../../etc/passwd", {}, 404, "no such DICOMweb resource"),
    ("/patients", {}, 404, "no such DICOMweb resource"),
])
def test_bad_searches_are_refused_with_a_reason(reader, path, query, status, reason) -> None:
    code, message = refused(reader, path, **query)
    assert code == status and reason in message


# -- WADO-RS ----------------------------------------------------------------------------------


def test_instance_series_and_study_retrieve_the_stored_files(reader, liver) -> None:
    ct = liver["01.dcm"]
    one = parts(get(reader, f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/"
                            f"{ct.SOPInstanceUID}", 'multipart/related; type="application/dicom"'))
    assert one == [("application/dicom; transfer-syntax=1.2.840.10008.1.2", (LIVER / "01.dcm").read_bytes())]
    series = parts(get(reader, f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"))
    assert sorted(body for _, body in series) == sorted((LIVER / n).read_bytes() for n in ("01.dcm", "02.dcm",
                                                                                             "03.dcm"))
    study = parts(get(reader, f"/studies/{ct.StudyInstanceUID}",
                      'multipart/related; type="application/dicom"; transfer-syntax=*'))
    assert len(study) == 4
    code, message = refused(reader, f"/studies/{ct.StudyInstanceUID}",
                            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50')
    assert code == 406 and "transfer" in message


def test_metadata_is_the_header_with_bulk_data_uris(reader, liver) -> None:
    ct, seg = liver["01.dcm"], liver["liver_seg_dcmqi.dcm"]
    url = f"{BASE}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    [meta] = found(reader, f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/"
                           f"{ct.SOPInstanceUID}/metadata")
    truth = pydicom.dcmread(LIVER / "01.dcm", stop_before_pixels=True).to_json_dict(
        bulk_data_threshold=4096, bulk_data_element_handler=lambda e: f"{url}/bulkdata/{int(e.tag):08X}")
    assert meta["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    assert {k: v for k, v in meta.items() if k != "7FE00010"} == truth
    series = found(reader, f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/metadata")
    assert len(series) == 3 and all("BulkDataURI" in m["7FE00010"] for m in series)
    study = found(reader, f"/studies/{ct.StudyInstanceUID}/metadata")
    [seg_meta] = [m for m in study if value(m, "00080060") == "SEG"]
    assert seg_meta["7FE00010"]["vr"] == "OB"  # 1 bit per pixel
    assert len(seg_meta["00620002"]["Value"]) == len(seg.SegmentSequence)  # sequences in full
    assert value(seg_meta, "00280008") == int(seg.NumberOfFrames)


def test_frames_native_match_pydicom(reader, liver) -> None:
    ct = liver["01.dcm"]
    path = f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}/frames/1"
    [(kind, body)] = parts(get(reader, path, "multipart/related; type=application/octet-stream; transfer-syntax=*"))
    assert kind == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2"
    pixels = np.frombuffer(body, "<i2" if ct.PixelRepresentation else "<u2").reshape(ct.Rows, ct.Columns)
    np.testing.assert_array_equal(pixels, ct.pixel_array)


def test_seg_frames_one_bit_each_from_a_byte_boundary(reader, liver) -> None:
    seg = liver["liver_seg_dcmqi.dcm"]
    path = f"/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}/instances/{seg.SOPInstanceUID}"
    got = parts(get(reader, f"{path}/frames/3,1", "multipart/related; type=application/octet-stream"))
    truth = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for (_, body), number in zip(got, (3, 1), strict=True):
        bits = np.unpackbits(np.frombuffer(body, np.uint8), bitorder="little")[:seg.Rows * seg.Columns]
        np.testing.assert_array_equal(bits.reshape(seg.Rows, seg.Columns), truth[number - 1])
    assert frames_of(seg)[0] == np.packbits(truth[0].ravel(), bitorder="little").tobytes()


def test_bulk_data_single_part_or_multipart(reader, liver) -> None:
    seg = liver["liver_seg_dcmqi.dcm"]
    path = (f"/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}/instances/{seg.SOPInstanceUID}"
            "/bulkdata/7FE00010")
    single = get(reader, path, "application/octet-stream")
    assert single.content_type == "application/octet-stream" and single.body() == seg.PixelData
    [(kind, body)] = parts(get(reader, path, "multipart/related; type=application/octet-stream"))
    assert kind == "application/octet-stream" and body == seg.PixelData


@pytest.mark.parametrize(("suffix", "accept", "status", "reason"), [
    ("/frames/0", None, 400, "frames"),
    ("/frames/1,x", None, 400, "frames"),
    ("/frames/", None, 404, "no such DICOMweb resource"),
    ("/frames/4", None, 404, "1 frame"),
    ("/frames/1", "image/jpeg", 406, "octet-stream"),
    ("/bulkdata/7FE0", None, 400, "8 hex"),
    ("/bulkdata/00100010", None, 404, "no bulk data"),
])
def test_bad_frame_and_bulk_requests(reader, liver, suffix, accept, status, reason) -> None:
    ct = liver["01.dcm"]
    path = f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}{suffix}"
    code, message = refused(reader, path, accept)
    assert code == status and reason in message


def test_unknown_study_series_instance_are_404(reader, liver) -> None:
    ct = liver["01.dcm"]
    for path in ("/studies/1.2.3", f"/studies/{ct.StudyInstanceUID}/series/1.2.3",
                 f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/1.2.3/metadata",
                 f"/studies/1.2.3/series/{ct.SeriesInstanceUID}/metadata"):
        assert refused(reader, path)[0] == 404, path


def test_seg_frames_not_a_multiple_of_eight_pixels_are_repacked() -> None:
    path = DATA / "seg_objects" / "23x38x3" / "seg" / "label.seg"  # 38 x 23 = 874 pixels a frame
    seg = pydicom.dcmread(path)
    reader = DicomWebReader(FileCatalogue([path]))
    resource = f"/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}/instances/{seg.SOPInstanceUID}"
    got = parts(get(reader, f"{resource}/frames/1,2,3"))
    truth = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    assert [len(body) for _, body in got] == [110] * 3  # ceil(874 / 8): each frame from a byte boundary
    for (_, body), frame in zip(got, truth, strict=True):
        bits = np.unpackbits(np.frombuffer(body, np.uint8), bitorder="little")[:seg.Rows * seg.Columns]
        np.testing.assert_array_equal(bits.reshape(seg.Rows, seg.Columns), frame)
