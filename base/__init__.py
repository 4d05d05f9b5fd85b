"""segnode: a DICOM-native PACS integration node for AI organ segmentation.

This package is the base every layer shares and that imports nothing of ours:
the exception tree (:mod:`segnode.errors`), the YAML/pydantic configuration
base (:mod:`segnode.yamlconf`) and the DICOM UID grammar (:mod:`segnode.uids`).
The layers install beneath it from the folders of the source tree
(``pyproject.toml`` maps them): :mod:`segnode.storage`, :mod:`segnode.profiles`,
:mod:`segnode.routing` and :mod:`segnode.models` import only this base and each
other downwards; :mod:`segnode.node` (networking, service, CLI) sits on top.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segnode")
except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
    __version__ = "0.0.0+source"
