"""segnode names itself the same way in every object it writes (file meta and General Equipment)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from segnode import identity
from segnode.node.writers.kinds import encode_outputs
from segnode.uids import is_valid_uid

from tests.output_fixtures import tilted_uneven, writer_profile


def test_the_identity_is_well_formed() -> None:
    assert is_valid_uid(identity.IMPLEMENTATION_CLASS_UID)
    name = identity.IMPLEMENTATION_VERSION_NAME
    assert 0 < len(name) <= 16 and name.isascii() and "\\" not in name


@pytest.mark.parametrize(("seg_type", "kinds"), [("binary", ("seg", "rtstruct", "overlay", "sr")),
                                                 ("labelmap", ("seg", "rtstruct", "overlay", "sr"))])
def test_every_kind_carries_the_node_identity(tmp_path: Path, seg_type: str, kinds: tuple[str, ...]) -> None:
    profile = writer_profile(tmp_path)
    volume, labels = tilted_uneven(tmp_path / "ct", profile)
    results = encode_outputs(volume, labels, profile, tmp_path / "out", kinds=kinds, seg_type=seg_type)
    assert {r.kind for r in results} == set(kinds)
    for result in results:
        ds = pydicom.dcmread(tmp_path / "out" / result.path)  # paths are relative to the job folder
        where = f"{result.kind} {Path(result.path).name}"
        assert ds.file_meta.ImplementationClassUID == identity.IMPLEMENTATION_CLASS_UID, where
        assert ds.file_meta.ImplementationVersionName == identity.IMPLEMENTATION_VERSION_NAME, where
        assert ds.Manufacturer == identity.MANUFACTURER, where
        assert ds.ManufacturerModelName == identity.MODEL_NAME, where
        assert ds.SoftwareVersions == identity.SOFTWARE_VERSIONS, where
