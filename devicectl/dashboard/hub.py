"""Fan-out of view updates to every connected browser.

Each browser stream owns a bounded queue. A browser that falls behind (a tablet asleep with the tab
open) is not allowed to hold memory or slow the others: its queue is dropped and the stream sends a
fresh snapshot instead, which is always correct because updates only describe the latest view.
A browser whose connection does not drain is dropped by the event stream's send timeout
(:mod:`.app`); one that does not read at all, and the caps on browsers, are :mod:`.pages`' job.
A stream told to end (evicted, not reading) gets a :class:`Goodbye` ahead of anything queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from devicectl.dashboard.fleet import Update

__all__ = ["Goodbye", "Resync", "Subscription", "UpdateHub"]


class Resync:
    """Queued in place of the updates a slow browser missed: send it a snapshot."""


_RESYNC = Resync()


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Queued to end one browser's stream, saying why."""

    reason: str


@dataclass(eq=False, slots=True)
class Subscription:
    """One browser's queue. ``closed`` once the hub shuts down."""

    queue: asyncio.Queue[Update | Resync | Goodbye | None]
    closed: bool = field(default=False)
    ending: bool = field(default=False)  # told to end: nothing more is queued for it

    async def next(self) -> Update | Resync | Goodbye | None:
        """The next update, a Resync, a Goodbye, or None once the hub is closed."""
        return await self.queue.get()

    def end(self, reason: str) -> None:
        """End this stream: whatever was queued is dropped, the browser is told why."""
        self.ending = True
        _drain(self.queue)
        self.queue.put_nowait(Goodbye(reason))


class UpdateHub:
    """Broadcasts :class:`Update` s; ``snapshot`` produces the view a new browser starts from."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], *, queue_size: int = 1000) -> None:
        self.snapshot = snapshot
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    @property
    def browsers(self) -> int:
        return len(self._subscriptions)

    def publish(self, updates: list[Update]) -> None:
        for subscription in self._subscriptions:
            if subscription.ending:
                continue
            for update in updates:
                try:
                    subscription.queue.put_nowait(update)
                except asyncio.QueueFull:
                    _drain(subscription.queue)
                    subscription.queue.put_nowait(_RESYNC)
                    break

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        """A queue of updates for one browser, removed when the browser goes away."""
        subscription = Subscription(asyncio.Queue(maxsize=self._queue_size + 1))
        if self._closed:
            subscription.closed = True
            subscription.queue.put_nowait(None)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    def close(self) -> None:
        """End every browser stream (server shutdown): each gets None after its pending updates."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription.closed = True
            if subscription.queue.full():
                _drain(subscription.queue)
            subscription.queue.put_nowait(None)


def _drain(queue: asyncio.Queue[Update | Resync | Goodbye | None]) -> None:
    while not queue.empty():
        queue.get_nowait()
