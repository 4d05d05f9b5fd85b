"""``segnode jobs correct N FILE``: a corrected SEG (3D Slicer, any editor) becomes job N's result.

The same as storing the SEG to the node (docs/review.md, "Corrections"): the SEG
is checked against job N's source series and profile, a correction job is
opened (the running node encodes and sends it, and harvests the case with
label status ``corrected``), and the figures are printed.  Refused: exit 3
with the reason, nothing changed.
"""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from segnode.errors import InputError, StorageError
from segnode.node.config import load_config
from segnode.node.corrections import Corrections
from segnode.node.events import discard
from segnode.storage.index import Index
from segnode.storage.spool import Spool


def register_correct(verbs: argparse._SubParsersAction) -> None:
    """Add ``correct`` to the ``segnode jobs`` verbs."""
    p = verbs.add_parser("correct", help="make a corrected SEG of a job's series its result (sent, harvested)")
    p.add_argument("job_id", type=int)
    p.add_argument("file", type=Path, help="the corrected DICOM SEG")
    p.add_argument("--user", help="who corrected it, for the audit (default: the login name)")
    p.set_defaults(func=cmd_correct)


def cmd_correct(args: argparse.Namespace) -> int:
    config = load_config(args.config, state_dir=args.state_dir)
    if not config.index_path.is_file():
        raise StorageError("no index yet: the node has not run with this state directory",
                           where=str(config.state_dir))
    try:
        data = Path(args.file).read_bytes()
        seg = dcmread(args.file)
    except (OSError, InvalidDicomError) as exc:
        raise InputError(f"cannot read the SEG: {exc}", where=str(args.file)) from exc
    corrections = Corrections(config, Index(config.index_path), Spool(config.spool_dir), discard)
    accepted = corrections.correct(seg, args.user or getpass.getuser(), job_id=args.job_id, original=data)
    print(f"job {accepted.job_id}: {accepted.reason()}")
    return 0
