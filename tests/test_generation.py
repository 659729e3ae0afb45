"""generate: the decoding rules of SPEC §6-7 on a scripted model, and batching/sampling on the real tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, TextStreamer

from mini_omni2.generation_mini_omni2 import (
    MiniOmni2GenerateOutput,
    check_twin_rule,
    infer_task,
    release_generation_config,
)
from mini_omni2.tiny import tiny_model
from mini_omni2.token_layout import TASKS, TokenLayout

from conftest import color_image, sine

MAX = 40


class Scripted:
    """Replaces a tiny model's forward: at call ``step`` (0 = prefill), row ``r``'s logits put their maximum on
    ``audio(step, r)`` (7 local ids) and ``text(step, r)``. Records the ids fed at every decoding call."""

    def __init__(self, model, audio, text):
        self.layout = model.layout
        self.audio, self.text = audio, text
        self.calls = 0
        self.fed: list[torch.Tensor] = []
        self.prefill_embeds = None
        model.forward = self

    def __call__(self, input_ids=None, inputs_embeds=None, logits_to_keep=0, **kwargs):
        step = self.calls
        self.calls += 1
        if input_ids is None:
            self.prefill_embeds = inputs_embeds.clone()
            rows = inputs_embeds.shape[0]
        else:
            assert input_ids.shape[-1] == 1
            self.fed.append(input_ids[:, :, 0].clone())
            rows = input_ids.shape[0]
        layout = self.layout
        logits = torch.zeros(rows, 1, layout.total_vocab_size)
        for r in range(rows):
            logits[r, 0, self.text(step, r)] = 5.0
            for i, code in enumerate(self.audio(step, r)):
                logits[r, 0, layout.layershift(code, i)] = 5.0
        text, audio = layout.split_logits(logits)
        return SimpleNamespace(logits=logits, text_logits=text, audio_logits=audio.transpose(1, 2))


@pytest.fixture
def fresh_model():
    return tiny_model(seed=0)


@pytest.fixture
def layout(model) -> TokenLayout:
    return model.layout


def code(step, layer, row=0):
    """A scripted codec code (tiny codebook 64)."""
    return (step * 7 + layer * 3 + row * 11) % 64


def word(step, row=0):
    """A scripted tokenizer id."""
    return 10 + step + 100 * row


def pads(layout):
    return [layout.layershift(layout.pad_a, i) for i in range(7)]


def expected_frames(codes_by_step, num_steps):
    """SPEC §7 by hand: frame k = (L0[k+1], L1[k+2], ..., L6[k+7])."""
    return torch.tensor([[codes_by_step[k + i + 1][i] for i in range(7)] for k in range(num_steps - 7)])


def inputs_for(processor, **request):
    return dict(processor(**request))


# ----- the twin rule ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [TokenLayout(), None])
def test_twin_rule_is_the_text_output_task(sizes, model):
    layout = sizes or model.layout
    check_twin_rule.cache_clear()
    check_twin_rule(layout)  # raises if a speech task's twin is not its text-out prompt
    speech = [t for t, (_, out) in TASKS.items() if out == "speech"]
    assert {layout.text_output_task(t) for t in speech} >= {"A1T2", "T1T2", "VA1T2"}


def test_infer_task(layout, processor):
    cases = [
        (dict(text="hello", output="speech"), "T1A2"),
        (dict(text="hello", output="text"), "T1T2"),
        (dict(audio=sine(0.1), sampling_rate=16000, output="asr"), "A1T1"),
        (dict(audio=sine(0.1), sampling_rate=16000, images=color_image(), output="speech"), "VA1A2"),
    ]
    for request, task in cases:
        ids = processor(**request)["input_ids"][0]
        assert infer_task(layout, ids) == task


# ----- speech answers: batch parallel (SPEC §6) ---------------------------------------------------------------------
def _check_batch_parallel(model, processor, request, layout):
    eot_step, eoa_step = 3, 12
    speech_codes = {s: [code(s, i) for i in range(7)] for s in range(MAX)}

    def audio(step, row):
        if row == 0:
            codes = list(speech_codes[step])
            if step == eoa_step:
                codes[6] = layout.eoa
            return codes
        return [layout.answer_a] * 7  # the twin's audio logits must never be used

    def text(step, row):
        if row == 1:
            return layout.eot if step == eot_step else word(step)
        return word(step, row=2)  # the speech row's text logits must never be used

    script = Scripted(model, audio, text)
    inputs = inputs_for(processor, **request)
    out = model.generate(**inputs, max_new_tokens=MAX, codec_noise=False)

    # prefill: the speech row and its text-out twin = the processor's two batch parallel rows (SPEC §6)
    pair = processor(**request, batch_parallel=True)
    pair.pop("request_index")
    reference = model.model.embed(
        pair["input_ids"], pair.get("input_features"), pair.get("audio_feature_mask"), pair.get("pixel_values"),
        pair.get("image_feature_mask"),
    )
    assert script.prefill_embeds.shape[0] == 2
    torch.testing.assert_close(script.prefill_embeds, reference, rtol=1e-5, atol=1e-5)

    # fed ids: both rows get the twin's text token (pad_t forced after eot); row 0 the speech row's audio tokens
    # (the delay slots too, as sampled), the twin pad_a
    expected_text = [
        word(s) if s < eot_step else (layout.eot if s == eot_step else layout.pad_t) for s in range(eoa_step)
    ]
    assert len(script.fed) == eoa_step  # steps 0..11 fed back; step 12 (eoa) ends it
    for s, fed in enumerate(script.fed):
        assert fed[0].tolist() == [layout.layershift(c, i) for i, c in enumerate(speech_codes[s])] + [expected_text[s]]
        assert fed[1].tolist() == pads(layout) + [expected_text[s]]
    assert out.generated_lengths.tolist() == [eoa_step]
    assert out.finish_reasons == ["eoa"]
    assert out.text_ids[0].tolist() == [word(s) for s in range(eot_step)]
    frames = expected_frames(speech_codes, eoa_step)
    assert torch.equal(out.audio_frames[0], frames)
    assert not out.audio_frames_replaced[0].any()
    level0, level1, level2 = out.audio_codes[0]
    assert level0[0].tolist() == frames[:, 0].tolist()
    assert level1[0].tolist() == frames[:, [1, 4]].flatten().tolist()
    assert level2[0].tolist() == frames[:, [2, 3, 5, 6]].flatten().tolist()
    assert out.waveforms[0].shape == (frames.shape[0] * model.codec.samples_per_frame,)
    torch.testing.assert_close(out.waveforms[0], model.codec.decode(frames[None], noise=False)[0])
    assert out.sampling_rate == 24000
    # the raw streams: the prompt, then what was fed
    prompt_len = inputs["input_ids"].shape[-1]
    assert torch.equal(out.sequences[0, :, :prompt_len], inputs["input_ids"][0])
    generated = out.sequences[0, :, prompt_len:].T
    assert torch.equal(generated[:eoa_step], torch.stack([f[0] for f in script.fed]))
    assert generated[eoa_step:].tolist() == [pads(layout) + [layout.pad_t]]  # the stop step: padding
    return out


def test_batch_parallel_A1A2(fresh_model, processor, layout):
    request = dict(audio=sine(0.3), sampling_rate=16000, output="speech")
    out = _check_batch_parallel(fresh_model, processor, request, layout)
    assert out.tasks == ["A1A2"] and out.output_kinds == ["speech"]


def test_batch_parallel_VA1A2(fresh_model, processor, layout):
    request = dict(audio=sine(0.2), sampling_rate=16000, images=color_image(), output="speech")
    out = _check_batch_parallel(fresh_model, processor, request, layout)
    assert out.tasks == ["VA1A2"]


def test_batch_parallel_T1A2(fresh_model, processor, layout):
    out = _check_batch_parallel(fresh_model, processor, dict(text="hello world", output="speech"), layout)
    assert out.tasks == ["T1A2"]


def test_speech_without_batch_parallel_takes_all_8_tokens_from_its_row(fresh_model, processor, layout):
    eot_step, eoa_step = 2, 10
    codes = {s: [code(s, i, row=1) for i in range(7)] for s in range(MAX)}

    def audio(step, row):
        c = list(codes[step])
        if step == eoa_step:
            c[6] = layout.eoa
        return c

    text = lambda step, row: layout.eot if step == eot_step else word(step, row=1)  # noqa: E731
    script = Scripted(fresh_model, audio, text)
    out = fresh_model.generate(**inputs_for(processor, text="hello", output="speech"), batch_parallel=False,
                               max_new_tokens=MAX, decode_audio=False)
    assert script.prefill_embeds.shape[0] == 1  # no twin
    for s, fed in enumerate(script.fed):
        t = word(s, row=1) if s < eot_step else (layout.eot if s == eot_step else layout.pad_t)
        assert fed[0].tolist() == [layout.layershift(c, i) for i, c in enumerate(codes[s])] + [t]
    assert len(script.fed) == eoa_step
    assert out.text_ids[0].tolist() == [word(0, 1), word(1, 1)]
    assert torch.equal(out.audio_frames[0], expected_frames(codes, eoa_step))
    assert out.waveforms == [None]  # decode_audio=False


# ----- text answers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_, task",
    [
        (dict(audio=sine(0.2), sampling_rate=16000, output="text"), "A1T2"),
        (dict(audio=sine(0.2), sampling_rate=16000, output="asr"), "A1T1"),
        (dict(text="what is your name?", output="text"), "T1T2"),
    ],
)
def test_text_answers(fresh_model, processor, layout, request_, task):
    eot_step = 5
    # the audio logits would say eoa on layer 7 at step 1: a text row ignores them (fed pad_a, no stop)
    audio = lambda step, row: [code(step, i) for i in range(6)] + [layout.eoa if step == 1 else 3]  # noqa: E731
    text = lambda step, row: layout.eot if step == eot_step else word(step)  # noqa: E731
    script = Scripted(fresh_model, audio, text)
    inputs = inputs_for(processor, **request_)
    out = fresh_model.generate(**inputs, max_new_tokens=MAX)
    assert script.prefill_embeds.shape[0] == 1  # text answers get no twin
    assert len(script.fed) == eot_step  # stops at eot; that step is not fed
    for s, fed in enumerate(script.fed):
        assert fed[0].tolist() == pads(layout) + [word(s)]
    assert out.text_ids[0].tolist() == [word(s) for s in range(eot_step)]
    assert out.generated_lengths.tolist() == [eot_step]
    assert out.finish_reasons == ["eot"]
    assert out.tasks == [task]
    assert out.output_kinds == ["asr" if task == "A1T1" else "text"]
    assert out.audio_frames == [None] and out.waveforms == [None]


def test_max_new_tokens_and_release_defaults(fresh_model, processor, layout):
    script = Scripted(fresh_model, lambda s, r: [code(s, i) for i in range(7)], lambda s, r: word(s))
    out = fresh_model.generate(**inputs_for(processor, text="hello", output="speech"), max_new_tokens=9,
                               decode_audio=False)
    assert script.calls == 1 + 8  # prefill + 8 decoding calls (the 9th step is not fed back)
    assert out.generated_lengths.tolist() == [9] and out.finish_reasons == ["length"]
    assert out.audio_frames[0].shape == (2, 7)
    assert out.sequences.shape[-1] == inputs_for(processor, text="hello")["input_ids"].shape[-1] + 9
    assert isinstance(out, MiniOmni2GenerateOutput)
    config = release_generation_config()
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.9, 1, 1.0)


def test_force_delay_pad_and_min_new_tokens(fresh_model, processor, layout):
    def audio(step, row):
        c = [code(step, i) for i in range(7)]
        if step in (8, 11):
            c[6] = layout.eoa
        return c

    script = Scripted(fresh_model, audio, lambda s, r: word(s))
    out = fresh_model.generate(**inputs_for(processor, text="hello", output="speech"), batch_parallel=False,
                               force_delay_pad=True, min_new_tokens=10, max_new_tokens=MAX, decode_audio=False)
    # eoa at step 8 is banned by min_new_tokens (argmax falls on local id 0), the one at step 11 stops
    assert out.generated_lengths.tolist() == [11]
    assert len(script.fed) == 11
    for s, fed in enumerate(script.fed):
        local = [fed[0, i].item() - layout.layershift(0, i) for i in range(7)]
        for i in range(7):
            if s <= i:
                assert local[i] == layout.pad_a  # delay slot forced
            elif s == 8 and i == 6:
                assert local[i] == 0
            else:
                assert local[i] == code(s, i)


def test_mixed_batch_rows_stop_on_their_own(fresh_model, processor, layout):
    """Requests 0 (speech, twin = row 3), 1 (text), 2 (speech, twin = row 4, never stops); finished rows get padding."""
    stop = {0: 9, 1: 4}

    def audio(step, row):
        c = [code(step, i, row) for i in range(7)]
        if row in (0, 2) and step == stop.get(row):
            c[6] = layout.eoa
        return c

    def text(step, row):
        if row == 1:
            return layout.eot if step == stop[1] else word(step, 1)
        return word(step, row if row in (3, 4) else 2)  # rows 0 and 2 (speech rows) must not give the text

    script = Scripted(fresh_model, audio, text)
    inputs = inputs_for(processor, text=["hello", "what is your name?", "hi"], output=["speech", "text", "speech"])
    out = fresh_model.generate(**inputs, max_new_tokens=12, decode_audio=False)
    assert script.prefill_embeds.shape[0] == 5  # 3 requests + 2 twins
    assert out.generated_lengths.tolist() == [9, 4, 12]
    assert out.finish_reasons == ["eoa", "eot", "length"]
    pad_row = pads(layout) + [layout.pad_t]
    assert len(script.fed) == 11
    for s, fed in enumerate(script.fed):
        if s >= 9:
            assert fed[0].tolist() == pad_row and fed[3].tolist() == pad_row
        else:
            assert fed[0].tolist() == [layout.layershift(code(s, i, 0), i) for i in range(7)] + [word(s, 3)]
            assert fed[3].tolist() == pads(layout) + [word(s, 3)]
        if s >= 4:
            assert fed[1].tolist() == pad_row
        else:
            assert fed[1].tolist() == pads(layout) + [word(s, 1)]
        assert fed[2].tolist() == [layout.layershift(code(s, i, 2), i) for i in range(7)] + [word(s, 4)]
        assert fed[4].tolist() == pads(layout) + [word(s, 4)]
    assert out.text_ids[1].tolist() == [word(s, 1) for s in range(4)]
    assert out.text_ids[2].tolist() == [word(s, 4) for s in range(12)]


def test_stopping_criteria_keep_their_step(fresh_model, processor, layout):
    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == word(6)

    Scripted(fresh_model, lambda s, r: [code(s, i) for i in range(7)], lambda s, r: word(s))
    out = fresh_model.generate(**inputs_for(processor, text="hello", output="text"), stopping_criteria=[StopAt()],
                               max_new_tokens=MAX)
    assert out.text_ids[0].tolist() == [word(s) for s in range(7)]
    assert out.finish_reasons == ["stopping_criteria"]


def test_special_id_in_codes_is_sanitized_not_fatal(fresh_model, processor, layout):
    eoa_step = 14
    codes = {s: [code(s, i) for i in range(7)] for s in range(MAX)}
    codes[5][2] = layout.eoa  # layer 3, frame 2: a special where a code is expected
    codes[1][0] = layout.pad_a  # layer 1, frame 0 (no previous code: becomes 0)

    def audio(step, row):
        c = list(codes[step])
        if step == eoa_step:
            c[6] = layout.eoa
        return c

    Scripted(fresh_model, audio, lambda s, r: word(s))
    out = fresh_model.generate(**inputs_for(processor, text="hello", output="speech"), max_new_tokens=MAX,
                               codec_noise=False)
    frames = expected_frames(codes, eoa_step)
    replaced = torch.zeros_like(frames, dtype=torch.bool)
    replaced[2, 2] = replaced[0, 0] = True
    frames[2, 2] = frames[1, 2]
    frames[0, 0] = 0
    assert torch.equal(out.audio_frames_replaced[0], replaced)
    assert torch.equal(out.audio_frames[0], frames)
    assert out.waveforms[0].shape == (frames.shape[0] * fresh_model.codec.samples_per_frame,)
    assert torch.isfinite(out.waveforms[0]).all()


def test_generate_refuses_bad_inputs(model, processor):
    inputs = inputs_for(processor, text="hello", output="speech", batch_parallel=True)
    with pytest.raises(ValueError, match="one prompt row per request"):
        model.generate(**inputs, max_new_tokens=2)
    inputs = inputs_for(processor, text="hello")
    with pytest.raises(TypeError, match="unexpected"):
        model.generate(**inputs, max_new_token=2)
    right_padded = inputs_for(processor, text=["hello", "what is your name?"])
    right_padded["attention_mask"] = right_padded["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="left"):
        model.generate(**right_padded, max_new_tokens=2)


# ----- the real tiny model ------------------------------------------------------------------------------------------
class EotAfter(LogitsProcessor):
    """Makes eot the best text id right after the text token ``trigger``: text rows end early, at different steps."""

    def __init__(self, trigger: int, eot: int):
        self.trigger, self.eot = trigger, eot

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[input_ids[:, -1] == self.trigger, self.eot] = 1e4
        return scores


def _mixed_requests():
    return [
        dict(text="hello world", output="speech"),
        dict(audio=sine(0.5), output="speech"),
        dict(text="what is your name? tell me a story", output="text"),
        dict(audio=sine(0.3, freq=440.0), output="asr"),
        dict(audio=sine(0.4, freq=330.0), images=color_image(), output="speech"),
        dict(text="the quick brown fox", output="text"),
    ]


def _build(processor, requests):
    def column(name):
        return [(r[name], 16000) if name == "audio" and name in r else r.get(name) for r in requests]

    return dict(processor(text=column("text"), audio=column("audio"), images=column("images"),
                          output=[r["output"] for r in requests]))


def test_many_requests_equal_each_alone(model, processor, layout):
    requests = _mixed_requests()
    kwargs = dict(max_new_tokens=20, do_sample=False, codec_noise=False,
                  logits_processor=[EotAfter(trigger=127, eot=layout.eot)])
    batch_inputs = _build(processor, requests)
    batch = model.generate(**batch_inputs, **kwargs)
    start = batch_inputs["input_ids"].shape[-1]
    assert batch.tasks == ["T1A2", "A1A2", "T1T2", "A1T1", "VA1A2", "T1T2"]
    assert len(set(batch.generated_lengths.tolist())) > 1  # the rows stop at different steps
    assert "eot" in batch.finish_reasons
    for k, request in enumerate(requests):
        alone_inputs = _build(processor, [request])
        alone = model.generate(**alone_inputs, **kwargs)
        alone_start = alone_inputs["input_ids"].shape[-1]
        assert alone.generated_lengths[0] == batch.generated_lengths[k]
        assert alone.finish_reasons[0] == batch.finish_reasons[k]
        assert torch.equal(alone.text_ids[0], batch.text_ids[k])
        n = int(batch.generated_lengths[k])
        assert n > 0
        alone_steps = alone.sequences[0, :, alone_start : alone_start + n]
        assert torch.equal(alone_steps, batch.sequences[k, :, start : start + n])
        if batch.audio_frames[k] is None:
            assert alone.audio_frames[0] is None
        else:
            assert torch.equal(alone.audio_frames[0], batch.audio_frames[k])
            torch.testing.assert_close(alone.waveforms[0], batch.waveforms[k], rtol=1e-4, atol=1e-5)


def test_static_cache_matches_dynamic(model, processor):
    requests = [dict(text="hello world", output="speech"), dict(text="what is your name?", output="text")]
    inputs = _build(processor, requests)
    dynamic = model.generate(**inputs, max_new_tokens=12, decode_audio=False)
    static = model.generate(**inputs, max_new_tokens=12, decode_audio=False, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)


def test_sampling_is_reproducible(model, processor):
    inputs = _build(processor, [dict(text="hello world", output="speech")])
    kwargs = dict(max_new_tokens=12, decode_audio=False, do_sample=True, temperature=1.5, top_k=0, top_p=0.95)
    torch.manual_seed(123)
    first = model.generate(**inputs, **kwargs).sequences
    torch.manual_seed(123)
    second = model.generate(**inputs, **kwargs).sequences
    torch.manual_seed(7)
    other = model.generate(**inputs, **kwargs).sequences
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    a = model.generate(**inputs, **kwargs, generator=gen(5)).sequences
    b = model.generate(**inputs, **kwargs, generator=gen(5)).sequences
    assert torch.equal(a, b)
    # separate audio settings: greedy audio, sampled text
    torch.manual_seed(1)
    mixed = model.generate(**inputs, **kwargs, audio_do_sample=False).sequences
    greedy = model.generate(**inputs, max_new_tokens=12, decode_audio=False, do_sample=False).sequences
    assert not torch.equal(mixed[:, 7], greedy[:, 7])


def test_generation_config_defaults_and_overrides(model, processor):
    inputs = _build(processor, [dict(text="hello world", output="text")])
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    release = model.generate(**inputs, max_new_tokens=6)  # top_k 1: the release's effectively greedy sampling
    assert torch.equal(greedy.sequences, release.sequences)
    config = GenerationConfig(max_new_tokens=3, do_sample=False)
    assert model.generate(**inputs, generation_config=config).generated_lengths.tolist() == [3]


def test_transformers_text_streamer_gets_the_text(model, processor, tokenizer):
    seen = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            seen.append(text)

    inputs = _build(processor, [dict(text="hello world", output="text")])
    out = model.generate(**inputs, max_new_tokens=8, streamer=Capture(tokenizer, skip_prompt=True))
    assert "".join(seen) == processor.decode(out.text_ids[0])


REMOTE_GENERATE = """
import sys, json
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "mini_omni2" or name.startswith("mini_omni2."):
            raise ImportError("mini_omni2 is not installed here")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForMultimodalLM, AutoProcessor
folder = sys.argv[1]
model = AutoModelForMultimodalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
streaming = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".streaming_mini_omni2"]
streamer = streaming.MiniOmni2Streamer(processor)
out = model.generate(**processor(text=["hello world", "hi"], output=["speech", "text"]), max_new_tokens=12,
                     do_sample=False, codec_noise=False, streamer=streamer)
print(json.dumps({"sequences": out.sequences.tolist(), "module": type(model).__module__,
                  "streamed": streamer.audio(0).numel(), "wave": out.waveforms[0].numel()}))
"""


def test_generate_and_streaming_work_as_remote_code(model, processor, tmp_path):
    import json
    import subprocess
    import sys

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in ("generation_mini_omni2.py", "streaming_mini_omni2.py"):
        assert (folder / name).exists()
    script = tmp_path / "run.py"
    script.write_text(REMOTE_GENERATE)
    result = subprocess.run(
        [sys.executable, str(script), str(folder)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules")
    expected = model.generate(**processor(text=["hello world", "hi"], output=["speech", "text"]), max_new_tokens=12,
                              do_sample=False, decode_audio=False)
    assert torch.equal(torch.tensor(report["sequences"]), expected.sequences)
    assert report["streamed"] == report["wave"] > 0
