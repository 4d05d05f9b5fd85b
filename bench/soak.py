"""Soak and chaos run: sustained mixed traffic with every fault interleaved, then the books balanced.

A seeded, bounded run on loopback:

* ``segnode serve`` (a subprocess) with its state folder on a size-capped tmpfs the run
  mounts (``--state-mb``; without the right to mount, a plain folder and the disk fault is
  skipped and said so), the DICOMweb server on, jobs on remote ``segnode worker`` processes
  through a private RabbitMQ, results sent by C-STORE to a real Orthanc (the PACS) through
  a relay the run controls (to black-hole the destination);
* senders: DCMTK ``storescu`` (``TCP_NODELAY=1``) and a STOW-RS client, studies of 1–3
  phantom CT series, re-sent series (duplicates), instances held back and sent after the
  series' job ran (late instances), and a low rate of hostile connections (the HTTP fuzz's
  cases to the DICOMweb port, garbage to the DICOM port); a sender re-sends what was not
  acknowledged (refused or cut off), as a modality does;
* faults on a seeded schedule, one at a time, cycling through: ``kill -9`` of the node
  (restarted), of a remote worker (restarted) and of the broker (restarted), the PACS
  stopped and started, the state filesystem filled to ``--fill-left-mb`` and freed, the
  destination black-holing (connections accepted, never answered).

At the end (traffic stopped, pending re-sends drained, jobs given ``--drain-s`` to rest) it
checks: every acknowledged instance is in the spool and the index; every routed series has
exactly one current result at the PACS (its SEGs there less those a rejection note names);
no job outside a resting state; the node's memory (RSS) and descriptors flat (least-squares
slope over its longest life); no traceback in any log.  It prints and writes ``soak.json``
and ``soak.png`` (throughput and memory over time) under ``--out``.

    python bench/soak.py --minutes 20 --out bench/out/soak    # make soak
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from pydicom import dcmread  # noqa: E402

from tests.http_fuzz import cases as fuzz_cases  # noqa: E402
from tests.http_fuzz import request, send, stow_request  # noqa: E402
from tests.peers import DCMTK_ENV, SEGNODE, free_port, port_open, wait_until  # noqa: E402
from tests.phantoms import thorax_phantom, write_ct_series  # noqa: E402
from tests.rabbitmq_peer import RabbitMQ  # noqa: E402

RESTING = {"done", "failed", "dead_letter", "not_routed", "held", "rejected", "skipped", "superseded"}
FAULTS = ("node_kill", "worker_kill", "broker_kill", "pacs_stop", "disk_fill", "blackhole")
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
UID_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class Settings:
    seed: int = 20261207
    minutes: float = 20.0
    out: Path = ROOT / "bench" / "out" / "soak"
    series_every_s: float = 6.0  # a new series (of a 1–3 series study) this often
    slices: int = 10
    workers: int = 2
    fault_every_s: float = 60.0
    fault_hold_s: float = 12.0  # a fault lasts this long (a PACS down, a disk full, a black hole)
    state_mb: int = 256
    fill_left_mb: int = 4
    min_free_disk_mb: int = 16
    drain_s: float = 240.0
    hostile_every_s: float = 10.0
    local: bool = False  # local worker processes of the node instead of remote workers on a broker


# -- the peers ------------------------------------------------------------------------------------


class Orthanc:
    """Orthanc as the PACS, restartable on the same ports and storage."""

    def __init__(self, work: Path) -> None:
        self.work, self.dicom_port, self.http_port = work, free_port(), free_port()
        work.mkdir(parents=True, exist_ok=True)
        (work / "orthanc.json").write_text(json.dumps({
            "Name": "soak-pacs", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
            "DicomAet": "ORTHANC", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "SyncStorageArea": True, "StorageCompression": False, "Plugins": [], "DicomAlwaysAllowStore": True}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.work / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen(["Orthanc", str(self.work / "orthanc.json")], stdout=log,
                                         stderr=subprocess.STDOUT, env=DCMTK_ENV)
        wait_until(lambda: port_open(self.dicom_port) and self._http_ok(), 60, "Orthanc")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.proc = None

    def _http_ok(self) -> bool:
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def get(self, path: str) -> object:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()


class Relay:
    """TCP relay node → PACS; ``black_hole`` set: connections accepted, read, never answered."""

    def __init__(self, target: Callable[[], int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.black_hole = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.black_hole.is_set():
                self.held.append(client)
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target()), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the PACS is down: refused, as it would be
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _swallow(sock: socket.socket) -> None:
        with suppress(OSError):
            while sock.recv(65536):
                pass

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def open_again(self) -> None:
        self.black_hole.clear()
        for sock in self.held:
            sock.close()
        self.held.clear()


@dataclass
class Node:
    config: Path
    state: Path
    port: int
    dicomweb_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    lives: list[list[tuple[float, float, int]]] = field(default_factory=list)  # (t, rss MB, fds) per life

    def start(self) -> None:
        out = self.log.with_suffix(f".{len(self.lives)}.out")
        with open(out, "wb") as log:
            self.proc = subprocess.Popen([*SEGNODE, "serve", "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(lambda: b"DICOMweb on" in out.read_bytes() or self.proc is None or self.proc.poll() is not None,
                   120, "segnode serve")
        if self.proc.poll() is not None:
            raise RuntimeError(f"segnode serve exited at start: {out.read_text()[-2000:]}")
        self.lives.append([])

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def sample(self, t: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
            fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except (OSError, TypeError):
            return
        self.lives[-1].append((t, rss, fds))


class Workers:
    def __init__(self, work: Path, broker: RabbitMQ, count: int) -> None:
        self.work, self.broker = work, broker
        self.procs = {f"w{n}": self._start(f"w{n}") for n in range(count)}

    def _start(self, name: str) -> subprocess.Popen[bytes]:
        folder = self.work / "workers" / name
        (folder / "weights").mkdir(parents=True, exist_ok=True)
        with open(folder / "worker.log", "ab") as log:
            return subprocess.Popen(
                [*SEGNODE, "worker", "--broker", self.broker.url, "--queue", "cpu", "--name", name, "--state-dir",
                 str(folder / "state"), "--weights-dir", str(folder / "weights"), "--device", "cpu", "--threads", "1"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def kill(self, name: str) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def restart(self, name: str) -> None:
        self.procs[name] = self._start(name)

    def stop(self) -> None:
        for proc in self.procs.values():
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# -- the state filesystem -------------------------------------------------------------------------


@contextmanager
def capped_folder(path: Path, size_mb: int) -> Iterator[bool]:
    """``path`` on a tmpfs of ``size_mb`` (True), or a plain folder where mounting is not permitted (False)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, left_mb: int) -> Path:
    """Fill ``folder``'s filesystem until ``left_mb`` remain (a file of zeros); returns the file."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as out:
        block = b"\0" * (1 << 20)
        while shutil.disk_usage(folder).free > (left_mb + 1) << 20:
            try:
                out.write(block)
                out.flush()
            except OSError:
                break
    return filler


# -- traffic -------------------------------------------------------------------------------------


@dataclass
class Series:
    study: str
    uid: str
    files: list[Path]
    via: str  # dimse | stow
    late: list[Path] = field(default_factory=list)  # held back: sent after the job ran


@dataclass
class Books:
    acknowledged: set[str] = field(default_factory=set)
    sent_series: set[str] = field(default_factory=set)
    refused: int = 0
    duplicates_sent: int = 0
    late_sent: int = 0
    hostile: int = 0
    hostile_problems: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[float, int, str]] = field(default_factory=list)  # (t, acknowledged, fault or "")
    lock: threading.Lock = field(default_factory=threading.Lock)


def templates(folder: Path, count: int, slices: int, seed: int) -> list[list[Path]]:
    out = []
    for n in range(count):
        phantom = thorax_phantom(shape=(slices, 48, 48), spacing=(6.0, 6.0, 8.0), seed=seed + n)
        v = phantom.volume
        out.append(write_ct_series(v.hu, folder / f"t{n}", v.spacing, v.origin, v.direction))
    return out


def new_uid(rng: random.Random) -> str:
    """A UID from the seed (room left for an instance number)."""
    return f"{UID_ROOT}{rng.getrandbits(96)}"


def make_series(template: list[Path], folder: Path, study: str, number: int, rng: random.Random) -> Series:
    uid = new_uid(rng)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, path in enumerate(template):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, uid, number
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{uid}.{k + 1}"
        out = folder / f"{uid}.{k + 1}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    held = 2 if rng.random() < 0.15 else 0
    return Series(study, uid, files[:len(files) - held], "stow" if rng.random() < 0.3 else "dimse",
                  files[len(files) - held:])


def sop_of(path: Path) -> str:
    return path.stem


def storescu(port: int, files: list[Path]) -> set[str]:
    """SOP Instance UIDs acknowledged with Success by the node."""
    result = subprocess.run(["storescu", "-v", "-nh", "-to", "20", "-ta", "20", "-td", "30", "-aet", "SCANNER",
                             "-aec", "SEGNODE", "127.0.0.1", str(port), *map(str, files)],
                            env=DCMTK_ENV, capture_output=True, text=True, timeout=300)
    acknowledged, current = set(), None
    for line in result.stderr.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.add(sop_of(current))
    return acknowledged


def stow(port: int, token: str, files: list[Path]) -> set[str]:
    req = stow_request("/dicomweb/studies", token, [p.read_bytes() for p in files])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/dicomweb/studies", body=req.body,
                     headers={n.decode(): v.decode() for n, v in req.headers})
        answer = conn.getresponse()
        body = answer.read()
    except OSError:
        return set()
    finally:
        conn.close()
    if answer.status not in (200, 202):
        return set()
    items = json.loads(body).get("00081199", {}).get("Value", [])
    return {item["00081155"]["Value"][0] for item in items}


class Sender:
    """Sends series and re-sends what was not acknowledged (after a pause), like a modality."""

    def __init__(self, node: Node, token: str, books: Books) -> None:
        self.node, self.token, self.books = node, token, books
        self.pending: list[tuple[float, Series, list[Path]]] = []
        self.lock = threading.Lock()

    def send(self, series: Series, files: list[Path]) -> None:
        try:
            got = (stow(self.node.dicomweb_port, self.token, files) if series.via == "stow"
                   else storescu(self.node.port, files))
        except (OSError, subprocess.TimeoutExpired):
            got = set()
        missing = [p for p in files if sop_of(p) not in got]
        with self.books.lock:
            self.books.acknowledged |= got
            self.books.refused += len(missing)
        if missing:
            with self.lock:
                self.pending.append((time.monotonic() + 5.0, series, missing))

    def retry_due(self) -> None:
        now = time.monotonic()
        with self.lock:
            due = [p for p in self.pending if p[0] <= now]
            self.pending = [p for p in self.pending if p[0] > now]
        for _, series, files in due:
            self.send(series, files)

    @property
    def backlog(self) -> int:
        with self.lock:
            return sum(len(files) for _, _, files in self.pending)


class Traffic:
    """The senders' schedule: new series, re-sends, duplicates, late instances, hostile connections."""

    def __init__(self, soak: Soak, node: Node, sender: Sender, pool: list[list[Path]]) -> None:
        self.soak, self.node, self.sender, self.pool = soak, node, sender, pool
        self.rng, self.books, self.s = soak.rng, soak.books, soak.s
        self.next_series, self.next_hostile = 0.0, self.s.hostile_every_s
        self.sent: list[Series] = []
        self.late: list[tuple[float, Series]] = []
        self.study, self.left_in_study, self.number = new_uid(self.rng), 0, 0

    def step(self) -> None:
        now = self.soak.t()
        if now >= self.next_series:
            self._new_series(now)
        for due, series in [x for x in self.late if x[0] <= now]:
            self.late.remove((due, series))
            self._send_late(series)
        if now >= self.next_hostile:
            self.soak.hostile(self.node, self.rng)
            self.next_hostile = now + self.s.hostile_every_s * self.rng.uniform(0.5, 1.5)
        self.sender.retry_due()

    def _new_series(self, now: float) -> None:
        rng = self.rng
        if self.left_in_study == 0:
            self.study, self.left_in_study, self.number = new_uid(rng), rng.randint(1, 3), 0
        self.number += 1
        self.left_in_study -= 1
        series = make_series(rng.choice(self.pool), self.soak.work / "send" / self.study, self.study, self.number, rng)
        self.sender.send(series, series.files)
        self.books.sent_series.add(series.uid)
        self.sent.append(series)
        if series.late:
            self.late.append((now + 40.0, series))
        if rng.random() < 0.1:  # a modality sends a series again
            again = rng.choice(self.sent)
            self.sender.send(again, again.files)
            self.books.duplicates_sent += len(again.files)
        self.next_series = now + self.s.series_every_s * rng.uniform(0.5, 1.5)

    def _send_late(self, series: Series) -> None:
        self.sender.send(series, series.late)
        self.books.late_sent += len(series.late)

    def flush_late(self) -> None:
        for _, series in self.late:
            self._send_late(series)
        self.late.clear()


# -- the index and the PACS, read --------------------------------------------------------------------


def query(state: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    try:
        db = sqlite3.connect(f"file:{state / 'index.sqlite'}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return []
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()


def job_states(state: Path) -> dict[str, int]:
    return {str(s): int(n) for s, n in query(state, "SELECT state, count(*) FROM jobs GROUP BY state")}  # type: ignore[call-overload]


def pacs_results(pacs: Orthanc) -> tuple[dict[str, set[str]], set[str]]:
    """SEG SOP Instance UIDs at the PACS by the series they segment, and the SOP UIDs rejection notes name."""
    segs: dict[str, set[str]] = {}
    rejected: set[str] = set()
    for instance in pacs.get("/instances"):  # type: ignore[union-attr]
        tags = pacs.get(f"/instances/{instance}/simplified-tags")
        assert isinstance(tags, dict)
        if tags.get("SOPClassUID") == SEG:
            for ref in tags.get("ReferencedSeriesSequence", []):
                segs.setdefault(ref["SeriesInstanceUID"], set()).add(tags["SOPInstanceUID"])
        elif tags.get("Modality") == "KO":
            for study in tags.get("CurrentRequestedProcedureEvidenceSequence", []):
                for series in study.get("ReferencedSeriesSequence", []):
                    rejected |= {i["ReferencedSOPInstanceUID"] for i in series.get("ReferencedSOPSequence", [])}
    return segs, rejected


def local_workers(node: Node) -> list[int]:
    """Process ids of the node's local worker processes."""
    if node.proc is None:
        return []
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == node.proc.pid and b"segnode.node.jobs.worker" in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
    return out


def steady_slopes(lives: list[list[tuple[float, float, int]]]) -> tuple[list[tuple[float, float, int]], float, float]:
    """The node's longest life after its warm-up, and the slopes (per hour) of its RSS and descriptors.

    A life ended by ``kill -9`` loses its last sample (taken while the process was
    going); the first quarter of a life is warm-up (imports, caches, the first jobs).
    """
    trimmed = [life[:-1] for life in lives[:-1]] + lives[-1:]
    life = max(trimmed, key=len) if trimmed else []
    steady = life[len(life) // 4:]
    return steady, slope([(t, r) for t, r, _ in steady]), slope([(t, float(f)) for t, _, f in steady])


def per_life(lives: list[list[tuple[float, float, int]]]) -> list[dict[str, object]]:
    """Each life of the node after its warm-up: from, to, RSS first/max/last, descriptors min/max/last."""
    out: list[dict[str, object]] = []
    for k, life in enumerate([life[:-1] for life in lives[:-1]] + lives[-1:]):
        steady = life[len(life) // 4:]
        if steady:
            out.append({"life": k, "from_s": round(steady[0][0]), "to_s": round(steady[-1][0]),
                        "rss_mb": [round(steady[0][1], 1), round(max(x[1] for x in steady), 1),
                                   round(steady[-1][1], 1)],
                        "fds": [min(x[2] for x in steady), max(x[2] for x in steady), steady[-1][2]]})
    return out


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per hour) of (seconds, value) points."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return 0.0 if var == 0 else sum((p[0] - mx) * (p[1] - my) for p in points) / var * 3600


def tracebacks(folders: list[Path]) -> list[str]:
    """Each traceback in the logs under ``folders``: the log's path and the traceback's last line (the error)."""
    found: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and (path.suffix in (".log", ".out") or ".log." in path.name):
                lines = path.read_text(errors="replace").splitlines()
                for start, line in enumerate(lines):
                    if "Traceback (most recent call last)" in line:
                        error = next((x for x in lines[start + 1:] if x and not x[0].isspace()), "?")
                        found.add(f"{path}: {error[:300]}")
    return sorted(found)


# -- the run ----------------------------------------------------------------------------------------


class Soak:
    def __init__(self, settings: Settings, work: Path) -> None:
        self.s, self.work = settings, work
        self.rng = random.Random(settings.seed)
        self.books = Books()
        self.started = time.monotonic()
        self.stop_sampling = threading.Event()

    def t(self) -> float:
        return time.monotonic() - self.started

    def configure(self, state: Path, broker: RabbitMQ | None, relay: Relay) -> Node:
        s = self.s
        token = self.work / "ris.token"
        token.write_text("soak-stow-token-0123456789\n")
        token.chmod(0o600)
        routes = self.work / "routes.yaml"
        routes.write_text(yaml.safe_dump({"rules": [{"name": "everything", "fallback": True, "action": {
            "profile": "lungs", "backend": "hu_based", "queue": "cpu", "destinations": ["pacs"]}}]}))
        port, dicomweb = free_port(), free_port()
        config = self.work / "node.yaml"
        config.write_text(yaml.safe_dump({
            "port": port, "state_dir": str(state), "routes": str(routes),
            "completion": {"quiet_period_s": 3.0, "sweep_interval_s": 0.5},
            "limits": {"min_free_disk_mb": s.min_free_disk_mb, "network_timeout_s": 30, "acse_timeout_s": 10},
            "dispatch": {"backoff_initial_s": 1.0, "backoff_max_s": 10.0, "poll_interval_s": 0.5, "timeout_s": 10,
                         "connect_timeout_s": 3, "max_attempts": 1000},
            "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": relay.port,
                              "rejection_notes": True}],
            "housekeeping": {"spool_retention_s": 86400},
            "http": {"port": 0},
            **({"broker": {"url": broker.url, "queues": ["gpu", "cpu"], "result_timeout_s": 120,
                           "publish_timeout_s": 5}} if broker is not None else {"worker": {"concurrency": s.workers}}),
            "dicomweb": {"enabled": True, "port": dicomweb, "header_timeout_s": 5,
                         "clients": [{"name": "ris", "token_file": str(token), "ae_title": "RIS"}]}}))
        return Node(config, state, port, dicomweb, self.work / "node")

    def run(self) -> dict[str, object]:
        s = self.s
        state = self.work / "state"
        with capped_folder(state, s.state_mb) as mounted:
            broker = None if s.local else RabbitMQ(self.work / "rabbitmq")
            if broker is not None:
                broker.start()
            pacs = Orthanc(self.work / "pacs")
            pacs.start()
            relay = Relay(lambda: pacs.dicom_port)
            node = self.configure(state, broker, relay)
            workers: Workers | None = None
            try:
                node.start()
                workers = None if broker is None else Workers(self.work, broker, s.workers)
                report = self._traffic(node, workers, broker, pacs, relay, mounted)
                report.update(self._balance(node, pacs))
            finally:
                self.stop_sampling.set()
                node.stop()
                if workers is not None:
                    workers.stop()
                pacs.stop()
                if broker is not None:
                    broker.close()
                relay.listener.close()
                report_logs = tracebacks([self.work])
                if mounted:  # the node's logs are on the tmpfs: keep a copy before it goes
                    shutil.copytree(state / "logs", self.work / "node-logs", dirs_exist_ok=True)
        report["tracebacks"] = report_logs
        return report

    # -- traffic and faults --------------------------------------------------------------------------
    def _traffic(self, node: Node, workers: Workers | None, broker: RabbitMQ | None, pacs: Orthanc, relay: Relay,
                 mounted: bool) -> dict[str, object]:
        s, books = self.s, self.books
        traffic = Traffic(self, node, Sender(node, "soak-stow-token-0123456789", books),
                          templates(self.work / "templates", 4, s.slices, s.seed))
        threading.Thread(target=self._sample, args=(node,), daemon=True).start()
        end = s.minutes * 60
        next_fault = s.fault_every_s / 2
        fault_kinds = [k for k in FAULTS if (mounted or k != "disk_fill") and (broker or k != "broker_kill")]
        fault_n = 0
        while self.t() < end or fault_n < len(fault_kinds):  # every kind of fault at least once
            traffic.step()
            if self.t() >= next_fault:
                kind = fault_kinds[fault_n % len(fault_kinds)]
                fault_n += 1
                self._fault(kind, node, workers, broker, pacs, relay, traffic)
                next_fault = self.t() + s.fault_every_s
            time.sleep(0.2)
        traffic.flush_late()  # traffic over: what was held back goes now
        traffic_end = self.t()
        drain_until = self.t() + s.drain_s
        while self.t() < drain_until:
            traffic.sender.retry_due()
            states = job_states(node.state)
            if traffic.sender.backlog == 0 and states and all(k in RESTING for k in states) \
                    and self._routed_sent(node):
                break
            time.sleep(1.0)
        return {"traffic_s": round(traffic_end), "drain_s": round(self.t() - traffic_end),
                "unacknowledged_left": traffic.sender.backlog}

    def _routed_sent(self, node: Node) -> bool:
        received = query(node.state, "SELECT count(*) FROM series s WHERE NOT EXISTS "
                                     "(SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid)")
        return bool(received) and received[0][0] == 0

    def hostile(self, node: Node, rng: random.Random) -> None:
        self.books.hostile += 1
        if rng.random() < 0.5:
            with suppress(OSError), socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
                sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):
                    pass
            return
        templates = [request("GET", "/healthz"), stow_request("/dicomweb/studies", "soak-stow-token-0123456789",
                                                                [b"DICM" * 10])]
        case = fuzz_cases(templates, 1, f"soak-{rng.random()}")[0]
        with suppress(OSError):
            answer = send(node.dicomweb_port, case, 30.0, time.monotonic, time.sleep)
            if answer.status is not None and answer.status >= 500 and answer.status not in (501, 503, 505):
                self.books.hostile_problems.append(f"{case.what}: {answer.status}")

    def _fault(self, kind: str, node: Node, workers: Workers | None, broker: RabbitMQ | None, pacs: Orthanc,
               relay: Relay, traffic: Traffic) -> None:
        books, hold = self.books, self.s.fault_hold_s
        books.timeline.append((self.t(), len(books.acknowledged), kind))
        print(f"[{self.t():7.1f} s] fault: {kind}", flush=True)
        if kind == "node_kill":
            node.kill()
            self._hold(3.0, traffic)  # senders meet a closed port meanwhile
            node.start()
        elif kind == "worker_kill" and workers is None:  # a local worker process of the node, when one runs
            if not self._kill_local_worker(node, hold, traffic):
                return
        elif kind == "worker_kill":
            assert workers is not None
            name = self.rng.choice(sorted(workers.procs))
            workers.kill(name)
            self._hold(hold, traffic)
            workers.restart(name)
        elif kind == "broker_kill":
            assert broker is not None and broker.proc is not None
            with suppress(ProcessLookupError):
                os.killpg(broker.proc.pid, signal.SIGKILL)
            broker.proc.wait()
            broker.proc = None
            self._hold(hold, traffic)
            broker.start()
        elif kind == "pacs_stop":
            pacs.stop()
            self._hold(hold, traffic)
            pacs.start()
        elif kind == "disk_fill":
            filler = fill(node.state, self.s.fill_left_mb)
            self._hold(hold, traffic)
            filler.unlink()
        elif kind == "blackhole":
            relay.black_hole.set()
            self._hold(hold, traffic)
            relay.open_again()
        books.faults[kind] = books.faults.get(kind, 0) + 1

    def _kill_local_worker(self, node: Node, within: float, traffic: Traffic) -> bool:
        """``kill -9`` of a local worker process (``segnode.node.jobs.worker``) of the node, within ``within`` s."""
        until = self.t() + within
        while self.t() < until:
            for pid in local_workers(node):
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # its own process group (node/jobs/worker.py)
                    return True
            self._hold(0.5, traffic)
        return False

    def _hold(self, seconds: float, traffic: Traffic) -> None:
        """Traffic goes on while a fault holds."""
        until = self.t() + seconds
        while self.t() < until:
            traffic.step()
            time.sleep(0.2)

    def _sample(self, node: Node) -> None:
        while not self.stop_sampling.wait(2.0):
            t = self.t()
            node.sample(t)
            self.books.timeline.append((t, len(self.books.acknowledged), ""))

    # -- the books ---------------------------------------------------------------------------------
    def _balance(self, node: Node, pacs: Orthanc) -> dict[str, object]:
        self.stop_sampling.set()
        node.stop()
        books = self.books
        spooled = {str(uid): str(path) for uid, path in query(node.state, "SELECT sop_uid, path FROM instances")}
        lost = sorted(uid for uid in books.acknowledged
                      if uid not in spooled or not (node.state / "spool" / spooled[uid]).is_file())
        jobs = query(node.state, "SELECT job_id, series_uid, state FROM jobs")
        stuck = sorted(int(j[0]) for j in jobs if j[2] not in RESTING)  # type: ignore[call-overload]
        routed = {str(j[1]) for j in jobs if j[2] in ("done",)}
        segs, rejected = pacs_results(pacs)
        current = {series: segs.get(series, set()) - rejected for series in routed}
        not_one = sorted(series for series, uids in current.items() if len(uids) != 1)
        longest, rss, fds = steady_slopes(node.lives)
        states: dict[str, int] = {}
        for j in jobs:
            states[str(j[2])] = states.get(str(j[2]), 0) + 1
        return {"acknowledged": len(books.acknowledged), "series_sent": len(books.sent_series),
                "studies": len({p.parent.name for p in (self.work / "send").glob("*/*.dcm")}),
                "duplicates_sent": books.duplicates_sent, "late_sent": books.late_sent,
                "refused_then_resent": books.refused, "hostile_connections": books.hostile,
                "hostile_problems": books.hostile_problems, "faults": books.faults, "lost": lost,
                "jobs": states, "stuck": stuck, "routed_series": len(routed),
                "series_without_one_current_result": not_one,
                "node_lives": len(node.lives), "lives": per_life(node.lives),
                "rss_mb": {"first": longest[0][1] if longest else None, "last": longest[-1][1] if longest else None,
                           "slope_mb_per_h": round(rss, 2), "over_s": round(longest[-1][0] - longest[0][0])
                           if longest else 0},
                "fds": {"first": longest[0][2] if longest else None, "last": longest[-1][2] if longest else None,
                        "slope_per_h": round(fds, 2)},
                "samples": [{"life": k, "t": t, "rss_mb": r, "fds": f}
                            for k, life in enumerate(node.lives) for t, r, f in life],
                "timeline": books.timeline}


def plot(report: dict[str, object], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timeline = [x for x in report["timeline"] if not x[2]]  # type: ignore[union-attr]
    faults = [x for x in report["timeline"] if x[2]]  # type: ignore[union-attr]
    samples = report["samples"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ts, rate = [], []
    for k, (t, count, _) in enumerate(timeline):  # over the last minute
        first = next(x for x in timeline[:k + 1] if x[0] >= t - 60)
        if t - first[0] >= 30:
            ts.append(t / 60)
            rate.append((count - first[1]) / (t - first[0]) * 3600)
    top.plot(ts, rate, lw=0.8, label="instances/hour acknowledged (last minute)")
    top.set_ylabel("instances / hour")
    bottom.plot([x["t"] / 60 for x in samples], [x["rss_mb"] for x in samples], ".", ms=2,  # type: ignore[index]
                label="node RSS (MB)")
    bottom.set_ylabel("RSS (MB)")
    fds = bottom.twinx()
    fds.plot([x["t"] / 60 for x in samples], [x["fds"] for x in samples], ".", ms=2, color="gray",  # type: ignore[index]
             label="node open descriptors")
    fds.set_ylabel("open descriptors")
    bottom.set_xlabel("minutes")
    for t, _, kind in faults:
        for ax in (top, bottom):
            ax.axvline(t / 60, color="red", lw=0.5, alpha=0.5)
        top.text(t / 60, top.get_ylim()[1] * 0.95, kind, rotation=90, fontsize=6, va="top")
    top.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def verdict(report: dict[str, object]) -> list[str]:
    """What failed (empty: the run held)."""
    out = []
    for key in ("lost", "stuck", "series_without_one_current_result", "tracebacks", "hostile_problems"):
        if report.get(key):
            out.append(f"{key}: {report[key]!r:.500}")
    if report.get("unacknowledged_left"):
        out.append(f"{report['unacknowledged_left']} instances never acknowledged")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--minutes", type=float, default=Settings.minutes)
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--out", type=Path, default=Settings.out)
    p.add_argument("--series-every-s", type=float, default=Settings.series_every_s)
    p.add_argument("--fault-every-s", type=float, default=Settings.fault_every_s)
    p.add_argument("--fault-hold-s", type=float, default=Settings.fault_hold_s)
    p.add_argument("--drain-s", type=float, default=Settings.drain_s)
    p.add_argument("--workers", type=int, default=Settings.workers)
    p.add_argument("--local", action="store_true", help="local worker processes (no broker) instead of remote ones")
    p.add_argument("--replot", type=Path, help="only draw the plot of a soak.json (next to it)")
    args = p.parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        lives: dict[int, list[tuple[float, float, int]]] = {}
        for x in report["samples"]:
            lives.setdefault(x["life"], []).append((x["t"], x["rss_mb"], x["fds"]))
        steady, rss, fds = steady_slopes([lives[k] for k in sorted(lives)])
        print(json.dumps({"over_s": round(steady[-1][0] - steady[0][0]) if steady else 0, "rss_mb_first_last":
                          [steady[0][1], steady[-1][1]] if steady else [], "rss_slope_mb_per_h": round(rss, 2),
                          "fds_first_last": [steady[0][2], steady[-1][2]] if steady else [],
                          "fds_slope_per_h": round(fds, 2)}))
        print(json.dumps(per_life([lives[k] for k in sorted(lives)])))
        return 0 if plot(report, args.replot.with_suffix(".png")) else 1
    settings = Settings(seed=args.seed, minutes=args.minutes, out=args.out, series_every_s=args.series_every_s,
                        fault_every_s=args.fault_every_s, fault_hold_s=args.fault_hold_s, drain_s=args.drain_s,
                        workers=args.workers, local=args.local)
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # stopped: the peers are stopped too
    with tempfile.TemporaryDirectory(prefix="segnode-soak-") as tmp:
        report = Soak(settings, Path(tmp)).run()
        failures = verdict(report)
        report["settings"] = {k: str(v) for k, v in asdict(settings).items()}
        report["failures"] = failures
        hours = float(report["traffic_s"]) / 3600  # type: ignore[arg-type]
        report["instances_per_hour"] = round(int(report["acknowledged"]) / hours) if hours else 0  # type: ignore[call-overload]
        (args.out / "soak.json").write_text(json.dumps(report, indent=1, default=str))
        plotted = plot(report, args.out / "soak.png")
        if failures:  # keep the logs of a failed run
            for name in ("node-logs", "workers"):
                with suppress(OSError):
                    shutil.copytree(Path(tmp) / name, args.out / name, dirs_exist_ok=True)
            for out in Path(tmp).glob("node.*.out"):
                shutil.copy(out, args.out / out.name)
    summary = {k: report[k] for k in ("traffic_s", "drain_s", "acknowledged", "series_sent", "studies",
                                      "duplicates_sent", "late_sent", "refused_then_resent", "hostile_connections",
                                      "faults", "jobs", "routed_series", "node_lives", "rss_mb", "fds",
                                      "instances_per_hour")}
    summary.update(lost=len(report["lost"]), stuck=len(report["stuck"]),  # type: ignore[arg-type]
                   not_one_current=len(report["series_without_one_current_result"]))  # type: ignore[arg-type]
    print(json.dumps(summary, indent=1, default=str))
    print(f"written {args.out / 'soak.json'}" + (f" and {args.out / 'soak.png'}" if plotted else " (no matplotlib)"))
    print("FAILED:\n  " + "\n  ".join(failures) if failures else "held: no loss, nothing stuck, no traceback")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
