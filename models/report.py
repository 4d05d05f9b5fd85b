"""The success-metrics report: pre-trained vs fine-tuned model (Markdown).

The original design measures a segmentation model by three figures: the Dice
per organ, the minutes per scan, and the organs it makes available.  This
module writes them side by side from a :class:`segnode.models.compare.Comparison`,
with the evidence behind them (dataset version, split, cases, hardware,
weights hashes) so a reader can reproduce them.
"""

from __future__ import annotations

import math
import platform
from datetime import datetime, timezone
from pathlib import Path

from segnode.models.compare import Comparison


def _num(value: float, digits: int) -> str:
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def success_metrics_markdown(result: Comparison, *, title: str = "Segmentation success metrics") -> str:
    a, b = result.models
    sa, sb = result.stats
    lines = [
        f"# {title}", "",
        f"Dataset **{result.dataset}**, {result.split} split ({sa.cases} cases, split by patient). "
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {platform.node() or 'this host'} "
        f"({sa.device}).", "",
        "| | A: " + a.label + " | B: " + b.label + " |", "|---|---|---|",
        f"| minutes per scan | {sa.minutes_per_scan:.2f} | {sb.minutes_per_scan:.2f} |",
        f"| peak memory (MB) | {sa.peak_rss_mb:.0f} | {sb.peak_rss_mb:.0f} |",
        f"| organs available | {len(a.organs_available)} | {len(b.organs_available)} |",
        f"| weights sha256 | `{a.weights_hash[:16] or 'n/a'}` | `{b.weights_hash[:16] or 'n/a'}` |",
    ]
    if sa.peak_gpu_mb is not None:
        lines.append(f"| peak GPU memory (MB) | {sa.peak_gpu_mb:.0f} | {sb.peak_gpu_mb or 0:.0f} |")
    lines += ["", "## Dice per organ (mean over cases; HD95 median, mm)", "",
              "| organ | Dice A | Dice B | HD95 A | HD95 B | verdict |", "|---|---|---|---|---|---|"]
    for organ in result.organs:
        lines.append(f"| {organ.segment} | {_num(organ.dice_a, 3)} | {_num(organ.dice_b, 3)} | "
                     f"{_num(organ.hd95_a, 1)} | {_num(organ.hd95_b, 1)} | {organ.verdict} |")
    card = b.card or a.card
    if card:
        hp = card.get("hyper_parameters", {})
        base = card.get("base_model")
        lines += ["", "## Fine-tuning", "",
                  f"- model {card['model']}: {hp.get('epochs')} epochs x {hp.get('iterations_per_epoch')} iterations, "
                  f"{hp.get('configuration')}, base {base['kind'] + ' ' + base['name'] if base else 'none'}",
                  f"- training time {card['training']['seconds']:.0f} s on {card['training']['device']}"]
    lines += ["", "Per-case metrics: `A/metrics.csv`, `B/metrics.csv`; box plots and overlays beside them.", ""]
    return "\n".join(lines)


def write_report(result: Comparison, path: Path | None = None) -> Path:
    path = path or result.out_dir / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(success_metrics_markdown(result), encoding="utf-8")
    return path
