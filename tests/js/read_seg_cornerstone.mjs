// A DICOM SEG read as OHIF reads it: @cornerstonejs/adapters (createFromDICOMSegBuffer) against
// the source slices, whose headers dcmjs parses into the metadata Cornerstone asks for.
//
// usage: node read_seg_cornerstone.mjs SEG.dcm SOURCE_DIR
// prints JSON: {"segments": {number: label}, "voxels": {sourceSOPInstanceUID: {segment: voxel count}}}
import fs from "node:fs";
import path from "node:path";
import * as adapters from "@cornerstonejs/adapters";
import { metaData } from "@cornerstonejs/core";
import dcmjs from "dcmjs";

const [segPath, sourceDir] = process.argv.slice(2);
const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
const arrayBuffer = (buf) => buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);

function modules(ds) {
  const iop = ds.ImageOrientationPatient.map(Number);
  const spacing = ds.PixelSpacing.map(Number);
  return {
    instance: ds,
    generalImageModule: { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: Number(ds.InstanceNumber) },
    generalSeriesModule: { modality: ds.Modality, seriesInstanceUID: ds.SeriesInstanceUID,
                           studyInstanceUID: ds.StudyInstanceUID },
    imagePlaneModule: {
      frameOfReferenceUID: ds.FrameOfReferenceUID, rows: ds.Rows, columns: ds.Columns,
      imageOrientationPatient: iop, rowCosines: iop.slice(0, 3), columnCosines: iop.slice(3),
      imagePositionPatient: ds.ImagePositionPatient.map(Number), sliceThickness: Number(ds.SliceThickness),
      pixelSpacing: spacing, rowPixelSpacing: spacing[0], columnPixelSpacing: spacing[1],
    },
    imagePixelModule: { rows: ds.Rows, columns: ds.Columns, bitsAllocated: ds.BitsAllocated,
                        bitsStored: ds.BitsStored, highBit: ds.HighBit, pixelRepresentation: ds.PixelRepresentation,
                        samplesPerPixel: ds.SamplesPerPixel, photometricInterpretation: ds.PhotometricInterpretation },
    sopCommonModule: { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID },
  };
}

const meta = {};
const imageIds = [];
for (const name of fs.readdirSync(sourceDir).sort()) {
  let ds;
  try {
    const dict = DicomMessage.readFile(arrayBuffer(fs.readFileSync(path.join(sourceDir, name)))).dict;
    ds = DicomMetaDictionary.naturalizeDataset(dict);
  } catch {
    continue; // not a DICOM file
  }
  if (!ds.ImagePositionPatient) continue;
  const imageId = `file:${name}`;
  meta[imageId] = modules(ds);
  imageIds.push(imageId);
}
const provider = { get: (type, imageId) => meta[imageId]?.[type] };
metaData.addProvider((type, imageId) => meta[imageId]?.[type], 10000);

const result = await adapters.adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
  imageIds, arrayBuffer(fs.readFileSync(segPath)), { metadataProvider: provider });
const out = { segments: {}, voxels: {} };
for (const [number, segment] of Object.entries(result.segMetadata?.data ?? {})) {
  if (segment) out.segments[number] = segment.SegmentLabel;
}
for (const image of result.labelMapImages?.[0] ?? []) {
  const counts = {};
  for (const v of image.voxelManager.getScalarData()) if (v) counts[v] = (counts[v] ?? 0) + 1;
  if (Object.keys(counts).length) out.voxels[meta[image.referencedImageId].instance.SOPInstanceUID] = counts;
}
console.log(JSON.stringify(out));
