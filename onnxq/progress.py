"""Progress of long loops: a live bar in a terminal, rate-limited log lines everywhere else.

In CI and in log files a bar is invisible, so there the same loop logs a start line, a line at most
every ``LOG_INTERVAL_S`` seconds (done/total, elapsed, estimated time left) and a closing line, on the
``onnxq.progress`` logger (the CLI shows it at the default verbosity).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

logger = logging.getLogger("onnxq.progress")

#: a log line every 10 s keeps a 1-hour job's log short and still shows that it is alive
LOG_INTERVAL_S = 10.0

Item = TypeVar("Item")


def track(
    items: Iterable[Item], label: str, total: int | None, *, interactive: bool, unit: str = "steps"
) -> Iterator[Item]:
    """Yield ``items`` unchanged while showing progress (``total`` None when unknown)."""
    if interactive:
        yield from _bar(items, label, total)
    else:
        yield from _logged(items, label, total, time.monotonic, unit)


def _bar(items: Iterable[Item], label: str, total: int | None) -> Iterator[Item]:
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=total)
        for item in items:
            yield item
            progress.advance(task)


def _logged(
    items: Iterable[Item], label: str, total: int | None, now: Callable[[], float], unit: str = "steps"
) -> Iterator[Item]:
    """``now`` is the clock (a parameter so that tests can drive it)."""
    started = last = now()
    logger.info("%s: started%s", label, f" ({total} {unit})" if total else "")
    done = 0
    for item in items:
        yield item
        done += 1
        current = now()
        if current - last >= LOG_INTERVAL_S:
            last = current
            logger.info("%s: %s", label, _status(done, total, current - started, unit))
    logger.info("%s: done, %d %s in %.1f s", label, done, unit, now() - started)


def _status(done: int, total: int | None, elapsed: float, unit: str) -> str:
    if not total:
        return f"{done} {unit}, {elapsed:.0f} s"
    left = elapsed / done * (total - done)
    return f"{done}/{total} {unit}, {elapsed:.0f} s elapsed, about {left:.0f} s left"
