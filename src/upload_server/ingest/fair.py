"""Worker slots shared fairly between uploads: round-robin between the uploads that wait.

A plain capacity limiter is first come, first served: a 1 GiB upload split into 60 jobs would take every
slot until all 60 had run, and a small upload sent just after it would wait behind all of them. Here each
upload holds a ``Ticket``; when a slot frees it goes to the next upload *in turn* that has a job waiting,
so the jobs of concurrent uploads interleave and a small upload finishes after a couple of job lengths.

Pure Trio, no processes: tests drive it with MockClock.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable

import trio


class Ticket:
    """One upload's place in the rotation; ``started`` is set when its first job gets a slot."""

    def __init__(self, on_first_slot: Callable[[], None] | None = None) -> None:
        self.started = trio.Event()
        self._on_first_slot = on_first_slot
        self._waiters: deque[trio.Event] = deque()

    def _granted(self) -> None:
        if not self.started.is_set():
            self.started.set()
            # Called once, then dropped: a callback bound to the ticket's owner (an upload's session, which
            # holds the ticket) is a reference cycle, left to the cyclic collector until it is broken.
            on_first_slot, self._on_first_slot = self._on_first_slot, None
            if on_first_slot is not None:
                on_first_slot()


class FairLimiter:
    """``slots`` concurrent holders at most; waiting tickets are served round-robin."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running = 0
        #: Tickets with at least one job waiting, in turn order (the next to be served first).
        self._turns: OrderedDict[Ticket, None] = OrderedDict()

    @property
    def waiting(self) -> int:
        return sum(len(ticket._waiters) for ticket in self._turns)

    @contextlib.asynccontextmanager
    async def slot(self, ticket: Ticket | None = None) -> AsyncIterator[None]:
        """Hold one slot for the block; ``ticket`` None is an anonymous one-off (warm-up)."""
        ticket = ticket if ticket is not None else Ticket()
        await self._acquire(ticket)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, ticket: Ticket) -> None:
        if self.running < self.slots and not self._turns:
            # Cancelled here, nothing is taken; once taken, the slot is the caller's (trio's own pattern for
            # an acquire that need not wait). A plain checkpoint after taking it raised Cancelled with the
            # slot held and no ``finally`` yet to give it back.
            await trio.lowlevel.checkpoint_if_cancelled()
            self.running += 1
            ticket._granted()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        granted = trio.Event()
        ticket._waiters.append(granted)
        self._turns.setdefault(ticket)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self._release()  # granted just as we were cancelled: pass the slot on
            else:
                self._forget(ticket, granted)
            raise

    def _forget(self, ticket: Ticket, granted: trio.Event) -> None:
        ticket._waiters.remove(granted)
        if not ticket._waiters:
            self._turns.pop(ticket, None)

    def _release(self) -> None:
        self.running -= 1
        if self._turns:
            ticket, _ = self._turns.popitem(last=False)
            granted = ticket._waiters.popleft()
            if ticket._waiters:
                self._turns[ticket] = None  # to the back of the line
            self.running += 1
            ticket._granted()
            granted.set()
