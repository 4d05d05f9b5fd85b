"""What the structural walk (:mod:`segnode.node.ingest.walk`) costs per instance, in process.

For the ingest benchmark's synthetic 512×512 CT slices (``bench_ingest.write_series``)
and a real 512×512 CT slice with 128 elements and sequences (tests/data/gantry_tilt):
the walk's median time per instance, and its share of the store path's median
time per instance (``StoreHandler.store``: UID checks, header, walk, spool write
with its data and directory syncs, index row), each instance stored once into a
fresh spool.  No DCMTK or Orthanc needed.

    .venv/bin/python bench/bench_walk.py [--images 100] [--repeat 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_ingest import write_series  # noqa: E402  (the same series the ingest benchmark sends)
from segnode.node.config import NodeConfig  # noqa: E402
from segnode.node.http_in.stow import read_file_meta  # noqa: E402
from segnode.node.ingest.store import StoreHandler, StoreRequest  # noqa: E402
from segnode.node.ingest.walk import walk_dataset  # noqa: E402
from segnode.storage.index import Index  # noqa: E402
from segnode.storage.spool import Spool  # noqa: E402

REAL = ROOT / "tests" / "data" / "gantry_tilt" / "I210"


def copies_of(path: Path, folder: Path, count: int) -> list[Path]:
    """``count`` copies of a real slice under new SOP Instance UIDs (each is stored once)."""
    folder.mkdir(parents=True)
    out = []
    for k in range(count):
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(folder / f"{k}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def measure(paths: list[Path], state: Path, repeat: int) -> tuple[float, float]:
    """Median µs of the walk per instance, and of ``StoreHandler.store`` (which includes one walk)."""
    config = NodeConfig(port=0, state_dir=state, limits={"min_free_disk_mb": 1})
    handler = StoreHandler(config, Spool(config.spool_dir), Index(config.index_path))
    walks, stores = [], []
    for path in paths:
        data = path.read_bytes()
        meta = read_file_meta(data)
        assert meta is not None, path
        dataset = memoryview(data)[meta.dataset_offset:]
        for _ in range(repeat):
            start = time.perf_counter()
            fault = walk_dataset(dataset, meta.transfer_syntax, meta.sop_class_uid, inflate_limit=1 << 30)
            walks.append(time.perf_counter() - start)
            assert fault is None, fault
        request = StoreRequest(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, "BENCH",
                               "SEGNODE", "127.0.0.1", abstract_syntax=meta.sop_class_uid)
        start = time.perf_counter()
        status = handler.store(request, dataset)
        stores.append(time.perf_counter() - start)
        assert status[0] == 0, status
    return statistics.median(walks) * 1e6, statistics.median(stores) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="instances stored per series")
    parser.add_argument("--repeat", type=int, default=20, help="walks timed per instance")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="segnode-walk-"))
    try:
        series = {"synthetic 512x512 CT (bench_ingest)": write_series(work / "synthetic", args.images, 512),
                  "real 512x512 CT (gantry_tilt/I210)": copies_of(REAL, work / "real", args.images)}
        for k, (name, paths) in enumerate(series.items()):
            walk_us, store_us = measure(paths, work / f"state{k}", args.repeat)
            print(f"{name}: walk {walk_us:.0f} µs per instance (median), {walk_us / store_us:.1%} of the store "
                  f"path's {store_us:.0f} µs per instance", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
