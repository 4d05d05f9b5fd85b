"""Review before send: the QC policy, the held state, and a reviewer's decision in a real browser.

The end-to-end test runs ``segnode serve`` with a route that holds every result
(``review: always``), sends the real CTA with ``storescu``, opens the held job's
page in headless Chromium (Chrome DevTools Protocol), logs in through the form,
is refused a cross-origin form post and a frame of the job page (pages served
from another port), a decision without the CSRF token, as another user and by a
curator (job still held, nothing in Orthanc), clicks *Approve* as the logged-in
reviewer, and finds the SEG in Orthanc; a second series is rejected through the
API with the reviewer's personal token and never sent; repeated wrong
passwords are throttled.  The page's screenshot is kept in ``tests/artifacts/review_page.png``.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from segnode.node.ops.accounts import AccountStore
from segnode.node.ops.roles import Role
from segnode.node.review import decide
from segnode.node.writers.pictures import write_png
from segnode.routing.rules import Action, QcPolicy
from segnode.storage.dataset import DatasetStore
from segnode.storage.index import Index, JobState

from tests.node.ops.test_accounts import PASSWORD, Client
from tests.chromium_tab import ChromiumTab
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


class Page(ChromiumTab):
    """The review page's tab (plain Chromium), opened at ``url``."""

    def __init__(self, url: str, profile: Path) -> None:
        super().__init__(profile)
        self.navigate(url)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(self.screenshot_png())


def _post(url: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **auth})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str, token: str) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.read().decode()


def wait_state(index: Index, series_uid: str, states: set[JobState]):  # type: ignore[no-untyped-def]
    return wait_until(lambda: next((j for j in index.jobs() if j.series_uid == series_uid and j.state in states),
                                   None), 180, f"job of {series_uid} in {sorted(s.value for s in states)}",
                      interval=0.2)


class Attacker:
    """Pages on another origin (another port of 127.0.0.1): a form that posts itself, a frame of the job page."""

    def __init__(self, pages: dict[str, str]) -> None:
        body = {path: page.encode() for path, page in pages.items()}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the base class's name
                page = body.get(self.path, b"")
                self.send_response(200 if page else 404)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attacks(base: str, job_id: int) -> dict[str, str]:
    form = (f'<form id=f method=post action="{base}/jobs/{job_id}/decision">'
            '<input name=decision value=approve><input name=reviewer value=csrf-form></form>'
            "<script>document.getElementById('f').submit()</script>")
    return {"/post.html": f"<!DOCTYPE html><html><body>{form}</body></html>",
            "/frame.html": f'<!DOCTYPE html><html><body><iframe id=x src="{base}/jobs/{job_id}/review" '
                           'width=800 height=600></iframe></body></html>'}


def _child_frames(page: Page) -> list[dict]:
    return [c["frame"] for c in page.call("Page.getFrameTree")["frameTree"].get("childFrames", [])]


def _refused_in_the_browser(page: Page, base: str, job_id: int, index: Index, pacs: object) -> None:
    """A page on another origin posts a decision and frames the job page: both refused, nothing sent."""
    attacker = Attacker(_attacks(base, job_id))
    try:
        page.navigate(attacker.url + "/post.html")
        wait_until(lambda: str(page.js("location.href")).startswith(f"{base}/jobs/"), 30, "the form post")
        wait_until(lambda: page.js("document.readyState") == "complete", 30, "the answer")
        answer = str(page.js("document.body.innerText"))
        assert "cross-origin request refused" in answer, answer
        assert page.js("performance.getEntriesByType('navigation')[0].responseStatus") == 403
        page.navigate(attacker.url + "/frame.html")
        [frame] = wait_until(lambda: _child_frames(page) or None, 30, "the iframe")
        # Chromium honours frame-ancestors 'none': the frame holds its error page, not the job page
        assert frame.get("unreachableUrl", "").startswith(f"{base}/jobs/") or frame["url"].startswith(
            "chrome-error://"), frame
        assert page.js("(() => { try { return document.getElementById('x').contentDocument === null } "
                       "catch (e) { return true } })()")
    finally:
        attacker.close()
    assert index.job(job_id).state is JobState.HELD and pacs.series_by_modality("SEG") == []


def _refused_over_http(base: str, job_id: int, index: Index, pacs: object) -> None:
    """No CSRF token, a reviewer acting as another user, a curator approving: each 403, the job still held."""
    alice, carol = Client(base), Client(base)
    alice.login("alice", PASSWORD["alice"])
    carol.login("carol", PASSWORD["carol"])
    same = {"Origin": base}
    cases = [(alice, {"decision": "approve"}, "missing or wrong CSRF token"),
             (alice, {"decision": "approve", "csrf": alice.csrf, "reviewer": "Dr. Somebody"},
              "a reviewer acting as another user"),
             (carol, {"decision": "approve", "csrf": carol.csrf}, "carol may not do this (needs role reviewer)")]
    for client, fields, message in cases:
        status, body = client.decide(job_id, fields, same)
        assert (status, message in body["error"]) == (403, True), (fields, body)
    assert index.job(job_id).state is JobState.HELD and pacs.series_by_modality("SEG") == []


def _throttled(base: str) -> None:
    client = Client(base)
    for _ in range(3):
        assert client.login("alice", "not-her-password")[0] == 401
    status, headers, _ = client.login("alice", PASSWORD["alice"])
    assert status == 429 and int(headers["Retry-After"]) > 500 and client.cookie is None


@pytest.mark.peer
@pytest.mark.slow
def test_held_job_approved_in_the_browser_reaches_orthanc_rejected_one_is_not_sent(tmp_path) -> None:
    phantom_dir = tmp_path / "phantom"
    v = thorax_phantom().volume
    write_ct_series(v.hu, phantom_dir, v.spacing, v.origin, v.direction)
    from pydicom import dcmread

    cta_uid = dcmread(THORAX / "CT0001.dcm", stop_before_pixels=True).SeriesInstanceUID
    phantom_uid = dcmread(sorted(phantom_dir.glob("*.dcm"))[0], stop_before_pixels=True).SeriesInstanceUID
    accounts = AccountStore.in_state_dir(tmp_path / "state")  # the state_dir of write_node_config
    accounts.add("alice", frozenset({Role.REVIEWER}), PASSWORD["alice"])
    accounts.add("carol", frozenset({Role.CURATOR}), PASSWORD["carol"])
    accounts.add("olga", frozenset({Role.OPS}))
    ops_token, alice_token = accounts.new_token("olga"), accounts.new_token("alice")
    with orthanc(tmp_path / "orthanc") as pacs:
        routes = tmp_path / "routes.yaml"
        routes.write_text(yaml.safe_dump({"rules": [{"name": "review-everything", "fallback": True, "action": {
            "profile": "lungs", "backend": "hu_based", "destinations": ["pacs"], "review": "always",
            "harvest": "reviewed_lungs"}}]}))
        http_port = free_port()
        secret = tmp_path / "secret.key"
        secret.write_bytes(bytes(range(32)))
        config = write_node_config(tmp_path / "node.yaml", routes=str(routes),
                                   http={"port": http_port, "login_free_failures": 3, "login_delay_s": 600},
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
            metrics = _get(base + "/metrics", ops_token)
            assert 'segnode_jobs{state="held"} 1.0' in metrics
            status_page = _get(base + "/status", ops_token)
            held_section = status_page.split('id=held', 1)[1].split("</table>", 1)[0]
            assert f'href="/jobs/{held.job_id}/review"' in held_section and "QC pass" in held_section

            page = Page(f"{base}/jobs/{held.job_id}/review", tmp_path / "chromium")
            try:
                assert page.js("location.pathname + location.search") == f"/login?next=/jobs/{held.job_id}/review"
                page.type_into("#name", "alice")
                page.type_into("#password", PASSWORD["alice"])
                page.click("#submit")
                page.wait_event("Page.loadEventFired")
                assert page.js("location.pathname") == f"/jobs/{held.job_id}/review"
                assert page.js("document.getElementById('user').innerText").startswith("alice")
                assert page.js("document.querySelectorAll('#pictures img').length") == 6  # 2 lungs x 3 planes
                assert page.js("Array.from(document.images).every(i => i.complete && i.naturalWidth >= 384 "
                               "&& i.naturalWidth === i.naturalHeight)")
                qc = page.js("document.getElementById('qc').innerText")
                assert "volume_ml" in qc and "side" in qc and "51.9" in qc  # left lung: mm left of the body midline
                # empty, volume, side, components, largest component, field of view: per lung
                assert page.js("document.querySelectorAll('#qc td.o-pass').length") == 12
                assert page.js("document.querySelectorAll('#qc td.o-warn, #qc td.o-fail').length") == 0
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(ARTIFACTS / "review_page.png")

                _refused_in_the_browser(page, base, held.job_id, index, pacs)
                _refused_over_http(base, held.job_id, index, pacs)

                page.navigate(f"{base}/jobs/{held.job_id}/review")
                page.type_into("#comment", "outlines checked")
                page.click("#approve")
                page.wait_event("Page.loadEventFired")
                history = str(page.js("document.getElementById('history').innerText"))
                assert "approved by alice: outlines checked" in history
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
            assert _post(f"{base}/api/v1/jobs/{other.job_id}/reject", {})[0] == 401  # no token, no login
            status, body = _post(f"{base}/api/v1/jobs/{other.job_id}/reject",
                                 {"comment": "right lung leaks into the liver"}, alice_token)
            assert (status, body["state"]) == (200, "rejected")
            assert _post(f"{base}/api/v1/jobs/{other.job_id}/approve", {}, alice_token)[0] == 409
            assert index.job(other.job_id).state is JobState.REJECTED
            _throttled(base)
            audit = [json.loads(line) for line in (n.state_dir / "audit" / "audit.jsonl").read_text().splitlines()]
        decisions = [r for r in audit if r["event"] == "review.decision"]
        assert [(r["job_id"], r["decision"], r["reviewer"], r["via"], r["state"]) for r in decisions] == [
            (held.job_id, "approve", "alice", "session", "sending"),
            (other.job_id, "reject", "alice", "token", "rejected")]
        assert decisions[1]["comment"] == "right lung leaks into the liver" and decisions[1]["time"]
        logins = [r["event"] for r in audit if r["event"].startswith("login")]
        assert logins == ["login"] * 3 + ["login.failed"] * 3 + ["login.throttled"]
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
