"""Model weights on disk: import, list, verify, remove.  Never downloads.

Layout of the weights directory (``$SEGNODE_WEIGHTS_DIR``, else
``~/.local/share/segnode/weights``; ``RunSettings.weights_dir`` overrides)::

    <root>/pretrained/<backend>/<name>/...          imported as published
    <root>/finetuned/<NAME>/<VERSION>/...           trained or fine-tuned here (``segnode train``)
    <model folder>/segnode-manifest.json

A fine-tuned model is named ``NAME/VERSION`` (``Liver/3``); ``NAME`` alone
means its latest version (numerically), and a fine-tuned model wins over a
pretrained one of the same name.  Its backend is in its manifest.

Every model folder holds a manifest written at import: the sha256 of every
file, the source it came from and a ``weights_hash`` (sha256 over the sorted
``path<TAB>sha256`` lines) that names the weights everywhere else (warm model
cache, SEG algorithm version, job record).  Loading a model re-hashes every
file and refuses one that does not match (:class:`WeightsError`).

For TotalSegmentator each task folder (e.g.
``Dataset297_TotalSegmentator_total_3mm_1559subj``) is one model, stored
under ``pretrained/totalsegmentator/``, which is what ``TOTALSEG_WEIGHTS_PATH``
points to at run time; folder names must match TotalSegmentator's task table
exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from segnode.errors import ConfigError, InputError, WeightsError, WeightsNotInstalledError
from segnode.profiles.schema import Backend

if TYPE_CHECKING:  # pragma: no cover
    from segnode.models.base import RunSettings
    from segnode.profiles.schema import Profile

logger = logging.getLogger(__name__)

MANIFEST = "segnode-manifest.json"
ENV_WEIGHTS_DIR = "SEGNODE_WEIGHTS_DIR"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_CHUNK = 4 << 20
TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".pth", ".torchscript")


class Kind(str, Enum):
    """Where a model comes from."""

    PRETRAINED = "pretrained"
    FINETUNED = "finetuned"


@dataclass(frozen=True)
class ModelRecord:
    """One imported model, as its manifest describes it."""

    name: str
    backend: Backend
    kind: Kind
    path: Path
    weights_hash: str
    files: dict[str, str]
    source: str
    imported_at: str

    @property
    def size_bytes(self) -> int:
        return sum((self.path / rel).stat().st_size for rel in self.files if (self.path / rel).exists())


# --------------------------------------------------------------------------- locations


def default_weights_dir() -> Path:
    """``$SEGNODE_WEIGHTS_DIR``, else ``~/.local/share/segnode/weights``."""
    env = os.environ.get(ENV_WEIGHTS_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "segnode" / "weights"


def weights_root(weights_dir: Path | None) -> Path:
    return Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()


def model_path(root: Path, kind: Kind, backend: Backend, name: str) -> Path:
    """Folder of a model: ``pretrained/<backend>/<name>`` or ``finetuned/<NAME>/<VERSION>``."""
    if Kind(kind) is Kind.FINETUNED:
        model, version = split_finetuned(name)
        if version is None:
            raise ConfigError(f"a fine-tuned model is named NAME/VERSION (e.g. Liver/3), not {name!r}")
        return root / Kind.FINETUNED.value / model / version
    check_name(name)
    return root / Kind(kind).value / Backend(backend).value / name


def split_finetuned(name: str) -> tuple[str, str | None]:
    """``NAME/VERSION`` → ``(NAME, VERSION)``, ``NAME`` → ``(NAME, None)``; both parts checked."""
    model, slash, version = name.partition("/")
    check_name(model)
    if slash:
        check_name(version)
    return model, version if slash else None


def _version_key(folder: Path) -> tuple[int, int, str]:
    """Versions sort numerically (``10`` after ``9``), names after numbers."""
    return (0, int(folder.name), "") if folder.name.isdigit() else (1, 0, folder.name)


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(f"invalid model name {name!r}: letters, digits, '_', '.', '+', '-' only (max 128)")
    return name


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """``relative posix path → sha256`` of every regular file under ``folder`` (manifest excluded)."""
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise WeightsError("symbolic links are not accepted in a weights folder", where=str(path))
        if path.is_file() and path.name != MANIFEST:
            out[path.relative_to(folder).as_posix()] = sha256_file(path)
    return out


def combined_hash(files: dict[str, str]) -> str:
    """One sha256 naming a set of files (order-independent)."""
    lines = "".join(f"{rel}\t{sha}\n" for rel, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# --------------------------------------------------------------------------- manifests


def read_manifest(folder: Path) -> ModelRecord:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelRecord(
            name=data["name"], backend=Backend(data["backend"]), kind=Kind(data["kind"]), path=folder,
            weights_hash=data["weights_hash"], files=dict(data["files"]), source=data.get("source", ""),
            imported_at=data.get("imported_at", ""),
        )
    except FileNotFoundError:
        raise WeightsError("no segnode manifest: import the weights with 'segnode models import'",
                           where=str(folder)) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"unreadable manifest ({exc})", where=str(path)) from exc


def _write_manifest(folder: Path, name: str, backend: Backend, kind: Kind, source: str) -> ModelRecord:
    files = hash_tree(folder)
    if not files:
        raise InputError("no files to import", where=source)
    record = ModelRecord(name=name, backend=backend, kind=kind, path=folder, weights_hash=combined_hash(files),
                         files=files, source=source,
                         imported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    data = {"name": name, "backend": backend.value, "kind": kind.value, "weights_hash": record.weights_hash,
            "source": source, "imported_at": record.imported_at, "files": files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return record


# --------------------------------------------------------------------------- queries


def _model_folders(root: Path) -> Iterator[Path]:
    for backend in Backend:
        base = root / Kind.PRETRAINED.value / backend.value
        if base.is_dir():
            yield from sorted(p for p in base.iterdir() if p.is_dir())
    base = root / Kind.FINETUNED.value
    if base.is_dir():
        for model in sorted(p for p in base.iterdir() if p.is_dir()):
            yield from sorted((p for p in model.iterdir() if p.is_dir()), key=_version_key)


def list_models(root: Path) -> list[ModelRecord]:
    """Every imported model under ``root`` (folders without a manifest are skipped, logged)."""
    out: list[ModelRecord] = []
    for folder in _model_folders(root):
        if (folder / MANIFEST).exists():
            out.append(read_manifest(folder))
        else:
            logger.warning("weights folder without manifest ignored: %s", folder)
    return out


def model_name_of(profile: Profile, backend: Backend) -> str:
    """The model ``profile`` runs with ``backend``: ``options.<backend>.model``, else its checkpoint, else its organ."""
    options = getattr(profile.options, backend.value)
    return str(options.model or profile.model_checkpoint or profile.organ)


def find_model(root: Path, backend: Backend, name: str) -> ModelRecord:
    """The model ``name`` of ``backend``: fine-tuned ``NAME/VERSION`` or ``NAME`` (latest), else pretrained.

    Raises :class:`WeightsNotInstalledError` naming the import command when it is missing.
    """
    model, version = split_finetuned(name)
    tuned = root / Kind.FINETUNED.value / model
    if version is not None:
        candidates = [tuned / version]
    else:
        versions = sorted((p for p in tuned.iterdir() if p.is_dir()), key=_version_key) if tuned.is_dir() else []
        candidates = [*versions[-1:], model_path(root, Kind.PRETRAINED, backend, name)]
    for folder in candidates:
        if folder.is_dir():
            record = read_manifest(folder)
            if record.backend is backend:
                return record
    raise WeightsNotInstalledError(
        f"{backend.value} weights {name!r} are not installed in {root}; "
        f"import them with: segnode models import PATH --backend {backend.value}"
        + ("" if backend is Backend.TOTALSEGMENTATOR else f" --name {name}")
        + (" --kind finetuned" if version is not None else ""),
    )


def verify(record: ModelRecord) -> list[str]:
    """Problems found re-hashing every file of ``record`` (empty: intact)."""
    problems: list[str] = []
    current = hash_tree(record.path)
    for rel, sha in sorted(record.files.items()):
        if rel not in current:
            problems.append(f"missing file {rel}")
        elif current[rel] != sha:
            problems.append(f"sha256 mismatch {rel}: expected {sha[:12]}…, found {current[rel][:12]}…")
    problems += [f"unexpected file {rel}" for rel in sorted(set(current) - set(record.files))]
    return problems


def verify_or_raise(record: ModelRecord) -> None:
    problems = verify(record)
    if problems:
        raise WeightsError(
            "weights fail their integrity check (" + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + "); re-import them with 'segnode models import'",
            where=str(record.path),
        )


def remove(root: Path, name: str, backend: Backend | None = None, kind: Kind | None = None) -> list[ModelRecord]:
    """Delete the named model(s); returns what was removed.  Raises if nothing matched."""
    matches = [r for r in list_models(root)
               if r.name == name and (backend is None or r.backend is backend) and (kind is None or r.kind is kind)]
    if not matches:
        raise WeightsError(f"no imported model named {name!r}", where=str(root))
    if len(matches) > 1 and backend is None:
        which = ", ".join(f"{r.kind.value}/{r.backend.value}" for r in matches)
        raise ConfigError(f"model name {name!r} is ambiguous ({which}); give --backend/--kind")
    for record in matches:
        shutil.rmtree(record.path)
        if record.kind is Kind.FINETUNED and not any(record.path.parent.iterdir()):
            record.path.parent.rmdir()  # the NAME folder of its last version
        logger.info("removed %s/%s/%s", record.kind.value, record.backend.value, record.name)
    return matches


# --------------------------------------------------------------------------- import


@dataclass(frozen=True)
class Candidate:
    """A model found inside an import source."""

    backend: Backend
    name: str
    folder: Path  # or a single file (TorchScript)


def _ts_folder_names() -> set[str]:
    try:
        from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    except ImportError:
        return set()
    return {str(info["foldername"]) for info in TASK_ID_WEIGHTS_CONFIGS.values() if info.get("foldername")}


def _is_nnunet_model(folder: Path) -> bool:
    return ((folder / "dataset.json").is_file() and (folder / "plans.json").is_file()
            and any(p.is_dir() and p.name.startswith("fold_") for p in folder.iterdir()))


def _is_monai_bundle(folder: Path) -> bool:
    configs = folder / "configs"
    return configs.is_dir() and any(configs.glob("inference.*")) and any((folder / "models").glob("*.pt"))


def _default_name(folder: Path) -> str:
    # nnU-Net results: <Dataset>/<trainer>__<plans>__<config>/ → name after the dataset
    if "__" in folder.name and folder.parent.name:
        return folder.parent.name
    return folder.name


def detect(source: Path, backend: Backend | None = None) -> list[Candidate]:
    """Models inside ``source`` (an unpacked folder or a single file)."""
    if source.is_file():
        if source.suffix in TORCHSCRIPT_SUFFIXES and backend in (None, Backend.MONAI):
            return [Candidate(Backend.MONAI, source.stem, source)]
        raise InputError("not a recognised weights file (TorchScript .ts/.pt, or a .zip)", where=str(source))
    ts_names = _ts_folder_names()
    found: list[Candidate] = []
    folders = [source, *sorted(p for p in source.rglob("*") if p.is_dir())]
    for folder in folders:
        if any(folder.is_relative_to(c.folder) for c in found if c.folder.is_dir()):
            continue
        if folder.name in ts_names and backend in (None, Backend.TOTALSEGMENTATOR):
            found.append(Candidate(Backend.TOTALSEGMENTATOR, folder.name, folder))
        elif _is_nnunet_model(folder) and backend in (None, Backend.NNUNET):
            found.append(Candidate(Backend.NNUNET, _default_name(folder), folder))
        elif _is_monai_bundle(folder) and backend in (None, Backend.MONAI):
            found.append(Candidate(Backend.MONAI, folder.name, folder))
    if not found and backend is Backend.TOTALSEGMENTATOR:
        raise InputError(
            "no folder named as in TotalSegmentator's task table (e.g. "
            "Dataset297_TotalSegmentator_total_3mm_1559subj)" + ("" if ts_names else
                                                                 "; TotalSegmentator is not installed"),
            where=str(source))
    if not found:
        raise InputError("no model found (nnU-Net model folder with dataset.json, plans.json and fold_N/; "
                         "TotalSegmentator task folder; MONAI bundle with configs/ and models/*.pt; "
                         "or a TorchScript file)", where=str(source))
    return found


def _safe_extract(zip_path: Path, dest: Path) -> None:
    """Extract ``zip_path`` into ``dest``, refusing absolute paths, ``..`` and links."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                target = (dest / info.filename).resolve()
                if info.filename.startswith("/") or not target.is_relative_to(dest.resolve()):
                    raise InputError(f"zip entry escapes the target folder: {info.filename!r}", where=str(zip_path))
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise InputError(f"zip entry is a symbolic link: {info.filename!r}", where=str(zip_path))
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise InputError(f"not a readable zip file ({exc})", where=str(zip_path)) from exc


def _check_ts_layout(folder: Path) -> None:
    runs = [p for p in folder.iterdir() if p.is_dir() and p.name.count("__") == 2]
    ok = [r for r in runs if (r / "dataset.json").is_file() and (r / "plans.json").is_file()
          and any((f / "checkpoint_final.pth").is_file() for f in r.glob("fold_*"))]
    if not ok:
        raise InputError("TotalSegmentator task folder lacks <trainer>__<plans>__<config>/ with dataset.json, "
                         "plans.json and fold_N/checkpoint_final.pth", where=str(folder))


def import_weights(source: Path, root: Path, *, backend: Backend | None = None, name: str | None = None,
                   kind: Kind = Kind.PRETRAINED, force: bool = False) -> list[ModelRecord]:
    """Import the model(s) in ``source`` (zip, folder or TorchScript file) into ``root``.

    Files are copied into a staging folder next to their destination, hashed,
    given a manifest, then moved into place; an interrupted import leaves no
    half model behind.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise InputError("no such file or folder", where=str(source))
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=root) as tmp:
        unpacked = source
        if source.is_file() and source.suffix not in TORCHSCRIPT_SUFFIXES and zipfile.is_zipfile(source):
            unpacked = Path(tmp) / "unpacked"
            unpacked.mkdir()
            _safe_extract(source, unpacked)
        candidates = detect(unpacked, backend)
        if name is not None and len(candidates) != 1:
            raise ConfigError(f"--name given but {source} holds {len(candidates)} models")
        records = [_import_one(c, root, c.name if name is None else name, kind, force, str(source), Path(tmp))
                   for c in candidates]
    return records


def _import_one(candidate: Candidate, root: Path, name: str, kind: Kind, force: bool, source: str,
                tmp: Path) -> ModelRecord:
    if candidate.backend is Backend.TOTALSEGMENTATOR:
        if name != candidate.name:
            raise ConfigError("TotalSegmentator weights keep their task folder name; do not give --name")
        if kind is not Kind.PRETRAINED:
            raise ConfigError("TotalSegmentator weights are imported as pretrained")
        _check_ts_layout(candidate.folder)
    final = model_path(root, kind, candidate.backend, name)
    if final.exists() and not force:
        raise WeightsError(f"{kind.value}/{candidate.backend.value}/{name} is already imported; "
                           "remove it first or use --force", where=str(final))
    staging = tmp / f"stage-{candidate.backend.value}-{name.replace('/', '-')}"
    if candidate.folder.is_file():
        staging.mkdir(parents=True)
        shutil.copy2(candidate.folder, staging / f"model{candidate.folder.suffix}")
    else:
        shutil.copytree(candidate.folder, staging, symlinks=True)
        (staging / MANIFEST).unlink(missing_ok=True)
    record = _write_manifest(staging, name, candidate.backend, kind, source)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    logger.info("imported %s/%s/%s (%d files, weights %s)", kind.value, candidate.backend.value, name,
                len(record.files), record.weights_hash[:12])
    return read_manifest(final)


class ModelFolderBackend:
    """What the backends whose model is a folder in the weights directory share.

    Subclasses set ``name`` (the :class:`Backend`) and ``libraries`` (modules
    that must import); the profile's ``options.<backend>.model`` names the
    imported model (else ``model_checkpoint``, else the organ).
    """

    name: Backend
    libraries: tuple[str, ...] = ()

    def is_available(self) -> bool:
        import importlib.util

        return all(importlib.util.find_spec(m) is not None for m in self.libraries)

    def model_name(self, profile: Profile) -> str:
        return model_name_of(profile, self.name)

    def record(self, profile: Profile, settings: RunSettings) -> ModelRecord:
        return find_model(weights_root(settings.weights_dir), self.name, self.model_name(profile))

    def cache_key(self, profile: Profile, settings: RunSettings) -> str:
        """What makes a loaded model reusable: weights, device, budget, options, tissues."""
        from segnode.models.device import resolve_device

        record = self.record(profile, settings)
        options = getattr(profile.options, self.name.value)
        tissues = [(t.name, t.label) for t in profile.tissues]
        return (f"{self.name.value}|{record.weights_hash}|{resolve_device(settings.device)}|{settings.threads}|"
                f"{settings.memory_budget_mb}|{options.model_dump_json()}|{tissues}")
