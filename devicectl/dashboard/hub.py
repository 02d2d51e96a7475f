"""Fan-out of view updates to every connected browser.

Each browser stream owns a bounded queue. A browser that falls behind (a tablet asleep with the tab
open) is not allowed to hold memory or slow the others: its queue is dropped and the stream sends a
fresh snapshot instead, which is always correct because updates only describe the latest view.
A browser whose connection does not drain at all is dropped by the event stream's send timeout
(:mod:`.app`), and the number of browsers is capped there too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from devicectl.dashboard.fleet import Update

__all__ = ["Resync", "Subscription", "UpdateHub"]


class Resync:
    """Queued in place of the updates a slow browser missed: send it a snapshot."""


_RESYNC = Resync()


@dataclass(eq=False, slots=True)
class Subscription:
    """One browser's queue. ``closed`` once the hub shuts down."""

    queue: asyncio.Queue[Update | Resync | None]
    closed: bool = field(default=False)

    async def next(self) -> Update | Resync | None:
        """The next update, a Resync, or None once the hub is closed."""
        return await self.queue.get()


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


def _drain(queue: asyncio.Queue[Update | Resync | None]) -> None:
    while not queue.empty():
        queue.get_nowait()
