"""Load YAML into frozen pydantic models, with errors that name file, line and key.

Used for organ profiles, the node configuration and the routing rules, so an
operator's typo always reads ``routes.yaml:12: rules[2].match.Modality: ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from segnode.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Frozen(BaseModel):
    """Base for every configuration model: immutable, unknown keys forbidden."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of its deepest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
            if match is None:
                match = next((k for k, _ in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = node.value[key]
        else:
            match = None
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse ``path``; return the data and its node tree (for line numbers)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", where=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", where=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where) from exc
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError("invalid YAML: nested too deeply", where=str(path)) from None
    return data, node


def validate(model: type[M], data: Any, path: Path, node: yaml.Node | None = None) -> M:
    """Validate ``data`` against ``model``; translate errors to :class:`ConfigError`."""
    if data is None:
        raise ConfigError("file is empty", where=str(path))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _line_of(node, loc)
            where = f"{path}:{line}" if line else str(path)
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {format_loc(loc)}: {msg}")
        raise ConfigError("; ".join(problems)) from exc


def load_model(model: type[M], path: Path) -> M:
    """Read ``path`` and validate it as ``model``."""
    data, node = read_yaml(Path(path))
    return validate(model, data, Path(path), node)
