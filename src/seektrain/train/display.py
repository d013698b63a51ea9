"""What the user watches: a rich progress bar (step, loss, tokens/s, ETA) and one line per log step."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Display:
    """A progress bar on a terminal (when enabled); plain lines everywhere (also in log files)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.console = Console(highlight=False, soft_wrap=True)  # no hard wraps in log files
        self.progress = None
        if enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[speed]} tok/s"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task(
                "train", total=total_steps, completed=start_step, loss="-", speed="-"
            )
            self.progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float | None) -> None:
        if self.progress is not None:
            fields = {"loss": f"{loss:.3f}"}
            if tokens_per_s is not None:
                fields["speed"] = f"{tokens_per_s:,.0f}"
            self.progress.update(self.task, completed=step, **fields)

    def print(self, text: str) -> None:
        self.console.print(text, markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
