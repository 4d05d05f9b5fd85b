"""The ``dicomweb:`` and ``broker:`` sections of the node configuration, and a destination's ``dicomweb:``.

Kept apart from :mod:`segnode.node.config` (which embeds them) so the DICOMweb server
(:mod:`segnode.node.http_in.dicomweb`), the STOW-RS dispatcher (:mod:`segnode.node.sending.stow`)
and the remote workers (:mod:`segnode.node.remote.jobs`) own their settings.  Secrets live
in files named here (``token_file``, ``password_file``), never in the YAML.
"""

from __future__ import annotations

import ipaddress
import re
from enum import Enum
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from segnode.errors import ConfigError
from segnode.yamlconf import Frozen

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def read_secret(path: Path, what: str) -> str:
    """The secret in ``path`` (surrounding whitespace removed; at least 16 characters); never logged."""
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}: {exc.strerror}", where=str(path)) from exc
    if len(value) < 16:
        raise ConfigError(f"the {what} must be at least 16 characters", where=str(path))
    return value


class DicomWebClient(Frozen):
    """A client allowed to use the DICOMweb service: its token, where it may connect from, its AE title.

    Instances it stores are indexed as sent by ``ae_title`` from its address,
    so routing rules (``CallingAE``) and ``allowed_senders[].destination``
    (``@sender``) treat it like a DIMSE sender.
    """

    name: str = Field(pattern=_NAME.pattern)
    token_file: Path
    hosts: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    ae_title: str = Field("DICOMWEB", min_length=1, max_length=16, pattern=r"[A-Za-z0-9 _.+*/:-]+")
    store: bool = True  # STOW-RS
    retrieve: bool = False  # WADO-RS of spooled series

    @field_validator("hosts")
    @classmethod
    def _networks(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(f"host {value!r} is not an IP address or CIDR network") from exc
        return values

    def allows(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in ipaddress.ip_network(n, strict=False) for n in self.hosts)


class DicomWebConfig(Frozen):
    """The DICOMweb server (STOW-RS in, WADO-RS out, the remote workers' endpoints).

    Its own listener, apart from the ops API: it is meant to face the network
    (modalities, other nodes, workers) where the ops API stays on loopback.
    Every request needs a client's bearer token (or a job's token, for a
    remote worker); there is no anonymous access.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8042, ge=0, le=65535)  # 0: any free port (tests)
    clients: tuple[DicomWebClient, ...] = ()
    max_body_bytes: int = Field(4 * 1024**3, ge=1024)  # a whole STOW-RS request, refused (413) before reading
    max_part_bytes: int | None = Field(None, ge=1024)  # one instance; default limits.max_instance_bytes
    max_parts: int = Field(10000, ge=1)
    max_result_bytes: int = Field(2 * 1024**3, ge=1024)  # a remote worker's result upload
    network_timeout_s: float = Field(60.0, gt=0)  # each read/write on a connection
    header_timeout_s: float = Field(10.0, gt=0)  # deadline for a request line and headers (idle keep-alive too)
    max_connections: int = Field(64, ge=1, le=10000)  # open at a time; more: 503 before a thread starts
    max_connections_per_host: int = Field(16, ge=1, le=10000)
    public_url: str | None = None  # the base URL workers use to reach this server (default http://host:port)

    @model_validator(mode="after")
    def _unique_clients(self) -> DicomWebConfig:
        names = [c.name for c in self.clients]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dicomweb client names must be unique: {', '.join(dupes)}")
        return self


class StowAuth(str, Enum):
    NONE = "none"
    BASIC = "basic"
    BEARER = "bearer"


class StowTarget(Frozen):
    """A destination reached by STOW-RS instead of C-STORE (``destinations[].dicomweb``)."""

    url: str = Field(pattern=r"^https?://[^\s]+$")  # the DICOMweb service root, e.g. http://pacs:8042/dicom-web
    auth: StowAuth = StowAuth.NONE
    username: str | None = None  # basic
    password_file: Path | None = None  # basic
    token_file: Path | None = None  # bearer
    ca_bundle: Path | None = None  # https: a private CA; default the system trust store

    @model_validator(mode="after")
    def _credentials(self) -> StowTarget:
        if self.auth is StowAuth.BASIC and (self.username is None or self.password_file is None):
            raise ValueError("auth: basic needs username and password_file")
        if self.auth is StowAuth.BEARER and self.token_file is None:
            raise ValueError("auth: bearer needs token_file")
        return self


class Priority(str, Enum):
    """A route's priority on the broker (RabbitMQ message priority)."""

    URGENT = "urgent"
    ROUTINE = "routine"
    RESEARCH = "research"

    @property
    def level(self) -> int:
        return {"urgent": 9, "routine": 5, "research": 1}[self.value]


class BrokerConfig(Frozen):
    """Remote segmentation workers through Celery on a RabbitMQ broker (``docs/scaling.md``).

    With this section the node enqueues each job (job id, a per-job token, the
    node's DICOMweb URL) instead of running it in a local worker process; a
    ``segnode worker`` anywhere fetches the series by WADO-RS, runs it and
    posts the result back.  The node's index stays the source of truth.
    """

    url: str = Field(pattern=r"^amqps?://")  # amqp://user:pass@host:5672/vhost; use url_file to keep it out of YAML
    queues: tuple[str, ...] = ("gpu", "cpu")
    default_queue: str = "cpu"
    default_priority: Priority = Priority.ROUTINE
    publish_timeout_s: float = Field(10.0, gt=0)
    # a job enqueued but without a result after this long goes back to complete and is enqueued again
    result_timeout_s: float = Field(3600.0, gt=0)

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if not _NAME.fullmatch(value):
                raise ValueError(f"queue name {value!r}: letters, digits, _ . - only")
        if not values:
            raise ValueError("at least one queue")
        return values

    @model_validator(mode="after")
    def _default_known(self) -> BrokerConfig:
        if self.default_queue not in self.queues:
            raise ValueError(f"default_queue {self.default_queue!r} is not one of queues {list(self.queues)}")
        return self

