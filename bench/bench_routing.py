"""Benchmark routing: load time of a rules file and time per ``RuleSet.evaluate``.

Usage: ``.venv/bin/python bench/bench_routing.py [--rules 50] [--repeat 20000]``

Writes a rules file of N rules like the example in ``docs/routing.md`` (none of
which matches the test CT, so every rule is tried) plus a fallback, and
evaluates them against a real CT slice header from ``tests/data``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pydicom
from segnode.routing import load_rules

ROOT = Path(__file__).resolve().parent.parent
RULE = """\
  - name: rule-{i}
    match:
      all:
        - {{tag: Modality, equals: CT}}
        - {{calling_ae: {{glob: "ER_CT*"}}}}
        - any: [{{tag: SeriesDescription, regex: "(?i)brain{i}"}}, {{tag: "0018,0050", range: [0, 5]}}]
        - not: {{tag: ImageType, regex: "LOCALIZER"}}
        - {{tag: BodyPartExamined, one_of: [HEAD{i}, BRAIN{i}]}}
    action: {{profile: brain, destinations: ["@sender"]}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rules", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=20000)
    args = parser.parse_args()
    text = "rules:\n" + "".join(RULE.format(i=i) for i in range(args.rules))
    text += "  - name: fallback\n    fallback: true\n    action: {profile: lungs}\n"
    ds = pydicom.dcmread(ROOT / "tests/data/gantry_tilt/I210", stop_before_pixels=True)
    facts = {"calling_ae": "ER_CT1", "called_ae": "SEGNODE", "sender_host": "10.1.2.3"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "routes.yaml"
        path.write_text(text)
        start = time.perf_counter()
        rules = load_rules(path)
        load_s = time.perf_counter() - start
    assert rules.evaluate(ds, **facts).rule == "fallback"
    repeat = max(1, args.repeat // args.rules)
    start = time.perf_counter()
    for _ in range(repeat):
        rules.evaluate(ds, **facts)
    per_eval = (time.perf_counter() - start) / repeat
    print(f"rules file: {args.rules + 1} rules, {len(text.splitlines())} lines, loaded in {load_s * 1e3:.1f} ms")
    print(f"evaluate (all {args.rules} rules tried, fallback matches): {per_eval * 1e6:.0f} µs "
          f"= {per_eval / args.rules * 1e6:.1f} µs per rule ({repeat} repeats)")


if __name__ == "__main__":
    main()
