"""``mini-omni2 serve --duplex``: the realtime endpoint's spoken answers listen for "stop omni" (docs/duplex.md).

The model's listening row is scripted to say ``irq`` at a known frame of the audio the client appends while the
answer is spoken: the answer stops there, ``response.done`` reports ``cancelled`` with reason ``stop_command`` and
``output_audio_buffer.cleared`` tells the client to stop playing it; the session goes on.
"""

from __future__ import annotations

import time

import numpy as np
import openai
import pytest

from duplex_helpers import ScriptedListener
from mini_omni2.cli import main as cli_main
from mini_omni2.engine_mini_omni2 import LISTEN_CATCH_UP_FRAMES, ListenRule
from mini_omni2.serving.app import create_app
from mini_omni2.serving.background import BackgroundServer
from mini_omni2.tiny import tiny_model
from serving_helpers import NAME, b64, health, wait_until_idle

MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
NOISE = (np.random.default_rng(0).standard_normal(24000 * 2) * 1000).astype("<i2").tobytes()  # 2 s, 24 kHz pcm16


@pytest.fixture(scope="module")
def scripted():
    model = tiny_model(vision=False, codec=True, seed=4)
    # irq at the listening row's 4th frame; 30 ms per step: an answer of 300 steps lasts ~9 s, the client's
    # audio arrives within its first second
    return model, ScriptedListener(model, irq_at=3, step_seconds=0.03, no_eoa=True)


@pytest.fixture(scope="module")
def server(scripted, processor_no_vision):
    model, _ = scripted
    app = create_app(model, processor_no_vision, NAME, codec_noise=False, default_max_tokens=300,
                     duplex=ListenRule(0.5, 1))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         websocket_base_url=server.url.replace("http", "ws") + "/v1")


def ask(connection, text="Tell me a long story."):
    connection.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    connection.response.create()


def events_until(connection, kind: str) -> list:
    events = []
    for event in connection:
        events.append(event)
        if event.type == "error":
            raise AssertionError(f"error event: {event.error}")
        if event.type == kind:
            return events
    raise AssertionError(f"the connection closed before {kind}")


def test_the_stop_command_interrupts_a_spoken_answer(client, server, scripted):
    _, script = scripted
    with client.realtime.connect(model=NAME) as connection:
        created = events_until(connection, "session.created")[-1]
        assert created.session.model_dump()["duplex"] == {"type": "stop_command", "threshold": 0.5, "min_frames": 1,
                                                          "catch_up_frames": LISTEN_CATCH_UP_FRAMES}
        connection.session.update(session=MANUAL)
        events_until(connection, "session.updated")
        script.frames, script.irq_call = 0, None
        ask(connection)
        first = events_until(connection, "response.output_audio.delta")
        response_id = next(e for e in first if e.type == "response.created").response.id
        for start in range(0, len(NOISE), 9600):  # the user speaks while the answer plays: 200 ms pieces
            connection.input_audio_buffer.append(audio=b64(NOISE[start:start + 9600]))
        events = first + events_until(connection, "response.done")
        if not any(e.type == "output_audio_buffer.cleared" for e in events):
            events += events_until(connection, "output_audio_buffer.cleared")
        kinds = [e.type for e in events]
        done = events[kinds.index("response.done")]
        assert done.response.status == "cancelled"
        assert done.response.status_details.reason == "stop_command"
        cleared = events[kinds.index("output_audio_buffer.cleared")]
        assert cleared.model_dump()["response_id"] == response_id
        # nothing of the answer after the interruption, and far less than the 300 steps it would have lasted
        assert "response.output_audio.delta" not in kinds[kinds.index("output_audio_buffer.cleared"):]
        assert done.response.usage.output_tokens < 100
        # the row read frames 0..3 and stopped at the irq: no listening step after the one that heard it (frames
        # after it in that step, if the row was catching up, were fed and not read)
        assert script.irq_call == max(k for k, call in enumerate(script.calls) if call["read"])
        assert script.frames >= 4
        # the session goes on: the next answer is listened to by a fresh row
        script.frames, script.irq_at = 0, None
        ask(connection, "And now a short one.")
        connection.session.update(session={**MANUAL, "max_output_tokens": 8})
        later = events_until(connection, "response.done")
        assert later[-1].response.status in ("completed", "incomplete")
    report = wait_until_idle(server.url)
    assert report["duplex"] is True
    script.irq_at = 3


def test_a_connection_that_leaves_mid_answer_frees_its_rows(client, server, scripted):
    _, script = scripted
    script.frames = 0
    with client.realtime.connect(model=NAME) as connection:
        connection.session.update(session=MANUAL)
        events_until(connection, "session.updated")
        ask(connection)
        events_until(connection, "response.output_audio.delta")
    report = wait_until_idle(server.url)
    assert report["rows_in_use"] == 0


def test_serve_refuses_a_bad_duplex_rule(capsys):
    code = cli_main(["serve", "--model", "tiny-random", "--duplex", "--duplex-threshold", "1.5"])
    assert code == 2
    assert "threshold must be a number in (0, 1), got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("catch_up", [1, 3])
def test_a_row_behind_the_microphone_reads_at_most_duplex_catch_up_frames_a_step(processor_no_vision, catch_up):
    """`--duplex-catch-up-frames N` (create_app(duplex_catch_up_frames=N)): two seconds of audio appended at once
    put the answer's listening row about 20 frames behind; it reads up to N of them a step (1: one a step, never
    catching up), and the session says N."""
    model = tiny_model(vision=False, codec=True, seed=4)
    script = ScriptedListener(model, irq_at=None, step_seconds=0.03, no_eoa=True)
    app = create_app(model, processor_no_vision, NAME, codec_noise=False, default_max_tokens=300,
                     duplex=ListenRule(0.5, 1), duplex_catch_up_frames=catch_up)
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0,
                               websocket_base_url=running.url.replace("http", "ws") + "/v1")
        with client.realtime.connect(model=NAME) as connection:
            created = events_until(connection, "session.created")[-1]
            assert created.session.model_dump()["duplex"]["catch_up_frames"] == catch_up
            connection.session.update(session=MANUAL)
            events_until(connection, "session.updated")
            ask(connection)
            events_until(connection, "response.output_audio.delta")
            connection.input_audio_buffer.append(audio=b64(NOISE))
            deadline = time.monotonic() + 30
            while script.frames < 12 and time.monotonic() < deadline:
                time.sleep(0.05)
            connection.response.cancel()
            events_until(connection, "response.done")
    assert script.frames >= 12
    widths = [call["width"] for call in script.calls if call["read"]]
    assert max(widths) == catch_up


def test_serve_refuses_a_bad_catch_up(capsys, processor_no_vision):
    code = cli_main(["serve", "--model", "tiny-random", "--duplex", "--duplex-catch-up-frames", "0"])
    assert code == 2
    assert "--duplex-catch-up-frames must be an int >= 1, got 0" in capsys.readouterr().err
    model = tiny_model(vision=False, codec=True, seed=4)
    with pytest.raises(ValueError, match="duplex_catch_up_frames must be an int >= 1, got 2.5"):
        create_app(model, processor_no_vision, NAME, duplex=True, duplex_catch_up_frames=2.5)


def test_a_server_without_duplex_says_nothing_of_it(processor_no_vision):
    model = tiny_model(vision=False, codec=True, seed=4)
    state = create_app(model, processor_no_vision, NAME).state.server
    assert state.duplex is None and state.health()["duplex"] is False
    with pytest.raises(TypeError, match="duplex must be a ListenRule, True or None, got str"):
        create_app(model, processor_no_vision, NAME, duplex="yes")


def test_duplex_on_takes_the_models_own_rule_unless_the_command_line_sets_it(processor_no_vision):
    """`--duplex` (create_app(duplex=True)) uses the rule the model was trained with (config.listen_rule);
    --duplex-threshold / --duplex-min-frames replace their part of it."""
    import argparse

    from mini_omni2.cli.serve import add_serve_arguments, duplex_rule

    model = tiny_model(vision=False, codec=True, seed=4)
    model.config.listen_rule = {"threshold": 0.6, "min_frames": 3}
    assert create_app(model, processor_no_vision, NAME, duplex=True).state.server.duplex == ListenRule(0.6, 3)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    rule = lambda *argv: duplex_rule(parser.parse_args(["--model", "m", "--duplex", *argv]), model.config)  # noqa: E731
    assert rule() == ListenRule(0.6, 3)
    assert rule("--duplex-threshold", "0.8") == ListenRule(0.8, 3)
    assert rule("--duplex-min-frames", "1") == ListenRule(0.6, 1)
    assert duplex_rule(parser.parse_args(["--model", "m"]), model.config) is None
    model.config.listen_rule = None
    assert rule() == ListenRule(0.5, 1)  # a model without a rule: the argmax
