"""The asyncio side of the engine worker: submit a request, iterate over its events, cancel it."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ..engine_mini_omni2 import DecodeSettings
from ..streaming_mini_omni2 import StreamEvent
from .errors import queue_full, shutting_down
from .worker import EngineWorker, Job, JobDone, QueueFull, WorkerStopped


class AsyncJob:
    """One request decoded by the worker, seen from the event loop.

    The worker calls :meth:`_on_event` from its thread; events cross into the loop with ``call_soon_threadsafe`` and
    wait in an ``asyncio.Queue`` until :meth:`events` yields them. :meth:`cancel` frees the request's rows at the
    worker's next step (a client that left, ``response.cancel``, a barge-in).
    """

    def __init__(self, worker: EngineWorker, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job: Job | None = None
        self.done: JobDone | None = None

    @classmethod
    def submit(cls, worker: EngineWorker, inputs, settings: DecodeSettings, duplex=None) -> "AsyncJob":
        """Queue a request (``duplex``: with a listening row, :meth:`EngineWorker.submit`); a full queue is a 429, a
        stopping worker a 503 (:class:`~.errors.APIError`)."""
        job = cls(worker, asyncio.get_running_loop())
        try:
            job.job = worker.submit(inputs, settings, job._on_event, duplex=duplex)
        except QueueFull as error:
            raise queue_full(str(error)) from None
        except WorkerStopped:
            raise shutting_down() from None
        return job

    def _on_event(self, event: StreamEvent | JobDone) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def events(self) -> AsyncIterator[StreamEvent | JobDone]:
        """The request's stream events, then its :class:`JobDone`."""
        while self.done is None:
            event = await self.queue.get()
            if isinstance(event, JobDone):
                self.done = event
            yield event

    async def result(self) -> tuple[list[StreamEvent], JobDone]:
        """Every event of the request, and its end."""
        events = [event async for event in self.events() if not isinstance(event, JobDone)]
        return events, self.done

    def cancel(self) -> None:
        if self.job is not None and self.done is None:
            self.worker.cancel(self.job)


__all__ = ["AsyncJob"]
