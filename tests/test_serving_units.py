"""Serving pieces without a server: the engine worker (queue, cancel, graceful stop), the multi-turn prompt
composition and its bound, and how the OpenAI sampling fields map onto the engine's settings."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mini_omni2.engine_mini_omni2 import DecodeSettings, Sampling
from mini_omni2.serving import EngineWorker, JobDone, QueueFull, WorkerStopped
from mini_omni2.serving.errors import APIError
from mini_omni2.serving.prompts import Turn, assistant_segment, build_prompt, decode_settings, history_streams

from conftest import sine


class Sink:
    """Collects a job's events; ``wait()`` returns its JobDone."""

    def __init__(self):
        self.events, self.finished = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, JobDone):
            self.finished.set()

    def wait(self, timeout: float = 60.0) -> JobDone:
        assert self.finished.wait(timeout), "the job did not finish"
        return self.events[-1]


def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


GREEDY = DecodeSettings(text=Sampling(do_sample=False), max_new_tokens=10)


def test_worker_answers_cancels_queues_and_stops(model, processor):
    worker = EngineWorker(model, processor, max_batch_rows=1, max_queue=1, codec_noise=False).start()
    try:
        alone = model.generate(**processor(text="hello world", output="text"), max_new_tokens=10, do_sample=False)
        done = Sink()
        worker.submit(processor(text="hello world", output="text"), GREEDY, done)
        assert done.wait().text_ids == alone.text_ids[0].tolist()

        long = Sink()
        job = worker.submit(processor(text="tell me a story", output="text"),
                            DecodeSettings(text=Sampling(do_sample=False), max_new_tokens=100000,
                                           min_new_tokens=100000), long)  # never ends on its own
        until(lambda: worker.engine.num_rows == 1)  # the long answer holds the one row
        waiting = Sink()
        worker.submit(processor(text="hello", output="text"), GREEDY, waiting)  # waits for the one row
        until(lambda: worker.queued == 1)
        with pytest.raises(QueueFull):
            worker.submit(processor(text="hello", output="text"), GREEDY, Sink())
        worker.cancel(job)
        assert long.wait().finish_reason == "cancelled"
        assert waiting.wait().finish_reason in ("eot", "length")  # it got the row once the cancelled job left
        with pytest.raises(ValueError, match="exactly one request"):
            worker.submit(processor(text=["a b", "c d"], output="text"), GREEDY, Sink())
    finally:
        worker.stop(timeout=0.0)
    with pytest.raises(WorkerStopped):
        worker.submit(processor(text="hello", output="text"), GREEDY, Sink())


def test_worker_stop_cancels_what_does_not_finish_in_time(model, processor):
    worker = EngineWorker(model, processor, codec_noise=False).start()
    sink = Sink()
    worker.submit(processor(text="tell me a story", output="speech"),
                  DecodeSettings(text=Sampling(do_sample=False), max_new_tokens=100000, min_new_tokens=100000), sink)
    worker.stop(timeout=0.2)
    assert sink.wait(5).finish_reason == "cancelled"


def test_history_is_text_segments_of_the_layout(processor):
    layout = processor.layout
    encode = lambda s: processor.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    turns = [Turn("user", text="hello world"), Turn("assistant", text="my name is Omni"),
             Turn("user", audio=sine(0.5)), Turn("assistant", text="")]
    rows = history_streams(processor, turns, max_positions=10_000)
    user_ids, answer_ids = encode("hello world"), encode("my name is Omni")
    text = rows[layout.text_stream]
    assert text == [layout.input_t, *user_ids, layout.eot, layout.answer_t, *answer_ids, layout.eot]
    for i in range(layout.num_audio_layers):
        assert set(rows[i]) == {layout.layershift(layout.pad_a, i)}
    assert assistant_segment(layout, answer_ids)[layout.text_stream][0] == layout.answer_t
    # bounded: the oldest whole turns go first
    kept = history_streams(processor, turns, max_positions=len(answer_ids) + 2)
    assert kept[layout.text_stream] == [layout.answer_t, *answer_ids, layout.eot]
    assert history_streams(processor, turns, max_positions=3)[0] == []


def test_prompt_with_history_shifts_the_features_along(processor):
    history = [Turn("user", text="hello world"), Turn("assistant", text="my name is Omni")]
    alone = build_prompt(processor, Turn("user", audio=sine(0.5)), [], "speech")
    prompt = build_prompt(processor, Turn("user", audio=sine(0.5), text="what is this?"), history, "speech")
    shift = prompt.length - alone.length
    assert shift == prompt.history_positions > 0
    for name in ("input_ids", "audio_feature_mask"):
        assert torch.equal(prompt.inputs[name][..., -alone.length:], alone.inputs[name])
    assert not prompt.inputs["audio_feature_mask"][0, :shift].any()
    assert prompt.inputs["attention_mask"].all()
    # the text beside the audio became the last history segment
    text = prompt.inputs["input_ids"][0, processor.layout.text_stream, :shift].tolist()
    assert processor.decode(text).endswith("what is this?")
    with pytest.raises(APIError, match="nothing to answer"):
        build_prompt(processor, Turn("user", text="  "), [], "text")


def test_sampling_fields_map_onto_the_release_or_openai_meaning():
    limits = dict(default_max_tokens=100, limit_max_tokens=500)
    release = decode_settings(**limits)
    assert release.text == Sampling() and release.text.greedy and release.max_new_tokens == 100
    assert decode_settings(temperature=0, **limits).text.greedy
    sampled = decode_settings(temperature=0.7, **limits).text
    assert (sampled.do_sample, sampled.temperature, sampled.top_k, sampled.top_p) == (True, 0.7, 0, 1.0)
    nucleus = decode_settings(top_p=0.5, top_k=20, **limits).text
    assert (nucleus.temperature, nucleus.top_k, nucleus.top_p) == (1.0, 20, 0.5)
    assert decode_settings(max_tokens=10_000, **limits).max_new_tokens == 500
    a, b = (decode_settings(temperature=1.0, seed=7, **limits).generator for _ in range(2))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    for bad in (dict(temperature=3), dict(top_p=0), dict(top_k=1.5), dict(max_tokens=0), dict(seed="x")):
        with pytest.raises(APIError) as error:
            decode_settings(**bad, **limits, max_tokens_param="max_tokens")
        assert error.value.status == 400 and error.value.param == next(iter(bad)), error.value.message


def test_serve_command_builds_the_app_and_says_the_weights_are_random(capsys):
    from mini_omni2.cli import build_parser
    from mini_omni2.cli.serve import build_app

    args = build_parser().parse_args(["serve", "--model", "tiny-random", "--max-batch-rows", "4", "--no-codec-noise"])
    state = build_app(args).state.server
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and "model on cpu in " in err
    assert state.model_name == "tiny-random" and state.random_weights and state.worker.engine.max_rows == 4
    assert state.worker.codec_noise is False and state.default_max_tokens == 128


def test_worker_queue_counts_the_rows_a_request_needs(model, processor):
    """A spoken answer takes 2 rows (its twin): with 1 row free it would wait, so a full queue refuses it, while a
    text answer (1 row) still starts at once."""
    worker = EngineWorker(model, processor, max_batch_rows=3, max_queue=0, codec_noise=False).start()
    try:
        long = Sink()
        never_ends = DecodeSettings(text=Sampling(do_sample=False), max_new_tokens=100000, min_new_tokens=100000,
                                    logits_processor=[NoEot(model.layout.eot)])  # the twin stays: 2 rows
        job = worker.submit(processor(text="tell me a story", output="speech"), never_ends, long)
        until(lambda: worker.engine.num_rows == 2)
        with pytest.raises(QueueFull):
            worker.submit(processor(text="hello", output="speech"), GREEDY, Sink())
        text = Sink()
        worker.submit(processor(text="hello", output="text"), GREEDY, text)
        assert text.wait().finish_reason in ("eot", "length")
        worker.cancel(job)
        assert long.wait().finish_reason == "cancelled"
    finally:
        worker.stop(timeout=0.0)


class NoEot:
    """A logits processor that bans eot: the text (and so the twin row) never ends."""

    def __init__(self, eot: int):
        self.eot = eot

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eot] = float("-inf")
        return scores
