"""``GET /v1/realtime``: a subset of the OpenAI Realtime API over a WebSocket, in both of its generations.

The generation is chosen per connection: a client that sends the header ``OpenAI-Beta: realtime=v1`` (the ``openai``
SDK's ``client.beta.realtime``) speaks the beta protocol (``response.audio.delta``, ``modalities``,
``input_audio_format`` ...); any other speaks the current one (``client.realtime``: ``session.type = "realtime"``,
``audio.input`` / ``audio.output``, ``response.output_audio.delta`` ...). Audio is base64 pcm16 mono at 24 kHz both
ways; the model hears 16 kHz (resampled with soxr) and speaks at 24 kHz.

A :class:`RealtimeSession` keeps the conversation (its items), the input audio buffer, server-side turn detection
(silero-vad) and at most one response in flight. :meth:`RealtimeSession.interrupt` is the one path that stops an
answer for ``response.cancel``, a barge-in detected by the VAD and a client that leaves: the job is cancelled, its
rows leave the batch at the next step, no more audio is sent, and ``response.done`` reports ``status: "cancelled"``
with the reason. With duplex on (``mini-omni2 serve --duplex``, docs/duplex.md) a spoken answer has a listening row
(a :class:`~mini_omni2.duplex_mini_omni2.DuplexSession` per connection) that hears the appended audio; when it
commits to ``irq`` the answer's rows are cancelled inside the engine's step, the response ends the same way with
reason ``"stop_command"``, and ``output_audio_buffer.cleared`` tells the client to stop playing it (also when the
answer had been generated and was still playing). Then speech no longer barges in by itself: the model decides.
See ``docs/serving.md`` for the events supported and what is ignored.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from ..duplex_mini_omni2 import DuplexEvent, DuplexSession
from ..processing_mini_omni2 import MAX_AUDIO_SECONDS, SAMPLING_RATE, load_image
from ..token_layout import OUTPUT_SPEECH, OUTPUT_TEXT
from .audio import API_PCM_RATE, PCM16Resampler, b64decode, b64encode, float_to_pcm16, pcm16_to_float, to_model_rate
from .bridge import AsyncJob
from .errors import APIError, invalid
from .openai_api import job_failure, start_job
from .prompts import Turn
from .vad import StreamingVAD
from .worker import JobDone

if TYPE_CHECKING:
    from .app import ServerState

logger = logging.getLogger(__name__)

#: OpenAI's server VAD defaults.
DEFAULT_TURN_DETECTION = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "create_response": True,
    "interrupt_response": True,
}
#: Client events this server acts on; others get an ``error`` event naming them.
CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "response.create",
    "response.cancel",
)
#: The smallest committed buffer (OpenAI refuses less than 100 ms too).
MIN_COMMIT_MS = 100


def _id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(10)}"


def _ms(samples: int) -> int:
    return int(samples * 1000 / SAMPLING_RATE)


@dataclass
class Item:
    """A conversation item: a message from the user or the assistant, with what enters the prompt."""

    id: str
    role: str
    turn: Turn
    content: list[dict]
    status: str = "completed"


@dataclass
class Response:
    """The response in flight: its job, its assistant item, and why it was interrupted (if it was)."""

    id: str
    item: Item
    speech: bool
    job: AsyncJob | None = None
    task: asyncio.Task | None = None
    reason: str | None = None  # "client_cancelled", "turn_detected" ...
    transcript: list[str] = field(default_factory=list)
    max_output_tokens: Any = "inf"


class RealtimeSession:
    """One WebSocket connection: its session settings, conversation, input audio buffer and response."""

    def __init__(self, state: "ServerState", websocket: WebSocket) -> None:
        self.state = state
        self.ws = websocket
        self.beta = "realtime=v1" in websocket.headers.get("openai-beta", "")
        self.id = _id("sess_")
        self.speech = state.can_speak  # output modalities: audio (with its transcript) or text
        self.turn_detection: dict | None = dict(DEFAULT_TURN_DETECTION)
        self.instructions = ""
        self.voice = "alloy"
        self.temperature: float | None = None
        self.max_output_tokens: Any = "inf"
        self.transcription: dict | None = None
        self.items: list[Item] = []
        self.response: Response | None = None
        self._send_lock = asyncio.Lock()
        self._closed = False
        # input audio: 16 kHz float32 chunks since the last commit or clear, on a stream clock in samples
        self._resampler = PCM16Resampler()
        self._buffer: list[np.ndarray] = []
        self._buffer_start = 0  # stream position of the buffer's first sample
        self._stream_pos = 0  # stream position after the last appended sample
        self._speech_item: str | None = None  # the item id announced by speech_started
        self._speech_start = 0
        self._vad: StreamingVAD | None = None
        self.duplex: DuplexSession | None = None  # created with the first spoken answer when the server has duplex
        self._duplex_response: Response | None = None  # the answer its listening row belongs to
        self._discard_turn = False  # the speech turn in progress was the stop command: not a question

    # ----- connection ---------------------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        model = self.ws.query_params.get("model")
        if model is not None and model != self.state.model_name:
            await self.error(
                f"The model {model!r} does not exist on this server; it serves {self.state.model_name!r}.",
                code="model_not_found", param="model",
            )
            await self.ws.close(code=1008)
            return
        if self.turn_detection is not None:
            await self._start_vad()
        await self.send({"type": "session.created", "session": self.session()})
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None and message.get("bytes") is not None:
                    text = message["bytes"].decode("utf-8", "replace")
                await self.handle(text)
        except WebSocketDisconnect:
            pass
        finally:
            self._closed = True
            await self.interrupt("client_disconnected", notify=False)
            if self.duplex is not None:
                self.duplex.cancel()

    async def send(self, event: dict) -> None:
        """Send a server event (with a fresh ``event_id``); a closed socket drops it."""
        if self._closed:
            return
        event = {"event_id": _id("event_"), **event}
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(event, separators=(",", ":")))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._closed = True

    async def error(self, message: str, code: str | None = None, param: str | None = None,
                    event_id: str | None = None, type: str = "invalid_request_error") -> None:
        await self.send({"type": "error", "error": {"type": type, "code": code, "message": message, "param": param,
                                                     "event_id": event_id}})

    async def handle(self, text: str) -> None:
        """One client event; any problem with it is an ``error`` event, never a closed connection."""
        try:
            event = json.loads(text)
        except (TypeError, json.JSONDecodeError) as error:
            await self.error(f"the message is not valid JSON: {error}", code="invalid_json")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.error("a client event must be a JSON object with a type", code="invalid_event")
            return
        kind, event_id = event["type"], event.get("event_id")
        handler = {
            "session.update": self.on_session_update,
            "input_audio_buffer.append": self.on_append,
            "input_audio_buffer.commit": self.on_commit,
            "input_audio_buffer.clear": self.on_clear,
            "conversation.item.create": self.on_item_create,
            "response.create": self.on_response_create,
            "response.cancel": self.on_response_cancel,
        }.get(kind)
        if handler is None:
            await self.error(
                f"the client event {kind!r} is not supported by this server; supported: {', '.join(CLIENT_EVENTS)}",
                code="unsupported_event", param="type", event_id=event_id,
            )
            return
        try:
            await handler(event)
        except APIError as error:
            await self.error(error.message, code=error.code, param=error.param, event_id=event_id, type=error.type)
        except Exception as error:  # a bug must not close the session
            logger.exception("realtime event %s failed", kind)
            await self.error(f"internal error: {error!r}", code="internal_error", event_id=event_id,
                             type="server_error")

    # ----- session ------------------------------------------------------------------------------------------------
    def _modalities(self) -> list[str]:
        if self.beta:
            return ["text", "audio"] if self.speech else ["text"]
        return ["audio"] if self.speech else ["text"]

    def session(self) -> dict:
        """The session as the protocol generation describes it (``session.created`` / ``session.updated``); with
        duplex on, ``duplex`` (an extension) says how spoken answers are interrupted."""
        body = self._session()
        rule = self.state.duplex
        if rule is not None:
            body["duplex"] = {"type": "stop_command", "threshold": rule.threshold, "min_frames": rule.min_frames,
                              "catch_up_frames": self.state.duplex_catch_up_frames}
        return body

    def _session(self) -> dict:
        pcm = {"type": "audio/pcm", "rate": API_PCM_RATE}
        if self.beta:
            return {
                "id": self.id, "object": "realtime.session", "model": self.state.model_name,
                "modalities": self._modalities(), "instructions": self.instructions, "voice": self.voice,
                "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                "input_audio_transcription": self.transcription, "turn_detection": self.turn_detection,
                "tools": [], "tool_choice": "auto", "temperature": self.temperature,
                "max_response_output_tokens": self.max_output_tokens,
            }
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.state.model_name,
            "output_modalities": self._modalities(), "instructions": self.instructions,
            "audio": {
                "input": {"format": pcm, "transcription": self.transcription, "noise_reduction": None,
                          "turn_detection": self.turn_detection},
                "output": {"format": pcm, "voice": self.voice, "speed": 1.0},
            },
            "tools": [], "tool_choice": "auto", "max_output_tokens": self.max_output_tokens,
        }

    async def on_session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise invalid("session.update needs a session object", "session")
        if self.beta:
            self._update_beta(session)
        else:
            self._update_ga(session)
        if self.turn_detection is None:
            self._vad = None
        elif self._vad is None:
            await self._start_vad()
        else:  # new thresholds take effect on a fresh detector
            await self._start_vad()
        await self.send({"type": "session.updated", "session": self.session()})

    def _update_ga(self, session: dict) -> None:
        if session.get("type", "realtime") != "realtime":
            raise invalid(f"session.type {session.get('type')!r} is not supported; use 'realtime'", "session.type")
        if "output_modalities" in session:
            self._set_modalities(session["output_modalities"], "session.output_modalities")
        audio = session.get("audio") or {}
        audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
        for where, config in (("audio.input", audio_in), ("audio.output", audio_out)):
            fmt = config.get("format")
            if fmt is not None and (fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", API_PCM_RATE)
                                    != API_PCM_RATE):
                raise invalid(f"session.{where}.format must be audio/pcm at 24000 Hz, got {fmt!r}",
                              f"session.{where}.format", "unsupported_audio_format")
        if "turn_detection" in audio_in:
            self._set_turn_detection(audio_in["turn_detection"], "session.audio.input.turn_detection")
        if "transcription" in audio_in:
            self.transcription = audio_in["transcription"]
        if "voice" in audio_out:
            self.voice = audio_out["voice"]
        self._common(session, "max_output_tokens")

    def _update_beta(self, session: dict) -> None:
        if "modalities" in session:
            self._set_modalities(session["modalities"], "session.modalities")
        for name in ("input_audio_format", "output_audio_format"):
            if session.get(name, "pcm16") != "pcm16":
                raise invalid(f"session.{name} {session[name]!r} is not supported; use 'pcm16' (24 kHz)",
                              f"session.{name}", "unsupported_audio_format")
        if "turn_detection" in session:
            self._set_turn_detection(session["turn_detection"], "session.turn_detection")
        if "input_audio_transcription" in session:
            self.transcription = session["input_audio_transcription"]
        if "voice" in session:
            self.voice = session["voice"]
        if "temperature" in session:
            self.temperature = _temperature(session["temperature"], "session.temperature")
        self._common(session, "max_response_output_tokens")

    def _common(self, session: dict, max_tokens_name: str) -> None:
        if "instructions" in session:
            self.instructions = str(session["instructions"] or "")
        if max_tokens_name in session:
            self.max_output_tokens = _max_tokens(session[max_tokens_name], f"session.{max_tokens_name}")
        if session.get("tools"):
            raise invalid("tools are not supported by this model", "session.tools", "unsupported_parameter")

    def _set_modalities(self, modalities: Any, param: str) -> None:
        if not isinstance(modalities, list) or not modalities or not set(modalities) <= {"text", "audio"}:
            raise invalid(f"{param} must be a list of 'text' and/or 'audio', got {modalities!r}", param)
        speech = "audio" in modalities
        if speech and not self.state.can_speak:
            raise invalid("this model has no codec: it cannot speak; use text output", param)
        self.speech = speech

    def _set_turn_detection(self, value: Any, param: str) -> None:
        if value is None:
            self.turn_detection = None
            return
        if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
            kind = value.get("type") if isinstance(value, dict) else value
            raise invalid(f"{param}: turn detection {kind!r} is not supported; use server_vad or null", param,
                          "unsupported_turn_detection")
        merged = dict(DEFAULT_TURN_DETECTION)
        merged.update({k: v for k, v in value.items() if k in DEFAULT_TURN_DETECTION and v is not None})
        threshold = merged["threshold"]
        if not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise invalid(f"{param}.threshold must be in (0, 1), got {threshold!r}", f"{param}.threshold")
        for name in ("prefix_padding_ms", "silence_duration_ms"):
            if not isinstance(merged[name], int) or merged[name] < 0:
                raise invalid(f"{param}.{name} must be an integer >= 0", f"{param}.{name}")
        self.turn_detection = merged

    async def _start_vad(self) -> None:
        model = await asyncio.to_thread(self.state.vad_model)
        config = self.turn_detection
        self._vad = StreamingVAD(model, threshold=config["threshold"], silence_ms=config["silence_duration_ms"],
                                 offset=self._stream_pos)

    # ----- input audio buffer -------------------------------------------------------------------------------------
    async def on_append(self, event: dict) -> None:
        data = b64decode(event.get("audio"), "audio")
        samples = await asyncio.to_thread(self._resampler, data)
        if samples.size == 0:
            return
        self._buffer.append(samples)
        self._stream_pos += samples.size
        if self.duplex is not None and self.duplex.state == "speaking":  # the answer's listening row hears it
            await asyncio.to_thread(self.duplex.feed, samples, SAMPLING_RATE)
            self.state.worker.wake()
        if self._vad is None:  # manual commits: the buffer keeps the last 30 s (what the model can hear)
            self._keep_last(MAX_AUDIO_SECONDS * SAMPLING_RATE)
            return
        for kind, position in await asyncio.to_thread(self._vad.feed, samples):
            if kind == "start":
                await self._speech_started(position)
            else:
                await self._speech_stopped(position)
        if self._speech_item is None:
            self._trim_buffer()
        elif self._stream_pos - self._buffer_start > MAX_AUDIO_SECONDS * SAMPLING_RATE:
            await self._speech_stopped(self._stream_pos)  # the model hears 30 s: a longer turn is cut here

    def _trim_buffer(self) -> None:
        """Outside speech, keep only the prefix padding that a coming speech start would include."""
        self._keep_last(int(self.turn_detection["prefix_padding_ms"] * SAMPLING_RATE / 1000))

    def _keep_last(self, keep: int) -> None:
        if self._stream_pos - self._buffer_start <= keep:
            return
        audio = self._audio()
        self._buffer = [audio[audio.size - keep:]] if keep else []
        self._buffer_start = self._stream_pos - min(keep, audio.size)

    def _audio(self) -> np.ndarray:
        return np.concatenate(self._buffer) if self._buffer else np.zeros(0, dtype=np.float32)

    async def _speech_started(self, position: int) -> None:
        self._speech_item = _id("item_")
        self._speech_start = position
        self._discard_turn = False
        await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": _ms(position),
                         "item_id": self._speech_item})
        duplex = self.state.duplex is not None  # then the model's listening row decides, not any speech
        if self.response is not None and self.turn_detection.get("interrupt_response", True) and not duplex:
            await self.interrupt("turn_detected")

    async def _speech_stopped(self, position: int) -> None:
        item_id = self._speech_item or _id("item_")
        self._speech_item = None
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": _ms(position),
                         "item_id": item_id})
        if self._discard_turn:  # "stop omni": a command to the answer, not a question
            self._discard_turn = False
            self._buffer, self._buffer_start = [], self._stream_pos
            return
        padding = int(self.turn_detection["prefix_padding_ms"] * SAMPLING_RATE / 1000)
        first = max(self._speech_start - padding - self._buffer_start, 0)
        await self._commit(item_id, self._audio()[first : first + MAX_AUDIO_SECONDS * SAMPLING_RATE])
        if self.turn_detection.get("create_response", True) and self.response is None:
            await self.on_response_create({})

    async def on_commit(self, event: dict) -> None:
        audio = self._audio()
        if _ms(audio.size) < MIN_COMMIT_MS:
            raise invalid(f"the input audio buffer holds {_ms(audio.size)} ms; commit at least {MIN_COMMIT_MS} ms",
                          None, "input_audio_buffer_commit_empty")
        await self._commit(self._speech_item or _id("item_"), audio)
        self._speech_item = None

    async def _commit(self, item_id: str, audio: np.ndarray) -> None:
        self._buffer, self._buffer_start = [], self._stream_pos
        if audio.size > MAX_AUDIO_SECONDS * SAMPLING_RATE:
            raise invalid(f"the committed audio is {audio.size / SAMPLING_RATE:.1f} s; the model hears at most "
                          f"{MAX_AUDIO_SECONDS} s", None, "audio_too_long")
        previous = self.items[-1].id if self.items else None
        item = Item(item_id, "user", Turn("user", audio=audio),
                    [{"type": "input_audio", "audio": None, "transcript": None}])
        self.items.append(item)
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous})
        await self._item_created(item, previous)

    async def on_clear(self, event: dict) -> None:
        self._buffer, self._buffer_start, self._speech_item = [], self._stream_pos, None
        await self.send({"type": "input_audio_buffer.cleared"})

    # ----- conversation -------------------------------------------------------------------------------------------
    def item_dict(self, item: Item) -> dict:
        return {"id": item.id, "object": "realtime.item", "type": "message", "role": item.role,
                "status": item.status, "content": item.content}

    async def _item_created(self, item: Item, previous: str | None) -> None:
        await self.send({"type": "conversation.item.created", "previous_item_id": previous,
                         "item": self.item_dict(item)})

    async def on_item_create(self, event: dict) -> None:
        raw = event.get("item")
        if not isinstance(raw, dict) or raw.get("type", "message") != "message":
            raise invalid("conversation.item.create takes a message item (type 'message')", "item.type",
                          "unsupported_item_type")
        role = raw.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid(f"item.role must be user, assistant or system, got {role!r}", "item.role")
        content = raw.get("content")
        if not isinstance(content, list) or not content:
            raise invalid("item.content must be a non-empty list", "item.content")
        turn = await asyncio.to_thread(_turn_of, role, content)
        item = Item(raw.get("id") or _id("item_"), role, turn,
                    [{k: v for k, v in part.items() if k != "audio"} for part in content])
        previous = self.items[-1].id if self.items else None
        self.items.append(item)
        await self._item_created(item, previous)

    def _prompt_turns(self) -> tuple[Turn, list[Turn]]:
        """The turn to answer (the user items after the last assistant item, merged) and the history before it."""
        last_assistant = max((k for k, item in enumerate(self.items) if item.role == "assistant"), default=-1)
        pending = [item.turn for item in self.items[last_assistant + 1:] if item.role == "user"]
        if not pending:
            raise invalid("there is no user input to respond to: append and commit audio or create a user item",
                          None, "no_user_input")
        texts = [t.text for t in pending if t.text]
        audio = next((t.audio for t in reversed(pending) if t.audio is not None), None)
        image = next((t.image for t in reversed(pending) if t.image is not None), None)
        current = Turn("user", text=" ".join(texts) or None, audio=audio, image=image)
        history = [item.turn for item in self.items[: last_assistant + 1] if item.role in ("user", "assistant")]
        return current, history

    # ----- responses ----------------------------------------------------------------------------------------------
    async def on_response_create(self, event: dict) -> None:
        if self.response is not None:
            raise invalid("a response is already in progress; cancel it first (response.cancel)", None,
                          "conversation_already_has_active_response")
        options = event.get("response") or {}
        if not isinstance(options, dict):
            raise invalid("response must be an object", "response")
        speech = self.speech
        key = "modalities" if self.beta else "output_modalities"
        if key in options:
            keep = self.speech
            self._set_modalities(options[key], f"response.{key}")
            speech, self.speech = self.speech, keep
        max_name = "max_response_output_tokens" if self.beta else "max_output_tokens"
        max_tokens = _max_tokens(options.get("max_output_tokens", options.get(max_name, self.max_output_tokens)),
                                 f"response.{max_name}")
        temperature = _temperature(options["temperature"], "response.temperature") if "temperature" in options \
            else self.temperature
        current, history = self._prompt_turns()
        item = Item(_id("item_"), "assistant", Turn("assistant", text=""),
                    [{"type": self._part_type(speech), "transcript" if speech else "text": ""}], "in_progress")
        response = Response(_id("resp_"), item, speech, max_output_tokens=max_tokens)
        self.response = response  # taken now: a second response.create is refused while this one starts
        duplex = self._duplex_for(response) if speech else None
        try:
            job, _prompt = await start_job(
                self.state, current, history, OUTPUT_SPEECH if speech else OUTPUT_TEXT,
                {"temperature": temperature, "max_tokens": None if max_tokens == "inf" else max_tokens},
                param="conversation", duplex=duplex,
            )
        except BaseException:
            self.response = None
            raise
        response.job = job
        await self.send({"type": "response.created", "response": self.response_dict(response, "in_progress")})
        previous = self.items[-1].id if self.items else None
        self.items.append(item)
        await self.send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0,
                         "item": self.item_dict(item)})
        await self._item_created(item, previous)
        await self.send({"type": "response.content_part.added", "response_id": response.id, "item_id": item.id,
                         "output_index": 0, "content_index": 0, "part": dict(item.content[0])})
        response.task = asyncio.create_task(self._pump(response))
        if response.reason is not None:  # interrupted while it was starting
            job.cancel()

    def _part_type(self, speech: bool) -> str:
        if self.beta:
            return "audio" if speech else "text"
        return "output_audio" if speech else "output_text"

    def _event_name(self, kind: str) -> str:
        """``audio``, ``transcript`` or ``text`` + ``.delta``/``.done`` in this connection's generation."""
        base, _, suffix = kind.partition(".")
        names = {
            "audio": ("response.audio", "response.output_audio"),
            "transcript": ("response.audio_transcript", "response.output_audio_transcript"),
            "text": ("response.text", "response.output_text"),
        }
        return f"{names[base][0 if self.beta else 1]}.{suffix}"

    def response_dict(self, response: Response, status: str, details: dict | None = None,
                      usage: dict | None = None, output: list | None = None) -> dict:
        body = {
            "id": response.id, "object": "realtime.response", "status": status, "status_details": details,
            "output": output or [], "usage": usage, "conversation_id": self.id,
            "max_output_tokens": response.max_output_tokens, "metadata": None,
        }
        modalities = (["text", "audio"] if response.speech else ["text"]) if self.beta else \
            (["audio"] if response.speech else ["text"])
        if self.beta:
            body.update(modalities=modalities, voice=self.voice, output_audio_format="pcm16",
                        temperature=self.temperature)
        else:
            body.update(output_modalities=modalities,
                        audio={"output": {"format": {"type": "audio/pcm", "rate": API_PCM_RATE},
                                          "voice": self.voice}})
        return body

    async def _pump(self, response: Response) -> None:
        """Forward the job's deltas until it ends, then close the response (its ``*.done`` events)."""
        ids = {"response_id": response.id, "item_id": response.item.id, "output_index": 0, "content_index": 0}
        try:
            async for event in response.job.events():
                if isinstance(event, JobDone) or response.reason is not None:
                    continue  # after an interruption nothing more is sent
                if event.text:
                    response.transcript.append(event.text)
                    kind = "transcript.delta" if response.speech else "text.delta"
                    await self.send({"type": self._event_name(kind), **ids, "delta": event.text})
                if response.speech and event.audio is not None and event.audio.numel():
                    data = b64encode(float_to_pcm16(event.audio.numpy()))
                    await self.send({"type": self._event_name("audio.delta"), **ids, "delta": data})
            await self._finish(response, response.job.done)
        except Exception as error:  # never leave a response open
            logger.exception("realtime response failed")
            await self._finish(response, JobDone("error", error=error))

    async def _finish(self, response: Response, done: JobDone) -> None:
        ids = {"response_id": response.id, "item_id": response.item.id, "output_index": 0, "content_index": 0}
        transcript = "".join(response.transcript)
        if done.finish_reason not in ("error", "cancelled") and done.text_ids is not None:
            transcript = self.state.processor.decode(done.text_ids)
        failure = job_failure(done)
        if response.reason is not None:
            status, details = "cancelled", {"type": "cancelled", "reason": response.reason}
        elif failure is not None:
            status = "cancelled" if done.finish_reason == "cancelled" else "failed"
            details = {"type": status, "error": {"type": failure.type, "code": failure.code,
                                                 "message": failure.message}}
        elif done.finish_reason == "length":
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            status, details = "completed", None
        item = response.item
        item.status = "completed" if status == "completed" else "incomplete"
        item.content = [{"type": self._part_type(response.speech),
                         "transcript" if response.speech else "text": transcript}]
        item.turn.text = transcript  # the answer enters later prompts through its text
        if response.speech:
            await self.send({"type": self._event_name("audio.done"), **ids})
            await self.send({"type": self._event_name("transcript.done"), **ids, "transcript": transcript})
        else:
            await self.send({"type": self._event_name("text.done"), **ids, "text": transcript})
        await self.send({"type": "response.content_part.done", **ids, "part": dict(item.content[0])})
        await self.send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0,
                         "item": self.item_dict(item)})
        usage = {"total_tokens": done.prompt_tokens + done.completion_tokens, "input_tokens": done.prompt_tokens,
                 "output_tokens": done.completion_tokens}
        if self.response is response:
            self.response = None
        await self.send({"type": "response.done",
                         "response": self.response_dict(response, status, details, usage, [self.item_dict(item)])})

    # ----- duplex (docs/duplex.md) -----------------------------------------------------------------------------------
    def _duplex_for(self, response: Response) -> DuplexSession | None:
        """The connection's DuplexSession, ready for ``response`` (the previous answer's listening ends)."""
        if self.state.duplex is None:
            return None
        if self.duplex is None:
            loop = asyncio.get_running_loop()

            def on_event(event: DuplexEvent) -> None:  # the worker's thread
                try:
                    loop.call_soon_threadsafe(self._on_duplex_event, event)
                except RuntimeError:  # the loop is closed
                    pass

            self.duplex = DuplexSession(self.state.model, engine=self.state.worker.engine, rule=self.state.duplex,
                                        on_event=on_event,  # the worker's thread starts its answers
                                        catch_up_frames=self.state.duplex_catch_up_frames)
        self.duplex.cancel()  # a previous answer may still be playing: its listening row ends
        self._duplex_response = response
        return self.duplex

    def _on_duplex_event(self, event: DuplexEvent) -> None:
        """The listening row committed to ``irq``: the answer stops (its rows were cancelled in that step)."""
        if event.type != "interrupted" or self._duplex_response is None:
            return
        response, self._duplex_response = self._duplex_response, None
        if self._speech_item is not None:
            self._discard_turn = True
        if self.response is response and response.reason is None:
            response.reason = "stop_command"  # the pump sends nothing more; response.done says why
        asyncio.get_running_loop().create_task(
            self.send({"type": "output_audio_buffer.cleared", "response_id": response.id})
        )

    async def on_response_cancel(self, event: dict) -> None:
        if self.response is None:
            raise invalid("there is no response in progress to cancel", None, "response_cancel_not_active")
        await self.interrupt("client_cancelled")

    async def interrupt(self, reason: str, notify: bool = True) -> None:
        """Stop the response in flight: cancel its job (its rows leave at the engine's next step), send no more of
        it, and report ``response.done`` with ``status: "cancelled"`` and ``reason`` (``client_cancelled``,
        ``turn_detected``, or an interruption of another source). Without ``notify`` (the client left) nothing is
        waited for."""
        response = self.response
        if response is None or response.reason is not None:
            return
        response.reason = reason
        if self.duplex is not None and self._duplex_response is response:
            self._duplex_response = None
            self.duplex.cancel()
        if response.job is not None:
            response.job.cancel()
        if notify and response.task is not None:
            await asyncio.shield(response.task)


# ----- helpers -----------------------------------------------------------------------------------------------------
def _temperature(value: Any, param: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 2.0:
        raise invalid(f"{param} must be a number in [0, 2], got {value!r}", param)
    return float(value)


def _max_tokens(value: Any, param: str):
    if value in (None, "inf"):
        return "inf"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"{param} must be an integer >= 1 or 'inf', got {value!r}", param)
    return value


def _turn_of(role: str, content: list) -> Turn:
    """A conversation item's content parts -> a :class:`Turn` (audio resampled to 16 kHz, images decoded)."""
    texts, audio, image = [], None, None
    for k, part in enumerate(content):
        where = f"item.content[{k}]"
        if not isinstance(part, dict):
            raise invalid(f"{where} must be an object", where)
        kind = part.get("type")
        if kind in ("input_text", "text", "output_text"):
            texts.append(str(part.get("text") or ""))
        elif kind in ("audio", "output_audio") and part.get("transcript"):
            texts.append(str(part["transcript"]))
        elif kind == "input_audio":
            if role != "user":
                raise invalid(f"{where}: input_audio belongs to user items", where)
            if part.get("audio"):
                samples = pcm16_to_float(b64decode(part["audio"], f"{where}.audio"), f"{where}.audio")
                if samples.size > MAX_AUDIO_SECONDS * API_PCM_RATE:
                    raise invalid(f"{where}.audio is over {MAX_AUDIO_SECONDS} s", f"{where}.audio", "audio_too_long")
                audio = to_model_rate(samples, API_PCM_RATE)
            elif part.get("transcript"):
                texts.append(str(part["transcript"]))
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:"):
                raise invalid(f"{where}.image_url must be a data URL", f"{where}.image_url", "unsupported_image_url")
            try:
                from PIL import Image

                image = load_image(Image.open(io.BytesIO(b64decode(url, f"{where}.image_url"))))
            except APIError:
                raise
            except Exception as error:
                raise invalid(f"could not decode the image of {where}: {error}", where, "invalid_image") from None
        else:
            raise invalid(f"{where}: content of type {kind!r} is not supported", f"{where}.type",
                          "unsupported_content_type")
    return Turn(role, text=" ".join(t for t in texts if t) or None, audio=audio, image=image)


__all__ = ["RealtimeSession", "DEFAULT_TURN_DETECTION", "CLIENT_EVENTS"]
