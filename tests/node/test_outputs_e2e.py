"""Every output kind through a real ``segnode serve`` to real PACS: Orthanc and DCMTK storescp.

A route asks for ``outputs: [seg, rtstruct, overlay, sr]``; Orthanc (which
takes whatever the route asks) must hold all four kinds, a destination that
takes only ``[rtstruct, overlay]`` must get no SEG, every file the node wrote
must pass ``dciodvfy``, a resend must not duplicate anything in Orthanc, and a
PACS refusing one SOP class dead-letters that object alone; a retry then
re-sends only it.  The same holds on a gantry-tilted, unevenly spaced series.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydicom import dcmread
from segnode.profiles.loader import load_profile
from segnode.storage.index import DeliveryState, Index, Job, JobState

from tests.dicomtools import dciodvfy
from tests.paths import ARTIFACTS, DATA
from tests.peers import (
    OrthancPeer,
    free_port,
    node,
    orthanc,
    store_statuses,
    storescp,
    storescu,
    wait_until,
    write_node_config,
)
from tests.phantoms import write_tilted_uneven_series

pytestmark = [pytest.mark.peer, pytest.mark.slow]

THORAX = DATA / "thorax_cta"
SEG, RTSTRUCT, SC, SR3D = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3",
                           "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34")
CLASS_OF = {"seg": SEG, "rtstruct": RTSTRUCT, "overlay": SC, "sr": SR3D}
MODALITY_OF = {"seg": "SEG", "rtstruct": "RTSTRUCT", "overlay": "OT", "sr": "SR"}


def config(tmp: Path, rule: dict, destinations: list[dict], **overrides: object) -> Path:
    routes = tmp / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "all-kinds", "fallback": True, "action": rule}]}))
    return write_node_config(tmp / "node.yaml", routes=str(routes), destinations=destinations, **overrides)


def dest(name: str, port: int, ae: str, **extra: object) -> dict:
    return {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port, **extra}


def wait_job(index: Index, states: set[JobState], timeout: float = 180) -> Job:
    return wait_until(lambda: next((j for j in index.jobs() if j.state in states), None), timeout,
                      f"a job in {sorted(s.value for s in states)}", interval=0.2)


def orthanc_instances(pacs: OrthancPeer) -> dict[str, tuple[str, str]]:
    """SOP Instance UID → (Modality, SOP Class UID) of everything Orthanc holds."""
    out = {}
    for series in pacs.get("/series?expand"):
        modality = series["MainDicomTags"].get("Modality")
        for instance_id in series["Instances"]:
            tags = pacs.get(f"/instances/{instance_id}/simplified-tags")
            out[tags["SOPInstanceUID"]] = (modality, tags["SOPClassUID"])
    return out


def orthanc_id(pacs: OrthancPeer, sop_uid: str) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/tools/lookup", data=sop_uid.encode(),
                                     method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        [found] = json.loads(resp.read())
    return found["ID"]


def dciodvfy_all(paths: list[str]) -> dict[str, list[str]]:
    """``dciodvfy`` errors of every file that has any (several at a time: one overlay per slice)."""
    with ThreadPoolExecutor(8) as pool:
        errors = dict(zip(paths, pool.map(lambda p: dciodvfy(Path(p)), paths)))
    return {Path(p).name: e for p, e in errors.items() if e}


def kinds_of(job: Job) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in job.outputs:
        counts[record["kind"]] = counts.get(record["kind"], 0) + 1
    return counts


def api_job(http_port: int, job_id: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/jobs/{job_id}", timeout=10) as resp:
        return json.loads(resp.read())


def test_all_kinds_reach_orthanc_and_a_destination_without_seg_support_gets_none(tmp_path: Path) -> None:
    rule = {"profile": "lungs", "backend": "hu_based", "destinations": ["pacs", "legacy"],
            "outputs": ["seg", "rtstruct", "overlay", "sr"]}
    http_port = free_port()
    with orthanc(tmp_path / "orthanc") as pacs, storescp(tmp_path / "legacy", ae_title="LEGACY") as legacy:
        cfg = config(tmp_path, rule, [dest("pacs", pacs.dicom_port, pacs.ae_title),
                                      dest("legacy", legacy.port, "LEGACY", outputs=["rtstruct", "overlay"])],
                     http={"port": http_port})
        with node(cfg) as n:
            assert store_statuses(storescu(n.port, [THORAX]).stderr) == ["Success"] * 164
            job = wait_job(Index(n.state_dir / "index.sqlite"), {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER})
            assert job.state is JobState.DONE, job.reason
            view = api_job(http_port, job.job_id)
        assert kinds_of(job) == {"seg": 1, "rtstruct": 1, "overlay": 164, "sr": 1}
        assert dciodvfy_all([str(job.file(o["path"])) for o in job.outputs]) == {}

        # Orthanc holds exactly the job's objects, each kind as its own modality and SOP class
        held = orthanc_instances(pacs)
        ours = {o["sop_instance_uid"]: o["kind"] for o in job.outputs}
        assert {uid: held[uid] for uid in ours} == {uid: (MODALITY_OF[k], CLASS_OF[k]) for uid, k in ours.items()}
        assert len(held) == len(ours)  # nothing else (the CT went to the node only)

        # the destination that takes only rtstruct and overlay: no SEG, no SR
        classes = sorted(str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in legacy.received())
        assert classes == sorted([RTSTRUCT] + [SC] * 164)

        # the job API shows each object of each delivery
        deliveries = {d["destination"]: d for d in view["deliveries"]}
        assert {o["kind"] for o in deliveries["legacy"]["objects"]} == {"rtstruct", "overlay"}
        assert len(deliveries["pacs"]["objects"]) == 167
        assert {o["state"] for d in deliveries.values() for o in d["objects"]} == {"done"}

        # Orthanc's own rendering of a mid-series overlay shows both lungs' outline colours
        overlays = sorted((o for o in job.outputs if o["kind"] == "overlay"), key=lambda o: o["path"])
        png = pacs.get(f"/instances/{orthanc_id(pacs, overlays[82]['sop_instance_uid'])}/preview")
        (tmp_path / "overlay_preview.png").write_bytes(png)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "overlay_preview.png", ARTIFACTS / "overlay_preview.png")
        rows = dcmread(THORAX / "CT0083.dcm", stop_before_pixels=True).Rows
        picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[:rows]  # above the legend band
        colours = {tuple(int(c) for c in px) for px in picture.reshape(-1, 3)}
        profile = load_profile("lungs")
        for tissue in ("lung_left", "lung_right"):
            assert tuple(profile.tissue(tissue).color) in colours, tissue

        # a resend of the same result (a fresh node, same series) stores nothing new in Orthanc
        (tmp_path / "again").mkdir()
        destinations = [dest("pacs", pacs.dicom_port, pacs.ae_title),
                        dest("legacy", legacy.port, "LEGACY", outputs=["rtstruct", "overlay"])]
        cfg2 = config(tmp_path / "again", rule, destinations, state_dir=str(tmp_path / "again" / "state"))
        with node(cfg2) as n:
            assert store_statuses(storescu(n.port, [THORAX]).stderr) == ["Success"] * 164
            again = wait_job(Index(n.state_dir / "index.sqlite"), {JobState.DONE, JobState.FAILED,
                                                                   JobState.DEAD_LETTER})
            assert again.state is JobState.DONE, again.reason
        assert {o["sop_instance_uid"] for o in again.outputs} == set(ours)  # deterministic UIDs
        assert orthanc_instances(pacs) == held


def test_a_refused_sop_class_dead_letters_that_object_alone_and_a_retry_resends_only_it(tmp_path: Path) -> None:
    port = free_port()
    rule = {"profile": "lungs", "backend": "hu_based", "destinations": ["picky"],
            "outputs": ["seg", "rtstruct", "overlay", "sr"]}
    cfg = config(tmp_path, rule, [dest("picky", port, "PICKY")])
    with storescp(tmp_path / "picky", port=port, ae_title="PICKY", accept=[SEG, SC, SR3D]) as picky:
        with node(cfg) as n:
            index = Index(n.state_dir / "index.sqlite")
            assert store_statuses(storescu(n.port, [THORAX]).stderr) == ["Success"] * 164
            job = wait_job(index, {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER})
            assert job.state is JobState.DEAD_LETTER, job.reason
            assert "rtstruct" in job.reason and "presentation context" in job.reason
            states = {(o.kind, o.state) for o in index.delivery_objects(job.job_id)}
            assert states == {("seg", DeliveryState.DONE), ("overlay", DeliveryState.DONE),
                              ("sr", DeliveryState.DONE), ("rtstruct", DeliveryState.DEAD)}
            assert len(picky.received()) == 166  # everything but the RTSTRUCT went
    with storescp(tmp_path / "fixed", port=port, ae_title="PICKY") as fixed, node(cfg) as n:
        retry = n.cli("jobs", "retry", str(job.job_id))
        assert retry.returncode == 0, retry.stderr
        done = wait_job(Index(n.state_dir / "index.sqlite"), {JobState.DONE})
        assert done.job_id == job.job_id
        [received] = fixed.received()  # only what was not acknowledged before
        assert str(dcmread(received).SOPClassUID) == RTSTRUCT
        shown = n.cli("jobs", "show", str(job.job_id)).stdout
        assert "rtstruct  done" in shown


TILTED_OFFSETS = [0.0, 2.0, 5.0, 7.0, 10.0, 12.5, 15.0, 18.0]  # steps of 2, 3, 2, 3, 2.5, 2.5, 3 mm


def tilted_bone_series(folder: Path) -> list[Path]:
    """A 15° gantry-tilted, unevenly spaced series: a soft-tissue disc holding a bone ring."""
    rr, cc = np.mgrid[:64, :64]
    d2 = (rr - 32) ** 2 + (cc - 32) ** 2
    hu = np.full((len(TILTED_OFFSETS), 64, 64), -1000.0)
    hu[:, d2 <= 28**2] = 40.0
    hu[:, (d2 <= 14**2) & (d2 > 10**2)] = 1000.0
    return write_tilted_uneven_series(hu, folder, (1.0, 1.0), TILTED_OFFSETS)


def test_tilted_unevenly_spaced_series_all_kinds_on_the_source_planes(tmp_path: Path) -> None:
    sources = tilted_bone_series(tmp_path / "tilted")
    planes = {}
    for path in sources:
        ds = dcmread(path, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, float)
        planes[ds.SOPInstanceUID] = (np.array(ds.ImagePositionPatient, float), np.cross(iop[:3], iop[3:]))
    rule = {"profile": "bone", "backend": "hu_based", "destinations": ["pacs", "legacy"],
            "outputs": ["seg", "rtstruct", "overlay"]}
    with orthanc(tmp_path / "orthanc") as pacs, storescp(tmp_path / "legacy", ae_title="LEGACY") as legacy:
        cfg = config(tmp_path, rule, [dest("pacs", pacs.dicom_port, pacs.ae_title),
                                      dest("legacy", legacy.port, "LEGACY", outputs=["rtstruct", "overlay"])])
        with node(cfg) as n:
            assert store_statuses(storescu(n.port, [tmp_path / "tilted"]).stderr) == ["Success"] * len(sources)
            job = wait_job(Index(n.state_dir / "index.sqlite"), {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER})
            assert job.state is JobState.DONE, job.reason
        held = orthanc_instances(pacs)
        legacy_classes = sorted(str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in legacy.received())
    assert kinds_of(job) == {"seg": 1, "rtstruct": 1, "overlay": len(sources)}
    assert dciodvfy_all([str(job.file(o["path"])) for o in job.outputs]) == {}
    assert {held[o["sop_instance_uid"]][0] for o in job.outputs} == {"SEG", "RTSTRUCT", "OT"} and len(held) == 10
    assert legacy_classes == sorted([RTSTRUCT] + [SC] * len(sources))  # no SEG

    by_kind = {o["kind"]: job.file(o["path"]) for o in job.outputs}  # paths relative to the job folder
    seg = dcmread(by_kind["seg"])
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame exactly on its source image
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(position, planes[ref][0], atol=1e-4)
    contours = dcmread(by_kind["rtstruct"]).ROIContourSequence[0].ContourSequence
    assert len(contours) >= len(sources)  # the ring: outer and inner outline on every slice
    for item in contours:  # each contour point lies in its referenced image's plane
        origin, normal = planes[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.array(item.ContourData, float).reshape(-1, 3)
        assert np.abs((points - origin) @ normal).max() < 1e-3
