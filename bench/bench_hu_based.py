"""Time and peak memory of the hu_based methods on a 512x512x300 synthetic CT.

Run: ``.venv/bin/python bench/bench_hu_based.py [--slices 300] [--method lungs bone brain]``.
Prints, per method, wall time of ``segment`` and the peak of Python-tracked
allocations during it (numpy arrays included), plus the process's max RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnode.models.base import RunSettings  # noqa: E402
from segnode.models.hu_based import BACKEND  # noqa: E402
from segnode.models.metrics import dice  # noqa: E402
from segnode.profiles.loader import load_profile  # noqa: E402

from tests.phantoms import head_phantom, thorax_phantom  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--method", nargs="+", default=["lungs", "bone", "brain"])
    args = parser.parse_args(argv)
    n, z = args.size, args.slices
    print(f"volume {n}x{n}x{z}, float32 HU")
    for method in args.method:
        started = time.perf_counter()
        if method == "brain":
            phantom = head_phantom((z, n, n), (250 / n, 250 / n, 180 / z))
        else:
            phantom = thorax_phantom((z, n, n), (400 / n, 400 / n, 375 / z))
        made = time.perf_counter() - started
        loaded = BACKEND.load(load_profile(method), RunSettings())
        tracemalloc.start()
        started = time.perf_counter()
        result = loaded.segment(phantom.volume)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        scores = ", ".join(
            f"{name} Dice {dice(result.mask(name), phantom.truth[name]):.4f}"
            for name in result.labels.values()
            if name in phantom.truth
        )
        print(
            f"{method:6s} segment {elapsed:6.2f} s  peak +{peak / 2**20:7.0f} MiB  "
            f"(phantom {made:.1f} s; spacing {tuple(round(s, 3) for s in phantom.volume.spacing)})  {scores}"
        )
        del phantom, result
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process max RSS {rss:.0f} MiB (phantom generation and truth masks included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
