"""Events from the engine's thread to the HTTP server's asyncio loop, handed over in one wake-up per batch.

A decode step ends with an event for every running request; handing each over with its own
`loop.call_soon_threadsafe` wakes the loop (a write to its self-pipe, a turn of the loop, the GIL passed back and
forth) once per request per step. Here the first event of a batch schedules one hand-over and the events that follow
before the loop runs it join that one, so the loop wakes about once per step however many requests are streaming.
"""
from __future__ import annotations

import asyncio
import threading


class Handoff:
    """Puts (queue, item) pairs into asyncio queues of `loop`, from any thread, a batch at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, object]] = []

    def put(self, inbox: asyncio.Queue, item: object) -> None:
        """Queue `item` for `inbox`; the first of a batch asks the loop to deliver them all."""
        with self.lock:
            self.pending.append((inbox, item))
            first = len(self.pending) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop has closed: nothing will deliver these, and later puts must not wait on it
                with self.lock:
                    self.pending.clear()
                raise

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for inbox, item in pending:
            inbox.put_nowait(item)
