"""Progress of long work: a rich bar on a terminal; in a log (no terminal) a plain line per task every
30 s and at its end, so long runs under nohup or CI still show where they are; silent without a console."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class progress_bar:
    """A rich progress bar on a terminal; in a log (no terminal) a plain line per task every 30 s and at
    its end, so long runs under nohup or CI still show where they are; silent without a console."""

    def __init__(self, console):
        logged = console is not None and not console.is_terminal
        self.bar = (_LoggedProgress if logged else Progress)(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, disable=console is None or logged)

    def __enter__(self):
        return self.bar.__enter__()

    def __exit__(self, *exc):
        if isinstance(self.bar, _LoggedProgress) and exc[0] is None:
            self.bar.log_all(final=True)
        return self.bar.__exit__(*exc)


class _LoggedProgress(Progress):
    """rich's Progress that prints a plain line per unfinished task at most every INTERVAL seconds."""

    INTERVAL = 30.0
    _last_line = 0.0

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self.log_all()

    def update(self, task_id, **kwargs) -> None:  # search advances through update (it also renames the task)
        super().update(task_id, **kwargs)
        if kwargs.get("advance"):
            self.log_all()

    def log_all(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_line < self.INTERVAL:
            return
        self._last_line = now
        for task in self.tasks:
            if task.finished and not final:
                continue
            eta = f", about {task.time_remaining:.0f} s left" if task.time_remaining and not task.finished else ""
            total = f"/{task.total:.0f}" if task.total is not None else ""
            self.console.print(f"{task.description}: {task.completed:.0f}{total} ({task.elapsed or 0.0:.0f} s{eta})",
                               highlight=False)
