"""What the user sees while a run goes: on a terminal, one live line per branch (stage i/T,
step/steps, loss, steps/s, ETA) under the run's messages; elsewhere (CI, --json, a log file),
plain lines, a stage's progress every `log_every` steps."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Board:
    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self.console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self.tasks: dict[str, int] = {}
        self.progress = None
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
                                     TimeRemainingColumn(), console=self.console)
            self.progress.start()

    def say(self, line: str) -> None:
        """A message: above the live lines on a terminal, else a plain line."""
        if self.live:
            self.console.print(line, markup=False)
        else:
            self.console.file.write(line + "\n")
            self.console.file.flush()

    def stage_started(self, branch: str, label: str, steps: int) -> None:
        if not self.live:
            return
        if branch not in self.tasks:
            self.tasks[branch] = self.progress.add_task(label, total=steps, loss="-", rate="-")
        self.progress.reset(self.tasks[branch], total=steps, description=label, loss="-", rate="-")

    def steps_done(self, branch: str, label: str, step: int, steps: int, loss: float, rate: float) -> None:
        if self.live and branch in self.tasks:
            self.progress.update(self.tasks[branch], completed=step, loss=f"{loss:.4f}", rate=f"{rate:.1f}")
        elif not self.live:
            self.say(f"[hft-ray] {label}: step {step}/{steps} loss {loss:.4f} ({rate:.1f} steps/s)")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
