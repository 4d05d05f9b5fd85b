"""Backend name → backend object; imports heavy libraries only when asked."""

from __future__ import annotations

import importlib

from models.base import SegmentationBackend
from node.errors import ConfigError
from profiles.schema import Backend

_MODULES = {
    Backend.HU_BASED: "models.hu_based",
    Backend.TOTALSEGMENTATOR: "models.totalsegmentator",
    Backend.NNUNET: "models.nnunet",
    Backend.MONAI: "models.monai",
}


def get_backend(name: str | Backend) -> SegmentationBackend:
    """Return the backend object for ``name`` (``BACKEND`` attribute of its module)."""
    try:
        key = Backend(name)
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise ConfigError(f"unknown backend {name!r}; choose one of {choices}") from None
    module = importlib.import_module(_MODULES[key])
    return module.BACKEND
