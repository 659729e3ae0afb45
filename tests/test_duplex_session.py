"""Duplex on the decoding engine (docs/duplex.md): the listening row beside a spoken answer, and DuplexSession.

A scripted listening row (the real tiny model, its listening row's two state logits overwritten per frame) says
``irq`` at a known frame: the answer is cancelled in that very step and nothing generated from it on is streamed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mini_omni2 import DuplexSession
from mini_omni2.engine_mini_omni2 import DecodeGroup, DecodeSettings, ListenGroup, ListenRule, MiniOmni2Engine
from mini_omni2.tiny import tiny_model

from duplex_helpers import ScriptedListener

FRAME = 2048  # samples of one listening frame at 24 kHz = one decoding step


@pytest.fixture
def codec_model():
    return tiny_model(vision=False, codec=True, seed=4)


def speech_inputs(processor, text="tell me a story"):
    return processor(text=text, output="speech")  # a BatchFeature, as users pass it


def settings(max_new_tokens=40):
    # eoa is suppressed so that the answer outlasts the interruption (random weights would end it at random)
    return DecodeSettings(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)


def mic(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 24000)) * 0.05).astype(np.float32)


def talk(session: DuplexSession, audio: np.ndarray, max_steps: int = 400) -> list:
    """Feed the microphone one frame per engine step (real time when decoding keeps up) until the session listens."""
    events = []
    for k in range(max_steps):
        session.feed(audio[k * FRAME:(k + 1) * FRAME], 24000)
        events += session.step()
        if any(e.type == "listening" for e in events):
            return events
    raise AssertionError(f"the session did not go back to listening in {max_steps} steps: {[e.type for e in events]}")


def test_an_irq_cancels_the_answer_in_that_step_and_nothing_after_is_streamed(codec_model, processor_no_vision):
    script = ScriptedListener(codec_model, irq_at=6)
    session = DuplexSession(codec_model, processor_no_vision, settings=settings())
    answer = session.respond(speech_inputs(processor_no_vision))
    events = talk(session, mic(10))
    kinds = [e.type for e in events]
    assert kinds[0] == "speaking" and kinds.count("interrupted") == 1 and kinds[-1] == "listening"
    interrupted = events[kinds.index("interrupted")]
    assert interrupted.frame == 6 and interrupted.probability > 0.99
    assert events[-1].reason == "interrupted"
    # nothing of the answer after the interruption: only the return to listening follows it
    assert kinds[kinds.index("interrupted") + 1:] == ["listening"]
    # the step that heard the irq frame was computed for the speaking rows too, and none of it was kept
    result = answer.result(decode_audio=False)
    assert result.finish_reasons == ["cancelled"]
    assert interrupted.step == int(result.generated_lengths[0])
    listen_calls = [c for c in script.calls if c["read"]]
    assert len(listen_calls) == 7 and all(c["rows"] == 3 for c in listen_calls)  # listening + speech row + twin
    steps_with_speech = [c for c in script.calls if c["rows"] >= 2]
    assert len(steps_with_speech) == interrupted.step  # decoding calls after the prefill, the last one discarded
    # what was streamed is exactly the kept answer
    streamed = [t for e in events if e.type == "text" for t in e.token_ids]
    kept_text = [t for t in result.text_ids[0].tolist()]
    assert streamed == kept_text
    assert session.state == "listening" and not session.engine.has_work()


def test_n_irq_throughout_never_interrupts_and_listening_lasts_the_answer(codec_model, processor_no_vision):
    script = ScriptedListener(codec_model, irq_at=None)
    session = DuplexSession(codec_model, processor_no_vision, settings=settings(24))
    answer = session.respond(speech_inputs(processor_no_vision))
    events = talk(session, mic(30))
    kinds = [e.type for e in events]
    assert "interrupted" not in kinds and kinds[-1] == "listening" and events[-1].reason == "finished"
    result = answer.result(decode_audio=False)
    assert result.finish_reasons == ["length"]
    spoken = int(result.audio_frames[0].shape[0])
    assert session.spoken_frames == spoken > 0
    # the row heard as many frames as the answer spoke: its playback has ended
    listen = session.listen_group.current()
    assert listen is session.listen_group  # 24 steps: no hand-over to a fresh row
    assert listen.heard_total >= spoken and script.frames == listen.heard_total
    audio = [e.audio for e in events if e.type == "audio"]
    assert sum(a.numel() for a in audio) == spoken * FRAME


def test_irq_during_playback_stops_it_without_a_cut_step(codec_model, processor_no_vision):
    """An answer generated faster than it plays: the row still hears the user until the playback ends."""
    ScriptedListener(codec_model, irq_at=3)
    session = DuplexSession(codec_model, processor_no_vision, settings=settings(20))
    answer = session.respond(speech_inputs(processor_no_vision))
    while not answer.done:  # no microphone yet: the row waits, the answer runs to its end
        assert session.step() is not None
    assert session.listen_group.heard == 0 and session.state == "speaking"
    events = talk(session, mic(10))
    interrupted = [e for e in events if e.type == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].step is None and interrupted[0].frame == 3
    assert answer.result(decode_audio=False).finish_reasons == ["length"]


def test_a_long_answer_hands_listening_over_to_fresh_rows(codec_model, processor_no_vision):
    """Rows never grow past window_frames: a fresh row hears the last refeed_frames again, then goes on."""
    script = ScriptedListener(codec_model, irq_at=13)
    session = DuplexSession(codec_model, processor_no_vision, settings=settings(60), window_frames=6,
                            refeed_frames=2)
    session.respond(speech_inputs(processor_no_vision))
    events = []
    for k in range(30):  # distinct frames (frame k: all codes k), one per step
        if session.state == "speaking":
            session.listen_group.push(torch.full((1, 7), k))
        events += session.step()
    rows = session.listen_group.chain()
    # fed frames per row: 6, then 2 refed + 4 new, ...; frames read: 6, 4, 4 (the 14th, frame 13, interrupts)
    assert [r.heard for r in rows] == [6, 4, 4] and [r.context_frames for r in rows] == [0, 2, 2]
    assert [r.first_frame for r in rows] == [0, 6, 10]
    layout = codec_model.config.token_layout
    fed = [f[0] - layout.layershift(0, 0) for f in script.fed_frames]  # the first code of each fed frame
    # each fresh row hears the last two frames again, then goes on
    assert fed == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13]
    assert [e.frame for e in events if e.type == "interrupted"] == [13] and script.frames == 14
    assert all(r.done for r in rows) and not session.engine.has_work()


def test_the_listening_row_waits_without_frames_and_costs_no_forward(codec_model):
    calls = []
    forward = codec_model.forward
    codec_model.forward = lambda **kw: calls.append(1) or forward(**kw)
    engine = MiniOmni2Engine(codec_model)
    listen = engine.add(ListenGroup(codec_model, catch_up_frames=1))  # one frame a step
    engine.step()  # its prefill
    assert len(calls) == 1 and engine.idle
    engine.step()  # nothing to hear: no forward
    assert len(calls) == 1 and listen.heard == 0
    listen.push(torch.zeros(2, 7, dtype=torch.long))
    assert not engine.idle and listen.backlog == 2
    engine.step()
    engine.step()
    assert len(calls) == 3 and listen.heard == 2 and engine.idle
    listen.finish()
    engine.step()
    assert listen.done and not engine.has_work()


def test_a_row_behind_the_microphone_catches_up_and_the_answer_does_not_change(codec_model, processor_no_vision):
    """Decoding slower than real time: frames queue, and the row reads up to catch_up_frames of them in one step
    (the speaking rows are padded in that step, as a waiting row is): the same answer, and the backlog is gone."""
    answers = {}
    for catch_up in (1, 4):
        script = ScriptedListener(codec_model, irq_at=None)
        session = DuplexSession(codec_model, processor_no_vision, settings=settings(12), catch_up_frames=catch_up)
        answer = session.respond(speech_inputs(processor_no_vision))
        session.step()  # the prefill of the answer and its row
        assert session.feed(mic(1), 24000) == 8  # a second of microphone arrives at once (less the codec's lookahead)
        listen = session.listen_group
        session.step()
        session.step()
        session.step()
        assert listen.heard == min(8, 3 * catch_up) and listen.backlog == 8 - listen.heard
        assert [c["width"] for c in script.calls if c["read"]] == ([1, 1, 1] if catch_up == 1 else [4, 4])
        while not answer.done:
            session.step()
        answers[catch_up] = answer.result(decode_audio=False)
        codec_model.forward = script.forward
        session.cancel()
    assert torch.equal(answers[1].text_ids[0], answers[4].text_ids[0])
    assert torch.equal(answers[1].audio_frames[0], answers[4].audio_frames[0])


def test_a_catching_up_step_computes_only_what_each_row_reads(codec_model, processor_no_vision):
    """The sliced head of a step four frames wide: the answer's rows get their text or audio columns at the last
    column only, and the listening row its two state logits (n_irq, irq) at each of its four frames; never the
    152,000-wide text vocabulary a frame."""
    outputs = []
    forward = codec_model.forward

    def spy(**kwargs):
        out = forward(**kwargs)
        outputs.append((kwargs, out))
        return out

    codec_model.forward = spy
    try:
        session = DuplexSession(codec_model, processor_no_vision, settings=settings(12))
        session.respond(speech_inputs(processor_no_vision))
        session.step()  # the prefill of the answer and its row
        session.feed(mic(1), 24000)  # 8 frames at once
        outputs.clear()
        session.step()
    finally:
        codec_model.forward = forward
    (kwargs, out), = outputs
    layout = codec_model.config.token_layout
    assert kwargs["input_ids"].shape[-1] == 4 and kwargs["logits_to_keep"] == 1
    assert kwargs["listen_logits_rows"].tolist() == [0]  # the listening row, then the answer's two rows
    assert kwargs["audio_logits_rows"].tolist() == [1] and kwargs["text_logits_rows"].tolist() == [2]
    assert out.text_logits.shape == (1, 1, layout.text_vocab_size)
    assert out.audio_logits.shape == (1, 7, 1, layout.audio_vocab_size)
    assert out.listen_logits.shape == (1, 4, 2)
    listen = session.listen_group
    expected = layout.irq_probability(out.listen_logits[0])
    assert listen.probabilities == pytest.approx(expected.tolist())


def test_an_irq_inside_a_catching_up_step_cuts_the_answer_in_that_step(codec_model, processor_no_vision):
    """The frames of a step are read in order: the first that commits interrupts, and those after it are not read."""
    script = ScriptedListener(codec_model, irq_at=5)
    session = DuplexSession(codec_model, processor_no_vision, settings=settings())
    answer = session.respond(speech_inputs(processor_no_vision))
    events = session.step()
    assert session.feed(mic(1), 24000) == 8  # eight frames at once: read 4, then 2 (the sixth interrupts), not 2
    events += session.step() + session.step()
    interrupted = [e for e in events if e.type == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].frame == 5 and session.listen_group.heard == 6
    assert [c["width"] for c in script.calls if c["read"]] == [4, 4]
    result = answer.result(decode_audio=False)
    # kept: the prefill's step and the first catching-up step; the second was computed and dropped
    assert result.finish_reasons == ["cancelled"] and interrupted[0].step == int(result.generated_lengths[0]) == 2
    streamed = [t for e in events if e.type == "text" for t in e.token_ids]
    assert streamed == result.text_ids[0].tolist() and events[-1].type == "listening"
    assert not session.engine.has_work()


def test_listening_rows_refuse_bad_frames_and_rules(codec_model):
    listen = ListenGroup(codec_model)
    with pytest.raises(ValueError, match=r"codec frames of shape \(n, 7\)"):
        listen.push(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="codec codes in"):
        listen.push(torch.full((1, 7), 10_000))
    with pytest.raises(ValueError, match="threshold must be a number in"):
        ListenRule(threshold=1.5)
    with pytest.raises(ValueError, match="min_frames must be an int"):
        ListenRule(min_frames=0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"catch_up_frames must be an int >= 1, got {bad!r}"):
            ListenGroup(codec_model, catch_up_frames=bad)
    assert ListenRule(0.7, 2).first_irq([0.8, 0.1, 0.75, 0.9, 0.95]) == 3


def test_a_session_refuses_a_text_answer_and_a_second_answer(codec_model, processor_no_vision):
    session = DuplexSession(codec_model, processor_no_vision, settings=settings())
    with pytest.raises(ValueError, match="a duplex answer is spoken"):
        session.respond(dict(processor_no_vision(text="hi", output="text")))
    session.respond(speech_inputs(processor_no_vision))
    with pytest.raises(RuntimeError, match="already answering"):
        session.respond(speech_inputs(processor_no_vision))
    session.cancel()
    events = session.events()
    assert [e.type for e in events] == ["speaking", "listening"] and events[-1].reason == "cancelled"
    while session.engine.has_work():
        session.step()


def test_the_listening_row_runs_beside_other_requests(codec_model, processor_no_vision):
    """Continuous batching: another request joins and leaves while a duplex answer speaks and listens."""
    ScriptedListener(codec_model, irq_at=8)
    session = DuplexSession(codec_model, processor_no_vision, settings=settings())
    session.respond(speech_inputs(processor_no_vision))
    other = DecodeGroup(codec_model.config.token_layout, dict(processor_no_vision(text="hi", output="text")),
                        DecodeSettings(max_new_tokens=5, min_new_tokens=5))
    session.engine.add(other)
    events = talk(session, mic(10))
    assert other.done and other.result(decode_audio=False).finish_reasons == ["length"]
    assert [e.frame for e in events if e.type == "interrupted"] == [8]


def test_speaking_rows_of_these_tests_never_feed_n_irq(codec_model, processor_no_vision):
    """What lets ScriptedListener tell the listening row apart from the speaking rows."""
    out = codec_model.generate(**speech_inputs(processor_no_vision), max_new_tokens=60, min_new_tokens=60,
                               decode_audio=False)
    assert codec_model.config.token_layout.n_irq not in out.sequences[:, -1].flatten().tolist()


def test_sessions_and_rows_use_the_models_own_rule(codec_model, processor_no_vision):
    """A trained model keeps the rule chosen on validation (config.listen_rule): a session, a listening row and the
    engine use it unless given another. One irq frame interrupts under the argmax, not under a two-frame rule."""
    original = codec_model.forward
    assert DuplexSession(codec_model, processor_no_vision).rule == ListenRule(0.5, 1)  # none kept: the argmax
    codec_model.config.listen_rule = {"threshold": 0.7, "min_frames": 2}
    assert DuplexSession(codec_model, processor_no_vision).rule == ListenRule(0.7, 2)
    assert ListenGroup(codec_model).rule == ListenRule(0.7, 2)
    assert DuplexSession(codec_model, processor_no_vision, rule=ListenRule(0.6, 1)).rule == ListenRule(0.6, 1)
    ScriptedListener(codec_model, irq_at=2)  # irq on one frame only
    session = DuplexSession(codec_model, processor_no_vision, settings=settings(16))
    session.respond(speech_inputs(processor_no_vision))
    assert "interrupted" not in [e.type for e in talk(session, mic(10))]
    codec_model.config.listen_rule = None
    codec_model.forward = original
    ScriptedListener(codec_model, irq_at=2)
    session = DuplexSession(codec_model, processor_no_vision, settings=settings(16))
    session.respond(speech_inputs(processor_no_vision))
    assert [e.frame for e in talk(session, mic(10)) if e.type == "interrupted"] == [2]
    codec_model.config.listen_rule = {"threshold": 0.7, "frames": 2}  # set by hand after loading: still checked
    with pytest.raises(ValueError, match=r"listen_rule must be None or .*got \{'threshold': 0.7, 'frames': 2\}"):
        ListenGroup(codec_model)
