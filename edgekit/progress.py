"""Rich progress bars for long steps, as a ``progress(description, done, total)`` callback."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a callback; the bar display starts with the first step reported (none: nothing printed)."""
    if not enabled:
        yield lambda desc, done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True))
    tasks: dict[str, int] = {}

    def update(desc: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if desc not in tasks:
            tasks[desc] = bar.add_task(desc, total=total)
        bar.update(tasks[desc], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()
