"""``segnode serve``, ``status``, ``jobs list|show|retry`` and ``echo``."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from segnode.cliargs import group_option
from segnode.errors import DispatchError, StorageError
from segnode.node.config import NodeConfig, load_config
from segnode.storage.index import Index, JobState

logger = logging.getLogger(__name__)


CONFIG_OPTIONS = {"--config": "node YAML config (default: embedded defaults)",
                  "--state-dir": "override the config's state_dir"}


def _config_args(parser: argparse.ArgumentParser) -> None:
    for flag, text in CONFIG_OPTIONS.items():
        parser.add_argument(flag, type=Path, help=text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the DICOM node (SCP, worker, dispatch)")
    _config_args(p)
    p.add_argument("--port", type=int, help="override the config's port (0: any free port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="node and job summary from the index")
    _config_args(p)
    p.set_defaults(func=cmd_status)

    jobs = sub.add_parser("jobs", help="list, show or retry jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    p = jsub.add_parser("list", help="latest jobs")
    p.add_argument("--state", choices=[s.value for s in JobState])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_jobs_list)
    p = jsub.add_parser("show", help="one job with its history and deliveries")
    p.add_argument("job_id", type=int)
    p.set_defaults(func=cmd_jobs_show)
    p = jsub.add_parser("retry", help="re-run a failed job, resend a dead-lettered one, re-route a not-routed one")
    p.add_argument("job_id", type=int)
    p.set_defaults(func=cmd_jobs_retry)
    from segnode.node.cli.jobs import register_correct

    register_correct(jsub)  # jobs correct N FILE (docs/review.md, "Corrections")
    for flag, text in CONFIG_OPTIONS.items():  # before or after the verb
        group_option(jobs, jsub, flag, type=Path, help=text)

    p = sub.add_parser("echo", help="C-ECHO a configured destination")
    _config_args(p)
    p.add_argument("destination", help="destination name from the config")
    p.set_defaults(func=cmd_echo)


def _load(args: argparse.Namespace) -> NodeConfig:
    return load_config(args.config, state_dir=args.state_dir)


def _index(config: NodeConfig) -> Index:
    if not config.index_path.is_file():
        raise StorageError("no index yet: the node has not run with this state directory",
                            where=str(config.state_dir))
    return Index(config.index_path)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _log_to_file(config: NodeConfig) -> None:
    config.log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in root.handlers:  # the console keeps the verbosity the operator chose
        handler.setLevel(root.level)
    file_handler = logging.handlers.RotatingFileHandler(config.log_dir / "segnode.log", maxBytes=10 << 20,
                                                        backupCount=5)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.setLevel(min(root.level, logging.INFO))


def cmd_serve(args: argparse.Namespace) -> int:
    from segnode.node.ops.runner import Ops
    from segnode.node.service import Service, private_state_dir

    config = _load(args)
    if args.port is not None:
        config = config.model_copy(update={"port": args.port})
    private_state_dir(config.state_dir)  # before anything is made inside it (the log folder first)
    _log_to_file(config)
    service = Service(config)
    ops = Ops(service)  # audit log, metrics, HTTP API and status page (node/ops/runner.py)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from segnode.routing import install_sighup

    install_sighup(service.rules)  # kill -HUP: re-read the routes file
    port = service.start()
    try:
        ops.start()
        print(f"segnode: {config.ae_title} listening on {config.host}:{port}, state in {config.state_dir}",
              flush=True)
        if ops.http is not None:
            print(f"segnode: ops HTTP API on {ops.http.url}", flush=True)
        if service.dicomweb is not None:
            print(f"segnode: DICOMweb on {service.dicomweb.url}/dicomweb", flush=True)
        stop.wait()
    finally:
        ops.stop()
        service.stop()
    print("segnode: stopped", flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    index = _index(config)
    pid_file = config.state_dir / "segnode.pid"
    running = "not running"
    if pid_file.is_file():
        pid = int(pid_file.read_text().strip() or 0)
        try:
            os.kill(pid, 0)
            running = f"running (pid {pid})"
        except OSError:
            running = f"not running (stale pid {pid})"
    print(f"node:       {config.ae_title} {config.host}:{config.port}, {running}")
    print(f"state:      {config.state_dir}")
    print(f"instances:  {index.instance_count()} received")
    counts = index.counts()
    print("jobs:       " + (", ".join(f"{s.value} {counts[s]}" for s in JobState if s in counts) or "none"))
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    index = _index(_load(args))
    print(f"{'job':>5}  {'state':<11}  {'updated (UTC)':<19}  {'profile':<8}  series / reason")
    for job in index.jobs(JobState(args.state) if args.state else None, limit=args.limit):
        print(f"{job.job_id:>5}  {job.state.value:<11}  {_when(job.updated_at):<19}  {job.profile or '-':<8}  "
              f"{job.series_uid}" + (f"  ({job.reason})" if job.reason else ""))
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    index = _index(_load(args))
    job = index.job(args.job_id)
    if job is None:
        print(f"segnode: no job {args.job_id}", file=sys.stderr)
        return 3
    print(f"job {job.job_id}: {job.state.value}" + (f" ({job.reason})" if job.reason else ""))
    print(f"  series       {job.series_uid}\n  study        {job.study_uid}")
    print(f"  rule         {job.rule or '-'}\n  profile      {job.profile or '-'} (backend {job.backend or 'profile'})")
    print(f"  attempts     {job.segment_attempts} segmentation(s)")
    if job.seg_path:
        print(f"  SEG          {job.file(job.seg_path)}\n  SEG series   {job.seg_series_uid}\n  model        "
              f"{job.backend_used} {job.model_version}")
    for d in index.deliveries(job.job_id):
        print(f"  → {d.destination}: {d.state.value}, {d.attempts} attempt(s)"
              + (f", delivered {_when(d.delivered_at)}" if d.delivered_at else "")
              + (f", last error: {d.last_error}" if d.last_error and not d.delivered_at else ""))
        for o in index.delivery_objects(job.job_id, d.destination):
            error = f"  {o.last_error}" if o.last_error else ""
            print(f"      {o.kind:<9} {o.state.value:<8} {o.sop_instance_uid}{error}")
    print("  history:")
    for at, state, reason in index.events(job.job_id):
        print(f"    {_when(at)}  {state.value:<11}  {reason or ''}")
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    index = _index(_load(args))
    state = index.retry(args.job_id)
    print(f"job {args.job_id}: {state.value}; the running node picks it up")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from segnode.node.sending.sender import sender_for

    config = _load(args)
    sender = sender_for(config.destination(args.destination), calling_ae=config.ae_title, dispatch=config.dispatch)
    result = sender.echo()
    print(f"{args.destination}: {result.message}")
    return 0 if result.ok else DispatchError.exit_code
