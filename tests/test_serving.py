"""The OpenAI-compatible server, end to end: a real uvicorn server on loopback, the official ``openai`` SDK as client.

Greedy answers (codec noise off) must equal what ``generate`` answers for the same request alone, streamed or not,
one client or sixteen at once; bad requests get their 4xx with an OpenAI error body and disturb nobody; a client that
leaves frees its rows; a full queue answers 429; shutdown lets answers in flight finish.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import soundfile
import soxr

from conftest import color_image, espeak_wav
from mini_omni2.serving.app import create_app
from mini_omni2.serving.audio import decode_audio
from mini_omni2.serving.background import BackgroundServer
from serving_helpers import (
    NAME,
    TIE_MARGIN,
    assert_same_pcm,
    health,
    http_request,
    pcm_of,
    png_data_url,
    post_json,
    reference,
    reference_with_margin,
    wait_until_idle,
    wav_b64,
)

SPEECH = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}}


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    return espeak_wav("Hello, what is your name?", tmp_path_factory.mktemp("speech") / "question.wav")


@pytest.fixture(scope="module")
def server(model, processor):
    app = create_app(model, processor, NAME, max_batch_rows=32, max_queue=16, codec_noise=False,
                     default_max_tokens=24, max_request_bytes=4 << 20, random_weights=True)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def announce_large_body(server, path: str, size: int):
    """A request announcing a ``size``-byte body: the server refuses it before reading it."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", path)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(size))
    connection.endheaders(b"{}")
    response = connection.getresponse()
    status, body = response.status, json.loads(response.read())
    connection.close()
    return status, body


def user(content):
    return [{"role": "user", "content": content}]


def collect_stream(stream) -> dict:
    """Transcript, content, audio pieces, finish reason, usage and the audio id of a streamed chat answer."""
    out = {"transcript": "", "content": "", "audio": [], "finish": None, "usage": None, "ids": set(), "expires": None}
    for chunk in stream:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                out["content"] += delta.content
            if delta.audio is not None:
                out["ids"].add(delta.audio.id)
                out["transcript"] += delta.audio.transcript or ""
                if delta.audio.data:
                    out["audio"].append(delta.audio.data)
                if delta.audio.expires_at:
                    out["expires"] = delta.audio.expires_at
            if choice.finish_reason:
                out["finish"] = choice.finish_reason
    return out


# ----------------------------------------------------------------------------------------------------------------
def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    report = health(server.url)
    assert report["status"] == "ok" and report["model"] == NAME and report["random_weights"] is True
    assert report["max_batch_rows"] == 32 and report["max_queue"] == 16
    status, page = http_request(server.url + "/")
    assert status == 200 and "Mini-Omni2 voice" in page and "/static/app.js" in page
    for asset in ("app.js", "worklets.js"):
        assert http_request(server.url + "/static/" + asset)[0] == 200


def test_text_answer_equals_generate(client, model, processor):
    prompt = "What is your name?"
    answer = client.chat.completions.create(model=NAME, messages=user(prompt), max_completion_tokens=12,
                                            temperature=0)
    text, _ = reference(model, processor, 12, text=prompt, output="text")
    message = answer.choices[0].message
    assert message.content == text and message.audio is None
    prompt_len = processor(text=prompt, output="text")["input_ids"].shape[-1]
    assert answer.usage.prompt_tokens == prompt_len
    assert 1 <= answer.usage.completion_tokens <= 12
    assert answer.usage.total_tokens == prompt_len + answer.usage.completion_tokens
    assert answer.choices[0].finish_reason == ("length" if answer.usage.completion_tokens == 12 else "stop")


def test_streamed_speech_equals_generate(client, model, processor):
    """delta.audio.transcript / delta.audio.data as OpenAI streams them; the audio is generate's, sample for sample."""
    prompt = "Tell me a story about a cat"
    stream = client.chat.completions.create(model=NAME, messages=user(prompt), max_completion_tokens=30, stream=True,
                                            stream_options={"include_usage": True}, **SPEECH)
    got = collect_stream(stream)
    text, pcm = reference(model, processor, 30, text=prompt, output="speech")
    assert got["transcript"] == text and got["content"] == ""
    assert_same_pcm(pcm_of(got["audio"]), pcm)
    assert len(got["ids"]) == 1 and got["expires"] is not None
    assert got["finish"] in ("stop", "length")
    assert got["usage"].completion_tokens_details.audio_tokens == got["usage"].completion_tokens


def test_audio_and_image_in_wav_out(client, model, processor, speech_wav):
    """input_audio (wav) + image_url (data URL) -> a spoken answer as a wav file, equal to generate's."""
    image = color_image((0, 128, 255))
    content = [
        {"type": "input_audio", "input_audio": {"data": wav_b64(speech_wav), "format": "wav"}},
        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
    ]
    answer = client.chat.completions.create(model=NAME, messages=user(content), max_completion_tokens=20,
                                            modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    audio = answer.choices[0].message.audio
    wave, rate = soundfile.read(io.BytesIO(base64.b64decode(audio.data)), dtype="int16")
    samples, source_rate = decode_audio(open(speech_wav, "rb").read(), "wav", "file")
    heard = soxr.resample(samples, source_rate, 16000).astype(np.float32)
    text, pcm = reference(model, processor, 20, audio=(heard, 16000), images=image, output="speech")
    assert rate == 24000 and audio.transcript == text
    assert_same_pcm(wave, pcm)
    usage = answer.usage
    assert usage.prompt_tokens_details.image_tokens == processor.layout.num_image_tokens
    assert usage.prompt_tokens_details.audio_tokens > 0


def test_multi_turn_audio_id_enters_as_text(client, model, processor):
    """An earlier assistant turn given by its audio id enters the prompt as its transcript (docs: multi-turn)."""
    first = client.chat.completions.create(model=NAME, messages=user("hello world"), max_completion_tokens=10,
                                           modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    audio = first.choices[0].message.audio
    messages = [
        {"role": "system", "content": "ignored: the release has no system prompt"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "audio": {"id": audio.id}},
        {"role": "user", "content": "What is your name?"},
    ]
    second = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=5, temperature=0)
    same = messages[:2] + [{"role": "assistant", "content": audio.transcript}] + messages[3:]
    again = client.chat.completions.create(model=NAME, messages=same, max_completion_tokens=5, temperature=0)
    assert second.choices[0].message.content == again.choices[0].message.content
    layout = processor.layout
    encode = lambda s: processor.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    history = (len(encode("hello world")) + 2) + (1 + len(encode(audio.transcript)) + 1) if audio.transcript else \
        (len(encode("hello world")) + 2)
    current = len(layout.build_prompt("T1T2", text_ids=encode("What is your name?")))
    assert second.usage.prompt_tokens == history + current
    with pytest.raises(openai.BadRequestError, match="unknown or expired audio id"):
        client.chat.completions.create(model=NAME, messages=[messages[1], {"role": "assistant", "audio": {"id": "x"}},
                                                             messages[3]])


def test_sixteen_concurrent_streams_each_equal_their_answer_alone(client, model, processor):
    """16 clients at once, different prompts and lengths: every stream completes, equal to its request alone."""
    requests, references = [], []
    for k in range(40):  # the first 16 prompts whose greedy answers have no rounding tie (serving_helpers.reference)
        prompt, steps = f"tell me a story number {k}", 8 + len(requests)
        text, pcm, margin = reference_with_margin(model, processor, steps, text=prompt, output="speech")
        if margin > TIE_MARGIN:
            requests.append((prompt, steps))
            references.append((text, pcm))
        if len(requests) == 16:
            break

    def ask(request):
        prompt, steps = request
        return collect_stream(client.chat.completions.create(
            model=NAME, messages=user(prompt), max_completion_tokens=steps, stream=True, temperature=0, **SPEECH))

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, requests))
    for (prompt, steps), (text, pcm), got in zip(requests, references, answers):
        assert got["transcript"] == text, prompt
        assert_same_pcm(pcm_of(got["audio"]), pcm)
        assert got["finish"] in ("stop", "length")


def test_a_client_that_leaves_frees_its_rows(server, client):
    stream = client.chat.completions.create(model=NAME, messages=user("tell me a long story"), stream=True,
                                            max_completion_tokens=3000, **SPEECH)
    for k, _chunk in enumerate(stream):
        if k == 3:
            break
    assert health(server.url)["rows_in_use"] >= 1
    stream.close()  # the client hangs up mid-answer
    steps = wait_until_idle(server.url)["steps"]
    assert health(server.url)["steps"] == steps  # nothing decodes any more


def test_a_client_that_leaves_a_non_streamed_answer_frees_its_rows(server):
    body = json.dumps({"model": NAME, "messages": user("tell me a long story"), "max_completion_tokens": 3000})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while health(server.url)["rows_in_use"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    connection.close()  # the client gives up while the answer is decoding
    wait_until_idle(server.url)


def test_transcriptions(client, model, processor, speech_wav):
    with open(speech_wav, "rb") as f:
        result = client.audio.transcriptions.create(model=NAME, file=f)
    samples, rate = decode_audio(open(speech_wav, "rb").read(), None, "file")
    text, _ = reference(model, processor, 24, audio=(soxr.resample(samples, rate, 16000), 16000), output="asr")
    assert result.text == text
    with open(speech_wav, "rb") as f:
        plain = client.audio.transcriptions.create(model=NAME, file=f, response_format="text")
    assert plain == text


BAD_CHAT = [
    ("unknown model", {"model": "gpt-4o", "messages": user("hi")}, 404, "model_not_found"),
    ("no messages", {"model": NAME}, 400, None),
    ("assistant last", {"model": NAME, "messages": [{"role": "assistant", "content": "hi"}]}, 400, None),
    ("mp3 out", {"model": NAME, "messages": user("hi"), "modalities": ["text", "audio"],
                 "audio": {"voice": "alloy", "format": "mp3"}}, 400, "unsupported_audio_format"),
    ("wav streamed", {"model": NAME, "messages": user("hi"), "stream": True, "modalities": ["text", "audio"],
                      "audio": {"voice": "alloy", "format": "wav"}}, 400, "unsupported_audio_format"),
    ("audio without format", {"model": NAME, "messages": user("hi"), "modalities": ["text", "audio"]}, 400, None),
    ("bad base64", {"model": NAME, "messages": user([{"type": "input_audio", "input_audio": {
        "data": "not base64!", "format": "wav"}}])}, 400, "invalid_base64"),
    ("unreadable audio", {"model": NAME, "messages": user([{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFF nonsense" * 50).decode(), "format": "wav"}}])}, 400, "invalid_audio"),
    ("aac in", {"model": NAME, "messages": user([{"type": "input_audio", "input_audio": {
        "data": "AAAA", "format": "aac"}}])}, 400, "unsupported_audio_format"),
    ("remote image", {"model": NAME, "messages": user([{"type": "image_url", "image_url": {
        "url": "https://example.com/cat.png"}}])}, 400, "unsupported_image_url"),
    ("two audios", {"model": NAME, "messages": user([{"type": "input_audio", "input_audio": {"data": "AAAA",
                     "format": "wav"}}] * 2)}, 400, "too_many_audios"),
    ("hot temperature", {"model": NAME, "messages": user("hi"), "temperature": 5}, 400, None),
    ("n=2", {"model": NAME, "messages": user("hi"), "n": 2}, 400, None),
    ("tools", {"model": NAME, "messages": user("hi"), "tools": [{"type": "function"}]}, 400, "unsupported_parameter"),
]


def test_bad_requests_get_their_4xx_and_spare_the_others(server, client, model, processor, tmp_path):
    """Each bad request gets its status and an OpenAI error body while a good stream runs on, unchanged."""
    result = {}
    good = threading.Thread(target=lambda: result.update(collect_stream(client.chat.completions.create(
        model=NAME, messages=user("hello there"), max_completion_tokens=40, stream=True, temperature=0, **SPEECH))))
    good.start()
    long_wav = tmp_path / "long.wav"
    soundfile.write(str(long_wav), np.zeros(31 * 8000, dtype=np.float32), 8000)
    cases = BAD_CHAT + [
        ("too long audio", {"model": NAME, "messages": user([{"type": "input_audio", "input_audio": {
            "data": wav_b64(long_wav), "format": "wav"}}])}, 400, "audio_too_long"),
    ]
    for name, body, status, code in cases:
        got_status, got = post_json(server.url + "/v1/chat/completions", body)
        assert got_status == status, (name, got)
        assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["message"], name
        if code is not None:
            assert got["error"]["code"] == code, (name, got)
    status, got = http_request(server.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and got["error"]["code"] == "invalid_json"
    status, got = announce_large_body(server, "/v1/chat/completions", 5 << 20)
    assert status == 413 and got["error"]["code"] == "request_too_large"
    status, got = http_request(server.url + "/v1/nowhere")
    assert status == 404 and got["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.transcriptions.create(model=NAME, file=("a.wav", b"RIFF"), response_format="srt")
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"))
    with pytest.raises(openai.BadRequestError, match="could not decode"):
        client.audio.transcriptions.create(model=NAME, file=("a.wav", b"RIFF garbage"))
    good.join(120)
    text, pcm = reference(model, processor, 40, text="hello there", output="speech")
    assert result["transcript"] == text
    assert_same_pcm(pcm_of(result["audio"]), pcm)


def test_full_queue_answers_429_and_shutdown_lets_answers_finish(model, processor):
    app = create_app(model, processor, NAME, max_batch_rows=1, max_queue=0, codec_noise=False)
    running = BackgroundServer(app, graceful_timeout=60).start()
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stream = iter(client.chat.completions.create(model=NAME, messages=user("hello"), max_completion_tokens=60,
                                                 stream=True, stream_options={"include_usage": True}))
    while not any(choice.delta.content for choice in next(stream).choices):
        pass  # the answer is decoding: its row fills the batch
    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model=NAME, messages=user("me too"), max_completion_tokens=5)
    assert error.value.body["code"] == "queue_full"
    stopper = threading.Thread(target=running.stop)
    stopper.start()  # shutdown begins while the answer is in flight
    rest = collect_stream(stream)
    stopper.join(60)
    assert rest["finish"] in ("stop", "length")  # it finished, whole
    assert rest["usage"].completion_tokens == 60 or rest["finish"] == "stop"
    assert app.state.server.worker._thread is None  # the worker stopped after it
