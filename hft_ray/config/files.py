"""YAML files as users write them: duplicate keys refused, `--set key.path=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hft_ray.errors import UserError


def set_override(data: dict, assignment: str) -> None:
    """Apply `key.path=value` (value parsed as YAML; list items by index: stages.0.steps=5)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key.path=value, e.g. --set train.lr=3e-4")
    path, raw = assignment.split("=", 1)
    keys = path.split(".")
    node: Any = data
    for key in keys[:-1]:
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict):
            node = node.setdefault(key, {})
        else:
            raise UserError(f"--set {assignment!r}: {key!r} does not name an entry")
    last = keys[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {assignment!r}: {last!r} does not name an entry")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """YAML data, as safe_load gives, but a duplicate key is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path, what: str, overrides: list[str] = ()) -> tuple[object, str]:
    """A YAML file's data, with `key.path=value` overrides applied, and its text."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {error}") from None
    if isinstance(data, dict):
        for assignment in overrides:
            set_override(data, assignment)
    return data, text
