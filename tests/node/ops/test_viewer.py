"""The OHIF Viewer served by the node: static files, its config, refusals, and a held job's SEG in Chromium.

The end-to-end test runs ``segnode serve`` with a route that holds every
result, sends the real CTA with ``storescu``, logs in as a reviewer in headless
Chromium (software WebGL), opens the held job's page, follows *Open in viewer*
into OHIF served by the node, and waits until the CT shows with the lungs in
their segment colours.  Every DICOMweb request OHIF makes is recorded from the
DevTools network events and must be answered 2xx; the screenshot is kept in
``tests/artifacts/viewer_seg.png`` and the requests in ``viewer_requests.json``.
"""

from __future__ import annotations

import io
import json
import time
from http import HTTPStatus
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from pydicom import dcmread
from segnode.node.config.viewer import DEFAULT_DIST, ViewerConfig
from segnode.node.http_in.base import HttpError
from segnode.node.ops.accounts import AccountStore
from segnode.node.ops.roles import Role
from segnode.node.http_in.wado import WebAnswer
from segnode.node.ops.viewer import (
    MAX_ANSWER_BYTES,
    Viewer,
    app_config,
    csp,
    dicomweb_handler,
    rewrite,
    viewer_url,
)
from segnode.storage.index import Index, JobState

from tests.chromium_tab import SOFTWARE_WEBGL, ChromiumTab
from tests.paths import ARTIFACTS, DATA
from tests.peers import free_port, node, store_statuses, storescu, wait_until, write_node_config

THORAX = DATA / "thorax_cta"
INSTALLED = (DEFAULT_DIST / "index.html").is_file()
ENOUGH_COLOUR = 5000  # the lungs on the first slice OHIF shows cover ~40,000 px of a 1400x900 window
ENOUGH_GREY = 20000  # the CT around them
NEEDS_VIEWER = pytest.mark.skipif(not INSTALLED, reason="the OHIF viewer is not installed: make viewer")

INDEX = (b"<!doctype html><html><head><script>window.PUBLIC_URL = '/';</script>"
         b'<script src="/app-config.js"></script><link href="/app.css" rel="stylesheet"></head>'
         b'<body><script defer src="/app.bundle.js"></script></body></html>')


def request(viewer: Viewer, file: str = "") -> SimpleNamespace:
    return SimpleNamespace(params={"file": file}, headers={}, path=f"/viewer/{file}")


@pytest.fixture
def fake_dist(tmp_path: Path) -> Path:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_bytes(INDEX)
    (dist / "app.bundle.js").write_bytes(b'(()=>{__webpack_require__.p = "/";})();')
    (dist / "decoder.wasm").write_bytes(b"\0asm\1\0\0\0")
    (dist / "assets" / "favicon.ico").write_bytes(b"\0\0\1\0")
    (tmp_path / "secret.txt").write_text("outside the viewer")
    return dist


def test_files_types_and_public_path_rewritten(fake_dist: Path) -> None:
    viewer = Viewer(ViewerConfig(dist=fake_dist), node="NODE")
    page = viewer.page(request(viewer))
    assert page.status == 200 and page.content_type.startswith("text/html")
    assert b"window.PUBLIC_URL = '/viewer/'" in page.body
    assert b'src="/viewer/app-config.js"' in page.body and b'href="/viewer/app.css"' in page.body
    assert b'src="/viewer/app.bundle.js"' in page.body
    bundle = viewer.page(request(viewer, "app.bundle.js"))
    assert bundle.content_type.startswith("text/javascript") and b'__webpack_require__.p = "/viewer/"' in bundle.body
    assert viewer.page(request(viewer, "decoder.wasm")).content_type == "application/wasm"
    assert viewer.page(request(viewer, "assets/favicon.ico")).content_type == "image/x-icon"


def test_spa_routes_get_the_page_missing_files_404(fake_dist: Path) -> None:
    viewer = Viewer(ViewerConfig(dist=fake_dist), node="NODE")
    for route in ("viewer", "segmentation", "viewer/dicomweb"):
        assert b"window.PUBLIC_URL = '/viewer/'" in viewer.page(request(viewer, route)).body
    with pytest.raises(HttpError) as missing:
        viewer.page(request(viewer, "no-such.bundle.js"))
    assert missing.value.status == 404


@pytest.mark.parametrize("name", ["../secret.txt", "assets/../../secret.txt", "..", ".hidden", "a//b",
                                  "%2e%2e/secret.txt", "assets/\x00x", "a\\..\\secret.txt"])
def test_traversal_is_refused(fake_dist: Path, name: str) -> None:
    viewer = Viewer(ViewerConfig(dist=fake_dist), node="NODE")
    with pytest.raises(HttpError) as refused:
        viewer.page(request(viewer, name))
    assert refused.value.status == 400 and "not a file name" in refused.value.message


def test_symlink_out_of_the_folder_is_refused(fake_dist: Path) -> None:
    (fake_dist / "link.js").symlink_to(fake_dist.parent / "secret.txt")
    viewer = Viewer(ViewerConfig(dist=fake_dist), node="NODE")
    with pytest.raises(HttpError) as refused:
        viewer.page(request(viewer, "link.js"))
    assert refused.value.status == 400


def test_not_installed_answers_503_with_how_to_install(tmp_path: Path) -> None:
    viewer = Viewer(ViewerConfig(dist=tmp_path / "nothing"), node="NODE")
    page = viewer.page(request(viewer, "viewer"))
    assert page.status == 503 and b"make viewer" in page.body and b"Traceback" not in page.body
    off = Viewer(ViewerConfig(dist=tmp_path / "nothing", enabled=False), node="NODE")
    assert off.page(request(off)).status == 503


def test_app_config_points_at_this_origins_dicomweb(fake_dist: Path) -> None:
    viewer = Viewer(ViewerConfig(dist=fake_dist), node="NODE")
    script = viewer.page(request(viewer, "app-config.js"))
    assert script.status == 200 and script.content_type.startswith("text/javascript")
    assert script.body == app_config("NODE")
    config = json.loads(script.body.decode().split("window.config = ", 1)[1].split(";\n", 1)[0])
    assert config["routerBasename"] == "/viewer" and config["defaultDataSourceName"] == "segnode"
    [source] = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert 'source.configuration[key] = origin + "/dicomweb"' in script.body.decode()


def test_csp_hashes_the_inline_scripts_and_forbids_framing(fake_dist: Path) -> None:
    viewer = Viewer(ViewerConfig(dist=fake_dist), node="NODE")
    policy = viewer.page(request(viewer)).csp
    assert policy == csp(rewrite("index.html", INDEX))
    assert "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in policy.split("style-src")[0]
    assert policy.count("'sha256-") == 1 and "worker-src 'self' blob:" in policy
    assert "'wasm-unsafe-eval'" in policy


def test_ops_dicomweb_refuses_an_answer_too_large_to_send_whole() -> None:
    class Huge:
        def get(self, path: str, query: object, *, accept: str | None, base: str) -> WebAnswer:
            return WebAnswer(HTTPStatus.OK, "multipart/related", iter(()), MAX_ANSWER_BYTES + 1)

    handle = dicomweb_handler(Huge())  # type: ignore[arg-type]
    req = SimpleNamespace(path="/dicomweb/studies/1.2.3", query={}, header=lambda name: None)
    with pytest.raises(HttpError) as refused:
        handle(req)  # type: ignore[arg-type]
    assert refused.value.status == 400 and "DICOMweb listener" in refused.value.message


def test_viewer_url_opens_the_study_with_the_seg() -> None:
    assert viewer_url("1.2.3", "1.2.4") == "/viewer/viewer?StudyInstanceUIDs=1.2.3&initialSeriesInstanceUID=1.2.4"
    assert viewer_url("1.2.3") == "/viewer/viewer?StudyInstanceUIDs=1.2.3"


@NEEDS_VIEWER
def test_the_installed_viewer_is_the_pinned_package() -> None:
    lock = json.loads((Path(__file__).parents[3] / "viewer" / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/@ohif/app"]
    installed = json.loads((DEFAULT_DIST.parent / "package.json").read_text())
    assert installed["version"] == pinned["version"] and pinned["integrity"].startswith("sha512-")
    assert lock["packages"][""]["dependencies"]["@ohif/app"] == pinned["version"]
    viewer = Viewer(ViewerConfig(), node="NODE")
    body = viewer.page(request(viewer)).body
    assert b"window.PUBLIC_URL = '/viewer/'" in body and b'src="/app' not in body


# -- end to end, with a browser ------------------------------------------------------------------


class Browser(ChromiumTab):
    """One headless Chromium tab with software WebGL; records network events."""

    def __init__(self, profile: Path) -> None:
        super().__init__(profile, flags=SOFTWARE_WEBGL, window=(1400, 900), domains=("Network", "Runtime"),
                         timeout_s=120)

    def screenshot(self) -> Image.Image:
        return Image.open(io.BytesIO(self.screenshot_png())).convert("RGB")


def viewport_box(browser: Browser) -> tuple[int, int, int, int] | None:
    """The largest canvas on the page (the viewport OHIF renders the CT into), in CSS pixels."""
    box = browser.js("(() => { const c = [...document.querySelectorAll('canvas')].map(e => e.getBoundingClientRect())"
                     ".filter(r => r.width > 200 && r.height > 200).sort((a, b) => b.width * b.height - "
                     "a.width * a.height)[0]; return c ? [c.x, c.y, c.width, c.height].map(Math.round) : null; })()")
    return tuple(box) if box else None  # type: ignore[arg-type,return-value]


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value (0-1) of RGB pixels (0-255)."""
    rgb = rgb.astype(float) / 255
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    spread = np.where(high > low, high - low, 1)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.select([high == r, high == g], [(g - b) / spread % 6, (b - r) / spread + 2], (r - g) / spread + 4)
    return hue * 60, np.where(high > 0, (high - low) / np.where(high > 0, high, 1), 0), high


def segment_colours() -> list[tuple[int, int, int]]:
    """The lungs' display colours (profiles/lungs.yaml), which the SEG carries as CIELab."""
    profile = yaml.safe_load((Path(__file__).parents[3] / "profiles" / "lungs.yaml").read_text())
    return [tuple(t["color"]) for t in profile["tissues"]]


def pixel_counts(shot: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """Pixels inside the viewport (less a margin) in a segment's hue, and grey pixels of the CT."""
    x, y, w, h = box
    hue, saturation, value = _hsv(np.asarray(shot.crop((x + 12, y + 12, x + w - 12, y + h - 12))))
    wanted = [_hsv(np.array(c, float))[0] for c in segment_colours()]
    near = np.zeros(hue.shape, bool)
    for target in wanted:
        near |= np.abs((hue - target + 180) % 360 - 180) < 10
    coloured = near & (saturation > 0.3) & (value > 0.15)
    grey = (saturation < 0.08) & (value > 0.25)
    return int(coloured.sum()), int(grey.sum())


def dicomweb_responses(browser: Browser) -> list[dict]:
    """Every response to a /dicomweb/ request the page made: URL, status, MIME type."""
    out = []
    for event in browser.events:
        if event["method"] == "Network.responseReceived":
            response = event["params"]["response"]
            if "/dicomweb/" in response["url"]:
                out.append({"url": response["url"].split("/dicomweb", 1)[1], "status": response["status"],
                            "type": response.get("mimeType")})
    return out


def failed_requests(browser: Browser) -> list[str]:
    return [e["params"].get("errorText", "") + " " + str(e["params"].get("blockedReason", ""))
            for e in browser.events if e["method"] == "Network.loadingFailed"
            and e["params"].get("type") != "Other"]


@NEEDS_VIEWER
@pytest.mark.peer
@pytest.mark.slow
def test_held_job_opens_in_ohif_served_by_the_node_with_its_seg(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "review-everything", "fallback": True, "action": {
        "profile": "lungs", "backend": "hu_based", "destinations": ["pacs"], "review": "always"}}]}))
    http_port = free_port()
    config = write_node_config(tmp_path / "node.yaml", routes=str(routes), http={"port": http_port},
                               destinations=[{"name": "pacs", "ae_title": "NOBODY", "host": "127.0.0.1",
                                              "port": free_port()}])
    AccountStore.in_state_dir(tmp_path / "state").add("rita", frozenset({Role.REVIEWER}), "rita-reviews-1234")
    series_uid = dcmread(THORAX / "CT0001.dcm", stop_before_pixels=True).SeriesInstanceUID
    with node(config) as n:
        base = f"http://127.0.0.1:{http_port}"
        index = Index(n.state_dir / "index.sqlite")
        assert store_statuses(storescu(n.port, [THORAX]).stderr) == ["Success"] * 164
        held = wait_until(lambda: next((j for j in index.jobs() if j.series_uid == series_uid and j.state in {
            JobState.HELD, JobState.FAILED, JobState.DONE}), None), 180, "the held job", interval=0.2)
        assert held.state is JobState.HELD, held.reason
        browser = Browser(tmp_path / "chromium")
        try:
            browser.navigate(f"{base}/login?next=/jobs/{held.job_id}/review")
            browser.type_into("#name", "rita")
            browser.type_into("#password", "rita-reviews-1234")
            start = len(browser.events)
            browser.click("#submit")
            browser.wait_event("Page.loadEventFired", since=start)
            link = browser.js("document.querySelector('#viewer a').getAttribute('href')")
            assert link == viewer_url(held.study_uid, held.seg_series_uid)
            browser.navigate(base + str(link))
            shot, box, (colour, grey) = _wait_for_segment_colours(browser)
            ARTIFACTS.mkdir(exist_ok=True)
            shot.save(ARTIFACTS / "viewer_seg.png")
            responses = dicomweb_responses(browser)
            (ARTIFACTS / "viewer_requests.json").write_text(json.dumps(responses, indent=1))
            failures = failed_requests(browser)
            page_headers = next(e["params"]["response"]["headers"] for e in browser.events
                                if e["method"] == "Network.responseReceived" and e["params"]["type"] == "Document"
                                and "/viewer/viewer?" in e["params"]["response"]["url"])
        finally:
            browser.close()
        for path in ("/dicomweb/studies", f"/dicomweb/studies/{held.study_uid}/metadata", "/viewer/app-config.js"):
            with pytest.raises(urllib.error.HTTPError) as anonymous:
                urllib.request.urlopen(base + path, timeout=30)
            anonymous.value.close()
            assert anonymous.value.code == 401, path  # no session, no token: nothing of the study
    policy = {k.lower(): v for k, v in page_headers.items()}["content-security-policy"]
    assert "'wasm-unsafe-eval'" in policy and "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in \
        policy.split("style-src")[0]
    assert colour > ENOUGH_COLOUR and grey > ENOUGH_GREY, (
        f"viewport {box}: {colour} pixels in the segments' colours, {grey} grey (see {ARTIFACTS / 'viewer_seg.png'})")
    assert responses and all(200 <= r["status"] < 300 for r in responses), [r for r in responses
                                                                             if r["status"] >= 300]
    urls = [r["url"] for r in responses]
    assert any(u.startswith("/studies?") or u.startswith("/studies/" + held.study_uid + "/series?") or
               u.endswith("/series") for u in urls)  # QIDO
    assert any(u.endswith("/metadata") for u in urls)  # WADO metadata
    assert any("/frames/" in u for u in urls)  # the CT's frames
    seg = f"/series/{held.seg_series_uid}/"
    assert any(seg in u and ("/bulkdata/" in u or "/frames/" in u or u.rsplit("/", 2)[-2] == "instances")
               for u in urls), "the SEG's pixel data was never fetched"
    assert not [f for f in failures if "dicomweb" in f], failures


def _wait_for_segment_colours(browser: Browser) -> tuple[Image.Image, tuple[int, int, int, int] | None,
                                                         tuple[int, int]]:
    """Screenshots until the viewport shows the CT with segment colours (or three minutes pass): the last one."""
    deadline = time.monotonic() + 180
    shot, box, counts = browser.screenshot(), None, (0, 0)
    while time.monotonic() < deadline:
        box = viewport_box(browser)
        shot = browser.screenshot()
        counts = pixel_counts(shot, box) if box else (0, 0)
        if counts[0] > ENOUGH_COLOUR and counts[1] > ENOUGH_GREY:
            break
        browser.call("Runtime.evaluate", expression="new Promise(r => setTimeout(r, 1000))", awaitPromise=True)
    return shot, box, counts
