"""Blocking reads with a time limit: a file that never answers (a stalled network mount, a FIFO) is named
instead of hanging the run.

The reads run in daemon threads; the calling thread waits in short slices, so that Python signal
handlers keep running (a SIGTERM during the wait stops the run as it would anywhere else), and a read
that never returns does not keep the process alive at exit.
"""

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
# Seconds between the waiting thread's wake-ups (when its signal handlers run).
_POLL_SECONDS = 0.25


class DeadlineExceeded(TimeoutError):
    """A read did not finish within its time limit."""


def map_with_deadline(read: Callable[[T], R], items: Sequence[T], seconds: float | None, threads: int = 1,
                      name: Callable[[T], str] = str) -> list[R]:
    """[read(item) for item in items], read by up to `threads` daemon threads; raises the first read's
    error, or DeadlineExceeded naming the items still unread after `seconds` (None: no limit)."""
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    finished = [False] * len(items)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for index in range(len(items)):
        todo.put(index)
    done = threading.Semaphore(0)

    def work() -> None:
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[index] = read(items[index])
            except BaseException as error:  # noqa: BLE001 (handed to the waiting thread)
                errors.append(error)
            finished[index] = True
            done.release()

    for _ in range(max(1, min(threads, len(items)))):
        threading.Thread(target=work, daemon=True, name="deadline-read").start()
    deadline = None if seconds is None else time.monotonic() + seconds
    for _ in items:
        while not done.acquire(timeout=_POLL_SECONDS):
            if deadline is not None and time.monotonic() > deadline:
                waiting = [name(item) for item, ok in zip(items, finished) if not ok]
                raise DeadlineExceeded(f"{len(waiting)} of {len(items)} reads did not finish within {seconds:g} s: "
                                       f"{', '.join(waiting[:5])}{', ...' if len(waiting) > 5 else ''}")
        if errors:
            raise errors[0]
    return results


def call_with_deadline(read: Callable[[], R], seconds: float | None, name: str) -> R:
    """read() in a daemon thread; raises its error, or DeadlineExceeded naming `name` after `seconds`."""
    return map_with_deadline(lambda _: read(), [name], seconds)[0]
