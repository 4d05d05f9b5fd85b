"""Test studies for de-identification: a small CT series laden with canary PHI, and SEGs of series.

``make_canary_study`` writes a CT series in which every PHI-bearing attribute
(names in several scripts, IDs, accession, dates, institution, descriptions,
private tags, nested sequences) holds a unique token, and returns the tokens so
a test can search for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
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
    }


def make_canary_study(
    folder: Path,
    tag: str,
    *,
    n_slices: int = 6,
    size: int = 24,
    patient_tag: str | None = None,
) -> tuple[list[Path], dict[str, str]]:
    """Write a CT series full of canary PHI; return its files and every token planted.

    ``patient_tag`` (default ``tag``) chooses the patient tokens, so two studies
    can share a patient.  UIDs are tokens too (returned under ``uid_*`` keys).
    """
    tok = canary_tokens(tag)
    ptok = canary_tokens(patient_tag or tag)
    for key in ("patient_family", "patient_given", "patient_ideographic", "patient_phonetic",
                "patient_id", "issuer", "other_id", "birth_date", "address", "phone", "mother", "history"):
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
