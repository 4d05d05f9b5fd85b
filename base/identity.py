"""segnode's own identity, written everywhere the node names itself.

One place for what PS3.7 D.3.3.2 (Implementation Class UID and Version Name,
in every A-ASSOCIATE-RQ/-AC), PS3.10 7.1 (the same two in every file meta we
write) and the General Equipment module (Manufacturer, model name, software
versions of every object we create) say about the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from segnode import __version__

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import FileMetaDataset

#: a 2.25 UID (PS3.5 B.2) derived once from "segnode implementation class"; it never changes
IMPLEMENTATION_CLASS_UID = "2.25.81889068252909961747583286213210863358"
#: at most 16 characters of the default repertoire (PS3.7 D.3.3.2.2)
IMPLEMENTATION_VERSION_NAME = f"SEGNODE_{__version__.split('+')[0]}"[:16]
MANUFACTURER = "segnode"
MODEL_NAME = "segnode"
SOFTWARE_VERSIONS = __version__


def stamp_file_meta(meta: FileMetaDataset) -> None:
    """Name segnode as the implementation that wrote a file (PS3.10 7.1 group 0002)."""
    from pydicom.uid import UID

    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
