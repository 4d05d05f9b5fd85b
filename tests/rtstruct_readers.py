"""RT Structure Sets read back by readers we did not write: plastimatch, dicompyler-core, scikit-image.

Each returns, per ROI name, a mask on the source grid of the volume (slice ``k``
of the volume, pixel centres of that slice's own image plane), to be compared
with the label map the structure set was written from.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.dicomio
from pydicom.sequence import Sequence
from segnode.models.volume import Volume
from segnode.node.writers.planes import SourcePlane, source_planes
from skimage.draw import polygon as fill_polygon

# dicompyler-core 0.5.6 imports pydicom 2's ``read_file`` (renamed ``dcmread`` in pydicom 3) and the
# deprecated ``pydicom.pixel_data_handlers``; the rest of it works unchanged
pydicom.dicomio.read_file = pydicom.dcmread  # type: ignore[attr-defined]
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "The 'pydicom.pixel_data_handlers' module will be removed", DeprecationWarning)
    from dicompylercore import dicomparser, dvhcalc

#: dicom3tools' dciodvfy (Debian 1.00~20220618) predates CLOSEDPLANAR_XOR in PS3.3 C.8.8.6.1 and calls it unknown
XOR_UNKNOWN_TO_DCIODVFY = "Unrecognized enumerated value <CLOSEDPLANAR_XOR> for value 1 of attribute <Contour Geometric Type>"


def plastimatch() -> str:
    exe = shutil.which("plastimatch")
    assert exe, "plastimatch (Debian plastimatch) is required: make peers"
    return exe


# --- plastimatch --------------------------------------------------------------------------------


def plastimatch_masks(rtstruct: Path, volume: Volume, work: Path, *, per_plane: bool, xor: bool = False) -> dict[str, np.ndarray]:
    """``plastimatch convert`` rasterises each ROI (``--output-prefix``, one image per ROI).

    A regular series: one run on the CT's own grid (``--referenced-ct``). A tilted or
    unevenly spaced series, which plastimatch reads as one evenly spaced axial stack:
    one run per source image, given only that plane's contours and rasterising on that
    image's grid (``--origin``, ``--spacing``, ``--dim``, ``--direction-cosines``).
    ``xor``: ``--xor-contours`` (plastimatch ORs a plane's contours unless told so).
    An ROI plastimatch writes no image for (it leaves out ROIs without contours) is empty.
    """
    names = [str(roi.ROIName) for roi in pydicom.dcmread(rtstruct).StructureSetROISequence]
    out = {name: np.zeros(volume.shape, bool) for name in names}
    planes = source_planes(volume)
    flags = ["--xor-contours"] if xor else []
    if not per_plane:
        assert volume.source is not None
        images = _plastimatch_run(rtstruct, ["--referenced-ct", str(volume.source.files[0].parent), *flags], work)
        for name, image in images.items():
            for k, plane in enumerate(planes):
                out[name][k] = image.sample(plane, volume.shape[1:])
        return out
    for k, plane in enumerate(planes):
        one = _one_plane(rtstruct, plane, work / f"plane{k}.dcm")
        images = _plastimatch_run(one, [*_grid_flags(plane, volume.shape[1:]), *flags], work / f"plane{k}")
        for name, image in images.items():
            out[name][k] = image.sample(plane, volume.shape[1:])
    return out


def _plastimatch_run(rtstruct: Path, flags: list[str], folder: Path) -> dict[str, MetaImage]:
    shutil.rmtree(folder, ignore_errors=True)  # plastimatch writes no image for an ROI it reads no contour of
    command = [plastimatch(), "convert", "--input", str(rtstruct), *flags,
               "--output-prefix", str(folder), "--prefix-format", "mha"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return {path.stem: MetaImage.read(path) for path in sorted(folder.glob("*.mha"))}


def _one_plane(rtstruct: Path, plane: SourcePlane, path: Path) -> Path:
    """A copy of the structure set holding only the contours on ``plane``'s image."""
    ds = pydicom.dcmread(rtstruct)
    for roi in ds.ROIContourSequence:
        items = [i for i in roi.get("ContourSequence", [])
                 if i.ContourImageSequence[0].ReferencedSOPInstanceUID == plane.sop_instance_uid]
        if "ContourSequence" in roi:
            del roi.ContourSequence
        if items:
            roi.ContourSequence = Sequence(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def _grid_flags(plane: SourcePlane, shape: tuple[int, ...]) -> list[str]:
    def text(values: object) -> str:
        return " ".join(f"{float(v):.6f}" for v in values)  # type: ignore[attr-defined]

    dr, dc = plane.pixel_spacing
    return ["--origin", text(plane.position), "--spacing", text((dc, dr, 1.0)), "--dim", f"{shape[1]} {shape[0]} 1",
            "--direction-cosines", text((*plane.row_dir, *plane.col_dir, *plane.normal))]


class MetaImage:
    """A 3D MetaImage (.mha) as plastimatch writes it: voxels [z, y, x] and their patient geometry."""

    def __init__(self, voxels: np.ndarray, offset: np.ndarray, spacing: np.ndarray, matrix: np.ndarray) -> None:
        self.voxels, self.offset, self.spacing, self.matrix = voxels, offset, spacing, matrix

    @classmethod
    def read(cls, path: Path) -> MetaImage:
        head, _, data = path.read_bytes().partition(b"ElementDataFile = LOCAL\n")
        fields = dict(line.split(" = ", 1) for line in head.decode("ascii").splitlines() if " = " in line)
        dims = [int(v) for v in fields["DimSize"].split()]
        if fields.get("CompressedData") == "True":
            data = zlib.decompress(data)
        dtype = {"MET_UCHAR": np.uint8, "MET_USHORT": np.uint16, "MET_UINT": np.uint32}[fields["ElementType"]]
        voxels = np.frombuffer(data, dtype)[: int(np.prod(dims))].reshape(dims[::-1])
        return cls(voxels, np.array(fields["Offset"].split(), float), np.array(fields["ElementSpacing"].split(), float),
                   np.array(fields["TransformMatrix"].split(), float).reshape(3, 3))

    def sample(self, plane: SourcePlane, shape: tuple[int, ...]) -> np.ndarray:
        """The nearest voxel at each pixel centre of ``plane`` (outside the image: False)."""
        rows, cols = np.mgrid[: shape[0], : shape[1]]
        xyz = plane.to_patient(rows.ravel(), cols.ravel())
        ijk = np.rint(np.linalg.solve(self.matrix * self.spacing[None, :], (xyz - self.offset).T)).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(self.voxels.shape[::-1])[:, None]), axis=0)
        out = np.zeros(len(xyz), bool)
        out[inside] = self.voxels[ijk[2, inside], ijk[1, inside], ijk[0, inside]] > 0
        return out.reshape(shape)


# --- dicompyler-core ----------------------------------------------------------------------------


def dicompyler_masks(rtstruct: Path, volume: Volume) -> dict[str, np.ndarray]:
    """Masks rasterised by dicompyler-core: its contour mask on each image's own pixel LUT, XOR per plane.

    As ``dvhcalc.calculate_plane_histogram`` combines a plane's contours; each plane
    goes to the source image its z is nearest (the images' z differ in every fixture).
    """
    assert volume.source is not None
    parser = dicomparser.DicomParser(str(rtstruct))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in volume.source.datasets])
    luts = [dicomparser.DicomParser(str(path)).GetPatientToPixelLUT() for path in volume.source.files]
    out = {}
    for number, structure in parser.GetStructures().items():
        mask = np.zeros(volume.shape, bool)
        for plane in parser.GetStructureCoordinates(number).values():
            k = int(np.argmin(np.abs(z - float(plane[0]["data"][0][2]))))
            xs, ys = np.meshgrid(luts[k][0], luts[k][1])
            points = np.column_stack([xs.ravel(), ys.ravel()])
            for contour in plane:
                mask[k] ^= dvhcalc.get_contour_mask({"lut": luts[k], "x_lut_index": 0}, number, points,
                                                    [p[:2] for p in contour["data"]])
        out[str(structure["name"])] = mask
    return out


# --- scikit-image -------------------------------------------------------------------------------


def skimage_masks(rtstruct: Path, volume: Volume) -> dict[str, np.ndarray]:
    """Each contour filled by ``skimage.draw.polygon`` (even-odd) in its image's pixel indices, XOR per image."""
    planes = {p.sop_instance_uid if p.frame_number is None else (p.sop_instance_uid, p.frame_number): (k, p)
              for k, p in enumerate(source_planes(volume))}
    ds = pydicom.dcmread(rtstruct)
    names = {roi.ROINumber: str(roi.ROIName) for roi in ds.StructureSetROISequence}
    out = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(volume.shape, bool)
        for item in roi.get("ContourSequence", []):
            ref = item.ContourImageSequence[0]
            key = ref.ReferencedSOPInstanceUID if "ReferencedFrameNumber" not in ref else \
                (ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber))
            k, plane = planes[key]
            xyz = np.asarray(item.ContourData, float).reshape(-1, 3) - plane.position
            dr, dc = plane.pixel_spacing
            filled = np.zeros(volume.shape[1:], bool)
            filled[fill_polygon(xyz @ plane.col_dir / dr, xyz @ plane.row_dir / dc, volume.shape[1:])] = True
            mask[k] ^= filled
        out[names[roi.ReferencedROINumber]] = mask
    return out
