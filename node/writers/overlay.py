"""A derived colour series for any viewer: windowed CT with the segment outlines burned in.

* Secondary Capture Image Storage, RGB, one instance per source slice (or
  source frame): the one SOP class every PACS viewer displays in colour (the
  CT Image IOD only allows MONOCHROME pixels, so a "derived RGB CT" is not
  valid DICOM); ImageType DERIVED\\SECONDARY, BurnedInAnnotation YES;
* pixels: ``draw_outlines`` (soft-tissue window, profile colours); below the
  image a legend band is added (tissue names in their colours, and "NOT FOR
  DIAGNOSIS" when asked), so no anatomy is covered: rows ``0..Rows-1`` of the
  source map one to one onto the same rows here;
* ImagePositionPatient / ImageOrientationPatient / PixelSpacing and the Frame
  of Reference are copied from each source image (extra to the SC IOD; viewers
  use them for linked scrolling), Source/Referenced Image Sequences name it;
* UIDs are deterministic (source series and its instances, organ, backend,
  model version, "overlay", source SOP instance / frame, result version from 2 on);
* IHE AI Results: each image's ContributingEquipmentSequence names the
  algorithm (:func:`~segnode.node.writers.common.algorithm_equipment`); a newer
  result version says so in its series number and description.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from segnode import identity
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import (
    EncodedResult,
    SegType,
    checked_source,
    Algorithm,
    deterministic_uid,
    output_seed,
    stamp_algorithm,
    versioned_seed,
    versioned_series,
)
from segnode.node.writers.outline import draw_outlines
from segnode.node.writers.planes import SourcePlane, patient_study_header, source_planes
from segnode.profiles.schema import Profile

logger = logging.getLogger(__name__)

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
WARNING_COLOUR = (255, 255, 0)


def _font(columns: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(10, columns // 40))
    except (OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def legend_band(columns: int, entries: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """A black (rows, columns, 3) band with one text line per entry in its colour."""
    font = _font(columns)
    line = int(font.getbbox("Ag")[3]) + 3
    band = Image.new("RGB", (columns, line * len(entries) + 4))
    draw = ImageDraw.Draw(band)
    draw.fontmode = "1"  # no anti-aliasing: the text is in exactly the tissue colour
    for n, (text, colour) in enumerate(entries):
        draw.text((3, 2 + n * line), text, fill=tuple(colour), font=font)
    return np.asarray(band)


def _ds(value: float) -> str:
    return f"{float(value) + 0.0:.6f}".rstrip("0").rstrip(".")


def _instance(first: Dataset, plane: SourcePlane, rgb: np.ndarray, number: int, uids: tuple[str, str], text: dict) -> Dataset:
    ds = patient_study_header(first)
    now = datetime.datetime.now(datetime.timezone.utc)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SeriesInstanceUID, ds.SOPInstanceUID = uids
    ds.Modality = "OT"
    ds.Laterality = first.get("Laterality", "")  # 2C (paired body parts): dciodvfy asks for it
    ds.SeriesNumber = text["series_number"]
    ds.SeriesDescription = text["description"]
    ds.Manufacturer = identity.MANUFACTURER
    ds.ManufacturerModelName = identity.MODEL_NAME
    ds.SoftwareVersions = identity.SOFTWARE_VERSIONS
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = identity.MANUFACTURER
    ds.SecondaryCaptureDeviceSoftwareVersions = identity.SOFTWARE_VERSIONS
    stamp_algorithm(ds, text["algorithm"])  # IHE AIR
    ds.InstanceNumber = number
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "segment outlines burned into windowed CT (W 400 L 40)"
    ds.BurnedInAnnotation = "YES"
    ds.ImageComments = text["comments"]
    ds.SourceImageSequence = Sequence([plane.reference()])
    ds.ReferencedImageSequence = Sequence([plane.reference()])
    ds.FrameOfReferenceUID = text["frame_of_reference"]
    ds.ImagePositionPatient = [_ds(v) for v in plane.position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*plane.row_dir, *plane.col_dir)]
    ds.PixelSpacing = [_ds(v) for v in plane.pixel_spacing]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    identity.stamp_file_meta(ds.file_meta)
    return ds


def write_overlay(
    volume: Volume,
    labels: LabelMap,
    profile: Profile,
    out_dir: Path,
    *,
    not_for_diagnosis: bool = True,
    version: int = 1,
    seg_type: SegType | str = SegType.BINARY,
) -> list[EncodedResult]:
    """Write one RGB Secondary Capture per source slice with the outlines of ``labels`` burned in.

    ``seg_type``: the SEG type of the result the overlay belongs to; it only
    seeds the UIDs (a BINARY and a LABELMAP result never share one).
    ``version``: the result's version, in the series number and description and the UID seed.
    """
    source = checked_source(volume, labels, profile, "an overlay series needs them")
    planes = source_planes(volume)
    colours = {value: profile.tissue(name).color for value, name in labels.labels.items()}
    entries = [(name, colours[value]) for value, name in sorted(labels.labels.items())]
    if not_for_diagnosis:
        entries.append((NOT_FOR_DIAGNOSIS, WARNING_COLOUR))
    band = legend_band(volume.shape[2], entries)
    seed = versioned_seed(output_seed(source, profile, labels, "overlay", seg_type), version)
    series_uid = str(deterministic_uid(*seed, "series"))
    suffix = f" {NOT_FOR_DIAGNOSIS}" if not_for_diagnosis else ""
    series_number, description = versioned_series("overlay", f"OVERLAY {profile.organ} ({labels.backend}){suffix}",
                                                  version)
    text = {
        "series_number": series_number,
        "description": description,
        "algorithm": Algorithm.of(labels),
        "comments": f"segment outlines of {profile.organ} by segnode {labels.backend}{suffix}",
        "frame_of_reference": source.datasets[0].get("FrameOfReferenceUID", ""),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for k, plane in enumerate(planes):
        rgb = np.concatenate([draw_outlines(volume.hu[k], labels.array[k], colours), band], axis=0)
        sop_uid = str(deterministic_uid(*seed, "instance", plane.sop_instance_uid, str(plane.frame_number or 0)))
        ds = _instance(source.datasets[0], plane, rgb, k + 1, (series_uid, sop_uid), text)
        path = out_dir / f"OVERLAY_{profile.organ}_{k + 1:04d}_{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        results.append(
            EncodedResult(
                path=path, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                kind="overlay", sop_class_uid=str(SecondaryCaptureImageStorage),
            )
        )
    logger.info("wrote overlay series %s (%d images)", series_uid, len(results))
    return results
