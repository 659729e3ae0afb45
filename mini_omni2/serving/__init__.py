"""Serving Mini-Omni2: the engine worker (many requests, one decoding batch) and the OpenAI-compatible server."""

from .worker import EngineWorker, Job, JobDone, QueueFull, WorkerStopped

__all__ = ["EngineWorker", "Job", "JobDone", "QueueFull", "WorkerStopped"]
