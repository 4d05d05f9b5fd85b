"""The OHIF Viewer served by the ops HTTP server, and the node's DICOMweb read side for it on the same origin.

Routes (added to the ops app by :mod:`segnode.node.ops.runner`; every one
needs an authenticated user, so the browser's session authenticates the
viewer's DICOMweb requests):

=======  ==========================  =============================================================
GET      ``/viewer/``, ``/viewer/…``  OHIF's built ``dist/`` (``make viewer``): files as they are,
                                     ``index.html`` for OHIF's own routes (``/viewer/viewer?…``)
GET      ``/viewer/app-config.js``   generated: one ``dicomweb`` data source, ``/dicomweb`` here
GET      ``/dicomweb/…``             QIDO-RS / WADO-RS (:mod:`segnode.node.http_in.dicomweb_read`)
=======  ==========================  =============================================================

OHIF's build expects to live at ``/``: its ``index.html`` and webpack
runtime name ``/`` as their public path.  Those two strings are rewritten as
the files are served (``window.PUBLIC_URL``, the ``src``/``href`` of
``index.html``, ``__webpack_require__.p``), so every asset is fetched below
``/viewer/`` and the router's basename is ``/viewer``.  A file name is checked
component by component (no ``..``, no hidden or odd names) and must resolve
inside the viewer's folder.  Pages of the viewer carry their own
Content-Security-Policy (scripts, workers and WebAssembly from this origin
only; no framing).  Without the built viewer, ``/viewer/`` answers 503 and
says how to install it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import mimetypes
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from segnode.node.config.viewer import ViewerConfig
from segnode.node.http_in.base import HttpError, Response
from segnode.node.http_in.dicomweb_read import DicomWebReader
from segnode.node.ops.auth import OpsRequest, OpsResponse
from segnode.node.ops.roles import Access

logger = logging.getLogger(__name__)

MOUNT = "/viewer"
DICOMWEB = "/dicomweb"
MAX_ANSWER_BYTES = 512 * 1024 * 1024  # one /dicomweb answer of the ops server (a viewer asks for frames, not studies)
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,254}")
_TYPES = {".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".html": "text/html; charset=utf-8", ".json": "application/json",
          ".wasm": "application/wasm", ".svg": "image/svg+xml", ".woff2": "font/woff2", ".map": "application/json",
          ".ico": "image/x-icon", ".png": "image/png", ".webapp": "application/x-web-app-manifest+json",
          ".xml": "application/xml", ".txt": "text/plain; charset=utf-8"}
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)
NOT_INSTALLED = (b"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>viewer not installed</title>"
                 b"</head><body><h1>The viewer is not installed</h1><p>This node serves the OHIF Viewer from "
                 b"<code>viewer/node_modules/@ohif/app/dist</code> (node config <code>viewer.dist</code>). Install "
                 b"it with <code>make viewer</code> (runs <code>npm ci --ignore-scripts</code> in "
                 b"<code>viewer/</code>; the lock file pins the package and its integrity), then reload.</p>"
                 b"</body></html>\n")


def viewer_url(study_uid: str, seg_series_uid: str | None = None) -> str:
    """The viewer's page of a study, with the job's SEG (hydrated at once) in the first viewport."""
    url = f"{MOUNT}/viewer?StudyInstanceUIDs={study_uid}"
    return url + f"&initialSeriesInstanceUID={seg_series_uid}" if seg_series_uid else url


def app_config(node: str) -> bytes:
    """OHIF's ``app-config.js``: this origin's ``/dicomweb`` as the only data source."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb", "sourceName": "segnode",
        "configuration": {
            "friendlyName": f"segnode {node}", "name": "segnode",
            "qidoSupportsIncludeField": True, "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": False, "supportsWildcard": True,
            "staticWado": False, "singlepart": "bulkdata", "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True}, "supportsReject": False, "dicomUploadEnabled": False,
        },
    }
    config = {
        "routerBasename": MOUNT, "showStudyList": True, "extensions": [], "modes": [],
        "customizationService": [{"ohif.tours": {"$set": []}}],  # no onboarding tour over the images
        "defaultDataSourceName": "segnode", "dataSources": [source],
        "investigationalUseDialog": {"option": "never"}, "disableConfirmationPrompts": True,
        "showWarningMessageForCrossOrigin": False, "showCPUFallbackMessage": False, "showLoadingIndicator": True,
        "useSharedArrayBuffer": "FALSE", "maxNumberOfWebWorkers": 2, "strictZSpacingForVolumeViewport": True,
        "showErrorDetails": "always",
    }
    origin = ("const origin = window.location.origin;\n"
              "for (const source of window.config.dataSources) {\n"
              "  for (const key of ['qidoRoot', 'wadoRoot', 'wadoUriRoot']) {\n"
              f"    source.configuration[key] = origin + {json.dumps(DICOMWEB)};\n"
              "  }\n}\n")
    return (f"/* generated by segnode for node {json.dumps(node)} */\nwindow.config = {json.dumps(config, indent=1)};\n"
            + origin).encode("utf-8")


def csp(index_html: bytes | None) -> str:
    """The viewer's Content-Security-Policy: its inline scripts by hash, workers, WebAssembly, no framing."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
                      for s in _INLINE_SCRIPT.findall(index_html or b""))
    return ("default-src 'self'; "
            f"script-src 'self' {hashes} 'unsafe-eval' 'wasm-unsafe-eval' blob:; "
            "worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            "font-src 'self' data:; connect-src 'self' data: blob:; object-src 'none'; base-uri 'self'; "
            "form-action 'self'; frame-ancestors 'none'")


def rewrite(name: str, data: bytes) -> bytes:
    """``data`` of ``name`` with OHIF's public path ``/`` made ``/viewer/``."""
    if name == "index.html":
        data = data.replace(b"window.PUBLIC_URL = '/'", b"window.PUBLIC_URL = '/viewer/'")
        return re.sub(rb'(src|href)="/(?!/)', rb'\1="/viewer/', data)
    if name.endswith(".js"):
        return data.replace(b'__webpack_require__.p = "/";', b'__webpack_require__.p = "/viewer/";')
    return data


def safe_file(root: Path, name: str) -> Path | None:
    """The file ``name`` (``a/b.js``) under ``root``, or ``None``; 400 for a name that could leave it."""
    parts = name.split("/")
    if len(name) > 512 or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise HttpError(HTTPStatus.BAD_REQUEST, "not a file name of the viewer")
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise HttpError(HTTPStatus.BAD_REQUEST, "not a file name of the viewer")
    return path if path.is_file() else None


@dataclass
class _Cached:
    key: tuple[int, int]
    data: bytes


class Viewer:
    """The built viewer's files under ``/viewer/`` (rewritten where they name ``/``), cached in memory."""

    def __init__(self, config: ViewerConfig, *, node: str) -> None:
        self.root = config.folder
        self.enabled = config.enabled
        self.node = node
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    @property
    def installed(self) -> bool:
        return self.enabled and (self.root / "index.html").is_file()

    def _read(self, path: Path, name: str) -> bytes:
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached.key == key:
                return cached.data
        data = rewrite(name, path.read_bytes())
        if name == "index.html" or name.endswith((".js", ".css", ".wasm")):
            with self._lock:
                self._cache[name] = _Cached(key, data)
        return data

    def _index(self) -> Response:
        data = self._read(self.root / "index.html", "index.html")
        return _answer(HTTPStatus.OK, data, _TYPES[".html"], index_html=data)

    def page(self, req: OpsRequest) -> Response:
        """``GET /viewer/{file}``: a file of the build, the generated config, or OHIF's page for its routes."""
        if not self.installed:
            return _answer(HTTPStatus.SERVICE_UNAVAILABLE, NOT_INSTALLED, _TYPES[".html"])
        name = req.params.get("file") or ""
        if name == "app-config.js":
            return _answer(HTTPStatus.OK, app_config(self.node), _TYPES[".js"])
        if name in ("", "index.html"):
            return self._index()
        path = safe_file(self.root, name)
        if path is None:
            if "." in name.rsplit("/", 1)[-1]:  # a file that is not there
                raise HttpError(HTTPStatus.NOT_FOUND, "no such file in the viewer")
            return self._index()  # one of OHIF's routes (/viewer/viewer, /viewer/segmentation...)
        suffix = path.suffix.lower()
        content_type = _TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return _answer(HTTPStatus.OK, self._read(path, name), content_type)


def _answer(status: HTTPStatus, body: bytes, content_type: str, *, index_html: bytes | None = None) -> OpsResponse:
    """A response of the viewer, with the viewer's CSP instead of the ops pages' (no framing in either)."""
    return OpsResponse(status, body, content_type, csp=csp(index_html))


def dicomweb_handler(reader: DicomWebReader) -> Callable[[OpsRequest], Response]:
    """``GET /dicomweb/...`` on the ops server: the reader's answer, bulk data URIs below ``/dicomweb``."""

    def handle(req: OpsRequest) -> Response:
        answer = reader.get(req.path[len(DICOMWEB):], req.query, accept=req.header("accept"), base=DICOMWEB)
        if answer.length > MAX_ANSWER_BYTES:  # the ops server sends a body whole, from memory
            raise HttpError(HTTPStatus.BAD_REQUEST, f"the answer would be {answer.length} bytes, over the "
                            f"{MAX_ANSWER_BYTES} the ops server sends: retrieve its series or instances, or use "
                            "the DICOMweb listener (dicomweb.enabled)")
        return OpsResponse(answer.status, answer.body(), answer.content_type, list(answer.headers.items()))

    return handle


Route = tuple[str, str, Callable[[OpsRequest], Response], Access]


def viewer_routes(viewer: Viewer, reader: DicomWebReader) -> list[Route]:
    """The routes to add to the ops app (``app.add_routes(...)``); each needs an authenticated user."""
    return [
        ("GET", f"{MOUNT}/", viewer.page, True),
        ("GET", f"{MOUNT}/(?P<file>.+)", viewer.page, True),
        ("GET", f"{DICOMWEB}/(?P<resource>.+)", dicomweb_handler(reader), True),
    ]
