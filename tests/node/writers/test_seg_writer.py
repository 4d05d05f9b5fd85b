"""DICOM SEG writer: validity (dciodvfy), exact read-back with highdicom, codes, UIDs."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from segnode.errors import EncodeError
from segnode.models.series import load_series
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.nifti import write_nifti
from segnode.node.writers.seg import write_seg
from segnode.profiles import load_profile

from tests.dicomtools import dciodvfy, seg_labelmap_on_source

pytestmark = pytest.mark.peer  # dciodvfy validates every SEG


def threshold_labels(volume: Volume, organ: str, *, empty: tuple[str, ...] = ()) -> LabelMap:
    """A deterministic label map: left/right air, or bone, by thresholds."""
    profile = load_profile(organ)
    values = profile.label_values()
    array = np.zeros(volume.shape, np.uint8)
    x = volume.world_x()
    if organ == "lungs":
        array[(volume.hu < -400) & (x > x.mean())] = 1
        array[(volume.hu < -400) & (x <= x.mean())] = 2
    else:
        array[volume.hu > 200] = 1
    for name in empty:
        array[array == next(v for v, n in values.items() if n == name)] = 0
    return LabelMap(array, values, backend="hu_based", model_version="test-1")


@pytest.fixture(scope="module")
def thorax(data_dir: Path) -> Volume:
    return load_series(data_dir / "thorax_cta")


def test_binary_seg_is_valid_and_reads_back_exactly(thorax: Volume, tmp_path: Path) -> None:
    labels = threshold_labels(thorax, "lungs")
    result = write_seg(thorax, labels, load_profile("lungs"), tmp_path)
    assert dciodvfy(result.path) == []
    assert np.array_equal(seg_labelmap_on_source(result.path, thorax), labels.array)


def test_segment_codes_colours_and_algorithm(thorax: Volume, tmp_path: Path) -> None:
    profile = load_profile("lungs")
    result = write_seg(thorax, threshold_labels(thorax, "lungs"), profile, tmp_path)
    seg = pydicom.dcmread(result.path)
    left = seg.SegmentSequence[0]
    assert left.SegmentLabel == "lung_left"
    prop = left.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("39607008", "SCT")
    modifier = prop.SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodeMeaning) == ("7771000", "Left")
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    lab = hd.color.CIELabColor.from_dicom_value(tuple(left.RecommendedDisplayCIELabValue))
    assert np.allclose(lab.to_rgb(), profile.tissues[0].color, atol=2)
    algo = left.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "segnode hu_based" and algo.AlgorithmVersion == "test-1"
    # every source image is referenced
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in thorax.source.datasets}
    assert seg.StudyInstanceUID == thorax.source.study_instance_uid
    assert seg.FrameOfReferenceUID == thorax.source.datasets[0].FrameOfReferenceUID


def test_uids_are_deterministic_per_series_profile_and_model(thorax: Volume, tmp_path: Path) -> None:
    labels = threshold_labels(thorax, "lungs")
    a = write_seg(thorax, labels, load_profile("lungs"), tmp_path / "a")
    b = write_seg(thorax, labels, load_profile("lungs"), tmp_path / "b")
    other = LabelMap(labels.array, labels.labels, backend="hu_based", model_version="test-2")
    c = write_seg(thorax, other, load_profile("lungs"), tmp_path / "c")
    assert (a.series_instance_uid, a.sop_instance_uid) == (b.series_instance_uid, b.sop_instance_uid)
    assert c.sop_instance_uid != a.sop_instance_uid
    assert pydicom.uid.UID(a.sop_instance_uid).is_valid


def test_a_late_instance_makes_a_new_version_with_new_uids(data_dir: Path, tmp_path: Path) -> None:
    """The same instances give the same UIDs; one more instance of the series gives new ones."""
    import shutil

    early = tmp_path / "early"
    early.mkdir()
    files = sorted((data_dir / "thorax_cta").glob("*.dcm"))[:20]
    for f in files[:-1]:
        shutil.copy(f, early)
    before = load_series(early)
    shutil.copy(files[-1], early)
    after = load_series(early)
    assert before.source.series_instance_uid == after.source.series_instance_uid
    profile = load_profile("lungs")
    first = write_seg(before, threshold_labels(before, "lungs"), profile, tmp_path / "a")
    again = write_seg(load_series(early.parent / "early"), threshold_labels(after, "lungs"), profile, tmp_path / "c")
    late = write_seg(after, threshold_labels(after, "lungs"), profile, tmp_path / "b")
    assert late.series_instance_uid != first.series_instance_uid and late.sop_instance_uid != first.sop_instance_uid
    assert (again.series_instance_uid, again.sop_instance_uid) == (late.series_instance_uid, late.sop_instance_uid)


def test_empty_segment_is_kept_without_frames(thorax: Volume, tmp_path: Path) -> None:
    labels = threshold_labels(thorax, "lungs", empty=("lung_right",))
    result = write_seg(thorax, labels, load_profile("lungs"), tmp_path)
    assert dciodvfy(result.path) == []
    seg = hd.seg.segread(result.path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung_left", "lung_right"]
    frames_per_segment = {
        f.SegmentIdentificationSequence[0].ReferencedSegmentNumber for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert frames_per_segment == {1}
    assert np.array_equal(seg_labelmap_on_source(result.path, thorax), labels.array)


def test_all_empty_result_is_still_a_valid_seg(thorax: Volume, tmp_path: Path) -> None:
    labels = LabelMap(np.zeros(thorax.shape, np.uint8), load_profile("lungs").label_values(), backend="hu_based")
    result = write_seg(thorax, labels, load_profile("lungs"), tmp_path)
    assert dciodvfy(result.path) == []
    assert not seg_labelmap_on_source(result.path, thorax).any()


def test_labelmap_seg_reads_back_exactly(thorax: Volume, tmp_path: Path) -> None:
    # dicom3tools (2022) does not know the Label Map SEG class yet: read-back only.
    labels = threshold_labels(thorax, "lungs")
    result = write_seg(thorax, labels, load_profile("lungs"), tmp_path, seg_type="labelmap")
    ds = pydicom.dcmread(result.path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert np.array_equal(seg_labelmap_on_source(result.path, thorax), labels.array)


def test_multiframe_source_frames_map_back(data_dir: Path, tmp_path: Path) -> None:
    volume = load_series(data_dir / "seg_objects" / "23x38x3" / "multiframe" / "mf.dcm")
    labels = threshold_labels(volume, "bone")
    labels.array[:, :10, :10] = 1  # make sure something is segmented on every frame
    result = write_seg(volume, labels, load_profile("bone"), tmp_path)
    assert dciodvfy(result.path) == []
    assert np.array_equal(seg_labelmap_on_source(result.path, volume), labels.array)


def test_real_ge_slices_with_empty_character_set(data_dir: Path, tmp_path: Path) -> None:
    volume = load_series(data_dir / "liver_3slice")
    labels = threshold_labels(volume, "bone")
    result = write_seg(volume, labels, load_profile("bone"), tmp_path)
    assert dciodvfy(result.path) == []
    assert np.array_equal(seg_labelmap_on_source(result.path, volume), labels.array)


def test_source_without_type2_patient_attributes(data_dir: Path, tmp_path: Path) -> None:
    for file in sorted((data_dir / "thorax_cta").glob("*.dcm"))[:8]:
        ds = pydicom.dcmread(file)
        for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "ReferringPhysicianName"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(tmp_path / file.name)
    volume = load_series(tmp_path)
    result = write_seg(volume, threshold_labels(volume, "lungs"), load_profile("lungs"), tmp_path / "out")
    assert dciodvfy(result.path) == []
    assert pydicom.dcmread(result.path).PatientBirthDate == ""


def test_gantry_tilted_source_overlays_exactly(data_dir: Path, tmp_path: Path) -> None:
    volume = load_series(data_dir / "gantry_tilt")
    labels = threshold_labels(volume, "bone")
    result = write_seg(volume, labels, load_profile("bone"), tmp_path)
    assert dciodvfy(result.path) == []
    seg = pydicom.dcmread(result.path)
    by_uid = {ds.SOPInstanceUID: ds for ds in volume.source.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame sits on its source image's plane
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position], [float(v) for v in by_uid[ref].ImagePositionPatient])
    assert np.array_equal(seg_labelmap_on_source(result.path, volume), labels.array)


def test_nifti_input_cannot_make_a_seg_but_writes_nifti(data_dir: Path, tmp_path: Path) -> None:
    volume = load_series(data_dir / "thorax_cta_labels" / "aorta.nii.gz")
    labels = LabelMap((volume.hu > 0).astype(np.uint8) * 1, {1: "bone"}, backend="hu_based")
    with pytest.raises(EncodeError, match="--format nifti"):
        write_seg(volume, labels, load_profile("bone"), tmp_path)
    path = write_nifti(volume, labels, load_profile("bone"), tmp_path).path
    image = nib.load(path)
    reference = nib.load(data_dir / "thorax_cta_labels" / "aorta.nii.gz")
    assert np.allclose(image.affine, reference.affine, atol=1e-4)
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(reference.dataobj) > 0)


def test_labels_must_match_the_profile(thorax: Volume, tmp_path: Path) -> None:
    labels = LabelMap(np.zeros(thorax.shape, np.uint8), {1: "liver"}, backend="hu_based")
    with pytest.raises(EncodeError, match="do not match the profile segments"):
        write_seg(thorax, labels, load_profile("lungs"), tmp_path)


# --- issue 14: UIDs per SEG type, empty Type 1C, LABELMAP background, per-frame thickness ---------


def test_binary_and_labelmap_seg_of_one_series_have_distinct_uids(thorax: Volume, tmp_path: Path) -> None:
    labels = threshold_labels(thorax, "lungs")
    binary = write_seg(thorax, labels, load_profile("lungs"), tmp_path / "b")
    labelmap = write_seg(thorax, labels, load_profile("lungs"), tmp_path / "l", seg_type="labelmap")
    assert binary.sop_instance_uid != labelmap.sop_instance_uid
    assert binary.series_instance_uid != labelmap.series_instance_uid
    again = write_seg(thorax, labels, load_profile("lungs"), tmp_path / "l2", seg_type="labelmap")
    assert (again.sop_instance_uid, again.series_instance_uid) == (labelmap.sop_instance_uid,
                                                                   labelmap.series_instance_uid)
    assert binary.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4"
    assert labelmap.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.7"


def test_empty_deidentification_method_from_the_source_is_not_copied(data_dir: Path, tmp_path: Path) -> None:
    for file in sorted((data_dir / "thorax_cta").glob("*.dcm"))[:6]:
        ds = pydicom.dcmread(file)
        ds.DeidentificationMethod = ""  # Type 1C, present and empty: invalid
        ds.save_as(tmp_path / file.name)
    volume = load_series(tmp_path)
    result = write_seg(volume, threshold_labels(volume, "bone"), load_profile("bone"), tmp_path / "out")
    assert dciodvfy(result.path) == []
    seg = pydicom.dcmread(result.path)
    assert seg.PatientIdentityRemoved == "YES" and seg.DeidentificationMethod  # 1C satisfied, with a value


def test_labelmap_seg_has_no_background_segment(thorax: Volume, tmp_path: Path) -> None:
    labels = threshold_labels(thorax, "lungs")
    result = write_seg(thorax, labels, load_profile("lungs"), tmp_path, seg_type="labelmap")
    seg = pydicom.dcmread(result.path)
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence] == [1, 2]
    assert "Background" not in {item.SegmentLabel for item in seg.SegmentSequence}
    # dicom3tools (2022) does not know the Label Map SEG class; every other complaint must be gone
    assert [e for e in dciodvfy(result.path) if "Information Object Not found" not in e] == []
    assert np.array_equal(seg_labelmap_on_source(result.path, thorax), labels.array)


def test_tilted_uneven_series_frames_keep_their_own_thickness_and_position(tmp_path: Path) -> None:
    from tests.geometry_cases import THICK, write_tilted_head

    paths = write_tilted_head(tmp_path / "ct")
    volume = load_series(tmp_path / "ct")
    labels = threshold_labels(volume, "bone")
    result = write_seg(volume, labels, load_profile("bone"), tmp_path / "seg")
    assert dciodvfy(result.path) == []
    seg = pydicom.dcmread(result.path)
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: k for k, p in enumerate(paths)}
    sources = {ds.SOPInstanceUID: ds for ds in volume.source.datasets}
    seen = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = by_uid[ref]
        seen.add(k)
        measures = frame.PixelMeasuresSequence[0]
        assert float(measures.SliceThickness) == (7.0 if k in THICK else 4.0)
        assert "SpacingBetweenSlices" not in measures
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in sources[ref].ImagePositionPatient])
    assert seen & set(THICK) and seen - set(THICK)  # both kinds of slice carry frames
    assert np.array_equal(seg_labelmap_on_source(result.path, volume), labels.array)
