"""Test studies for de-identification: a small CT series laden with canary PHI, and SEGs of series.

``make_canary_study`` writes a CT series in which every PHI-bearing attribute
(names in several scripts, IDs, accession, dates, institution, descriptions,
private tags of VR LO/OB/UN/SQ, standard-group elements unknown to the
dictionary, a known attribute stored as UN, C-coded free text such as
PatientState, TimezoneOffsetFromUTC, OB timestamps, nested sequences) holds a
unique token, and returns the tokens so a test can search for them.  With a
compressed ``syntax`` every frame also carries tokens in its stream (JPEG / JPEG-LS
COM and APP1 segments and bytes after the end of image, JPEG 2000 comments in
the main and tile-part headers).  :data:`TOKEN_TAGS` names the attribute each
token sits in, so a test can tell which tokens an option lets survive.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.uid as tsuid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _code(value: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator="99TEST", CodeMeaning=meaning)


def canary_tokens(tag: str) -> dict[str, str]:
    """Unique strings for one study (``tag`` keeps two studies apart)."""
    t = tag.upper()
    return {
        "patient_family": f"Cnryfam{t}",
        "patient_given": f"Cnrygiv{t}",
        "patient_ideographic": f"山田{t}",  # non-Latin: kanji + tag
        "patient_phonetic": f"やまだ{t}",
        "greek": f"Κανάρι{t}",
        "patient_id": f"CNRYPID{t}",
        "issuer": f"CNRYISS{t}",
        "other_id": f"CNRYOID{t}",
        "accession": f"CNRYACC{t}",
        "study_id": f"CNRYSID{t}",
        "birth_date": "19370405",
        "study_date": "19990817",
        "institution": f"CnryInstitution{t}",
        "address": f"CnryStreet{t}",
        "department": f"CnryDept{t}",
        "referring": f"Cnryref{t}",
        "performing": f"Cnryperf{t}",
        "operator": f"Cnryop{t}",
        "station": f"CNRYSTN{t}",
        "serial": f"CNRYSER{t}",
        "study_desc": f"CnryStudyDesc{t}",
        "series_desc": f"CnrySeriesDesc{t}",
        "protocol": f"CnryProtocol{t}",
        "comments": f"CnryComment{t}",
        "history": f"CnryHistory{t}",
        "phone": f"CNRYTEL{t}",
        "mother": f"Cnrymother{t}",
        "requested_proc": f"CNRYRPID{t}",
        "requested_desc": f"CnryReqDesc{t}",
        "nested_name": f"Cnrynested{t}",
        "deep_inst": f"CnryDeepInst{t}",
        "private_lo": f"CNRYPRIVLO{t}",
        "private_nested": f"Cnryprivnest{t}",
        "private_un": f"CNRYPRIVUN{t}",
        "private_ob": f"CNRYPRIVOB{t}",
        "allergies": f"CnryAllergy{t}",
        "patient_state": f"CnryState{t}",
        "special_needs": f"CnryNeeds{t}",
        "premedication": f"CnryPremed{t}",
        "timezone": f"CNRYTZ{t}",
        "frame_origin_ts": f"CNRYFRAMETS{t}",
        "certified_ts": f"CNRYCERTTS{t}",
        "unknown_lo": f"CNRYUNKLO{t}",
        "unknown_ob": f"CNRYUNKOB{t}",
        "unknown_un": f"CNRYUNKUN{t}",
        "unknown_sq": f"CnryUnkSeq{t}",
        "known_as_un": f"Cnrybirthname{t}",
        "pixel_com": f"CNRYJPEGCOM{t}",
        "pixel_app": f"CNRYJPEGAPP{t}",
        "pixel_tail": f"CNRYJPEGTAIL{t}",
        "j2k_com": f"CNRYJ2KCOM{t}",
        "j2k_tile_com": f"CNRYJ2KTILE{t}",
    }


#: the attribute each token is planted in (``None``: in the pixel data stream or a private/unknown
#: element, never allowed to survive); a test allows a token to survive only where the options keep
#: or scrub that attribute
TOKEN_TAGS: dict[str, int | None] = {
    "study_desc": 0x00081030, "series_desc": 0x0008103E, "protocol": 0x00181030, "comments": 0x00204000,
    "station": 0x00081010, "serial": 0x00181000, "history": 0x001021B0, "requested_desc": 0x00321060,
    "allergies": 0x00102110, "patient_state": 0x00380500, "special_needs": 0x00380050,
    "premedication": 0x00400012, "greek": 0x00104000, "study_id": 0x00200010, "department": 0x00081040,
    "institution": 0x00080080,
}


def make_canary_study(
    folder: Path,
    tag: str,
    *,
    n_slices: int = 6,
    size: int = 24,
    patient_tag: str | None = None,
    syntax: str | None = None,
) -> tuple[list[Path], dict[str, str]]:
    """Write a CT series full of canary PHI; return its files and every token planted.

    ``patient_tag`` (default ``tag``) chooses the patient tokens, so two studies
    can share a patient.  UIDs are tokens too (returned under ``uid_*`` keys).
    ``syntax`` (JPEG-LS or JPEG 2000 lossless) compresses the pixel data and plants
    tokens in every frame's stream; JPEG 2000 needs ``size`` of 32 or more.
    """
    tok = canary_tokens(tag)
    ptok = canary_tokens(patient_tag or tag)
    for key in ("patient_family", "patient_given", "patient_ideographic", "patient_phonetic",
                "patient_id", "issuer", "other_id", "birth_date", "address", "phone", "mother", "history",
                "known_as_un"):
        tok[key] = ptok[key]
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    ref_uid = generate_uid()
    tok.update(uid_study=study_uid, uid_series=series_uid, uid_frame=frame_uid, uid_ref=ref_uid)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(tag))
    files = []
    for k in range(n_slices):
        sop_uid = generate_uid()
        tok[f"uid_sop{k}"] = sop_uid
        ds = _base_slice(tok, study_uid, series_uid, frame_uid, ref_uid, sop_uid, k, size)
        ds.PixelData = (rng.integers(-100, 200, (size, size)).astype(np.int16) + 1000).tobytes()
        if syntax is not None:
            compress_with_text(ds, syntax, tok)
        path = folder / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files, tok


def _base_slice(tok, study_uid, series_uid, frame_uid, ref_uid, sop_uid, k, size) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.SourceApplicationEntityTitle = "CNRYAE"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = (
        f"{tok['patient_family']}^{tok['patient_given']}={tok['patient_ideographic']}={tok['patient_phonetic']}"
    )
    ds.PatientID, ds.IssuerOfPatientID = tok["patient_id"], tok["issuer"]
    ds.OtherPatientIDsSequence = [_item(PatientID=tok["other_id"], IssuerOfPatientID=tok["issuer"], TypeOfPatientID="TEXT")]
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge, ds.PatientWeight = tok["birth_date"], "F", "061Y", "71.5"
    ds.PatientAddress, ds.PatientTelephoneNumbers = tok["address"], tok["phone"]
    ds.PatientMotherBirthName, ds.AdditionalPatientHistory = tok["mother"], tok["history"]
    ds.PatientComments = tok["greek"]
    # C-coded free text under Retain Patient Characteristics: the family name hides in PatientState
    ds.Allergies, ds.SpecialNeeds, ds.PreMedication = tok["allergies"], tok["special_needs"], tok["premedication"]
    ds.PatientState = f"fasting {tok['patient_family']} {tok['patient_state']}"
    ds.TimezoneOffsetFromUTC = tok["timezone"]
    ds.add_new(0x00340007, "OB", tok["frame_origin_ts"].encode())  # FrameOriginTimestamp
    ds.add_new(0x04000310, "OB", tok["certified_ts"].encode())  # CertifiedTimestamp
    # standard-group elements the dictionary does not know, and a known one stored as UN
    ds.add_new(0x00A00010, "LO", tok["unknown_lo"])
    ds.add_new(0x00A00012, "OB", tok["unknown_ob"].encode())
    ds.add_new(0x00A00014, "UN", tok["unknown_un"].encode())
    ds.add_new(0x00A00016, "SQ", DicomSequence([_item(PatientName=tok["unknown_sq"])]))
    ds.add_new(0x00101005, "UN", tok["known_as_un"].encode())  # PatientBirthName
    ds.AccessionNumber, ds.StudyID = tok["accession"], tok["study_id"]
    for attr in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        setattr(ds, attr, tok["study_date"])
    ds.AcquisitionDateTime = tok["study_date"] + "101010"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101010"
    ds.InstitutionName, ds.InstitutionAddress = tok["institution"], tok["address"] + " 1"
    ds.InstitutionalDepartmentName = tok["department"]
    ds.ReferringPhysicianName = tok["referring"] + "^Doc"
    ds.PerformingPhysicianName, ds.OperatorsName = tok["performing"], tok["operator"]
    ds.StationName, ds.DeviceSerialNumber = tok["station"], tok["serial"]
    ds.Manufacturer, ds.ManufacturerModelName = "SEGNODE-TEST", "canary"
    ds.StudyDescription, ds.SeriesDescription = tok["study_desc"], tok["series_desc"]
    ds.ProtocolName, ds.ImageComments = tok["protocol"], tok["comments"]
    ds.RequestAttributesSequence = [
        _item(RequestedProcedureID=tok["requested_proc"], RequestedProcedureDescription=tok["requested_desc"],
              ScheduledProcedureStepID=tok["requested_proc"] + "S")
    ]
    ds.ReferencedStudySequence = [_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=ref_uid)]
    ds.ReferencedImageSequence = [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ref_uid)]
    # a sequence the table does not list, with PHI two levels down
    deep = _code("T-D4000", "Abdomen")
    deep.ContentSequence = [_item(PersonName=tok["nested_name"], InstitutionName=tok["deep_inst"])]
    ds.AnatomicRegionSequence = [deep]
    block = ds.private_block(0x0011, "CNRY PRIVATE", create=True)
    block.add_new(0x01, "LO", tok["private_lo"])
    block.add_new(0x02, "SQ", DicomSequence([_item(PatientName=tok["private_nested"])]))
    block.add_new(0x03, "UN", tok["private_un"].encode())
    block.add_new(0x04, "OB", tok["private_ob"].encode())
    ds.add_new(0x60000010, "US", size)  # an overlay: removed whole
    ds.add_new(0x60003000, "OW", b"\x00" * (size * size // 8))
    ds.Rows = ds.Columns = size
    ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], "2.0"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -12.0, 30.0 + 2.0 * k]
    ds.SliceLocation = 30.0 + 2.0 * k
    ds.InstanceNumber, ds.SeriesNumber, ds.AcquisitionNumber = k + 1, 3, 1
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = "-1000", "1", "120"
    ds.BurnedInAnnotation = "NO"
    return ds


def compress_with_text(ds: Dataset, syntax: str, tok: dict[str, str]) -> None:
    """Compress ``ds`` losslessly and plant canary text in every frame's stream."""
    ds.compress(syntax)
    plant = _plant_jpeg if syntax in (tsuid.JPEGLSLossless, tsuid.JPEGLSNearLossless) else _plant_j2k
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    ds.PixelData = encapsulate([plant(f.rstrip(b"\x00") if f.endswith(b"\xd9\x00") else f, tok) for f in frames])


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body


def _plant_jpeg(frame: bytes, tok: dict[str, str]) -> bytes:
    """COM and APP1 segments after SOI, a COM before the scan, and text after EOI."""
    com = jpeg_segment(0xFE, tok["pixel_com"].encode())
    head = com + jpeg_segment(0xE1, b"Exif\x00\x00" + tok["pixel_app"].encode())
    scan = frame.index(b"\xff\xda")
    body = frame[2:scan] + com + frame[scan:]
    return frame[:2] + head + body + tok["pixel_tail"].encode()


def _plant_j2k(frame: bytes, tok: dict[str, str]) -> bytes:
    """A COM after SIZ in the main header and a COM in the first tile-part header (Psot adjusted)."""
    siz_end = 4 + int.from_bytes(frame[4:6], "big")
    com = b"\xff\x64" + (len(tok["j2k_com"]) + 4).to_bytes(2, "big") + b"\x00\x01" + tok["j2k_com"].encode()
    frame = frame[:siz_end] + com + frame[siz_end:]
    sot = frame.index(b"\xff\x90")
    tile_com = b"\xff\x64" + (len(tok["j2k_tile_com"]) + 4).to_bytes(2, "big") + b"\x00\x01"
    tile_com += tok["j2k_tile_com"].encode()
    psot = int.from_bytes(frame[sot + 6:sot + 10], "big")
    header = bytearray(frame[sot:sot + 12])
    if psot:
        header[6:10] = (psot + len(tile_com)).to_bytes(4, "big")
    return frame[:sot] + bytes(header) + tile_com + frame[sot + 12:]


def make_seg(
    files: Sequence[Path],
    out: Path,
    mask_fn=None,
    labels: Sequence[str] = ("liver",),
) -> Path:
    """A BINARY SEG of the series ``files`` built with highdicom (segments ``labels``)."""
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    shape = (len(sources), sources[0].Rows, sources[0].Columns)
    array = np.zeros(shape, dtype=np.uint8)
    if mask_fn is None:
        for number in range(1, len(labels) + 1):
            array[:, 2 + 3 * number: 6 + 3 * number, 4:10] = number
    else:
        array = mask_fn(shape).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=name,
            segmented_property_category=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept("10200004", "SCT", "Liver"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="test", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing"), version="1"
            ),
        )
        for n, name in enumerate(labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="segnode-test",
        manufacturer_model_name="fixture",
        software_versions="1",
        device_serial_number="1",
        omit_empty_frames=False,
    )
    seg.save_as(out)
    return out
