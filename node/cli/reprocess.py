"""``segnode reprocess``: run finished jobs again with another model; the new results supersede the old.

It runs against the node's configuration (its index); the running node's
workers take the new jobs like any routed job (docs/sources.md).
"""

from __future__ import annotations

import argparse
import getpass
from datetime import datetime, timezone
from pathlib import Path

from segnode.node.config import load_config
from segnode.node.ingest.store import StoreHandler
from segnode.node.sources.fetch import fetcher_for
from segnode.node.sources.reprocess import Model, candidates, refetch, reprocess
from segnode.storage.index import Index
from segnode.storage.spool import Spool


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("reprocess", help="run finished jobs again with another model (new results supersede)")
    parser.add_argument("--config", type=Path, help="node configuration (its state directory)")
    parser.add_argument("--model", required=True, type=Model.parse, metavar="NAME[/VERSION]",
                        help="the backend to run (hu_based, totalsegmentator, nnunet, monai); /VERSION: that fine-tuned "
                             "version of the profile's nnunet or monai model")
    parser.add_argument("--since", required=True, type=_day, help="jobs created from this day on (YYYY-MM-DD, UTC)")
    parser.add_argument("--route", metavar="RULE", help="only jobs routed by this rule")
    parser.add_argument("--from", dest="source", metavar="SOURCE",
                        help="fetch series no longer in the spool again from this source (sources: in the config)")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs, start nothing")
    parser.set_defaults(func=run)


def _day(text: str) -> float:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    by = f"cli:{getpass.getuser()}"
    index = Index(config.index_path)
    try:
        fetcher = None if args.source is None else fetcher_for(
            config, args.source, store=StoreHandler(config, Spool(config.spool_dir), index), index=index, by=by)
        jobs = candidates(index, since=args.since, rule=args.route)
        for job in jobs:
            if args.dry_run:
                print(f"job {job.job_id}: series {job.series_uid}, rule {job.rule}, profile {job.profile}")
                continue
            info = index.series(job.series_uid)
            if fetcher is not None and info is not None and info.purged_at is not None:
                done = refetch(index, fetcher, job, args.model)
            else:
                done = reprocess(index, job, args.model, by=by)
            print(f"job {done.old_job}: series {done.series_uid}: {done.note}")
        print(f"{len(jobs)} job(s) {'would be ' if args.dry_run else ''}re-processed with model {args.model}")
    finally:
        index.close()
    return 0
