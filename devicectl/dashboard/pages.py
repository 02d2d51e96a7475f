"""Which pages (event streams) the dashboard serves: caps, proof of reading, eviction. Sans-I/O.

A client that connects and never reads cannot be told from a reading one by anything TCP shows
the server: the kernels' socket buffers absorb the small writes of a quiet stream for hours, so a
send timeout never fires. So every stream must *prove* that it reads: it is sent a ping carrying a
random token, which only a client that read it can know, and the page answers with that token
(``POST /events/ack``). A stream that leaves a ping unanswered for ``ack_timeout_s`` is dropped.

Admission never favours a stream that has not proved it reads over a new page: when the page cap
(``max_pages``) or the cap per client address (``max_per_address``) is reached, the stream with
the oldest sign of life among those not proven is evicted to make room (a stream still within its
first chance to answer only for a page from an address holding no more streams than its own: else a
crowd reconnecting on its ``bye`` took a new page's place back before the page could answer).
When every stream in the
way reads, the page cap is shared fairly between addresses: a page from an address holding at
least two pages fewer than the address holding the most takes the place of that address's least
recently active page. Otherwise the new page is refused (the caller answers 503, and ``/healthz``
says so). Streams from one address can never take more than ``max_per_address`` slots, so holding
every slot with streams that read takes ``max_pages`` addresses, not ``max_pages /
max_per_address``.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PageSlots", "Refused", "Slot"]

_TOKENS_KEPT = 3  # pings a page may answer late (one in flight while the next is sent)


@dataclass(eq=False, slots=True)
class Slot:
    """One admitted stream. ``end`` is called once if the stream is evicted (with the reason)."""

    address: str
    opened: float
    end: Callable[[str], None] | None = None
    last_ack: float | None = None
    tokens: dict[str, float] = field(default_factory=dict)  # the last pings' tokens → sent at
    waiting_since: float | None = None  # when the oldest ping still unanswered was sent

    def proven(self, now: float, ack_timeout_s: float) -> bool:
        """It has answered a ping, and has left none unanswered for longer than allowed."""
        since = self.waiting_since
        return self.last_ack is not None and (since is None or now - since <= ack_timeout_s)

    def last_sign_of_life(self) -> float:
        return self.last_ack if self.last_ack is not None else self.opened


@dataclass(frozen=True, slots=True)
class Refused:
    """A new page could not be admitted: every stream in its way proves that it reads."""

    reason: str


class PageSlots:
    """The admitted streams, with their counts for ``/healthz`` and the page."""

    def __init__(
        self,
        *,
        max_pages: int,
        max_per_address: int,
        ack_timeout_s: float,
        window_s: float = 60.0,
    ) -> None:
        self.max_pages = max_pages
        self.max_per_address = max_per_address
        self.ack_timeout_s = ack_timeout_s
        self.window_s = window_s  # how long a refusal or a full house is reported as saturation
        self._slots: list[Slot] = []
        self._by_token: dict[str, Slot] = {}
        self.refused = 0
        self.evicted = 0
        self.dropped = 0
        self._last_refused = -math.inf
        self._last_full = -math.inf
        self.version = 0  # changes whenever status() may have changed

    @property
    def open(self) -> int:
        return len(self._slots)

    def __contains__(self, slot: object) -> bool:
        """``slot`` is still admitted (not released, evicted or dropped)."""
        return slot in self._slots

    def admit(self, address: str, now: float) -> Slot | Refused:
        """A slot for a new stream from ``address``, evicting streams if needed (see above)."""
        not_reading = "evicted: a new page needed room, and this one did not show that it reads"
        victims: list[tuple[Slot, str]] = []
        mine = [s for s in self._slots if s.address == address]
        if len(mine) >= self.max_per_address:
            victim = self._least_alive(mine, now)
            if victim is None:
                # Not saturation: pages from every other address are still admitted.
                return self._refuse(
                    f"too many open pages from {address} (at most {self.max_per_address})",
                    now,
                    saturating=False,
                )
            victims.append((victim, not_reading))
        if len(self._slots) - len(victims) >= self.max_pages:
            self._last_full = now
            others = [s for s in self._slots if s not in [v for v, _ in victims]]
            victim = self._least_alive(others, now, newcomer=address)
            if victim is not None:
                victims.append((victim, not_reading))
            else:
                victim = self._fair_share(others, address)
                if victim is None:
                    return self._refuse(f"too many open pages (at most {self.max_pages})", now)
                victims.append((victim, "evicted: a page from an address with fewer pages open "
                                        "needed room"))  # fmt: skip
        for victim, reason in victims:
            self.evicted += 1
            self._remove(victim)
            if victim.end is not None:
                victim.end(reason)
        slot = Slot(address, now)
        self._slots.append(slot)
        if len(self._slots) >= self.max_pages:
            self._last_full = now
        self.version += 1
        return slot

    def release(self, slot: Slot) -> None:
        """The stream has ended (or was evicted or dropped already): its slot is free."""
        if slot in self._slots:
            self._remove(slot)
            self.version += 1

    def ping(self, slot: Slot, now: float) -> str:
        """A new token for ``slot``'s next ping."""
        token = secrets.token_urlsafe(16)
        slot.tokens[token] = now
        self._by_token[token] = slot
        if slot.waiting_since is None:
            slot.waiting_since = now
        while len(slot.tokens) > _TOKENS_KEPT:
            self._by_token.pop(next(iter(slot.tokens)), None)
            del slot.tokens[next(iter(slot.tokens))]
        return token

    def ack(self, token: str, now: float) -> bool:
        """The page answered a ping: it reads. False for a token no open stream is waiting for."""
        slot = self._by_token.get(token)
        if slot is None:
            return False
        sent = slot.tokens[token]
        for older in [t for t, at in slot.tokens.items() if at <= sent]:
            del slot.tokens[older]
            self._by_token.pop(older, None)
        slot.waiting_since = min(slot.tokens.values(), default=None)
        slot.last_ack = now
        return True

    def overdue(self, slot: Slot, now: float) -> bool:
        """``slot`` has left a ping unanswered for longer than ``ack_timeout_s``."""
        since = slot.waiting_since
        return since is not None and now - since > self.ack_timeout_s

    def drop(self, slot: Slot) -> None:
        """``slot``'s stream is being ended for not reading (counted once, if still admitted)."""
        if slot in self._slots:
            self.dropped += 1
            self.release(slot)

    def saturated(self, now: float) -> bool:
        """Full, or lately full or refusing for want of room (not for one address's own cap):
        the next page may evict or be refused."""
        recent = min(now - self._last_full, now - self._last_refused) < self.window_s
        return self.open >= self.max_pages or recent

    def status(self, now: float) -> dict[str, Any]:
        saturated = self.saturated(now)
        counts = f"{self.open} of {self.max_pages} pages open"
        if self.open >= self.max_pages:
            detail = f"pages full: {counts}"
        elif saturated:
            detail = f"pages full in the last minute: {counts}"
        elif self.evicted or self.dropped or self.refused:
            detail = counts
        else:
            detail = ""
        if self.evicted or self.dropped:
            detail += (
                f"; {self.evicted} evicted to make room, {self.dropped} dropped for not reading"
            )
        if self.refused:
            detail += f"; {self.refused} refused"
        return {
            "open": self.open,
            "max": self.max_pages,
            "max_per_address": self.max_per_address,
            "saturated": saturated,
            "evicted": self.evicted,
            "dropped": self.dropped,
            "refused": self.refused,
            "detail": detail,
        }

    @staticmethod
    def _fair_share(slots: list[Slot], address: str) -> Slot | None:
        """The least recently active stream of the address holding the most, if that is at
        least two more than ``address`` holds (one fewer could only swap the two back and
        forth)."""
        held = Counter(s.address for s in slots)
        if not held:
            return None
        top = max(held.values())
        if held[address] > top - 2:
            return None
        crowded = [s for s in slots if held[s.address] == top]
        return min(crowded, key=Slot.last_sign_of_life)

    def _least_alive(
        self, slots: list[Slot], now: float, newcomer: str | None = None
    ) -> Slot | None:
        """The unproven stream with the oldest sign of life. For a ``newcomer`` from another
        address, a stream still within its first chance to answer (never answered, opened less
        than ``ack_timeout_s`` ago) counts only if its address holds at least as many streams as
        the newcomer's: otherwise a crowd of reading streams, evicted one at a time for a new page
        by the fair share, took the new page's place back before its first answer could arrive.
        """
        held = Counter(s.address for s in self._slots) if newcomer is not None else Counter()

        def evictable(s: Slot) -> bool:
            if s.proven(now, self.ack_timeout_s):
                return False
            fresh = s.last_ack is None and now - s.opened <= self.ack_timeout_s
            return newcomer is None or not fresh or held[s.address] >= held[newcomer]

        return min(filter(evictable, slots), key=Slot.last_sign_of_life, default=None)

    def _refuse(self, reason: str, now: float, *, saturating: bool = True) -> Refused:
        self.refused += 1
        if saturating:
            self._last_refused = now
        self.version += 1
        return Refused(reason)

    def _remove(self, slot: Slot) -> None:
        self._slots.remove(slot)
        for token in slot.tokens:
            self._by_token.pop(token, None)
        slot.tokens.clear()
