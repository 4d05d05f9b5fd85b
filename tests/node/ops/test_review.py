"""Review before send: the QC policy, the held state, and a reviewer's decision in a real browser.

The end-to-end test runs ``segnode serve`` with a route that holds every result
(``review: always``), sends the real CTA with ``storescu``, opens the held job's
page in headless Chromium (Chrome DevTools Protocol), types a name, clicks
*Approve*, and finds the SEG in Orthanc; a second series is rejected through the
API and never sent.  The page's screenshot is kept in ``tests/artifacts/review_page.png``.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import websocket
import yaml
from PIL import Image
from segnode.node.review import decide
from segnode.node.writers.pictures import write_png
from segnode.routing.rules import Action, QcPolicy
from segnode.storage.dataset import DatasetStore
from segnode.storage.index import Index, JobState

from tests.node.ops.test_status_page import chromium
from tests.paths import ARTIFACTS, DATA
from tests.peers import (
    free_port,
    node,
    orthanc,
    store_statuses,
    storescu,
    wait_until,
    write_node_config,
)
from tests.phantoms import thorax_phantom, write_ct_series

THORAX = DATA / "thorax_cta"

PASS = {"check": "side", "tissue": "lung_left", "outcome": "pass", "figure": 67.3, "expected": "x > 0"}
WARN = {"check": "components", "tissue": "lung_left", "outcome": "warn", "figure": 3.0, "expected": "<= 2"}
FAIL = {"check": "side", "tissue": "lung_right", "outcome": "fail", "figure": 45.8, "expected": "x < 0"}


# -- the policy -----------------------------------------------------------------------------


def review(value: object) -> dict:
    return Action(profile="lungs", review=value).options()["review"]


@pytest.mark.parametrize(("qc", "setting", "policy"), [
    ([PASS], None, QcPolicy.SEND),
    ([PASS, WARN], None, QcPolicy.SEND_WITH_WARNING),
    ([FAIL], None, QcPolicy.SEND_WITH_WARNING),
    ([PASS], "on_warn", QcPolicy.SEND),
    ([WARN], "on_warn", QcPolicy.HOLD),
    ([WARN], "on_fail", QcPolicy.SEND_WITH_WARNING),
    ([WARN, FAIL], "on_fail", QcPolicy.HOLD),
    ([FAIL], "never", QcPolicy.SEND_WITH_WARNING),
    ([PASS], "always", QcPolicy.HOLD),
    ([FAIL], {"on_fail": "fail"}, QcPolicy.FAIL),
    ([FAIL], {"on_fail": "fail", "always": True}, QcPolicy.FAIL),
    ([WARN], {"on_warn": "send"}, QcPolicy.SEND),
])
def test_policy_per_route(qc, setting, policy) -> None:
    verdict = decide(qc, None if setting is None else review(setting))
    assert verdict.policy is policy


def test_the_reason_names_the_check_and_its_figure() -> None:
    verdict = decide([PASS, FAIL], review("on_fail"))
    assert verdict.reason == "QC fail: side lung_right fail (45.8, expected x < 0)"


def test_unknown_review_word_is_refused() -> None:
    with pytest.raises(ValueError, match="review must be one of"):
        Action(profile="lungs", review="sometimes")
    with pytest.raises(ValueError, match="extra"):
        Action(profile="lungs", review={"on_warning": "hold"})


def test_png_writer_round_trips(tmp_path) -> None:
    rgb = (np.arange(5 * 7 * 3).reshape(5, 7, 3) * 7 % 256).astype(np.uint8)
    write_png(tmp_path / "x.png", rgb)
    with Image.open(tmp_path / "x.png") as image:
        assert image.size == (7, 5) and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), rgb)


# -- end to end, with a browser ------------------------------------------------------------------


class Page:
    """One Chromium tab driven over the DevTools websocket."""

    def __init__(self, url: str, profile: Path) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--remote-debugging-port={port}", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             "--window-size=1280,1600", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = wait_until(lambda: next((t for t in _json(f"http://127.0.0.1:{port}/json/list")
                                          if t.get("type") == "page"), None), 60, "a Chromium tab")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.call("Page.enable")
        self.navigate(url)

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})

    def wait_event(self, name: str) -> None:
        while json.loads(self.ws.recv()).get("method") != name:
            pass

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.js(f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
                      f"(document.querySelector({selector!r}).getBoundingClientRect())")
        x, y = box  # type: ignore[misc]
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({selector!r}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _json(url: str):  # type: ignore[no-untyped-def]
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return []


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_state(index: Index, series_uid: str, states: set[JobState]):  # type: ignore[no-untyped-def]
    return wait_until(lambda: next((j for j in index.jobs() if j.series_uid == series_uid and j.state in states),
                                   None), 180, f"job of {series_uid} in {sorted(s.value for s in states)}",
                      interval=0.2)


@pytest.mark.peer
@pytest.mark.slow
def test_held_job_approved_in_the_browser_reaches_orthanc_rejected_one_is_not_sent(tmp_path) -> None:
    phantom_dir = tmp_path / "phantom"
    v = thorax_phantom().volume
    write_ct_series(v.hu, phantom_dir, v.spacing, v.origin, v.direction)
    from pydicom import dcmread

    cta_uid = dcmread(THORAX / "CT0001.dcm", stop_before_pixels=True).SeriesInstanceUID
    phantom_uid = dcmread(sorted(phantom_dir.glob("*.dcm"))[0], stop_before_pixels=True).SeriesInstanceUID
    with orthanc(tmp_path / "orthanc") as pacs:
        routes = tmp_path / "routes.yaml"
        routes.write_text(yaml.safe_dump({"rules": [{"name": "review-everything", "fallback": True, "action": {
            "profile": "lungs", "backend": "hu_based", "destinations": ["pacs"], "review": "always",
            "harvest": "reviewed_lungs"}}]}))
        http_port = free_port()
        secret = tmp_path / "secret.key"
        secret.write_bytes(bytes(range(32)))
        config = write_node_config(tmp_path / "node.yaml", routes=str(routes), http={"port": http_port},
                                   dataset_store=str(tmp_path / "store"), deid_secret_file=str(secret),
                                   destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                  "port": pacs.dicom_port}])
        with node(config) as n:
            base = f"http://127.0.0.1:{http_port}"
            index = Index(n.state_dir / "index.sqlite")
            assert store_statuses(storescu(n.port, [THORAX]).stderr) == ["Success"] * 164
            held = wait_state(index, cta_uid, {JobState.HELD, JobState.FAILED, JobState.DONE})
            assert held.state is JobState.HELD, held.reason
            assert held.reason.startswith("QC pass")  # the CTA's lungs pass every check; the route holds all
            assert pacs.series_by_modality("SEG") == []
            metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
            assert 'segnode_jobs{state="held"} 1.0' in metrics
            status_page = urllib.request.urlopen(base + "/status", timeout=10).read().decode()
            held_section = status_page.split('id=held', 1)[1].split("</table>", 1)[0]
            assert f'href="/jobs/{held.job_id}/review"' in held_section and "QC pass" in held_section

            page = Page(f"{base}/jobs/{held.job_id}/review", tmp_path / "chromium")
            try:
                assert page.js("document.querySelectorAll('#pictures img').length") == 6  # 2 lungs x 3 planes
                assert page.js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 100)")
                qc = page.js("document.getElementById('qc').innerText")
                assert "volume_ml" in qc and "side" in qc and "51.9" in qc  # left lung: mm left of the body midline
                # empty, volume, side, components, largest component, field of view: per lung
                assert page.js("document.querySelectorAll('#qc td.o-pass').length") == 12
                assert page.js("document.querySelectorAll('#qc td.o-warn, #qc td.o-fail').length") == 0
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(ARTIFACTS / "review_page.png")
                page.type_into("#reviewer", "Dr. Review")
                page.type_into("#comment", "outlines checked")
                page.click("#approve")
                page.wait_event("Page.loadEventFired")
                history = str(page.js("document.getElementById('history').innerText"))
                assert "approved by Dr. Review: outlines checked" in history
                assert not page.js("document.getElementById('review')")  # no form once decided
            finally:
                page.close()
            with Image.open(ARTIFACTS / "review_page.png") as shot:
                assert shot.size[0] == 1280 and len(shot.convert("RGB").getcolors(1 << 20) or ()) > 200
            done = wait_state(index, cta_uid, {JobState.DONE, JobState.DEAD_LETTER})
            assert done.state is JobState.DONE
            [seg] = pacs.series_by_modality("SEG")

            assert store_statuses(storescu(n.port, [phantom_dir]).stderr)[0] == "Success"
            other = wait_state(index, phantom_uid, {JobState.HELD, JobState.FAILED, JobState.DONE})
            assert other.state is JobState.HELD, other.reason
            assert _post(f"{base}/api/v1/jobs/{other.job_id}/reject", {})[0] == 400  # no reviewer
            status, body = _post(f"{base}/api/v1/jobs/{other.job_id}/reject",
                                 {"reviewer": "Dr. Review", "comment": "right lung leaks into the liver"})
            assert (status, body["state"]) == (200, "rejected")
            assert _post(f"{base}/api/v1/jobs/{other.job_id}/approve", {"reviewer": "x"})[0] == 409
            assert index.job(other.job_id).state is JobState.REJECTED
            audit = [json.loads(line) for line in (n.state_dir / "audit" / "audit.jsonl").read_text().splitlines()]
        decisions = [r for r in audit if r["event"] == "review.decision"]
        assert [(r["job_id"], r["decision"], r["reviewer"], r["state"]) for r in decisions] == [
            (held.job_id, "approve", "Dr. Review", "sending"), (other.job_id, "reject", "Dr. Review", "rejected")]
        assert decisions[1]["comment"] == "right lung leaks into the liver" and decisions[1]["time"]
        assert pacs.series_by_modality("SEG") == [seg]  # the rejected one never went
    # both were harvested before review; the rejected one is labelled so in the dataset store
    cases = DatasetStore.open_read_only(tmp_path / "store").cases("reviewed_lungs")
    assert sorted(c.label_status.value for c in cases.values()) == ["auto", "rejected"]


@pytest.mark.peer
@pytest.mark.slow
@pytest.mark.parametrize(("setting", "state"), [({"on_warn": "hold", "on_fail": "fail"}, JobState.FAILED),
                                              (None, JobState.DONE)])
def test_qc_fail_fails_the_job_or_is_recorded_as_a_warning(tmp_path, setting, state) -> None:
    """Six slices of the CTA: about 50 mL of each lung, below the profile's 300 mL: QC fail."""
    from segnode.models.series import load_series

    cta = load_series(THORAX)
    write_ct_series(cta.hu[80:86], tmp_path / "slab", cta.spacing, cta.origin, cta.direction)
    routes = tmp_path / "routes.yaml"
    action = {"profile": "lungs", "backend": "hu_based", **({"review": setting} if setting else {})}
    routes.write_text(yaml.safe_dump({"rules": [{"name": "strict", "fallback": True, "action": action}]}))
    config = write_node_config(tmp_path / "node.yaml", routes=str(routes))
    with node(config) as n:
        assert set(store_statuses(storescu(n.port, [tmp_path / "slab"]).stderr)) == {"Success"}
        index = Index(n.state_dir / "index.sqlite")
        job = wait_until(lambda: next((j for j in index.jobs() if j.state in {JobState.FAILED, JobState.DONE,
                                                                              JobState.HELD}), None),
                         180, "a finished job", interval=0.2)
    assert job.state is state
    assert job.reason.startswith("QC fail: volume_ml lung_left fail (" if setting else "no destination; QC fail: ")
    assert "expected 1000-4500 mL; fail outside 300-6000 mL" in job.reason
