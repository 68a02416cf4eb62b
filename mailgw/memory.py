"""The connections a gateway holds, and giving back the memory of closed ones.

A flood of connections that never log in makes the process allocate for each of them
(TLS objects, buffers).  Once they are closed, their objects wait in reference cycles
(protocol and transport) for Python's oldest-generation collection, which may not come
for a long time, and what they freed stays in glibc's heaps, fragmented, so the
process would stay at its peak size.  L{LiveConnections} counts the connections that
went and, once a batch of them has at least halved the connections held since the
last trim (and by at least a batch), collects the cycles and asks the allocator to
return its free pages (C{malloc_trim}), at most every C{min_interval} seconds, so the
gateway's memory follows its load back down [4.10].  Under a steady load (as many connections opening as
closing) nothing is trimmed: the memory is about to be used again, and a full
collection of a busy process costs more than its allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's C{malloc_trim(0)}, or C{None} where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class LiveConnections(Generic[T]):
    """The sessions whose connections are not all gone yet (a set), with the
    memory trim after C{batch} sessions went that leave at most half of the most
    held since the last trim, and at least C{batch} fewer.

    @param clock: schedules the trim (C{delay} seconds after the batch is complete,
        so that one trim covers a whole wave of closes).
    @param trim: the function returning free memory to the system; by default
        glibc's C{malloc_trim(0)} (nothing where there is none).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        batch: int = 64,
        delay: float = 0.5,
        min_interval: float = 2.0,
        trim: Callable[[], object] | None = None,
    ) -> None:
        self._clock = clock
        self._batch = batch
        self._delay = delay
        self._min_interval = min_interval
        self._last = float("-inf")
        self._trim = trim if trim is not None else _malloc_trim()
        self._items: set[T] = set()
        self._gone = 0
        self._peak = 0  # the most items held since the last trim
        self._call: IDelayedCall | None = None
        self._stopped = False
        #: trims done (for tests and the Manhole)
        self.trims = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, item: T) -> None:
        self._items.add(item)
        if len(self._items) > self._peak:
            self._peak = len(self._items)

    def discard(self, item: T) -> None:
        if item not in self._items:
            return
        self._items.discard(item)
        self._gone += 1
        if (
            self._gone >= self._batch
            and 2 * len(self._items) <= self._peak
            and self._peak - len(self._items) >= self._batch
            and self._call is None
            and not self._stopped
        ):
            now = self._clock.seconds()
            due = max(now + self._delay, self._last + self._min_interval)
            self._call = self._clock.callLater(due - now, self._run)

    def _run(self) -> None:
        self._call = None
        self._gone = 0
        self._peak = len(self._items)
        self._last = self._clock.seconds()
        gc.collect()
        if self._trim is not None:
            self._trim()
        self.trims += 1

    def stop(self) -> None:
        """No more trims (the gateway is stopping)."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def freeze_startup_objects() -> int:
    """Take what the start-up made (modules, the configuration, the service tree: some
    hundred thousand objects, none of them garbage) out of the cyclic collector's
    generations (C{gc.freeze}), after one collection of what it left over; returns how
    many objects are frozen. The oldest-generation collections that a busy gateway
    runs every few seconds no longer walk them: measured under the login load of
    bench/, each took 46 instead of 77 ms, a pause of every session [10]. Called
    once per process, when its service tree has started (never in tests' processes,
    whose objects come and go)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
