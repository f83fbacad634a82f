"""How the branch train function talks to whatever runs it: resumable checkpoints in, and out,
and events out. `LocalChannel` serves one process or torchrun; hft_ray.run.ray_worker serves
Ray Train. The train function knows nothing else of its runner."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

SaveFn = Callable[[Path], None]


class Channel(Protocol):
    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest resumable checkpoint folder of this branch, if it was restarted."""

    def save(self, write: SaveFn, name: str) -> None:
        """Persist a resumable checkpoint that `write(folder)` fills. Every rank calls it (a barrier)
        and its `write` (which writes what that rank holds: hft_ray/train/resumable.py)."""

    def notify(self, event: object) -> None:
        """Tell the driver (rank 0 calls it; other ranks are ignored)."""


class LocalChannel:
    """Resumable checkpoints in `folder/resume` (the newest one kept, renamed into place whole),
    events to `on_event`. Runs alone or under torchrun."""

    def __init__(self, folder: str | Path, on_event: Callable[[object], None] = print):
        self.folder = Path(folder) / "resume"
        self.on_event = on_event

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        old = self.folder.with_name(".resume.old")  # a save died between its two renames
        yield self.folder if self.folder.is_dir() else old if old.is_dir() else None

    def save(self, write: SaveFn, name: str) -> None:
        import torch.distributed as dist

        group = dist.is_initialized()
        first = not group or dist.get_rank() == 0
        staging = [None]
        if first:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            staging = [tempfile.mkdtemp(prefix=".resume.", dir=self.folder.parent)]
        if group:
            dist.broadcast_object_list(staging, src=0)  # every rank writes into the same folder
        write(Path(staging[0]))
        if group:
            dist.barrier()
        if first:
            old = self.folder.with_name(".resume.old")
            if self.folder.exists():
                os.replace(self.folder, old)
            os.replace(staging[0], self.folder)
            shutil.rmtree(old, ignore_errors=True)
        if group:
            dist.barrier()

    def notify(self, event: object) -> None:
        self.on_event(event)
