"""The node configuration (``node.yaml``) and its embedded defaults.

``segnode serve`` with no ``--config`` runs on these defaults: AE title
``SEGNODE`` on 127.0.0.1:11112, any calling AE from the loopback network,
state (spool, SQLite index, results, logs) under ``~/.local/state/segnode``
(``$SEGNODE_STATE_DIR`` overrides), the embedded routing rule (profile
``lungs``, no destination).  Every key is documented in ``docs/node.md``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)
from segnode.errors import ConfigError
from segnode.node.config.dicomweb import BrokerConfig, DicomWebConfig, StowTarget
from segnode.node.config.http import AuditConfig, HttpConfig
from segnode.node.config.sources import SourceConfig, unique_sources
from segnode.node.config.tls import ClientTLS
from segnode.node.config.viewer import ViewerConfig
from segnode.output_kinds import REJECTION_NOTE, kinds_field
from segnode.yamlconf import Frozen, load_model

_AE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.+*/:")


def _check_ae(value: str) -> str:
    if not 0 < len(value.strip()) <= 16 or not set(value) <= _AE_CHARS or "\\" in value:
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae)]


def _check_ae_or_any(value: str) -> str:
    return value if value == "*" else _check_ae(value)


def default_state_dir() -> Path:
    env = os.environ.get("SEGNODE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "segnode"


class ServerTLS(Frozen):
    """TLS for the SCP: our certificate, and optionally client-certificate checking."""

    cert: Path
    key: Path
    client_ca: Path | None = None  # set: senders must present a certificate signed by it
    handshake_timeout_s: float = Field(10.0, gt=0)


class AllowedSender(Frozen):
    """A calling AE title (``*`` = any) from a host or network allowed to send to us."""

    ae_title: Annotated[str, AfterValidator(_check_ae_or_any)] = "*"
    host: str = "127.0.0.0/8"
    destination: str | None = None  # where "@sender" results go for this sender

    @field_validator("host")
    @classmethod
    def _network(cls, value: str) -> str:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"host {value!r} is not an IP address or CIDR network") from exc
        return value

    def matches(self, ae_title: str, host: str) -> bool:
        if self.ae_title != "*" and self.ae_title != ae_title.strip():
            return False
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


class Limits(Frozen):
    max_associations: int = Field(16, ge=1, le=1000)
    # connections accepted whose A-ASSOCIATE-RQ is not yet read (node/ingest/guards.py): in all, and from one host
    max_pending_connections: int = Field(64, ge=1, le=10000)
    max_pending_per_host: int = Field(16, ge=1, le=10000)
    max_pdu_bytes: int = Field(131072, ge=4096, le=16 * 1024 * 1024)
    max_instance_bytes: int = Field(1024 * 1024 * 1024, ge=1024)
    min_free_disk_mb: int = Field(1024, ge=0)
    acse_timeout_s: float = Field(30.0, gt=0)  # deadline for the whole A-ASSOCIATE-RQ, from accept()
    network_timeout_s: float = Field(60.0, gt=0)  # deadline for each later PDU, idle wait included
    receiver_processes: int = Field(1, ge=1, le=64)  # SCP processes sharing the port (node/dicom_in/processes.py)

    @model_validator(mode="before")
    @classmethod
    def _receiver_removed(cls, data: object) -> object:
        """``limits.receiver`` chose between two receivers; there is one now (docs/node.md): say so, by name."""
        if isinstance(data, dict) and "receiver" in data:
            raise ValueError("limits.receiver was removed: the node has one receiver (node/dicom_in/receiver.py), "
                             "serving plain TCP, or TLS when tls: is set; delete the key")
        return data


class Completion(Frozen):
    """When a series (or study) is complete: on evidence, else after the quiet period (node/completion.py)."""

    quiet_period_s: float = Field(10.0, ge=0)
    group_by: Literal["series", "study"] = "series"
    sweep_interval_s: float = Field(1.0, gt=0)
    # complete on evidence: association released and a gap-free volume whose count matches its headers
    evidence: bool = True
    grace_s: float = Field(1.5, ge=0)  # after the evidence, before completing


class Destination(Frozen):
    """A DIMSE peer (``ae_title``, ``host``, ``port``) or a STOW-RS service (``dicomweb``)."""

    name: str = Field(min_length=1)
    ae_title: AETitle | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    dicomweb: StowTarget | None = None  # STOW-RS instead of C-STORE (node/sending/stow.py)
    tls: ClientTLS | None = None
    calling_ae_title: AETitle | None = None  # default: our own AE title
    # kinds this destination takes (seg, rtstruct, overlay, sr); None: whatever the job encodes (docs/node.md)
    outputs: Annotated[tuple[str, ...] | None, BeforeValidator(kinds_field)] = None
    # deadlines of one try (node/sending/sender.py Deadlines); None: the dispatch: section's
    connect_timeout_s: float | None = Field(None, gt=0, le=300)
    timeout_s: float | None = Field(None, gt=0, le=3600)  # the most the peer may stay silent
    attempt_timeout_s: float | None = Field(None, gt=0, le=86400)
    workers: int = Field(1, ge=1, le=16)  # deliveries to this destination at a time (node/sending/queues.py)
    # IHE IOCM: send a Rejection Note (KOS) for a superseded result, after the newer one is stored (docs/node.md)
    rejection_notes: bool = False
    # Storage Commitment (N-ACTION, then an N-EVENT-REPORT by commit_timeout_s): done only once committed
    commit: bool = False
    commit_timeout_s: float = Field(300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _dimse_or_dicomweb(self) -> "Destination":
        dimse = (self.ae_title, self.host, self.port)
        if self.commit and self.dicomweb is not None:
            raise ValueError("commit: Storage Commitment needs a DIMSE destination (ae_title, host, port)")
        if self.dicomweb is None and None in dimse:
            raise ValueError("a destination needs ae_title, host and port (C-STORE) or dicomweb (STOW-RS)")
        if self.dicomweb is not None and any(v is not None for v in dimse):
            raise ValueError("give ae_title/host/port (C-STORE) or dicomweb (STOW-RS), not both")
        return self

    def takes(self, encoded: Collection[str]) -> tuple[str, ...]:
        """The kinds of ``encoded`` that this destination is sent (a rejection note only with ``rejection_notes``)."""
        return tuple(k for k in encoded if (self.rejection_notes if k == REJECTION_NOTE else
                                            self.outputs is None or k in self.outputs))


class Dispatch(Frozen):
    """The retry policy (node/dispatch.py) and the default deadlines of one try (node/sending/sender.py)."""

    max_attempts: int = Field(8, ge=1)
    backoff_initial_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0, le=300)  # TCP connect
    timeout_s: float = Field(30.0, gt=0, le=3600)  # each wait for the peer (A-ASSOCIATE-AC, a response, HTTP read)
    attempt_timeout_s: float = Field(600.0, gt=0, le=86400)  # the whole try: aborted after it
    poll_interval_s: float = Field(1.0, gt=0)


class Worker(Frozen):
    concurrency: int = Field(1, ge=1, le=64)
    timeout_s: float = Field(3600.0, gt=0)
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    weights_dir: Path | None = None
    memory_budget_mb: int | None = Field(None, ge=256)  # deep-learning backends: slabs or refusal above it
    seg_type: Literal["binary", "labelmap"] = "binary"


class Housekeeping(Frozen):
    spool_retention_s: float = Field(24 * 3600.0, ge=0)  # after a job is done
    interval_s: float = Field(600.0, gt=0)
    history_retention_s: float | None = Field(180 * 86400.0, gt=0)  # finished jobs' history; None: kept


class NodeConfig(Frozen):
    ae_title: AETitle = "SEGNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests)
    state_dir: Path = Field(default_factory=default_state_dir)
    tls: ServerTLS | None = None
    allowed_senders: tuple[AllowedSender, ...] = (AllowedSender(host="127.0.0.0/8"), AllowedSender(host="::1/128"))
    storage_classes: tuple[str, ...] = ()  # extra SOP classes (keyword or UID) beyond the CT family
    duplicates: Literal["keep_first"] = "keep_first"
    limits: Limits = Limits()
    completion: Completion = Completion()
    destinations: tuple[Destination, ...] = ()
    routes: Path | None = None
    dispatch: Dispatch = Dispatch()
    worker: Worker = Worker()
    housekeeping: Housekeeping = Housekeeping()
    http: HttpConfig = HttpConfig()  # ops API, status page, metrics (node/ops/api.py)
    audit: AuditConfig = AuditConfig()  # audit log (node/ops/audit.py)
    dicomweb: DicomWebConfig = DicomWebConfig()  # STOW-RS / WADO-RS server (node/http_in/dicomweb.py)
    broker: BrokerConfig | None = None  # set: jobs go to remote workers (node/remote/jobs.py, docs/scaling.md)
    dataset_store: Path | None = None  # harvest target (storage/dataset.py); default <state_dir>/datasets
    deid_secret_file: Path | None = None  # HMAC secret for pseudonyms; must live outside the store
    sources: Annotated[tuple[SourceConfig, ...], AfterValidator(unique_sources)] = ()  # PACS to query and retrieve from (docs/sources.md)
    viewer: ViewerConfig = ViewerConfig()  # the OHIF Viewer served under /viewer/ (node/ops/viewer.py)

    @field_validator("storage_classes")
    @classmethod
    def _known_classes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        from pynetdicom import sop_class

        out = []
        for value in values:
            uid = getattr(sop_class, value, None) if not value[:1].isdigit() else value
            if uid is None:
                raise ValueError(f"unknown storage SOP class {value!r} (use a pynetdicom keyword or a UID)")
            out.append(str(uid))
        return tuple(out)

    @model_validator(mode="after")
    def _destinations_unique(self) -> "NodeConfig":
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        for sender in self.allowed_senders:
            if sender.destination is not None and sender.destination not in names:
                raise ValueError(f"allowed sender {sender.ae_title}: unknown destination {sender.destination!r}")
        return self

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"unknown destination {name!r} (known: {known})")

    def sender_for(self, ae_title: str, host: str) -> AllowedSender | None:
        return next((s for s in self.allowed_senders if s.matches(ae_title, host)), None)

    # -- the state directory ------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def index_path(self) -> Path:
        return self.state_dir / "index.sqlite"

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


def load_config(path: Path | None = None, *, state_dir: Path | None = None) -> NodeConfig:
    """The node config from ``path`` (embedded defaults if ``None``).

    Relative paths in the file (``routes``, TLS files, ``state_dir``) are taken
    relative to the file's folder.
    """
    config = NodeConfig() if path is None else load_model(NodeConfig, Path(path))
    if path is not None:
        config = _resolve_paths(config, Path(path).resolve().parent)
    if state_dir is not None:
        config = config.model_copy(update={"state_dir": Path(state_dir)})
    return config


def _resolve_paths(config: NodeConfig, base: Path) -> NodeConfig:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p.expanduser() if p.expanduser().is_absolute() else base / p)

    update: dict[str, object] = {"state_dir": fix(config.state_dir), "routes": fix(config.routes),
                                 "dataset_store": fix(config.dataset_store),
                                 "deid_secret_file": fix(config.deid_secret_file)}
    update["http"] = config.http.model_copy(update={"token_file": fix(config.http.token_file)})
    update["audit"] = config.audit.model_copy(update={"path": fix(config.audit.path)})
    update["dicomweb"] = config.dicomweb.model_copy(update={"clients": tuple(
        c.model_copy(update={"token_file": fix(c.token_file)}) for c in config.dicomweb.clients)})
    update["destinations"] = tuple(d if d.dicomweb is None else d.model_copy(update={"dicomweb": d.dicomweb.model_copy(
        update={k: fix(getattr(d.dicomweb, k)) for k in ("password_file", "token_file", "ca_bundle")})})
        for d in config.destinations)
    update["sources"] = tuple(s.with_paths(fix) for s in config.sources)
    if config.tls is not None:
        update["tls"] = config.tls.model_copy(update={
            "cert": fix(config.tls.cert), "key": fix(config.tls.key), "client_ca": fix(config.tls.client_ca)})
    return config.model_copy(update=update)
