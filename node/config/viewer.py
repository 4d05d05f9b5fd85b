"""The ``viewer:`` section of the node configuration: the OHIF Viewer the ops server serves under ``/viewer/``.

Kept apart from :mod:`segnode.node.config` so the viewer (:mod:`segnode.node.ops.viewer`)
owns its settings.  ``dist`` is the built viewer (``@ohif/app``'s ``dist/``
folder); by default where ``make viewer`` installs it in a source checkout
(``viewer/node_modules/@ohif/app/dist``).  When that folder is missing, ``/viewer/``
answers 503 with how to install it.
"""

from __future__ import annotations

from pathlib import Path

from segnode.yamlconf import Frozen

#: where ``make viewer`` (``npm ci`` in ``viewer/``) puts OHIF's built viewer, in a source checkout
DEFAULT_DIST = Path(__file__).resolve().parents[2] / "viewer" / "node_modules" / "@ohif" / "app" / "dist"


class ViewerConfig(Frozen):
    """The OHIF Viewer served by the ops HTTP server (docs/review.md, *The viewer*)."""

    enabled: bool = True
    dist: Path | None = None  # None: DEFAULT_DIST

    @property
    def folder(self) -> Path:
        return self.dist if self.dist is not None else DEFAULT_DIST
