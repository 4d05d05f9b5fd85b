"""Ingest throughput of ``segnode serve`` against DCMTK ``storescp`` and Orthanc, and end-to-end latency.

Generates a synthetic 300-image 512×512 CT series, then sends it with DCMTK
``storescu`` (``TCP_NODELAY=1``) to each receiver in the same run: one
association × 300 images, and 4 concurrent associations × 75; the receivers
take turns within each run, and the medians over ``--runs`` are reported
(ratios are medians of the per-run ratios).  segnode
fsyncs every file and commits its index row before answering.  Then it
measures the time from the last image acknowledged to the SEG acknowledged
by Orthanc, minus the quiet period.

    .venv/bin/python bench/bench_ingest.py [--images 300] [--size 512] [--runs 3] [--receivers 2] [--no-latency]
                                           [--tls]

The ``segnode`` rows use the node's receiver (:mod:`segnode.node.dicom_in.receiver`);
``--tls`` adds ``storescp+tls`` and ``segnode+tls``: both over TLS with a client
certificate required (a throw-away CA, tests/tls_pki.py), ``storescu +tls``
sending; ``segnode+tls`` is compared with ``storescp+tls``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.peers import (  # noqa: E402  (bench tooling reuses the test peers)
    DCMTK_ENV,
    free_port,
    node,
    orthanc,
    port_open,
    stop_process,
    storescp,
    wait_until,
    write_node_config,
)
from tests.tls_pki import Pki, make_pki  # noqa: E402


def write_series(folder: Path, images: int, size: int) -> list[Path]:
    """A chest-like synthetic series: body ellipse, two lungs, noise; 1 mm slices."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    base = np.full((size, size), -1000.0)
    base[(xx / 0.45) ** 2 + (yy / 0.32) ** 2 < 1] = 40
    for cx in (-0.2, 0.2):
        base[((xx - cx) / 0.14) ** 2 + (yy / 0.2) ** 2 < 1] = -850
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(images):
        pixels = (base + rng.normal(0, 10, base.shape) + 1024).clip(0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.InstanceNumber, ds.SeriesNumber = "Bench^Synthetic", "BENCH", k + 1, 1
        ds.PatientBirthDate = ds.PatientSex = ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.ImagePositionPatient = [-size * 0.39, -size * 0.39, float(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.78, 0.78], 1.0
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels.tobytes()
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, called: str, folders: list[Path], extra: tuple[str, ...] = ()) -> float:
    """Seconds to send ``folders`` over one association each, all at once (``extra``: storescu options, e.g. TLS)."""
    errors: list[str] = []

    def one(folder: Path) -> None:
        r = subprocess.run(["storescu", "-aet", "BENCH", "-aec", called, "+sd", *extra, "127.0.0.1", str(port),
                            str(folder)], env=DCMTK_ENV, capture_output=True, text=True)
        if r.returncode != 0 or "E:" in r.stderr:
            errors.append(r.stderr[-300:])

    threads = [threading.Thread(target=one, args=(f,)) for f in folders]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"storescu to {called} failed: {errors[0]}")
    return elapsed


def split(paths: list[Path], parts: int, root: Path) -> list[Path]:
    folders = []
    for p in range(parts):
        folder = root / f"part{p}"
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths[p::parts]:
            (folder / path.name).symlink_to(path)
        folders.append(folder)
    return folders


LABELS = ("1 assoc", "4 conc")


def measure_round(peers: dict, whole: Path, quarters: list[Path], images: int) -> dict[tuple[str, str], float]:  # type: ignore[type-arg]
    """One run of every receiver × (one association, 4 concurrent), receivers interleaved."""
    out = {}
    for name, (start_peer, called, *extra) in peers.items():
        for label, folders in zip(LABELS, ([whole], quarters)):
            with start_peer() as port:
                os.sync()  # no receiver pays for the writeback of the previous one's unsynced files
                out[name, label] = images / send(port, called, folders, tuple(extra[0]) if extra else ())
    print("  run: " + ", ".join(f"{n} {lab} {v:.0f}" for (n, lab), v in out.items()), flush=True)
    return out


def report(rounds: list[dict[tuple[str, str], float]], names: list[str]) -> dict[tuple[str, str], float]:
    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"medians of {len(rounds)} run(s), images/s:")
    print(f"  {'receiver':<10} " + " ".join(f"{lab:>8}" for lab in LABELS))
    for name in names:
        print(f"  {name:<10} " + " ".join(f"{med[name, lab]:8.0f}" for lab in LABELS))
    for name in (n for n in names if n.startswith("segnode")):
        tls = name.endswith("+tls")
        ref = "storescp+tls" if tls else "storescp"
        for label in LABELS:  # ratios per run, then their median (the load varies between runs)
            to_ref = [r[name, label] / r[ref, label] for r in rounds]
            line = (f"  ratio {label}: {name}/{ref} {statistics.median(to_ref):.2f} "
                    f"(runs {min(to_ref):.2f}-{max(to_ref):.2f})")
            if not tls:
                to_orth = [r[name, label] / r["Orthanc", label] for r in rounds]
                line += f", {name}/Orthanc {statistics.median(to_orth):.2f} (runs {min(to_orth):.2f}-{max(to_orth):.2f})"
            print(line)
    return med


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--no-latency", action="store_true", help="skip the end-to-end latency run")
    parser.add_argument("--receivers", type=int, default=2,
                        help="also measure segnode with this many receiver processes (1: skip)")
    parser.add_argument("--tls", action="store_true",
                        help="also measure storescp and segnode over TLS (client certificates required)")
    parser.add_argument("--quiet", type=float, default=2.0, help="quiet period for the latency run (s)")
    args = parser.parse_args(argv)
    if not all(shutil.which(t) for t in ("storescu", "storescp", "Orthanc")):
        print("needs DCMTK (storescu, storescp) and Orthanc: make peers", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="segnode-bench-"))
    try:
        paths = write_series(work / "series", args.images, args.size)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"series: {args.images} images {args.size}x{args.size}, {mb:.0f} MB, in {work}")
        quarters = split(paths, 4, work / "quarters")
        counter = iter(range(10_000))

        def dcmtk():  # type: ignore[no-untyped-def]
            from contextlib import contextmanager

            @contextmanager
            def cm():  # type: ignore[no-untyped-def]
                with storescp(work / f"storescp{next(counter)}") as peer:
                    yield peer.port
            return cm()

        def orthanc_peer():  # type: ignore[no-untyped-def]
            from contextlib import contextmanager

            @contextmanager
            def cm():  # type: ignore[no-untyped-def]
                with orthanc(work / f"orthanc{next(counter)}") as peer:
                    yield peer.dicom_port
            return cm()

        def segnode_peer(processes: int = 1, tls: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
            from contextlib import contextmanager

            @contextmanager
            def cm():  # type: ignore[no-untyped-def]
                run = work / f"segnode{next(counter)}"
                run.mkdir()
                config = write_node_config(run / "node.yaml", completion={"quiet_period_s": 3600},
                                           limits={"min_free_disk_mb": 1, "receiver_processes": processes},
                                           **({"tls": tls} if tls else {}))
                with node(config) as n:
                    yield n.port
            return cm()

        print("ingest (storescu, TCP_NODELAY=1; receivers interleaved in each run):")
        peers = {"storescp": (dcmtk, "ANY"), "Orthanc": (orthanc_peer, "ORTHANC"),
                 "segnode": (segnode_peer, "SEGNODE")}
        if args.receivers > 1:
            peers[f"segnode-{args.receivers}p"] = (lambda: segnode_peer(args.receivers), "SEGNODE")
        if args.tls:
            pki = make_pki(work / "pki")
            client = tuple(pki.storescu_args())
            peers["storescp+tls"] = (lambda: storescp_tls(work / f"storescp{next(counter)}", pki), "ANY", client)
            peers["segnode+tls"] = (lambda: segnode_peer(tls=pki.server_tls(client_ca=True)), "SEGNODE", client)
        rounds = [measure_round(peers, work / "series", quarters, args.images) for _ in range(args.runs)]
        report(rounds, list(peers))
        if not args.no_latency:
            latency(work, args.quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


@contextlib.contextmanager
def storescp_tls(out_dir: Path, pki: Pki) -> Iterator[int]:
    """DCMTK ``storescp +tls`` with ``pki``'s server certificate, requiring a client certificate our CA signed."""
    out_dir.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(out_dir), "+tls", str(pki.key("server")),
                             str(pki.cert("server")), "-pw", "+cf", str(pki.ca), str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 10, f"storescp +tls on {port}")
        assert proc.poll() is None, "storescp +tls exited at start"
        yield port
    finally:
        stop_process(proc)


def latency(work: Path, quiet: float) -> None:
    """Last image acknowledged → SEG acknowledged by Orthanc, minus the quiet period."""
    import yaml
    from segnode.storage.index import Index, JobState

    with orthanc(work / "orthanc-e2e") as pacs:
        run = work / "segnode-e2e"
        run.mkdir()
        routes = run / "routes.yaml"
        routes.write_text(yaml.safe_dump({"rules": [{"name": "all", "fallback": True,
                                                     "action": {"profile": "lungs", "destinations": ["pacs"]}}]}))
        config = write_node_config(run / "node.yaml", routes=str(routes),
                                   completion={"quiet_period_s": quiet, "sweep_interval_s": 0.1},
                                   destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                  "port": pacs.dicom_port}])
        with node(config) as n:
            send(n.port, "SEGNODE", [work / "series"])
            last_ack = time.time()
            index = Index(n.state_dir / "index.sqlite")
            job = wait_until(lambda: next((j for j in index.jobs() if j.state in
                                           (JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER)), None),
                             600, "the SEG to be delivered", interval=0.05)
            if job.state is not JobState.DONE:
                print(f"end-to-end: job {job.state.value}: {job.reason}")
                return
            delivered = index.deliveries(job.job_id)[0].delivered_at or time.time()
            events = {state: at for at, state, _ in index.events(job.job_id)}
        total = delivered - last_ack
        seg_time = events[JobState.ENCODED] - events[JobState.SEGMENTING]
        send_time = delivered - events[JobState.ENCODED]
        print(f"end-to-end: {total - quiet:.2f} s after the quiet period ({total:.2f} s total, quiet {quiet:.1f} s; "
              f"worker {seg_time:.2f} s, dispatch {send_time:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
