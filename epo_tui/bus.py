"""The event bus between the worker client and the UI's parts: events fanned out to subscriptions, each
bounded whatever its reader's pace.

Nothing here grows without bound: `Progress` events are coalesced (a slow reader gets the newest state,
never a backlog; the frontier points only the older ones carried are kept) and other events wait in a
bounded deque that drops its oldest entries when full. Everything runs on one asyncio event loop;
nothing is thread-safe. Events are frozen dataclasses, shared between subscribers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

from epo_tui import protocol

SUBSCRIPTION_LIMIT = 1000  # discrete events waiting per subscription
COALESCED = frozenset({protocol.Progress})  # event types of which only the newest pending one is kept
FRONTIER_LIMIT = 1000  # frontier points carried over when progress events are coalesced

EventType = type[protocol.Event]
E = TypeVar("E", bound=protocol.Event)


class BusClosed(Exception):
    """`Subscription.get()` on a closed subscription that has nothing left to deliver."""


def _merge_coalesced(older: protocol.Progress, newer: protocol.Progress) -> protocol.Progress:
    """The newer event, carrying over what only the older one knew.

    A progress event is a snapshot except for `frontier_new` (points that entered the frontier in that
    iteration): replacing it would silently lose frontier points, so those are concatenated (the newest
    FRONTIER_LIMIT kept). A new event: events are shared between subscriptions.
    """
    if not older.frontier_new:
        return newer
    return dataclasses.replace(newer, frontier_new=(older.frontier_new + newer.frontier_new)[-FRONTIER_LIMIT:])


class Subscription:
    """The events one UI part wants, waiting for it to read them; bounded whatever the reader's pace.

    Discrete events wait in arrival order in a deque of at most `limit` entries (when full, the oldest
    is dropped and counted in `dropped`). A `progress` event takes one slot whatever the rate: a newer
    one replaces the pending one's content but keeps its place in the order.
    """

    def __init__(self, bus: Bus, types: Iterable[EventType] | None, limit: int = SUBSCRIPTION_LIMIT):
        if limit < 1:
            raise ValueError("a subscription needs room for at least one event")
        self._bus = bus
        self.types = frozenset(types) if types is not None else None
        self.limit = limit
        self.dropped = 0
        self.closed = False
        self._order = itertools.count()  # arrival positions, to merge the two stores in order
        self._events: deque[tuple[int, protocol.Event]] = deque()
        self._coalesced: dict[EventType, tuple[int, protocol.Event]] = {}  # type -> (first arrival, newest)
        self._latest: dict[EventType, protocol.Event] = {}
        self._wakeup = asyncio.Event()

    def wants(self, type_: EventType) -> bool:
        return self.types is None or type_ in self.types

    @property
    def backlog(self) -> int:
        """Events waiting to be read (at most limit + the number of coalesced types)."""
        return len(self._events) + len(self._coalesced)

    def put(self, event: protocol.Event) -> None:
        """Called by the bus for each event this subscription wants."""
        type_ = type(event)
        self._latest[type_] = event
        position = next(self._order)
        if type_ in COALESCED:
            pending = self._coalesced.get(type_)
            self._coalesced[type_] = (position, event) if pending is None else (
                pending[0], _merge_coalesced(pending[1], event))
        else:
            if len(self._events) >= self.limit:
                self._events.popleft()
                self.dropped += 1
            self._events.append((position, event))
        self._wakeup.set()

    def get_nowait(self) -> protocol.Event | None:
        """The next event, or None when none is waiting (for widgets on a timer)."""
        first = min(self._coalesced.items(), key=lambda item: item[1][0], default=None)
        if first is not None and (not self._events or first[1][0] < self._events[0][0]):
            del self._coalesced[first[0]]
            return first[1][1]
        if self._events:
            return self._events.popleft()[1]
        return None

    async def get(self) -> protocol.Event:
        """The next event, waiting for one; BusClosed once closed and drained."""
        while True:
            event = self.get_nowait()
            if event is not None:
                return event
            if self.closed:
                raise BusClosed("the subscription is closed")
            self._wakeup.clear()
            await self._wakeup.wait()

    def latest(self, type_: type[E]) -> E | None:
        """The newest event of this type seen so far, read or not (for widgets that poll)."""
        return self._latest.get(type_)

    def close(self) -> None:
        """Stops delivery; events already waiting can still be read."""
        if not self.closed:
            self.closed = True
            self._bus.unsubscribe(self)
            self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[protocol.Event]:
        return self

    async def __anext__(self) -> protocol.Event:
        try:
            return await self.get()
        except BusClosed:
            raise StopAsyncIteration from None


class Bus:
    """Fans events out to subscriptions; each keeps its own bounded backlog (see Subscription)."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self._latest: dict[EventType, protocol.Event] = {}
        self.closed = False

    def subscribe(self, types: Iterable[EventType] | None = None, limit: int = SUBSCRIPTION_LIMIT) -> Subscription:
        """A subscription to the events of these types (all when None), from now on."""
        subscription = Subscription(self, types, limit)
        if self.closed:
            subscription.closed = True
        else:
            self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
            subscription.close()

    def publish(self, event: protocol.Event) -> None:
        type_ = type(event)
        self._latest[type_] = event
        for subscription in list(self._subscriptions):
            if subscription.wants(type_):
                subscription.put(event)

    def latest(self, type_: type[E]) -> E | None:
        """The newest event of this type published so far."""
        return self._latest.get(type_)

    def close(self) -> None:
        """Ends every subscription (after it drains); later subscriptions start closed."""
        self.closed = True
        for subscription in list(self._subscriptions):
            subscription.close()
