"""The console side of a run: a progress bar on a terminal, plain log lines anywhere else."""

from __future__ import annotations


class Progress:
    """A rich progress bar on a terminal; plain log lines (every --log-every steps) anywhere else."""

    def __init__(self, total: int, start: int, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True, soft_wrap=True)  # log lines stay whole in files and CI logs
        self.enabled = enabled
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="compiling…")
            self.bar.start()

    def update(self, step: int, info: str, log_line: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled and log_line:
            self.console.print(f"step {step} {info}", highlight=False)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
