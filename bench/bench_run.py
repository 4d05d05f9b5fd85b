"""Benchmark ``segnode run`` (hu_based) on a 512×512×300 CT: load, segment, encode, peak memory.

Usage: ``.venv/bin/python bench/bench_run.py [--organ lungs] [--slices 300] [--repeat 3]``

The CT is the synthetic thorax phantom of the test suite written as a DICOM
series (cached under ``bench/out/``).  Each repeat runs ``segnode run`` in a
fresh process; the phase timings come from its JSON summary, the peak
resident memory from the child's rusage.  As a reference peer for the load
phase, SimpleITK's ``ImageSeriesReader`` reads the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.phantoms import thorax_phantom, write_ct_series  # noqa: E402


def make_series(slices: int) -> Path:
    folder = ROOT / "bench" / "out" / f"thorax_512x512x{slices}"
    if len(list(folder.glob("*.dcm"))) == slices:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    print(f"writing a {slices}-slice 512×512 phantom series to {folder} ...", flush=True)
    phantom = thorax_phantom(shape=(slices, 512, 512), spacing=(0.78, 0.78, 300.0 / slices * 1.0), seed=1)
    v = phantom.volume
    write_ct_series(v.hu, folder, v.spacing, v.origin, v.direction)
    return folder


def run_once(series: Path, organ: str, seg_type: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "segnode"), "run", "--organ", organ, "--model", "hu_based",
             "--seg-type", seg_type, str(series), "-o", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        stderr = proc.stderr.read() if proc.stderr else ""
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        wall = time.perf_counter() - start
        peak_kb = usage.ru_maxrss
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"segnode run failed: {stderr}")
        summary = json.loads(next(Path(out).glob("summary_*.json")).read_text())
        seg = Path(summary["output"]["path"])
        return {
            **summary["timings"],
            "wall_s": wall,
            "peak_rss_mb": peak_kb / 1024,
            "seg_mb": seg.stat().st_size / 1e6,
        }


def sitk_load(series: Path) -> float:
    import SimpleITK as sitk

    files = sorted(str(p) for p in series.glob("*.dcm"))
    start = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.Execute()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--organ", default="lungs")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seg-type", default="binary")
    args = parser.parse_args()
    series = make_series(args.slices)
    runs = [run_once(series, args.organ, args.seg_type) for _ in range(args.repeat)]
    peer = statistics.median(sitk_load(series) for _ in range(args.repeat))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nsegnode run --organ {args.organ} --model hu_based ({args.seg_type}), 512x512x{args.slices}, "
          f"median of {args.repeat} runs")
    print(f"  load     {med['load_s']:6.2f} s   (SimpleITK ImageSeriesReader, same files: {peer:.2f} s)")
    print(f"  segment  {med['segment_s']:6.2f} s")
    print(f"  encode   {med['encode_s']:6.2f} s   (SEG {med['seg_mb']:.1f} MB)")
    print(f"  total    {med['wall_s']:6.2f} s   wall, incl. interpreter start")
    print(f"  peak RSS {max(r['peak_rss_mb'] for r in runs):6.0f} MB")
    print("targets: under 20 s and under 2 GB")


if __name__ == "__main__":
    main()
