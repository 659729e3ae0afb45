"""The decoding engine: continuous batching (requests join and leave mid-flight), the sliced LM head, the shared twin
prefill, cancellation and failure isolation. Each request's greedy answer must equal its answer generated alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor

from mini_omni2.engine_mini_omni2 import DecodeGroup, DecodeSettings, EngineGroup, MiniOmni2Engine, Sampling
from mini_omni2.streaming_mini_omni2 import MiniOmni2Streamer

from conftest import color_image, sine

GREEDY = Sampling(do_sample=False)
STEPS = 14


class EotAfter(LogitsProcessor):
    """Makes eot the best text id right after the text token ``trigger``: text answers end at different steps."""

    def __init__(self, trigger: int, eot: int):
        self.trigger, self.eot = trigger, eot

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[input_ids[:, -1] == self.trigger, self.eot] = 1e4
        return scores


REQUESTS = {
    "speech": dict(text="hello world", output="speech"),
    "spoken_question": dict(audio=(sine(0.5), 16000), output="speech"),
    "text": dict(text="what is your name? tell me a story", output="text"),
    "asr": dict(audio=(sine(0.3, freq=440.0), 16000), output="asr"),
    "image": dict(audio=(sine(0.4, freq=330.0), 16000), images=color_image(), output="speech"),
}


def group_for(model, processor, request: dict, **kwargs) -> DecodeGroup:
    settings = DecodeSettings(
        text=GREEDY,
        max_new_tokens=kwargs.pop("max_new_tokens", STEPS),
        min_new_tokens=kwargs.pop("min_new_tokens", 0),
        logits_processor=kwargs.pop("logits_processor", None),
    )
    return DecodeGroup(model.layout, dict(processor(**request)), settings, codec=model.codec, codec_noise=False,
                       **kwargs)


def alone(model, processor, request: dict, max_new_tokens: int = STEPS, **kwargs):
    return model.generate(**processor(**request), max_new_tokens=max_new_tokens, do_sample=False, codec_noise=False,
                          **kwargs)


def assert_same_answer(group: DecodeGroup, reference) -> None:
    """A one-request group's result equals ``generate`` of the same request alone: every fed id, the text, the
    frames and (noise off) the waveform."""
    result = group.result()
    assert torch.equal(result.sequences, reference.sequences)
    assert result.generated_lengths.tolist() == reference.generated_lengths.tolist()
    assert result.finish_reasons == reference.finish_reasons
    assert torch.equal(result.text_ids[0], reference.text_ids[0])
    if reference.audio_frames[0] is None:
        assert result.audio_frames[0] is None
    else:
        assert torch.equal(result.audio_frames[0], reference.audio_frames[0])
        torch.testing.assert_close(result.waveforms[0], reference.waveforms[0], rtol=1e-4, atol=1e-5)


def test_sliced_head_gives_the_tokens_of_the_full_head(model, processor):
    inputs = processor(text=["hello world", "what is your name?", None], audio=[None, None, (sine(0.4), 16000)],
                       output=["speech", "text", "asr"])
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, decode_audio=False)
    sliced = model.generate(**inputs, **kwargs)
    full = model.generate(**inputs, slice_head=False, **kwargs)
    assert torch.equal(sliced.sequences, full.sequences)
    assert sliced.finish_reasons == full.finish_reasons
    # the head itself: the slices equal the columns of the full head
    hidden = torch.randn(3, 1, model.config.text_config.hidden_size)
    text, audio = model.sliced_head(hidden, torch.tensor([2, 0]), torch.tensor([1]))
    logits = model.lm_head(hidden)
    layout = model.layout
    torch.testing.assert_close(text, logits[[2, 0], :, : layout.text_vocab_size])
    torch.testing.assert_close(audio[0], layout.split_logits(logits)[1][1].transpose(0, 1))


@pytest.mark.parametrize("name", ["speech", "spoken_question", "image"])
def test_shared_twin_prefill_gives_the_same_answer(model, processor, name):
    request = REQUESTS[name]
    shared = alone(model, processor, request, share_twin_prefill=True)
    recomputed = alone(model, processor, request)
    assert torch.equal(shared.sequences, recomputed.sequences)
    torch.testing.assert_close(shared.waveforms[0], recomputed.waveforms[0])


def test_requests_join_and_leave_mid_flight(model, processor):
    """Groups join at steps 0, 2 and 5 with different tasks and lengths; finished rows and twins whose text ended
    leave the batch; every answer equals the same request generated alone."""
    eot = EotAfter(trigger=127, eot=model.layout.eot)
    engine = MiniOmni2Engine(model)
    joins = {0: ["speech", "text"], 2: ["asr", "image"], 5: ["spoken_question"]}
    groups, rows_seen = {}, []
    for step in range(200):
        for name in joins.get(step, []):
            groups[name] = engine.add(group_for(model, processor, REQUESTS[name], logits_processor=[eot],
                                                share_twin_prefill=True))
        if not engine.has_work():
            break
        engine.step()
        rows_seen.append(engine.num_rows)
    assert all(g.done for g in groups.values())
    assert max(rows_seen) >= 5 and rows_seen[-1] == 0
    assert any(b < a for a, b in zip(rows_seen, rows_seen[1:]))  # rows left before the end
    for name, group in groups.items():
        assert_same_answer(group, alone(model, processor, REQUESTS[name], logits_processor=[eot]))


def test_a_twin_leaves_when_its_text_ends(model, processor):
    group = group_for(model, processor, REQUESTS["speech"], logits_processor=[ForceEot(model, at=2)],
                      max_new_tokens=10, min_new_tokens=10)
    engine = MiniOmni2Engine(model)
    engine.add(group)
    live = []
    while not group.done:
        engine.step()
        live.append(list(group.live))
    # steps 0, 1: text; step 2: eot (fed to both rows); from then on only the speech row decodes
    assert live[:3] == [[0, 1], [0, 1], [0]] and all(rows == [0] for rows in live[3:-1])
    assert group.result().generated_lengths.tolist() == [10]
    assert_same_answer(group, alone(model, processor, REQUESTS["speech"], max_new_tokens=10, min_new_tokens=10,
                                    logits_processor=[ForceEot(model, at=2)]))


def test_max_rows_queues_requests_until_rows_free_up(model, processor):
    engine = MiniOmni2Engine(model, max_rows=3)
    names = ["speech", "text", "asr", "image"]
    groups = [engine.add(group_for(model, processor, REQUESTS[n], max_new_tokens=6)) for n in names]
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, engine.num_rows)
    assert most <= 3
    for name, group in zip(names, groups):
        assert_same_answer(group, alone(model, processor, REQUESTS[name], max_new_tokens=6))
    with pytest.raises(ValueError, match="at most 1"):
        MiniOmni2Engine(model, max_rows=1).add(group_for(model, processor, REQUESTS["speech"]))


def test_cancel_ends_one_request_and_spares_the_others(model, processor):
    engine = MiniOmni2Engine(model)
    streamer = MiniOmni2Streamer()
    victim = engine.add(group_for(model, processor, REQUESTS["speech"], streamer=streamer, max_new_tokens=40,
                                  min_new_tokens=40))
    other = engine.add(group_for(model, processor, REQUESTS["text"]))
    for _ in range(16):
        engine.step()
    frames_before = len([e for e in streamer.events if e.audio is not None])
    assert frames_before >= 1  # 9 frames exist: the first chunk is out, the second waits for its lookahead
    engine.cancel(victim)
    engine.step()
    assert victim.done and victim.result().finish_reasons == ["cancelled"]
    assert victim not in engine.groups
    events_after = [e for e in streamer.events if e.audio is not None]
    assert len(events_after) == frames_before  # nothing streamed after the cancel, not even the waiting chunk
    assert streamer.events[-1].final
    while engine.has_work():
        engine.step()
    assert_same_answer(other, alone(model, processor, REQUESTS["text"]))
    # a group cancelled while it waits for room never runs
    queued = MiniOmni2Engine(model, max_rows=2)
    first = queued.add(group_for(model, processor, REQUESTS["speech"]))
    waiting = queued.add(group_for(model, processor, REQUESTS["text"]))
    queued.cancel(waiting)
    assert waiting.done and waiting.result().finish_reasons == ["cancelled"]
    while queued.has_work():
        queued.step()
    assert first.done and waiting.step_count == 0


class Boom(LogitsProcessor):
    def __call__(self, input_ids, scores):
        raise RuntimeError("boom")


def test_one_groups_error_does_not_touch_the_others(model, processor):
    engine = MiniOmni2Engine(model)
    bad = engine.add(group_for(model, processor, REQUESTS["text"], logits_processor=[Boom()]))
    good = engine.add(group_for(model, processor, REQUESTS["speech"]))
    inputs = dict(processor(**REQUESTS["spoken_question"]))
    inputs["input_features"] = inputs["input_features"][:, :, :10]  # cannot be encoded
    broken = engine.add(DecodeGroup(model.layout, inputs, DecodeSettings(text=GREEDY, max_new_tokens=STEPS)))
    while engine.has_work():
        engine.step()
    with pytest.raises(RuntimeError, match="boom"):
        bad.result()
    assert broken.error is not None
    assert_same_answer(good, alone(model, processor, REQUESTS["speech"]))


class Listener(EngineGroup):
    """A row fed from outside: it advances only at the steps where an input arrived (here every other step)."""

    def __init__(self, layout, prompt_ids: torch.Tensor):
        super().__init__(1)
        self.layout, self.prompt_ids = layout, prompt_ids
        self.inputs_seen = 0
        self.tick = 0
        self.text_seen = []

    def prefill_inputs(self, model):
        return model.model.embed(self.prompt_ids), torch.ones(1, self.prompt_ids.shape[-1], dtype=torch.long)

    def text_slots(self):
        return [] if self.waiting()[0] else [0]

    def waiting(self):
        return [self.tick % 2 == 1]

    def next_ids(self):
        return self.layout.pad_ids()[None]

    def advance(self, text_scores, audio_scores):
        if text_scores is not None:
            self.text_seen.append(int(text_scores.argmax()))
            self.inputs_seen += 1
        self.tick += 1
        if self.inputs_seen == 4:
            self.done = True


def test_a_waiting_row_does_not_disturb_the_others(model, processor):
    engine = MiniOmni2Engine(model)
    prompt = processor(text="hello")["input_ids"]
    listener = engine.add(Listener(model.layout, prompt))
    speech = engine.add(group_for(model, processor, REQUESTS["speech"]))
    positions = []
    while engine.has_work():
        if listener in engine.groups:
            positions.append(int(engine.positions[0]))
        engine.step()
    assert listener.inputs_seen == 4
    n = prompt.shape[-1]
    assert positions[:5] == [n, n, n + 1, n + 1, n + 2]  # after the prefill; it waits at every other step
    assert_same_answer(speech, alone(model, processor, REQUESTS["speech"]))


def test_huge_max_new_tokens_allocates_nothing_up_front(model, processor):
    import tracemalloc

    tracemalloc.start()
    out = model.generate(**processor(text="hello", output="text"), max_new_tokens=10**9, do_sample=False,
                         logits_processor=[ForceEot(model, at=3)])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.generated_lengths.tolist() == [3] and out.finish_reasons == ["eot"]
    assert peak < 200 * 2**20


class ForceEot(LogitsProcessor):
    """Makes eot the best text id from the call ``at`` on (0-based): the text ends at that step."""

    def __init__(self, model, at: int):
        self.eot, self.at, self.calls = model.layout.eot, at, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.at:  # calls are 1-based: call at + 1 is step at
            scores = scores.clone()
            scores[:, self.eot] = 1e4
        return scores


def test_int8_weight_only_language_model(processor):
    """torchao int8 weight-only layers in the language model and its head: logits stay close to bfloat16's and the
    engine's sliced head works on the quantized head."""
    from mini_omni2.tiny import tiny_model

    model = tiny_model(seed=3).to(torch.bfloat16)
    model.codec.float()
    inputs = processor(text="hello world", output="speech")
    reference = model(**{k: v for k, v in inputs.items() if k != "request_index"}).logits.float()
    model.quantize_int8()
    quantized = model(**{k: v for k, v in inputs.items() if k != "request_index"}).logits.float()
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    relative = (quantized - reference).norm() / reference.norm()
    assert float(relative) < 0.05
    out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, codec_noise=False)
    assert out.generated_lengths.tolist() == [10] and out.audio_frames[0].shape == (3, 7)
