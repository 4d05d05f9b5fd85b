"""Real DICOM peers for tests: DCMTK storescp/storescu, Orthanc, and ``segnode serve``.

Each peer starts on a free loopback port and is waited for by a readiness
check (a TCP connect, an HTTP answer, or the node's "listening" line), never
by a blind sleep.  Every DCMTK tool runs with ``TCP_NODELAY=1``: DCMTK 3.6.7 sends each
C-STORE response in two small writes, and with Nagle's algorithm every image waits ~44 ms
for a delayed ACK (~23 images/s into ``storescp`` instead of ~1,068).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
ROOT = Path(__file__).resolve().parents[1]
SEGNODE = [sys.executable, "-m", "segnode.node.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Call ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop ``proc`` (SIGTERM, then SIGKILL after ``timeout``) and close its pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


# -- DCMTK -----------------------------------------------------------------------------

CT_ONLY_CFG = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[CTOnly]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


@dataclass
class StoreSCP:
    port: int
    ae_title: str
    out_dir: Path
    proc: subprocess.Popen

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


@contextmanager
def storescp(out_dir: Path, *, port: int | None = None, ae_title: str = "PACS",
             ct_only: bool = False, accept: Sequence[str] = ()) -> Iterator[StoreSCP]:
    """DCMTK ``storescp`` writing into ``out_dir``; ``ct_only`` refuses every class but CT.

    ``accept``: SOP classes (DCMTK names or UIDs) to accept besides Verification; every other is refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = ["storescp", "-aet", ae_title, "-od", str(out_dir)]
    if ct_only:
        cfg = out_dir.parent / f"storescp-ctonly-{port}.cfg"
        cfg.write_text(CT_ONLY_CFG)
        cmd += ["-xf", str(cfg), "CTOnly"]
    elif accept:
        cfg = out_dir.parent / f"storescp-accept-{port}.cfg"
        contexts = "".join(f"PresentationContext{n} = {uid}\\Uncompressed\n" for n, uid in enumerate(accept, 2))
        cfg.write_text(CT_ONLY_CFG.replace("PresentationContext2 = CTImageStorage\\Uncompressed\n", contexts))
        cmd += ["-xf", str(cfg), "CTOnly"]
    proc = subprocess.Popen([*cmd, str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 10, f"storescp on {port}")
        assert proc.poll() is None, "storescp exited at start"
        yield StoreSCP(port, ae_title, out_dir, proc)
    finally:
        stop_process(proc)


def storescu(port: int, paths: Sequence[Path], *, calling: str = "SCANNER", called: str = "SEGNODE",
             extra: Sequence[str] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """Send ``paths`` (files or folders) with DCMTK ``storescu -v``, not halting on a refusal."""
    cmd = ["storescu", "-v", "-nh", "-aet", calling, "-aec", called, "+sd", *extra, "127.0.0.1", str(port),
           *map(str, paths)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


def store_statuses(output: str) -> list[str]:
    """The "Received Store Response (...)" texts from ``storescu -v`` output, in order."""
    return [line.split("Received Store Response", 1)[1].strip(" ()")
            for line in output.splitlines() if "Received Store Response" in line]


# -- Orthanc -----------------------------------------------------------------------------


@dataclass
class OrthancPeer:
    dicom_port: int
    http_port: int
    ae_title: str
    proc: subprocess.Popen

    def get(self, path: str):  # type: ignore[no-untyped-def]
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as resp:
            data = resp.read()
        return json.loads(data) if resp.headers.get_content_type() == "application/json" else data

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def series_by_modality(self, modality: str) -> list[dict]:
        out = []
        for series_id in self.get("/series"):
            series = self.get(f"/series/{series_id}")
            if series["MainDicomTags"].get("Modality") == modality:
                out.append(series)
        return out


@contextmanager
def orthanc(work: Path, *, ae_title: str = "ORTHANC", node_port: int | None = None,
            dicomweb: bool = False) -> Iterator[OrthancPeer]:
    """Orthanc with a generated config on free ports, storage under ``work``.

    ``dicomweb``: load the DICOMweb plugin (Debian ``orthanc-dicomweb``), served at
    :attr:`OrthancPeer.dicomweb_url`.

    A free port can be taken by another process before Orthanc binds it;
    Orthanc then exits at start, and is started again on other ports (3 tries).
    """
    work.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        peer, log = _start_orthanc(work, ae_title, node_port, dicomweb)
        try:
            try:
                wait_until(lambda: _orthanc_ready(peer), 30, "Orthanc")
            except _OrthancExited:
                if attempt == 2:
                    raise RuntimeError(f"Orthanc exited at start 3 times; see {work / 'orthanc.log'}") from None
                continue
            yield peer
            return
        finally:
            stop_process(peer.proc)
            log.close()


class _OrthancExited(Exception):
    pass


ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _start_orthanc(work: Path, ae_title: str, node_port: int | None,
                   dicomweb: bool = False) -> tuple[OrthancPeer, BinaryIO]:
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "segnode-test", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
        "DicomAet": ae_title, "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "SyncStorageArea": True,
        "StorageCompression": False, "Plugins": [], "HttpServerEnabled": True,
        "DicomModalities": {"segnode": ["SEGNODE", "127.0.0.1", node_port or 104]},
    }
    if dicomweb:
        config["Plugins"] = [str(ORTHANC_DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(work / "orthanc.log", "ab")
    proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    return OrthancPeer(dicom_port, http_port, ae_title, proc), log


def _orthanc_ready(peer: OrthancPeer) -> bool:
    if peer.proc.poll() is not None:
        raise _OrthancExited
    try:
        return bool(peer.get("/system")) and port_open(peer.dicom_port)
    except OSError:
        return False


# -- the node ----------------------------------------------------------------------------


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    port: int
    config_path: Path
    state_dir: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SEGNODE, *args, "--config", str(self.config_path)], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)


def write_node_config(path: Path, **overrides: object) -> Path:
    """A node.yaml with test-friendly defaults (free port, short quiet period)."""
    config: dict[str, object] = {
        "port": free_port(), "state_dir": str(path.parent / "state"),
        "completion": {"quiet_period_s": 1.0, "sweep_interval_s": 0.2},
        "limits": {"min_free_disk_mb": 1},
        "dispatch": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "poll_interval_s": 0.2, "timeout_s": 10},
        "housekeeping": {"spool_retention_s": 3600},
        "http": {"port": 0},  # ops API on a free port: tests never collide on 8080
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def start_node(config_path: Path) -> NodeProcess:
    """Start ``segnode serve`` and wait for its "listening" line."""
    config = yaml.safe_load(config_path.read_text())
    proc = subprocess.Popen([*SEGNODE, "serve", "--config", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = proc.stdout.readline() if proc.stdout else ""  # blocks until the SCP listens (or exit)
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"segnode serve did not start: {line!r}")
    port = int(line.split("listening on ", 1)[1].split(",")[0].rsplit(":", 1)[1])
    return NodeProcess(proc, port, config_path, Path(config["state_dir"]))


@contextmanager
def node(config_path: Path) -> Iterator[NodeProcess]:
    running = start_node(config_path)
    try:
        yield running
    finally:
        stop_process(running.proc)


def dcmtk_available() -> bool:
    return all(shutil.which(t) for t in ("storescu", "storescp"))
