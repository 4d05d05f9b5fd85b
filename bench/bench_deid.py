"""De-identification throughput on a 300-image CT series (instances per second).

Builds a 300-slice 512×512 CT series with PHI in its headers (once, in a temporary
folder), then times, medians of 3 runs:

* ``deidentify``: read each file, apply the PS3.15 profile, write it (pure de-id path);
* ``harvest``: the whole store path (de-identify series + SEG, NIfTI image and labels,
  objects, manifest).

    .venv/bin/python bench/bench_deid.py [--slices 300] [--size 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnode.storage.dataset import DatasetStore, harvest  # noqa: E402
from segnode.storage.deid import Deidentifier, write_dicom  # noqa: E402
from segnode.storage.pseudonyms import Pseudonymizer  # noqa: E402

from tests.deid_study import make_canary_study, make_seg  # noqa: E402

SECRET = b"benchmark-secret-0123456789"


def _time(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, _ = make_canary_study(root / "series", "bench", n_slices=args.slices, size=args.size)
        seg = make_seg(files, root / "seg.dcm")
        deid = Deidentifier(Pseudonymizer(SECRET), ["rtnLongModifDatesOpt", "rtnPatCharsOpt"])

        def deidentify_all() -> None:
            for i, path in enumerate(files):
                write_dicom(deid.deidentify(pydicom.dcmread(path)).dataset, root / "out" / f"{i}.dcm")

        def harvest_all() -> None:
            store = DatasetStore.open(root / f"store{time.monotonic_ns()}", SECRET)
            harvest(store, dataset="Bench", series_files=files, seg_path=seg, profile="liver", backend="hu_based",
                    model_version="1", weights_hash="h", rule="bench", calling_ae="AE")

        t_deid = _time(deidentify_all)
        t_harvest = _time(harvest_all)
    n = len(files)
    print(f"series: {n} CT images {args.size}x{args.size}")
    print(f"read + de-identify + write: {t_deid:.2f} s  -> {n / t_deid:.0f} instances/s")
    print(f"harvest (de-id series + SEG, NIfTI, objects, manifest): {t_harvest:.2f} s -> {n / t_harvest:.0f} instances/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
