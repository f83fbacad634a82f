"""A job bundle: the folder a cluster job runs in (Ray Jobs ships it as the `working_dir`).

It holds the pipeline file, with overrides applied, and copies of the local files the pipeline
names (data files, a local model folder or GGUF file), rewritten to paths inside the bundle, so
the job runs the same inputs on a node that has none of this machine's files. A tune space
comes with its pipeline file. No Ray here: the bundle is plain files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

PIPELINE_FILE = "pipeline.yaml"
SPACE_FILE = "space.yaml"


def _carry(source: Path, bundle: Path, name: str) -> str:
    """Copy a local file or folder into the bundle; its path relative to the bundle."""
    target = bundle / "carried" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return str(target.relative_to(bundle))


def _local(path_text: str, base_dir: Path) -> Path | None:
    """The existing local file or folder a pipeline value names, else None (built-in or hub id)."""
    if path_text.startswith("builtin:"):
        return None
    path = Path(path_text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    return path.resolve() if path.exists() else None


def carry_pipeline_inputs(data: dict, base_dir: Path, bundle: Path) -> list[str]:
    """Rewrite `data` (a pipeline's raw mapping) in place to name copies inside `bundle`; the
    files carried, as they were named."""
    carried = []
    model = data.get("model") or {}
    source = model.get("source")
    if isinstance(source, str) and (local := _local(source, base_dir)):
        model["source"] = "./" + _carry(local, bundle, f"model-{local.name}")
        carried.append(source)
    template = model.get("chat_template")
    if isinstance(template, str) and (local := _local(template, base_dir)):
        model["chat_template"] = _carry(local, bundle, f"template-{local.name}")
        carried.append(template)
    for name, domain in (data.get("domains") or {}).items():
        source = domain.get("source") if isinstance(domain, dict) else None
        if not isinstance(source, dict):
            continue
        key = next((k for k in ("path", "include_path", "dataset") if k in source), "dataset")
        value = source.get(key)
        if isinstance(value, str) and (local := _local(value, base_dir)):
            source[key] = _carry(local, bundle, f"{name}-{local.name}")
            carried.append(value)
    return carried


def write_pipeline_bundle(data: dict, base_dir: Path, bundle: Path) -> list[str]:
    """`bundle`/pipeline.yaml from a validated pipeline's raw mapping; the files carried."""
    bundle.mkdir(parents=True, exist_ok=True)
    carried = carry_pipeline_inputs(data, base_dir, bundle)
    (bundle / PIPELINE_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    return carried


def write_space_bundle(space_data: dict, pipeline_data: dict, pipeline_dir: Path, bundle: Path) -> list[str]:
    """`bundle`/space.yaml naming `bundle`/pipeline.yaml; the files carried."""
    carried = write_pipeline_bundle(pipeline_data, pipeline_dir, bundle)
    (bundle / SPACE_FILE).write_text(yaml.safe_dump({**space_data, "pipeline": PIPELINE_FILE}, sort_keys=False))
    return carried
