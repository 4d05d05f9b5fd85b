"""The ``sources:`` section of the node configuration: PACS the node queries and retrieves from.

Kept apart from :mod:`segnode.node.config` (which embeds it) so the sources wing
(:mod:`segnode.node.sources`) owns its settings.  A source is a DIMSE peer
(C-FIND, then C-MOVE to the node's own AE title or C-GET on the same association)
or a DICOMweb service (QIDO-RS, WADO-RS).  Secrets live in files named here
(``token_file``), never in the YAML.  Every key is documented in ``docs/sources.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path

from pydantic import Field, model_validator
from segnode.node.config.tls import ClientTLS
from segnode.yamlconf import Frozen

#: an AE title as the node config spells it (1-16 printable characters, no backslash)
_AE = r"^[A-Za-z0-9 _.+*/:-]{1,16}$"


class SourceKind(str, Enum):
    DIMSE = "dimse"
    DICOMWEB = "dicomweb"


class RetrieveMethod(str, Enum):
    """How a DIMSE source sends what the node asks for."""

    MOVE = "move"  # C-MOVE to the node's own AE title: the node's receiver stores it
    GET = "get"  # C-GET: the instances come back on the same association


class SourceConfig(Frozen):
    """One PACS: ``kind: dimse`` (``ae_title``, ``host``, ``port``) or ``kind: dicomweb`` (``url``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    kind: SourceKind = SourceKind.DIMSE
    # DIMSE: the PACS's (called) AE title, address, and how it retrieves
    ae_title: str | None = Field(None, pattern=_AE)
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    calling_ae_title: str | None = Field(None, pattern=_AE)  # default: the node's own AE title
    retrieve: RetrieveMethod = RetrieveMethod.MOVE
    tls: ClientTLS | None = None  # the same keys as a destination's
    # DICOMweb: the service root (e.g. http://pacs:8042/dicom-web) and an optional bearer token
    url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    token_file: Path | None = None
    ca_bundle: Path | None = None
    retries: int = Field(2, ge=0, le=10)  # DICOMweb: tries again after a connection error or a 5xx
    # bounds
    max_results: int = Field(500, ge=1, le=100000)  # matches one query may return; more: cancelled, an error
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    query_timeout_s: float = Field(30.0, gt=0, le=3600)  # the most the peer may stay silent during a query
    retrieve_timeout_s: float = Field(600.0, gt=0, le=86400)  # one series' whole retrieve: cancelled after it
    idle_timeout_s: float = Field(60.0, gt=0, le=3600)  # a retrieve with no response for this long: aborted

    @model_validator(mode="after")
    def _dimse_or_dicomweb(self) -> SourceConfig:
        dimse = (self.ae_title, self.host, self.port)
        if self.kind is SourceKind.DIMSE and (None in dimse or self.url is not None):
            raise ValueError(f"source {self.name}: kind dimse needs ae_title, host and port (and no url)")
        if self.kind is SourceKind.DICOMWEB and (self.url is None or any(v is not None for v in dimse)):
            raise ValueError(f"source {self.name}: kind dicomweb needs url (and no ae_title/host/port)")
        return self

    def with_paths(self, fix: Callable[[Path | None], Path | None]) -> SourceConfig:
        """This source with its files (``token_file``, ``ca_bundle``, TLS) passed through ``fix``."""
        update: dict[str, object] = {"token_file": fix(self.token_file), "ca_bundle": fix(self.ca_bundle)}
        if self.tls is not None:
            update["tls"] = self.tls.model_copy(update={k: fix(getattr(self.tls, k)) for k in ("ca", "cert", "key")})
        return self.model_copy(update=update)


def unique_sources(sources: tuple[SourceConfig, ...]) -> tuple[SourceConfig, ...]:
    """``sources`` if their names are unique, else a ``ValueError`` naming the repeated ones."""
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"source names must be unique: {', '.join(dupes)}")
    return sources
