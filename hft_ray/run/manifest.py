"""A pipeline run's manifest: what is done, written atomically after every event, so that
`hft-ray run --resume` after a dead driver skips finished work and reuses its MLflow runs.

    {"spec_sha256", "parent_run_id", "attempt",
     "bases": {key: {"checkpoint", "scores"}},   # key "" (the shared base) or "seed-<s>"
     "branches": {branch: {"stages": {"1": {"importance", "run_id", "checkpoint", "row"}, ...}}}}

A branch is named by its method, or method@seed with several seeds (hft_ray/run/layout.py).

A stage entry gains `importance` when its unit scores are measured (importance-aware selection),
`run_id` when its child run is created, `checkpoint` when its training has finished (Ray Train
has persisted that checkpoint whole), and `row` when it has been evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from hft_ray.errors import UserError
from hft_ray.storage import Location

FILE = "manifest.json"


def spec_digest(spec_json: dict) -> str:
    return hashlib.sha256(json.dumps(spec_json, sort_keys=True).encode()).hexdigest()


@dataclass
class Manifest:
    folder: Location           # the run's folder or object-store prefix
    spec_sha256: str
    parent_run_id: str = ""
    attempt: int = 0
    bases: dict[str, dict] = field(default_factory=dict)
    branches: dict[str, dict] = field(default_factory=dict)
    driver: dict = field(default_factory=lambda: {"host": socket.gethostname(), "pid": os.getpid()})

    def __post_init__(self):
        self.folder = Location(self.folder)

    def driver_alive(self) -> bool:
        """Whether the driver that wrote this manifest still runs (on this host)."""
        if self.driver.get("host") != socket.gethostname() or self.driver.get("pid") == os.getpid():
            return False
        try:
            return b"hft" in Path(f"/proc/{self.driver['pid']}/cmdline").read_bytes()
        except OSError:
            return False

    def base(self, key: str = "") -> dict:
        return self.bases.setdefault(key, {})

    def stage(self, method: str, index: int) -> dict:
        return self.branches.setdefault(method, {"stages": {}})["stages"].setdefault(str(index), {})

    def finished_stages(self, method: str) -> int:
        """How many stages of `method`, from the first, have a checkpoint."""
        stages = self.branches.get(method, {}).get("stages", {})
        done = 0
        while stages.get(str(done + 1), {}).get("checkpoint"):
            done += 1
        return done

    def save(self) -> None:
        """Whole or not at all (hft_ray/storage.py): a reader never sees half a manifest."""
        content = {"spec_sha256": self.spec_sha256, "parent_run_id": self.parent_run_id, "attempt": self.attempt,
                   "bases": self.bases, "branches": self.branches, "driver": self.driver}
        (self.folder / FILE).write_text(json.dumps(content, indent=1))

    @classmethod
    def load(cls, folder: str | Path | Location) -> Manifest:
        folder = Location(folder)
        data = json.loads((folder / FILE).read_text())
        return cls(folder, data["spec_sha256"], data["parent_run_id"], data["attempt"], data["bases"], data["branches"],
                   data["driver"])

    def take_over(self) -> None:
        """This process is the driver now."""
        self.driver = {"host": socket.gethostname(), "pid": os.getpid()}


def resumable(tracker, spec, run_id: str | None) -> Manifest:
    """The manifest of the run `hft-ray run --resume [RUN_ID]` continues; UserError if none fits.
    `tracker` is an hft_ray.run.tracking.Tracker; `spec` the pipeline as given now."""
    try:
        run = tracker.find_resumable("pipeline", spec.name, run_id)
    except Exception as error:  # mlflow raises its own exception for an unknown id
        raise UserError(f"--resume {run_id}: no such run in {tracker.tracking_uri} "
                        f"({str(error).splitlines()[0]})") from None
    if run is None:
        raise UserError(f"--resume: no unfinished run of pipeline {spec.name!r} in experiment {spec.experiment!r} "
                        f"({tracker.tracking_uri}); start one without --resume")
    name, status = run.info.run_id, run.info.status
    if run.data.tags.get("hft.kind") != "pipeline" or run.data.tags.get("hft.pipeline") != spec.name:
        raise UserError(f"--resume {name}: not a run of pipeline {spec.name!r}")
    if status == "FINISHED":
        raise UserError(f"--resume {name}: that run FINISHED; nothing to resume")
    folder = Location(run.data.tags.get("hft.output_dir", ""))
    if not (folder / FILE).is_file():
        raise UserError(f"--resume {name}: its manifest {folder / FILE} is not there "
                        "(was output.dir moved or removed?)")
    manifest = Manifest.load(folder)
    if manifest.spec_sha256 != spec_digest(spec.model_dump(mode="json")):
        raise UserError(f"--resume {name}: the pipeline (file and --set overrides) differs from the one that run "
                        f"started with; resume with the same ones (logged as its pipeline.yaml artifact)")
    if manifest.driver_alive():
        raise UserError(f"--resume {name}: its driver (pid {manifest.driver['pid']}) is still running")
    return manifest
