"""The OpenAI-compatible HTTP endpoints: chat completions (text and audio, streamed or not), transcriptions, models.

See ``docs/serving.md`` for what each field does here. Everything that can be slow for a single request (reading the
body, decoding audio and images, the processor) runs off the event loop and off the engine thread, so one slow upload
neither blocks other clients nor the decoding steps.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from ..processing_mini_omni2 import load_image
from ..token_layout import OUTPUT_ASR, OUTPUT_SPEECH, OUTPUT_TEXT
from .audio import (
    OUTPUT_AUDIO_FORMATS,
    b64decode,
    b64encode,
    decode_audio,
    float_to_pcm16,
    to_model_rate,
    wav_bytes,
)
from .bridge import AsyncJob
from .errors import APIError, invalid, model_not_found, server_error, shutting_down
from .prompts import Turn, build_prompt, decode_settings
from .worker import JobDone

if TYPE_CHECKING:
    from .app import ServerState

router = APIRouter()

#: How a finished job's reason reads in the API.
FINISH_REASON = {"eoa": "stop", "eot": "stop", "stopping_criteria": "stop", "length": "length"}
#: Seconds an audio answer's id stays usable in later turns (``messages[].audio.id``).
AUDIO_ID_TTL = 3600
TRANSCRIPTION_FORMATS = ("json", "text")


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def state_of(request: Request) -> "ServerState":
    return request.app.state.server


# ----------------------------------------------------------------------------------------------------------------
# request parsing
# ----------------------------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 past ``limit`` bytes (before reading it when the length is announced)."""
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise APIError(f"the request body is {announced} bytes, over this server's limit of {limit}", 413,
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(f"the request body is over this server's limit of {limit} bytes", 413,
                           code="request_too_large")
    return bytes(body)


async def read_json(request: Request, limit: int) -> dict:
    body = await read_body(request, limit)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def check_model(state: "ServerState", name: Any) -> None:
    if name is None:
        raise invalid("model is required", "model")
    if name != state.model_name:
        raise model_not_found(name, state.model_name)


@dataclass
class RawPart:
    """A content part still encoded (decoded off the loop): kind ``text``, ``audio`` or ``image``."""

    kind: str
    value: Any
    param: str
    fmt: str | None = None


@dataclass
class ChatRequest:
    """A validated chat completions request (content still encoded)."""

    current: list[RawPart]
    history: list[Turn]
    output: str
    audio_format: str | None
    stream: bool
    include_usage: bool
    sampling: dict = field(default_factory=dict)


def _text_of(content: Any, param: str) -> str:
    """The text of a message's content (a string or a list of parts; non-text parts are skipped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of content parts", param)
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{param}[{k}] must be an object with a type", f"{param}[{k}]")
        if part["type"] in ("text", "input_text", "output_text"):
            texts.append(str(part.get("text") or ""))
    return " ".join(t for t in texts if t)


def _current_parts(content: Any, param: str) -> list[RawPart]:
    """The parts of the message being answered: text, at most one ``input_audio`` and at most one ``image_url``."""
    if isinstance(content, str):
        return [RawPart("text", content, param)]
    if not isinstance(content, list) or not content:
        raise invalid(f"{param} must be a string or a non-empty list of content parts", param)
    parts = []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{where} must be an object with a type", where)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.text must be a string", f"{where}.text")
            parts.append(RawPart("text", part["text"], where))
        elif kind == "input_audio":
            audio = part.get("input_audio")
            if not isinstance(audio, dict) or "data" not in audio:
                raise invalid(f"{where}.input_audio must be an object with data and format", f"{where}.input_audio")
            fmt = audio.get("format")
            if fmt is not None and not isinstance(fmt, str):
                raise invalid(f"{where}.input_audio.format must be a string", f"{where}.input_audio.format")
            parts.append(RawPart("audio", audio["data"], f"{where}.input_audio", fmt))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url.startswith("data:"):
                raise invalid(
                    f"{where}.image_url.url must be a data URL (data:image/png;base64,...); this server does not "
                    "fetch images", f"{where}.image_url", "unsupported_image_url",
                )
            parts.append(RawPart("image", url, f"{where}.image_url"))
        else:
            raise invalid(
                f"{where}: content parts of type {kind!r} are not supported; use text, input_audio or image_url",
                f"{where}.type", "unsupported_content_type",
            )
    for kind in ("audio", "image"):
        if sum(p.kind == kind for p in parts) > 1:
            raise invalid(f"{param}: the model takes at most one {kind} per prompt", param, f"too_many_{kind}s")
    return parts


def parse_chat_request(state: "ServerState", body: dict) -> ChatRequest:
    """Validate a chat completions body; every refusal is a 4xx naming the field."""
    check_model(state, body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise invalid(
                f"messages[{k}] must be an object whose role is system, developer, user or assistant",
                f"messages[{k}].role",
            )
    last = messages[-1]
    if last["role"] != "user":
        raise invalid("the last message must be the user's turn to answer", f"messages[{len(messages) - 1}].role")
    current = _current_parts(last.get("content"), f"messages[{len(messages) - 1}].content")
    history = []
    for k, message in enumerate(messages[:-1]):
        role = message["role"]
        if role in ("system", "developer"):
            continue  # the release has no system prompt (docs/serving.md, multi-turn)
        text = _text_of(message.get("content"), f"messages[{k}].content")
        audio = message.get("audio")
        if role == "assistant" and not text and isinstance(audio, dict) and audio.get("id"):
            text = state.audio_transcript(audio["id"], f"messages[{k}].audio.id")
        history.append(Turn(role, text=text))

    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"} or not modalities:
        raise invalid(f"modalities must be ['text'] or ['text', 'audio'], got {modalities!r}", "modalities")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    audio_format = None
    if "audio" in modalities:
        audio = body.get("audio")
        if not isinstance(audio, dict) or "format" not in audio:
            raise invalid("audio output needs audio: {\"voice\": ..., \"format\": \"wav\" | \"pcm16\"}", "audio")
        audio_format = audio["format"]
        if audio_format not in OUTPUT_AUDIO_FORMATS:
            raise invalid(
                f"audio.format {audio_format!r} is not supported; this server speaks "
                f"{' or '.join(OUTPUT_AUDIO_FORMATS)} (24 kHz)", "audio.format", "unsupported_audio_format",
            )
        if stream and audio_format != "pcm16":
            raise invalid("streamed audio is pcm16 (24 kHz); set audio.format to 'pcm16' with stream: true",
                          "audio.format", "unsupported_audio_format")
    n = body.get("n", 1)
    if n != 1:
        raise invalid("n must be 1: one answer per request", "n")
    if body.get("tools"):
        raise invalid("tools are not supported by this model", "tools", "unsupported_parameter")
    if body.get("logprobs"):
        raise invalid("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise invalid("response_format other than text is not supported", "response_format", "unsupported_parameter")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    max_tokens, param = body.get("max_completion_tokens"), "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    return ChatRequest(
        current=current,
        history=history,
        output=OUTPUT_SPEECH if "audio" in modalities else OUTPUT_TEXT,
        audio_format=audio_format,
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
        sampling=dict(
            temperature=body.get("temperature"), top_p=body.get("top_p"), top_k=body.get("top_k"),
            seed=body.get("seed"), max_tokens=max_tokens, max_tokens_param=param, min_tokens=body.get("min_tokens"),
        ),
    )


def decode_current(parts: list[RawPart]) -> Turn:
    """Decode the answered turn's audio (to 16 kHz) and image; runs in a worker thread."""
    texts, audio, image = [], None, None
    for part in parts:
        if part.kind == "text":
            texts.append(part.value)
        elif part.kind == "audio":
            samples, rate = decode_audio(b64decode(part.value, part.param + ".data"), part.fmt, part.param)
            audio = to_model_rate(samples, rate)
        else:
            data = b64decode(part.value, part.param)
            try:
                from PIL import Image

                image = load_image(Image.open(io.BytesIO(data)))
            except Exception as error:  # PIL raises many kinds for unreadable data
                raise invalid(f"could not decode the image of {part.param}: {error}", part.param,
                              "invalid_image") from None
    text = " ".join(t for t in texts if t.strip()) or None
    return Turn("user", text=text, audio=audio, image=image)


# ----------------------------------------------------------------------------------------------------------------
# running a request
# ----------------------------------------------------------------------------------------------------------------
async def start_job(state: "ServerState", current: Turn, history: list[Turn], output: str, sampling: dict,
                    param: str = "messages", duplex=None):
    """Settings, prompt (off the loop) and submission (``duplex``: a realtime session's DuplexSession, for a spoken
    answer that listens for "stop omni"); returns (job, prompt)."""
    settings = decode_settings(
        **sampling, default_max_tokens=state.default_max_tokens, limit_max_tokens=state.max_tokens_limit,
        device=state.device,
    )
    prompt = await asyncio.to_thread(
        build_prompt, state.processor, current, history, output, state.max_history_positions,
        settings.max_new_tokens, param,
    )
    room = state.processor.model_max_length - prompt.length
    if room < 1:
        raise invalid(f"the prompt has {prompt.length} positions, the whole context of the model", param,
                      "context_length_exceeded")
    settings.max_new_tokens = min(settings.max_new_tokens, room)
    inputs = {k: v.to(state.device) for k, v in prompt.inputs.items()}
    job = AsyncJob.submit(state.worker, inputs, settings, duplex=duplex)
    return job, prompt


def usage_of(prompt, done: JobDone, speech: bool) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "text_tokens": prompt.text_tokens,
            "audio_tokens": prompt.audio_positions,
            "image_tokens": prompt.image_positions,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "text_tokens": len(done.text_ids),
            "audio_tokens": done.completion_tokens if speech else 0,
        },
    }


def job_failure(done: JobDone) -> APIError | None:
    """The API error of a job that did not finish (failed, or cancelled by a server shutdown)."""
    if done.finish_reason == "error":
        return server_error(f"decoding failed: {done.error!r}")
    if done.finish_reason == "cancelled":
        return shutting_down()
    return None


class JobStreamingResponse(StreamingResponse):
    """A streamed answer whose job is cancelled however the response ends (the client left, an error): its rows
    leave the batch at the engine's next step."""

    def __init__(self, content: AsyncIterator[str], job: AsyncJob) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


#: The status logged for a request whose client left before its answer (nginx's convention; never received).
CLIENT_CLOSED_REQUEST = 499


async def wait_or_cancel(request: Request, job: AsyncJob, poll: float = 0.25):
    """The job's events and end, or ``None`` if the client disconnected while waiting (the job is then cancelled:
    its rows leave the batch at the next step)."""
    task = asyncio.ensure_future(job.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            job.cancel()
            task.cancel()


async def finished_job(request: Request, job: AsyncJob):
    """A non-streamed answer's events and end; ``None`` if the client left (the job is cancelled); the API error
    raised if the job failed."""
    result = await wait_or_cancel(request, job)
    if result is None:
        return None
    failure = job_failure(result[1])
    if failure is not None:
        raise failure
    return result


# ----------------------------------------------------------------------------------------------------------------
# endpoints
# ----------------------------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = state_of(request)
    body = await read_json(request, state.max_request_bytes)
    chat = parse_chat_request(state, body)
    current = await asyncio.to_thread(decode_current, chat.current)
    job, prompt = await start_job(state, current, chat.history, chat.output, chat.sampling)
    speech = chat.output == OUTPUT_SPEECH
    meta = {"id": new_id("chatcmpl-"), "created": int(time.time()), "model": state.model_name}
    if chat.stream:
        return JobStreamingResponse(stream_chat(state, job, prompt, meta, speech, chat.include_usage), job)
    result = await finished_job(request, job)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    events, done = result
    transcript = state.processor.decode(done.text_ids)
    message: dict[str, Any] = {"role": "assistant", "content": None if speech else transcript, "refusal": None,
                               "annotations": [], "audio": None}
    if speech:
        samples = [e.audio for e in events if e.audio is not None]
        wave = torch.cat(samples).numpy() if samples else np.zeros(0, dtype=np.float32)
        data = wav_bytes(wave, state.sampling_rate) if chat.audio_format == "wav" else float_to_pcm16(wave)
        audio_id = new_id("audio_")
        expires = int(time.time()) + AUDIO_ID_TTL
        state.remember_audio(audio_id, transcript, expires)
        message["audio"] = {"id": audio_id, "data": b64encode(data), "expires_at": expires, "transcript": transcript}
    return {
        **meta,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": FINISH_REASON.get(done.finish_reason, "stop")}],
        "usage": usage_of(prompt, done, speech),
        "system_fingerprint": None,
    }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream_chat(state: "ServerState", job: AsyncJob, prompt, meta: dict, speech: bool,
                      include_usage: bool) -> AsyncIterator[str]:
    """Server-sent chunks as OpenAI streams them: the role, then ``delta.content`` (text) or ``delta.audio``
    (``transcript`` and ``data`` pieces with the answer's audio id; lastly its ``expires_at``), the finish reason,
    the usage (with ``stream_options.include_usage``) and ``[DONE]``."""
    base = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    audio_id = new_id("audio_")

    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": None if speech else "", "refusal": None})
    async for event in job.events():
        if isinstance(event, JobDone):
            break
        if event.text:
            yield chunk({"audio": {"id": audio_id, "transcript": event.text}} if speech else {"content": event.text})
        if speech and event.audio is not None and event.audio.numel():
            yield chunk({"audio": {"id": audio_id, "data": b64encode(float_to_pcm16(event.audio.numpy()))}})
    done = job.done
    failure = job_failure(done)
    if failure is not None:
        yield _sse(failure.body())
        yield "data: [DONE]\n\n"
        return
    if speech:
        expires = int(time.time()) + AUDIO_ID_TTL
        state.remember_audio(audio_id, state.processor.decode(done.text_ids), expires)
        yield chunk({"audio": {"id": audio_id, "expires_at": expires}})
    yield chunk({}, FINISH_REASON.get(done.finish_reason, "stop"))
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage_of(prompt, done, speech)})
    yield "data: [DONE]\n\n"


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request):
    """OpenAI's multipart form: ``file``, ``model``, ``response_format`` (json or text), ``temperature``; the
    A1T1 task (``asr``). ``language`` and ``prompt`` are accepted and ignored (the layout has no slot for them)."""
    state = state_of(request)
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > state.max_request_bytes:
        raise APIError(f"the request body is {announced} bytes, over this server's limit of "
                       f"{state.max_request_bytes}", 413, code="request_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise invalid("transcriptions take a multipart/form-data body (file, model, ...)", "file")
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as error:  # the multipart parser's errors
        raise invalid(f"could not read the form: {error}", "file") from None
    try:
        check_model(state, form.get("model"))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise invalid("file is required (the audio to transcribe)", "file")
        response_format = form.get("response_format") or "json"
        if response_format not in TRANSCRIPTION_FORMATS:
            raise invalid(f"response_format {response_format!r} is not supported; use json or text",
                          "response_format", "unsupported_response_format")
        if str(form.get("stream", "false")).lower() == "true":
            raise invalid("streamed transcriptions are not supported; use /v1/realtime for streaming",
                          "stream", "unsupported_parameter")
        temperature = form.get("temperature")
        try:
            temperature = float(temperature) if temperature not in (None, "") else None
        except ValueError:
            raise invalid(f"temperature must be a number, got {temperature!r}", "temperature") from None
        data = await upload.read()
        if len(data) > state.max_request_bytes:
            raise APIError("the file is over this server's size limit", 413, code="request_too_large")
    finally:
        await form.close()
    samples, rate = await asyncio.to_thread(decode_audio, data, None, "file")
    current = Turn("user", audio=await asyncio.to_thread(to_model_rate, samples, rate))
    job, prompt = await start_job(state, current, [], OUTPUT_ASR, {"temperature": temperature}, param="file")
    result = await finished_job(request, job)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    _events, done = result
    text = state.processor.decode(done.text_ids)
    if response_format == "text":
        return PlainTextResponse(text)
    return {
        "text": text,
        "usage": {"type": "tokens", "input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
                  "total_tokens": done.prompt_tokens + done.completion_tokens},
    }


def model_card(state: "ServerState") -> dict:
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "mini-omni2"}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(state_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    state = state_of(request)
    if model_id != state.model_name:
        raise model_not_found(model_id, state.model_name)
    return model_card(state)


@router.get("/health")
async def health(request: Request):
    return state_of(request).health()


__all__ = ["router", "parse_chat_request", "stream_chat", "FINISH_REASON"]
