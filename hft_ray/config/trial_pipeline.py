"""The pipeline a Tune trial runs, and the file made from the best trial: one function for
both, so `hft-ray run best_pipeline.yaml` trains what the trial trained (same data, seeds, plans).

A trial's config (granularity, ratio, and optionally lr, seed, select_embeddings,
reselect_every, strategy) becomes the pipeline's single method `best`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hft_ray.config.spec import parse_spec


def trial_pipeline(pipeline_data: dict, config: dict) -> dict:
    """The searched pipeline (after `set:`) with methods {best: the trial's method}."""
    data = json.loads(json.dumps(pipeline_data))  # a deep copy
    best = {"kind": "hft", "granularity": config["granularity"], "ratio": float(config["ratio"])}
    if config.get("seed") is not None:
        best["seed"] = int(config["seed"])  # the selection seed; `seed:` (data, batches) stays
    if config.get("select_embeddings"):
        best["select_embeddings"] = True
    if config.get("reselect_every"):
        best["reselect_every"] = int(config["reselect_every"])
    if config.get("strategy", "random") != "random":
        best["strategy"] = config["strategy"]
    data["methods"] = {"best": best}
    if config.get("lr") is not None:
        data.setdefault("train", {})["lr"] = float(config["lr"])
        for stage in data.get("stages", []):
            stage.pop("lr", None)  # the tuned lr applied to every stage
    return data


def best_pipeline_text(pipeline_data: dict, pipeline_path: Path, config: dict) -> str:
    """The best trial's pipeline with FFT beside it, ready for `hft-ray run` from anywhere."""
    data = trial_pipeline(pipeline_data, config)
    data["methods"] = {"fft": {"kind": "fft"}, **data["methods"]}
    # Data paths were relative to the searched pipeline's folder; this file lives elsewhere.
    for domain in (data.get("domains") or {}).values():
        source = domain.get("source") if isinstance(domain, dict) else None
        if isinstance(source, dict) and "path" in source and not Path(source["path"]).is_absolute():
            source["path"] = str((pipeline_path.parent / source["path"]).resolve())
    model = data.get("model") or {}
    if isinstance(model.get("chat_template"), str) and not Path(model["chat_template"]).is_absolute():
        model["chat_template"] = str((pipeline_path.parent / model["chat_template"]).resolve())
    header = (f"# Best selection found by: hft-ray tune (pipeline {pipeline_path})\n"
              f"#   {json.dumps(config)}\n# Run it with: hft-ray run <this file>\n")
    text = header + yaml.safe_dump(data, sort_keys=False)
    parse_spec(yaml.safe_load(text), "best pipeline")  # never write a file `hft-ray run` would reject
    return text
