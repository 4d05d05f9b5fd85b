"""Latency of completion on evidence vs the quiet period: last image acknowledged → SEG acknowledged by Orthanc.

Generates a synthetic chest series (``--images`` × ``--size``², 1 mm slices,
the same generator as ``bench_ingest.py``), sends it with DCMTK ``storescu``
(one association, ``TCP_NODELAY=1``) to ``segnode serve`` routed with
``hu_based`` (profile ``lungs``) to Orthanc, twice in the same run: once with
``completion.evidence: true`` (association released + gap-free volume, then
``grace_s``) and once with ``evidence: false`` (the quiet period only), both
with the same ``quiet_period_s``.  Prints, per mode, the time from the last
image acknowledged to the SEG delivered, its split, and the evidence the job
recorded.

    .venv/bin/python bench/bench_completion.py [--images 300] [--size 512] [--quiet 10] [--grace 1.5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import send, write_series  # noqa: E402

from tests.peers import node, orthanc, wait_until, write_node_config  # noqa: E402


def one_run(work: Path, series: Path, *, evidence: bool, quiet: float, grace: float) -> dict[str, object]:
    import yaml
    from segnode.storage.index import Index, JobState

    name = "evidence" if evidence else "quiet"
    with orthanc(work / f"orthanc-{name}") as pacs:
        run = work / f"segnode-{name}"
        run.mkdir()
        routes = run / "routes.yaml"
        routes.write_text(yaml.safe_dump({"rules": [{"name": "all", "fallback": True, "action": {
            "profile": "lungs", "backend": "hu_based", "destinations": ["pacs"]}}]}))
        config = write_node_config(run / "node.yaml", routes=str(routes),
                                   completion={"quiet_period_s": quiet, "sweep_interval_s": 0.1,
                                               "evidence": evidence, "grace_s": grace},
                                   destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                  "port": pacs.dicom_port}])
        with node(config) as n:
            send(n.port, "SEGNODE", [series])
            last_ack = time.time()
            index = Index(n.state_dir / "index.sqlite")
            job = wait_until(lambda: next((j for j in index.jobs() if j.state in
                                           (JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER)), None),
                             900, "the SEG to be delivered", interval=0.05)
            if job.state is not JobState.DONE:
                return {"mode": name, "error": f"job {job.state.value}: {job.reason}"}
            delivered = index.deliveries(job.job_id)[0].delivered_at or time.time()
            events = {state: at for at, state, _ in index.events(job.job_id)}
    return {"mode": name, "total_s": delivered - last_ack, "completion_s": events[JobState.COMPLETE] - last_ack,
            "worker_s": events[JobState.ENCODED] - events[JobState.SEGMENTING],
            "dispatch_s": delivered - events[JobState.ENCODED], "evidence": job.completion}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=10.0, help="quiet_period_s, both modes (default 10)")
    parser.add_argument("--grace", type=float, default=1.5, help="grace_s (default 1.5)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="segnode-bench-completion-"))
    try:
        series = work / "series"
        write_series(series, args.images, args.size)
        print(f"series: {args.images} × {args.size}×{args.size}; quiet period {args.quiet:g} s, "
              f"grace {args.grace:g} s")
        print(f"{'mode':<9} {'last ack → SEG acked':>21} {'→ complete':>11} {'worker':>8} {'dispatch':>9}"
              "  evidence")
        for evidence in (True, False):
            row = one_run(work, series, evidence=evidence, quiet=args.quiet, grace=args.grace)
            if "error" in row:
                print(f"{row['mode']:<9} {row['error']}")
                continue
            print(f"{row['mode']:<9} {row['total_s']:>19.2f} s {row['completion_s']:>9.2f} s {row['worker_s']:>6.2f} s "
                  f"{row['dispatch_s']:>7.2f} s  {row['evidence']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
