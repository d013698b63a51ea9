"""What the user watches: a rich progress bar (step, loss, tokens/s, ETA) and one line per log step."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from seektrain.errors import detach_stdout


class _Console(Console):
    """rich's Console, except when stdout's reader goes away (`seektrain train | head`): rich's own
    handler (rich >= 13.8) then exits the process (SystemExit(1), no checkpoint). Here output goes to
    /dev/null from then on and `reader_gone` says so; the trainer checkpoints and stops, as on SIGTERM.
    Older rich lets the BrokenPipeError through: `Display.print` routes it here too."""

    reader_gone = False

    def on_broken_pipe(self) -> None:
        self.quiet = True
        detach_stdout()
        self.reader_gone = True


class Display:
    """A progress bar on a terminal (when enabled); plain lines everywhere (also in log files)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.console = _Console(highlight=False, soft_wrap=True)  # no hard wraps in log files
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

    @property
    def closed(self) -> bool:
        """Whether stdout's reader went away."""
        return self.console.reader_gone

    def print(self, text: str) -> None:
        try:
            self.console.print(text, markup=False)
        except BrokenPipeError:
            self.console.on_broken_pipe()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
