"""A source with empty optional patient and study attributes gives results without them (PS3.3 Type 1C and 3).

An empty Type 1C attribute is invalid (dciodvfy: "Empty attribute ... Type 1C");
absent is what the sloppy source meant.  Type 2 attributes stay, empty.  The
table of these attributes is segnode's own (node/writers/copied_attributes.py),
not a private one of highdicom's.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.sequence import Sequence
from segnode.models.series import load_series
from segnode.node.writers.kinds import encode_outputs

from tests.dicomtools import dciodvfy
from tests.output_fixtures import tilted_uneven, writer_profile

EMPTY_OPTIONAL = {"PatientComments": "", "PatientBirthTime": "", "OtherPatientIDsSequence": Sequence(),
                  "StudyDescription": "", "PatientAge": "", "AdmittingDiagnosesDescription": ""}


@pytest.mark.parametrize("kind", ["seg", "rtstruct", "sr"])
def test_empty_optional_attributes_of_the_source_are_left_out(tmp_path: Path, kind: str) -> None:
    profile = writer_profile(tmp_path)
    _, labels = tilted_uneven(tmp_path / "ct", profile)
    for path in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(path)
        for keyword, value in EMPTY_OPTIONAL.items():
            setattr(ds, keyword, value)
        ds.ReferringPhysicianName = ""  # Type 2: stays, empty
        ds.save_as(path)
    volume = load_series(tmp_path / "ct")
    results = [r for r in encode_outputs(volume, labels, profile, tmp_path / "out", kinds=(kind,),
                                         seg_type="binary") if r.kind == kind]
    assert results
    for result in results:
        out = pydicom.dcmread(tmp_path / "out" / result.path)
        if kind != "rtstruct":  # the RTSTRUCT writer copies only what its IOD needs (an empty Type 3 is valid)
            assert not set(EMPTY_OPTIONAL) & set(out.dir()), sorted(set(EMPTY_OPTIONAL) & set(out.dir()))
        assert "ReferringPhysicianName" in out and out.ReferringPhysicianName == ""
        assert [e for e in dciodvfy(tmp_path / "out" / result.path) if "Empty attribute" in e] == []
