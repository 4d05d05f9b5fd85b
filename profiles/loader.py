"""Find, read and validate organ profiles."""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Any

from segnode.errors import ConfigError
from segnode.profiles.schema import Profile
from segnode.yamlconf import read_yaml, validate

BUILTIN_DIR = Path(__file__).resolve().parent
SNOMED_TABLE = BUILTIN_DIR / "totalsegmentator_snomed_mapping.csv"


@functools.cache
def snomed_table() -> dict[str, dict[str, Any]]:
    """TotalSegmentator structure → codes and colour (vendored CSV, Apache-2.0)."""
    out: dict[str, dict[str, Any]] = {}
    with SNOMED_TABLE.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            def code(prefix: str) -> dict[str, str] | None:
                value = row.get(f"{prefix}.CodeValue", "").strip()
                if not value:
                    return None
                return {
                    "scheme": row[f"{prefix}.CodingSchemeDesignator"].strip(),
                    "value": value,
                    "meaning": row[f"{prefix}.CodeMeaning"].strip(),
                }

            out[row["Structure"]] = {
                "category": code("SegmentedPropertyCategoryCodeSequence"),
                "type": code("SegmentedPropertyTypeCodeSequence"),
                "modifier": code("SegmentedPropertyTypeModifierCodeSequence"),
                "anatomic_region": code("AnatomicRegionSequence"),
                "color": [int(c) for c in row["DicomRGBColor"].split(",")],
            }
    return out


def _fill_codes(data: Any, path: Path) -> Any:
    """Fill codes a tissue leaves out from the TotalSegmentator table (``codes_from``)."""
    if not isinstance(data, dict) or not isinstance(data.get("tissues"), list):
        return data
    table = snomed_table()
    tissues = []
    for i, tissue in enumerate(data["tissues"]):
        if isinstance(tissue, dict) and tissue.get("codes_from"):
            ref = tissue["codes_from"]
            if ref not in table:
                raise ConfigError(
                    f"codes_from: unknown TotalSegmentator structure {ref!r}",
                    where=f"{path}: tissues[{i}]",
                )
            tissue = {**{k: v for k, v in table[ref].items() if v is not None}, **tissue}
        tissues.append(tissue)
    return {**data, "tissues": tissues}


def load_profile_file(path: Path, *, name_must_match: bool = True) -> Profile:
    """Validate one profile file; in a profiles folder its organ must match the file name."""
    data, node = read_yaml(path)
    profile = validate(Profile, _fill_codes(data, path), path, node)
    if name_must_match and profile.organ != path.stem:
        raise ConfigError(f"organ {profile.organ!r} must match the file name", where=str(path))
    return profile


def profile_paths(extra_dirs: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Profile name → file; files in ``extra_dirs`` override the built-in ones."""
    found: dict[str, Path] = {}
    for folder in (BUILTIN_DIR, *extra_dirs):
        for path in sorted(Path(folder).glob("*.yaml")):
            found[path.stem] = path
    return found


def load_profile(name_or_path: str | Path, extra_dirs: tuple[Path, ...] = ()) -> Profile:
    """Load a profile by name (``lungs``) or by path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} and candidate.exists():
        return load_profile_file(candidate, name_must_match=False)
    paths = profile_paths(extra_dirs)
    if str(name_or_path) not in paths:
        raise ConfigError(
            f"unknown profile {str(name_or_path)!r}; available: {', '.join(sorted(paths))}"
        )
    return load_profile_file(paths[str(name_or_path)])


def load_all(extra_dirs: tuple[Path, ...] = ()) -> dict[str, Profile]:
    return {name: load_profile_file(path) for name, path in profile_paths(extra_dirs).items()}
