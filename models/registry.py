"""Backend name → backend object; imports heavy libraries only when asked."""

from __future__ import annotations

import importlib

from segnode.errors import ConfigError
from segnode.models.base import SegmentationBackend
from segnode.profiles.schema import Backend

_MODULES = {
    Backend.HU_BASED: "segnode.models.hu_based",
    Backend.TOTALSEGMENTATOR: "segnode.models.totalsegmentator",
    Backend.NNUNET: "segnode.models.nnunet",
    Backend.MONAI: "segnode.models.monai",
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
