"""The SR with priors: each segment's volume on the earlier study and the change, read back by dcmqi.

The prior is the thorax CTA as an earlier study of the same patient (its own
study, series and SOP Instance UIDs, StudyDate 400 days before) segmented
with a smaller aorta; the current study is the thorax CTA as it is.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from segnode.models.measurements import segment_statistics
from segnode.models.volume import Volume
from segnode.node.writers.common import deterministic_uid
from segnode.node.writers.seg import write_seg
from segnode.node.writers.sr import write_sr
from segnode.node.writers.sr_priors import PriorResult

from tests.dicomtools import dciodvfy
from tests.output_fixtures import dcmqi_tool, thorax, thorax_labels, writer_profile

pytestmark = pytest.mark.peer  # dciodvfy, dcmqi


def as_prior(volume: Volume) -> Volume:
    """``volume`` as an earlier study: new study/series/instance UIDs, StudyDate 400 days before."""
    assert volume.source is not None
    study, series = deterministic_uid("prior-study"), deterministic_uid("prior-series")
    datasets = []
    for ds in volume.source.datasets:
        copy = pydicom.Dataset(ds)  # a shallow copy is enough: only top-level UIDs and the date change
        copy.file_meta = ds.file_meta
        copy.StudyInstanceUID, copy.SeriesInstanceUID = study, series
        copy.SOPInstanceUID = deterministic_uid("prior", str(ds.SOPInstanceUID))
        copy.StudyDate = "20230101"
        datasets.append(copy)
    source = dataclasses.replace(volume.source, series_instance_uid=str(series), study_instance_uid=str(study),
                                 datasets=tuple(datasets))
    return dataclasses.replace(volume, source=source)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("sr_priors")
    profile = writer_profile(tmp)
    volume = thorax()
    for ds in volume.source.datasets:  # type: ignore[union-attr]
        ds.StudyDate = "20240205"  # 400 days after the prior
    labels = thorax_labels(volume, profile)
    prior_volume = as_prior(thorax())
    prior_labels = thorax_labels(prior_volume, profile)
    aorta = prior_labels.array == {n: v for v, n in profile.label_values().items()}["aorta"]
    smaller = np.where(aorta & ~ndimage.binary_erosion(aorta, iterations=2), 0, prior_labels.array)
    prior_labels = dataclasses.replace(prior_labels, array=smaller.astype(np.uint8))
    prior_seg = write_seg(prior_volume, prior_labels, profile, tmp / "prior_seg")
    prior_stats = segment_statistics(prior_volume, prior_labels)
    seg = write_seg(volume, labels, profile, tmp / "seg")
    stats = segment_statistics(volume, labels)
    sr = write_sr(volume, labels, profile, tmp / "sr", seg_path=seg.path, statistics=stats,
                  priors=[PriorResult(prior_seg.path, prior_stats)])
    plain = write_sr(volume, labels, profile, tmp / "plain", seg_path=seg.path, statistics=stats)
    return {"tmp": tmp, "seg": seg, "stats": stats, "prior_seg": prior_seg, "prior_stats": prior_stats, "sr": sr,
            "plain": plain, "prior_study": prior_volume.source.study_instance_uid}  # type: ignore[union-attr]


def read(sr: Path, out: Path) -> dict:  # type: ignore[type-arg]
    subprocess.run([dcmqi_tool("tid1500reader"), "--inputDICOM", str(sr), "--outputMetadata", str(out)],
                   check=True, capture_output=True, timeout=120)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def items(group: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {i["quantity"]["CodeValue"]: i for i in group["measurementItems"]}


def test_the_sr_gives_each_segments_prior_volume_interval_and_change(written) -> None:  # type: ignore[no-untyped-def]
    assert dciodvfy(written["sr"].path) == []
    report = read(written["sr"].path, written["tmp"] / "sr.json")
    groups = {m["TrackingIdentifier"]: m for m in report["Measurements"]}
    now = {s["tissue"]: s for s in written["stats"] if not s["empty"]}
    before = {s["tissue"]: s for s in written["prior_stats"] if not s["empty"]}
    assert set(groups) == {*now, *(f"{t} prior 2023-01-01" for t in before)}
    assert before["aorta"]["volume_ml"] < now["aorta"]["volume_ml"]  # the prior's aorta was made smaller
    for tissue, stat in now.items():
        prior = groups[f"{tissue} prior 2023-01-01"]
        assert prior["segmentationSOPInstanceUID"] == written["prior_seg"].sop_instance_uid
        assert prior["ReferencedSegment"] == before[tissue]["segment_number"]
        assert float(items(prior)["118565006"]["value"]) == before[tissue]["volume_ml"]
        current = items(groups[tissue])
        change = round(stat["volume_ml"] - before[tissue]["volume_ml"], 3)
        assert float(current["VOLCHG"]["value"]) == pytest.approx(change, abs=1e-6)
        assert current["VOLCHG"]["units"]["CodeValue"] == "ml"
        assert float(current["VOLCHGPCT"]["value"]) == round(100 * change / before[tissue]["volume_ml"], 1)
        assert current["VOLCHGPCT"]["units"]["CodeValue"] == "%"
        assert float(current["PRIORINT"]["value"]) == 400 and current["PRIORINT"]["units"]["CodeValue"] == "d"
    assert float(items(groups["aorta"])["VOLCHG"]["value"]) > 0  # grew since the prior
    assert float(items(groups["vertebrae_t12"])["VOLCHG"]["value"]) == 0  # unchanged


def test_the_sr_references_the_prior_study(written) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(written["sr"].path)
    other = {study.StudyInstanceUID: {i.ReferencedSOPInstanceUID for series in study.ReferencedSeriesSequence
                                      for i in series.ReferencedSOPSequence}
             for study in ds.get("PertinentOtherEvidenceSequence") or []}
    assert written["prior_seg"].sop_instance_uid in other[written["prior_study"]]
    current = {study.StudyInstanceUID for study in ds.CurrentRequestedProcedureEvidenceSequence}
    assert written["prior_study"] not in current
    assert [i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence
            if i.CodingSchemeDesignator == "99SEGNODE"] == ["99SEGNODE"]
    # without priors the report is the one it always was (same UIDs); with them, another
    plain = pydicom.dcmread(written["plain"].path)
    assert written["plain"].sop_instance_uid != written["sr"].sop_instance_uid
    assert "99SEGNODE" not in {i.CodingSchemeDesignator for i in plain.get("CodingSchemeIdentificationSequence") or []}
