"""One background thread for a writer's I/O, so the next tensors encode while the last ones are written."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Background:
    """Run jobs in submission order on one thread; a job's error is raised in the caller at its next
    `submit` or `drain`, and at every one after.

    Args:
        name: the thread's name (in stack dumps).
        max_pending: jobs queued before `submit` waits for the oldest (bounds the memory they hold).

    Example:
        >>> io = Background("gguf")
        >>> io.submit(f.write, data)   # returns at once; ``data`` must not change until written
        >>> io.drain()                 # every job done (or its error raised)
    """

    def __init__(self, name: str, max_pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending: deque[Future[Any]] = deque()
        self.max_pending = max_pending
        self._error: BaseException | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.max_pending):
            self._result()
        self._raise()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every job; raise the first error (again at every later call: a writer that lost a
        write must not go on as if whole)."""
        while self._pending:
            self._result()
        self._raise()

    def _result(self) -> None:
        error = self._pending.popleft().exception()
        if error is not None and self._error is None:
            self._error = error

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def settle(self) -> None:
        """Wait for every job, ignoring errors (what failed is simply not done)."""
        while self._pending:
            f = self._pending.popleft()
            if not f.cancelled():
                f.exception()

    def cancel(self) -> None:
        """Drop the jobs not yet started and wait for the running one, ignoring errors."""
        for f in self._pending:
            f.cancel()
        self.settle()

    def close(self) -> None:
        self.cancel()
        self._pool.shutdown(wait=True)
