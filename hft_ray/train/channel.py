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
        """Persist a resumable checkpoint that `write(folder)` fills. Every rank calls it (a barrier);
        only rank 0's `write` writes anything."""

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

        if not dist.is_initialized() or dist.get_rank() == 0:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".resume.", dir=self.folder.parent))
            write(staging)
            old = self.folder.with_name(".resume.old")
            if self.folder.exists():
                os.replace(self.folder, old)
            os.replace(staging, self.folder)
            shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    def notify(self, event: object) -> None:
        self.on_event(event)
