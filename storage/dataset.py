"""The curators' dataset store: de-identified cases, versioned, content-addressed.

Layout under the store root::

    store.json                      format, de-identification options, key check (not the key)
    objects/ab/abcdef…              every file, named by its SHA-256, read-only, never deleted
    datasets/NAME/cases.json        working manifest: case ID → row (see storage.manifest)
    datasets/NAME/labels.json       the dataset's label table (value → tissue name)
    datasets/NAME/versions/N.json   frozen versions: rows + their hash, read-only
    quarantine.jsonl                series refused for possible burned-in or embedded text (pseudonyms only)

The HMAC secret is never written here; :meth:`DatasetStore.open` refuses a
secret that lives inside the store or differs from the one the store was
created with.
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from segnode.errors import ConfigError, InputError, StorageError
from segnode.storage import nifti
from segnode.storage.deid import Deidentifier, burned_in_reason, read_dicom
from segnode.storage.deid_table import Option
from segnode.storage.labels import seg_to_labels, translate
from segnode.storage.manifest import (
    CaseRecord,
    LabelStatus,
    read_json,
    rows_hash,
    sha256_bytes,
    write_json_atomic,
)
from segnode.storage.pixel_text import PixelTextError
from segnode.storage.pseudonyms import Pseudonymizer, check_secret

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
#: the environment variable naming the dataset store (``segnode dataset`` and the node's default)
STORE_ENV = "SEGNODE_DATASET_STORE"
#: options a new store uses unless told otherwise
DEFAULT_OPTIONS = (Option.RETAIN_LONGITUDINAL_MODIFIED_DATES, Option.RETAIN_PATIENT_CHARACTERISTICS)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,49}")
_CASE = re.compile(r"C[0-9A-F]{15}")
#: the modality of every dataset: the organ profiles segment CT and the export names its channel CT
MODALITY = "CT"


class QuarantinedError(InputError):
    """The series may carry burned-in or embedded text; it was recorded, not harvested."""


class ModalityError(InputError):
    """The series is not of the modality the datasets hold."""


def check_dataset_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"dataset name {name!r} must be a letter then letters, digits or _ (≤50)")
    return name


@dataclass
class CaseInput:
    """A de-identified case ready to store."""

    case_id: str
    dataset: str
    patient: str
    image: np.ndarray
    affine_lps: np.ndarray
    label: np.ndarray
    label_names: dict[int, str]
    label_status: LabelStatus
    study_uid: str = ""
    series_uid: str = ""
    study_date: str = ""
    series_date: str = ""
    profile: str = ""
    backend: str = ""
    model_version: str = ""
    weights_hash: str = ""
    rule: str = ""
    source_ae: str = ""
    instances: tuple[str, ...] = ()
    dicom: list[Dataset] = field(default_factory=list)
    seg: Dataset | None = None


class DatasetStore:
    """A dataset store at ``root``; use :meth:`open` or :meth:`open_read_only`."""

    def __init__(self, root: Path, config: dict, pseudonyms: Pseudonymizer | None) -> None:
        self.root = root
        self.config = config
        self._pseudonyms = pseudonyms
        self.options = tuple(Option(o) for o in config["options"])
        self.keep_dicom = bool(config.get("keep_dicom", True))

    # --- opening -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: Path,
        secret: bytes,
        *,
        options: Sequence[Option | str] | None = None,
        keep_dicom: bool = True,
        secret_path: Path | None = None,
    ) -> "DatasetStore":
        """Open (or create) the store at ``root`` with the HMAC ``secret``.

        ``options`` and ``keep_dicom`` apply only when the store is created.
        """
        root = Path(root).absolute()
        pseudonyms = Pseudonymizer(check_secret(secret))
        if secret_path is not None and Path(secret_path).absolute().is_relative_to(root):
            raise ConfigError("the secret file must live outside the dataset store", where=str(secret_path))
        config_path = root / "store.json"
        if not config_path.exists():
            chosen = DEFAULT_OPTIONS if options is None else tuple(Option(o) for o in options)
            names = sorted(o.value for o in chosen)
            config = {
                "format": STORE_FORMAT,
                "options": names,
                "keep_dicom": keep_dicom,
                "key_check": pseudonyms.key_check(),
            }
            write_json_atomic(config_path, config)
            logger.info("created dataset store %s (options %s)", root, ", ".join(names) or "none")
        store = cls._load(root, pseudonyms)
        if store.config.get("key_check") != pseudonyms.key_check():
            raise ConfigError(
                "this secret is not the one the store was created with (pseudonyms would not match)",
                where=str(root),
            )
        return store

    @classmethod
    def open_read_only(cls, root: Path) -> "DatasetStore":
        """Open an existing store for listing, freezing and export (no secret needed)."""
        return cls._load(Path(root).absolute(), None)

    @classmethod
    def _load(cls, root: Path, pseudonyms: Pseudonymizer | None) -> "DatasetStore":
        config = read_json(root / "store.json")
        if config.get("format") != STORE_FORMAT:
            raise StorageError(f"unknown store format {config.get('format')!r}", where=str(root))
        return cls(root, config, pseudonyms)

    @property
    def pseudonyms(self) -> Pseudonymizer:
        if self._pseudonyms is None:
            raise ConfigError("this command needs the de-identification secret (--secret-file)")
        return self._pseudonyms

    def deidentifier(self) -> Deidentifier:
        return Deidentifier(self.pseudonyms, self.options)

    def case_id(self, dataset: str, source_key: str) -> str:
        """The keyed case ID of a source in a dataset: one source in two datasets gets two IDs."""
        return self.pseudonyms.case_id(f"{check_dataset_name(dataset)}|{source_key}")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (harvests from several worker threads or processes)."""
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- objects -----------------------------------------------------------------------------
    def object_path(self, digest: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise StorageError(f"bad object name {digest!r}")
        return self.root / "objects" / digest[:2] / digest

    def put_object(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        path = self.object_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(digest + ".tmp")
            tmp.write_bytes(data)
            tmp.chmod(0o444)
            tmp.replace(path)
        return digest

    def read_object(self, digest: str) -> bytes:
        try:
            return self.object_path(digest).read_bytes()
        except OSError as exc:
            raise StorageError(f"object missing or unreadable: {exc.strerror}", where=digest) from exc

    # --- datasets ----------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.root / "datasets" / check_dataset_name(name)

    def datasets(self) -> list[str]:
        base = self.root / "datasets"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []

    def cases(self, name: str) -> dict[str, CaseRecord]:
        path = self._dir(name) / "cases.json"
        if not path.exists():
            return {}
        return {k: CaseRecord.from_json(v) for k, v in read_json(path).items()}

    def label_table(self, name: str) -> dict[int, str]:
        path = self._dir(name) / "labels.json"
        return {int(k): v for k, v in read_json(path).items()} if path.exists() else {}

    def _save(self, name: str, cases: dict[str, CaseRecord], table: dict[int, str]) -> None:
        write_json_atomic(self._dir(name) / "labels.json", {str(k): v for k, v in sorted(table.items())})
        write_json_atomic(self._dir(name) / "cases.json", {k: v.to_json() for k, v in sorted(cases.items())})

    def find_case(self, case_id: str, dataset: str | None = None) -> CaseRecord:
        if not _CASE.fullmatch(case_id):
            raise InputError(f"{case_id!r} is not a case ID (C + 15 hex digits)")
        names = [dataset] if dataset else self.datasets()
        found = [self.cases(n)[case_id] for n in names if case_id in self.cases(n)]
        if not found:
            raise InputError(f"no case {case_id} in {', '.join(names) or 'the store'}")
        if len(found) > 1:
            raise InputError(f"case {case_id} is in several datasets; give --dataset")
        return found[0]

    # --- writing cases -----------------------------------------------------------------------
    def add_case(self, case: CaseInput) -> CaseRecord:
        """Store a de-identified case (objects first, then the manifest row)."""
        with self.locked():
            cases = self.cases(case.dataset)
            _check_profile(case, cases)
            existing = cases.get(case.case_id)
            corrects = case.label_status is LabelStatus.CORRECTED  # a correction replaces any earlier label
            if existing is not None and existing.label_status is not LabelStatus.AUTO and not corrects:
                logger.info("a case in %s has curated labels; kept as it is", case.dataset)
                return existing
            table = self.label_table(case.dataset)
            label = translate(case.label, case.label_names, table)
            record = CaseRecord(
                case_id=case.case_id,
                dataset=case.dataset,
                patient=case.patient,
                study_uid=case.study_uid,
                series_uid=case.series_uid,
                profile=case.profile,
                backend=case.backend,
                model_version=case.model_version,
                weights_hash=case.weights_hash,
                rule=case.rule,
                source_ae=case.source_ae,
                deid=tuple(o.value for o in self.options),
                study_date=case.study_date,
                series_date=case.series_date,
                label_status=case.label_status,
                image=self.put_object(nifti.nifti_bytes(case.image, case.affine_lps, _image_dtype(case.image))),
                label=self.put_object(nifti.nifti_bytes(label, case.affine_lps, np.uint8)),
                labels=dict(sorted(table.items())),
                instances=case.instances,
                dicom=tuple(self.put_object(_dicom_bytes(ds)) for ds in case.dicom) if self.keep_dicom else (),
                seg=self.put_object(_dicom_bytes(case.seg)) if self.keep_dicom and case.seg is not None else "",
                previous_labels=(*existing.previous_labels, existing.label) if corrects and existing else (),
            )
            cases[record.case_id] = record
            self._save(case.dataset, cases, table)
        logger.info(  # no case ID: the node's job log must not link it to the job's series
            "stored a case in %s: %d slices, labels %s (%s)",
            record.dataset, case.image.shape[0], sorted(table.values()), record.label_status.value,
        )
        return record

    def quarantine(self, dataset: str, case_id: str, reason: str, files: int) -> None:
        """Record a refused series by its pseudonymous case ID only."""
        line = json.dumps({"case_id": case_id, "dataset": dataset, "reason": reason, "files": files})
        with self.locked(), open(self.root / "quarantine.jsonl", "a", encoding="utf-8") as out:
            out.write(line + "\n")
        logger.warning("quarantined a series of %s: %s; not harvested", dataset, reason)

    def quarantined(self) -> list[dict]:
        path = self.root / "quarantine.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    # --- corrections and versions ------------------------------------------------------------
    def correct(self, case_id: str, labels: Path, *, dataset: str | None = None,
                mapping: dict[int, str] | None = None) -> CaseRecord:
        """Replace a case's labels with a curator's NIfTI or SEG; old versions keep the old labels."""
        record = self.find_case(case_id, dataset)
        array, names = self._curated_labels(record, Path(labels), mapping)
        with self.locked():
            cases = self.cases(record.dataset)
            table = self.label_table(record.dataset)
            translated = translate(array, names, table)
            grid = nifti.read_nifti(self.read_object(record.image), "image")
            label_hash = self.put_object(nifti.nifti_bytes(translated, grid.affine_lps, np.uint8))
            updated = cases[case_id].corrected(label_hash, dict(sorted(table.items())))
            cases[case_id] = updated
            self._save(record.dataset, cases, table)
        logger.info("case %s in %s: labels corrected", case_id, record.dataset)
        return updated

    def set_label_status(self, case_id: str, status: LabelStatus, *, dataset: str | None = None) -> CaseRecord:
        """Give a case another label status (a rejected clinical result: ``rejected``), labels unchanged."""
        record = self.find_case(case_id, dataset)
        with self.locked():
            cases = self.cases(record.dataset)
            cases[case_id] = replace(cases[case_id], label_status=status)
            self._save(record.dataset, cases, self.label_table(record.dataset))
        return cases[case_id]

    def _curated_labels(self, record: CaseRecord, path: Path,
                        mapping: dict[int, str] | None) -> tuple[np.ndarray, dict[int, str]]:
        data = _read_input(path)
        if data[128:132] == b"DICM":
            array, names = self._seg_labels(record, read_dicom(path), path.name)
        else:
            grid = nifti.read_nifti(data, path.name)
            image = nifti.read_nifti(self.read_object(record.image), "image")
            if grid.array.shape != image.array.shape or not np.allclose(grid.affine_lps, image.affine_lps, atol=1e-3):
                raise InputError(
                    f"labels of shape {grid.array.shape} do not lie on the image grid {image.array.shape}",
                    where=path.name,
                )
            array = grid.array.astype(np.uint8)
            names = dict(record.labels)
        if mapping:
            names = {v: n for v, n in mapping.items() if n != "-"}
            array = np.where(np.isin(array, list(names)), array, 0).astype(np.uint8)
        return array, names

    def _seg_labels(self, record: CaseRecord, seg: Dataset, where: str) -> tuple[np.ndarray, dict[int, str]]:
        """A curator's SEG painted on the case: of the stored (de-identified) slices as it is, or of
        the original slices once de-identified with this store's key; anything else is refused."""
        if not record.instances:
            raise InputError("this case has no DICOM slices to map a SEG onto; give a NIfTI on its image grid",
                             where=where)
        matching = seg if _references_only(seg, record.instances) else self._deidentified_copy(seg)
        if not _references_only(matching, record.instances):
            raise InputError(
                f"the SEG references {len(_referenced_instances(seg))} instance(s), not all of them (as they are "
                "or de-identified with this store's key) among this case's slices: it belongs to another series "
                "or was de-identified with another key or tool; labels left unchanged",
                where=where,
            )
        array, names = seg_to_labels(matching, record.instances)
        if not array.any() and _has_foreground(matching):
            raise InputError("the SEG's segments fall on none of this case's slices; labels left unchanged",
                             where=where)
        return array, names

    def _deidentified_copy(self, seg: Dataset) -> Dataset:
        return self.deidentifier().deidentify(copy.deepcopy(seg)).dataset

    def versions(self, name: str) -> list[int]:
        base = self._dir(name) / "versions"
        return sorted(int(p.stem) for p in base.glob("*.json")) if base.exists() else []

    def freeze(self, name: str) -> int:
        """Freeze the working manifest as the next version (objects re-hashed first)."""
        with self.locked():
            cases = self.cases(name)
            if not cases:
                raise InputError(f"dataset {name!r} has no cases to freeze")
            rows = [cases[k].to_json() for k in sorted(cases)]
            for record in cases.values():
                self._verify_objects(record)
            previous = self.versions(name)
            if previous and self._version_file(name, previous[-1])["rows_hash"] == rows_hash(rows):
                raise InputError(f"dataset {name!r} has not changed since version {previous[-1]}")
            number = (previous[-1] if previous else 0) + 1
            body = {
                "dataset": name,
                "version": number,
                "labels": {str(k): v for k, v in sorted(self.label_table(name).items())},
                "rows": rows,
                "rows_hash": rows_hash(rows),
            }
            write_json_atomic(self._dir(name) / "versions" / f"{number}.json", body, read_only=True)
        logger.info("froze %s version %d (%d cases)", name, number, len(rows))
        return number

    def _version_file(self, name: str, number: int) -> dict:
        return read_json(self._dir(name) / "versions" / f"{number}.json")

    def version(self, name: str, number: int) -> list[CaseRecord]:
        """The rows of a frozen version, after checking they are as frozen."""
        if number not in self.versions(name):
            raise InputError(f"dataset {name!r} has no version {number} (versions: {self.versions(name)})")
        body = self._version_file(name, number)
        if rows_hash(body["rows"]) != body["rows_hash"]:
            raise StorageError(f"version {number} of {name} was modified after freezing")
        return [CaseRecord.from_json(r) for r in body["rows"]]

    def version_labels(self, name: str, number: int) -> dict[int, str]:
        return {int(k): v for k, v in self._version_file(name, number)["labels"].items()}

    def _verify_objects(self, record: CaseRecord) -> None:
        for digest in record.hashes():
            if sha256_bytes(self.read_object(digest)) != digest:
                raise StorageError(f"object of case {record.case_id} does not match its hash", where=digest)

    def verify(self, name: str, number: int) -> int:
        """Re-hash every object of a version; returns how many were checked."""
        rows = self.version(name, number)
        for record in rows:
            self._verify_objects(record)
        return sum(len(r.hashes()) for r in rows)


def _read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", where=str(path)) from exc


def _image_dtype(array: np.ndarray) -> type:
    return np.int16 if np.issubdtype(array.dtype, np.integer) else np.float32


def _check_profile(case: CaseInput, cases: dict[str, CaseRecord]) -> None:
    """A dataset holds the labels of one organ profile."""
    profiles = {r.profile for r in cases.values()}
    if profiles and case.profile not in profiles:
        held = ", ".join(repr(p) for p in sorted(profiles))
        raise InputError(f"dataset {case.dataset} holds cases of profile {held}, not {case.profile!r}")


def _referenced_instances(seg: Dataset) -> set[str]:
    return {str(i.get("ReferencedSOPInstanceUID", "")) for s in seg.get("ReferencedSeriesSequence", [])
            for i in s.get("ReferencedInstanceSequence", [])}


def _references_only(seg: Dataset, instances: Sequence[str]) -> bool:
    referenced = _referenced_instances(seg)
    return bool(referenced) and referenced <= set(instances)


def _has_foreground(seg: Dataset) -> bool:
    try:
        return bool(np.any(seg.pixel_array))
    except (AttributeError, ValueError, RuntimeError):
        return True  # undecodable: an empty result would be a loss, not a curator's choice


def _dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- harvest -----------------------------------------------------------------------------------
def _check_modality(datasets: list[Dataset], dataset: str) -> None:
    found = sorted({str(ds.get("Modality", "") or "none") for ds in datasets})
    if found != [MODALITY]:
        raise ModalityError(f"a {'/'.join(found)} series cannot join a dataset of {MODALITY} series", where=dataset)


def _quarantine(store: DatasetStore, dataset: str, case_id: str, reason: str, files: int) -> None:
    """Record the refusal and raise (the error names the dataset, never the case ID)."""
    store.quarantine(dataset, case_id, reason, files)
    raise QuarantinedError(f"not harvested: {reason}", where=dataset)


def _references_series(seg: Dataset, series_uid: str) -> bool:
    return any(str(item.get("SeriesInstanceUID", "")) == series_uid for item in seg.get("ReferencedSeriesSequence", []))


def deidentified_case(
    store: DatasetStore,
    *,
    dataset: str,
    datasets: list[Dataset],
    seg: Dataset,
    label_status: LabelStatus,
    source_key: str | None = None,
) -> CaseInput:
    """De-identify a series and its SEG with the store's key and build the case.

    Raises :class:`ModalityError` for a series that is not CT, and
    :class:`QuarantinedError` (after recording it) when any image may carry
    burned-in text or text in its pixel data stream that cannot be removed.
    """
    check_dataset_name(dataset)
    if not datasets:
        raise InputError("the series has no images")
    series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    case_id = store.case_id(dataset, source_key or "series|" + series_uid)
    reasons = {r for r in map(burned_in_reason, datasets) if r}
    if reasons:
        _quarantine(store, dataset, case_id, "; ".join(sorted(reasons)), len(datasets))
    _check_modality(datasets, dataset)
    if not _references_series(seg, series_uid):
        raise InputError("the SEG does not reference the harvested series", where=dataset)
    deid = store.deidentifier()
    try:
        results = [deid.deidentify(ds) for ds in datasets]
        deid.deidentify(seg)
    except PixelTextError as exc:
        _quarantine(store, dataset, case_id, exc.message, len(datasets))
    slices = nifti.sort_slices(datasets)
    grid = nifti.series_grid(slices)
    instances = tuple(str(ds.SOPInstanceUID) for ds in slices)
    label, names = seg_to_labels(seg, instances)
    label = grid.labels_on_grid(label)  # the image grid may be resampled (tilted / uneven series)
    first = slices[0]
    return CaseInput(
        case_id=case_id,
        dataset=dataset,
        patient=results[0].patient_pseudonym,
        image=grid.array,
        affine_lps=grid.affine_lps,
        label=label,
        label_names=names,
        label_status=label_status,
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        study_date=str(first.get("StudyDate", "") or ""),
        series_date=str(first.get("SeriesDate", "") or ""),
        instances=instances,
        dicom=slices,
        seg=seg,
    )


def harvest(
    store: DatasetStore,
    *,
    dataset: str,
    series_files: Sequence[Path],
    seg_path: Path,
    profile: str,
    backend: str,
    model_version: str,
    weights_hash: str,
    rule: str,
    calling_ae: str,
    corrected: bool = False,
) -> CaseRecord:
    """Store a de-identified copy of a finished job's series and SEG in ``dataset``.

    Called by the node worker after a job whose route says ``harvest: DATASET``.
    ``corrected``: the SEG is a person's correction of the model's result
    (node/corrections.py): the case gets label status ``corrected``, replacing
    the model's label (kept in ``previous_labels``) or an earlier correction.
    Raises :class:`QuarantinedError` for a series that may carry burned-in text
    (recorded in the store, nothing else written), :class:`InputError` for
    unreadable input, :class:`StorageError` when the store cannot be written.
    """
    datasets = [read_dicom(Path(p)) for p in series_files]
    case = deidentified_case(
        store, dataset=dataset, datasets=datasets, seg=read_dicom(Path(seg_path)),
        label_status=LabelStatus.CORRECTED if corrected else LabelStatus.AUTO,
    )
    case.profile, case.backend, case.model_version = profile, backend, model_version
    case.weights_hash, case.rule = weights_hash, rule
    case.source_ae = store.pseudonyms.ae_title(calling_ae) if calling_ae else ""
    return store.add_case(case)
