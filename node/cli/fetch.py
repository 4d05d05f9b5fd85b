"""``segnode fetch``: retrieve a study (by accession, study UID or patient) from a configured source.

It runs against the node's configuration, beside the running node: C-MOVE
asks the source to send the series to the node's own AE title (the running
node's receiver stores them); C-GET and DICOMweb store each instance through
the node's store path into the same spool and index.  Either way the running
node's completion sweep completes and routes the series (docs/sources.md).
"""

from __future__ import annotations

import argparse
import getpass
import logging
from datetime import date
from pathlib import Path

from segnode.errors import InputError
from segnode.node.config import NodeConfig, load_config
from segnode.node.ingest.store import StoreHandler
from segnode.node.sources.fetch import NOT_FETCHED, FetchReport, fetcher_for
from segnode.node.sources.open import open_source, source_config
from segnode.node.sources.pin import Pin, pin_for
from segnode.node.sources.source import SourceError, StudyQuery
from segnode.storage.index import Index
from segnode.storage.spool import Spool

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fetch", help="retrieve a study from a configured source (PACS) and segment it")
    parser.add_argument("--config", type=Path, help="node configuration (its 'sources')")
    parser.add_argument("--from", dest="source", required=True, metavar="NAME", help="the source's name")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--accession", help="the study's accession number")
    which.add_argument("--study", help="the Study Instance UID")
    which.add_argument("--patient", help="the patient's ID (all studies, or since --since)")
    parser.add_argument("--since", type=_day, help="only studies from this day on (YYYY-MM-DD)")
    parser.add_argument("--modality", help="only series of this modality (default: every image series)")
    force = parser.add_mutually_exclusive_group()
    force.add_argument("--route", metavar="RULE", help="route the series by this rule's action, whatever it matches")
    force.add_argument("--profile", help="segment with this profile; the result is kept, sent nowhere")
    parser.add_argument("--by", help="who asks (recorded in the retrieval log; default cli:<login>)")
    parser.add_argument("--list", action="store_true", help="only list the matching studies and series (no retrieve)")
    parser.set_defaults(func=run)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    query = StudyQuery(accession=args.accession, study_uid=args.study, patient_id=args.patient, since=args.since)
    if args.list:
        return list_matches(config, args.source, query)
    pin = pin_for(config, route=args.route, profile=args.profile)
    report = fetch_with_config(config, args.source, query, by=args.by or f"cli:{getpass.getuser()}",
                               modality=args.modality, pin=pin)
    for line in report.lines():
        print(line)
    if not report.series:
        raise InputError(f"source {args.source}: the matching studies have no image series to retrieve")
    return 0 if report.ok else SourceError.exit_code


def list_matches(config: NodeConfig, name: str, query: StudyQuery) -> int:
    """``--list``: the studies and their series as the source answers (UIDs, dates, counts; no patient ID)."""
    source = open_source(config, name)
    for study in source.find_studies(query):
        print(f"study {study.study_uid} {study.study_date or '?'} accession {study.accession or '-'} "
              f"{'/'.join(study.modalities) or '?'}")
        for series in source.find_series(study.study_uid):
            wanted = "" if series.modality not in NOT_FETCHED else " (not fetched)"
            print(f"  series {series.series_uid} {series.modality or '?'} #{series.series_number or '?'} "
                  f"{series.instance_count if series.instance_count is not None else '?'} instance(s){wanted}")
    return 0


def fetch_with_config(config: NodeConfig, name: str, query: StudyQuery, *, by: str,
                      modality: str | None = None, pin: Pin | None = None) -> FetchReport:
    """One fetch from the command line: the node's spool, index and store path opened here."""
    source_config(config, name)  # an unknown source is an error before anything is opened
    index = Index(config.index_path)
    try:
        store = StoreHandler(config, Spool(config.spool_dir), index)
        return fetcher_for(config, name, store=store, index=index, by=by, modality=modality, pin=pin).fetch(query)
    finally:
        index.close()
