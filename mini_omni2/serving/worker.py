"""The engine worker: one thread that owns the decoding engine and serves requests from other threads.

The HTTP/WebSocket handlers run in an asyncio loop; decoding runs here, in one background thread, so that every
request in flight shares each decoding step (continuous batching). Submissions and cancellations cross over through
a lock-protected inbox; events go back through each job's ``on_event`` callback (called from the worker thread: the
server turns it into ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..engine_mini_omni2 import DecodeGroup, DecodeSettings, ListenGroup, MiniOmni2Engine, output_kinds
from ..streaming_mini_omni2 import MiniOmni2Streamer, StreamEvent
from ..token_layout import OUTPUT_SPEECH

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The worker's queue of waiting requests is full (the server answers 429)."""


class WorkerStopped(RuntimeError):
    """The worker is shutting down and takes no new requests (the server answers 503)."""


@dataclass
class JobDone:
    """The last event of a job.

    Args:
        finish_reason: ``"eoa"``, ``"eot"``, ``"length"``, ``"stopping_criteria"``, ``"cancelled"`` or ``"error"``.
        prompt_tokens: prompt positions of the request (its row, without padding).
        completion_tokens: decoding steps that belong to the answer.
        text_ids: the answer's text token ids.
        error: the exception when ``finish_reason == "error"``.
    """

    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text_ids: list[int] = field(default_factory=list)
    error: BaseException | None = None


@dataclass(eq=False)  # a job is itself: compared by identity (its inputs are tensors)
class Job:
    """One request: its model inputs (a single request, as the processor builds it), its settings and its sink."""

    inputs: dict[str, torch.Tensor]
    settings: DecodeSettings
    on_event: Callable[[StreamEvent | JobDone], None]
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.perf_counter)
    group: DecodeGroup | None = None
    cancelled: bool = False
    finished: bool = False
    duplex: Any = None  # a DuplexSession: the answer gets a listening row beside it (docs/duplex.md)


class _JobStreamer(MiniOmni2Streamer):
    """Forwards one job's stream events to its sink."""

    def __init__(self, job: Job, tokenizer: Any, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self.job = job

    def on_event(self, event: StreamEvent) -> None:
        if self.job.duplex is not None:
            self.job.duplex.track_answer(event)  # how long the answer plays: how long its listening row listens
        if event.final:
            return  # the worker sends JobDone (with the usage) instead
        self.job.on_event(event)


class EngineWorker:
    """Runs a :class:`MiniOmni2Engine` in a background thread for many concurrent requests.

    Args:
        model: the model (in eval mode, on its device).
        tokenizer: decodes the text deltas (the processor or its tokenizer).
        max_batch_rows: rows decoded per step at most (a spoken answer takes 2 with batch parallel decoding).
        max_queue: requests waiting for a free row at most; beyond, :meth:`submit` raises :class:`QueueFull`.
        share_twin_prefill, slice_head: engine options (both on: the fast path, same tokens).
        codec_noise: SNAC's learned noise in the streamed audio (the release decodes with it).
        streamer_kwargs: options of the per-request :class:`MiniOmni2Streamer` (``stream_stride`` ...).
    """

    def __init__(
        self,
        model,
        tokenizer: Any = None,
        max_batch_rows: int = 16,
        max_queue: int = 64,
        share_twin_prefill: bool = True,
        slice_head: bool = True,
        codec_noise: bool = True,
        streamer_kwargs: dict | None = None,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.engine = MiniOmni2Engine(model, max_rows=max_batch_rows, slice_head=slice_head)
        self.max_queue = max_queue
        self.share_twin_prefill = share_twin_prefill
        self.codec_noise = codec_noise
        self.streamer_kwargs = streamer_kwargs or {}
        self._inbox: list[Job] = []
        self._cancels: list[Job] = []
        self._jobs: list[Job] = []  # taken from the inbox (then handed to the engine), not finished
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._running = False
        self.steps = 0
        self.last_error: BaseException | None = None

    # ----- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "EngineWorker":
        if self._thread is not None:
            return self
        self._accepting = self._running = True
        self._thread = threading.Thread(target=self._loop, name="mini-omni2-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests; let the ones in flight finish for up to ``timeout`` seconds, then cancel them."""
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            for job in self._inbox + self._jobs:
                job.cancelled = True
                self._cancels.append(job)
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout))
            self._thread = None

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._jobs)

    @property
    def queued(self) -> int:
        """Requests not yet decoding: in the inbox or waiting in the engine for rows."""
        with self._lock:
            return len(self._inbox) + len(self._waiting_jobs())

    def _waiting_jobs(self) -> list[Job]:
        """Taken jobs not decoding yet: not handed to the engine yet, or waiting there for rows (lock held)."""
        pending = list(self.engine.pending)  # a snapshot: the engine thread changes the list between steps
        return [job for job in self._jobs if job.group is None or job.group in pending]

    # ----- requests -----------------------------------------------------------------------------------------------
    def submit(self, inputs: dict[str, torch.Tensor], settings: DecodeSettings,
               on_event: Callable[[StreamEvent | JobDone], None], duplex: Any = None) -> Job:
        """Queue one request (the processor's output for a single request); events go to ``on_event``. With
        ``duplex`` (a :class:`~mini_omni2.duplex_mini_omni2.DuplexSession` on this worker's engine) a spoken answer
        gets its listening row, which may interrupt it (the job then ends ``"cancelled"``)."""
        input_ids = inputs.get("input_ids")
        if input_ids is None or input_ids.ndim != 3 or input_ids.shape[0] != 1:
            raise ValueError("submit takes the inputs of exactly one request (input_ids of shape (1, 8, seq))")
        job = Job(inputs=dict(inputs), settings=settings, on_event=on_event, duplex=duplex)
        with self._lock:
            if not self._accepting:
                raise WorkerStopped("the server is shutting down")
            if self._would_wait(job) > self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; try again later")
            self._inbox.append(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel a job (a client left, or asked): its rows leave at the next step; it gets ``JobDone("cancelled")``."""
        with self._lock:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            self._cancels.append(job)
            self._lock.notify_all()

    def wake(self) -> None:
        """New input for a waiting row (microphone frames for a listening row): step now rather than at the next
        poll."""
        with self._lock:
            self._lock.notify_all()

    def _rows_of(self, job: Job) -> int:
        """Rows a request takes: 2 for a spoken answer with batch parallel decoding (its twin), else 1; plus its
        listening row with ``duplex``."""
        kind = output_kinds(self.model.config.token_layout, job.inputs["input_ids"])[0]
        return (2 if kind == OUTPUT_SPEECH and job.settings.batch_parallel else 1) + (job.duplex is not None)

    def _would_wait(self, new: Job) -> int:
        """Requests that would wait for rows if ``new`` joined: the queue (engine's waiting groups, then the inbox,
        then ``new``) admitted in order into the free rows, as the engine admits them."""
        if self.engine.max_rows is None:
            return 0
        free = self.engine.max_rows - self.engine.num_rows
        queue = self._waiting_jobs()
        waiting = 0
        for job in queue + self._inbox + [new]:
            rows = self._rows_of(job)
            if waiting == 0 and rows <= free:
                free -= rows
            else:
                waiting += 1  # the engine admits in order: everything behind a waiting request waits too
        return waiting

    # ----- the thread ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not (self._inbox or self._cancels or self._can_step()):
                    # rows that wait for microphone frames are polled often (wake() also ends the wait)
                    self._lock.wait(timeout=0.01 if self.engine.has_work() else 0.5)
                if not self._running:
                    self._end_listening()
                if not self._running and not self.engine.has_work() and not self._inbox:
                    return
                new, self._inbox = self._inbox, []
                self._jobs.extend(new)  # in the same lock: a job is counted at every moment (queue limit)
                cancels, self._cancels = self._cancels, []
            for job in new:
                self._start(job)
            for job in cancels:
                self._cancel(job)
            if self.engine.has_work():
                try:
                    self.engine.step()
                    self.steps += 1
                except BaseException as error:  # the batch failed: its groups failed with it (engine.step)
                    self.last_error = error
                    logger.exception("decoding step failed")
            self._finish_done()
            if not self._running and not self.engine.has_work():
                return

    def _can_step(self) -> bool:
        return self.engine.has_work() and not self.engine.idle

    def _end_listening(self) -> None:
        """At shutdown: listening rows wait for frames that will not come; end them."""
        for group in self.engine.groups + self.engine.pending:
            if isinstance(group, ListenGroup):
                self.engine.cancel(group)

    def _start(self, job: Job) -> None:
        if job.cancelled:
            self._drop(job, JobDone("cancelled"))
            return
        try:
            streamer = _JobStreamer(job, self.tokenizer, **self.streamer_kwargs)
            job.group = DecodeGroup(
                self.model.config.token_layout, job.inputs, job.settings, streamer=streamer,
                codec=getattr(self.model, "codec", None), share_twin_prefill=self.share_twin_prefill,
                codec_noise=self.codec_noise,
            )
            if job.duplex is not None:  # the listening row, then the answer (duplex_mini_omni2.DuplexSession)
                job.duplex.respond(None, speaking=job.group)
            else:
                self.engine.add(job.group)
        except BaseException as error:  # a request that cannot be decoded fails alone
            self._drop(job, JobDone("error", error=error))

    def _drop(self, job: Job, event: JobDone) -> None:
        """A taken job that never reached the engine ends."""
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)
        self._done(job, event)

    def _cancel(self, job: Job) -> None:
        if job.group is None:
            if not job.finished:
                self._drop(job, JobDone("cancelled"))
            return
        if not job.group.done:
            self.engine.cancel(job.group)

    def _finish_done(self) -> None:
        with self._lock:
            done = [job for job in self._jobs if job.group is not None and job.group.done]
            self._jobs = [job for job in self._jobs if job not in done]
        for job in done:
            group = job.group
            if group.error is not None:
                self._done(job, JobDone("error", error=group.error))
                continue
            result = group.result(decode_audio=False)
            prompt = int(job.inputs["attention_mask"].sum()) if "attention_mask" in job.inputs else group.prompt_len
            self._done(job, JobDone(
                finish_reason=result.finish_reasons[0],
                prompt_tokens=prompt,
                completion_tokens=int(result.generated_lengths[0]),
                text_ids=result.text_ids[0].tolist(),
            ))

    def _done(self, job: Job, event: JobDone) -> None:
        job.finished = True
        try:
            job.on_event(event)
        except BaseException:  # a sink that fails must not stop the worker
            logger.exception("a job's event sink failed")


__all__ = ["EngineWorker", "Job", "JobDone", "QueueFull", "WorkerStopped"]
