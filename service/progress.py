"""Progress reporting shared by the CLI and the job runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

#: ``progress(done, total)`` callback signature used by long operations.
ProgressCallback = Callable[[int, int], None]


@contextmanager
def progress_bar(label: str, *, enabled: bool = True) -> Iterator[ProgressCallback | None]:
    """Yield a ``progress(done, total)`` callback drawing a tqdm bar on stderr."""
    if not enabled:
        yield None
        return
    bar = tqdm(desc=label, unit="frame", leave=True, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
