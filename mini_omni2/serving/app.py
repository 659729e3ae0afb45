"""The FastAPI application: one engine worker shared by the OpenAI-compatible endpoints, the realtime WebSocket and
the browser voice page. ``create_app(model, processor, ...)`` builds it; ``mini-omni2 serve`` runs it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine_mini_omni2 import LISTEN_CATCH_UP_FRAMES, ListenRule, check_catch_up_frames
from .errors import APIError, invalid
from .worker import EngineWorker

STATIC_DIR = Path(__file__).parent / "static"
#: Request bodies larger than this are refused with a 413 (30 s of 48 kHz stereo wav, base64, fits easily).
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
#: Answers ids kept for later turns (``messages[].audio.id``), oldest forgotten first.
AUDIO_STORE_SIZE = 4096


@dataclass
class ServerState:
    """What every endpoint shares: the model, its processor, the engine worker and the server's limits."""

    model: Any
    processor: Any
    worker: EngineWorker
    model_name: str
    default_max_tokens: int
    max_tokens_limit: int
    max_history_positions: int
    max_request_bytes: int
    random_weights: bool = False
    shutdown_timeout: float = 30.0
    duplex: Any = None  # a ListenRule: realtime spoken answers listen for "stop omni" (docs/duplex.md)
    duplex_catch_up_frames: int = LISTEN_CATCH_UP_FRAMES  # frames a listening row reads a step at most
    started: int = field(default_factory=lambda: int(time.time()))
    _audio: OrderedDict = field(default_factory=OrderedDict)
    _vad_model: Any = None
    _vad_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def sampling_rate(self) -> int:
        return int(self.model.codec.sampling_rate) if getattr(self.model, "codec", None) is not None else 24000

    @property
    def can_speak(self) -> bool:
        return getattr(self.model, "codec", None) is not None

    # ----- answers' audio ids -> transcripts, for later turns -----------------------------------------------
    def remember_audio(self, audio_id: str, transcript: str, expires_at: int) -> None:
        self._audio[audio_id] = (transcript, expires_at)
        while len(self._audio) > AUDIO_STORE_SIZE:
            self._audio.popitem(last=False)

    def audio_transcript(self, audio_id: str, param: str) -> str:
        entry = self._audio.get(audio_id)
        if entry is None or entry[1] < time.time():
            raise invalid(f"unknown or expired audio id {audio_id!r}; send the assistant turn's text instead", param,
                          "audio_not_found")
        return entry[0]

    # ----- voice activity --------------------------------------------------------------------------------------
    def vad_model(self):
        """A fresh silero-vad model for one session (loaded once, copied: each session keeps its own state)."""
        with self._vad_lock:
            if self._vad_model is None:
                from silero_vad import load_silero_vad

                self._vad_model = load_silero_vad()
            return copy.deepcopy(self._vad_model)

    def health(self) -> dict:
        worker = self.worker
        return {
            "status": "ok" if worker._accepting else "stopping",
            "model": self.model_name,
            "random_weights": self.random_weights,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "rows_in_use": worker.engine.num_rows,
            "max_batch_rows": worker.engine.max_rows,
            "queued": worker.queued,
            "max_queue": worker.max_queue,
            "active_requests": len(worker._jobs) + len(worker._inbox),
            "steps": worker.steps,
            "duplex": self.duplex is not None,
        }


def create_app(
    model,
    processor,
    model_name: str = "mini-omni2",
    *,
    max_batch_rows: int = 16,
    max_queue: int = 64,
    codec_noise: bool = True,
    default_max_tokens: int = 1024,
    max_tokens_limit: int | None = None,
    max_history_positions: int = 512,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    random_weights: bool = False,
    shutdown_timeout: float = 30.0,
    stream_stride: int = 4,
    duplex: Any = None,
    duplex_catch_up_frames: int = LISTEN_CATCH_UP_FRAMES,
) -> FastAPI:
    """The server application for a loaded ``model`` (eval mode, on its device) and its ``processor``.

    Args:
        model_name: the id clients pass as ``model`` (others get a 404), listed by ``GET /v1/models``.
        max_batch_rows: rows decoded per step at most (a spoken answer takes 2 with batch parallel decoding).
        max_queue: requests waiting for rows at most; more get a 429.
        codec_noise: SNAC's learned noise in the streamed audio (the release's; off makes audio a function of the
            codes, e.g. to compare with ``generate``).
        default_max_tokens: decoding steps of an answer when the request sets none; ``max_tokens_limit``: the most
            a request may ask for (default: the model's context).
        max_history_positions: positions of earlier turns in a prompt at most (``docs/serving.md``, multi-turn).
        max_request_bytes: larger request bodies get a 413.
        random_weights: say so in ``/health`` and on the page (``tiny-random``).
        shutdown_timeout: seconds in-flight answers get to finish at shutdown before they are cancelled.
        stream_stride: codec frames per streamed audio chunk (4 = 341 ms, the release's).
        duplex: a :class:`~mini_omni2.engine_mini_omni2.ListenRule` (or ``True`` for the model's own rule,
            ``ListenRule.for_config``: its ``listen_rule``, else the argmax): spoken
            answers of the realtime endpoint get a listening row that stops them when the user says "stop omni"
            (the model's listening row must be trained for it, docs/duplex.md). Off by default.
        duplex_catch_up_frames: the most microphone frames a listening row reads in one decoding step when
            decoding falls behind real time (``DuplexSession(catch_up_frames=)``; 1: never catch up).
    """
    if duplex is True:
        duplex = ListenRule.for_config(model.config)
    if duplex is not None and not isinstance(duplex, ListenRule):
        raise TypeError(f"duplex must be a ListenRule, True or None, got {type(duplex).__name__}")
    check_catch_up_frames(duplex_catch_up_frames, "duplex_catch_up_frames")
    if duplex is not None:
        model.listen_front_end()  # refuses a model whose listening row cannot hear (codec input without a codec)
    worker = EngineWorker(
        model, processor, max_batch_rows=max_batch_rows, max_queue=max_queue, codec_noise=codec_noise,
        streamer_kwargs={"stream_stride": stream_stride},
    )
    context = processor.model_max_length
    state = ServerState(
        model=model,
        processor=processor,
        worker=worker,
        model_name=model_name,
        default_max_tokens=default_max_tokens,
        max_tokens_limit=max_tokens_limit or context,
        max_history_positions=max_history_positions,
        max_request_bytes=max_request_bytes,
        random_weights=random_weights,
        shutdown_timeout=shutdown_timeout,
        duplex=duplex or None,
        duplex_catch_up_frames=duplex_catch_up_frames,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop, shutdown_timeout)

    app = FastAPI(title="Mini-Omni2", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = state
    _install_error_handlers(app)

    from .openai_api import router
    from .realtime import RealtimeSession

    app.include_router(router)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket):
        await RealtimeSession(state, websocket).run()

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(invalid(f"invalid request: {first.get('msg', error)}", param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        body = APIError(str(error.detail), error.status_code, "invalid_request_error", None, code).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        body = APIError(f"internal error: {error!r}", 500, "server_error", None, "internal_error").body()
        return JSONResponse(body, status_code=500)


__all__ = ["create_app", "ServerState", "DEFAULT_MAX_REQUEST_BYTES", "STATIC_DIR"]
