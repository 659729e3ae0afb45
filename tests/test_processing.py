"""MiniOmni2Processor: SPEC §4 layouts from real inputs, §5 features, batching and clear errors."""

import numpy as np
import pytest
import soundfile
import torch
from transformers import AutoProcessor

from mini_omni2 import MiniOmni2Processor
from mini_omni2.processing_mini_omni2 import load_audio

from conftest import color_image, espeak_wav, sine


def spec_row(processor, task, text=None, frames=None):
    """The expected 8 streams, written out from the SPEC §4 table with the tiny layout's ids."""
    lay = processor.layout
    a = lambda ids: [[lay.layershift(c, i) for c in ids] for i in range(7)]  # noqa: E731
    tokens = processor.tokenizer.encode(text, add_special_tokens=False) if text else []
    L = frames
    table = {
        "A1A2": (a([lay.input_a] + [lay.pad_a] * (L or 0) + [lay.eoa, lay.answer_a]),
                 [lay.input_t] + [lay.pad_t] * (L or 0) + [lay.eot, lay.answer_t]),
        "A1T2": (a([lay.input_a] + [lay.pad_a] * (L or 0) + [lay.eoa, lay.pad_a]),
                 [lay.input_t] + [lay.pad_t] * (L or 0) + [lay.eot, lay.answer_t]),
        "A1T1": (a([lay.input_a] + [lay.pad_a] * (L or 0) + [lay.eoa, lay.pad_a]),
                 [lay.input_t] + [lay.pad_t] * (L or 0) + [lay.eot, lay.asr]),
        "T1A2": (a([lay.pad_a] * (len(tokens) + 2) + [lay.answer_a]), [lay.input_t] + tokens + [lay.eot, lay.answer_t]),
        "T1T2": (a([lay.pad_a] * (len(tokens) + 3)), [lay.input_t] + tokens + [lay.eot, lay.answer_t]),
        "VA1A2": (a([lay.image] + [lay.pad_a] * 50 + [lay.eoimage, lay.input_a] + [lay.pad_a] * (L or 0) + [lay.eoa, lay.answer_a]),
                  [lay.pad_t] * ((L or 0) + 54) + [lay.answer_t]),
        "VA1T2": (a([lay.image] + [lay.pad_a] * 50 + [lay.eoimage, lay.input_a] + [lay.pad_a] * (L or 0) + [lay.eoa, lay.pad_a]),
                  [lay.pad_t] * ((L or 0) + 54) + [lay.answer_t]),
    }
    audio, text_row = table[task]
    return audio + [text_row]


@pytest.mark.parametrize(
    "task, kwargs",
    [
        ("A1A2", dict(output="speech")),
        ("A1T2", dict(output="text")),
        ("A1T1", dict(output="asr")),
        ("T1A2", dict(output="speech")),
        ("T1T2", dict(output="text")),
        ("VA1A2", dict(output="speech")),
        ("VA1T2", dict(output="text")),
    ],
)
def test_every_spec_layout_for_a_fixed_tokenizer(processor, task, kwargs):
    seconds = 0.5
    inputs = {}
    if "A1" in task:
        inputs["audio"] = (sine(seconds), 16000)
    if "T1" in task[:2]:
        inputs["text"] = "What is your name?"
    if task.startswith("V"):
        inputs["images"] = color_image()
    batch = processor(**inputs, **kwargs)
    frames = int(seconds * 16000) // 320 + 1 if "audio" in inputs else None
    expected = spec_row(processor, task, inputs.get("text"), frames)
    assert batch["input_ids"][0].tolist() == expected
    assert batch["attention_mask"].tolist() == [[1] * len(expected[0])]
    if frames:
        assert batch["audio_lengths"].tolist() == [frames]
        assert batch["input_features"].shape == (1, 80, 3000)
        first = 52 if task.startswith("V") else 1
        assert torch.nonzero(batch["audio_feature_mask"][0]).flatten().tolist() == list(range(first, first + frames))
    if task.startswith("V"):
        assert batch["pixel_values"].shape == (1, 3, 224, 224)
        assert torch.nonzero(batch["image_feature_mask"][0]).flatten().tolist() == list(range(1, 51))


def test_task_is_inferred_from_inputs_and_output(processor):
    by_task = processor(text="Hello world", task="T1T2")
    by_output = processor(text="Hello world", output="text")
    assert torch.equal(by_task["input_ids"], by_output["input_ids"])
    default = processor(text="Hello world")  # speech answers by default
    assert default["input_ids"][0, 0, -1] == processor.layout.layershift(processor.layout.answer_a, 0)


def test_extension_layouts_image_only_and_image_text(processor):
    lay = processor.layout
    caption = processor(images=color_image(), output="text")
    assert caption["input_ids"].shape[-1] == 53
    assert caption["input_ids"][0, 7].tolist() == [lay.pad_t] * 52 + [lay.answer_t]
    vqa = processor(images=color_image(), text="Describe the image.", output="speech")
    tokens = processor.tokenizer.encode("Describe the image.", add_special_tokens=False)
    assert vqa["input_ids"][0, 7].tolist() == [lay.pad_t] * 52 + [lay.input_t] + tokens + [lay.eot, lay.answer_t]
    assert vqa["input_ids"][0, 0, -1] == lay.layershift(lay.answer_a, 0)


def test_batch_parallel_pairs(processor):
    batch = processor(text=["Hello world", "Tell me a story"], output=["speech", "text"], batch_parallel=True)
    assert batch["request_index"].tolist() == [0, 0, 1]
    lay = processor.layout
    speech, twin = batch["input_ids"][0], batch["input_ids"][1]
    assert torch.equal(speech[:, :-1], twin[:, :-1]) and torch.equal(speech[7], twin[7])
    assert twin[:7, -1].tolist() == [lay.layershift(lay.pad_a, i) for i in range(7)]
    audio = processor(audio=(sine(0.3), 16000), images=color_image(), output="speech", batch_parallel=True)
    assert audio["input_features"].shape[0] == 2 and audio["pixel_values"].shape[0] == 2


def test_batches_are_left_padded(processor):
    lay = processor.layout
    batch = processor(
        text=[None, "Hello world", None],
        audio=[(sine(0.2), 16000), None, (sine(1.0), 16000)],
        images=[None, None, color_image()],
        output=["speech", "text", "text"],
    )
    assert batch["input_ids"].shape[0] == 3 and batch["request_index"].tolist() == [0, 1, 2]
    assert batch["input_features"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1
    lengths = batch["attention_mask"].sum(1).tolist()
    width = batch["input_ids"].shape[-1]
    assert max(lengths) == width
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        pad = width - length
        assert batch["input_ids"][row, 7, :pad].tolist() == [lay.pad_t] * pad
        assert batch["input_ids"][row, 0, :pad].tolist() == [lay.layershift(lay.pad_a, 0)] * pad
        assert not batch["audio_feature_mask"][row, :pad].any()
    alone = processor(text="Hello world", output="text")
    assert torch.equal(batch["input_ids"][1, :, -alone["input_ids"].shape[-1]:], alone["input_ids"][0])


def test_audio_inputs_paths_resampling_and_stereo(processor, tmp_path):
    wave = sine(1.0, sampling_rate=16000)
    path = tmp_path / "tone.wav"
    soundfile.write(path, wave, 16000)
    from_file = load_audio(str(path))
    assert from_file.shape == (16000,) and np.allclose(from_file, wave, atol=1e-4)
    resampled = load_audio((sine(1.0, sampling_rate=44100), 44100))
    assert abs(len(resampled) - 16000) <= 1
    stereo = load_audio((sine(0.5, channels=2), 16000))
    assert stereo.shape == (8000,) and np.allclose(stereo, sine(0.5), atol=1e-6)
    stereo_first = load_audio((sine(0.5, channels=2).T, 16000))
    assert np.allclose(stereo_first, stereo)
    stereo_path = tmp_path / "stereo.wav"
    soundfile.write(stereo_path, sine(0.5, sampling_rate=22050, channels=2), 22050)
    batch = processor(audio=str(stereo_path), output="text")
    assert batch["audio_lengths"].tolist() == [8000 // 320 + 1]


def test_spoken_prompt_from_espeak(processor, tmp_path):
    path = espeak_wav("What is your name?", tmp_path / "question.wav")
    info = soundfile.info(path)
    batch = processor(audio=path, output="speech")
    samples = int(round(info.frames * 16000 / info.samplerate))
    assert abs(int(batch["audio_lengths"][0]) - (samples // 320 + 1)) <= 1
    features = batch["input_features"][0]
    assert features.shape == (80, 3000) and features.std() > 0.1


def test_whisper_frames_are_capped_at_1500(processor):
    batch = processor(audio=(np.zeros(30 * 16000, dtype=np.float32) + 0.01, 16000), output="text")
    assert batch["audio_lengths"].tolist() == [1500]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(audio=(np.zeros(0, dtype=np.float32), 16000)), "empty"),
        (dict(audio=(np.array([0.0, np.nan, 0.1], dtype=np.float32), 16000)), "NaN"),
        (dict(audio=(np.array([0.0, np.inf, 0.1], dtype=np.float32), 16000)), "NaN or infinite"),
        (dict(audio=(sine(31.0), 16000)), "over the 30 s"),
        (dict(audio=np.zeros(100, dtype=np.float32)), "sampling_rate"),
        (dict(audio="/no/such/file.wav"), "not found"),
        (dict(text="Hello", task="T2T1"), "Unknown task"),
        (dict(text="Hello", output="song"), "Unknown output"),
        (dict(text="Hello", audio=(sine(0.2), 16000)), "No layout"),
        (dict(text="Hello", task="A1T2"), "takes"),
        (dict(text="   "), "non-empty"),
        (dict(), "at least one"),
        (dict(text=["a", "b"], output=["text"]), "entries"),
    ],
)
def test_bad_input_gets_a_clear_error(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_long_audio_can_be_truncated(processor):
    batch = processor(audio=(sine(31.0), 16000), output="text", truncate_audio=True)
    assert batch["audio_lengths"].tolist() == [1500]


def test_image_given_to_a_model_without_vision(processor_no_vision):
    with pytest.raises(ValueError, match="no vision"):
        processor_no_vision(images=color_image(), audio=(sine(0.2), 16000))


def test_text_that_would_overflow_the_context(tokenizer):
    from mini_omni2.tiny import tiny_config

    small = MiniOmni2Processor.from_config(tiny_config(), tokenizer=tokenizer)
    small.model_max_length = 16
    with pytest.raises(ValueError, match="context"):
        small(text="Tell me a story about a cat and a dog who were friends in a quiet little town.")


def test_decode_drops_layout_specials(processor):
    lay = processor.layout
    ids = processor.tokenizer.encode("Hello world", add_special_tokens=False)
    assert processor.decode(ids + [lay.eot, lay.pad_t, lay.pad_t]) == "Hello world"
    assert processor.batch_decode([ids, torch.tensor(ids)]) == ["Hello world"] * 2


def test_save_and_auto_load(processor, tmp_path):
    import mini_omni2  # noqa: F401  (registers the Auto classes)

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MiniOmni2Processor) and loaded.layout == processor.layout
    request = dict(text=["Hello world", None], audio=[None, (sine(0.3), 16000)], output="speech")
    a, b = processor(**request), loaded(**request)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
