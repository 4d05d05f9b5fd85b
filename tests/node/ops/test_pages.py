"""The pages people read: review pictures on a square grid with true proportions, QC warnings in sight."""

from __future__ import annotations

import numpy as np
from PIL import Image
from segnode.models.volume import LabelMap, Volume
from segnode.node.ops.roles import Principal, Role
from segnode.node.ops.status_page import qc_warning, render_review, render_status
from segnode.node.ops.views import Event, OpsDB
from segnode.node.writers.outline import window_to_gray
from segnode.node.writers.pictures import MIN_DISPLAY, PALETTE, write_pictures
from segnode.profiles.loader import load_profile
from segnode.storage.index import JobState

from tests.ops_helpers import scripted_index

WARN = "QC warn: components lung_left warn (3.0, expected <= 2)"


def _thick_series() -> tuple[Volume, LabelMap]:
    """40 slices of 3 mm, 120 x 100 pixels of 0.8 mm; a box of bone 60 mm high, 48 mm wide, 48 mm deep."""
    hu = np.full((40, 120, 100), 40.0, np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    labels[10:30, 30:90, 20:80] = 1
    hu[labels == 1] = 1200.0  # bright bone: the outline must stand out on it
    volume = Volume(hu, (0.8, 0.8, 3.0), (0.0, 0.0, 0.0), np.eye(3))
    return volume, LabelMap(labels, {1: "bone"}, "test")


def _outlined(path) -> np.ndarray:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return (rgb.max(axis=2) - rgb.min(axis=2)) > 0  # coloured pixels: the outline (the CT is grey)


def test_pictures_are_square_with_true_proportions_and_saturated_outlines(tmp_path):
    volume, labels = _thick_series()
    records = write_pictures(volume, labels, load_profile("bone"), tmp_path)
    assert [r["plane"] for r in records] == ["axial", "coronal", "sagittal"]
    for plane, (height_mm, width_mm) in {"axial": (48.0, 48.0), "coronal": (60.0, 48.0),
                                         "sagittal": (60.0, 48.0)}.items():
        path = tmp_path / "review" / f"bone_{plane}.png"
        with Image.open(path) as image:
            assert image.size == (MIN_DISPLAY, MIN_DISPLAY)
            rgb = np.asarray(image.convert("RGB"))
        edge = _outlined(path)
        rows, cols = np.nonzero(edge.any(axis=1))[0], np.nonzero(edge.any(axis=0))[0]
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert abs(height / width - height_mm / width_mm) < 0.05, (plane, height, width)
        colours = {tuple(c) for c in rgb[edge]}
        assert colours == {PALETTE[0]}
    # the longest side of the coronal (40 x 3 mm = 120 mm) fills the grid: the box is half of it high
    edge = _outlined(tmp_path / "review" / "bone_coronal.png")
    rows = np.nonzero(edge.any(axis=1))[0]
    assert abs((rows[-1] - rows[0] + 1) - MIN_DISPLAY * 60 / 120) <= 2


def test_outline_colours_stand_out_on_bone_and_soft_tissue():
    bone, soft = int(window_to_gray(np.array([1200.0]), (400.0, 1800.0))[0]), 128
    for colour in PALETTE:
        assert max(colour) - min(colour) >= 200, colour  # far from every grey
        for grey in (bone, soft, 0):
            assert max(abs(c - grey) for c in colour) >= 120, (colour, grey)


def test_a_delivered_job_keeps_its_qc_warning_in_sight(tmp_path):
    s = scripted_index(tmp_path / "index.sqlite")
    job_id = s.jobs["done"]
    events = [Event(1, job_id, 1.0, "sending", f"sending to pacs with {WARN}"), Event(2, job_id, 2.0, "done",
                                                                                      "delivered")]
    assert qc_warning(events) == WARN
    assert qc_warning([Event(1, job_id, 1.0, "held", "QC pass: route holds every result for review")]) is None
    job = {"job_id": job_id, "state": "done", "profile": "lungs", "study_uid": "1.1", "series_uid": "1.2", "reason": "delivered"}
    page = render_review(job, {}, node="SEGNODE", events=events)
    assert '<div class=warning id=qc-warning>QC warn: components lung_left warn (3.0, expected &lt;= 2)</div>' in page
    resent = s.jobs["dead"]  # sent again, this time with a QC warning, and delivered
    assert s.index.transition(resent, JobState.SENDING, f"sending to pacs with {WARN}")
    assert s.index.transition(resent, JobState.DONE, "delivered")
    status = render_status(OpsDB(tmp_path / "index.sqlite"), node="SEGNODE", clock=lambda: s.clock.now)
    recent = status.split("id=recent", 1)[1]
    row = recent.split(f'<a href="/jobs/{resent}/review">{resent}</a>', 1)[1].split("</tr>", 1)[0]
    assert 'class="state s-done">done</span> <span class=o-warn' in row and "QC warning" in row
    other = recent.split(f'<a href="/jobs/{job_id}/review">{job_id}</a>', 1)[1].split("</tr>", 1)[0]
    assert "QC warning" not in other


def test_the_decision_form_carries_the_csrf_token_and_no_reviewer_field():
    job = {"job_id": 7, "state": JobState.HELD.value, "profile": "lungs", "study_uid": "1.1", "series_uid": "1.2", "reason": "QC fail"}
    user = Principal("<alice>", frozenset({Role.REVIEWER}), "session")
    page = render_review(job, {}, node="SEGNODE", user=user, csrf="tok&en")
    form = page.split("<form id=review", 1)[1].split("</form>", 1)[0]
    assert '<input type=hidden name=csrf value="tok&amp;en">' in form and "name=reviewer" not in form
    assert "as &lt;alice&gt;" in form and "<alice>" not in page
    anonymous = render_review(job, {}, node="SEGNODE")
    assert "<form id=review" not in anonymous and 'href="/login"' in anonymous
