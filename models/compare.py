"""``segnode models compare A B``: two models on the same split of a frozen dataset version.

Each model is an nnU-Net model folder (an imported or fine-tuned nnU-Net
model, or a TotalSegmentator task: its run folder is used), named as
``segnode models list`` shows it or given as a path.  Both predict the same
cases (in their own process, timed, peak memory measured); segments are
paired with the dataset's labels by name, and each organ gets a verdict.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from segnode.errors import ConfigError, WeightsError, WeightsNotInstalledError
from segnode.profiles.schema import Backend

if TYPE_CHECKING:  # pragma: no cover
    from segnode.models.evaluate import Evaluation, OrganSummary
    from segnode.models.predict_cases import PredictionStats

logger = logging.getLogger(__name__)

#: a mean Dice difference below this is a tie
TIE_DICE = 0.01


@dataclass(frozen=True)
class ModelUnderTest:
    label: str
    folder: Path  # nnU-Net model folder
    weights_hash: str
    card: dict | None

    @property
    def organs_available(self) -> list[str]:
        from segnode.models.predict_cases import model_labels

        return sorted(model_labels(self.folder).values())


@dataclass(frozen=True)
class OrganVerdict:
    segment: str
    dice_a: float
    dice_b: float
    hd95_a: float
    hd95_b: float

    @property
    def verdict(self) -> str:
        if math.isnan(self.dice_a) and math.isnan(self.dice_b):
            return "neither predicts it"
        if math.isnan(self.dice_a):
            return "only B predicts it"
        if math.isnan(self.dice_b):
            return "only A predicts it"
        delta = self.dice_b - self.dice_a
        if abs(delta) < TIE_DICE:
            return "tie"
        return "B better" if delta > 0 else "A better"


def resolve_model(spec: str, root: Path) -> ModelUnderTest:
    """A model name from ``segnode models list`` (fine-tuned first; ``NAME``: its latest version) or a
    model folder path."""
    from segnode.models.weights import find_model, verify_or_raise

    path = Path(spec)
    if path.is_dir() and (path / "plans.json").exists():
        return ModelUnderTest(spec, path, "", _card(path))
    for backend in (Backend.NNUNET, Backend.TOTALSEGMENTATOR):
        try:
            record = find_model(root, backend, spec)
            break
        except WeightsNotInstalledError:
            continue
    else:
        raise WeightsNotInstalledError(f"no nnU-Net or TotalSegmentator model named {spec!r} (segnode models list)",
                                       where=str(root))
    verify_or_raise(record)
    folder = record.path
    if record.backend is Backend.TOTALSEGMENTATOR:
        runs = [p for p in folder.iterdir() if p.is_dir() and p.name.count("__") == 2]
        if len(runs) != 1:
            raise WeightsError("expected one <trainer>__<plans>__<config> run folder", where=str(folder))
        folder = runs[0]
    return ModelUnderTest(spec, folder, record.weights_hash, _card(record.path))


def _card(folder: Path) -> dict | None:
    card = folder / "model_card.json"
    return json.loads(card.read_text(encoding="utf-8")) if card.exists() else None


def export_split(store_root: Path, dataset: str, out: Path, test_fraction: float, dataset_id: int = 501) -> Path:
    from segnode.storage.dataset import DatasetStore
    from segnode.storage.export_nnunet import export_nnunet

    if not (Path(store_root) / "store.json").exists():
        raise ConfigError("no dataset store here", where=str(store_root))
    store = DatasetStore.open_read_only(Path(store_root))
    return export_nnunet(store, dataset, out, dataset_id=dataset_id, test_fraction=test_fraction).folder


def verdicts(summary_a: Iterable[OrganSummary], summary_b: Iterable[OrganSummary],
             organs: list[str]) -> list[OrganVerdict]:
    a = {s.segment: s for s in summary_a}
    b = {s.segment: s for s in summary_b}
    return [OrganVerdict(o, _metric(a, o, "dice_mean"), _metric(b, o, "dice_mean"),
                         _metric(a, o, "hd95_median_mm"), _metric(b, o, "hd95_median_mm")) for o in organs]


def _metric(table: dict[str, OrganSummary], organ: str, key: str) -> float:
    """``key`` of ``organ``'s summary, NaN when the model does not predict it."""
    return float(getattr(table[organ], key)) if organ in table else math.nan


@dataclass
class Comparison:
    dataset: str
    split: str
    models: tuple[ModelUnderTest, ModelUnderTest]
    stats: tuple[PredictionStats, PredictionStats]
    organs: list[OrganVerdict]
    out_dir: Path


def evaluate_on_split(model: ModelUnderTest, *, dataset: str, store: Path, out_dir: Path, split: str = "test",
                      device: str = "cpu", threads: int | None = None, test_fraction: float = 0.2,
                      pictures: bool = True) -> tuple[Evaluation, PredictionStats, list[str]]:
    """Predict one split of a frozen dataset version with ``model`` and evaluate it.

    Returns ``(Evaluation, PredictionStats, organs)``; the split is the store's
    patient-level split, the same as at training for the same test fraction.
    """
    from segnode.models.segmentation_io import load_labels_file
    from segnode.models.training import evaluate_model_folder

    if split not in ("test", "train"):
        raise ConfigError(f"--split must be test or train, got {split!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="split-", dir=out_dir) as tmp:
        folder = export_split(store, dataset, Path(tmp), test_fraction)
        side = "Ts" if split == "test" else "Tr"
        if not any((folder / f"labels{side}").glob("*.nii.gz")):
            raise ConfigError(f"the {split} split of {dataset} is empty (test fraction {test_fraction})")
        organs = sorted(load_labels_file(folder / "dataset.json").values())
        evaluation, stats = evaluate_model_folder(model.folder, folder, out_dir, device=device, threads=threads,
                                                  split=side, pictures=pictures)
    return evaluation, stats, organs


def compare(spec_a: str, spec_b: str, *, dataset: str, store: Path, root: Path, out_dir: Path,
            split: str = "test", device: str = "cpu", threads: int | None = None, test_fraction: float | None = None,
            pictures: bool = True) -> Comparison:
    """Evaluate both models on the split and pair their per-organ results."""
    from segnode.models.evaluate import summarise

    models = (resolve_model(spec_a, root), resolve_model(spec_b, root))
    fraction = test_fraction if test_fraction is not None else card_test_fraction(models, dataset)
    results = []
    for tag, model in zip("AB", models):
        evaluation, stats, organs = evaluate_on_split(model, dataset=dataset, store=store, out_dir=out_dir / tag,
                                                      split=split, device=device, threads=threads,
                                                      test_fraction=fraction, pictures=pictures)
        results.append((summarise(evaluation.rows), stats))
    return Comparison(dataset, split, models, (results[0][1], results[1][1]),
                      verdicts(results[0][0], results[1][0], organs), out_dir)


def card_test_fraction(models: Sequence[ModelUnderTest], dataset: str) -> float:
    """The test fraction a fine-tuned model was trained with on this dataset (same split), else 0.2."""
    for model in models:
        card = model.card or {}
        if card.get("dataset", {}).get("ref") == dataset:
            return float(card["dataset"]["test_fraction"])
    return 0.2


def format_comparison(result: Comparison) -> str:
    a, b = result.models
    sa, sb = result.stats
    lines = [f"A = {a.label}   B = {b.label}   on {result.dataset} ({result.split} split, {sa.cases} cases)", "",
             f"{'organ':22} {'Dice A':>8} {'Dice B':>8} {'HD95 A':>8} {'HD95 B':>8}  verdict"]
    fmt = lambda v, d: "-" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.{d}f}")  # noqa: E731
    for o in result.organs:
        lines.append(f"{o.segment[:22]:22} {fmt(o.dice_a, 3):>8} {fmt(o.dice_b, 3):>8} {fmt(o.hd95_a, 1):>8} "
                     f"{fmt(o.hd95_b, 1):>8}  {o.verdict}")
    lines += ["", f"{'':22} {'A':>12} {'B':>12}",
              f"{'seconds per scan':22} {sa.seconds_per_case:12.2f} {sb.seconds_per_case:12.2f}",
              f"{'peak memory (MB)':22} {sa.peak_rss_mb:12.0f} {sb.peak_rss_mb:12.0f}",
              f"{'organs available':22} {len(a.organs_available):12d} {len(b.organs_available):12d}"]
    if sa.peak_gpu_mb is not None:
        lines.append(f"{'peak GPU memory (MB)':22} {sa.peak_gpu_mb:12.0f} {sb.peak_gpu_mb or 0:12.0f}")
    return "\n".join(lines)
