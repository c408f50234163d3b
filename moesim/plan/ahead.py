"""Work of an ordered sequence done on one worker thread, a few items ahead of its use."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Ahead:
    """``fn(*args)`` for each ``key: args`` of ``items``, in their order, on one worker thread
    that runs at most ``depth`` items ahead of :meth:`take`: the main thread takes each result
    in that order while the worker computes the next. Worth it where ``fn`` spends its time in
    code that releases the GIL (numpy's random draws); results are those of calling ``fn``
    in turn as long as ``fn`` shares no mutable state between items. An exception ``fn``
    raised is raised by :meth:`take` of its item; :meth:`close` cancels what has not started
    (use it as a context manager)."""

    def __init__(
        self, fn: Callable[..., Any], items: dict[Hashable, tuple], depth: int = 2
    ) -> None:
        self._fn, self._items, self._depth = fn, items, depth
        self._order = iter(list(items))
        self._futures: dict[Hashable, Future] = {}
        self._taken: set[Hashable] = set()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moesim-ahead")
        self._fill()

    def _fill(self) -> None:
        while len(self._futures) < self._depth:
            key = next(self._order, None)
            if key is None:
                return
            if key not in self._taken:
                self._futures[key] = self._pool.submit(self._fn, *self._items[key])

    def take(self, key: Hashable) -> Any:
        """``fn(*items[key])``: the worker's result (waited for), or computed here for a key
        taken out of order."""
        self._taken.add(key)
        future = self._futures.pop(key, None)
        self._fill()  # the worker goes on with the next while this one is used
        if future is None:
            return self._fn(*self._items[key])
        return future.result()

    def close(self) -> None:
        """Cancel the items not started; the worker ends after the one it is on."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._order = iter(())
        self._pool.shutdown(wait=False)

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
