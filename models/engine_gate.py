"""The parity gate's records: which engines passed on which device kind, and the choice of engine.

``segnode models verify --engine E`` (:mod:`segnode.models.parity`) runs the
checks and records the result in the weights directory::

    <weights>/engines/<device kind>.json    {"<engine>": {passed, torch, checked_at, checks: [...]}}

A record holds for the device kind (CPU model and ISA, or GPU name) and the
torch version it was made with; after a torch upgrade the gate must run again.
:func:`choose_engine` is what every backend calls at load: ``fp32`` always;
``auto`` the first of ``ENGINE_PREFERENCE`` that passed here, else fp32; an
explicit engine that has not passed is refused with a warning and fp32 runs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from segnode.errors import WeightsError
from segnode.models.engines import ENGINE_PREFERENCE, Engine, device_kind, parse_engine

logger = logging.getLogger(__name__)

GATE_DIRNAME = "engines"


@dataclass(frozen=True)
class Check:
    """One figure of the gate: ``value`` must be at least ``threshold``."""

    name: str  # e.g. "nnunet tiny: min Dice over labels"
    value: float
    threshold: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold


@dataclass(frozen=True)
class GateResult:
    engine: Engine
    device_kind: str
    torch_version: str
    checks: tuple[Check, ...]
    checked_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def gate_file(root: Path, kind: str) -> Path:
    return root / GATE_DIRNAME / f"{kind}.json"


def read_results(root: Path, kind: str) -> dict[Engine, GateResult]:
    """The recorded gate results for ``kind`` (empty if none; unreadable is a WeightsError)."""
    path = gate_file(root, kind)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {Engine(name): GateResult(engine=Engine(name), device_kind=kind, torch_version=str(r["torch"]),
                                         checked_at=str(r["checked_at"]),
                                         checks=tuple(Check(**c) for c in r["checks"]))
                for name, r in raw.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"unreadable engine gate record ({exc})", where=str(path)) from exc


def record_result(root: Path, result: GateResult) -> Path:
    """Write ``result`` into the device kind's record (atomically; other engines kept)."""
    path = gate_file(root, result.device_kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    current[result.engine.value] = {"passed": result.passed, "torch": result.torch_version,
                                    "checked_at": result.checked_at,
                                    "checks": [asdict(c) for c in result.checks]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(current, out, indent=2)
    os.replace(tmp, path)
    return path


def has_passed(root: Path, kind: str, engine: Engine) -> bool:
    if engine is Engine.FP32:
        return True
    result = read_results(root, kind).get(engine)
    return result is not None and result.passed and result.torch_version == _torch_version()


def choose_engine(requested: str | Engine, root: Path, device: str) -> Engine:
    """The engine a backend runs with on ``device`` (see the module docstring)."""
    engine = parse_engine(requested)
    if engine is Engine.FP32:
        return engine
    kind = device_kind(device)
    if engine is Engine.AUTO:
        chosen = next((e for e in ENGINE_PREFERENCE if has_passed(root, kind, e)), Engine.FP32)
        logger.info("engine auto on %s: %s", kind, chosen.value)
        return chosen
    if has_passed(root, kind, engine):
        return engine
    logger.warning("engine %s has not passed the parity gate on %s with torch %s (run 'segnode models verify "
                   "--engine %s'); running fp32", engine.value, kind, _torch_version(), engine.value)
    return Engine.FP32
