"""``open_source``: the :class:`~segnode.node.sources.source.Source` for a named ``sources:`` entry."""

from __future__ import annotations

from segnode.errors import ConfigError
from segnode.node.config import NodeConfig
from segnode.node.config.sources import SourceConfig, SourceKind
from segnode.node.ingest.store import StoreHandler
from segnode.node.sources.source import Source


def source_config(config: NodeConfig, name: str) -> SourceConfig:
    for source in config.sources:
        if source.name == name:
            return source
    known = ", ".join(s.name for s in config.sources) or "none configured"
    raise ConfigError(f"unknown source {name!r} (known: {known})")


def open_source(config: NodeConfig, name: str, *, store: StoreHandler | None = None) -> Source:
    """The source ``name`` of ``config``.

    ``store`` is the node's store path: C-GET and WADO-RS hand each retrieved
    instance to it (required for those); C-MOVE needs none, the node's own
    receiver stores what the PACS sends to the node's AE title.
    """
    settings = source_config(config, name)
    if settings.kind is SourceKind.DICOMWEB:
        from segnode.node.sources.web import WebSource

        return WebSource(settings, store=store)
    from segnode.node.sources.dimse import DimseSource

    return DimseSource(settings, node_ae=config.ae_title, store=store)
