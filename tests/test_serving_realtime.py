"""``/v1/realtime``: the OpenAI Realtime API subset, driven by the ``openai`` SDK in both of its generations.

Server VAD (silero) hears espeak speech and answers it; a text item's spoken answer equals ``generate``'s; earlier
turns enter the prompt as documented text segments; ``response.cancel`` and a barge-in stop an answer (its rows
leave the batch) and are reported in ``response.done``; bad events get ``error`` events and the session goes on.
"""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from conftest import espeak_wav
from mini_omni2.serving.app import create_app
from mini_omni2.serving.background import BackgroundServer
from serving_helpers import NAME, assert_same_pcm, b64, pcm24k_of_wav, pcm_of, reference, wait_until_idle

MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
SILENCE = np.zeros(24000, dtype="<i2").tobytes()  # 1 s at 24 kHz


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """'Hello there, what is your name?' as the API's 24 kHz pcm16."""
    return pcm24k_of_wav(espeak_wav("Hello there, what is your name?", tmp_path_factory.mktemp("rt") / "q.wav"))


@pytest.fixture(scope="module")
def server(model, processor):
    app = create_app(model, processor, NAME, codec_noise=False, default_max_tokens=24)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         websocket_base_url=server.url.replace("http", "ws") + "/v1")


def append(connection, pcm: bytes, chunk: int = 9600) -> None:
    """Send audio as a client streams it: 200 ms pieces."""
    for start in range(0, len(pcm), chunk):
        connection.input_audio_buffer.append(audio=b64(pcm[start : start + chunk]))


def until(connection, kind: str, seen: list | None = None):
    """Events up to and including the first of ``kind`` (an error event fails the test unless awaited)."""
    for event in connection:
        if seen is not None:
            seen.append(event)
        if event.type == kind:
            return event
        if event.type == "error":
            raise AssertionError(f"error event: {event.error}")
    raise AssertionError(f"the connection closed before {kind}")


def test_ga_text_item_spoken_answer_equals_generate(client, model, processor):
    with client.realtime.connect(model=NAME) as connection:
        session = until(connection, "session.created").session
        assert session.type == "realtime" and session.audio.output.format.rate == 24000
        connection.session.update(session={**MANUAL, "max_output_tokens": 20})
        until(connection, "session.updated")
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "What is your name?"}]})
        connection.response.create()
        events = []
        done = until(connection, "response.done", events)
    audio = [e.delta for e in events if e.type == "response.output_audio.delta"]
    transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    text, pcm = reference(model, processor, 20, text="What is your name?", output="speech")
    assert transcript == text
    assert_same_pcm(pcm_of(audio), pcm)
    assert done.response.status in ("completed", "incomplete")
    assert done.response.output[0].content[0].transcript == text
    kinds = [e.type for e in events]
    assert kinds.index("response.created") < kinds.index("response.output_audio.delta") < \
        kinds.index("response.output_audio.done") < kinds.index("response.done")


def test_server_vad_hears_speech_and_answers(client, speech):
    with client.realtime.connect(model=NAME) as connection:
        connection.session.update(session={"type": "realtime", "max_output_tokens": 16})
        until(connection, "session.updated")
        append(connection, speech + SILENCE)
        events = []
        started = until(connection, "input_audio_buffer.speech_started", events)
        stopped = until(connection, "input_audio_buffer.speech_stopped", events)
        done = until(connection, "response.done", events)
    kinds = [e.type for e in events]
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    assert 0 <= started.audio_start_ms < stopped.audio_end_ms <= len(speech) * 1000 // 48000 + 1000
    assert stopped.item_id == started.item_id
    assert any(e.type == "response.output_audio.delta" for e in events)
    assert done.response.usage.input_tokens > 20  # the spoken question's audio positions


def test_beta_text_conversation_keeps_earlier_turns(client, model, processor):
    """Beta protocol, text answers; the second prompt holds the first exchange as documented text segments."""
    layout = processor.layout
    encode = lambda s: processor.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    with client.beta.realtime.connect(model=NAME) as connection:
        assert until(connection, "session.created").session.modalities == ["text", "audio"]
        connection.session.update(session={"modalities": ["text"], "turn_detection": None,
                                           "max_response_output_tokens": 10})
        until(connection, "session.updated")
        answers = []
        for question in ("hello world", "What is your name?"):
            connection.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": question}]})
            connection.response.create()
            events = []
            done = until(connection, "response.done", events)
            answers.append(("".join(e.delta for e in events if e.type == "response.text.delta"), done))
    (first, first_done), (second, second_done) = answers
    assert first_done.response.output[0].content[0].text == first
    # the prompt of turn 2, built by hand from the documented pieces: user text segment, assistant answer, question
    user1 = layout.build_prompt("T1T2", text_ids=encode("hello world")).streams
    history = [row[:-1] for row in user1]
    pad = layout.pad_ids().tolist()
    answer_position = pad[:-1] + [layout.answer_t]
    streams, _ = layout.delay_answer(encode(first), None) if first else ([[] for _ in pad], None)
    history = [h + [a] + s for h, a, s in zip(history, answer_position, streams)]
    current = layout.build_prompt("T1T2", text_ids=encode("What is your name?")).streams
    ids = torch.tensor([h + c for h, c in zip(history, current)])[None]
    assert second_done.response.usage.input_tokens == ids.shape[-1]
    out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    assert second == processor.decode(out.text_ids[0])


def test_response_cancel_stops_the_answer_and_frees_its_rows(server, client):
    with client.realtime.connect(model=NAME) as connection:
        connection.session.update(session={**MANUAL, "max_output_tokens": 3000})
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "tell me a story"}]})
        connection.response.create()
        until(connection, "response.output_audio.delta")
        connection.response.cancel()
        done = until(connection, "response.done")
        assert done.response.status == "cancelled"
        assert done.response.status_details.reason == "client_cancelled"
        wait_until_idle(server.url)
        connection.response.cancel()  # nothing to cancel now: an error event, and the session goes on
        assert until(connection, "error").error.code == "response_cancel_not_active"


def test_barge_in_cancels_the_answer(server, client, speech):
    with client.realtime.connect(model=NAME) as connection:
        connection.session.update(session={"type": "realtime", "max_output_tokens": 3000})
        until(connection, "session.updated")
        append(connection, speech + SILENCE)
        until(connection, "response.created")
        until(connection, "response.output_audio.delta")
        append(connection, speech)  # the user talks over the answer
        events = []
        done = until(connection, "response.done", events)
        assert any(e.type == "input_audio_buffer.speech_started" for e in events)
        assert done.response.status == "cancelled"
        assert done.response.status_details.reason == "turn_detected"
    wait_until_idle(server.url)


def test_bad_events_get_error_events_and_the_session_goes_on(client):
    with client.realtime.connect(model=NAME) as connection:
        until(connection, "session.created")
        connection.send({"type": "conversation.item.truncate", "item_id": "x", "content_index": 0,
                         "audio_end_ms": 0})
        assert until_error(connection).code == "unsupported_event"
        connection.input_audio_buffer.append(audio="not base64!")
        assert until_error(connection).code == "invalid_base64"
        connection.session.update(session={"type": "realtime", "audio": {"input": {
            "format": {"type": "audio/pcmu"}}}})
        assert until_error(connection).code == "unsupported_audio_format"
        connection.session.update(session=MANUAL)
        until(connection, "session.updated")
        connection.input_audio_buffer.commit()
        assert until_error(connection).code == "input_audio_buffer_commit_empty"
        connection.response.create()
        assert until_error(connection).code == "no_user_input"
        connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        assert until(connection, "session.updated").session.output_modalities == ["text"]


def until_error(connection):
    for event in connection:
        if event.type == "error":
            return event.error
    raise AssertionError("no error event")


def test_unknown_model_is_refused(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with client.realtime.connect(model="gpt-realtime") as connection:
        assert until_error(connection).code == "model_not_found"
