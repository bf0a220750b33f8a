"""Progress and cancellation reporting shared by every long-running engine loop.

The engine never prints: it reports stages and ticks to a ``Reporter``. The CLI renders them as progress
bars, the job pipeline turns them into events, heartbeats and cooperative cancellation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside an engine loop when the caller asked to stop."""


class Reporter:
    """Silent base reporter. Subclasses override the hooks they care about."""

    def stage(self, name: str, message: str = "") -> None:
        """A new stage starts (e.g. ``calibrate``, ``score``, ``prune``)."""

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        """``done`` units of the current stage are finished."""

    def log(self, message: str) -> None:
        """A one-line note for the user."""

    def should_stop(self) -> bool:
        """True when the caller asked to cancel; loops check it between units of work."""
        return False

    def check(self) -> None:
        """Raise :class:`Cancelled` if the caller asked to stop."""
        if self.should_stop():
            raise Cancelled("cancelled by request")

    def track(self, items: Iterable[T], total: int | None = None, message: str = "") -> Iterator[T]:
        """Iterate ``items`` reporting progress and checking for cancellation before each one."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        self.progress(0, total, message)
        for i, item in enumerate(items):
            self.check()
            yield item
            self.progress(i + 1, total, message)


class TqdmReporter(Reporter):
    """Terminal reporter: one tqdm bar per stage, written to stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: object | None = None
        self._stage = ""

    def stage(self, name: str, message: str = "") -> None:
        self._close()
        self._stage = name
        if self.enabled:
            import sys

            print(f"[{name}] {message}".rstrip(), file=sys.stderr, flush=True)

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=message or self._stage, leave=False, dynamic_ncols=True)
        bar = self._bar
        assert isinstance(bar, tqdm)
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if total is not None and done >= total:
            self._close()

    def log(self, message: str) -> None:
        if self.enabled:
            import sys

            print(message, file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # type: ignore[attr-defined]
            self._bar = None


SILENT = Reporter()
