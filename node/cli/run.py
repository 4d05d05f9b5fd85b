"""``segnode run``: segment one CT series from disk and write a SEG (or NIfTI, RTSTRUCT, ...) + summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segnode.errors import ConfigError
from segnode.models.base import RunSettings
from segnode.node.jobs.pipeline import PipelineRequest, run_pipeline
from segnode.node.writers.common import OutputFormat, RtstructHoles, SegType
from segnode.output_kinds import ALL_KINDS, parse_kinds
from segnode.profiles import Backend


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="segment a CT series (DICOM folder/file or NIfTI) and write DICOM SEG",
        description="Segment a CT series and write a DICOM SEG (or NIfTI) plus a JSON summary into OUTDIR. "
        "Exit codes: 0 success, 2 usage/config error, 3 input error, 4 backend/encoding error.",
    )
    parser.add_argument("input", type=Path, help="folder of DICOM files, one DICOM file, or a NIfTI file")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR", help="output folder")
    parser.add_argument("--organ", required=True, metavar="PROFILE", help="organ profile (segnode profiles list)")
    parser.add_argument(
        "--model", choices=[b.value for b in Backend], default=None,
        help="backend (default: the profile's model_type); the profile's fallbacks follow",
    )
    parser.add_argument("--no-fallback", action="store_true", help="fail instead of trying the profile's fallbacks")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID to use when the folder holds several")
    parser.add_argument("--seg-type", choices=[t.value for t in SegType], default=SegType.BINARY.value)
    parser.add_argument("--format", choices=[f.value for f in OutputFormat], default=OutputFormat.SEG.value)
    parser.add_argument(
        "--output", default="seg", metavar="KINDS", type=_kinds,
        help=f"DICOM objects to write, comma-separated, of {','.join(ALL_KINDS)} (default seg; "
        "sr brings its SEG); ignored with --format nifti",
    )
    parser.add_argument(
        "--rtstruct-holes", choices=[h.value for h in RtstructHoles], default=RtstructHoles.KEYHOLE.value,
        help="RTSTRUCT holes: keyhole (one contour per region, each hole entered through a zero-width cut; "
        "default) or xor (CLOSEDPLANAR_XOR contours)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    parser.add_argument("--weights-dir", type=Path, default=None, help="model weights directory")
    parser.add_argument(
        "--memory-budget-mb", type=int, default=None, metavar="MB",
        help="deep-learning backends: segment in slabs, or refuse, above this estimated memory",
    )
    parser.set_defaults(func=_run)


def _kinds(text: str) -> tuple[str, ...]:
    try:
        kinds = parse_kinds(text, where="--output")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    if not kinds:
        raise argparse.ArgumentTypeError("give at least one kind")
    return kinds


def _run(args: argparse.Namespace) -> int:
    request = PipelineRequest(
        input_path=args.input,
        profile=args.organ,
        out_dir=args.out,
        backend=args.model,
        series_uid=args.series,
        seg_type=args.seg_type,
        rtstruct_holes=args.rtstruct_holes,
        output_format=args.format,
        settings=RunSettings(device=args.device, threads=args.threads, weights_dir=args.weights_dir,
                             memory_budget_mb=args.memory_budget_mb),
        use_fallback=not args.no_fallback,
        outputs=args.output,
    )
    result = run_pipeline(request, report=lambda message: print(message, file=sys.stderr, flush=True))
    for segment in result.summary["segments"]:
        mean = "-" if segment["mean_hu"] is None else f"{segment['mean_hu']:.0f} HU"
        print(f"  {segment['tissue']:16} {segment['volume_ml']:10.1f} mL  {segment['voxels']:10d} voxels  mean {mean}")
    print(f"backend: {result.backend_used} ({result.model_version})")
    written = [o for o in result.outputs if o.kind != "seg"]
    print(f"wrote {result.seg_path}" + "".join(f"\n      {request.out_dir / o.path} ({o.kind})" for o in written))
    print(f"summary {result.summary_path}")
    return 0
